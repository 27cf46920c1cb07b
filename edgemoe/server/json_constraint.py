"""Constrained decoding: the reply is valid JSON (of a JSON schema), enforced token by token.

A JSON schema compiles into nodes (object, array, string, number, literal, alternatives). A character-level pushdown
automaton walks them: its state is a set of stacks of frames (a set, because a character can mean several things,
e.g. enum [1, 12] after "1", or anyOf alternatives), each frame a tuple. A token is allowed when every character of
its text keeps at least one stack alive; the end-of-sequence token when a complete value has been read. When the
value is complete and nothing can extend it, the reply ends (finish_reason "stop").

Token choice follows the logits: greedy takes the likeliest allowed token (exact). Sampling draws with the request's
top_k / top_p / min_p and rejects a token that is not allowed (it is masked and the draw repeated), which samples the
distribution restricted to the allowed tokens without checking the whole vocabulary (the truncation is applied to the
tokens not yet rejected); after REJECTIONS misses (a position where only a few tokens fit, e.g. "," or "}") it draws
among the FALLBACK_TOP likeliest allowed tokens instead.

Schema keywords enforced: type (or a list of types), properties, required, additionalProperties (with properties
only the declared keys are generated), items, minItems, maxItems, minLength, maxLength, enum, const, anyOf, oneOf
(as anyOf), $ref to #/$defs or #/definitions. Others that constrain values (pattern, format, minimum, ...) are refused
with an error rather than ignored; annotations (title, description, ...) are ignored.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import EdgeMoEError
from ..sampling import SamplingParams, sample

WS = " \t\n\r"
MAX_WS = 8  # whitespace characters in a row between tokens: a newline and indentation, not an endless run
MAX_DIGITS = 16  # digits of a number (integer, fraction and exponent together): every number ends
REJECTIONS = 16  # draws rejected before sampling among the likeliest allowed tokens
FALLBACK_TOP = 32
HEX = set("0123456789abcdefABCDEF")
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "readOnly", "writeOnly",
               "deprecated", "$defs", "definitions", "strict", "name"}
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "minLength",
            "maxLength", "enum", "const", "anyOf", "oneOf", "$ref"}


class SchemaError(EdgeMoEError):
    """A schema this module cannot enforce (names the keyword and where it is)."""


# --- schema nodes ----------------------------------------------------------------------------------------------
class Node:
    pass


class Obj(Node):
    def __init__(self, props: dict[str, Node] | None, required: frozenset, extra: Node | None):
        self.props, self.required, self.extra = props, required, extra  # props None = free keys, values `extra`


class Arr(Node):
    def __init__(self, items: Node, lo: int = 0, hi: int | None = None):
        self.items, self.lo, self.hi = items, lo, hi


class Str(Node):
    def __init__(self, lo: int = 0, hi: int | None = None):
        self.lo, self.hi = lo, hi


class Num(Node):
    def __init__(self, integer: bool):
        self.integer = integer


class Lit(Node):
    def __init__(self, texts: tuple[str, ...]):
        self.texts = texts


class Alt(Node):
    def __init__(self, options: list[Node]):
        self.options = options


class Ref(Node):
    def __init__(self):
        self.target: Node | None = None


def any_value() -> Node:
    """Any JSON value (json_object's values)."""
    alt = Alt([])
    alt.options += [Obj(None, frozenset(), alt), Arr(alt), Str(), Num(False), Lit(("true", "false", "null"))]
    return alt


def any_object() -> Node:
    return Obj(None, frozenset(), any_value())


def compile_schema(schema, root=None, path: str = "schema", refs: dict | None = None) -> Node:
    """A JSON schema (dict) -> its node; SchemaError for what cannot be enforced."""
    root = schema if root is None else root
    refs = {} if refs is None else refs
    if schema is True or schema == {}:
        return any_value()
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: a schema must be a JSON object, got {json.dumps(schema)}")
    unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS)
    if unknown:
        raise SchemaError(f"{path}: the keyword {unknown[0]!r} is not supported for constrained output (supported: "
                          f"{', '.join(sorted(KEYWORDS))})")

    def sub(s, where):
        return compile_schema(s, root, f"{path}.{where}", refs)

    if "$ref" in schema:
        ref = schema["$ref"]
        parts = ref.split("/") if isinstance(ref, str) else []
        if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
            raise SchemaError(f"{path}: $ref {ref!r}: only local references '#/$defs/NAME' are supported")
        if ref not in refs:
            target = root.get(parts[1], {}).get(parts[2]) if isinstance(root.get(parts[1]), dict) else None
            if target is None:
                raise SchemaError(f"{path}: $ref {ref!r} names no definition in the schema")
            refs[ref] = Ref()
            refs[ref].target = compile_schema(target, root, ref, refs)
        return refs[ref]
    if "const" in schema:
        return Lit((json.dumps(schema["const"], ensure_ascii=False),))
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise SchemaError(f"{path}: 'enum' must be a non-empty list")
        return Lit(tuple(json.dumps(v, ensure_ascii=False) for v in schema["enum"]))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise SchemaError(f"{path}: '{key}' must be a non-empty list of schemas")
            return Alt([sub(s, f"{key}[{i}]") for i, s in enumerate(schema[key])])
    t = schema.get("type")
    if isinstance(t, list):
        return Alt([compile_schema({**schema, "type": x}, root, path, refs) for x in t])
    if t is None:
        t = "object" if "properties" in schema else "array" if "items" in schema else None
        if t is None:
            return any_value()
    if t == "object":
        props = schema.get("properties")
        required = schema.get("required", [])
        if props is not None and not isinstance(props, dict) or not isinstance(required, list):
            raise SchemaError(f"{path}: 'properties' must be an object and 'required' a list")
        extra = schema.get("additionalProperties", True)
        if props:
            missing = [r for r in required if r not in props]
            if missing:
                raise SchemaError(f"{path}: required property {missing[0]!r} is not among the properties")
            return Obj({k: sub(v, f"properties.{k}") for k, v in props.items()}, frozenset(required), None)
        if extra is False:
            return Obj({}, frozenset(), None)
        if required:
            raise SchemaError(f"{path}: 'required' needs 'properties' to say what the keys hold")
        return Obj(None, frozenset(), any_value() if extra is True else sub(extra, "additionalProperties"))
    if t == "array":
        lo, hi = _count(schema, "minItems", path, 0), _count(schema, "maxItems", path, None)
        return Arr(sub(schema.get("items", True), "items"), lo, hi)
    if t == "string":
        return Str(_count(schema, "minLength", path, 0), _count(schema, "maxLength", path, None))
    if t in ("integer", "number"):
        return Num(t == "integer")
    if t == "boolean":
        return Lit(("true", "false"))
    if t == "null":
        return Lit(("null",))
    raise SchemaError(f"{path}: unknown type {t!r} (expected object, array, string, integer, number, boolean, null)")


