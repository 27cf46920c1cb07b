"""Hostile `.emoe` containers, made deterministically from valid ones (the corpus of the container fuzz tests).

A case is a label, the valid container it starts from (a "base"), an operation with its arguments, and what a
correct reader must do with the result, resident and under a memory budget:

- "refuse": the file is invalid (docs/FORMAT.md); loading must fail with one clear EdgeMoEError (CLI: exit 1 and
  "edgemoe: error: ..."), never run, crash, hang or print "internal error".
- "run": the mutation leaves a valid file (e.g. a positive rope_theta, a padding byte flipped): it must run.
- "either": both a clean refusal and a run are correct (e.g. an unknown arch key, a tensor the config does not use),
  but never a crash, hang or traceback. Kept few; each says why in its label's class.

Classes (the label's second part): truncate, append, preamble_flip, preamble_set, preamble_pad_flip,
index_flip (checksum not repaired), index_flip_repaired, data_flip, data_flip_repaired, arch_value, arch_remove,
arch_unknown, dupkey, deep, whole_index, number_syntax, index_top, tensor, planes, expert_map, layer_list. Every
operation on the index rewrites the preamble's index length and CRC-32; "tensor" and "planes" cases also recompute
the CRC-32 of every tensor and plane whose byte range they changed ("every checksum repaired").

Materializing a case is cheap (bytes of one container plus one JSON edit), so the corpus lives as a list of cases;
`python tests/hostile_containers.py OUT_DIR [--every N]` writes it (or every Nth case) as files plus manifest.json,
building the valid containers itself from the tiny models of tests/tiny_models.py.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

PREAMBLE = struct.Struct("<4sIQQI")  # magic, version, index_offset, index_nbytes, index_crc32 (docs/FORMAT.md)
PREAMBLE_SIZE = 4096
U64 = 2**64
PLACEHOLDER = "__FUZZ_VALUE__"

# The valid containers every case starts from: (name, tiny family, export arguments). f32; f16 experts with q8_0
# dense matrices; MWQ 4-bit experts (3 planes) with q8_0 dense; a merged (expert_map) f16 model.
BASES = (
    ("olmoe_f32", "olmoe", {"bits": 32}),
    ("qwen2moe_q8", "qwen2moe", {"bits": 16, "dense_bits": 8}),
    ("qwen3moe_mwq4", "qwen3moe", {"bits": 4, "nesting": "msb"}),
    ("mixtral_merged", "mixtral", {"merged": True}),
)
CALIB_TEXT = "The quick brown fox jumps over the lazy dog while two small cores run the tests. " * 40


@dataclass(frozen=True)
class Case:
    label: str  # base/class/detail, unique
    base: str
    op: str
    args: tuple
    expect: str  # resident: "refuse" | "run" | "either"
    expect_budget: str  # under a memory budget (expert damage is found only when the expert is read)

    @property
    def cls(self) -> str:
        return self.label.split("/")[1]

    def to_json(self) -> dict:
        return {"label": self.label, "expect": self.expect, "expect_budget": self.expect_budget}


class Base:
    """A valid container, parsed: its bytes, preamble fields, index object and tensor table."""

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data
        self.magic, self.version, self.index_offset, self.index_nbytes, self.index_crc = PREAMBLE.unpack_from(data)
        self.index = json.loads(data[self.index_offset : self.index_offset + self.index_nbytes])
        self.tensors = {t["name"]: t for t in self.index["tensors"]}
        self.arch = self.index["arch"]

    def names(self, kind: str | None = None, dtype: str | None = None, ndim: int | None = None) -> list[str]:
        return [n for n, t in self.tensors.items() if (kind is None or t["kind"] == kind)
                and (dtype is None or t["dtype"] == dtype) and (ndim is None or len(t["shape"]) == ndim)]


# ---- writing a container with a new index ---------------------------------------------------------------------


def _with_index(data: bytes, index_offset: int, text: bytes, version: int | None = None) -> bytes:
    """data[:index_offset] + text, with the preamble's index length and CRC-32 rewritten."""
    magic, v, _, _, _ = PREAMBLE.unpack_from(data)
    head = PREAMBLE.pack(magic, v if version is None else version, index_offset, len(text), zlib.crc32(text))
    return head + data[PREAMBLE.size : index_offset] + text


def _resolve(index: dict, path: list) -> tuple:
    """-> (parent, key) for a path; "@NAME" picks the tensor entry of that name."""
    node = index
    for i, p in enumerate(path[:-1]):
        node = node[_key(index, node, p)]
    return node, _key(index, node, path[-1])


def _key(index: dict, node, p):
    if isinstance(p, str) and p.startswith("@"):
        return next(i for i, t in enumerate(index["tensors"]) if isinstance(t, dict) and t.get("name") == p[1:])
    return p


def _apply(index: dict, mut: tuple) -> None:
    kind, path = mut[0], mut[1]
    if kind == "set":
        parent, k = _resolve(index, path)
        parent[k] = copy.deepcopy(mut[2])
    elif kind == "del":
        parent, k = _resolve(index, path)
        del parent[k]
    elif kind == "append":
        parent, k = _resolve(index, path)
        parent[k].append(copy.deepcopy(mut[2]))
    elif kind == "copy_entry":  # append a copy of tensor entry `path`, with some fields replaced
        parent, k = _resolve(index, path)
        entry = copy.deepcopy(parent[k])
        entry.update(copy.deepcopy(mut[2]))
        index["tensors"].append(entry)
    elif kind == "swap":
        pa, ka = _resolve(index, path)
        pb, kb = _resolve(index, mut[2])
        pa[ka], pb[kb] = pb[kb], pa[ka]
    else:
        raise ValueError(kind)


def _fix_crcs(index: dict, orig: dict, data: bytes, limit: int) -> None:
    """Recompute the CRC-32 of every tensor / plane whose byte range changed and still lies in [4096, limit)."""
    before = {t["name"]: t for t in orig["tensors"] if isinstance(t, dict) and "name" in t}

    def crc_of(off, n):
        if isinstance(off, int) and isinstance(n, int) and not isinstance(off, bool) and PREAMBLE_SIZE <= off \
                and n >= 0 and off + n <= limit:
            return zlib.crc32(data[off : off + n])
        return None

    for t in index["tensors"] if isinstance(index.get("tensors"), list) else ():
        if not isinstance(t, dict):
            continue
        o = before.get(t.get("name"))
        if o is None or (t.get("offset"), t.get("nbytes")) != (o["offset"], o["nbytes"]):
            c = crc_of(t.get("offset"), t.get("nbytes"))
            if c is not None and "crc32" in t:
                t["crc32"] = c
        for i, p in enumerate(t.get("planes") or ()) if isinstance(t.get("planes"), list) else ():
            op = (o or {}).get("planes") or []
            if isinstance(p, dict) and (i >= len(op) or (p.get("offset"), p.get("nbytes")) !=
                                        (op[i]["offset"], op[i]["nbytes"])):
                c = crc_of(p.get("offset"), p.get("nbytes"))
                if c is not None and "crc32" in p:
                    p["crc32"] = c


