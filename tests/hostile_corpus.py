"""Damaged export sources, generated from the tiny models: what an attacker (or a bad download) hands `edgemoe export`.

Each `Case` writes one damaged source into a fresh directory and says what a correct exporter must do with it:
- "invalid": the source is not a valid model; it must be refused (an EdgeMoEError, one line, no output file);
- "benign": the source is valid and describes the same model; if accepted, the logits must equal the original's;
- "data": tensor values changed in a way no header can reveal (low mantissa bits); if accepted, the logits must
  be finite;
- "fuzz": random header bytes changed (`random_*_cases`); the result may or may not be a valid model, so it must be
  refused or export finite logits.

`run_case` exports one case in-process and classifies the outcome (refused / accepted / internal / hang / leftover /
garbage); `corpus_counts` runs a list of cases and counts the outcomes. The mutations are independent of the
readers under test: offsets come from the files' own layout (safetensors header, gguf-py's GGUFReader).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDS = [3, 17, 42, 99, 150, 201, 250, 300]


@dataclass
class Case:
    name: str
    kind: str  # invalid | benign | data | fuzz
    make: Callable[[Path], Path]  # writes the damaged source under the given directory, returns its path


@dataclass
class Outcome:
    status: str  # refused | accepted | internal | hang | leftover | garbage
    detail: str = ""


# --- safetensors files ---------------------------------------------------------------------------------------------
def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header, data: bytes, raw_header: bytes | None = None) -> None:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _rebuild_st(path: Path, tensors: dict[str, tuple[str, list, bytes]]) -> None:
    """Write a consistent safetensors file from name -> (dtype, shape, raw bytes)."""
    header, chunks, pos = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    write_st(path, header, b"".join(chunks))


def _st_tensors(path: Path) -> dict[str, tuple[str, list, bytes]]:
    header, data = read_st(path)
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}


def _copy_dir(base: Path, work: Path) -> Path:
    dst = work / "src"
    shutil.copytree(base, dst)
    return dst


def _st_case(name: str, kind: str, base: Path, edit: Callable[[Path], None]) -> Case:
    def make(work: Path) -> Path:
        d = _copy_dir(base, work)
        edit(d)
        return d

    return Case(name, kind, make)


def _pick_tensor(header: dict, pattern: str = "experts") -> str:
    names = sorted(k for k in header if k != "__metadata__")
    return next((k for k in names if pattern in k), names[0])


def _header_edit(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        f = d / "model.safetensors"
        header, data = read_st(f)
        out = fn(header)
        write_st(f, header if out is None else out, data)

    return edit


def _entry_edit(fn: Callable[[dict, dict, str], None], pattern: str = "experts") -> Callable[[Path], None]:
    def whole(header: dict):
        name = _pick_tensor(header, pattern)
        fn(header, header[name], name)

    return _header_edit(whole)


def _raw_header_edit(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        f = d / "model.safetensors"
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        write_st(f, None, raw[8 + n :], fn(raw[8 : 8 + n]))

    return edit


def _truncate(frac_or_at) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        f = d / "model.safetensors"
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        at = {"in_len": 4, "len": 8, "in_header": 8 + n // 2, "header": 8 + n, "data+1": 9 + n,
              "last": len(raw) - 1}.get(frac_or_at)
        if at is None:
            at = int(len(raw) * frac_or_at)
        f.write_bytes(raw[:at])

    return edit


def _tensor_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        f = d / "model.safetensors"
        t = _st_tensors(f)
        fn(t)
        _rebuild_st(f, t)

    return edit


def _set_f32(value: float, pattern: str = "experts", index: int = 5) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        name = next(k for k in sorted(t) if pattern in k)
        dtype, shape, raw = t[name]
        arr = np.frombuffer(raw, np.float32).copy()
        arr[index] = value
        t[name] = (dtype, shape, arr.tobytes())

    return fn


def _flip_low_mantissa(t: dict) -> None:
    name = min(k for k in t if "experts" in k)
    dtype, shape, raw = t[name]
    b = bytearray(raw)
    for i in range(0, len(b), 4 * 7):  # byte 0 of every 7th f32: the lowest mantissa bits (a change < 2^-15 relative)
        b[i] ^= 0x5A
    t[name] = (dtype, shape, bytes(b))


def _config_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))  # json.dumps writes NaN / Infinity as Python reads them

    return edit


def _config_set(key: str, value) -> Callable[[Path], None]:
    def fn(cfg: dict) -> None:
        if value is _DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value

    return _config_edit(fn)


_DELETE = object()


def _write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        p = d / name
        p.write_bytes(content.encode() if isinstance(content, str) else content)

    return edit


def _remove(name: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / name).unlink()

    return edit


def _tokenizer_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        tok = json.loads((d / "tokenizer.json").read_text())
        fn(tok)
        (d / "tokenizer.json").write_text(json.dumps(tok))

    return edit


DEEP = "[" * 100_000 + "]" * 100_000

# (config key, bad values) for the keys every family's config uses; each value makes an invalid model.
_BAD_CONFIG = {
    "num_hidden_layers": [0, -2, 2.5, "2", None, True, 10**12],
    "hidden_size": [0, -64, 64.5, "64"],
    "num_attention_heads": [0, -4, 3, 2.0001],
    "num_key_value_heads": [0, 3, -2],
    "head_dim": [0, -1, 7.5],
    "rms_norm_eps": [-1, 0, math.nan, math.inf, "1e-5"],
    "rope_theta": [0, -1, math.nan, math.inf],
    "max_position_embeddings": [0, -1, 1.5, "x"],
    "vocab_size": [0, -1, 319, 10**9],
    "num_experts_per_tok": [0, -1, 99, 1.5],
    "tie_word_embeddings": ["no", 1],
    "bos_token_id": [-1, 10**6, "a"],
    "eos_token_id": [-7, 320, [2, 10**6]],
}
# family -> the keys of its expert count and widths
_FAMILY_KEYS = {
    "olmoe": {"num_experts": [0, -1, 1], "intermediate_size": [0, -8]},
    "qwen2moe": {"num_experts": [0, -1], "moe_intermediate_size": [0, -8], "shared_expert_intermediate_size": [-4],
                 "decoder_sparse_step": [-1], "mlp_only_layers": [[99], "x"]},
    "qwen3moe": {"num_experts": [0, -3], "moe_intermediate_size": [0, -1.5], "decoder_sparse_step": [-2],
                 "mlp_only_layers": [[-1]]},
    "mixtral": {"num_local_experts": [0, -1], "intermediate_size": [0, -40]},
}


def safetensors_cases(bases: dict[str, Path], sharded: Path | None = None) -> list[Case]:
    """Damaged checkpoint directories from tiny HF checkpoints (family -> directory); `sharded` a sharded one."""
    cases: list[Case] = []
    fams = sorted(bases)

    def add(name: str, kind: str, edit: Callable[[Path], None], fam: str | None = None) -> None:
        for f in [fam] if fam else fams[:1]:
            cases.append(_st_case(f"{f}/{name}", kind, bases[f], edit))

    def each(name: str, kind: str, edit: Callable[[Path], None]) -> None:
        for f in fams:
            add(name, kind, edit, f)

    # the safetensors file itself
    for at in ("in_len", "len", "in_header", "header", "data+1", "last", 0.5, 0.9):
        each(f"truncate@{at}", "invalid", _truncate(at))
    add("header_len=0", "invalid", lambda d: _set_len(d, 0))
    add("header_len=2^63", "invalid", lambda d: _set_len(d, 2**63))
    add("header_len+1", "invalid", lambda d: _set_len(d, 1, relative=True))
    add("header_len-1", "invalid", lambda d: _set_len(d, -1, relative=True))
    for label, raw in (("list", b"[1, 2]"), ("number", b"42"), ("null", b"null"), ("string", b'"x"'),
                       ("garbage", b"\x00\xff garbage"), ("bad_utf8", b'{"\xff\xfe": 1}'), ("empty", b""),
                       ("deep", DEEP.encode()), ("nan", b'{"a": NaN}')):
        add(f"header={label}", "invalid", _raw_header_edit(lambda _h, raw=raw: raw))
    add("header_duplicate_key", "invalid", _raw_header_edit(_duplicate_first_key))
    add("header_trailing_spaces", "benign", _raw_header_edit(lambda h: h + b" " * 13))
    add("header_keys_reordered", "benign", _header_edit(lambda h: dict(reversed(list(h.items())))))
    add("metadata_extra", "benign", _header_edit(lambda h: {"__metadata__": {"format": "pt", "x": "y"}, **h}))
    add("metadata_list", "invalid", _header_edit(lambda h: {**h, "__metadata__": [1, 2]}))
    add("metadata_non_string", "invalid", _header_edit(lambda h: {**h, "__metadata__": {"a": 5}}))
    add("entry_list", "invalid", _entry_edit(lambda h, e, n: h.__setitem__(n, [1, 2, 3])))
    add("entry_string", "invalid", _entry_edit(lambda h, e, n: h.__setitem__(n, "x")))
    for field in ("dtype", "shape", "data_offsets"):
        each(f"missing_{field}", "invalid", _entry_edit(lambda h, e, n, f=field: e.pop(f)))
    for v in ("F8_XYZ", 123, None, "f32", ""):
        add(f"dtype={v!r}", "invalid", _entry_edit(lambda h, e, n, v=v: e.__setitem__("dtype", v)))
    for v in ("I32", "F16", "BF16", "U8", "F64", "BOOL", "I64", "U32"):
        each(f"dtype_relabel={v}", "invalid", _entry_edit(lambda h, e, n, v=v: e.__setitem__("dtype", v)))
    for label, fn in (("string", lambda s: "abc"), ("int", lambda s: 5), ("null", lambda s: None),
                      ("negative", lambda s: [-s[0], *s[1:]]), ("float", lambda s: [float(s[0]), *s[1:]]),
                      ("bool", lambda s: [True, *s[1:]]), ("str_elem", lambda s: [str(s[0]), *s[1:]]),
                      ("extra_dim", lambda s: [*s, 1]), ("swapped", lambda s: list(reversed(s))),
                      ("doubled", lambda s: [s[0] * 2, *s[1:]]), ("huge", lambda s: [2**62, 2**62]),
                      ("empty", lambda s: []), ("zero", lambda s: [0, *s[1:]])):
        each(f"shape={label}", "invalid", _entry_edit(lambda h, e, n, fn=fn: e.__setitem__("shape", fn(e["shape"]))))
    for label, fn in (("reversed", lambda o: [o[1], o[0]]), ("single", lambda o: [o[0]]),
                      ("three", lambda o: [o[0], o[1], o[1]]), ("strings", lambda o: [str(o[0]), str(o[1])]),
                      ("negative", lambda o: [-1, o[1]]), ("beyond_file", lambda o: [o[0], o[1] + 10**9]),
                      ("overlap", lambda o: [max(0, o[0] - 8), o[1] - 8]), ("float", lambda o: [o[0] + 0.5, o[1]]),
                      ("not_list", lambda o: o[0]), ("huge", lambda o: [2**63, 2**64 + 5]),
                      ("shifted", lambda o: [o[0] + 4, o[1] + 4])):
        each(f"offsets={label}", "invalid",
             _entry_edit(lambda h, e, n, fn=fn: e.__setitem__("data_offsets", fn(e["data_offsets"]))))
    add("offsets_same_as_other", "invalid", _header_edit(_alias_two_tensors))
    # consistent files with the wrong content
    each("tensor_removed", "invalid", _tensor_edit(lambda t: t.pop(min(k for k in t if "experts" in k))))
    add("tensor_renamed", "invalid", _tensor_edit(lambda t: t.__setitem__("x.weight", t.pop(max(t)))))
    each("tensor_transposed", "invalid", _tensor_edit(_transpose_one))
    add("tensor_extra_unused", "benign", _tensor_edit(
        lambda t: t.__setitem__("model.rotary_emb.inv_freq", ("F32", [4], np.ones(4, np.float32).tobytes()))))
    for label, v in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
        each(f"value={label}", "invalid", _tensor_edit(_set_f32(v)))
        add(f"norm_value={label}", "invalid", _tensor_edit(_set_f32(v, "norm", 0)))
    each("low_mantissa_flips", "data", _tensor_edit(_flip_low_mantissa))
    add("bf16_storage", "data", _tensor_edit(_to_bf16))
    # config.json
    for key, values in _BAD_CONFIG.items():
        for i, v in enumerate(values):
            add(f"config.{key}={v!r}"[:80], "invalid", _config_set(key, v), fams[i % len(fams)])
    for fam in fams:
        for key, values in _FAMILY_KEYS.get(fam, {}).items():
            for v in values:
                add(f"config.{key}={v!r}", "invalid", _config_set(key, v), fam)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "model_type"):
        add(f"config.{key}_missing", "invalid", _config_set(key, _DELETE), fams[len(key) % len(fams)])
    for label, raw in (("list", "[]"), ("number", "5"), ("garbage", "{not json"), ("empty", ""), ("deep", DEEP),
                       ("bad_utf8", b'{"model_type": "\xff"}'), ("model_type=5", '{"model_type": 5}')):
        add(f"config={label}", "invalid", _write("config.json", raw))
    add("config_is_directory", "invalid", lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()))
    add("config.rope_scaling_yarn", "invalid", _config_set("rope_scaling", {"rope_type": "yarn", "factor": 4.0}))
    add("config.rope_parameters_list", "invalid", _config_set("rope_parameters", [1, 2]))
    add("config.unknown_key", "benign", _config_set("some_future_option", {"a": 1}))
    add("config.indented", "benign", lambda d: (d / "config.json").write_text(
        json.dumps(json.loads((d / "config.json").read_text()), indent=7)))
    # tokenizer
    for label, raw in (("garbage", b"\x00\x01garbage"), ("not_json", "{tok"), ("empty_object", "{}"),
                       ("list", "[]"), ("deep", DEEP), ("bad_utf8", b'{"version": "\xff"}')):
        add(f"tokenizer={label}", "invalid", _write("tokenizer.json", raw), fams[len(label) % len(fams)])
    add("tokenizer_truncated", "invalid",
        lambda d: (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:300]))
    add("tokenizer_vocab_beyond_model", "invalid", _tokenizer_edit(
        lambda t: t["model"]["vocab"].__setitem__("zzzz", 5000)))
    add("tokenizer_model_unknown", "invalid", _tokenizer_edit(lambda t: t["model"].__setitem__("type", "Nope")))
    add("tokenizer_removed", "benign", _remove("tokenizer.json"))
    add("tokenizer_config_garbage", "invalid", _write("tokenizer_config.json", "{x"))
    add("tokenizer_config_template_int", "invalid", _write("tokenizer_config.json", '{"chat_template": 5}'))
    add("tokenizer_config_deep", "invalid", _write("tokenizer_config.json", DEEP))
    add("weights_removed", "invalid", _remove("model.safetensors"))
    add("weights_empty", "invalid", _write("model.safetensors", b""))
    add("weights_directory", "invalid", lambda d: ((d / "model.safetensors").unlink(),
                                                   (d / "model.safetensors").mkdir()))
    add("second_copy_of_weights", "invalid",
        lambda d: shutil.copy(d / "model.safetensors", d / "model-copy.safetensors"))
    if sharded is not None:
        cases += _index_cases(sharded)
    return cases


def _set_len(d: Path, value: int, relative: bool = False) -> None:
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[:8] = struct.pack("<Q", (n + value) if relative else value)
    f.write_bytes(bytes(raw))


def _duplicate_first_key(h: bytes) -> bytes:
    header = json.loads(h)
    name = _pick_tensor(header)
    dup = dict(header[name], data_offsets=[0, 4], shape=[1], dtype="F32")
    return h[:1] + json.dumps(name).encode() + b":" + json.dumps(dup).encode() + b"," + h[1:]


def _alias_two_tensors(h: dict) -> None:
    names = sorted(k for k, v in h.items() if k != "__metadata__" and "experts" in k)
    a = names[0]
    b = next(n for n in names[1:] if h[n]["shape"] == h[a]["shape"])
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


def _transpose_one(t: dict) -> None:
    name = next(k for k in sorted(t) if len(t[k][1]) == 2 and t[k][1][0] != t[k][1][1])
    dtype, shape, raw = t[name]
    arr = np.frombuffer(raw, np.float32).reshape(shape).T.copy()
    t[name] = (dtype, list(arr.shape), arr.tobytes())


def _to_bf16(t: dict) -> None:
    for name in [k for k in sorted(t) if "experts" in k][:3]:
        _dtype, shape, raw = t[name]
        arr = np.frombuffer(raw, np.uint32)
        t[name] = ("BF16", shape, (arr >> 16).astype(np.uint16).tobytes())


def _index_cases(sharded: Path) -> list[Case]:
    idx = "model.safetensors.index.json"

    def index_edit(fn):
        def edit(d: Path) -> None:
            doc = json.loads((d / idx).read_text())
            out = fn(doc)
            (d / idx).write_text(json.dumps(doc if out is None else out))

        return edit

    def first_shard(d: Path) -> Path:
        return min(d.glob("*.safetensors"))

    cases = [
        ("index.weight_map_list", index_edit(lambda doc: doc.__setitem__("weight_map", list(doc["weight_map"])))),
        ("index.weight_map_missing", index_edit(lambda doc: doc.pop("weight_map"))),
        ("index.weight_map_null", index_edit(lambda doc: doc.__setitem__("weight_map", None))),
        ("index.list", index_edit(lambda doc: [doc])),
        ("index.value_int", index_edit(lambda doc: doc["weight_map"].__setitem__(min(doc["weight_map"]), 5))),
        ("index.escape_dir", index_edit(
            lambda doc: doc["weight_map"].__setitem__(min(doc["weight_map"]), "../../etc/passwd"))),
        ("index.absolute", index_edit(
            lambda doc: doc["weight_map"].__setitem__(min(doc["weight_map"]), "/etc/hostname"))),
        ("index.missing_shard", index_edit(
            lambda doc: doc["weight_map"].__setitem__(min(doc["weight_map"]), "nope.safetensors"))),
        ("index.wrong_shard", index_edit(_index_wrong_shard)),
        ("index.garbage", _write(idx, "{x")),
        ("index.deep", _write(idx, DEEP)),
        ("index.bad_utf8", _write(idx, b'{"weight_map": {"\xff": "a"}}')),
        ("shard_removed", lambda d: first_shard(d).unlink()),
        ("shard_truncated", lambda d: first_shard(d).write_bytes(first_shard(d).read_bytes()[:-9])),
        ("shard_tensor_duplicated", _duplicate_across_shards),
    ]
    out = [Case(f"sharded/{n}", "invalid", _dir_maker(sharded, e)) for n, e in cases]
    out.append(Case("sharded/index.metadata_extra", "benign",
                    _dir_maker(sharded, index_edit(lambda doc: doc.setdefault("metadata", {}).update(x=1)))))
    return out


def _dir_maker(base: Path, edit) -> Callable[[Path], Path]:
    def make(work: Path) -> Path:
        d = _copy_dir(base, work)
        edit(d)
        return d

    return make


def _index_wrong_shard(doc: dict) -> None:
    wm = doc["weight_map"]
    shards = sorted(set(wm.values()))
    name = min(wm)
    wm[name] = next(s for s in shards if s != wm[name])


def _duplicate_across_shards(d: Path) -> None:
    shards = sorted(d.glob("*.safetensors"))
    a, b = _st_tensors(shards[0]), _st_tensors(shards[1])
    name = min(a)
    b[name] = a[name]
    _rebuild_st(shards[1], b)


# --- GGUF files ----------------------------------------------------------------------------------------------------
def _gguf_layout(path: Path):
    """(kv fields, tensor infos, data start) of a valid GGUF, each with its byte offsets, read by gguf-py."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kvs = []
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        offs, part_offs = f.offset, []
        for p in f.parts:
            part_offs.append(offs)
            offs += int(p.nbytes)
        kvs.append((name, f, part_offs))
    tinfo = []
    for t in r.tensors:
        offs, part_offs = t.field.offset, []
        for p in t.field.parts:
            part_offs.append(offs)
            offs += int(p.nbytes)
        tinfo.append((t, part_offs))
    return kvs, tinfo, r.data_offset, r.alignment


