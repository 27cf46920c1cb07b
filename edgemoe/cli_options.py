"""The command line's shared options: the runtime and sampling argument groups and how they become the keyword
arguments of edgemoe.load and Model.generate (used by cli.py and cli_tools.py alike)."""

from __future__ import annotations

import inspect

from .units import parse_bytes


def runtime_opts(sp) -> None:
    g = sp.add_argument_group("runtime")
    g.add_argument("--budget", default=None, metavar="SIZE",
                   help="memory budget for everything the model holds, e.g. 512MB or 1.5GiB (default: unlimited, "
                        "the file is mapped); below the minimum the error states the minimum")
    g.add_argument("--mode", default="exact", choices=("exact", "adaptive", "ondemand"),
                   help="with a budget: exact = output identical to the unlimited run (default); adaptive = skip a "
                        "refinement bit plane that would stall (MWQ experts); ondemand = baseline LRU cache, no "
                        "prefetch")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="threads for the C core (default 1)")
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


def load_args(args) -> dict:
    """The keyword arguments of edgemoe.load from the runtime options (--budget, --threads, --engine, --mode)."""
    parse_bytes(args.budget)  # a bad size is reported before anything is opened
    kw = {"memory_budget": args.budget, "threads": args.threads, "engine": args.engine}
    if getattr(args, "mode", None):
        kw["mode"] = args.mode
    if getattr(args, "max_ctx", None):
        kw["max_ctx"] = args.max_ctx
    return kw