def _dump(index) -> str:
    return json.dumps(index)  # keeps the writer's key order; NaN / Infinity written as such (not strict JSON)


def materialize(case: Case, base: Base) -> bytes:
    """The bytes of one hostile container."""
    d, a = base.data, case.args
    if case.op == "truncate":
        return d[: a[0]]
    if case.op == "append":
        return d + bytes.fromhex(a[0])
    if case.op == "flip":  # (offset, bit, repair the index CRC)
        b = bytearray(d)
        b[a[0]] ^= 1 << a[1]
        if a[2]:
            text = bytes(b[base.index_offset : base.index_offset + base.index_nbytes])
            struct.pack_into("<I", b, 24, zlib.crc32(text))
        return bytes(b)
    if case.op == "preamble_set":  # (field number in PREAMBLE, value)
        fields = list(PREAMBLE.unpack_from(d))
        fields[a[0]] = a[1] if a[0] else bytes.fromhex(a[1])
        return PREAMBLE.pack(*fields) + d[PREAMBLE.size :]
    if case.op == "data_flip_repaired":  # (tensor, byte within the tensor, bit): data changed, its CRCs repaired
        b = bytearray(d)
        t = base.tensors[a[0]]
        b[t["offset"] + a[1]] ^= 1 << a[2]
        index = copy.deepcopy(base.index)
        entry = next(e for e in index["tensors"] if e["name"] == a[0])
        entry["crc32"] = zlib.crc32(b[t["offset"] : t["offset"] + t["nbytes"]])
        for p in entry.get("planes") or ():
            p["crc32"] = zlib.crc32(b[p["offset"] : p["offset"] + p["nbytes"]])
        return _with_index(bytes(b), base.index_offset, _dump(index).encode())
    if case.op == "index":  # (mutations, repair tensor CRCs, raw text for the placeholder or None)
        muts, fix, raw = a
        index = copy.deepcopy(base.index)
        for m in muts:
            _apply(index, m)
        if fix:
            _fix_crcs(index, base.index, d, base.index_offset)
        text = _dump(index)
        if raw is not None:  # raw JSON text in place of the placeholder value (duplicate keys, NaN, deep nesting)
            text = text.replace(f'"{PLACEHOLDER}"', raw, 1)
        return _with_index(d, base.index_offset, text.encode("utf-8", "surrogatepass"))
    if case.op == "whole_index":
        return _with_index(d, base.index_offset, _whole_index(a[0], base))
    raise ValueError(case.op)


def _whole_index(kind: str, base: Base) -> bytes:
    text = _dump(base.index).encode()
    return {
        "empty": b"",
        "null": b"null",
        "array": b"[]",
        "number": b"42",
        "string": b'"edgemoe"',
        "object_empty": b"{}",
        "deep_array": b"[" * 100_000 + b"]" * 100_000,
        "deep_object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "unclosed": text[:-1],
        "trailing_garbage": text + b" x",
        "two_objects": text + text,
        "bom": b"\xef\xbb\xbf" + text,
        "invalid_utf8": text.replace(b'"edgemoe"', b'"edge\xffmoe"', 1),
        "nul_byte": text.replace(b'"edgemoe"', b'"edge\x00moe"', 1),
        "utf16": text.decode().encode("utf-16"),
        "leading_space": b" \n\t" + text,  # valid JSON
    }[kind]


# ---- what a correct reader does with a changed arch value --------------------------------------------------------

REQUIRED_ARCH = ("family", "n_layers", "hidden", "vocab", "n_heads", "n_kv_heads", "head_dim", "n_experts", "top_k",
                 "expert_ffn")
SHAPE_FIELDS = ("hidden", "vocab", "n_heads", "n_kv_heads", "head_dim", "n_experts", "expert_ffn")
ENUMS = {"rope_kind": ("neox", "norm"), "router_fn": ("softmax", "sigmoid"),
         "router_input": ("ffn_norm", "layer_input"), "activation": ("swiglu", "reglu")}
BOOLS = ("qkv_bias", "norm_topk", "shared_gate", "tie_embeddings")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


