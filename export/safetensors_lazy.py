"""Lazy, memory-mapped safetensors reading (single files and sharded `model.safetensors.index.json` sets).

The `safetensors` library's NumPy backend cannot return bfloat16, the dtype of most real MoE checkpoints, and
materializes whole tensors; this reader maps each file once, validates every header against the file size (a
truncated download is reported, not crashed on), and hands out one tensor at a time as float32.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from edgemoe.errors import FormatError

_NP_DTYPES = {
    "F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise FormatError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise FormatError(f"{path}: not a safetensors file ({e})") from None
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        self._base = 8 + n
        header.pop("__metadata__", None)
        self.entries = header
        for name, e in header.items():
            _start, end = e["data_offsets"]
            if self._base + end > size:
                raise FormatError(
                    f"{path}: truncated: tensor '{name}' ends at byte {self._base + end}, the file has {size} bytes"
                )
            if e["dtype"] not in _NP_DTYPES:
                raise FormatError(f"{path}: tensor '{name}' has unsupported dtype {e['dtype']}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get_f32(self, name: str) -> np.ndarray:
        e = self.entries[name]
        start, end = e["data_offsets"]
        arr = np.frombuffer(self._mm, dtype=_NP_DTYPES[e["dtype"]], count=(end - start) // np.dtype(
            _NP_DTYPES[e["dtype"]]).itemsize, offset=self._base + start)
        if e["dtype"] == "BF16":  # bf16 is the top half of an f32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out = arr.astype(np.float32).reshape(e["shape"])  # always a copy
        del arr
        self._release(self._base + start, end - start)
        return out

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
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise FormatError(f"{index_path}: malformed shard index ({e})") from None
            shard_names = sorted(set(weight_map.values()))
            missing = [s for s in shard_names if not (model_dir / s).exists()]
            if missing:
                raise FormatError(f"{index_path}: shard file(s) missing: {', '.join(missing)}")
            files = [model_dir / s for s in shard_names]
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FormatError(f"{model_dir}: no *.safetensors files found")
        self.files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.entries:
                self._where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise FormatError(f"checkpoint is missing tensor '{name}'")
        return self._where[name].get_f32(name)

    def file_of(self, name: str) -> Path:
        return self._where[name].path