def _gguf_patch(edits: Callable[[Path, bytearray], None]) -> Callable[[Path, Path], Path]:
    def make(base: Path, work: Path) -> Path:
        raw = bytearray(base.read_bytes())
        edits(base, raw)
        out = work / "model.gguf"
        out.write_bytes(bytes(raw))
        return out

    return make


def _put(raw: bytearray, at: int, fmt: str, value) -> None:
    raw[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)


_GGUF_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _kv_value(key_suffix: str, value) -> Callable[[Path, bytearray], None]:
    """Overwrite the scalar value of the first key ending in key_suffix, in its own type (NaN into an int key is
    skipped by the caller)."""

    def edit(base: Path, raw: bytearray) -> None:
        kvs, _, _, _ = _gguf_layout(base)
        _name, f, offs = next(k for k in kvs if k[0].endswith(key_suffix))
        fmt = _GGUF_FMT[int(f.types[0])]
        v = value
        if fmt in ("<f", "<d"):
            v = float(v)
        elif isinstance(v, float):
            v = int(v) if math.isfinite(v) else 0
        lo, hi = {"<B": (0, 255), "<b": (-128, 127), "<H": (0, 65535), "<h": (-32768, 32767), "<I": (0, 2**32 - 1),
                  "<i": (-(2**31), 2**31 - 1), "<Q": (0, 2**64 - 1), "<q": (-(2**63), 2**63 - 1)}.get(fmt, (None, None))
        if lo is not None:
            v = int(v) % (hi - lo + 1) + lo if not lo <= int(v) <= hi else int(v)
        _put(raw, offs[3], fmt, v)

    return edit


