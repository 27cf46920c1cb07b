"""The edgemoe container (`.emoe`): reader and atomic writer. The byte-level spec is docs/FORMAT.md.

Layout: a 4 KiB preamble, the tensor data (dense part first, then one 4 KiB-aligned region per expert matrix),
and a JSON index at the end. The index is written last so the exporter can stream tensors layer by layer and
record each checksum as it goes; the preamble, which points at the index, is rewritten after everything else and
the file is only renamed into place after an fsync, so an interrupted export never leaves a file that looks valid.

Version 2 adds MWQ expert matrices (dtype "mwq"): bit planes P1 | P2 | ... | PK stored back to back, each with its
own checksum, so reading precision k is one contiguous byte range. A writer stamps version 2 only on files that
contain such a tensor; everything else is still written (and read) as version 1.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from typing_extensions import Self

from . import arch
from .errors import FileReadError, FormatError

if TYPE_CHECKING:
    from .arch import ArchSpec

MAGIC = b"EMOE"
VERSION = 2  # the newest version this code writes (the C reader, native/src/container.c, decides what it reads)
PREAMBLE_SIZE = 4096
PREAMBLE = struct.Struct("<4sIQQI")  # magic, version, index_offset, index_nbytes, index_crc32
DENSE_ALIGN = 64
EXPERT_ALIGN = 4096
PLANE_ALIGN = 64  # each MWQ plane after the first starts 64-byte aligned (zero padding in between)

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
    planes: list[dict] | None = None  # MWQ (container v2): per plane {offset, nbytes, crc32, bits}
    quant: dict | None = None  # MWQ parameters: base_bits, group_size, nesting (and how it was fitted)

    def to_json(self) -> dict:
        d = {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
            "nbytes": self.nbytes, "crc32": self.crc32, "kind": self.kind,
        }
        if self.planes is not None:
            d["planes"] = self.planes
        if self.quant is not None:
            d["quant"] = self.quant
        return d

    @classmethod
    def from_json(cls, d: dict) -> TensorInfo:
        return cls(
            name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]), offset=int(d["offset"]),
            nbytes=int(d["nbytes"]), crc32=int(d["crc32"]), kind=d.get("kind", "dense"), planes=d.get("planes"),
            quant=d.get("quant"),
        )

    @property
    def n_planes(self) -> int:
        return len(self.planes or ())


class ContainerWriter:
    """Streams tensors into `path` atomically: data goes to `path.tmp`, which is renamed into place on `close()`.

    Use as a context manager; on an exception the temporary file is removed and `path` is left untouched.
    """

    def __init__(self, path: str | os.PathLike, spec: ArchSpec, metadata: dict | None = None):
        arch.ArchSpec.from_json(spec.to_json())  # the reader's rules (C arch.c), checked before writing: no file it refuses
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.spec = spec
        self.metadata = dict(metadata or {})
        self.tensors: list[TensorInfo] = []
        self._names: set[str] = set()
        self._f = open(self.tmp_path, "wb")  # noqa: SIM115 - held across add() calls; closed by close()/abort()
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

    def add_planes(self, name: str, planes: list[np.ndarray], shape: tuple[int, int], kind: str = "expert",
                   quant: dict | None = None) -> TensorInfo:
        """Append one MWQ matrix as P1 | P2 | ... | PK (dtype "mwq"): the region starts 4 KiB aligned (experts),
        later planes 64-byte aligned, each plane checked against the size `shape` and `quant` imply.

        quant: {"base_bits", "group_size", "nesting", ...}; extra keys are stored as given.
        """
        from .mwq import plane_bits, plane_nbytes

        if name in self._names:
            raise ValueError(f"duplicate tensor {name}")
        quant = dict(quant or {})
        missing = {"base_bits", "group_size", "nesting"} - set(quant)
        if missing:
            raise ValueError(f"{name}: quant parameters {sorted(missing)} missing")
        if not planes:
            raise ValueError(f"{name}: no planes")
        out, in_ = (int(s) for s in shape)
        self._align(EXPERT_ALIGN if kind == "expert" else DENSE_ALIGN)
        raws = [np.ascontiguousarray(p).view(np.uint8).reshape(-1) for p in planes]
        for i, raw in enumerate(raws, start=1):
            want = plane_nbytes(i, out, in_, quant["base_bits"], quant["group_size"])
            if raw.nbytes != want:
                raise ValueError(f"{name}: plane {i} has {raw.nbytes} bytes, expected {want}")
        start = self._pos
        entries = []
        span_crc = 0  # the tensor-level checksum covers the whole span, padding included
        for i, raw in enumerate(raws, start=1):
            if i > 1:
                pad = (-self._pos) % PLANE_ALIGN
                span_crc = zlib.crc32(b"\0" * pad, span_crc)
                self._align(PLANE_ALIGN)
            crc = zlib.crc32(raw)
            span_crc = zlib.crc32(raw, span_crc)
            entries.append({"offset": self._pos, "nbytes": raw.nbytes, "crc32": crc,
                            "bits": plane_bits(i, quant["base_bits"])})
            self._f.write(memoryview(raw))
            self._pos += raw.nbytes
        info = TensorInfo(name, "mwq", (out, in_), start, self._pos - start, span_crc, kind, entries, quant)
        self.tensors.append(info)
        self._names.add(name)
        return info

    def close(self) -> Path:
        index = {
            "format": "edgemoe",
            "version": self.version,
            "arch": self.spec.to_json(),
            "metadata": self.metadata,
            "tensors": [t.to_json() for t in self.tensors],
        }
        self._align(DENSE_ALIGN)
        blob = json.dumps(index, sort_keys=True).encode()
        index_offset = self._pos
        self._f.write(blob)
        self._f.seek(0)
        self._f.write(PREAMBLE.pack(MAGIC, self.version, index_offset, len(blob), zlib.crc32(blob)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    @property
    def version(self) -> int:
        """2 when the file holds MWQ planes, else 1 (readers of version 1 can still open it)."""
        return 2 if any(t.planes for t in self.tensors) else 1

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
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
    version: int = 1
    _verified_planes: set = field(default_factory=set, repr=False)  # (name, plane index) whose CRC was checked

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of one tensor as a uint8 view into the mapping (no copy)."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def array(self, name: str) -> np.ndarray:
        """The stored elements with their logical shape (f32/f16 views; q8_0 stays raw blocks)."""
        t = self.tensors[name]
        if t.dtype == "mwq":
            return self.raw(name)  # planes P1..PK; read them with planes()
        np_dtype, _, block = DTYPES[t.dtype]
        arr = self.raw(name).view(np_dtype)
        return arr.reshape(t.shape) if block == 1 else arr

    def planes(self, name: str, k: int | None = None) -> list[np.ndarray]:
        """Views of the first k planes (default: all) of an MWQ tensor. Each plane's CRC-32 is checked the first
        time it is read; a mismatch raises FormatError naming the tensor and the plane."""
        t = self.tensors.get(name)
        if t is None:
            raise FormatError(f"{self.path}: no tensor '{name}'")
        if not t.planes:
            raise FormatError(f"{self.path}: tensor '{name}' ({t.dtype}) has no bit planes")
        k = t.n_planes if k is None else int(k)
        if not 1 <= k <= t.n_planes:
            raise FormatError(f"{self.path}: tensor '{name}' has {t.n_planes} planes, cannot read {k}")
        views = []
        for i, p in enumerate(t.planes[:k], start=1):
            view = np.frombuffer(self._mm, dtype=np.uint8, count=p["nbytes"], offset=p["offset"])
            if (name, i) not in self._verified_planes:
                if zlib.crc32(view) != p["crc32"]:
                    raise FormatError(f"{self.path}: checksum mismatch in plane {i} of {t.n_planes} of tensor "
                                      f"'{name}' (the file is corrupt; re-export it)")
                self._verified_planes.add((name, i))
            views.append(view)
        return views

    def verify(self, name: str) -> None:
        t = self.tensors[name]
        if t.planes:
            self.planes(name)  # per-plane checksums first: they say which plane is damaged
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
    """Map a container and give its metadata view. The C core's reader checks the file first (preamble, index checksum,
    strict JSON, every tensor entry, every arch field; with `verify` every tensor's CRC-32): Python trusts no field
    before it has accepted the file, so a file means the same to both. A refusal raises the errors.py class of its
    kind (FileReadError, NotAContainerError, CorruptFileError, InvalidFileError); a missing C core raises an
    EdgeMoEError that says how to build it."""
    from . import _native as N  # NativeLibraryNotFound is an EdgeMoEError naming how to build the core

    path = Path(path)
    try:  # opened first so the file C checks is the one mapped; O_NONBLOCK: a FIFO is refused by C, not waited on
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        fd = None  # the C reader names the problem (no such file, a directory, permission) with its kind
    try:
        N.container_close(N.container_open(path, verify=verify))
        if fd is None:  # C could open it a moment ago
            raise FileReadError(f"{path}: cannot be opened for reading")
        mine, now = os.fstat(fd), os.stat(path)
        if (mine.st_dev, mine.st_ino, mine.st_size, mine.st_mtime_ns) != (now.st_dev, now.st_ino, now.st_size,
                                                                           now.st_mtime_ns):
            raise FormatError(f"{path}: the file changed while it was being opened; open it again")
        _, version, index_offset, index_nbytes, index_crc = PREAMBLE.unpack(os.pread(fd, PREAMBLE.size, 0))
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        if fd is not None:
            os.close(fd)
    blob = mm[index_offset : index_offset + index_nbytes]
    if zlib.crc32(blob) != index_crc:  # the same bytes C accepted (in place changes since then are caught here)
        mm.close()
        raise FormatError(f"{path}: the file changed while it was being opened; open it again")
    index = json.loads(blob)
    tensors = {d["name"]: TensorInfo.from_json(d) for d in index["tensors"]}
    c = Container(path, arch.ArchSpec.from_json(index["arch"]), index.get("metadata", {}), tensors, mm, version)
    if verify:  # C checked every plane's checksum: Container.planes need not again
        c._verified_planes.update((t.name, i) for t in tensors.values() for i in range(1, t.n_planes + 1))
    return c
