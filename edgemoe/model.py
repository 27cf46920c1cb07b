"""`edgemoe.load(...)` and the `Model` users hold: logits, generation, tokenizer, statistics."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .arch import GLOBAL_TENSORS
from .container import Container, open_container
from .errors import EdgeMoEError, FormatError
from .tokenizer import Tokenizer
from .units import format_bytes, parse_bytes

ENGINES = ("auto", "c", "numpy")
MODES = ("exact", "adaptive", "ondemand")


def _peak_rss_bytes() -> int:
    """VmHWM: the process's peak resident set (Linux /proc; elsewhere ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _ratio(a, b):
    return a / b if b else None


class Model:
    def __init__(self, container: Container, memory_budget=None, threads: int | None = None, engine: str = "auto",
                 max_ctx: int | None = None, precision: int | None = None, mode: str = "exact",
                 stream_options: dict | None = None):
        if engine not in ENGINES:
            raise EdgeMoEError(f"engine {engine!r}: expected one of {ENGINES}")
        if mode not in MODES:
            raise EdgeMoEError(f"mode {mode!r}: expected one of {MODES}")
        self.container = container
        self.spec = container.spec
        self.memory_budget = parse_bytes(memory_budget)
        self.threads = threads
        self.precision, self.stored_planes = self._check_precision(container, precision)
        self.max_ctx = int(max_ctx or min(self.spec.max_position, 4096))
        self.dense_bytes = sum(t.nbytes for t in container.tensors.values() if t.kind == "dense")
        self.expert_bytes = sum(t.nbytes for t in container.tensors.values() if t.kind == "expert")
        self.mode = mode
        # A budget (or a mode other than exact) runs the streaming engine: the C core enforces the budget itself.
        self.streaming = self.memory_budget is not None or mode != "exact"
        if self.streaming:
            self.engine_name, self._engine = self._make_streaming_engine(engine, dict(stream_options or {}))
        else:
            tensors = {n: container.array(n) for n, t in container.tensors.items() if t.kind != "blob"}
            dtypes = {n: t.dtype for n, t in container.tensors.items()}
            shapes = {n: t.shape for n, t in container.tensors.items()}
            self.engine_name, self._engine = self._make_engine(engine, tensors, dtypes, shapes)
        tok = container.tensors.get("tokenizer.json")
        self.tokenizer = Tokenizer(container.blob("tokenizer.json")) if tok is not None else None
        self._stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    @staticmethod
    def _check_precision(container: Container, precision) -> tuple[int | None, int | None]:
        """-> (planes each MWQ expert runs at or None, planes stored). precision None = all stored planes."""
        counts = {t.n_planes for t in container.tensors.values() if t.dtype == "mwq"}
        stored = min(counts) if counts else None
        if precision is None:
            return None, stored
        if stored is None:
            raise EdgeMoEError(f"{container.path.name}: precision={precision} needs MWQ experts (export with "
                               f"--bits 2..8); this container stores none")
        try:
            k = int(precision)
        except (TypeError, ValueError):
            raise EdgeMoEError(f"precision {precision!r}: expected a number of planes 1..{stored}") from None
        if k != precision or not 1 <= k <= stored:
            base = next(t.quant["base_bits"] for t in container.tensors.values() if t.dtype == "mwq")
            raise EdgeMoEError(f"precision {precision!r}: {container.path.name} stores {stored} planes per expert "
                               f"(base {base} bits + {stored - 1} residual); choose 1..{stored} "
                               f"({base}..{base + stored - 1} bits)")
        return k, stored

    def _make_streaming_engine(self, engine: str, opts: dict):
        """The C core under the memory budget: dense weights resident, experts through its byte-budgeted cache."""
        if engine == "numpy":
            raise EdgeMoEError("a memory budget (or mode other than 'exact') needs the C engine; the NumPy engine maps "
                               "the whole file (use engine='auto' or 'c')")
        try:
            from .engine_c import CEngine
        except Exception as e:  # noqa: BLE001 - the C core may be missing in a partial build
            raise EdgeMoEError(f"a memory budget needs the C core, which is not available: {e}") from None
        eng = CEngine.open_streaming(self.container.path, self.spec, self.memory_budget, self.mode,
                                     threads=self.threads or 1, max_ctx=self.max_ctx, precision=self.precision,
                                     **opts)
        return "c-stream", eng

    def _make_engine(self, engine, tensors, dtypes, shapes):
        has_mwq = self.stored_planes is not None
        quant = {n: {**t.quant, "n_planes": t.n_planes,
                     "plane_offsets": [int(p["offset"]) - t.offset for p in t.planes]}
                 for n, t in self.container.tensors.items() if t.planes}
        if engine in ("auto", "c"):
            try:
                from .engine_c import CEngine

                if has_mwq and not getattr(CEngine, "supports_mwq", False):
                    raise EdgeMoEError("it does not run MWQ experts yet (use engine='numpy')")
                kwargs = ({"precision": self.precision, "planes": self.container.planes, "quant": quant}
                          if has_mwq else {})
                return "c", CEngine(self.spec, tensors, dtypes, threads=self.threads or 1, max_ctx=self.max_ctx,
                                    **kwargs)
            except FormatError:  # a corrupt plane, found when the C engine read it: no fallback hides that
                raise
            except Exception as e:  # noqa: BLE001 - the C core may be missing in a partial build
                if engine == "c":
                    raise EdgeMoEError(f"the C engine is not available: {e}") from None
        from .engine_numpy import NumpyEngine

        return "numpy", NumpyEngine(self.spec, tensors, dtypes, shapes, precision=self.precision,
                                    planes=self.container.planes, quant=quant)

    # --- the verbs ------------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        cfg = self.spec.to_json()
        cfg.update(self.container.metadata)
        return cfg

    def logits(self, ids) -> np.ndarray:
        """float32 [len(ids), vocab] for a fresh sequence (all positions)."""
        ids = self._check_ids(ids)
        t0 = time.perf_counter()
        out = self._engine.logits(ids)
        self._stats["prefill_tokens"] += len(ids)
        self._stats["prefill_s"] += time.perf_counter() - t0
        return out

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids:
            raise EdgeMoEError("empty token sequence")
        bad = [i for i in ids if not 0 <= i < self.spec.vocab]
        if bad:
            raise EdgeMoEError(f"token id {bad[0]} is outside the vocabulary (0..{self.spec.vocab - 1})")
        if len(ids) > self.max_ctx:
            raise EdgeMoEError(f"{len(ids)} tokens exceed the context of {self.max_ctx}")
        return ids

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = 0,
                 stream: bool = False, stop_at_eos: bool = True):
        """Continue `prompt` (a string, or a list of token ids). Returns the new text, or an iterator of pieces."""
        pieces = self._generate(prompt, max_new_tokens, temperature, seed, stop_at_eos)
        return pieces if stream else "".join(pieces)

    def _generate(self, prompt, max_new_tokens, temperature, seed, stop_at_eos) -> Iterator[str]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EdgeMoEError(f"{self.container.path}: no tokenizer embedded; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        ids = self._check_ids(ids)
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        logits = self._engine.prefill(ids)
        self._stats["prefill_tokens"] += len(ids)
        self._stats["prefill_s"] += time.perf_counter() - t0
        out: list[int] = []
        emitted = ""
        for _ in range(max_new_tokens):
            tok = self._sample(logits, temperature, rng)
            if stop_at_eos and tok == self.spec.eos_token_id:
                break
            out.append(tok)
            if self.tokenizer is not None:
                text = self.tokenizer.decode(out)
                if not text.endswith("\ufffd"):  # hold back incomplete UTF-8 sequences
                    yield text[len(emitted):]
                    emitted = text
            else:
                yield f" {tok}"
            if len(ids) + len(out) >= self.max_ctx:
                break
            t1 = time.perf_counter()
            logits = self._engine.decode(tok)
            self._stats["decode_tokens"] += 1
            self._stats["decode_s"] += time.perf_counter() - t1

    @staticmethod
    def _sample(logits: np.ndarray, temperature: float, rng) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))

    @property
    def stats(self) -> dict:
        s = self._stats
        return {
            "engine": self.engine_name,
            "prefill_tokens": s["prefill_tokens"],
            "prefill_tok_s": s["prefill_tokens"] / s["prefill_s"] if s["prefill_s"] else 0.0,
            "decode_tokens": s["decode_tokens"],
            "decode_tok_s": s["decode_tokens"] / s["decode_s"] if s["decode_s"] else 0.0,
            "peak_rss_bytes": _peak_rss_bytes(),
            "memory_budget_bytes": self.memory_budget,
            "dense_bytes": self.dense_bytes,
            "expert_bytes": self.expert_bytes,
            **(self._stream_stats() if self.streaming else {}),
        }

    def _stream_stats(self) -> dict:
        """The C core's cache statistics, as rates and per-token figures (since load or reset_stats)."""
        c = self._engine.stats()
        hits, misses, late = sum(c["hits"]), sum(c["misses"]), sum(c["late"])
        return {
            "mode": self.mode,
            "minimum_budget_bytes": c["minimum_bytes"],
            "budget_parts": {"dense": c["dense_bytes"], "kv_cache": c["kv_bytes"], "scratch": c["scratch_bytes"],
                             "expert_cache": c["cache_capacity_bytes"]},
            "expert_cache_peak_bytes": c["cache_peak_bytes"],
            "tokens": c["tokens"],
            "hits_per_plane": c["hits"],
            "misses_per_plane": c["misses"],
            "late_prefetch_per_plane": c["late"],
            "cache_hit_rate": _ratio(hits, hits + misses + late),
            "bytes_read": c["bytes_read"],
            "bytes_read_per_token": _ratio(c["bytes_read"], c["tokens"]),
            "io_stall_s": c["stall_s"],
            "io_stall_fraction": _ratio(c["stall_s"], c["forward_s"]),
            "prefetch_recall": _ratio(c["pred_hits"], c["true_experts"]),
            "prefetch_precision": _ratio(c["pred_hits"], c["pred_experts"]),
            "prefetch_pieces": {"issued": c["prefetch_issued"], "used": c["prefetch_used"],
                                "wasted": c["prefetch_wasted"]},
            "experts_at_planes": c["experts_at_planes"],
            "evictions": c["evictions"],
            "read_syscalls": c["read_syscalls"],
            "checksums_checked": c["crc_checked"],
            "o_direct": bool(c["direct"]),
        }

    def reset_stats(self) -> None:
        self._stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
        if self.streaming:
            self._engine.reset_stats()

    def drop_cache(self) -> None:
        """Streaming: empty the expert cache (a cold start)."""
        if self.streaming:
            self._engine.drop_cache()

    def close(self) -> None:
        self._engine.close()
        self.container.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, memory_budget=None, threads: int | None = None, engine: str = "auto",
         max_ctx: int | None = None, verify: bool = True, precision: int | None = None, mode: str = "exact",
         prefetch: int = 1, verify_reads: str | None = None, **stream_options) -> Model:
    """Open a `.emoe` container.

    memory_budget: "1.5GB", bytes, or None (unlimited: the file is mapped). With a budget the C core holds the dense
    weights, the KV cache for max_ctx, scratch and a byte-budgeted expert cache within it, streaming experts from the
    file; a budget below the minimum raises an error stating it. mode: "exact" (default; output identical to the
    all-resident model), "adaptive" (MWQ: skip refinement planes that would stall), "ondemand" (baseline: LRU, no
    prefetch). prefetch: 0 none, 1 before each layer's attention (default), 2 also the next layer.
    stream_options: prefetch_extra, io_threads, direct (O_DIRECT), drop_cache (see CEngine.open_streaming).
    verify_reads: with a budget, "first" (default when verify), "always" (every read of an expert piece) or "never".
    precision: for MWQ containers, the number of bit planes every expert runs at (1 = the base plane only;
    default: all stored planes). Bits per weight = base bits + precision - 1.
    verify: check checksums: without a budget every tensor now; with one, the dense weights at load and each expert
    piece on its first read (reading the whole file up front would put all of it in memory).
    """
    streaming = memory_budget is not None or mode != "exact"
    container = open_container(path, verify=verify and not streaming)
    reads = verify_reads or ("first" if verify else "never")
    opts = {"prefetch": prefetch, "verify": reads, **stream_options} if streaming else None
    try:
        return Model(container, memory_budget, threads, engine, max_ctx, precision, mode, opts)
    except BaseException:
        container.close()
        raise


__all__ = ["GLOBAL_TENSORS", "Model", "load"]