def _kv_part(key_suffix: str, part: int, fmt: str, value) -> Callable[[Path, bytearray], None]:
    def edit(base: Path, raw: bytearray) -> None:
        kvs, _, _, _ = _gguf_layout(base)
        _name, _f, offs = next(k for k in kvs if k[0].endswith(key_suffix))
        _put(raw, offs[part], fmt, value)

    return edit


def _kv_key_byte(key_suffix: str, byte: int) -> Callable[[Path, bytearray], None]:
    def edit(base: Path, raw: bytearray) -> None:
        kvs, _, _, _ = _gguf_layout(base)
        _name, _f, offs = next(k for k in kvs if k[0].endswith(key_suffix))
        raw[offs[1]] = byte

    return edit


def _ti(index: int, part: int, fmt: str, value_fn) -> Callable[[Path, bytearray], None]:
    """Overwrite part `part` (0 name_len, 1 name, 2 n_dims, 3 dims, 4 type, 5 offset) of tensor info `index`."""

    def edit(base: Path, raw: bytearray) -> None:
        _, tinfo, _data_start, _align = _gguf_layout(base)
        t, offs = tinfo[index % len(tinfo)]
        if part == 1:
            raw[offs[1]] = value_fn(t)
            return
        _put(raw, offs[part], fmt, value_fn(t) if callable(value_fn) else value_fn)

    return edit


