#!/usr/bin/env python3
"""Run edgemoe-bench on a Raspberry Pi (or any Linux board) over ssh and collect the JSON results locally.

    python devices/rpi/run_remote.py --host pi@raspberrypi.local --model model.emoe \
        --threads 1,4 --budgets none,1GB [--remote-dir /tmp/edgemoe] [--binary build/aarch64/edgemoe-bench] [--dry-run]

Steps: make the remote directory; copy the binary, the model (and the prompt file) with scp; run one edgemoe-bench
per (budget, threads) pair with --json over ssh; save each run's JSON to OUT/DEVICE_tT_bBUDGET.json, with "device"
and "command" added; print one markdown table (devices/merge_results.py merges results from many devices).
`--dry-run` prints the exact commands instead. Needs ssh/scp with key login (BatchMode: no password prompts).
Build the binary with devices/build_aarch64.sh (static, runs on any aarch64 Linux).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sweep

DEFAULT_BINARY = "build/aarch64/edgemoe-bench"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", required=True, help="ssh destination, e.g. pi@raspberrypi.local")
    ap.add_argument("--remote-dir", default="/tmp/edgemoe", help="working directory on the board (default /tmp/edgemoe)")
    ap.add_argument("--port", type=int, help="ssh port")
    ap.add_argument("--identity", help="ssh private key file (-i)")
    ap.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra ssh/scp -o option (repeatable)")
    ap.add_argument("--skip-copy", action="store_true", help="the binary and model are already in --remote-dir")
    sweep.add_sweep_options(ap, DEFAULT_BINARY)
    return ap.parse_args(argv)


def ssh_base(args) -> tuple[list[str], list[str]]:
    """(ssh prefix, scp prefix): the same options, spelled for each."""
    common = ["-o", "BatchMode=yes"]
    for opt in args.ssh_option:
        common += ["-o", opt]
    if args.identity:
        common += ["-i", args.identity]
    ssh = ["ssh", *common] + (["-p", str(args.port)] if args.port else [])
    scp = ["scp", *common] + (["-P", str(args.port)] if args.port else [])
    return ssh, scp


def plan(args) -> tuple[str, list[list[str]], list[sweep.Run]]:
    """(device label, setup commands, runs): everything the run will execute."""
    ssh, scp = ssh_base(args)
    rdir = args.remote_dir.rstrip("/") or "/"
    device = sweep.safe_label(args.device or args.host.split("@")[-1])
    out = Path(args.out or f"results/{device}")
    model = Path(args.model).name
    prompt = Path(args.prompt_file).name if args.prompt_file else None
    setup = []
    if not args.skip_copy:
        files = [args.binary, args.model] + ([args.prompt_file] if args.prompt_file else [])
        setup.append([*ssh, args.host, f"mkdir -p {shlex.quote(rdir)}"])
        setup.append([*scp, *files, f"{args.host}:{rdir}/"])
        setup.append([*ssh, args.host, f"chmod 755 {shlex.quote(rdir + '/' + Path(args.binary).name)}"])
    runs = []
    for cfg in sweep.configs(args):
        bench = [f"./{Path(args.binary).name}", *sweep.bench_argv(args, model, prompt, cfg)]
        remote = f"cd {shlex.quote(rdir)} && {shlex.join(bench)}"
        runs.append(sweep.Run(cfg, [*ssh, args.host, remote], out / f"{device}_{cfg.tag}.json"))
    return device, setup, runs


def main(argv=None) -> int:
    args = parse_args(argv)
    device, setup, runs = plan(args)
    return sweep.execute("run_remote", args, device, setup, runs, "devices/build_aarch64.sh")


if __name__ == "__main__":
    sys.exit(main())
