"""`edgemoe bench`: llama-bench-shaped prompt-processing (ppN) and generation (tgN) measurements.

Timings exclude tokenization and sampling (greedy argmax on returned logits is the only per-token work outside the
engine). With a llama.cpp GGUF (`LlamaCppRunner`) and/or an ONNX export (`bench_onnx.OnnxRunner`) of the same model
the runs interleave A B C A B C in one process so the ratios hold even on a noisy shared machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class BenchResult:
    engine: str
    test: str  # "pp512" / "tg128"
    n_prompt: int
    n_gen: int
    n_threads: int
    samples_ts: list[float] = field(default_factory=list)

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts) if self.samples_ts else 0.0

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ts) > 1 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(avg_ts=self.avg_ts, stddev_ts=self.stddev_ts)
        return d


class EdgeMoERunner:
    """Drives an edgemoe Model's engine directly (prefill / decode), as llama-bench drives llama_decode."""

    name = "edgemoe"

    def __init__(self, model):
        self.model = model
        self.engine = model._engine

    def prompt(self, ids: list[int]) -> float:
        self.engine.reset()
        t0 = time.perf_counter()
        self.engine.prefill(ids)
        return time.perf_counter() - t0

    def generate(self, first: int, n: int) -> float:
        self.engine.reset()
        logits = self.engine.prefill([first])
        t0 = time.perf_counter()
        for _ in range(n):
            logits = self.engine.decode(int(np.argmax(logits)))
        return time.perf_counter() - t0


class LlamaCppRunner:
    """The same measurements through llama-cpp-python on a GGUF file."""

    name = "llama.cpp"

    def __init__(self, gguf_path: str, n_threads: int, n_ctx: int):
        from .errors import EdgeMoEError

        try:
            with open(gguf_path, "rb") as f:
                magic = f.read(4)
        except FileNotFoundError:
            raise EdgeMoEError(f"{gguf_path}: no such GGUF file") from None
        except OSError as e:
            raise EdgeMoEError(f"{gguf_path}: cannot read the GGUF file ({e.strerror or e})") from None
        if magic != b"GGUF":  # llama.cpp would only say "failed to load model"
            raise EdgeMoEError(f"{gguf_path}: not a GGUF file (magic {magic!r}); edgemoe export --gguf OUT.gguf "
                               "writes one")
        try:
            from llama_cpp import Llama
        except ImportError:
            raise EdgeMoEError("--vs-llama-cpp needs llama-cpp-python: pip install 'edgemoe[test]'") from None
        try:
            self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=n_threads,
                             n_threads_batch=n_threads, logits_all=False, verbose=False)
        except ValueError as e:  # llama-cpp-python's report of a file llama.cpp refused
            raise EdgeMoEError(f"{gguf_path}: llama.cpp could not load it ({e})") from None

    def prompt(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def generate(self, first: int, n: int) -> float:
        import llama_cpp

        self.llm.reset()
        self.llm.eval([first])
        vocab = self.llm.n_vocab()
        t0 = time.perf_counter()
        for _ in range(n):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(vocab,))
            self.llm.eval([int(np.argmax(logits))])
        return time.perf_counter() - t0


def run_bench(runners: list, vocab: int, n_prompt: int = 512, n_gen: int = 128, reps: int = 5, threads: int = 1,
              seed: int = 0, progress=None) -> list[BenchResult]:
    """Interleaved A B A B repetitions after one warm-up per runner. Prompts are random ids (stated in output)."""
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.integers(0, vocab, n_prompt)]
    results = []
    for test, n in (("pp", n_prompt), ("tg", n_gen)):
        if n <= 0:
            continue
        rs = {r.name: BenchResult(r.name, f"{test}{n}", n if test == "pp" else 0, n if test == "tg" else 0, threads)
              for r in runners}
        for r in runners:  # warm-up
            r.prompt(ids[: min(16, len(ids))]) if test == "pp" else r.generate(ids[0], min(4, n))
        for rep in range(reps):
            for r in runners:
                dt = r.prompt(ids) if test == "pp" else r.generate(ids[0], n)
                rs[r.name].samples_ts.append(n / dt)
                if progress:
                    progress(f"{r.name} {test}{n} rep {rep + 1}/{reps}: {n / dt:.1f} tok/s")
        results.extend(rs.values())
    return results


def measure_read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of a streaming read (NumPy sum over an array larger than the caches), best of `reps`."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, nbytes / (time.perf_counter() - t0))
    del a
    return best


def format_table(results: list[BenchResult], model_files: dict[str, str] | str) -> str:
    """The llama-bench-shaped table; model_files: engine name -> the file it ran (or one name for all)."""
    files = model_files if isinstance(model_files, dict) else {}
    lines = ["| model | engine | threads | test | t/s |", "|---|---|---:|---|---:|"]
    for r in results:
        model = files.get(r.engine, model_files if isinstance(model_files, str) else "")
        lines.append(f"| {model} | {r.engine} | {r.n_threads} | {r.test} | {r.avg_ts:.2f} ± {r.stddev_ts:.2f} |")
    by_test: dict[str, dict[str, float]] = {}
    for r in results:
        by_test.setdefault(r.test, {})[r.engine] = r.avg_ts
    ratios = [f"{test}: edgemoe / {other} = {d['edgemoe'] / t:.2f}" for test, d in by_test.items()
              for other, t in d.items() if other != "edgemoe" and "edgemoe" in d and t > 0]
    if ratios:
        lines.append("")
        lines.extend(ratios)
    return "\n".join(lines)