def arch_expect(base: Base, field: str, v, removed: bool = False) -> str:
    """What a correct reader does when arch[field] becomes v (or is removed), with every checksum intact."""
    a = base.arch
    if removed:
        return "refuse" if field in REQUIRED_ARCH else "either"  # a default may or may not be assumed
    if field not in a:
        return "either"  # an unknown key: a reader may ignore it or refuse it
    if type(v) is type(a[field]) and v == a[field]:
        return "run"
    if isinstance(v, float) and not math.isfinite(v):
        return "refuse"
    integral_float = isinstance(v, float) and v.is_integer() and _is_int(a[field])
    if integral_float:
        v = int(v)
        if v == a[field]:
            return "either"  # 2.0 for 2: a strict reader may want an integer
    if field in SHAPE_FIELDS:
        return "refuse"  # the tensor shapes are tied to it
    if field == "n_layers":
        return "either" if _is_int(v) and 1 <= v < a[field] else "refuse"  # fewer layers: extra tensors unused
    if field == "top_k":
        ok = _is_int(v) and 1 <= v <= a["n_experts"]
        return ("either" if integral_float else "run") if ok else "refuse"
    if field in ("norm_eps", "rope_theta"):
        if not _is_num(v) or not v > 0 or (_is_int(v) and v >= 2**63):
            return "refuse"  # an integer literal beyond int64 is refused by the strict JSON reader
        return "run" if 1.2e-38 < v < 3.4e38 else "either"  # outside float32: a C reader may refuse it
    if field == "rope_dim":
        if not _is_int(v) or not 0 <= v <= a["head_dim"]:
            return "refuse"
        return "run" if v % 2 == 0 and not integral_float else "either"
    if field in ENUMS:
        return "run" if v in ENUMS[field] else "refuse"
    if field == "qk_norm":
        return "either" if v in ("none", "head", "full") else "refuse"  # other kinds need other tensors
    if field == "family":
        return "either" if isinstance(v, str) else "refuse"
    if field in BOOLS:
        if not isinstance(v, bool):
            return "either" if v in (0, 1) and _is_int(v) else "refuse"
        if field == "norm_topk":
            return "run"
        if field == "qkv_bias":
            return "refuse" if v else "either"  # bias tensors missing / left unused
        if field == "shared_gate":
            return "refuse" if v and a["shared_ffn"] else "either"
        return "either"  # tie_embeddings: output.weight unused
    if field == "shared_ffn":
        if not _is_int(v) or v < 0:
            return "refuse"
        return "either" if v == 0 else "refuse"
    if field in ("dense_ffn", "sliding_window"):
        return "either" if _is_int(v) and 0 <= v < 2**31 else "refuse"  # no layer uses it
    if field == "max_position":
        return "either" if _is_int(v) and 1 <= v < 2**31 else "refuse"
    if field in ("bos_token_id", "eos_token_id"):
        if v is None or (_is_int(v) and 0 <= v < a["vocab"]):
            return "run" if not integral_float else "either"
        return "either" if _is_int(v) and -(2**63) <= v < 2**63 else "refuse"
    if field == "dense_layers":
        return "run" if v == [] else "refuse"  # a dense layer needs MLP tensors these files do not hold
    if field in ("nope_layers", "swa_layers"):
        if not isinstance(v, list) or not all(_is_int(x) and 0 <= x < a["n_layers"] for x in v):
            return "refuse"
        return "run" if field == "nope_layers" and len(set(v)) == len(v) else "either"
    if field == "expert_map":
        if v == [] and a["expert_map"] == []:
            return "run"
        return "either" if _same_stored_experts(a, v) else "refuse"
    return "either"


def _same_stored_experts(a: dict, v) -> bool:
    """v is another valid merge map over the same stored experts (no reader can tell it from the written one)."""
    old = a["expert_map"]
    if not isinstance(v, list) or len(v) != len(old):
        return False
    for row, was in zip(v, old):
        if not isinstance(row, list) or len(row) != len(was) or not all(_is_int(g) and -1 <= g < len(was) for g in row):
            return False
        if not was or not row or max(row) != max(was) or sum(g >= 0 for g in row) < a["top_k"]:
            return False
        if set(range(max(row) + 1)) - set(row):  # stored experts numbered without gaps
            return False
    return True


# ---- the cases -----------------------------------------------------------------------------------------------------

ARCH_VALUES_FULL = (0, -1, 1, 2, 2**31 - 1, 2**31, 2**63, -(2**63) - 1, 1.5, 2.0, "16", None, [], {}, True,
                    float("nan"), float("inf"), float("-inf"), 1e308, 1e-320, -0.0)
ARCH_VALUES_SHORT = (0, -1, 2**31 - 1, 2**63, float("nan"), "16", None)


def _index_case(label, base, muts, expect, expect_budget=None, fix=True, raw=None) -> Case:
    return Case(label, base.name, "index", (tuple(muts), fix, raw), expect, expect_budget or expect)


def _fmt(v) -> str:
    return json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)


