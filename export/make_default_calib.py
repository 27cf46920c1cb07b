"""Write the exporter's default calibration text (`export/assets/calib/calib-default.txt`) from offline sources.

Used by `edgemoe export` when the checkpoint ships no calib.txt and no --calib is given. Four kinds of text, so
that the experts of a general model all see some of their inputs: English literature and technical prose (the
shipped small model's calibration text: Shakespeare, public domain, and Python documentation, PSF-2.0 -- sampled
from its *training* split, never its held-out text), program source (Python standard library modules, PSF-2.0)
and legal text (permissive licence texts, each redistributable verbatim). Licences and provenance:
`export/assets/calib/README.md`. Deterministic: the same inputs give the same bytes.

    python export/make_default_calib.py [--python-lib /usr/lib/python3.11] [--licenses /usr/share/common-licenses]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
OUT = ASSETS / "calib" / "calib-default.txt"
SMALL_MOE_CALIB = ASSETS / "small-moe" / "calib.txt"
EOT = "<|endoftext|>"  # the small model's document separator: a special token of its tokenizer only
# Python standard library modules (PSF-2.0, /usr/lib/python3.X/LICENSE.txt): ordinary, well-commented code
PY_MODULES = ("argparse.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py", "functools.py",
              "statistics.py", "fractions.py", "csv.py", "dataclasses.py", "string.py", "shlex.py", "heapq.py",
              "queue.py", "sched.py", "calendar.py")
# permissive licence texts (Debian's /usr/share/common-licenses); each may be copied verbatim
LICENSES = ("Apache-2.0", "MPL-2.0", "BSD", "Artistic", "CC0-1.0")


def build(python_lib: Path, licenses: Path) -> str:
    prose = SMALL_MOE_CALIB.read_text(encoding="utf-8").replace(EOT, "\n\n")
    parts = [prose]
    parts += [(python_lib / m).read_text(encoding="utf-8") for m in PY_MODULES]
    parts.append((python_lib / "LICENSE.txt").read_text(encoding="utf-8"))
    parts += [(licenses / name).read_text(encoding="utf-8") for name in LICENSES]
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python-lib", type=Path, default=Path("/usr/lib/python3.11"))
    p.add_argument("--licenses", type=Path, default=Path("/usr/share/common-licenses"))
    a = p.parse_args(argv)
    text = build(a.python_lib, a.licenses)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    data = OUT.read_bytes()
    print(f"wrote {OUT} ({len(data) / 1e3:.0f} KB, sha256 {hashlib.sha256(data).hexdigest()[:16]})")


if __name__ == "__main__":
    main()