def _count(schema: dict, key: str, path: str, default):
    v = schema.get(key, default)
    if v is not default and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise SchemaError(f"{path}: '{key}' must be a whole number >= 0, got {json.dumps(v)}")
    return v


# --- the character automaton -----------------------------------------------------------------------------------
# Frames: ("V", node, ws) a value to start; ("S", node, n, esc) in a string (esc 1 after a backslash, -k: k hex digits
# of \uXXXX to come); ("N", node, phase, digits); ("L", texts, pos); ("O", node, seen, phase, ws, key) with phase k0
# (after "{"), k (after ","), kk (reading a key), c (before ":"), v (reading a value), a (after a value);
# ("A", node, count, phase, ws) with phase 0 (after "["), v (reading an item), a (after an item).
NUM_END = {"zero", "int", "frac", "expd"}


def _start(rest: tuple, node: Node, ch: str) -> list[tuple]:
    if isinstance(node, Ref):
        node = node.target
    if isinstance(node, Alt):
        return [s for opt in node.options for s in _start(rest, opt, ch)]
    if isinstance(node, Obj):
        return [rest + (("O", node, frozenset(), "k0", 0, None),)] if ch == "{" else []
    if isinstance(node, Arr):
        return [rest + (("A", node, 0, "0", 0),)] if ch == "[" else []
    if isinstance(node, Str):
        return [rest + (("S", node, 0, 0),)] if ch == '"' else []
    if isinstance(node, Num):
        if ch == "-":
            return [rest + (("N", node, "sign", 0),)]
        if ch.isdigit() and ch.isascii():
            return [rest + (("N", node, "zero" if ch == "0" else "int", 1),)]
        return []
    if isinstance(node, Lit):
        return _lit(rest, node.texts, 0, ch)
    raise TypeError(node)


