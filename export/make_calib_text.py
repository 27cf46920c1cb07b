"""Write the shipped model's calibration text (`export/assets/small-moe/calib.txt`) from its training split.

Calibration (MWQ scale fitting, MC-SMoE routing statistics) must never see the held-out text, so this rebuilds the
exact document split of `train_small_moe.py` (same seeds, from its train_log.json) and samples training documents
of the two redistributable domains (Shakespeare: public domain; Python docs: PSF-2.0, attributed in
heldout/NOTICE.md). GCIDE (GPL-3+) is not shipped.

    python export/make_calib_text.py --model export/assets/small-moe --bytes 240000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
import train_small_moe as T


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(__file__).parent / "assets" / "small-moe")
    p.add_argument("--bytes", type=int, default=240_000, help="total size of the calibration text")
    a = p.parse_args(argv)
    args = SimpleNamespace(**json.loads((a.model / "train_log.json").read_text())["args"])
    loaders = {"pydocs": lambda: T.load_pydocs(args.pydocs), "shakespeare": lambda: T.load_shakespeare(args.shakespeare)}
    parts = []
    for i, dom in enumerate(T.DOMAINS):
        if dom not in loaders:
            continue
        train, test = T.split_docs(loaders[dom](), seed=args.seed + 101 * (i + 1), frac=args.heldout_frac,
                                   cap_bytes=args.heldout_bytes)
        held = {n for n, _ in test}
        rng = random.Random(7 + i)
        rng.shuffle(train)
        size, chosen = 0, []
        for name, text in train:
            assert name not in held
            if size >= a.bytes // len(loaders):
                break
            chosen.append((name, text))
            size += len(text.encode("utf-8"))
        parts.append(T.join_docs(chosen))
    out = a.model / "calib.txt"
    out.write_text(T.EOT.join(parts), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
