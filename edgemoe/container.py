"""The edgemoe container (`.emoe`): reader and atomic writer. The byte-level spec is docs/FORMAT.md.

Layout: a 4 KiB preamble, the tensor data (dense part first, then one 4 KiB-aligned region per expert matrix),
and a JSON index at the end. The index is written last so the exporter can stream tensors layer by layer and
record each checksum as it goes; the preamble, which points at the index, is rewritten after everything else and
the file is only renamed into place after an fsync, so an interrupted export never leaves a file that looks valid.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arch import ArchSpec
from .errors import FormatError

MAGIC = b"EMOE"
VERSION = 1
PREAMBLE_SIZE = 4096
PREAMBLE = struct.Struct("<4sIQQI")  # magic, version, index_offset, index_nbytes, index_crc32
DENSE_ALIGN = 64
EXPERT_ALIGN = 4096

# dtype name -> (numpy dtype of the stored elements, bytes per block, weights per block)
DTYPES = {
    "f32": (np.float32, 4, 1),
    "f16": (np.float16, 2, 1),
    "q8_0": (np.uint8, 34, 32),  # ggml Q8_0: f16 scale + 32 int8 codes per block of 32 along the input dim
    "bytes": (np.uint8, 1, 1),
}


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    _, block_bytes, block_weights = DTYPES[dtype]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n % block_weights:
        raise ValueError(f"{dtype} needs a multiple of {block_weights} elements, got shape {shape}")
    return n // block_weights * block_bytes


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset
    nbytes: int
    crc32: int
    kind: str = "dense"  # dense | expert | blob
    planes: list[dict] | None = None  # reserved for MWQ (container v2): per-plane offset/nbytes/crc32

    def to_json(self) -> dict:
        d = {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
            "nbytes": self.nbytes, "crc32": self.crc32, "kind": self.kind,
        }
        if self.planes is not None:
            d["planes"] = self.planes
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TensorInfo":
        return cls(
            name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]), offset=int(d["offset"]),
            nbytes=int(d["nbytes"]), crc32=int(d["crc32"]), kind=d.get("kind", "dense"), planes=d.get("planes"),
        )


class ContainerWriter:
    """Streams tensors into `path` atomically: data goes to `path.tmp`, which is renamed into place on `close()`.

    Use as a context manager; on an exception the temporary file is removed and `path` is left untouched.
    """

    def __init__(self, path: str | os.PathLike, spec: ArchSpec, metadata: dict | None = None):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.spec = spec
        self.metadata = dict(metadata or {})
        self.tensors: list[TensorInfo] = []
        self._names: set[str] = set()
        self._f = open(self.tmp_path, "wb")
        self._f.write(b"\0" * PREAMBLE_SIZE)
        self._pos = PREAMBLE_SIZE

    def _align(self, alignment: int) -> None:
        pad = (-self._pos) % alignment
        if pad:
            self._f.write(b"\0" * pad)
            self._pos += pad

    def add_tensor(self, name: str, data: np.ndarray, dtype: str, shape: tuple[int, ...] | None = None,
                   kind: str = "dense") -> TensorInfo:
        """Append one tensor. `data` holds the stored elements (already converted/quantized to `dtype`)."""
        if name in self._names:
            raise ValueError(f"duplicate tensor {name}")
        shape = tuple(int(s) for s in (data.shape if shape is None else shape))
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        expected = tensor_nbytes(dtype, shape)
        if raw.nbytes != expected:
            raise ValueError(f"{name}: {raw.nbytes} bytes for {dtype}{list(shape)}, expected {expected}")
        self._align(EXPERT_ALIGN if kind == "expert" else DENSE_ALIGN)
        info = TensorInfo(name, dtype, shape, self._pos, raw.nbytes, zlib.crc32(raw), kind)
        self._f.write(raw.tobytes() if not raw.flags.c_contiguous else memoryview(raw))
        self._pos += raw.nbytes
        self.tensors.append(info)
        self._names.add(name)
        return info

    def close(self) -> Path:
        index = {
            "format": "edgemoe",
            "version": VERSION,
            "arch": self.spec.to_json(),
            "metadata": self.metadata,
            "tensors": [t.to_json() for t in self.tensors],
        }
        self._align(DENSE_ALIGN)
        blob = json.dumps(index, sort_keys=True).encode()
        index_offset = self._pos
        self._f.write(blob)
        self._f.seek(0)
        self._f.write(PREAMBLE.pack(MAGIC, VERSION, index_offset, len(blob), zlib.crc32(blob)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class Container:
    """A memory-mapped container: the architecture, metadata and zero-copy views of every tensor."""

    path: Path
    spec: ArchSpec
    metadata: dict
    tensors: dict[str, TensorInfo]
    _mm: mmap.mmap = field(repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of one tensor as a uint8 view into the mapping (no copy)."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def array(self, name: str) -> np.ndarray:
        """The stored elements with their logical shape (f32/f16 views; q8_0 stays raw blocks)."""
        t = self.tensors[name]
        np_dtype, _, block = DTYPES[t.dtype]
        arr = self.raw(name).view(np_dtype)
        return arr.reshape(t.shape) if block == 1 else arr

    def verify(self, name: str) -> None:
        t = self.tensors[name]
        if zlib.crc32(self.raw(name)) != t.crc32:
            raise FormatError(f"{self.path}: checksum mismatch in tensor '{name}' (the file is corrupt; re-export it)")

    def verify_all(self) -> None:
        for name in self.tensors:
            self.verify(name)

    def blob(self, name: str) -> bytes:
        return self.raw(name).tobytes()

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass  # numpy views still alive; the mapping is released when they are


def open_container(path: str | os.PathLike, verify: bool = True) -> Container:
    """Map a container and check its structure (and, with `verify`, every tensor's CRC-32)."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        raise FormatError(f"{path}: is a directory, expected an .emoe container file")
    size = path.stat().st_size
    if size < PREAMBLE_SIZE:
        raise FormatError(f"{path}: truncated ({size} bytes; a container is at least {PREAMBLE_SIZE})")
    with open(path, "rb") as f:
        magic, version, index_offset, index_nbytes, index_crc = PREAMBLE.unpack(f.read(PREAMBLE.size))
        if magic != MAGIC:
            raise FormatError(f"{path}: not an edgemoe container (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise FormatError(f"{path}: container version {version}, this edgemoe reads version {VERSION}")
        if index_offset + index_nbytes > size:
            raise FormatError(f"{path}: truncated (index ends at byte {index_offset + index_nbytes}, file has {size})")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    blob = mm[index_offset : index_offset + index_nbytes]
    if zlib.crc32(blob) != index_crc:
        mm.close()
        raise FormatError(f"{path}: checksum mismatch in the tensor index (the file is corrupt; re-export it)")
    index = json.loads(blob)
    tensors = {}
    for d in index["tensors"]:
        t = TensorInfo.from_json(d)
        if t.offset + t.nbytes > index_offset:
            mm.close()
            raise FormatError(f"{path}: tensor '{t.name}' lies outside the data region")
        tensors[t.name] = t
    c = Container(path, ArchSpec.from_json(index["arch"]), index.get("metadata", {}), tensors, mm)
    if verify:
        try:
            c.verify_all()
        except FormatError:
            c.close()
            raise
    return c
