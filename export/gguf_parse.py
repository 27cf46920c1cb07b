"""A GGUF file's header, parsed with every count, length, type and offset checked against the file before use.

gguf-py's GGUFReader trusts the header: a length past the end of the file is silently truncated, an array of 2^40
one-byte elements loops 2^40 times, a non-UTF-8 key raises UnicodeDecodeError. This parser reads the same format
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, versions 2 and 3) and refuses, by name, anything the
file cannot hold:
- every count (keys, tensors, array elements) is bounded by the bytes left, every string length too, and strings
  must be UTF-8; value types must be known (arrays of arrays are refused, as llama.cpp does);
- every tensor descriptor: 1..4 dimensions, a known ggml type whose block divides the row, an offset aligned to
  general.alignment (a power of two), data inside the file, and the data section tiled the way every GGUF writer
  lays it out (each tensor where the previous one ends, padded to the alignment): a type or shape changed in the
  header leaves a hole or an overlap, and is refused rather than read as other bytes.
The result (`GGUFFile`) holds the metadata as plain Python values (with their GGUF types) and the tensors as
memory-mapped NumPy views in gguf-py's layout, for `gguf.quants.dequantize`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.errors import FormatError

# GGUF value types (gguf.md): code -> (name, struct format or None for string/array)
VALUE_TYPES = {0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
               5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"), 8: ("STRING", None), 9: ("ARRAY", None),
               10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d")}
INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
FLOAT_TYPES = (6, 12)
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16


@dataclass
class GGUFTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: np.ndarray  # ggml order (ne0 first), as gguf-py's ReaderTensor.shape
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute byte offset in the file
    data: np.ndarray  # gguf-py's layout: F32/F16 arrays in NumPy order, quantized types as bytes per row


@dataclass
class GGUFFile:
    path: Path
    version: int
    fields: dict[str, object] = field(default_factory=dict)  # key -> value (int, float, bool, str or list)
    types: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key -> (type,) or (ARRAY, element type)
    tensors: list[GGUFTensor] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT


class _Cursor:
    """Reads little-endian values from a byte buffer, refusing any read past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what} (at byte {self.pos} of {self.size}); not a valid GGUF file")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt: {what} needs {n} bytes, {self.size - self.pos} are left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 (byte {e.start} of {raw[:40]!r})") from None
        self.pos += n
        return s

    def count(self, n: int, min_bytes: int, what: str) -> int:
        """A count of items each at least min_bytes long: bounded by the bytes left."""
        if n * min_bytes > self.size - self.pos:
            raise self.fail(f"{what} = {n}, but {self.size - self.pos} bytes cannot hold that many")
        return n


def _value(c: _Cursor, vtype: int, key: str):
    if vtype not in VALUE_TYPES:
        raise c.fail(f"metadata '{key}' has unknown value type {vtype}")
    fmt = VALUE_TYPES[vtype][1]
    if vtype == STRING:
        return c.string(f"the value of '{key}'"), (STRING,)
    if vtype == ARRAY:
        etype = c.unpack("<I", f"the element type of '{key}'")
        if etype not in VALUE_TYPES or etype == ARRAY:
            raise c.fail(f"metadata '{key}' is an array of {'arrays' if etype == ARRAY else f'unknown type {etype}'}")
        n = c.unpack("<Q", f"the length of '{key}'")
        efmt = VALUE_TYPES[etype][1]
        if etype == STRING:
            c.count(n, 8, f"the length of '{key}'")
            return [c.string(f"element {i} of '{key}'") for i in range(n)], (ARRAY, STRING)
        size = struct.calcsize(efmt)
        c.count(n, size, f"the length of '{key}'")
        arr = np.frombuffer(c.buf, dtype=np.dtype(efmt), count=n, offset=c.pos)
        c.pos += n * size
        return arr.tolist(), (ARRAY, etype)
    return c.unpack(fmt, f"the value of '{key}'"), (vtype,)


