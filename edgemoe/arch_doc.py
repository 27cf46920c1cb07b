"""docs/FORMAT.md's generated tables: the arch keys (the C core's native/src/arch_fields.h, exported by
emoe_arch_schema_json) and the tensor names (native/src/tensor_table.c, exported by emoe_tensor_table_json).
`python -m edgemoe.arch_doc` rewrites each between its marker comments, `--check` only says whether they are up to
date (tests/test_arch_schema.py and tests/test_tensor_table.py run that check)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arch import schema, tensor_schema

BEGIN = "<!-- arch keys: generated from native/src/arch_fields.h by `python -m edgemoe.arch_doc`; edit there -->"
END = "<!-- end of the generated arch keys -->"
TENSORS_BEGIN = ("<!-- tensor names: generated from native/src/tensor_table.c by `python -m edgemoe.arch_doc`; edit "
                 "there -->")
TENSORS_END = "<!-- end of the generated tensor names -->"
# the checkout's (an editable install or the source tree); from a wheel, docs/FORMAT.md of the current directory
_CHECKOUT_FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"
FORMAT_MD = _CHECKOUT_FORMAT_MD if _CHECKOUT_FORMAT_MD.exists() else Path("docs") / "FORMAT.md"
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


def _row(cells) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render_table() -> str:
    """The Markdown table of every arch key, in the core's order, between the markers."""
    rows = [BEGIN, "| key | type | required / default | rule |", "|---|---|---|---|"]
    for e in schema():
        rows.append(_row((f"`{e['name']}`", _type(e), _default(e), _rule(e))))
    return "\n".join([*rows, END])


def _tensor_present(t: dict, docs: dict) -> str:
    """Where a tensor is: its layers, its option, and whether it may be absent."""
    parts = ["every model" if t["need"] == "required" else ""] if t["scope"] == "global" else \
        [docs["layer_kinds"][t["layers"]]]
    if t["option"]:
        parts.append(f"{'unless' if t['negated'] else 'when'} `{t['option']}`")
    if t["need"] != "required":
        parts.append(docs["needs"][t["need"]])
    return "; ".join(p for p in parts if p)


def render_tensor_table() -> str:
    """The Markdown table of every tensor a model reads (the core's tensor table, in its order) and of the shape
    terms, between the markers."""
    ts = tensor_schema()
    docs = {key: {d["name"]: d["doc"] for d in ts[key]} for key in ("dims", "layer_kinds", "needs")}
    rows = [TENSORS_BEGIN, "| name | shape | present in | notes |", "|---|---|---|---|"]
    for t in ts["tensors"]:
        name = t["pattern"].replace("{layer}", "{L}").replace("{expert}", "{E}")
        dims = [docs["dims"]["one"] if d == "one" else d for d in (t["rows"], t["cols"]) if d is not None]
        rows.append(_row((f"`{name}`", f"[{', '.join(dims)}]", _tensor_present(t, docs), t["doc"])))
    rows += ["", "| shape term | size |", "|---|---|"]
    rows += [_row((d["name"], d["doc"])) for d in ts["dims"] if d["name"] != "one"]
    return "\n".join([*rows, TENSORS_END])


def _replace(text: str, begin: str, end: str, table: str, what: str, path) -> str:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{path}: the {what}'s markers are missing (expected the lines {begin!r} and {end!r})")
    return text[:start] + table + text[stop + len(end):]


def updated(text: str, path: Path | str = FORMAT_MD) -> str:
    """`text` (FORMAT.md) with the generated tables in place of the ones between the markers."""
    text = _replace(text, BEGIN, END, render_table(), "arch table", path)
    return _replace(text, TENSORS_BEGIN, TENSORS_END, render_tensor_table(), "tensor table", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgemoe.arch_doc", description=__doc__)
    ap.add_argument("path", nargs="?", type=Path, default=FORMAT_MD, help="the FORMAT.md to update (default: the "
                    "checkout's docs/FORMAT.md)")
    ap.add_argument("--check", action="store_true", help="only check: exit 1 if a table is out of date")
    args = ap.parse_args(argv)
    try:
        text = args.path.read_text()
        new = updated(text, args.path)
    except (OSError, ValueError) as e:
        print(f"arch_doc: error: {e}", file=sys.stderr)
        return 1
    if new == text:
        print(f"{args.path}: the generated tables are up to date")
        return 0
    if args.check:
        print(f"{args.path}: the generated tables are out of date: run python -m edgemoe.arch_doc", file=sys.stderr)
        return 1
    args.path.write_text(new)
    print(f"{args.path}: generated tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
