"""The command line's shared options: the runtime and sampling argument groups and how they become the keyword
arguments of edgemoe.load and Model.generate (used by cli.py and cli_tools.py alike)."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from .errors import EdgeMoEError
from .units import format_size_like, parse_bytes

MAX_DEFAULT_THREADS = 8  # decode is bound by memory bandwidth: more threads than this rarely help a small device


def physical_cores() -> int:
    """Cores this process may run on, counting hyperthreads of one core once (Linux sysfs topology; elsewhere
    os.cpu_count())."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def default_threads() -> int:
    """The CLI's --threads default (as llama.cpp's): the physical cores, at most MAX_DEFAULT_THREADS."""
    return min(physical_cores(), MAX_DEFAULT_THREADS)


def check_model_path(path) -> None:
    """A runtime command given something that is not an .emoe container: say which command converts it."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").exists():
            raise EdgeMoEError(f"{p}: a Hugging Face checkpoint directory, not an .emoe container; convert it first: "
                               f"edgemoe export {p} -o {p.name or 'model'}.emoe --bits 4")
        if any(p.glob("*.onnx")):
            raise EdgeMoEError(f"{p}: an ONNX export (for onnxruntime, e.g. edgemoe bench MODEL.emoe --vs-onnx "
                               f"{p / 'model.onnx'}); this command runs an .emoe container")
        raise EdgeMoEError(f"{p}: is a directory, expected an .emoe container file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError:
        return  # missing or unreadable: the loader says so
    if magic == b"GGUF":
        out = p.stem + (".emoe" if p.suffix != ".emoe" else "-converted.emoe")
        raise EdgeMoEError(f"{p}: a llama.cpp GGUF file, not an edgemoe container (.emoe); convert it first: "
                           f"edgemoe export {p} -o {out} --bits 4")


def runtime_opts(sp) -> None:
    g = sp.add_argument_group("runtime")
    g.add_argument("--budget", default=None, metavar="SIZE",
                   help="memory budget for everything the model holds, e.g. 512MB or 1.5GiB (default: unlimited, "
                        "the file is mapped); below the minimum the error states the minimum")
    g.add_argument("--mode", default="exact", choices=("exact", "adaptive", "ondemand"),
                   help="with a budget: exact = output identical to the unlimited run (default); adaptive = skip a "
                        "refinement bit plane that would stall (MWQ experts); ondemand = baseline LRU cache, no "
                        "prefetch")
    g.add_argument("--precision", type=int, default=None, metavar="K",
                   help="MWQ experts: the bit planes every expert runs at, 1 (the 2-bit base plane only) up to the "
                        "planes stored (the default: all, the most precise); fewer planes read fewer bytes and "
                        "compute faster (`edgemoe info` lists the planes)")
    g.add_argument("--threads", type=int, default=default_threads(), metavar="N",
                   help=f"threads for the C core (default {default_threads()}: this machine's physical cores, at "
                        f"most {MAX_DEFAULT_THREADS})")
    g.add_argument("--engine", default="auto", choices=("auto", "c", "numpy"),
                   help="compute engine (default auto: the C core when built)")


def sampling_opts(sp) -> None:
    g = sp.add_argument_group("sampling (llama.cpp semantics)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default); e.g. 0.8")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens below P x the likeliest's probability (0 = off)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R", help="repetition penalty (1 = off)")
    g.add_argument("--repeat-last-n", type=int, default=64, metavar="N",
                   help="tokens the repetition penalty looks back over (default 64)")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0; -1 = random)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the text contains TEXT (repeatable)")


def sampling_kwargs(args, generate) -> dict:
    """The sampling options given on the command line, restricted to what `generate` accepts."""
    wanted = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
              "repetition_penalty": args.repeat_penalty, "repeat_last_n": args.repeat_last_n,
              "seed": None if args.seed < 0 else args.seed, "stop": args.stop or None}
    accepted = inspect.signature(generate).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def context_opts(sp, chat: bool = False) -> None:
    """--max-ctx, and what happens at the context's end: --context-shift / --keep (and for run, --truncate)."""
    g = sp.add_argument_group("context")
    g.add_argument("--max-ctx", type=int, default=None, metavar="N",
                   help="context length: prompt + new tokens (default: the model's, at most 4096; with --budget, the "
                        "largest power of two whose KV cache leaves the expert cache at least as much of the budget, "
                        "said on stderr); a smaller one lowers the KV cache's share of the budget")
    g.add_argument("--context-shift", action="store_true",
                   help="when the context is full, drop the oldest half of it (after --keep tokens) and go on, "
                        "re-running the kept tokens (llama.cpp's context shift); default: stop there"
                        + ("" if chat else " (finish reason 'context')"))
    g.add_argument("--keep", type=int, default=0, metavar="N",
                   help="tokens at the start kept by a context shift (default 0)")
    if not chat:
        g.add_argument("--truncate", choices=("left", "right"), default=None,
                       help="a prompt longer than the context: left = drop its start, right = drop its end, leaving "
                            "room for -n new tokens (at least half the context is kept); default: an error")


def load_args(args, n_seq: int = 1) -> dict:
    """The keyword arguments of edgemoe.load from the runtime options (--budget, --threads, --engine, --mode,
    --precision, --max-ctx). With a budget and no --max-ctx, the context is context_for_budget's (for n_seq KV
    caches), said on stderr."""
    parse_bytes(args.budget)  # a bad size is reported before anything is opened
    check_model_path(args.model)
    kw = {"memory_budget": args.budget, "threads": args.threads, "engine": args.engine}
    if getattr(args, "mode", None):
        kw["mode"] = args.mode
    if getattr(args, "precision", None) is not None:
        kw["precision"] = args.precision
    if getattr(args, "max_ctx", None):
        kw["max_ctx"] = args.max_ctx
    elif args.budget is not None and hasattr(args, "max_ctx") and Path(args.model).is_file():
        from .container import open_container
        from .model import context_for_budget, default_max_ctx

        ctx = context_for_budget(args.model, args.budget, threads=args.threads or 1, mode=kw.get("mode", "exact"),
                                 precision=kw.get("precision"), n_seq=n_seq)
        c = open_container(args.model, verify=False)
        full = default_max_ctx(c.spec)
        c.close()
        if ctx is not None and ctx < full:  # None: load() refuses the budget and says what it needs
            kw["max_ctx"] = ctx
            budget = format_size_like(parse_bytes(args.budget), args.budget)
            each = f" per sequence ({n_seq} KV caches)" if n_seq > 1 else ""
            print(f"edgemoe: context {ctx} tokens{each} (of the model's {full}): the largest power of two whose KV "
                  f"cache the {budget} budget holds while leaving the expert cache at least as much; --max-ctx N chooses "
                  f"(a longer context leaves less expert cache: more reads per token)", file=sys.stderr)
    return kw


def generate_kwargs(args) -> dict:
    """generate()'s context options from context_opts."""
    kw = {"context_shift": args.context_shift, "n_keep": args.keep}
    if getattr(args, "truncate", None):
        kw["truncate"] = args.truncate
    return kw
