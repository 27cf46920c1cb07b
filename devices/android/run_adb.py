#!/usr/bin/env python3
"""Run edgemoe-bench on an Android phone over adb and collect the JSON results locally.

    python devices/android/run_adb.py --model model.emoe --threads 1,4 --budgets none,1GB \
        [--serial SERIAL] [--binary build/android-arm64/edgemoe-bench] [--dry-run]

Steps: make /data/local/tmp/edgemoe (the one place an unrooted phone lets adb put and run executables); push the
binary, the model (and the prompt file); chmod the binary; per (budget, threads) pair run edgemoe-bench with --json
into a file on the phone and pull it into OUT/DEVICE_tT_bBUDGET.json ("device" and "command" added); print one
markdown table. `--dry-run` prints the exact commands instead. Needs adb (Android platform-tools) and USB debugging.
Build the binary with devices/android/build_android.sh (NDK); the static aarch64 Linux build from
devices/build_aarch64.sh may also run, but has not been tried on a phone.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sweep

DEFAULT_BINARY = "build/android-arm64/edgemoe-bench"
DEFAULT_DIR = "/data/local/tmp/edgemoe"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serial", help="adb device serial (adb devices); default: the only device")
    ap.add_argument("--remote-dir", default=DEFAULT_DIR, help=f"directory on the phone (default {DEFAULT_DIR})")
    ap.add_argument("--adb", default="adb", help="the adb executable")
    ap.add_argument("--skip-copy", action="store_true", help="the binary and model are already on the phone")
    sweep.add_sweep_options(ap, DEFAULT_BINARY)
    return ap.parse_args(argv)


def plan(args) -> tuple[str, list[list[str]], list[sweep.Run]]:
    """(device label, setup commands, runs): the bench writes its JSON on the phone, `adb pull` fetches it."""
    adb = [args.adb] + (["-s", args.serial] if args.serial else [])
    rdir = args.remote_dir.rstrip("/")
    device = sweep.safe_label(args.device or args.serial or "android")
    out = Path(args.out or f"results/{device}")
    binary = f"{rdir}/edgemoe-bench"
    model = Path(args.model).name
    prompt = Path(args.prompt_file).name if args.prompt_file else None
    setup = []
    if not args.skip_copy:
        setup.append([*adb, "shell", f"mkdir -p {shlex.quote(rdir)}"])
        setup.append([*adb, "push", args.binary, binary])
        setup.append([*adb, "push", args.model, f"{rdir}/{model}"])
        if args.prompt_file:
            setup.append([*adb, "push", args.prompt_file, f"{rdir}/{prompt}"])
        setup.append([*adb, "shell", f"chmod 755 {shlex.quote(binary)}"])
    runs = []
    for cfg in sweep.configs(args):
        remote_json = f"{rdir}/result_{cfg.tag}.json"
        bench = ["./edgemoe-bench", *sweep.bench_argv(args, model, prompt, cfg)]
        shell = f"cd {shlex.quote(rdir)} && {shlex.join(bench)} > {shlex.quote(remote_json)}"
        local = out / f"{device}_{cfg.tag}.json"
        runs.append(sweep.Run(cfg, [*adb, "shell", shell], local, [*adb, "pull", remote_json, str(local)]))
    return device, setup, runs


def main(argv=None) -> int:
    args = parse_args(argv)
    device, setup, runs = plan(args)
    return sweep.execute("run_adb", args, device, setup, runs, "devices/android/build_android.sh")


if __name__ == "__main__":
    sys.exit(main())
