"""Run one command in a cgroup-v1 memory cap (bench_budget.MemCgroup) and report what the cap saw: the command's own
output, then {"cap_bytes", "max_usage_bytes", "oom_killed", "returncode"} as JSON. No page cache is dropped (other
work shares the machine): pages cached before the run are not charged to the cap.

    python bench/run_capped.py 2.58e9 -- python bench/bench_real_decode.py MODEL.gguf -n 8 --prompt 8
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench_budget import MemCgroup


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        sys.exit(__doc__)
    cap = int(float(argv[0]))
    cg = MemCgroup(cap, "capped")
    try:
        r = subprocess.run(argv[2:], preexec_fn=cg.preexec(), check=False)
        print(json.dumps({"cap_bytes": cap, "max_usage_bytes": cg.max_usage(), "oom_killed": cg.oom_killed(),
                          "returncode": r.returncode}))
    finally:
        cg.remove()


if __name__ == "__main__":
    main()
