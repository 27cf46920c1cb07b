"""What the ssh and adb runners share: the sweep's command-line options, the edgemoe-bench arguments of one
configuration, result file names, annotating/saving the JSON a run printed, and the whole copy-run-collect loop
(`execute`); a runner only spells its transport's commands (`plan`). Standard library only."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_results import markdown_table, parse_results


def add_sweep_options(ap: argparse.ArgumentParser, default_binary: str) -> None:
    ap.add_argument("--model", required=True, help="the .emoe container to copy and run")
    ap.add_argument("--binary", default=default_binary, help=f"edgemoe-bench for the device (default {default_binary})")
    ap.add_argument("--budgets", default="none",
                    help="comma-separated memory budgets to sweep, e.g. none,512MB,1GB (passed as --budget; "
                         "edgemoe-bench reports whether it enforces them)")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts to sweep, e.g. 1,2,4")
    ap.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (pp test)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (tg test)")
    ap.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions per test")
    ap.add_argument("--prompt-file", help="token ids to use as the prompt (copied too); default: random ids, seed 42")
    ap.add_argument("--bench-args", default="", help="more edgemoe-bench arguments, e.g. '--kv-f16 --print-tokens'")
    ap.add_argument("--device", help="label of this device in the results (default: derived from the host/serial)")
    ap.add_argument("--out", help="local directory for the JSON results (default results/DEVICE)")
    ap.add_argument("--dry-run", action="store_true", help="print the exact commands and run nothing")


def parse_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise SystemExit(f"--{what}: empty list")
    return items


def safe_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "device"


@dataclass
class Config:
    threads: int
    budget: str  # "none" or a size the binary parses

    @property
    def tag(self) -> str:
        return f"t{self.threads}_b{safe_label(self.budget)}"


def configs(args) -> list[Config]:
    threads = []
    for t in parse_list(args.threads, "threads"):
        if not t.isdigit() or int(t) < 1:
            raise SystemExit(f"--threads: {t!r} is not a positive integer")
        threads.append(int(t))
    return [Config(t, b) for b in parse_list(args.budgets, "budgets") for t in threads]


def bench_argv(args, model_name: str, prompt_name: str | None, cfg: Config) -> list[str]:
    """The edgemoe-bench arguments of one configuration (after the binary)."""
    argv = [model_name, "-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions),
            "-t", str(cfg.threads)]
    if cfg.budget.lower() != "none":
        argv += ["--budget", cfg.budget]
    if prompt_name:
        argv += ["--prompt-file", prompt_name]
    argv += shlex.split(args.bench_args)
    argv.append("--json")
    return argv


def save_results(text: str, path: Path, device: str, command: str) -> list[dict]:
    """Parse one run's JSON, add the device label and the command that produced it, write it to `path`."""
    records = parse_results(text, str(path))
    for r in records:
        r["device"] = device
        r["command"] = command
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    return records


def show(argv: list[str], stdout_to: str | None = None) -> str:
    line = shlex.join(argv)
    return line + (f" > {shlex.quote(stdout_to)}" if stdout_to else "")


def run(argv: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    print("+ " + shlex.join(argv), file=sys.stderr)
    return subprocess.run(argv, check=True, text=True, capture_output=capture)


def print_table(records: list[dict]) -> None:
    if records:
        print(markdown_table(records))


@dataclass
class Run:
    """One configuration's commands on the device: `bench` runs edgemoe-bench; its JSON is either bench's stdout
    (pull None) or a file on the device that `pull` copies to `local`."""

    cfg: Config
    bench: list[str]
    local: Path
    pull: list[str] | None = None


def execute(tool: str, args, device: str, setup: list[list[str]], runs: list[Run], build_hint: str) -> int:
    """Dry run (print every command) or the real thing: check the local files, copy, run each configuration, save
    annotated JSON, print the table. One failing configuration does not stop the others; exit status 1 if any failed."""
    if args.dry_run:
        for cmd in setup:
            print(show(cmd))
        for r in runs:
            print(show(r.bench, None if r.pull else str(r.local)))
            if r.pull:
                print(show(r.pull))
        return 0
    for f in [args.binary, args.model] + ([args.prompt_file] if args.prompt_file else []):
        if not args.skip_copy and not Path(f).is_file():
            hint = f" (build it with {build_hint})" if f == args.binary else ""
            print(f"{tool}: {f}: no such file{hint}", file=sys.stderr)
            return 1
    try:
        for cmd in setup:
            run(cmd)
    except subprocess.CalledProcessError as e:
        print(f"{tool}: {shlex.join(e.cmd)} failed with status {e.returncode}", file=sys.stderr)
        return 1
    records, failed = [], 0
    for r in runs:
        try:
            if r.pull:
                run(r.bench)
                r.local.parent.mkdir(parents=True, exist_ok=True)
                run(r.pull, capture=True)
                text = r.local.read_text()
            else:
                text = run(r.bench, capture=True).stdout
            records += save_results(text, r.local, device, shlex.join(r.bench))
            print(f"wrote {r.local}", file=sys.stderr)
        except subprocess.CalledProcessError as e:
            failed += 1
            print(f"{tool}: {r.cfg.tag} failed (status {e.returncode}): {(e.stderr or '').strip()}", file=sys.stderr)
        except ValueError as e:
            failed += 1
            print(f"{tool}: {r.cfg.tag}: {e}", file=sys.stderr)
    print_table(records)
    return 1 if failed else 0
