"""docs/FORMAT.md's table of arch keys, generated from the C core's table (native/src/arch_fields.h, exported by
emoe_arch_schema_json): `python -m edgemoe.arch_doc` rewrites it between its marker comments, `--check` only says
whether it is up to date (tests/test_arch_schema.py runs that check)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arch import schema

BEGIN = "<!-- arch keys: generated from native/src/arch_fields.h by `python -m edgemoe.arch_doc`; edit there -->"
END = "<!-- end of the generated arch keys -->"
FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"
INT32_MAX = 2**31 - 1


def _number(v: float) -> str:
    if isinstance(v, int):
        return "2^31-1" if v == INT32_MAX else str(v)
    return f"{v:g}"


def _type(e: dict) -> str:
    return {"int": "int", "float": "number", "bool": "bool", "string": "string", "list": "int list",
            "map": "list of int lists", "enum": " / ".join(f"`{n}`" for n in e.get("names", ())),
            "id": "int or null" if "None" in e["type"] else "int"}[e["kind"]]


def _default(e: dict) -> str:
    if e["required"]:
        return "required"
    v = e["default"]
    if e["kind"] in ("list", "map"):
        return "`[]`"
    if e["kind"] == "enum":
        return f"`{v}`"
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    return _number(v)


def _rule(e: dict) -> str:
    kind = e["kind"]
    if kind in ("int", "id"):
        rng = f"{_number(e['lo'])}..{_number(e['hi'])}"
    elif kind == "float":
        rng = f"{'0, or ' if e['zero_ok'] else ''}> 0 (also as an f32) and at most {_number(e['hi'])}"
    elif kind == "string":
        rng = f"at most {e['max_bytes']} bytes"
    elif kind == "list":
        rng = "layer numbers in 0..`n_layers`-1, none twice"
    else:
        rng = ""
    return "; ".join(part for part in (rng, e["doc"]) if part)


def render_table() -> str:
    """The Markdown table of every arch key, in the core's order, between the markers."""
    rows = [BEGIN, "| key | type | required / default | rule |", "|---|---|---|---|"]
    for e in schema():
        cells = (f"`{e['name']}`", _type(e), _default(e), _rule(e))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join([*rows, END])


def updated(text: str, path: Path | str = FORMAT_MD) -> str:
    """`text` (FORMAT.md) with the generated table in place of the one between the markers."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: the arch table's markers are missing (expected the lines {BEGIN!r} and {END!r})")
    return text[:start] + render_table() + text[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgemoe.arch_doc", description=__doc__)
    ap.add_argument("path", nargs="?", type=Path, default=FORMAT_MD, help="the FORMAT.md to update (default: the "
                    "checkout's docs/FORMAT.md)")
    ap.add_argument("--check", action="store_true", help="only check: exit 1 if the table is out of date")
    args = ap.parse_args(argv)
    try:
        text = args.path.read_text()
        new = updated(text, args.path)
    except (OSError, ValueError) as e:
        print(f"arch_doc: error: {e}", file=sys.stderr)
        return 1
    if new == text:
        print(f"{args.path}: the arch table is up to date")
        return 0
    if args.check:
        print(f"{args.path}: the arch table is out of date: run python -m edgemoe.arch_doc", file=sys.stderr)
        return 1
    args.path.write_text(new)
    print(f"{args.path}: arch table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