def _truncations(b: Base) -> list[Case]:
    size, io = len(b.data), b.index_offset
    offs = {0, 1, 4, 8, 27, 28, 1000, 4095, 4096, 4097, io - 1, io, io + 1, io + b.index_nbytes // 2, size - 2,
            size - 1}
    offs |= {4096 + (io - 4096) * i // 31 for i in range(1, 31)}
    return [Case(f"{b.name}/truncate/{n}", b.name, "truncate", (n,), "refuse", "refuse") for n in sorted(offs)]


def _appends(b: Base) -> list[Case]:
    # docs/FORMAT.md: end of file == index_offset + index_nbytes
    return [Case(f"{b.name}/append/{n}", b.name, "append", (("00" * n),), "refuse", "refuse") for n in (1, 4096)]


def _preamble(b: Base) -> list[Case]:
    out = []
    for off in range(PREAMBLE.size):
        for bit in range(8):
            out.append(Case(f"{b.name}/preamble_flip/{off}.{bit}", b.name, "flip", (off, bit, False), "refuse",
                            "refuse"))
    for off in (28, 100, 2048, 4095):  # the zero padding: FORMAT.md says zero; a reader may ignore it
        out.append(Case(f"{b.name}/preamble_pad_flip/{off}", b.name, "flip", (off, 0, False), "either", "either"))
    size = len(b.data)
    sets = [(1, 0), (1, 3), (1, 2**32 - 1), (2, 0), (2, 4095), (2, size), (2, U64 - 1), (2, U64 - 10),
            (3, 0), (3, b.index_nbytes + 1), (3, U64 - 1), (3, 2**63), (4, b.index_crc ^ 1)]
    sets.append((1, 2 if b.version == 1 else 1))
    out += [Case(f"{b.name}/preamble_set/{PREAMBLE_FIELDS[f]}={v}", b.name, "preamble_set", (f, v),
                 "either" if (f == 1 and v == 2) else "refuse", "either" if (f == 1 and v == 2) else "refuse")
            for f, v in sets]  # a version-1 file stamped 2 is still readable; an MWQ file stamped 1 is not
    out.append(Case(f"{b.name}/preamble_set/magic=emoe", b.name, "preamble_set", (0, b"emoe".hex()), "refuse",
                    "refuse"))
    # index_offset + index_nbytes wrapping around 2^64 to a small number
    out.append(Case(f"{b.name}/preamble_set/index_nbytes_wraps", b.name, "preamble_set",
                    (3, U64 - b.index_offset + 16), "refuse", "refuse"))
    return out


PREAMBLE_FIELDS = ("magic", "version", "index_offset", "index_nbytes", "index_crc32")


def _index_flips(b: Base, rng: random.Random, n_plain: int, n_repaired: int) -> list[Case]:
    out = []
    for _ in range(n_plain):
        off, bit = b.index_offset + rng.randrange(b.index_nbytes), rng.randrange(8)
        out.append(Case(f"{b.name}/index_flip/{off}.{bit}", b.name, "flip", (off, bit, False), "refuse", "refuse"))
    seen = set()
    while len(seen) < n_repaired:
        off, bit = b.index_offset + rng.randrange(b.index_nbytes), rng.randrange(8)
        if (off, bit) in seen:
            continue
        seen.add((off, bit))
        case = Case(f"{b.name}/index_flip_repaired/{off}.{bit}", b.name, "flip", (off, bit, True), "", "")
        text = materialize(case, b)[b.index_offset:]
        res, bud = judge_index(b, text)
        out.append(Case(case.label, b.name, "flip", (off, bit, True), res, bud))
    return out


TENSOR_FIELDS = ("name", "dtype", "shape", "offset", "nbytes", "crc32", "kind", "planes", "quant")
PLANE_FIELDS = ("offset", "nbytes", "crc32", "bits")


class _Strict(ValueError):
    pass


def _strict_loads(text: bytes):
    def pairs(kv):
        keys = [k for k, _ in kv]
        if len(set(keys)) != len(keys) or any("\0" in k for k in keys):
            raise _Strict("duplicate key or NUL in key")
        return dict(kv)

    def const(name):
        raise _Strict(name)

    return json.loads(text.decode("utf-8"), object_pairs_hook=pairs, parse_constant=const)


def _diff(a, b, path=()):
    """Leaf paths where a and b differ (a key renamed = one removed + one added)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            if k not in a or k not in b:
                yield path + (k,)
            else:
                yield from _diff(a[k], b[k], path + (k,))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, path + (i,))
    elif type(a) is not type(b) or a != b:
        yield path


def _worst(labels) -> str:
    labels = list(labels)
    return "refuse" if "refuse" in labels else "either" if "either" in labels else "run"


def judge_index(b: Base, text: bytes) -> tuple[str, str]:
    """(resident, budget) expectation for an index changed arbitrarily (its CRC repaired, tensor CRCs not)."""
    try:
        new = _strict_loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "refuse", "refuse"
    if not isinstance(new, dict):
        return "refuse", "refuse"
    res, bud = [], []
    for path in _diff(b.index, new):
        top = path[0]
        if top in ("format", "version", "tensors") and len(path) <= 1 or top == "arch" and len(path) == 1:
            r = s = "refuse"
        elif top == "metadata":
            r = s = "either"
        elif top == "arch":
            field = path[1]
            if field not in b.arch or field not in new.get("arch", {}):
                r = s = arch_expect(b, field, None, removed=True) if field in b.arch else "either"
            else:
                r = s = arch_expect(b, field, new["arch"][field])
        elif top == "tensors":
            old = b.index["tensors"][path[1]]
            field = path[2] if len(path) > 2 else None
            sub = path[-1] if len(path) > 3 else None
            lazy = old["kind"] == "expert"  # under a budget an expert's CRC is checked when it is first read
            if field is None:
                r = s = "refuse"
            elif field == "kind" or field not in TENSOR_FIELDS:
                r = s = "either"  # kind changed or missing (dense by default), or an unknown key
            elif field == "quant" and sub not in ("base_bits", "group_size"):
                r = s = "either"  # nesting / weighted are informative; an unknown key
            elif (field == "planes" and len(path) > 4 and sub not in PLANE_FIELDS) or (
                    field == "name" and old["name"] == "tokenizer.json"):
                r = s = "either"  # an unknown plane key; the tokenizer renamed (the model runs without it)
            elif field in ("offset", "crc32") or (field == "planes" and sub == "crc32"):
                new_t = new["tensors"][path[1]]
                inside = all(_is_int(new_t.get(k)) for k in ("offset", "nbytes"))
                r, s = "refuse", ("either" if lazy and inside else "refuse")
            else:
                r = s = "refuse"
        else:
            r = s = "run"  # an unknown top-level key
        res.append(r)
        bud.append(s)
    return _worst(res), _worst(bud)


def _data_flips(b: Base, rng: random.Random) -> list[Case]:
    out = []
    picks = ["tokenizer.json", "token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
             "blk.1.ffn_gate_inp.weight"]
    experts = b.names(kind="expert")
    picks += [experts[0], experts[len(experts) // 2], experts[-1]]
    for name in picks:
        t = b.tensors[name]
        for k in range(3):
            off = t["offset"] + rng.randrange(t["nbytes"])
            lazy = t["kind"] == "expert"
            out.append(Case(f"{b.name}/data_flip/{name}+{off - t['offset']}", b.name, "flip", (off, k * 3 % 8, False),
                            "refuse", "either" if lazy else "refuse"))
    # alignment gaps between tensors (no checksum covers them; MWQ plane padding is inside the tensor's span)
    spans = sorted((t["offset"], t["offset"] + t["nbytes"]) for t in b.tensors.values())
    gaps = [(e, s2) for (_, e), (s2, _) in itertools.pairwise(spans) if s2 > e]
    for e, s2 in gaps[:: max(1, len(gaps) // 4)][:4]:
        out.append(Case(f"{b.name}/data_flip/gap@{e}", b.name, "flip", (e + (s2 - e) // 2, 0, False), "run", "run"))
    for t in b.tensors.values():
        planes = t.get("planes") or []
        for p, q in itertools.pairwise(planes):
            if q["offset"] > p["offset"] + p["nbytes"]:  # plane padding: in the tensor CRC, in no plane CRC
                out.append(Case(f"{b.name}/data_flip/plane_pad@{t['name']}", b.name, "flip",
                                (p["offset"] + p["nbytes"], 0, False), "refuse", "either"))
                break
        if len(out) > 40:
            break
    # the same flips with the checksums repaired: a different but valid file (low mantissa bits, codes, signs)
    for name in ["token_embd.weight", "blk.0.attn_q.weight", experts[0], experts[-1]]:
        t = b.tensors[name]
        if t["dtype"] == "f32":
            rel = rng.randrange(t["nbytes"] // 4) * 4  # lowest byte of an f32 (little-endian): mantissa
        elif t["dtype"] == "f16":
            rel = rng.randrange(t["nbytes"] // 2) * 2
        elif t["dtype"] == "q8_0":
            rel = rng.randrange(t["nbytes"] // 34) * 34 + 2 + rng.randrange(32)  # a code, not the f16 scale
        elif t["dtype"] == "mwq":
            p = t["planes"][-1]
            rows, cols = t["shape"]
            ng = cols // t["quant"]["group_size"]
            rel = p["offset"] - t["offset"] + 2 * rows * ng + rng.randrange(rows * cols // 8)  # a sign bit
        else:
            continue
        out.append(Case(f"{b.name}/data_flip_repaired/{name}+{rel}", b.name, "data_flip_repaired", (name, rel, 0),
                        "run", "run"))
    t = b.tensors["tokenizer.json"]
    for rel in (0, t["nbytes"] // 2, t["nbytes"] - 1):  # the tokenizer JSON damaged, its CRC repaired
        out.append(Case(f"{b.name}/data_flip_repaired/tokenizer.json+{rel}", b.name, "data_flip_repaired",
                        ("tokenizer.json", rel, 1), "either", "either"))
    return out


def _arch_cases(b: Base, values) -> list[Case]:
    out = []
    for field in b.arch:
        for v in values:
            if type(v) is type(b.arch[field]) and v == b.arch[field]:
                continue
            out.append(_index_case(f"{b.name}/arch_value/{field}={_fmt(v)}", b, [("set", ["arch", field], v)],
                                   arch_expect(b, field, v)))
        out.append(_index_case(f"{b.name}/arch_remove/{field}", b, [("del", ["arch", field])],
                               arch_expect(b, field, None, removed=True)))
    a = b.arch
    valid = {"norm_eps": [1e-3, 1.0], "rope_theta": [500000.0, 1.0], "top_k": [1, a["n_experts"]],
             "rope_kind": ["norm" if a["rope_kind"] == "neox" else "neox"], "router_fn": ["sigmoid"],
             "activation": ["reglu"], "norm_topk": [not a["norm_topk"]], "nope_layers": [[0]],
             "rope_dim": [0, a["head_dim"] // 2], "bos_token_id": [None, 0], "eos_token_id": [None, 3]}
    have = {c.label for c in out}
    for field, vs in valid.items():  # values that leave a valid file: these must run
        for v in vs:
            if v != a[field] and f"{b.name}/arch_value/{field}={_fmt(v)}" not in have:
                out.append(_index_case(f"{b.name}/arch_value/{field}={_fmt(v)}", b, [("set", ["arch", field], v)],
                                       arch_expect(b, field, v)))
    for key, v in (("x_fuzz_unknown", 1), ("n_layer", 99), ("", 0)):
        out.append(_index_case(f"{b.name}/arch_unknown/{key or 'empty'}", b, [("set", ["arch", key], v)], "either"))
    return out


def _dupkey_cases(b: Base) -> list[Case]:
    """Duplicate keys and keys with a NUL: a strict reader refuses them all (two parsers disagreed on these)."""
    out = []
    a = b.arch
    pairs = [("vocab", 16, a["vocab"]), ("n_layers", 1, a["n_layers"]), ("hidden", 32, a["hidden"]),
             ("top_k", a["top_k"], 1), ("n_experts", a["n_experts"], 64)]
    for field, first, second in pairs:
        for style in ("dup", "nul", "dup_same"):
            k2 = field + ("\\u0000" if style == "nul" else "")
            v2 = first if style == "dup_same" else second
            raw = f'{json.dumps(first)}, "{k2}": {json.dumps(v2)}'  # "field": first, "k2": v2
            out.append(_index_case(f"{b.name}/dupkey/arch.{field}.{style}", b,
                                   [("set", ["arch", field], PLACEHOLDER)], "refuse", raw=raw))
    t0 = b.index["tensors"][1]["name"]
    for field in ("offset", "nbytes", "name"):
        v = b.tensors[t0][field]
        out.append(_index_case(f"{b.name}/dupkey/tensor.{field}", b, [("set", ["tensors", "@" + t0, field],
                                                                        PLACEHOLDER)],
                               "refuse", raw=(f'{json.dumps(v)}, "{field}": {json.dumps(v)}')))
    for key in ("arch", "tensors", "metadata", "format"):
        out.append(_index_case(f"{b.name}/dupkey/top.{key}", b, [("set", [key], PLACEHOLDER)], "refuse",
                               raw=(f'{json.dumps(b.index[key])}, "{key}": {json.dumps(b.index[key])}')))
    return out


def _deep_cases(b: Base) -> list[Case]:
    deep = "[" * 100_000 + "]" * 100_000
    out = []
    for where in (["metadata", "x_fuzz_deep"], ["arch", "x_fuzz_deep"], ["arch", "expert_map"],
                  ["tensors", "@token_embd.weight", "shape"]):
        out.append(_index_case(f"{b.name}/deep/{'.'.join(w.lstrip('@') for w in where)}", b,
                               [("set", where, PLACEHOLDER)], "refuse", raw=(deep)))
    out.append(_index_case(f"{b.name}/deep/metadata.depth200", b, [("set", ["metadata", "x_fuzz_deep"], PLACEHOLDER)],
                           "either", raw=("[" * 200 + "]" * 200)))
    return out


WHOLE = ("empty", "null", "array", "number", "string", "object_empty", "deep_array", "deep_object", "unclosed",
         "trailing_garbage", "two_objects", "invalid_utf8", "nul_byte", "utf16")


def _whole_cases(b: Base) -> list[Case]:
    out = [Case(f"{b.name}/whole_index/{k}", b.name, "whole_index", (k,), "refuse", "refuse") for k in WHOLE]
    out.append(Case(f"{b.name}/whole_index/leading_space", b.name, "whole_index", ("leading_space",), "run", "run"))
    # RFC 8259: a parser MAY ignore a byte order mark
    out.append(Case(f"{b.name}/whole_index/bom", b.name, "whole_index", ("bom",), "either", "either"))
    return out


def _number_syntax(b: Base) -> list[Case]:
    """Number spellings: JSON allows 2e0 and 2.0 (integral, maybe refused where an integer is due); not 02, +2,
    0x2, .5, 1e999 (overflows to infinity)."""
    out = []
    spell = {"n_layers": [("2.0", "either"), ("2e0", "either"), ("02", "refuse"), ("+2", "refuse"), ("0x2", "refuse"),
                          ("-0", "refuse"), ("2 ", "run")],
             "norm_eps": [("1e999", "refuse"), ("-1e999", "refuse"), (".5", "refuse"), ("1.", "refuse"),
                          ("1e-5", "run"), ("1E-5", "run")],
             "vocab": [(str(b.arch["vocab"]) + ".0", "either"), ("3.2e2" if b.arch["vocab"] == 320 else "0", "either"),
                       (str(b.arch["vocab"]) + "5" * 30, "refuse")]}
    for field, items in spell.items():
        for text, exp in items:
            if field == "vocab" and text == "0":
                continue
            if field == "n_layers" and b.arch["n_layers"] != 2:
                continue
            out.append(_index_case(f"{b.name}/number_syntax/{field}={text.strip()}", b,
                                   [("set", ["arch", field], PLACEHOLDER)], exp, raw=(text)))
    for text in ('"olm\\u0000oe"', '"\\ud800"'):
        out.append(_index_case(f"{b.name}/number_syntax/family={text}", b, [("set", ["arch", "family"], PLACEHOLDER)],
                               "either", raw=(text)))
    return out


def _top_cases(b: Base) -> list[Case]:
    v_other = 2 if b.version == 1 else 1
    return [
        _index_case(f"{b.name}/index_top/format=other", b, [("set", ["format"], "gguf")], "refuse"),
        _index_case(f"{b.name}/index_top/version={v_other}", b, [("set", ["version"], v_other)], "refuse"),
        _index_case(f"{b.name}/index_top/version=str", b, [("set", ["version"], str(b.version))], "refuse"),
        _index_case(f"{b.name}/index_top/arch_missing", b, [("del", ["arch"])], "refuse"),
        _index_case(f"{b.name}/index_top/arch=list", b, [("set", ["arch"], [])], "refuse"),
        _index_case(f"{b.name}/index_top/arch=null", b, [("set", ["arch"], None)], "refuse"),
        _index_case(f"{b.name}/index_top/tensors_missing", b, [("del", ["tensors"])], "refuse"),
        _index_case(f"{b.name}/index_top/tensors=[]", b, [("set", ["tensors"], [])], "refuse"),
        _index_case(f"{b.name}/index_top/tensors={{}}", b, [("set", ["tensors"], {})], "refuse"),
        _index_case(f"{b.name}/index_top/tensors=null", b, [("set", ["tensors"], None)], "refuse"),
        _index_case(f"{b.name}/index_top/metadata_missing", b, [("del", ["metadata"])], "either"),
        _index_case(f"{b.name}/index_top/metadata=list", b, [("set", ["metadata"], [])], "either"),
        _index_case(f"{b.name}/index_top/unknown_key", b, [("set", ["x_fuzz_unknown"], {"a": [1, 2]})],
                    "refuse"),  # unknown index keys are refused (written by a newer edgemoe); metadata is open
        _index_case(f"{b.name}/index_top/metadata_unknown_key", b, [("set", ["metadata", "x_fuzz"], 1)], "run"),
        _index_case(f"{b.name}/index_top/metadata_nan", b, [("set", ["metadata", "x_fuzz"], float("nan"))],
                    "refuse"),
    ]


def _tensor_cases(b: Base) -> list[Case]:
    out = []
    size, io = len(b.data), b.index_offset
    experts = b.names(kind="expert")
    picks = ["blk.0.attn_q.weight", "output_norm.weight", "token_embd.weight", experts[0]]
    by_size: dict[int, list[str]] = {}
    for n, t in b.tensors.items():
        by_size.setdefault(t["nbytes"], []).append(n)
    for name in picks:
        t = b.tensors[name]
        lazy = "either" if t["kind"] == "expert" else "refuse"
        shape, off, nb = t["shape"], t["offset"], t["nbytes"]
        p = ["tensors", "@" + name]
        shapes = [[shape[0] + 1] + shape[1:], shape + [1], [], [-s for s in shape], [2**62, 4], [str(shape[0])] +
                  shape[1:], None, [math.prod(shape)] if len(shape) > 1 else [1, shape[0]]]
        if len(shape) == 2 and shape[0] != shape[1]:
            shapes.append([shape[1], shape[0]])  # same byte count, transposed
        for s in shapes:
            out.append(_index_case(f"{b.name}/tensor/{name}.shape={json.dumps(s)}", b, [("set", p + ["shape"], s)],
                                   "refuse"))
        dts = ["f32", "f16", "q8_0", "bytes", "mwq", "F32", "q4_0", 1, None]
        for dt in dts:
            if dt != t["dtype"]:
                out.append(_index_case(f"{b.name}/tensor/{name}.dtype={json.dumps(dt)}", b,
                                       [("set", p + ["dtype"], dt)], "refuse"))
        offs = [(0, "refuse"), (4095, "refuse"), (io, "refuse"), (io - nb // 2, "refuse"), (size, "refuse"),
                (2**63, "refuse"), (U64 - 1, "refuse"), (U64 - 4096, "refuse"), (-1, "refuse"), (str(off), "refuse"),
                (off + 0.5, "refuse"), (off + 1, "either"), (off + 64, "either")]
        if not t.get("planes"):
            twin = [n for n in by_size[nb] if n != name and b.tensors[n]["dtype"] == t["dtype"]]
            if twin:  # two entries on the same bytes (each still self-consistent)
                offs.append((b.tensors[twin[0]]["offset"], "either"))
        for o, exp in offs:
            if o == io - nb // 2 and (o < 4096 or o == off):
                continue
            exp_b = exp if exp != "refuse" or not isinstance(o, int) or o < 4096 or o + nb > io else lazy
            out.append(_index_case(f"{b.name}/tensor/{name}.offset={_fmt(o)}", b, [("set", p + ["offset"], o)], exp,
                                   exp_b))
        for n in (nb + 1, nb - 1, 0, nb * 2, 2**63, -1, U64 + nb):
            out.append(_index_case(f"{b.name}/tensor/{name}.nbytes={n}", b, [("set", p + ["nbytes"], n)], "refuse"))
        for c in (t["crc32"] ^ 1, 2**32 + t["crc32"], -1, str(t["crc32"]), None):
            out.append(_index_case(f"{b.name}/tensor/{name}.crc32={_fmt(c)}", b, [("set", p + ["crc32"], c)],
                                   "refuse", lazy if _is_int(c) and c == t["crc32"] ^ 1 else "refuse", fix=False))
        for field in ("name", "dtype", "shape", "offset", "nbytes", "crc32"):
            out.append(_index_case(f"{b.name}/tensor/{name}.missing_{field}", b, [("del", p + [field])], "refuse"))
        out.append(_index_case(f"{b.name}/tensor/{name}.missing_kind", b, [("del", p + ["kind"])], "either"))
        out.append(_index_case(f"{b.name}/tensor/{name}.kind=bogus", b, [("set", p + ["kind"], "bogus")], "refuse"))
        other = "dense" if t["kind"] == "expert" else "expert"
        out.append(_index_case(f"{b.name}/tensor/{name}.kind={other}", b, [("set", p + ["kind"], other)], "either"))
        out.append(_index_case(f"{b.name}/tensor/{name}.removed", b, [("del", p)], "refuse"))
        out.append(_index_case(f"{b.name}/tensor/{name}.renamed", b, [("set", p + ["name"], name + "X")], "refuse"))
        out.append(_index_case(f"{b.name}/tensor/{name}.name=int", b, [("set", p + ["name"], 7)], "refuse"))
        out.append(_index_case(f"{b.name}/tensor/{name}.duplicated", b, [("copy_entry", p, {})], "refuse"))
        other_t = next(n for n in b.tensors if n not in (name, "tokenizer.json"))
        out.append(_index_case(f"{b.name}/tensor/{name}.duplicated_name_of_other", b,
                               [("copy_entry", ["tensors", "@" + other_t], {"name": name})], "refuse"))
        out.append(_index_case(f"{b.name}/tensor/{name}.unknown_field", b, [("set", p + ["x_fuzz"], 1)], "either"))
        out.append(_index_case(f"{b.name}/tensor/{name}.entry=int", b, [("set", p, 7)], "refuse"))
        out.append(_index_case(f"{b.name}/tensor/{name}.entry=list", b, [("set", p, [])], "refuse"))
    out.append(_index_case(f"{b.name}/tensor/extra_unused_tensor", b,
                           [("copy_entry", ["tensors", "@output_norm.weight"], {"name": "blk.0.x_fuzz.weight"})],
                           "either"))
    out.append(_index_case(f"{b.name}/tensor/tokenizer_removed", b, [("del", ["tensors", "@tokenizer.json"])], "run"))
    if not b.arch["tie_embeddings"]:
        out.append(_index_case(f"{b.name}/tensor/output_removed_and_tied", b,
                               [("del", ["tensors", "@output.weight"]), ("set", ["arch", "tie_embeddings"], True)],
                               "run"))
        out.append(_index_case(f"{b.name}/tensor/output_removed", b, [("del", ["tensors", "@output.weight"])],
                               "refuse"))
    out.append(_index_case(f"{b.name}/tensor/last_expert_removed", b, [("del", ["tensors", "@" + experts[-1]])],
                           "refuse"))
    out.append(_index_case(f"{b.name}/tensor/entries_reversed", b,
                           [("set", ["tensors"], list(reversed(b.index["tensors"])))], "either"))
    return out


def _plane_cases(b: Base) -> list[Case]:
    mwq = b.names(dtype="mwq")
    if not mwq:
        return []
    out = []
    name = mwq[0]
    t = b.tensors[name]
    planes, p = t["planes"], ["tensors", "@" + name]
    pl = p + ["planes"]
    k = len(planes)
    muts = {
        "swap_1_2": [("swap", pl + [0], pl + [1])],
        "p2_overlaps_p1": [("set", pl + [1, "offset"], planes[0]["offset"])],
        "p2_inside_p1": [("set", pl + [1, "offset"], planes[0]["offset"] + 64)],
        "last_out_of_file": [("set", pl + [k - 1, "offset"], len(b.data))],
        "last_into_index": [("set", pl + [k - 1, "offset"], b.index_offset - planes[-1]["nbytes"] // 2)],
        "p1_nbytes+1": [("set", pl + [0, "nbytes"], planes[0]["nbytes"] + 1)],
        "p1_nbytes_huge": [("set", pl + [0, "nbytes"], 2**63)],
        "planes_empty": [("set", pl, [])],
        "planes_null": [("set", pl, None)],
        "one_plane_only": [("set", pl, planes[:1])],
        "extra_plane": [("append", pl, planes[-1])],
        "nine_planes": [("set", pl, (planes * 9)[:9])],
        "p1_bits=3": [("set", pl + [0, "bits"], 3)],
        "p2_bits=2": [("set", pl + [1, "bits"], 2)],
        "p1_bits_missing": [("del", pl + [0, "bits"])],
        "p2_missing_offset": [("del", pl + [1, "offset"])],
        "plane=int": [("set", pl + [1], 5)],
        "base_bits=3": [("set", p + ["quant", "base_bits"], 3)],
        "base_bits=4": [("set", p + ["quant", "base_bits"], 4)],
        "base_bits=0": [("set", p + ["quant", "base_bits"], 0)],
        "group_size=0": [("set", p + ["quant", "group_size"], 0)],
        "group_size=7": [("set", p + ["quant", "group_size"], 7)],
        "group_size=-8": [("set", p + ["quant", "group_size"], -8)],
        "group_size=2^31": [("set", p + ["quant", "group_size"], 2**31)],
        "group_size=half": [("set", p + ["quant", "group_size"], t["quant"]["group_size"] // 2)],
        "quant_missing": [("del", p + ["quant"])],
        "quant=list": [("set", p + ["quant"], [])],
        "span_short": [("set", p + ["nbytes"], t["nbytes"] - 64)],
    }
    for label, m in muts.items():
        out.append(_index_case(f"{b.name}/planes/{name}.{label}", b, m, "refuse"))
    out.append(_index_case(f"{b.name}/planes/{name}.p2_crc^1", b, [("set", pl + [1, "crc32"], planes[1]["crc32"] ^ 1)],
                           "refuse", "either", fix=False))
    out.append(_index_case(f"{b.name}/planes/{name}.nesting=other", b, [("set", p + ["quant", "nesting"], "x")],
                           "either"))
    dense = "blk.0.attn_q.weight"
    out.append(_index_case(f"{b.name}/planes/{dense}.planes_on_non_mwq", b,
                           [("set", ["tensors", "@" + dense, "planes"], planes)], "either"))
    out.append(_index_case(f"{b.name}/planes/{name}.as_version1", b, [("set", ["version"], 1)], "refuse"))
    return out


def _expert_map_cases(b: Base) -> list[Case]:
    a = b.arch
    L, E = a["n_layers"], a["n_experts"]
    out = []
    em = a["expert_map"]
    if em:  # a merged model: rows of stored expert ids
        stored = max(em[0]) + 1
        row = list(em[0])
        cases = {
            "missing_expert": [stored] + row[1:],
            "minus2": [-2] + row[1:],
            "int32_overflow": [2**31] + row[1:],
            "string": ["0"] + row[1:],
            "float": [0.5] + row[1:],
            "row_short": row[:-1],
            "row_long": row + [0],
            "all_pruned": [-1] * E,
            "fewer_than_top_k": [0] + [-1] * (E - 1),
        }
        for label, r in cases.items():
            out.append(_index_case(f"{b.name}/expert_map/{label}", b, [("set", ["arch", "expert_map", 0], r)],
                                   "refuse"))
        out.append(_index_case(f"{b.name}/expert_map/extra_row", b, [("append", ["arch", "expert_map"], row)],
                               "refuse"))
        out.append(_index_case(f"{b.name}/expert_map/one_row", b, [("set", ["arch", "expert_map"], em[:1])],
                               "refuse"))
        swapped = [stored - 1 - g if g >= 0 else g for g in row]  # the same groups, stored experts renumbered
        out.append(_index_case(f"{b.name}/expert_map/renumbered", b, [("set", ["arch", "expert_map", 0], swapped)],
                               "run"))
        out.append(_index_case(f"{b.name}/expert_map/one_group", b, [("set", ["arch", "expert_map", 0], [0] * E)],
                               "either"))
        out.append(_index_case(f"{b.name}/expert_map/removed", b, [("set", ["arch", "expert_map"], [])], "refuse"))
    else:
        ident = [list(range(E)) for _ in range(L)]
        out.append(_index_case(f"{b.name}/expert_map/identity", b, [("set", ["arch", "expert_map"], ident)], "run"))
        out.append(_index_case(f"{b.name}/expert_map/out_of_range", b,
                               [("set", ["arch", "expert_map"], [[E] + list(range(1, E))] + ident[1:])], "refuse"))
        out.append(_index_case(f"{b.name}/expert_map/row_of_ints", b, [("set", ["arch", "expert_map"], list(range(E)))],
                               "refuse"))
        out.append(_index_case(f"{b.name}/expert_map/too_many_rows", b, [("set", ["arch", "expert_map"],
                                                                           ident + [list(range(E))])], "refuse"))
    return out


def _layer_list_cases(b: Base) -> list[Case]:
    L = b.arch["n_layers"]
    out = []
    for field in ("dense_layers", "nope_layers", "swa_layers"):
        for v in ([L], [-1], [2**31 - 1], [2**63], ["0"], [0.0], [[0]], 0):
            out.append(_index_case(f"{b.name}/layer_list/{field}={_fmt(v)}", b, [("set", ["arch", field], v)],
                                   arch_expect(b, field, v)))
    out.append(_index_case(f"{b.name}/layer_list/dense_layers=[0]", b, [("set", ["arch", "dense_layers"], [0])],
                           "refuse"))
    out.append(_index_case(f"{b.name}/layer_list/swa_layers=[0]+window", b,
                           [("set", ["arch", "swa_layers"], [0]), ("set", ["arch", "sliding_window"], 8)], "run"))
    out.append(_index_case(f"{b.name}/layer_list/swa_window_negative", b,
                           [("set", ["arch", "swa_layers"], [0]), ("set", ["arch", "sliding_window"], -8)], "refuse"))
    return out


def cases(bases: dict[str, Base]) -> list[Case]:
    """Every case, in a fixed order (same list for the same valid containers)."""
    out: list[Case] = []
    for i, (name, b) in enumerate(sorted(bases.items())):
        rng = random.Random(1000 + i)
        full = i % 2 == 0  # every arch value on half the bases, the short list on the others
        out += _truncations(b) + _appends(b) + _preamble(b)
        out += _index_flips(b, rng, 40, 120)
        out += _data_flips(b, rng)
        out += _arch_cases(b, ARCH_VALUES_FULL if full else ARCH_VALUES_SHORT)
        out += _dupkey_cases(b) + _deep_cases(b) + _whole_cases(b) + _number_syntax(b) + _top_cases(b)
        out += _tensor_cases(b) + _plane_cases(b) + _expert_map_cases(b) + _layer_list_cases(b)
    labels = [c.label for c in out]
    dup = {x for x in labels if labels.count(x) > 1} if len(set(labels)) != len(labels) else set()
    if dup:
        raise AssertionError(f"duplicate case labels: {sorted(dup)[:5]}")
    return out


KEEP_ALL = ("dupkey", "deep")  # few cases, and the ones that crashed the process on main: always replayed


def sample(all_cases: list[Case], every: int) -> list[Case]:
    """Every Nth case of each class (each class keeps at least one case per base), and every case of KEEP_ALL."""
    if every <= 1:
        return list(all_cases)
    seen: dict[tuple, int] = {}
    out = []
    for c in all_cases:
        key = (c.base, c.cls)
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n % every == 0 or c.cls in KEEP_ALL:
            out.append(c)
    return out


# ---- building the valid containers --------------------------------------------------------------------------------


def build_bases(root: Path, tiny_dir=None) -> dict[str, Path]:
    """Export the valid containers into root (tiny_dir: family -> checkpoint directory, default: build them)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from edgemoe_export import export
    from edgemoe_export.merge_stage import export_merged
    from tiny_models import build_tiny_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    calib = root / "calib.txt"
    calib.write_text(CALIB_TEXT)
    out = {}
    for name, family, kw in BASES:
        path = root / f"{name}.emoe"
        if not path.exists():
            src = tiny_dir(family) if tiny_dir else build_tiny_model(family, root / family)
            if kw.get("merged"):
                export_merged(src, path, merge_ratio=0.5, method="average", calib_path=calib, calib_tokens=256,
                              seq_len=64, bits=16, show_progress=False)
            else:
                export(src, path, show_progress=False, **kw)
        out[name] = path
    return out


def load_bases(paths: dict[str, Path]) -> dict[str, Base]:
    return {name: Base(name, Path(p).read_bytes()) for name, p in paths.items()}


def file_name(case: Case) -> str:
    """A file name for a case (labels hold '/' and odd characters)."""
    return f"{zlib.crc32(case.label.encode()):08x}.emoe"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the hostile container corpus (and manifest.json) to OUT_DIR.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--every", type=int, default=1, help="keep every Nth case of each class (default: all)")
    ap.add_argument("--bases", type=Path, default=None, help="directory of the valid containers (built if missing)")
    args = ap.parse_args(argv)
    bases = load_bases(build_bases(args.bases or args.out / "bases"))
    chosen = sample(cases(bases), args.every)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for c in chosen:
        (args.out / file_name(c)).write_bytes(materialize(c, bases[c.base]))
        manifest.append({"file": file_name(c), **c.to_json()})
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=0))
    counts: dict[str, int] = {}
    for c in chosen:
        counts[c.cls] = counts.get(c.cls, 0) + 1
    print(f"{len(chosen)} cases in {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