def _data_edit(fn: Callable[[np.ndarray], None], pick: str = "exps") -> Callable[[Path, bytearray], None]:
    def edit(base: Path, raw: bytearray) -> None:
        _, tinfo, _data_start, _ = _gguf_layout(base)
        f32 = [t for t, _ in tinfo if t.tensor_type.name == "F32"]
        t = next((t for t in f32 if pick in t.name), None) or next(t for t in f32 if "gate_inp" in t.name)
        view = np.frombuffer(raw, np.float32, count=int(t.n_elements), offset=int(t.data_offset))
        arr = view.copy()
        fn(arr)
        raw[int(t.data_offset) : int(t.data_offset) + arr.nbytes] = arr.tobytes()

    return edit


def _gguf_truncate(frac: float) -> Callable[[Path, bytearray], None]:
    def edit(base: Path, raw: bytearray) -> None:
        del raw[int(len(raw) * frac) :]

    return edit


def _gguf_truncate_at(where: str) -> Callable[[Path, bytearray], None]:
    def edit(base: Path, raw: bytearray) -> None:
        kvs, tinfo, data_start, _ = _gguf_layout(base)
        at = {"magic": 2, "counts": 12, "first_kv": kvs[0][2][1] + 1, "last_kv": kvs[-1][2][-1],
              "tensor_info": tinfo[0][1][1] + 2, "data": data_start, "data+5": data_start + 5}[where]
        del raw[at:]

    return edit


