"""`edgemoe demo`: export the shipped small model, run it under a memory budget below its size, print statistics.

The budget is 90% of the exported file (so experts must be streamed and evicted), or the minimum the runtime states
for the demo's context if that is higher. The context is kept short (128 tokens, f16 KV cache) so the resident
part (dense weights, KV cache, scratch) leaves room for an expert cache below the file size.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .errors import EdgeMoEError
from .procfs import rss_bytes
from .units import format_bytes, parse_bytes

PROMPTS = ("KING. My lord, I", "The :func:`len` function returns the", "HAMLET. To be, or not to be,")
DEMO_CTX = 128  # prompt + reply of each prompt, and the perplexity window
BUDGET_FRACTION = 0.9  # of the exported file's size


def shipped_model_dir() -> Path:
    try:
        import edgemoe_export
    except ImportError:
        raise EdgeMoEError("the demo exports the shipped model: pip install 'edgemoe[export]'") from None
    d = Path(edgemoe_export.__file__).parent / "assets" / "small-moe"
    if not (d / "config.json").exists():
        raise EdgeMoEError(f"{d}: the shipped small model is missing from this installation")
    return d


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM), so the peak measured covers the model's run and not the
    export before it (Linux >= 4.0; elsewhere the peak stays process-wide)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def choose_budget(path: Path, threads: int, max_ctx: int) -> tuple[int, int]:
    """(budget, minimum): BUDGET_FRACTION of the file, raised to the runtime's stated minimum if below it."""
    from .fit import minimum_budget_bytes

    minimum = minimum_budget_bytes(path, max_ctx, threads=threads, kv_f16=True)
    return max(minimum, int(BUDGET_FRACTION * path.stat().st_size)), minimum


def run_demo(budget: str | None = "auto", threads: int | None = None, n: int = 48, workdir: str | None = None) -> int:
    from edgemoe_export import export

    from .model import load
    from .perplexity import perplexity

    src = shipped_model_dir()
    threads = threads or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(workdir or tmp) / "small-moe.emoe"
        t0 = time.perf_counter()
        export(src, out, bits=4, calib_tokens=4096, show_progress=False)  # MWQ: 2-bit base plane + 2 residual planes, Q8_0 dense
        size = out.stat().st_size
        print(f"exported {src.name} -> {out} ({format_bytes(size)}, MWQ 4-bit experts, Q8_0 dense) "
              f"in {time.perf_counter() - t0:.1f} s")
        if budget in (None, "auto"):
            budget_bytes, minimum = choose_budget(out, threads, DEMO_CTX)
            print(f"budget {format_bytes(budget_bytes)} = {budget_bytes / size:.0%} of the file "
                  f"(runtime minimum for a {DEMO_CTX}-token context: {format_bytes(minimum)})")
        else:
            budget_bytes = parse_bytes(budget)
            print(f"budget {format_bytes(budget_bytes)} = {budget_bytes / size:.0%} of the file")
        peak_reset = _reset_peak_rss()
        rss_before = rss_bytes()
        with load(out, memory_budget=budget_bytes, threads=threads, max_ctx=DEMO_CTX, kv_f16=True) as m:
            s = m.spec
            print(f"loaded: {s.family}, {s.n_layers} layers, {s.n_experts} experts top-{s.top_k}, "
                  f"engine {m.engine_name}, context {DEMO_CTX} (f16 KV cache)")
            for prompt in PROMPTS:
                text = m.generate(prompt, max_new_tokens=min(n, DEMO_CTX - 32))
                print(f"\n--- {prompt!r}\n{prompt}{text}")
            gen = m.stats  # the cache statistics of the generation alone
            heldout = sorted((src / "heldout").glob("*.txt"))
            if heldout:
                print()
                for f in heldout:
                    r = perplexity(m, f.read_text(encoding="utf-8"), ctx=DEMO_CTX, max_tokens=512)
                    print(f"held-out perplexity {f.stem}: {r['ppl']:.2f} ({r['tokens']} tokens, under the budget)")
            print_cache_stats(gen, size, rss_before, peak_reset)
    return 0


def print_cache_stats(gen: dict, file_bytes: int, rss_before: int | None, peak_reset: bool) -> None:
    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    parts = gen["budget_parts"]
    print(f"\nunder the budget of {format_bytes(gen['memory_budget_bytes'])} "
          f"({gen['memory_budget_bytes'] / file_bytes:.0%} of the {format_bytes(file_bytes)} file): dense "
          f"{format_bytes(parts['dense'])} + KV cache {format_bytes(parts['kv_cache'])} + scratch "
          f"{format_bytes(parts['scratch'])} + expert cache {format_bytes(parts['expert_cache'])} "
          f"(experts on disk: {format_bytes(gen['expert_bytes'])})")
    per_tok = gen["bytes_read_per_token"]
    print(f"generation: decode {gen['decode_tok_s']:.1f} tok/s, prefill {gen['prefill_tok_s']:.1f} tok/s; "
          f"expert cache hit rate {pct(gen['cache_hit_rate'])}, read {format_bytes(per_tok or 0)}/token, "
          f"I/O stall {pct(gen['io_stall_fraction'])} of forward time, prefetch recall "
          f"{pct(gen['prefetch_recall'])} (precision {pct(gen['prefetch_precision'])}), "
          f"{gen['evictions']} evictions")
    peak = gen["peak_rss_bytes"]
    print(f"expert cache peak {format_bytes(gen['expert_cache_peak_bytes'])} of its "
          f"{format_bytes(parts['expert_cache'])} (the C core enforces the budget on dense + KV + scratch + cache)")
    line = f"peak RSS during generation {format_bytes(peak)} for the whole process"
    if rss_before is not None and peak_reset:
        line += (f" ({format_bytes(rss_before)} before loading: this process also ran the export, and the allocator "
                 f"keeps what it freed; the budget binds the C core's part, reported above)")
    print(line)
