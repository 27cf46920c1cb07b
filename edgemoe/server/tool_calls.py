"""Tools (function calling) through the model's chat template, in the Hermes / Qwen format the templates document:
the template lists the tools in the prompt and the model answers with

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

tool_choice "auto": the reply is generated freely and its <tool_call> blocks become message.tool_calls. "required" or
a named function: the prompt ends with "<tool_call>\\n" and the reply is constrained (json_constraint) to
{"name": one of the tools, "arguments": that tool's parameters schema}, so the call is always valid. "none": the
tools are not shown to the model. A template without "<tool_call>" is refused with an error (not guessed at).
"""

from __future__ import annotations

import json
import re
import secrets

from .json_constraint import Alt, Node, SchemaError, compile_schema
from .openai_api import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def _call(name: str, arguments) -> dict:
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolPlan:
    """What a chat request's tools mean for its prompt, its decoding and its reply."""

    def __init__(self, tools: list[dict] | None = None, choice: str | None = None):
        self.tools = tools or []  # OpenAI's [{"type": "function", "function": {...}}]
        self.choice = choice  # None (no tools), "auto", "required" or a function name
        self.forced = choice is not None and choice != "auto"

    def _functions(self) -> list[dict]:
        fns = [t["function"] for t in self.tools]
        return [f for f in fns if f["name"] == self.choice] if self.choice not in (None, "auto", "required") else fns

    def template_vars(self) -> dict:
        return {"tools": self.tools} if self.choice is not None else {}

    def prompt_suffix(self) -> str:
        return OPEN + "\n" if self.forced else ""

    def call_node(self) -> Node:
        """The JSON every forced call must be: {"name": <a tool>, "arguments": <its parameters>}."""
        options = []
        for f in self._functions():
            params = f.get("parameters") or {"type": "object"}
            schema = {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False}
            try:
                options.append(compile_schema(schema, path=f"tools[{f['name']}].parameters"))
            except SchemaError as e:
                raise APIError(400, str(e), "tools", "invalid_value") from None
        return options[0] if len(options) == 1 else Alt(options)

    def parse(self, text: str) -> list[dict]:
        """The reply's tool calls, OpenAI-shaped (empty when it made none that name a known tool)."""
        if self.choice is None:
            return []
        names = {f["name"] for f in self._functions()}
        bodies = [text] if self.forced else BLOCK.findall(text)
        calls = []
        for body in bodies:
            try:
                obj = json.loads(body)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict):
                calls.append(_call(obj["name"], obj.get("arguments", {})))
        return calls

    def content_before(self, text: str) -> str | None:
        """The text a reply with tool calls had before them (None if none)."""
        if self.forced:
            return None
        head = text.split(OPEN, 1)[0].strip()
        return head or None

    def stream_filter(self) -> _Held:
        return _Held(None if self.choice is None else ("" if self.forced else OPEN))


class _Held:
    """Streams a reply's text but holds back a tool call: from `marker` on ("" = everything) nothing is shown; a tail
    that could begin the marker waits until it is decided."""

    def __init__(self, marker: str | None):
        self.marker, self.buf, self.hidden = marker, "", marker == ""

    def push(self, piece: str) -> str:
        if self.marker is None:
            return piece
        if self.hidden:
            return ""
        self.buf += piece
        at = self.buf.find(self.marker)
        if at >= 0:
            self.hidden = True
            out, self.buf = self.buf[:at], ""
            return out
        keep = next((k for k in range(min(len(self.marker) - 1, len(self.buf)), 0, -1)
                     if self.marker.startswith(self.buf[-k:])), 0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hidden else self.buf), ""
        return out


def plan_tools(body: dict, template: str | None) -> ToolPlan:
    """Check tools / tool_choice of a chat request against OpenAI's shapes and the model's template."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice", "invalid_value")
        return ToolPlan()
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools",
                       "invalid_value")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise APIError(400, f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                f"\"parameters\": {{...}}}}}}", f"tools[{i}]", "invalid_value")
    names = [t["function"]["name"] for t in tools]
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise APIError(400, f"'tool_choice' names the function {name!r}, which is not among the tools {names}",
                           "tool_choice", "invalid_value")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise APIError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", "tool_choice", "invalid_value")
    if choice == "none":
        return ToolPlan()
    if template is None or OPEN not in template:
        raise APIError(400, "this model's chat template does not support tool calls (it has no <tool_call> format; "
                            "edgemoe knows the Hermes / Qwen <tool_call> blocks)", "tools", "unsupported_value")
    return ToolPlan(tools, choice)