def _lit(rest: tuple, texts: tuple, pos: int, ch: str) -> list[tuple]:
    match = [t for t in texts if len(t) > pos and t[pos] == ch]
    out = []
    longer = tuple(t for t in match if len(t) > pos + 1)
    if longer:
        out.append(rest + (("L", longer, pos + 1),))
    out += [_done(rest, t) for t in match if len(t) == pos + 1]
    return out


def _done(rest: tuple, result) -> tuple:
    """The top frame finished (a key's JSON text for literal keys, else None): its parent moves on."""
    if not rest:
        return ()
    p, base = rest[-1], rest[:-1]
    if p[0] == "O":
        _, node, seen, phase, _, key = p
        if phase == "kk":
            return base + (("O", node, seen, "c", 0, json.loads(result) if result is not None else None),)
        return base + (("O", node, seen | {key} if key is not None else seen, "a", 0, None),)
    return base + (("A", p[1], p[2], "a", 0),)


def _ws(frame: tuple, i: int, ch: str) -> list[tuple] | None:
    """Whitespace where the frame allows it: the frame with its counter (field i) raised, or [] over the limit."""
    if ch not in WS:
        return None
    return [frame[:i] + (frame[i] + 1,) + frame[i + 1:]] if frame[i] < MAX_WS else []


def _feed(stack: tuple, ch: str) -> list[tuple]:
    if not stack:
        return []  # the value is complete: nothing may follow
    f, rest = stack[-1], stack[:-1]
    tag = f[0]
    if tag == "V":
        w = _ws(f, 2, ch)
        if w is not None:
            return [rest + (w[0],)] if w else []
        return _start(rest, f[1], ch)
    if tag == "S":
        _, node, n, esc = f
        if esc == 1:
            if ch == "u":
                return [rest + (("S", node, n, -4),)]
            return [rest + (("S", node, n + 1, 0),)] if ch in '"\\/bfnrt' else []
        if esc < 0:
            return [rest + (("S", node, n + (esc == -1), esc + 1),)] if ch in HEX else []
        if ch == '"':
            return [_done(rest, None)] if n >= node.lo else []
        if ord(ch) < 0x20 or (node.hi is not None and n >= node.hi):
            return []
        return [rest + (("S", node, n, 1),)] if ch == "\\" else [rest + (("S", node, n + 1, 0),)]
    if tag == "N":
        return _number(f, rest, ch)
    if tag == "L":
        return _lit(rest, f[1], f[2], ch)
    if tag == "O":
        return _object(f, rest, ch)
    return _array(f, rest, ch)


def _number(f: tuple, rest: tuple, ch: str) -> list[tuple]:
    _, node, phase, digits = f
    digit = ch.isdigit() and ch.isascii()
    more = digits < MAX_DIGITS
    nxt = None
    if phase == "sign" and digit:
        nxt = "zero" if ch == "0" else "int"
    elif phase in ("int", "frac", "expd") and digit and more:
        nxt = phase
    elif phase in ("zero", "int") and ch == "." and not node.integer:
        nxt = "dot"
    elif phase in ("zero", "int", "frac") and ch in "eE" and not node.integer:
        nxt = "exp"
    elif phase == "dot" and digit:
        nxt = "frac"
    elif phase == "exp" and ch in "+-":
        nxt = "exps"
    elif phase in ("exp", "exps") and digit:
        nxt = "expd"
    if nxt is not None:
        return [rest + (("N", node, nxt, digits + digit),)] if digits + digit <= MAX_DIGITS else []
    if phase in NUM_END:  # the character ends the number and belongs to the parent
        return _feed(_done(rest, None), ch)
    return []


def _object(f: tuple, rest: tuple, ch: str) -> list[tuple]:
    _, node, seen, phase, _ws_run, key = f
    if phase in ("k0", "k", "c", "a"):
        w = _ws(f, 4, ch)
        if w is not None:
            return [rest + (w[0],)] if w else []
    free = node.props is None
    if phase in ("k0", "k"):
        if ch == "}" and phase == "k0" and node.required <= seen:
            return [_done(rest, None)]
        if ch != '"':
            return []
        waiting = rest + (("O", node, seen, "kk", 0, None),)
        if free:
            return [waiting + (("S", Str(), 0, 0),)]
        keys = tuple(json.dumps(k, ensure_ascii=False) for k in node.props if k not in seen)
        return _lit(waiting, keys, 0, ch) if keys else []
    if phase == "c":
        if ch != ":":
            return []
        value = node.extra if free else node.props[key]
        return [rest + (("O", node, seen, "v", 0, key), ("V", value, 0))]
    if phase == "a":
        if ch == "," and (free or any(k not in seen for k in node.props)):
            return [rest + (("O", node, seen, "k", 0, None),)]
        if ch == "}" and node.required <= seen:
            return [_done(rest, None)]
    return []


