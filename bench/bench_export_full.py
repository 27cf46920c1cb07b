"""Whole-model export time and peak memory: `edgemoe export` with the default calibration and with --calib none,
next to gguf-py's Q4_0 writer (edgemoe_export.gguf_export.export_gguf) on the same checkpoint, in the same run.

Each command runs under `/usr/bin/time -v`, one after the other (so they do not compete with each other); the table
gives wall time, CPU time (user + sys: what the work costs regardless of the machine's load) and peak RSS.

    python bench/make_random_model.py /tmp/olmoe16 --layers 16 --hidden 2048 --heads 16 --experts 64 --top-k 8 \\
        --expert-ffn 1024 --vocab 50304 --tokenizer export/assets/small-moe/tokenizer.json
    python bench/bench_export_full.py /tmp/olmoe16 --workdir /tmp/exports [--runs gguf,none,calib] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; its stderr (progress and the time report) goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], check=False, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")

    def field(name: str) -> float:
        m = re.search(rf"{re.escape(name)}: ([0-9.]+)", text)
        return float(m.group(1)) if m else float("nan")

    return {"status": rc, "wall_s": round(wall, 1),
            "cpu_s": round(field("User time (seconds)") + field("System time (seconds)"), 1),
            "peak_rss_gb": round(field("Maximum resident set size (kbytes)") * 1024 / 1e9, 2),
            "load_before": os.getloadavg()[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--runs", default="gguf,none,calib", help="comma list of gguf, none, calib")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-P"]
    cmds = {
        "gguf": py + ["-c", ("import sys; from edgemoe_export.gguf_export import export_gguf; "
                             "export_gguf(sys.argv[1], sys.argv[2], 'Q4_0', show_progress=False)"),
                      str(a.model), str(a.workdir / "model-q4_0.gguf")],
        "none": py + ["-m", "edgemoe", "export", str(a.model), "-o", str(a.workdir / "model-none.emoe"),
                      "--bits", str(a.bits), "--calib", "none"],
        "calib": py + ["-m", "edgemoe", "export", str(a.model), "-o", str(a.workdir / "model-calib.emoe"),
                       "--bits", str(a.bits)],
    }
    results = {}
    for name in a.runs.split(","):
        r = timed(cmds[name], a.workdir / f"{name}.log")
        r["command"] = " ".join(cmds[name][2:] if name != "gguf" else ["export_gguf(MODEL, OUT, 'Q4_0')"])
        results[name] = r
        print(json.dumps({name: r}), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