def _swap_offsets(base: Path, raw: bytearray) -> None:
    _, tinfo, _, _ = _gguf_layout(base)
    same = {}
    for t, offs in tinfo:
        same.setdefault((tuple(t.shape.tolist()), t.tensor_type), []).append((t, offs))
    pair = next(v for v in same.values() if len(v) >= 2)
    (_a, ao), (_b, bo) = pair[0], pair[1]
    oa = struct.unpack_from("<Q", raw, ao[5])[0]
    ob = struct.unpack_from("<Q", raw, bo[5])[0]
    _put(raw, ao[5], "<Q", ob)
    _put(raw, bo[5], "<Q", oa)


# numeric keys of a llama.cpp MoE architecture and values that make the model invalid
_GGUF_BAD_VALUES = {
    "block_count": [0, 2**31, 2**32 - 1, -1, 3],
    "embedding_length": [0, 2**31, 63, 2**32 - 1],
    "attention.head_count": [0, 3, 2**31, 2**32 - 1],
    "attention.head_count_kv": [0, 3, 2**31],
    "expert_count": [0, 1, 2**31, 2**32 - 1],
    "expert_used_count": [0, 99, 2**31, 2**32 - 1],
    "context_length": [0, 2**32 - 1],
    "attention.layer_norm_rms_epsilon": [math.nan, math.inf, -math.inf, 0.0, -1.0],
    "rope.freq_base": [math.nan, math.inf, 0.0, -1.0],
    "attention.key_length": [0, 7, 2**31],
    "expert_feed_forward_length": [0, 2**31],
    "feed_forward_length": [0, 2**31],
    "general.alignment": [0, 3, 2**31],
}


