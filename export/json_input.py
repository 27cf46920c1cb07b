"""JSON from a source the exporter does not trust (config.json, the safetensors header, an index, tokenizer files).

`json.loads` alone turns hostile input into the wrong exceptions: RecursionError on deep nesting (its C scanner
checks the recursion limit, so this is an exception, never a crash), UnicodeDecodeError
on bad bytes, silently the last value of a duplicated key, and NaN / Infinity, which are not JSON. Here every one of
those is a FormatError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgemoe.errors import FormatError


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def parse_json(data: bytes, where: str, expect: type | None = dict):
    """Parse `data` (bytes of UTF-8 JSON) strictly; `expect` the type of the top-level value (None: any)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: not UTF-8 text (byte {e.start}); expected a JSON file") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply; not a valid file") from None
    except ValueError as e:
        raise FormatError(f"{where}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        raise FormatError(f"{where}: expected a JSON {'object' if expect is dict else expect.__name__}, got "
                          f"{type(value).__name__}")
    return value


def read_json(path: Path, expect: type | None = dict):
    """Read and parse a JSON file (see parse_json); a directory or an unreadable file is a FormatError."""
    if path.is_dir():
        raise FormatError(f"{path}: is a directory, expected a JSON file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_json(data, str(path), expect)
