"""Chat templates: render a list of messages into the prompt text a chat model was trained on.

A checkpoint's template (Jinja, from its `tokenizer_config.json` or `chat_template.jinja`, stored by the exporter in
the container metadata under "chat_template") is untrusted code, so it runs in Jinja's immutable sandbox, with the
names Hugging Face templates expect: `messages`, `add_generation_prompt`, the special-token strings (`bos_token`,
`eos_token`, ...), `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter that does not HTML-escape.
The rendering matches `transformers`' `tokenizer.apply_chat_template(..., tokenize=False)` (tests check it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import ClassVar

from .errors import EdgeMoEError

Message = dict  # {"role": "system" | "user" | "assistant" | ..., "content": str, ...}


class ChatTemplateError(EdgeMoEError):
    """The template could not be compiled or raised an error while rendering (raise_exception)."""


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise EdgeMoEError("chat templates need the jinja2 package (pip install jinja2)") from None
    return jinja2


@lru_cache(maxsize=8)
def _compile(template: str):
    jinja2 = _jinja()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & for HTML; chat templates want the plain JSON text
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _generation_tag(jinja2)],
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e} (line {e.lineno})") from None


def _generation_tag(jinja2):
    """`{% generation %}...{% endgeneration %}` (used by some templates to mark assistant text for training
    masks): rendered as its body."""

    class GenerationTag(jinja2.ext.Extension):
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


def check_messages(messages: Sequence[Message]) -> list[dict]:
    """Plain copies of the messages, or a clear error for anything that is not a list of role/content dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise EdgeMoEError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                           f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise EdgeMoEError(f"message {i} must be a dict with a 'role' (and usually 'content'), got {m!r}")
        out.append(dict(m))
    return out


def render_chat_template(template: str, messages: Sequence[Message], add_generation_prompt: bool = True,
                         special_tokens: dict[str, str] | None = None, **extra) -> str:
    """Render `messages` with the Jinja chat `template`.

    special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...} as the template refers to them. extra: further
    variables some templates read (tools, documents, enable_thinking, ...).
    """
    jinja2 = _jinja()
    compiled = _compile(template)
    variables = {**(special_tokens or {}), **extra}
    try:
        return compiled.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                               **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template refused these messages: {e}") from None


def render_plain_transcript(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The fallback for a model without a chat template: one "Role: content" line per message, then "Assistant:".

    For example [{"role": "user", "content": "Hi"}] -> "User: Hi\\nAssistant:". Contents are stripped, so a reply
    generated as " Hello" renders as "Assistant: Hello" in the next turn, the text the model saw (and the KV cache
    holds) when it produced it.
    """
    lines = []
    for m in check_messages(messages):
        content = m.get("content")
        lines.append(f"{str(m['role']).capitalize()}: {'' if content is None else str(content).strip()}")
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)


# The fallback transcript's turns start on a new line with a role name: generation stops when the model starts one.
PLAIN_TRANSCRIPT_STOPS = ("\nUser:", "\nSystem:")
