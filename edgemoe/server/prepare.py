"""A checked OpenAI request turned into what the model runs (token ids, decoding, JSON constraint, tools), and the
results turned back into OpenAI's objects: shared by the HTTP server (app.py) and the in-process API (local.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..chat_template import PLAIN_TRANSCRIPT_STOPS, render_plain_transcript
from ..errors import EdgeMoEError
from . import openai_api as api
from .json_constraint import JsonConstraint, TokenIndex
from .openai_api import APIError
from .tool_calls import ToolPlan, plan_tools


@dataclass
class Prepared:
    """One request, ready to run: ids, opts.decoding (max_new_tokens set), an optional constraint, and the shaping."""

    chat: bool
    model_id: str
    ids: list[int]
    opts: api.Options
    constraint: JsonConstraint | None = None
    tools: ToolPlan = field(default_factory=ToolPlan)
    rid: str = ""
    created: int = 0

    def __post_init__(self):
        self.rid = api.new_id("chatcmpl" if self.chat else "cmpl")
        self.created = api.now()
        self.entries = list  # set by the runner: () -> the run's Sequence.logprobs so far
        self._sent, self._chars = 0, 0  # logprob entries and text characters streamed so far

    def _logprobs(self, new_only: bool = False) -> dict | None:
        """The "logprobs" of a response, or of a chunk (the entries not sent yet); None when not asked for."""
        if self.opts.decoding.logprobs is None:
            return None
        entries = self.entries()
        start, self._sent = (self._sent, len(entries)) if new_only else (0, self._sent)
        entries = entries[start:]
        if self.chat:
            return api.chat_logprobs(entries)
        out = api.completion_logprobs(entries, self._chars if new_only else 0)
        self._chars += sum(len(e["token"]) for e in entries) if new_only else 0
        return out

    def response(self, text: str, reason: str, usage: dict) -> dict:
        if not self.chat:
            return api.completion_response(self.rid, self.model_id, self.created, text, reason, usage,
                                           logprobs=self._logprobs())
        message = {"role": "assistant", "content": text, "refusal": None}
        calls = self.tools.parse(text)
        if calls:
            message |= {"content": self.tools.content_before(text), "tool_calls": calls}
            reason = "tool_calls"
        return api.chat_response(self.rid, self.model_id, self.created, message, reason, usage, self._logprobs())

    def first_chunks(self) -> list[dict]:
        """The stream's opening chunks (chat: the assistant role)."""
        self._text, self._held = [], self.tools.stream_filter()
        return [self._chat_chunk({"role": "assistant", "content": "", "refusal": None})] if self.chat else []

    def event_chunks(self, kind: str, value, usage) -> list[dict]:
        """The chunks one event of the run brings: ("text", piece), then ("done", finish_reason) (usage() is called
        then, when asked for) or ("error", message), which becomes an error object in the stream as OpenAI's servers
        send it."""
        include = self.opts.include_usage
        if kind == "error":
            return [APIError(500, f"generation failed: {value}").body()]
        if kind == "text":
            self._text.append(value)
            shown = self._held.push(value) if self.chat else value
            if not shown:
                return []
            lp = self._logprobs(new_only=True)
            return [self._chat_chunk({"content": shown}, logprobs=lp) if self.chat else
                    api.completion_response(self.rid, self.model_id, self.created, shown, None, None, True, include,
                                            lp)]
        reason = value
        if not self.chat:
            out = [api.completion_response(self.rid, self.model_id, self.created, "", reason, None, True, include,
                                           self._logprobs(new_only=True))]
            if include:
                out.append(api.completion_response(self.rid, self.model_id, self.created, None, None, usage(), True,
                                                   True))
            return out
        out = []
        rest = self._held.flush()
        if rest:
            out.append(self._chat_chunk({"content": rest}))
        calls = self.tools.parse("".join(self._text))
        if calls:
            out.append(self._chat_chunk({"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]}))
            reason = "tool_calls"
        out.append(self._chat_chunk({}, reason, self._logprobs(new_only=True)))
        if include:
            out.append(api.chat_chunk(self.rid, self.model_id, self.created, None, None, usage(), True))
        return out

    def _chat_chunk(self, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return api.chat_chunk(self.rid, self.model_id, self.created, delta, reason, None, self.opts.include_usage,
                              logprobs)


class Preparer:
    """Checks requests against one model. model_ids: the names clients may send (the first is the one shown)."""

    def __init__(self, model, model_ids: tuple[str, ...]):
        self.model, self.model_ids = model, model_ids
        self._token_index: TokenIndex | None = None  # built on the first constrained request

    def chat(self, body: dict) -> Prepared:
        m = self.model
        api.check_fields(body, api.CHAT_FIELDS, "/v1/chat/completions")
        api.check_model(body, self.model_ids)
        opts = api.sampling_options(body, m.spec.vocab, chat=True)
        messages = api.chat_messages(body)
        if m.tokenizer is None:
            raise APIError(400, f"{self.model_ids[-1]} has no tokenizer embedded: chat needs one (use completions "
                                f"with token ids)", None, "unsupported_model")
        tools = plan_tools(body, m.chat_template)
        node = api.response_format_node(body.get("response_format"))
        if node is not None and tools.forced:
            raise APIError(400, "'response_format' and a forced tool call ('tool_choice') cannot be combined",
                           "response_format", "invalid_value")
        prompt, template_stops = self._chat_prompt(messages, tools)
        node = tools.call_node() if tools.forced else node
        if node is None:  # constrained JSON ends by itself; the template's end string could occur inside a string
            opts.decoding.stops += template_stops
        return self._ready(True, self._encode(prompt), opts, node, tools)

    def completion(self, body: dict) -> Prepared:
        api.check_fields(body, api.COMPLETION_FIELDS, "/v1/completions")
        api.check_model(body, self.model_ids)
        opts = api.sampling_options(body, self.model.spec.vocab)
        prompt = api.completion_prompt(body, self.model.spec.vocab)
        ids = self._encode(prompt) if isinstance(prompt, str) else self._check_length(prompt)
        return self._ready(False, ids, opts, None, ToolPlan())

    def _ready(self, chat: bool, ids: list[int], opts: api.Options, node, tools: ToolPlan) -> Prepared:
        room = self.model.max_ctx - len(ids)
        opts.decoding.max_new_tokens = min(opts.max_tokens or room, room)
        constraint = None
        if node is not None:
            if self._token_index is None:
                self._token_index = TokenIndex(self.model.tokenizer, self.model.spec.vocab)
            constraint = JsonConstraint(node, self._token_index)
        return Prepared(chat, self.model_ids[0], ids, opts, constraint, tools)

    def _chat_prompt(self, messages: list[dict], tools: ToolPlan) -> tuple[str, list[str]]:
        """The prompt and the stop strings that end the reply, as Model.chat makes them (+ tools)."""
        m = self.model
        try:
            if m.chat_template is not None:
                prompt = m.apply_chat_template(messages, add_generation_prompt=True, **tools.template_vars())
                eos = m._chat_tokens().get("eos_token")
                return prompt + tools.prompt_suffix(), [eos] if eos else []
            return render_plain_transcript(messages, add_generation_prompt=True), list(PLAIN_TRANSCRIPT_STOPS)
        except EdgeMoEError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None

    def _encode(self, text: str) -> list[int]:
        if self.model.tokenizer is None:
            raise APIError(400, f"{self.model_ids[-1]} has no tokenizer embedded: send the prompt as token ids",
                           "prompt", "unsupported_model")
        return self._check_length(self.model.encode(text))

    def _check_length(self, ids: list[int]) -> list[int]:
        m = self.model
        if not ids:
            raise APIError(400, "the prompt is empty (no tokens)", "prompt", "invalid_value")
        if len(ids) >= m.max_ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the context holds {m.max_ctx} (prompt + reply; "
                                f"the server's --max-ctx, at most the model's {m.spec.max_position})", "messages",
                           "context_length_exceeded")
        return ids
