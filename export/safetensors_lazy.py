"""Lazy, memory-mapped safetensors reading (single files and sharded `model.safetensors.index.json` sets).

The `safetensors` library's NumPy backend cannot return bfloat16, the dtype of most real MoE checkpoints, and
materializes whole tensors; this reader maps each file once and hands out one tensor at a time as float32.

Nothing in a header is trusted before it is checked: strict JSON (no duplicate keys, no NaN), every entry's dtype,
shape (non-negative integers) and data_offsets (an ordered pair), shape x dtype size == the bytes the offsets hold,
and the data section indexed entirely without holes or overlaps, as the format requires (a truncated download, a
dtype or shape changed in the header, two tensors sharing bytes are each refused by name). A weight must be floating
point (F32 data relabelled I32 has the right size, but is not a weight) and finite.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from edgemoe.errors import FormatError

from .json_input import parse_json, read_json

_NP_DTYPES = {
    "F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # what a weight may be stored as
MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


def _check_entry(path: Path, name: str, e, size: int) -> dict:
    """One header entry, every field checked: {"dtype", "shape", "data_offsets"} with the types and sizes the format
    defines. Returns the entry with plain Python values."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(e, dict):
        raise FormatError(f"{where}: header entry is a {type(e).__name__}, expected an object with dtype, shape and "
                          "data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in e:
            raise FormatError(f"{where}: header entry has no '{key}'")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _NP_DTYPES:
        raise FormatError(f"{where}: unsupported dtype {dtype!r} (edgemoe reads {', '.join(_NP_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise FormatError(f"{where}: data_offsets {offsets!r} is not a pair [begin, end] of integers with "
                          "0 <= begin <= end")
    n = 1
    for d in shape:
        n *= d
    nbytes = n * np.dtype(_NP_DTYPES[dtype]).itemsize
    if nbytes != offsets[1] - offsets[0]:
        raise FormatError(f"{where}: shape {shape} of {dtype} is {nbytes} bytes, but data_offsets {offsets} hold "
                          f"{offsets[1] - offsets[0]} (the header is corrupt)")
    if offsets[1] > size:
        raise FormatError(f"{where}: truncated: data ends at byte {offsets[1]} of the data section, which has {size} "
                          "bytes")
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _check_layout(path: Path, entries: dict[str, dict], size: int) -> None:
    """The format requires the data section to be indexed entirely, without holes or overlaps: sorted by begin,
    each tensor starts where the previous one ends and the last ends at the end of the file."""
    pos, prev = 0, None
    for name, e in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = e["data_offsets"]
        if begin != pos:
            what = "overlaps" if begin < pos else f"leaves a hole of {begin - pos} bytes after"
            raise FormatError(f"{path}: tensor '{name}' (data_offsets {e['data_offsets']}) {what} "
                              f"{repr(prev) if prev else 'the start of the data section'}; the header is corrupt")
        pos, prev = end, name
    if pos != size:
        raise FormatError(f"{path}: the tensors end at byte {pos} of the data section, but it has {size} bytes "
                          "(truncated, or the header is corrupt)")


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            raise FormatError(f"{path}: is a directory, expected a .safetensors file")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise FormatError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
            if n > MAX_HEADER:
                raise FormatError(f"{path}: safetensors header of {n} bytes (at most {MAX_HEADER}); not a valid file")
            header = parse_json(f.read(n), f"{path} (safetensors header)")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        self._base = 8 + n
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{path}: __metadata__ must be an object of strings, got {meta!r:.80}")
        self.entries = {name: _check_entry(path, name, e, size - self._base) for name, e in header.items()}
        _check_layout(path, self.entries, size - self._base)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def get_f32(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor as float32 (a copy), or with `index` only its slice [index] along the first dimension (a
        layer's stacked experts are read one expert at a time: the whole [E, ...] tensor in float32 is GBs)."""
        e = self.entries[name]
        if e["dtype"] not in FLOAT_DTYPES:
            raise FormatError(f"{self.path}: tensor '{name}' is stored as {e['dtype']}; weights must be floating point "
                              f"({', '.join(FLOAT_DTYPES)})")
        start, end = e["data_offsets"]
        if index is not None:
            n = e["shape"][0]
            if not 0 <= index < n:
                raise IndexError(f"{self.path}: tensor '{name}' has {n} slices, asked for {index}")
            step = (end - start) // n
            start, end = start + index * step, start + (index + 1) * step
            e = {**e, "shape": e["shape"][1:]}
        arr = np.frombuffer(self._mm, dtype=_NP_DTYPES[e["dtype"]], count=(end - start) // np.dtype(
            _NP_DTYPES[e["dtype"]]).itemsize, offset=self._base + start)
        if e["dtype"] == "BF16":  # bf16 is the top half of an f32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out = arr.astype(np.float32).reshape(e["shape"])  # always a copy
        del arr
        self._release(self._base + start, end - start)
        if not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out.reshape(-1)))[0])
            raise FormatError(f"{self.path}: tensor '{name}' holds NaN or infinite values (first at flat index {bad}); "
                              "the checkpoint is damaged")
        return out

    def get_u8(self, name: str) -> np.ndarray:
        """A U8 tensor (MXFP4 blocks and scales) as stored, copied out."""
        e = self.entries[name]
        if e["dtype"] != "U8":
            raise FormatError(f"{self.path}: tensor '{name}' is stored as {e['dtype']}; expected U8 (MXFP4 blocks / "
                              "scales)")
        start, end = e["data_offsets"]
        out = np.frombuffer(self._mm, dtype=np.uint8, count=end - start, offset=self._base + start).copy()
        self._release(self._base + start, end - start)
        return out.reshape(e["shape"])

    def _release(self, offset: int, length: int) -> None:
        """Drop the mapped pages of a tensor already copied out, so reading a checkpoint layer by layer keeps the
        process's resident memory at one layer rather than letting the whole file accumulate in RSS."""
        page = mmap.PAGESIZE
        lo = (offset + page - 1) // page * page
        hi = (offset + length) // page * page
        if hi > lo and hasattr(self._mm, "madvise"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass


class SafetensorsSet:
    """All tensors of a checkpoint directory, by name, across shards."""

    def __init__(self, model_dir: Path):
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FormatError(f"{index_path}: 'weight_map' must be an object of tensor name -> shard file name, "
                                  f"got {type(weight_map).__name__}")
            bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
            if bad is not None:
                raise FormatError(f"{index_path}: weight_map['{bad}'] = {weight_map[bad]!r:.40}: expected a shard file "
                                  "name")
            shard_names = sorted(set(weight_map.values()))
            escaping = [s for s in shard_names if Path(s).name != s]
            if escaping:
                raise FormatError(f"{index_path}: shard '{escaping[0]}' is not a file name in {model_dir}; an index "
                                  "names shards beside it")
            missing = [s for s in shard_names if not (model_dir / s).exists()]
            if missing:
                raise FormatError(f"{index_path}: shard file(s) missing: {', '.join(missing)}")
            files = [model_dir / s for s in shard_names]
        else:
            weight_map = None
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FormatError(f"{model_dir}: no *.safetensors files found")
        self.files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        self._real: dict[str, str] = {}  # read_under's aliases -> the stored names
        for f in self.files:
            for name in f.entries:
                if name in self._where:
                    raise FormatError(f"{model_dir}: tensor '{name}' is in both {self._where[name].path.name} and "
                                      f"{f.path.name}; which one is the model's? (remove the stray file)")
                self._where[name] = f
        if weight_map is not None:
            wrong = [n for n, shard in weight_map.items() if n not in self._where or self._where[n].path.name != shard]
            if wrong:
                n = wrong[0]
                found = f"it is in {self._where[n].path.name}" if n in self._where else "that shard has no such tensor"
                raise FormatError(f"{index_path}: weight_map puts tensor '{n}' in {weight_map[n]}, but {found}")

    def read_under(self, prefix: str, as_prefix: str) -> int:
        """Answer for the tensors named prefix + X also as as_prefix + X (a multimodal checkpoint's text model read
        with the text-only names); how many there are. Real names stay in messages (real_name)."""
        n = 0
        for name in list(self._where):
            if name.startswith(prefix):
                alias = as_prefix + name[len(prefix):]
                self._where[alias], self._real[alias] = self._where[name], name
                n += 1
        return n

    def real_name(self, name: str) -> str:
        return self._real.get(name, name)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(self.real_name(name))

    def get(self, name: str, index: int | None = None) -> np.ndarray:
        """float32 copy of a tensor, or of its slice [index] along the first dimension."""
        if name not in self._where:
            raise FormatError(f"checkpoint is missing tensor '{name}'")
        return self._where[name].get_f32(self.real_name(name), index)

    def get_u8(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise FormatError(f"checkpoint is missing tensor '{name}'")
        return self._where[name].get_u8(self.real_name(name))

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(self.real_name(name))