def gguf_cases(bases: dict[str, Path]) -> list[Case]:
    """Damaged GGUF files from valid tiny GGUFs (label -> path)."""
    cases: list[Case] = []
    labels = sorted(bases)

    def add(name: str, kind: str, edit, label: str | None = None) -> None:
        for lab in [label] if label else labels[:1]:
            base = bases[lab]
            cases.append(Case(f"{lab}/{name}", kind, lambda work, base=base, edit=edit: _gguf_patch(edit)(base, work)))

    def each(name: str, kind: str, edit) -> None:
        for lab in labels:
            add(name, kind, edit, lab)

    for frac in (0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.99, 0.9999):
        each(f"truncate@{frac}", "invalid", _gguf_truncate(frac))
    for where in ("magic", "counts", "first_kv", "last_kv", "tensor_info", "data", "data+5"):
        each(f"truncate@{where}", "invalid", _gguf_truncate_at(where))
    add("magic", "invalid", lambda b, r: r.__setitem__(slice(0, 4), b"GGUX"))
    for v in (0, 1, 4, 2**32 - 1):
        add(f"version={v}", "invalid", lambda b, r, v=v: _put(r, 4, "<I", v))
    for label, at in (("tensor_count", 8), ("kv_count", 16)):
        for v in (0, 1, 2**31, 2**63, 2**64 - 1):
            each(f"{label}={v}", "invalid", lambda b, r, at=at, v=v: _put(r, at, "<Q", v))
        each(f"{label}+1", "invalid", lambda b, r, at=at: _put(r, at, "<Q", struct.unpack_from("<Q", r, at)[0] + 1))
    # metadata values
    for key, values in _GGUF_BAD_VALUES.items():
        for i, v in enumerate(values):
            if key == "general.alignment":
                add(f"kv.{key}={v}", "invalid", _add_alignment(v), labels[i % len(labels)])
                continue
            add(f"kv.{key}={v}", "invalid", _kv_value("." + key if "." not in key else key, v),
                labels[i % len(labels)])
    # metadata structure: key bytes, key length, value type, string and array lengths
    for suffix in ("general.architecture", "block_count", "tokenizer.ggml.tokens", "layer_norm_rms_epsilon"):
        add(f"kv.{suffix}.key_utf8", "invalid", _kv_key_byte(suffix, 0xFF))
        add(f"kv.{suffix}.key_len=2^63", "invalid", _kv_part(suffix, 0, "<Q", 2**63))
        add(f"kv.{suffix}.key_len=0", "invalid", _kv_part(suffix, 0, "<Q", 0))
        for t in (99, 2**31, 4, 8, 9, 12):
            lab = labels[t % len(labels)]
            if t != _kv_type(bases[lab], suffix):  # a type changed to itself is no change
                add(f"kv.{suffix}.type={t}", "invalid", _kv_part(suffix, 2, "<I", t), lab)
    add("kv.architecture.value_len=2^62", "invalid", _kv_part("general.architecture", 3, "<Q", 2**62))
    add("kv.architecture.value_utf8", "invalid", _arch_value_byte(0xC3))
    add("kv.architecture=llamb", "invalid", _arch_value_byte(ord("b"), last=True))
    add("kv.tokens.array_len=2^62", "invalid", _kv_part("tokenizer.ggml.tokens", 4, "<Q", 2**62))
    add("kv.tokens.array_len=2^40", "invalid", _kv_part("tokenizer.ggml.tokens", 4, "<Q", 2**40))
    add("kv.tokens.array_type=99", "invalid", _kv_part("tokenizer.ggml.tokens", 3, "<I", 99))
    add("kv.tokens.array_type=uint8", "invalid", _kv_part("tokenizer.ggml.tokens", 3, "<I", 0))
    add("kv.tokens.first_len=2^62", "invalid", _kv_part("tokenizer.ggml.tokens", 5, "<Q", 2**62))
    add("kv.tokens.first_utf8", "invalid", _token_byte(0xFF))
    add("kv.merges.array_len=2^40", "invalid", _kv_part("tokenizer.ggml.merges", 4, "<Q", 2**40))
    add("kv.token_type.array_len+1", "invalid", _array_len_plus("tokenizer.ggml.token_type"))
    add("kv.merge_without_space", "invalid", _merge_without_space)
    # tensor descriptors
    for i in (0, 3, 7, -1):
        lab = labels[i % len(labels)]
        add(f"ti[{i}].name_utf8", "invalid", _ti(i, 1, "", lambda t: 0xFF), lab)
        add(f"ti[{i}].name_len=2^63", "invalid", _ti(i, 0, "<Q", 2**63), lab)
        for nd in (0, 5, 2**32 - 1):
            add(f"ti[{i}].n_dims={nd}", "invalid", _ti(i, 2, "<I", nd), lab)
        for label, fn in (("0", lambda t: 0), ("2^31", lambda t: 2**31), ("2^63", lambda t: 2**63),
                          ("x2", lambda t: int(t.shape[0]) * 2), ("-1", lambda t: 2**64 - 1)):
            add(f"ti[{i}].dim0={label}", "invalid", _ti(i, 3, "<Q", fn), lab)
        for ty in (99, 2**31, 1, 8, 26, 24, 30, 2):  # unknown, unknown, F16, Q8_0, I32, I8, BF16, Q4_0
            kind = _relabel_kind(bases[lab], i, ty)
            if kind:
                add(f"ti[{i}].type={ty}", kind, _ti(i, 4, "<I", ty), lab)
        for label, fn in (("+1", lambda t: _toff(t) + 1), ("+32", lambda t: _toff(t) + 32),
                          ("-32", lambda t: _toff(t) - 32), ("2^62", lambda t: 2**62),
                          ("2^64-1", lambda t: 2**64 - 1), ("0", lambda t: 0)):
            j = i or 1  # the first tensor is at offset 0 already
            add(f"ti[{j}].offset{label}", "invalid", _ti(j, 5, "<Q", fn), lab)
    each("ti.offsets_swapped", "data", _swap_offsets)
    # tensor data
    for label, v in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
        each(f"data={label}", "invalid", _data_edit(lambda a, v=v: a.__setitem__(7, v)))
        add(f"norm_data={label}", "invalid", _data_edit(lambda a, v=v: a.__setitem__(0, v), "norm"))
    each("data_low_mantissa", "data", _data_edit(_mantissa_flips))
    # benign: a key nobody reads, trailing bytes after the data
    each("kv.extra_key", "benign", _append_kv)
    # bytes appended after the last tensor: refused too (every writer ends the file at the last tensor)
    add("trailing_zeros", "invalid", lambda b, r: r.extend(b"\0" * 64))
    return cases


