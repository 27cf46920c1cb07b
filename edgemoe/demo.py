"""`edgemoe demo`: export the shipped small model, load it under a memory budget, generate, print statistics."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from .errors import EdgeMoEError
from .units import format_bytes

PROMPTS = ("KING. My lord, I", "The :func:`len` function returns the", "HAMLET. To be, or not to be,")


def shipped_model_dir() -> Path:
    try:
        import edgemoe_export
    except ImportError:
        raise EdgeMoEError("the demo exports the shipped model: pip install 'edgemoe[export]'") from None
    d = Path(edgemoe_export.__file__).parent / "assets" / "small-moe"
    if not (d / "config.json").exists():
        raise EdgeMoEError(f"{d}: the shipped small model is missing from this installation")
    return d


def run_demo(budget: str | None = "64MB", threads: int | None = None, n: int = 48, workdir: str | None = None) -> int:
    from edgemoe_export import export

    from .model import load
    from .perplexity import perplexity

    src = shipped_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(workdir or tmp) / "small-moe.emoe"
        t0 = time.perf_counter()
        export(src, out, bits=4, calib_tokens=4096, show_progress=False)  # MWQ: 2-bit base plane + 2 residual planes, Q8_0 dense
        print(f"exported {src.name} -> {out} ({format_bytes(out.stat().st_size)}, MWQ 4-bit experts, Q8_0 dense) "
              f"in {time.perf_counter() - t0:.1f} s")
        with load(out, memory_budget=budget, threads=threads) as m:
            s = m.spec
            print(f"loaded: {s.family}, {s.n_layers} layers, {s.n_experts} experts top-{s.top_k}, "
                  f"engine {m.engine_name}, budget {budget}")
            for prompt in PROMPTS:
                text = m.generate(prompt, max_new_tokens=n)
                print(f"\n--- {prompt!r}\n{prompt}{text}")
            heldout = sorted((src / "heldout").glob("*.txt"))
            if heldout:
                print()
                for f in heldout:
                    r = perplexity(m, f.read_text(encoding="utf-8"), ctx=128, max_tokens=512)
                    print(f"held-out perplexity {f.stem}: {r['ppl']:.2f} ({r['tokens']} tokens)")
            st = m.stats
            print(
                f"\nstats: prefill {st['prefill_tok_s']:.1f} tok/s, decode {st['decode_tok_s']:.1f} tok/s, "
                f"peak RSS {format_bytes(st['peak_rss_bytes'])}, dense {format_bytes(st['dense_bytes'])}, "
                f"experts {format_bytes(st['expert_bytes'])}",
                file=sys.stdout,
            )
    return 0
