"""JSON-constrained decoding and tool-call parsing, in-process: the character automaton accepts exactly the JSON
texts of a schema (checked against json.loads and jsonschema, references nobody here wrote), schemas it cannot
enforce are refused, sampled replies of the tiny model are valid for many seeds, and tool calls are found in a
reply's text (and held back from its stream)."""

import importlib
import json

import pytest

import edgemoe
from edgemoe.server.json_constraint import SchemaError, any_object, can_end, compile_schema, walk
from edgemoe.server.openai_api import APIError
from edgemoe.server.tool_calls import plan_tools

jsonschema = importlib.import_module("jsonschema")


def accepts(node, text: str) -> bool:
    state = walk(frozenset({(("V", node, 0),)}), text)
    return state is not None and can_end(state)


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 5},
    "age": {"type": "integer"},
    "score": {"type": "number"},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 2},
    "ok": {"type": ["boolean", "null"]},
    "child": {"$ref": "#/$defs/child"}},
    "required": ["name", "age"], "additionalProperties": False,
    "$defs": {"child": {"type": "object", "properties": {"id": {"const": 7}}, "required": ["id"]}}}

TEXTS = ['{"name": "bob", "age": 3}', '{"age":-3,"name":"a\\"b","tags":["x"],"ok":null,"score":1.5e-3}',
         '{"name": "b", "age": 0, "child": {"id": 7}}', '{\n  "name": "\\u00e9",\n  "age": 12\n}',
         '{"name": "bobbyx", "age": 3}', '{"name": "", "age": 3}', '{"name": "b"}', '{"name": "b", "age": 3.5}',
         '{"name": "b", "age": 3, "z": 1}', '{"name": "b", "age": 1, "tags": []}',
         '{"name": "b", "age": 1, "tags": ["x", "y", "x"]}', '{"name": "b", "name": "c", "age": 1}', '{"name": "b", "age": 01}',
         '{"name": "b", "age": 1, "child": {"id": 8}}', '{"name": "b", "age": 1,}', '{"name": "b\x01", "age": 1}',
         '{"name": "b", "age": 1} ', '[{"name": "b", "age": 1}]', '{"name": "b", "age": 1, "score": 1.}']


@pytest.mark.parametrize("text", TEXTS)
def test_automaton_agrees_with_json_and_jsonschema(text):
    def no_duplicates(pairs):  # JSON allows repeated keys (the last wins); the constraint never generates them
        if len({k for k, _ in pairs}) < len(pairs):
            raise ValueError("repeated key")
        return dict(pairs)

    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates)
        jsonschema.validate(obj, SCHEMA)
        valid = text == text.strip()  # the reply ends with the value: no trailing whitespace
    except (ValueError, jsonschema.ValidationError):
        valid = False
    assert accepts(compile_schema(SCHEMA), text) == valid


@pytest.mark.parametrize("text,ok", [("{}", True), ('{"a": [1, {"b": null}, "c", true, -0.5e+2]}', True),
                                     ("[]", False), ('{"a": }', False), ('{"a": tru}', False), ("{", False)])
def test_any_object(text, ok):
    assert accepts(any_object(), text) == ok


@pytest.mark.parametrize("schema,word", [({"type": "string", "pattern": "a+"}, "pattern"),
                                         ({"type": "integer", "minimum": 0}, "minimum"),
                                         ({"$ref": "http://x/y"}, "local references"), ({"type": "date"}, "date"),
                                         ({"type": "object", "required": ["a"]}, "required")])
def test_unenforceable_schemas_are_refused(schema, word):
    with pytest.raises(SchemaError, match=word):
        compile_schema(schema)


def test_sampled_json_is_valid(tiny_emoe):
    """Sampling (temperature 1, top_p) under the constraint: every seed's reply is complete, valid JSON of the schema
    (the tiny model has no chat template: the plain transcript is its prompt)."""
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer"}, "flag": {"type": "boolean"},
                                               "list": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
              "required": ["word", "n", "flag", "list"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    with edgemoe.load(tiny_emoe("olmoe")) as m:
        for seed in range(4):
            r = m.create_chat_completion([{"role": "user", "content": "the quick brown fox"}], temperature=1.0,
                                         top_p=0.95, seed=seed, max_tokens=200, response_format=fmt)
            assert r["choices"][0]["finish_reason"] == "stop", r
            jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), schema)


TEMPLATE_WITH_TOOLS = "{% for m in messages %}{{ m.content }}{% endfor %}{{ tools }} <tool_call>"
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_tool_calls_parsed_and_held_back_in_streams():
    plan = plan_tools({"tools": TOOLS}, TEMPLATE_WITH_TOOLS)
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    calls = plan.parse(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("add", {"a": 1})]
    assert plan.content_before(text) == "Let me add."
    assert plan.parse('<tool_call>{"name": "nope", "arguments": {}}</tool_call>') == []  # unknown tool: text
    held = plan.stream_filter()
    shown = "".join(held.push(p) for p in ["Let me", " add.\n<tool", "_call>\n{\"name\"", ": \"add\"}"]) + held.flush()
    assert shown == "Let me add.\n"
    held = plan.stream_filter()
    assert "".join(held.push(p) for p in ["a <to", "ol but not a call"]) + held.flush() == "a <tool but not a call"
    with pytest.raises(APIError, match="does not support tool calls"):
        plan_tools({"tools": TOOLS}, "{{ messages }}")
    with pytest.raises(APIError, match="not among the tools"):
        plan_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "sub"}}},
                   TEMPLATE_WITH_TOOLS)