def _array(f: tuple, rest: tuple, ch: str) -> list[tuple]:
    _, node, count, phase, _ws_run = f
    w = _ws(f, 4, ch)
    if w is not None:
        return [rest + (w[0],)] if w else []
    if phase == "0":
        if ch == "]":
            return [_done(rest, None)] if node.lo == 0 else []
        if node.hi == 0:
            return []
        return _start(rest + (("A", node, 1, "v", 0),), node.items, ch)
    if phase == "a":
        if ch == "," and (node.hi is None or count < node.hi):
            return [rest + (("A", node, count + 1, "v", 0), ("V", node.items, 0))]
        if ch == "]" and count >= node.lo:
            return [_done(rest, None)]
    return []


def walk(state: frozenset, text: str) -> frozenset | None:
    """The state after `text`, or None if some character of it is not allowed."""
    for ch in text:
        nxt = set()
        for stack in state:
            nxt.update(_feed(stack, ch))
        if not nxt:
            return None
        state = frozenset(nxt)
    return state


def can_end(state: frozenset) -> bool:
    """A complete value has been read (a top-level number ends here too)."""
    return any(not s or (len(s) == 1 and s[0][0] == "N" and s[0][2] in NUM_END) for s in state)


# --- over the tokenizer's vocabulary ------------------------------------------------------------------------------
class TokenIndex:
    """Each token's text as it appears inside a longer text (decoded after a reference token, so a decoder that
    drops a leading space at the start of a text does not change it), and the tokens never allowed in JSON: special
    tokens, tokens without text, and tokens holding part of a multi-byte character."""

    def __init__(self, tokenizer, vocab: int):
        n = min(vocab, tokenizer.vocab_size)
        ref = tokenizer.encode("a")[:1]
        base = tokenizer.decode(ref) if ref else ""
        special = tokenizer.special_ids()
        self.texts: list[str | None] = []
        for t in range(vocab):
            if t >= n or t in special:
                self.texts.append(None)
                continue
            s = tokenizer.decode(ref + [t])
            s = s[len(base):] if ref and s.startswith(base) else tokenizer.decode([t])
            self.texts.append(s if s and "\ufffd" not in s else None)


class JsonConstraint:
    """The JSON state of one reply: choose() the next token from the logits, advance() with the token chosen."""

    def __init__(self, node: Node, index: TokenIndex):
        self.index = index
        self.state = frozenset({(("V", node, 0),)})
        self.finished = False
        self._next: dict[int, frozenset] = {}  # token -> state after it (filled by choose, used by advance)

    def _allowed(self, tok: int, eos: int | None) -> bool:
        if tok == eos:
            return can_end(self.state)
        text = self.index.texts[tok] if tok < len(self.index.texts) else None
        if text is None:
            return False
        nxt = walk(self.state, text)
        if nxt is None:
            return False
        self._next[tok] = nxt
        return True

    def choose(self, logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, eos: int | None) -> int:
        self._next.clear()
        order = np.argsort(-logits, kind="stable")
        if params.temperature <= 0:
            for tok in order.tolist():
                if self._allowed(tok, eos):
                    return tok
            raise EdgeMoEError("no token of the vocabulary can continue the JSON output")
        masked = logits.astype(np.float32, copy=True)
        for _ in range(REJECTIONS):
            tok = sample(masked, params, rng, [])
            if not np.isfinite(masked[tok]):
                break  # every token was rejected
            if self._allowed(tok, eos):
                return tok
            masked[tok] = -np.inf
        allowed = []
        for tok in order.tolist():
            if self._allowed(tok, eos):
                allowed.append(tok)
                if len(allowed) == FALLBACK_TOP:
                    break
        if not allowed:
            raise EdgeMoEError("no token of the vocabulary can continue the JSON output")
        masked = np.full_like(logits, -np.inf)
        masked[allowed] = logits[allowed]
        return sample(masked, params, rng, [])

    def advance(self, tok: int) -> None:
        nxt = self._next.get(tok)
        if nxt is None:
            nxt = walk(self.state, self.index.texts[tok] or "")
        if nxt is None:
            raise EdgeMoEError(f"token {tok} does not continue the JSON output")
        self.state = nxt
        self.finished = all(not s for s in self.state)