def parse_gguf(path: Path) -> GGUFFile:
    """Parse and check the header of the GGUF file at `path`, and map its tensors (see the module docstring)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    size = path.stat().st_size
    if size < 24:
        raise FormatError(f"{path}: {size} bytes, too short for a GGUF header; not a valid GGUF file")
    data = np.memmap(path, mode="r")
    c = _Cursor(data, path)
    if bytes(data[:4]) != b"GGUF":
        raise FormatError(f"{path}: does not start with the GGUF magic; not a GGUF file")
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version}; edgemoe reads versions 2 and 3")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the metadata count")
    c.count(n_kv, 8 + 4 + 1, "the metadata count")  # key length, type, one-byte value
    c.count(n_tensors, 8 + 4 + 8 + 4 + 8, "the tensor count")  # name length, n_dims, one dim, type, offset
    g = GGUFFile(path, version)
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        if key in g.fields:
            raise c.fail(f"metadata key '{key}' appears twice")
        vtype = c.unpack("<I", f"the type of '{key}'")
        g.fields[key], g.types[key] = _value(c, vtype, key)
    if "general.alignment" in g.fields:
        a = g.fields["general.alignment"]
        if g.types["general.alignment"] != (4,) or not 0 < a <= MAX_ALIGNMENT or a & (a - 1):
            raise FormatError(f"{path}: general.alignment = {a!r} (type {g.types['general.alignment']}): expected a "
                              f"UINT32 power of two up to {MAX_ALIGNMENT}")
        g.alignment = a
    infos = []
    names = set()
    for i in range(n_tensors):
        name = c.string(f"the name of tensor #{i}")
        if name in names:
            raise c.fail(f"tensor '{name}' appears twice")
        names.add(name)
        n_dims = c.unpack("<I", f"the dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor '{name}' has {n_dims} dimensions (expected 1..{MAX_DIMS})")
        dims = [c.unpack("<Q", f"the dimensions of tensor '{name}'") for _ in range(n_dims)]
        raw_type = c.unpack("<I", f"the type of tensor '{name}'")
        offset = c.unpack("<Q", f"the offset of tensor '{name}'")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise c.fail(f"tensor '{name}' has unknown ggml type {raw_type}") from None
        n = 1
        for d in dims:
            n *= d
        if n == 0 or dims[0] % block:
            raise c.fail(f"tensor '{name}' has dimensions {dims}: {'empty' if n == 0 else ''}"
                         f"{f'rows of {dims[0]} values are not whole {qtype.name} blocks of {block}' if n else ''}")
        infos.append((name, qtype, dims, n, n // block * type_size, offset))
    start = c.pos + (-c.pos) % g.alignment  # the data section starts at the next multiple of the alignment
    _check_tiling(path, infos, start, size, g.alignment)
    for name, qtype, dims, n, nbytes, offset in infos:
        np_dims = tuple(reversed(dims))
        if qtype == GGMLQuantizationType.F32:
            dtype, shape, count = np.float32, np_dims, n
        elif qtype == GGMLQuantizationType.F16:
            dtype, shape, count = np.float16, np_dims, n
        else:  # gguf-py's layout for every other type: the bytes of each row
            dtype, shape, count = np.uint8, quant_shape_to_byte_shape(np_dims, qtype), nbytes
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=start + offset).reshape(shape)
        g.tensors.append(GGUFTensor(name, qtype, np.array(dims, dtype=np.uint64), n, nbytes, start + offset, arr))
    return g


def _check_tiling(path: Path, infos: list, start: int, size: int, alignment: int) -> None:
    """Tensors sorted by offset: each starts exactly at the previous end padded to the alignment (the first at 0),
    the last ends inside the file, and nothing but that padding follows it."""
    pos, prev, end = 0, None, 0
    for name, qtype, dims, _n, nbytes, offset in sorted(infos, key=lambda t: t[5]):
        if offset != pos:
            if prev is None:
                raise FormatError(f"{path}: the first tensor '{name}' starts at data offset {offset}, not 0; its "
                                  "offset in the header is wrong")
            gap = "overlap" if offset < pos else f"leave {offset - pos} unused bytes between them"
            raise FormatError(f"{path}: tensors {prev} and '{name}' (at data offset {offset}) {gap}; a type, shape "
                              "or offset in the header is wrong")
        end = offset + nbytes
        if start + end > size:
            raise FormatError(f"{path}: tensor '{name}' ends at byte {start + end}, but the file has {size} bytes "
                              "(truncated?)")
        pos = end + (-end) % alignment
        prev = f"'{name}' ({qtype.name} {dims}: {nbytes} bytes at data offset {offset})"
    if size not in (start + end, start + pos):  # writers pad the last tensor to the alignment, or not at all
        raise FormatError(f"{path}: {size - start - end} bytes follow the last tensor {prev}; its type or shape in "
                          "the header is wrong, or the file has data appended")