def _relabel_kind(base: Path, index: int, new_type: int) -> str | None:
    """A tensor's type changed to new_type: None when that is its type already; "data" when both types take the
    same bytes for its shape (F16 <-> BF16: no header check can tell); "invalid" otherwise."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    _, tinfo, _, _ = _gguf_layout(base)
    t = tinfo[index % len(tinfo)][0]
    if int(t.tensor_type) == new_type:
        return None
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(new_type)]
    except (ValueError, KeyError):
        return "invalid"
    same = int(t.shape[0]) % block == 0 and int(t.n_elements) // block * size == int(t.n_bytes)
    return "data" if same else "invalid"


def _kv_type(base: Path, suffix: str) -> int:
    kvs, _, _, _ = _gguf_layout(base)
    return int(next(f for name, f, _ in kvs if name.endswith(suffix)).types[0])


def _toff(t) -> int:
    return int(t.field.parts[5][0])


def _mantissa_flips(a: np.ndarray) -> None:
    u = a.view(np.uint32)
    u[::7] ^= np.uint32(0x5A)


def _arch_value_byte(byte: int, last: bool = False) -> Callable[[Path, bytearray], None]:
    def edit(base: Path, raw: bytearray) -> None:
        kvs, _, _, _ = _gguf_layout(base)
        _name, f, offs = next(k for k in kvs if k[0] == "general.architecture")
        raw[offs[4] + (int(f.parts[3][0]) - 1 if last else 0)] = byte

    return edit


def _token_byte(byte: int) -> Callable[[Path, bytearray], None]:
    def edit(base: Path, raw: bytearray) -> None:
        kvs, _, _, _ = _gguf_layout(base)
        _name, _f, offs = next(k for k in kvs if k[0] == "tokenizer.ggml.tokens")
        raw[offs[6]] = byte  # parts: klen, key, vtype, itype, alen, len0, str0, ...

    return edit


def _array_len_plus(key: str) -> Callable[[Path, bytearray], None]:
    def edit(base: Path, raw: bytearray) -> None:
        kvs, _, _, _ = _gguf_layout(base)
        _name, f, offs = next(k for k in kvs if k[0] == key)
        _put(raw, offs[4], "<Q", int(f.parts[4][0]) + 1)

    return edit


def _merge_without_space(base: Path, raw: bytearray) -> None:
    kvs, _, _, _ = _gguf_layout(base)
    _name, f, offs = next(k for k in kvs if k[0] == "tokenizer.ggml.merges")
    s = f.parts[6].tobytes()
    raw[offs[6] : offs[6] + len(s)] = s.replace(b" ", b"_")


def _add_alignment(value: int) -> Callable[[Path, bytearray], None]:
    """Insert general.alignment = value (UINT32) as an extra key."""

    def edit(base: Path, raw: bytearray) -> None:
        _insert_kv(base, raw, b"general.alignment", 4, struct.pack("<I", value))

    return edit


def _append_kv(base: Path, raw: bytearray) -> None:
    _insert_kv(base, raw, b"general.comment_by_fuzzer", 8, struct.pack("<Q", 3) + b"abc")


def _insert_kv(base: Path, raw: bytearray, key: bytes, vtype: int, value: bytes) -> None:
    """Insert one key after the last KV and re-pad the header, so the data section keeps its alignment."""
    _kvs, tinfo, data_start, align = _gguf_layout(base)
    at = tinfo[0][1][0]  # the tensor infos follow the last KV
    _last_t, last_offs = tinfo[-1]
    ti_end = last_offs[-1] + 8
    blob = struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + value
    header = bytearray(raw[:at]) + blob + raw[at:ti_end]
    header += b"\0" * ((-len(header)) % align)
    _put(header, 16, "<Q", struct.unpack_from("<Q", raw, 16)[0] + 1)
    raw[:] = header + raw[data_start:]


# --- running ----------------------------------------------------------------------------------------------------------
class _Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Timeout()


def model_logits(path: Path) -> np.ndarray:
    import edgemoe

    with edgemoe.load(path, engine="numpy") as m:
        return m.logits([i % m.spec.vocab for i in IDS])


def run_case(case: Case, work: Path, reference: np.ndarray | None, timeout: int = 30) -> Outcome:
    """Export `case` in-process (bits=32) and classify what happened."""
    from edgemoe_export import export

    from edgemoe.errors import EdgeMoEError

    work.mkdir(parents=True, exist_ok=True)
    src = case.make(work)
    out = work / "out.emoe"
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        try:
            export(src, out, bits=32, show_progress=False)
        finally:
            signal.alarm(0)
    except _Timeout:
        return Outcome("hang", f"no answer in {timeout} s")
    except EdgeMoEError as e:
        msg = str(e)
        left = [p.name for p in work.iterdir() if p.name.startswith("out.emoe")]
        if left:
            return Outcome("leftover", f"{left} after: {msg}")
        if "\n" in msg or not msg:
            return Outcome("internal", f"not one line: {msg!r}")
        return Outcome("refused", msg)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return Outcome("internal", f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        signal.signal(signal.SIGALRM, old)
    if case.kind == "invalid":
        return Outcome("garbage", "an invalid source was exported")
    try:
        logits = model_logits(out)
    except Exception as e:  # noqa: BLE001
        return Outcome("garbage", f"exported, but loading it fails: {type(e).__name__}: {e}")
    if not np.isfinite(logits).all():
        return Outcome("garbage", "exported, logits not finite")
    if case.kind == "benign" and reference is not None and not np.array_equal(logits, reference):
        return Outcome("garbage", f"benign change, logits differ by {np.abs(logits - reference).max():.3g}")
    return Outcome("accepted")


def corpus_counts(cases: list[Case], root: Path, references: dict[str, np.ndarray],
                  timeout: int = 30) -> tuple[Counter, dict[str, Outcome]]:
    """Run every case (each in its own directory under root); reference logits by case-name prefix."""
    counts: Counter = Counter()
    outcomes: dict[str, Outcome] = {}
    for i, case in enumerate(cases):
        work = root / f"case{i:04d}"
        ref = references.get(case.name.split("/", 1)[0])
        o = run_case(case, work, ref, timeout)
        counts[o.status] += 1
        outcomes[case.name] = o
        shutil.rmtree(work, ignore_errors=True)
    return counts, outcomes


# --- random header damage (seeded) -----------------------------------------------------------------------------------
def _flip_bytes(raw: bytearray, lo: int, hi: int, rng: np.random.Generator) -> None:
    """Change 1..3 bytes in raw[lo:hi] (each to a different random value)."""
    for at in rng.integers(lo, hi, size=int(rng.integers(1, 4))):
        raw[int(at)] = (raw[int(at)] + int(rng.integers(1, 256))) % 256


def random_safetensors_cases(bases: dict[str, Path], n: int, seed: int = 0) -> list[Case]:
    """n checkpoints with 1..3 random bytes of a safetensors header (or config.json) changed. Kind "fuzz": the
    change may or may not leave a valid model, so the exporter must refuse it or export finite logits."""
    rng = np.random.default_rng(seed)
    fams = sorted(bases)
    cases = []
    for i in range(n):
        fam = fams[i % len(fams)]
        target = "config.json" if i % 5 == 4 else "model.safetensors"
        case_seed = int(rng.integers(2**31))

        def edit(d: Path, target=target, case_seed=case_seed) -> None:
            r = np.random.default_rng(case_seed)
            f = d / target
            raw = bytearray(f.read_bytes())
            hi = len(raw) if target == "config.json" else 8 + struct.unpack("<Q", raw[:8])[0]
            _flip_bytes(raw, 0 if target == "config.json" else 8, hi, r)
            f.write_bytes(bytes(raw))

        cases.append(_st_case(f"{fam}/random#{i}:{target}", "fuzz", bases[fam], edit))
    return cases


def random_gguf_cases(bases: dict[str, Path], n: int, seed: int = 0) -> list[Case]:
    """n GGUF files with 1..3 random bytes of the header (magic to the end of the tensor descriptors) changed."""
    rng = np.random.default_rng(seed)
    labels = sorted(bases)
    cases = []
    for i in range(n):
        label = labels[i % len(labels)]
        case_seed = int(rng.integers(2**31))

        def edit(base: Path, raw: bytearray, case_seed=case_seed) -> None:
            _, _, data_start, _ = _gguf_layout(base)
            _flip_bytes(raw, 0, data_start, np.random.default_rng(case_seed))

        base = bases[label]
        cases.append(Case(f"{label}/random#{i}", "fuzz",
                          lambda work, base=base, edit=edit: _gguf_patch(edit)(base, work)))
    return cases
