"""`edgemoe.load(...)` and the `Model` users hold: logits, generation, tokenizer, statistics."""

from __future__ import annotations

import functools
import resource
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .arch import GLOBAL_TENSORS
from .chat_template import PLAIN_TRANSCRIPT_STOPS, render_chat_template, render_plain_transcript
from .container import Container, open_container
from .errors import ContextError, EdgeMoEError
from .load_options import check_load_options
from .procfs import peak_rss_bytes
from .sampling import SamplingParams, sample
from .textstream import TextStream, stop_strings
from .tokenizer import Tokenizer
from .units import format_size_like, parse_bytes

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

ENGINES = ("auto", "c", "numpy")
MODES = ("exact", "adaptive", "ondemand")


def _peak_rss_bytes() -> int:
    """VmHWM: the process's peak resident set (Linux /proc; elsewhere ru_maxrss, which Linux reports in KiB)."""
    peak = peak_rss_bytes()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fresh_stats() -> dict:
    return {"prefill_tokens": 0, "prompt_tokens_reused": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0,
            "finish_reason": None, "finish_reasons": {r: 0 for r in FINISH_REASONS}, "context_shifts": 0,
            "context_shift_tokens": 0}


# Why a generation ended: "stop" = the end-of-sequence token or a stop string; "length" = max_new_tokens;
# "context" = the context (max_ctx) was full and no context shift was asked for.
FINISH_REASONS = ("stop", "length", "context")


@dataclass
class Generation:
    """What one generation produced and why it ended (generate(..., return_info=True), or a stream's .info)."""

    text: str
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int  # as run (after truncate)
    completion_tokens: int
    prompt_tokens_truncated: int = 0  # dropped from a prompt longer than the context (truncate="left"/"right")
    context_shifts: int = 0  # times the context was full and its oldest half (after n_keep) was dropped


class GenerationStream:
    """generate(stream=True): an iterator of text pieces. Once it is exhausted, `.info` is the Generation (text
    joined, finish_reason, token counts) and `.finish_reason` its reason; both are None before."""

    def __init__(self, pieces: Iterator[str], info: dict):
        self._pieces, self._info = pieces, info
        self.info: Generation | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration:
            if self.info is None and self._info.get("finish_reason"):
                self.info = Generation(**self._info)
            raise

    def close(self) -> None:
        self._pieces.close()

    @property
    def finish_reason(self) -> str | None:
        return self.info.finish_reason if self.info else None


def _ids_as_text(ids: list[int]) -> str:
    """A model without a tokenizer: its output text is the token ids, " 12 7 301"."""
    return "".join(f" {i}" for i in ids)


def _sampling_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                      repeat_last_n) -> tuple[SamplingParams, int]:
    """generate()'s and generate_batch()'s options, checked: (sampling parameters, max_new_tokens as an int)."""
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise EdgeMoEError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, repeat_last_n=repeat_last_n)
    return params, int(max_new_tokens)


def _ratio(a, b):
    return a / b if b else None


# Thread safety. A Model holds one engine with one KV cache (or n_seq of them) and, under a budget, one expert cache:
# two calls running at once would interleave their sequences in it. So every public verb holds the model's lock for
# its whole call (a second thread waits its turn; the results are those of the calls run one after the other). A
# stream (generate(stream=True)) holds the lock only while it computes a token, never while the caller holds the
# piece: it is resumed as the caller pleases, so a call from another thread may run between its tokens; that call
# replaces the stream's sequence and the stream then ends with an error instead of continuing someone else's.
def _serialized(verb):
    """Run a public verb of Model under the model's lock (re-entrant: chat() calls generate())."""
    @functools.wraps(verb)
    def locked(self, *args, **kwargs):
        with self._lock:
            self._check_open()
            return verb(self, *args, **kwargs)
    return locked


class _Continuation:
    """One sequence being generated: samples each next token from its logits and turns the tokens into text
    (stop strings, end of sequence, max_new_tokens, the context). Shared by generate() and generate_batch()."""

    def __init__(self, model: Model, ids: list[int], max_new_tokens: int, params: SamplingParams,
                 rng: np.random.Generator, stops: list[str], stop_at_eos: bool, n_keep: int | None = None):
        decode = model.tokenizer.decode if model.tokenizer is not None else _ids_as_text
        self.text = TextStream(decode, stops)
        self.history = list(ids)  # what the repetition penalty looks at: prompt + output
        self.context = list(ids)  # the sequence in the KV cache, then the token to run next (shifts drop some)
        self.max_new_tokens, self.params, self.rng, self.stop_at_eos = max_new_tokens, params, rng, stop_at_eos
        self.eos, self.max_ctx = model.spec.eos_token_id, model.max_ctx
        self.n_keep = n_keep  # None: no context shift, the generation ends when the context is full
        self.n_new, self.shifts = 0, 0
        self.finish_reason: str | None = "length" if max_new_tokens == 0 else None
        self.token: int | None = None  # the last token sampled: the next one to run through the model

    def step(self, logits: np.ndarray) -> tuple[str, bool]:
        """Sample the next token from `logits` -> (the text it completes, whether the sequence is finished). When
        not finished, self.token must be run next (after shift() when needs_shift())."""
        tok = sample(logits, self.params, self.rng, self.history)
        if self.stop_at_eos and tok == self.eos:
            self.finish_reason = "stop"
            return "", True
        self.history.append(tok)
        self.context.append(tok)
        self.n_new += 1
        self.token = tok
        piece = self.text.push(tok)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif self.n_new == self.max_new_tokens:
            self.finish_reason = "length"
        elif len(self.context) >= self.max_ctx and self.n_keep is None:
            self.finish_reason = "context"
        return piece, self.finish_reason is not None

    def needs_shift(self) -> bool:
        return self.n_keep is not None and len(self.context) >= self.max_ctx

    def shift(self) -> int:
        """The context shift (llama.cpp's): keep the first n_keep tokens, drop the oldest half of the rest. Returns
        the number of leading tokens the KV cache keeps; the caller re-runs self.context from there (re-running the
        kept tail, rather than re-rotating its cached keys, gives exactly a fresh run on the shifted tokens)."""
        n_discard = (len(self.context) - self.n_keep) // 2
        del self.context[self.n_keep:self.n_keep + n_discard]
        self.shifts += 1
        return self.n_keep

    def finish(self) -> str:
        """The text held back (a possible start of a stop string that was not one)."""
        return self.text.flush()


class Model:
    """An opened `.emoe` model (made by `edgemoe.load`): logits(), generate(), chat(), the tokenizer, statistics.

    The model keeps one sequence in its KV cache between calls (see generate() on prefix reuse; reset() clears it).
    Use it as a context manager, or call close(), to release the file and the native memory.
    """

    def __init__(self, container: Container, memory_budget: int | str | None = None, threads: int | None = None, engine: str = "auto",
                 max_ctx: int | None = None, precision: int | None = None, mode: str = "exact",
                 stream_options: dict | None = None, n_seq: int | None = None, verify: bool = True):
        check_load_options(container.spec, memory_budget, max_ctx, threads, n_seq, precision, mode, engine)
        if engine not in ENGINES:
            raise EdgeMoEError(f"engine {engine!r}: expected one of {ENGINES}")
        if mode not in MODES:
            raise EdgeMoEError(f"mode {mode!r}: expected one of {MODES}")
        self.container = container
        self.spec = container.spec
        self.memory_budget = parse_bytes(memory_budget)
        self._budget_typed = memory_budget  # echoed in the units it was given in
        self.threads = threads
        self.precision, self.stored_planes = self._check_precision(container, precision)
        self.max_ctx = int(max_ctx or default_max_ctx(self.spec))
        self.dense_bytes = sum(t.nbytes for t in container.tensors.values() if t.kind == "dense")
        self.expert_bytes = sum(t.nbytes for t in container.tensors.values() if t.kind == "expert")
        self.mode = mode
        if n_seq is not None and (int(n_seq) != n_seq or n_seq < 1):
            raise EdgeMoEError(f"n_seq {n_seq!r}: expected a number of sequences >= 1")
        # A budget (or a mode other than exact) runs the streaming engine: the C core enforces the budget itself.
        self.streaming = self.memory_budget is not None or mode != "exact"
        if self.streaming:
            opts = dict(stream_options or {}) | ({"n_seq": int(n_seq)} if n_seq else {})
            self.engine_name, self._engine = self._make_streaming_engine(engine, opts)
        else:
            self.engine_name, self._engine = self._make_engine(engine, verify)
            if n_seq and n_seq > 1 and hasattr(self._engine, "set_n_seq"):
                self._engine.set_n_seq(int(n_seq))
        tok = container.tensors.get("tokenizer.json")
        self.tokenizer = Tokenizer(container.blob("tokenizer.json"), str(container.path)) if tok is not None else None
        self._stats = _fresh_stats()
        self._sequence = 0  # bumped whenever the KV cache gets a new sequence: a stream notices it was replaced
        self._lock = threading.RLock()  # see _serialized
        self._closed = False

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
        CEngine = _c_engine_class()
        from . import _native as N

        try:
            eng = CEngine.open_streaming(self.container.path, self.spec, self.memory_budget, self.mode,
                                         threads=self.threads or 1, max_ctx=self.max_ctx, precision=self.precision,
                                         **opts)
        except N.BudgetError as e:  # the same error (its plan kept), said in the budget's units, with what fits
            better = N.BudgetError(self._budget_message(e.plan, opts), N.ERR_BUDGET)
            better.plan = e.plan
            raise better from None
        return "c-stream", eng

    def _budget_message(self, plan: dict, opts: dict) -> str:
        """A budget below the minimum: the parts, in the units the budget was given in, and the context that fits."""
        def size(n):
            return format_size_like(n, self._budget_typed)

        n_seq = int(opts.get("n_seq") or 1)
        fits = context_for_budget(self.container.path, self.memory_budget, threads=self.threads or 1, mode=self.mode,
                                  precision=self.precision, n_seq=n_seq, limit=self.max_ctx - 1,
                                  leave_experts=False)
        seqs = f" x {n_seq} sequences" if n_seq > 1 else ""
        msg = (f"memory budget {size(self.memory_budget)} ({self.memory_budget} bytes) is below the minimum "
               f"{size(plan['minimum_bytes'])} ({plan['minimum_bytes']} bytes) for "
               f"{self.container.path.name} with max_ctx {self.max_ctx}{seqs}: dense weights "
               f"{size(plan['dense_bytes'])} + KV cache {size(plan['kv_bytes'])} + scratch "
               f"{size(plan['scratch_bytes'])} + expert cache {size(plan['min_cache_bytes'])} (one layer's top-"
               f"{self.spec.top_k} experts)"
               + ("; it is smaller than the dense part alone, which must stay resident"
                  if self.memory_budget < plan["dense_bytes"] else ""))
        if fits:
            return msg + (f"; a context of {fits} tokens fits in it: pass --max-ctx {fits} (edgemoe.load(..., "
                          f"max_ctx={fits})), or raise the budget")
        smallest = budget_plan(self.container.path, MIN_AUTO_CTX, self.threads or 1, self.mode, self.precision,
                                n_seq)["minimum_bytes"]
        return msg + (f"; even a context of {MIN_AUTO_CTX} tokens needs {size(smallest)}: raise the budget to at "
                      f"least that")

    def _plane_layouts(self) -> dict[str, dict]:
        """MWQ tensor name -> its quantization parameters and plane offsets (relative to the tensor's start)."""
        return {n: {**t.quant, "n_planes": t.n_planes,
                    "plane_offsets": [int(p["offset"]) - t.offset for p in t.planes]}
                for n, t in self.container.tensors.items() if t.planes}

    def reference_engine(self):
        """A NumPy reference engine over this container's weights (the file is mapped; any dtype, MWQ at this
        model's precision): for routing hooks and checks, independent of the engine serving the model."""
        from .engine_numpy import NumpyEngine

        c = self.container
        return NumpyEngine(self.spec, {n: c.array(n) for n, t in c.tensors.items() if t.kind != "blob"},
                           {n: t.dtype for n, t in c.tensors.items()}, {n: t.shape for n, t in c.tensors.items()},
                           precision=self.precision, planes=c.planes, quant=self._plane_layouts())

    def _make_engine(self, engine: str, verify: bool):
        """engine "auto"/"c": the C core reads the container itself (every storage); a missing core or a file it
        refuses is an error, never a switch to another engine. "numpy": the reference engine, only when asked."""
        if engine == "numpy":
            return "numpy", self.reference_engine()
        CEngine = _c_engine_class()
        c = self.container
        mwq = {n: t.n_planes for n, t in c.tensors.items() if t.dtype == "mwq"}
        # verified at open (load's verify), or each MWQ plane checked when a precision first uses it (Container.planes)
        lazy = {} if verify else {"planes": c.planes, "mwq_planes": mwq}
        return "c", CEngine.from_container(c.path, self.spec, threads=self.threads or 1, max_ctx=self.max_ctx,
                                           precision=self.precision, verify=False, **lazy)

    # --- the verbs ------------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The architecture (ArchSpec fields) merged with the container's metadata."""
        cfg = self.spec.to_json()
        cfg.update(self.container.metadata)
        return cfg

    @_serialized
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab] for a fresh sequence (all positions). The KV cache then holds `ids`."""
        ids = self._check_ids(ids)
        t0 = time.perf_counter()
        out = self._engine.logits(ids)  # starts a fresh sequence in the KV cache
        self._sequence += 1
        self._stats["prefill_tokens"] += len(ids)
        self._stats["prefill_s"] += time.perf_counter() - t0
        return out

    def _check_ids(self, ids, what: str = "tokens") -> list[int]:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids:
            raise EdgeMoEError(f"no {what}: the sequence is empty")
        bad = [i for i in ids if not 0 <= i < self.spec.vocab]
        if bad:
            raise EdgeMoEError(f"token id {bad[0]} is outside the vocabulary (0..{self.spec.vocab - 1})")
        if len(ids) > self.max_ctx:
            raise ContextError(f"{len(ids)} {what} exceed the context of {self.max_ctx} tokens (max_ctx; "
                               + (f"edgemoe.load(..., max_ctx=N) raises it up to the model's {self.spec.max_position}; "
                                  if self.max_ctx < self.spec.max_position else "the model's maximum; ")
                               + "generate(..., truncate='left') keeps the prompt's end)",
                               len(ids), self.max_ctx, self.spec.max_position)
        return ids

    def _truncated(self, ids: list[int], truncate: str | None, max_new_tokens: int) -> tuple[list[int], int]:
        """A prompt longer than the context, cut (truncate "left": drop its start; "right": drop its end) to leave
        room for max_new_tokens, but never to less than half the context. -> (ids, tokens dropped)."""
        if truncate not in (None, "left", "right"):
            raise EdgeMoEError(f"truncate {truncate!r}: expected None, 'left' or 'right'")
        if truncate is None or len(ids) <= self.max_ctx:
            return ids, 0
        keep = max(self.max_ctx - max_new_tokens, self.max_ctx // 2, 1)
        return (ids[-keep:] if truncate == "left" else ids[:keep]), len(ids) - keep

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with the embedded tokenizer (no special tokens added)."""
        if self.tokenizer is None:
            raise EdgeMoEError(f"{self.container.path}: no tokenizer embedded; pass token ids")
        return self.tokenizer.encode(text)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int | None = 0, stop: str | Sequence[str] | None = None,
                 stream: bool = False, stop_at_eos: bool = True, return_info: bool = False,
                 context_shift: bool = False, n_keep: int = 0,
                 truncate: str | None = None) -> str | Generation | GenerationStream:
        """Continue `prompt` (a string, or a list of token ids). Returns the new text, or with stream=True an
        iterator of text pieces that join to exactly that text (multi-byte characters are never split).

        Threads: calls on one Model run one at a time (a second thread waits). A stream computes each token when it
        is resumed; if a call from any thread runs between two of its tokens, that call replaces the stream's
        sequence and the stream raises EdgeMoEError. To generate several texts at once, use generate_batch.

        Sampling (llama.cpp's semantics, `edgemoe.sampling`): temperature 0 = greedy; otherwise the repetition
        penalty (over the last `repeat_last_n` tokens of prompt + output; 1 = off), then top_k (0 = off), min_p
        (0 = off) and top_p (1 = off) restrict the tokens drawn from softmax(logits / temperature) with a
        `numpy.random.default_rng(seed)` generator: the same seed gives the same text (seed None: a fresh one).
        stop: a string or list of strings; generation ends when the text contains one, and the text returned ends
        just before it. A stream holds back any tail that could begin a stop string until it is decided.
        stop_at_eos: end at the model's end-of-sequence token (not included in the text).
        Ends after max_new_tokens tokens (finish_reason "length"), at end-of-sequence or a stop string ("stop"), or
        when the context (max_ctx) is full ("context"). return_info=True returns a Generation (text, finish_reason,
        token counts) instead of the text; a stream is a GenerationStream whose .info is that Generation once it
        is exhausted. stats["finish_reason"] is the latest generation's.
        context_shift=True: when the context is full, keep the first n_keep tokens, drop the oldest half of the rest
        and continue (llama.cpp's context shift); the kept tokens are run again, so the continuation is exactly a
        fresh run on the shifted tokens (it costs one prefill of about half the context per shift).
        A prompt longer than the context raises ContextError (an EdgeMoEError) stating both lengths, unless
        truncate="left" (drop the prompt's start) or "right" (its end) cuts it to leave room for max_new_tokens
        (keeping at least half the context).

        The prompt is run as one prefill. The KV cache is kept between calls: when the new prompt's token ids start
        with ids the cache holds (the previous prompt and its output, e.g. a chat's earlier turns), only the rest
        is run (`stats["prompt_tokens_reused"]` counts the positions kept); reset() clears it.
        """
        params, max_new_tokens = _sampling_options(max_new_tokens, temperature, top_k, top_p, min_p,
                                                   repetition_penalty, repeat_last_n)
        stops = stop_strings(stop)
        keep = self._check_n_keep(n_keep) if context_shift else None
        ids = [int(i) for i in np.asarray(self.encode(prompt) if isinstance(prompt, str) else prompt).reshape(-1)]
        ids, dropped = self._truncated(ids, truncate, max_new_tokens)
        ids = self._check_ids(ids, "prompt tokens")
        info = {"prompt_tokens": len(ids), "prompt_tokens_truncated": dropped}
        pieces = self._generate(ids, max_new_tokens, params, np.random.default_rng(seed), stops, stop_at_eos, keep,
                                info)
        if stream:
            return GenerationStream(pieces, info)
        text = self._joined(pieces)
        return Generation(**info) if return_info else text

    def _check_n_keep(self, n_keep) -> int:
        """n_keep for a context shift: tokens kept at the start; a shift must still free at least one position."""
        if int(n_keep) != n_keep or not 0 <= n_keep <= self.max_ctx - 2:
            raise EdgeMoEError(f"n_keep {n_keep!r}: expected 0..{self.max_ctx - 2} tokens kept at the start of the "
                               f"context (max_ctx {self.max_ctx}) when it shifts")
        return int(n_keep)

    @_serialized
    def _joined(self, pieces: Iterator[str]) -> str:
        """A whole generation under the lock: no other call runs between its tokens."""
        return "".join(pieces)

    def _generate(self, ids: list[int], max_new_tokens: int, params: SamplingParams, rng: np.random.Generator,
                  stops: list[str], stop_at_eos: bool, n_keep: int | None, info: dict) -> Iterator[str]:
        cont = _Continuation(self, ids, max_new_tokens, params, rng, stops, stop_at_eos, n_keep)
        text: list[str] = []
        if max_new_tokens:
            with self._lock:  # each token's computation under the lock, the yield outside it (see _serialized)
                self._check_open()
                logits = self._prefill_reusing_cache(ids)
                self._sequence += 1  # the KV cache now belongs to this generation
                mine = self._sequence
            while True:
                piece, finished = cont.step(logits)
                if piece:
                    text.append(piece)
                    yield piece
                if finished:
                    break
                with self._lock:
                    self._check_open()
                    if self._sequence != mine:
                        raise EdgeMoEError("this generate() stream was resumed after another generate(), chat(), "
                                           "logits(), generate_batch() or reset() call (from this or another thread) "
                                           "replaced its sequence in the KV cache; finish one stream before starting "
                                           "another, or use generate_batch (with n_seq) to generate several texts at "
                                           "once")
                    logits = self._shift(cont) if cont.needs_shift() else self._decode(cont.token)
            rest = cont.finish()
            if rest:
                text.append(rest)
                yield rest
        info.update(text="".join(text), finish_reason=cont.finish_reason, completion_tokens=cont.n_new,
                    context_shifts=cont.shifts)
        with self._lock:
            self._stats["finish_reason"] = cont.finish_reason
            self._stats["finish_reasons"][cont.finish_reason] += 1

    def _decode(self, token: int, seq: int = 0) -> np.ndarray:
        t1 = time.perf_counter()
        logits = self._engine.decode(token, **({"seq": seq} if seq else {}))
        self._stats["decode_tokens"] += 1
        self._stats["decode_s"] += time.perf_counter() - t1
        return logits

    def _shift(self, cont: _Continuation, seq: int = 0) -> np.ndarray:
        """Shift a full context (cont.shift) and re-run the kept tail with the pending token: its logits."""
        on_seq = {"seq": seq} if seq else {}
        keep = self._keepable(cont.shift(), -1)
        t0 = time.perf_counter()
        self._engine.truncate(keep, **on_seq)
        logits = self._engine.extend(cont.context[keep:], **on_seq)
        self._stats["prefill_tokens"] += len(cont.context) - keep
        self._stats["prefill_s"] += time.perf_counter() - t0
        self._stats["context_shifts"] += 1
        self._stats["context_shift_tokens"] += len(cont.context) - keep
        return logits

    @_serialized
    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                       repetition_penalty: float = 1.0, repeat_last_n: int = 64, seed: int | None = 0,
                       stop: str | Sequence[str] | None = None, stop_at_eos: bool = True,
                       return_info: bool = False, context_shift: bool = False,
                       n_keep: int = 0) -> list[str] | list[Generation]:
        """Continue several prompts at once; returns their new texts, in order. Each text is exactly what
        generate(prompt, ...) returns with the same arguments (every prompt gets its own random generator seeded
        with `seed`), but the decode steps of the running sequences are one batch: an expert chosen by several of
        them is loaded and run once for all, so under a memory budget the bytes read per generated token fall as
        the batch grows.

        Up to n_seq sequences run at once (the KV cache holds that many). Without a memory budget the model grows
        n_seq to len(prompts) itself; under a budget the KV caches are part of it, so n_seq is fixed at load
        (`edgemoe.load(..., memory_budget=..., n_seq=4)`; default 1) and further prompts start when a running one
        finishes (a finished sequence drops out of the batch and its slot takes the next prompt). Each prompt is run
        as one prefill; a sequence slot keeps its prompt's KV cache, so a later call whose prompt in that slot starts
        the same way reuses it (stats["prompt_tokens_reused"]). The NumPy engine runs the prompts one after another.
        Replaces the sequence generate() keeps in the KV cache. return_info, context_shift and n_keep: as generate's
        (return_info=True returns a Generation per prompt, with its finish_reason).
        """
        params, max_new_tokens = _sampling_options(max_new_tokens, temperature, top_k, top_p, min_p,
                                                   repetition_penalty, repeat_last_n)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise EdgeMoEError("generate_batch: prompts must be a list of prompts (strings or lists of token ids)")
        stops = stop_strings(stop)
        all_ids = [self._check_ids(self.encode(p) if isinstance(p, str) else p, f"prompt tokens (prompt {i})")
                   for i, p in enumerate(prompts)]
        keep = self._check_n_keep(n_keep) if context_shift else None
        if not hasattr(self._engine, "decode_batch"):
            return [self.generate(ids, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                                  repeat_last_n, seed, stop, stop_at_eos=stop_at_eos, return_info=return_info,
                                  context_shift=context_shift, n_keep=n_keep) for ids in all_ids]
        texts: list[list[str]] = [[] for _ in all_ids]
        done: list[_Continuation | None] = [None for _ in all_ids]
        if max_new_tokens == 0 or not all_ids:
            return [Generation("", "length", len(ids), 0) if return_info else "" for ids in all_ids]
        if not self.streaming and self._engine.n_seq < len(all_ids):
            self._engine.set_n_seq(len(all_ids))  # not budgeted: the KV cache may grow
        self._sequence += 1  # slot 0 no longer holds what generate() left there
        waiting = list(range(len(all_ids)))[::-1]  # popped from the end: prompt order
        running: dict[int, tuple[int, _Continuation]] = {}  # slot -> (prompt index, its continuation)

        def finish(slot: int) -> None:
            i, cont = running.pop(slot)
            texts[i].append(cont.finish())
            done[i] = cont
            self._stats["finish_reason"] = cont.finish_reason
            self._stats["finish_reasons"][cont.finish_reason] += 1

        while waiting or running:
            for slot in range(self._engine.n_seq):  # free slots take the next prompts
                while slot not in running and waiting:
                    i = waiting.pop()
                    cont = _Continuation(self, all_ids[i], max_new_tokens, params, np.random.default_rng(seed),
                                         stops, stop_at_eos, keep)
                    running[slot] = (i, cont)
                    piece, finished = cont.step(self._prefill_reusing_cache(all_ids[i], slot))
                    texts[i].append(piece)
                    if finished:
                        finish(slot)
            if not running:
                break
            slots = sorted(running)
            shifting = [s for s in slots if running[s][1].needs_shift()]  # their context is full: re-run alone
            batch = [s for s in slots if s not in shifting]
            rows: dict[int, np.ndarray] = {}
            if batch:
                t1 = time.perf_counter()
                logits = self._engine.decode_batch([running[s][1].token for s in batch], batch)
                self._stats["decode_tokens"] += len(batch)
                self._stats["decode_s"] += time.perf_counter() - t1
                rows = {s: logits[k] for k, s in enumerate(batch)}
            for s in shifting:
                rows[s] = self._shift(running[s][1], s)
            for slot in slots:
                piece, finished = running[slot][1].step(rows[slot])
                texts[running[slot][0]].append(piece)
                if finished:
                    finish(slot)
        if not return_info:
            return ["".join(t) for t in texts]
        return [Generation("".join(t), c.finish_reason, len(ids), c.n_new, 0, c.shifts)
                for t, c, ids in zip(texts, done, all_ids)]

    def _keepable(self, keep: int, n_past: int) -> int:
        """The positions a truncation to `keep` of a sequence holding n_past (-1: more than keep) can keep: a model
        with conv layers (LFM2) or linear attention (Qwen3.5) holds a rolling or recurrent state, not one entry per
        position, so it keeps all or none."""
        return keep if not self.spec.has_layer_state or keep == n_past else 0

    def _prefill_reusing_cache(self, ids: list[int], seq: int = 0) -> np.ndarray:
        """Run the prompt in sequence slot `seq`; keep the longest prefix its KV cache already holds (at least the
        last prompt token is always run, since its logits are needed). Returns the last position's logits."""
        on_seq = {"seq": seq} if seq else {}  # the NumPy engine has one sequence and no seq argument
        cached = self._engine.seq_cached_ids(seq) if seq else self._engine.cached_ids
        keep = 0
        for a, b in zip(cached, ids[:-1]):
            if a != b:
                break
            keep += 1
        keep = self._keepable(keep, len(cached))
        t0 = time.perf_counter()
        if keep:
            self._engine.truncate(keep, **on_seq)
            logits = self._engine.extend(ids[keep:], **on_seq)
        else:
            logits = self._engine.prefill(ids, **on_seq)
        self._stats["prefill_tokens"] += len(ids) - keep
        self._stats["prompt_tokens_reused"] += keep
        self._stats["prefill_s"] += time.perf_counter() - t0
        return logits

    @_serialized
    def reset(self) -> None:
        """Clear the KV cache: the next generate() runs its whole prompt."""
        self._engine.reset()
        self._sequence += 1

    # --- chat -----------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The checkpoint's Jinja chat template, stored by the exporter (None if it had none)."""
        t = self.container.metadata.get("chat_template")
        return t if isinstance(t, str) and t else None

    def _chat_tokens(self) -> dict[str, str]:
        tokens = self.container.metadata.get("chat_template_tokens")
        return {k: v for k, v in tokens.items() if isinstance(v, str)} if isinstance(tokens, dict) else {}

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render `messages` ([{"role": "user", "content": "..."}, ...]) with the model's chat template, as
        transformers' `tokenizer.apply_chat_template(messages, tokenize=False)` does (sandboxed Jinja; the
        special-token strings bos_token, eos_token, ... are available to the template). extra: further template
        variables (e.g. tools, enable_thinking). Raises EdgeMoEError if the model has no template."""
        template = self.chat_template
        if template is None:
            raise EdgeMoEError(f"{self.container.path.name} has no chat template (its checkpoint had none, or it was "
                               f"exported by an edgemoe without chat-template support); chat() falls back to a plain "
                               f"'User: ...\\nAssistant:' transcript, or format the prompt yourself")
        return render_chat_template(template, messages, add_generation_prompt, self._chat_tokens(), **extra)

    def chat(self, messages: Sequence[dict], **generate_kwargs) -> str | Iterator[str]:
        """The assistant's reply to `messages` ([{"role": "system" | "user" | "assistant", "content": "..."}]).

        generate_kwargs are generate()'s (max_new_tokens, temperature, ..., stop, stream). The prompt is the model's
        chat template (apply_chat_template); the reply also ends at the template's end-of-sequence string (e.g.
        "<|im_end|>"), which is not included. A model without a template gets a plain transcript instead,
        "System: ...\\nUser: ...\\nAssistant: ...\\nUser: ...\\nAssistant:" (one line per message, contents stripped),
        and the reply ends where the model starts a new "\\nUser:" or "\\nSystem:" line.
        Append the reply to `messages` for the next turn: the KV cache then still holds the earlier turns, so only
        the new ones are run.
        """
        stops = stop_strings(generate_kwargs.pop("stop", None))
        if self.chat_template is not None:
            prompt = self.apply_chat_template(messages, add_generation_prompt=True)
            eos = self._chat_tokens().get("eos_token")
            stops += [eos] if eos else []
        else:
            prompt = render_plain_transcript(messages, add_generation_prompt=True)
            stops += PLAIN_TRANSCRIPT_STOPS
        return self.generate(prompt, stop=stops, **generate_kwargs)

    def create_chat_completion(self, messages: Sequence[dict], **openai_params):
        """OpenAI's chat completion in-process (llama-cpp-python's name): the parameters of POST /v1/chat/completions
        (max_tokens, temperature, stop, stream, response_format, tools, ...) -> its response dict, or with
        stream=True an iterator of its chunk dicts. See edgemoe.server.local."""
        from .server.local import create_chat_completion

        return create_chat_completion(self, list(messages), **openai_params)

    def create_completion(self, prompt: str | Sequence[int], **openai_params):
        """OpenAI's (legacy) completion in-process: the parameters of POST /v1/completions -> its response dict, or
        with stream=True an iterator of its chunk dicts. See edgemoe.server.local."""
        from .server.local import create_completion

        return create_completion(self, prompt if isinstance(prompt, str) else list(prompt), **openai_params)

    @property
    @_serialized
    def stats(self) -> dict:
        """Counters since load or reset_stats(): tokens prefilled (prefill_tokens; prompt_tokens_reused are the
        prompt positions kept from the KV cache instead), decode_tokens, their rates in tokens/s, peak RSS, and
        with a memory budget the expert cache's figures (hit rate, bytes read per token, I/O stall, ...)."""
        s = self._stats
        return {
            "engine": self.engine_name,
            "prefill_tokens": s["prefill_tokens"],
            "prefill_tok_s": s["prefill_tokens"] / s["prefill_s"] if s["prefill_s"] else 0.0,
            "prompt_tokens_reused": s["prompt_tokens_reused"],
            "decode_tokens": s["decode_tokens"],
            "decode_tok_s": s["decode_tokens"] / s["decode_s"] if s["decode_s"] else 0.0,
            "finish_reason": s["finish_reason"],
            "finish_reasons": dict(s["finish_reasons"]),
            "context_shifts": s["context_shifts"],
            "context_shift_tokens": s["context_shift_tokens"],
            "peak_rss_bytes": _peak_rss_bytes(),
            "memory_budget_bytes": self.memory_budget,
            "dense_bytes": self.dense_bytes,
            "expert_bytes": self.expert_bytes,
            # MWQ experts: the bit planes each runs at (precision, default all stored); None for other experts
            "expert_planes": self.precision if self.precision is not None else self.stored_planes,
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
            "read_mode": read_mode(c),
            "read_note": c["read_note"] or None,
        }

    @_serialized
    def reset_stats(self) -> None:
        """Zero the counters of `stats` (not the KV cache: see reset())."""
        self._stats = _fresh_stats()
        if self.streaming:
            self._engine.reset_stats()

    @_serialized
    def drop_cache(self) -> None:
        """Streaming: empty the expert cache (a cold start)."""
        if self.streaming:
            self._engine.drop_cache()

    def close(self) -> None:
        """Free the engine and unmap the container (waits for a call running in another thread). Closing twice is
        harmless; any other verb after close raises EdgeMoEError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._engine.close()
            self.container.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EdgeMoEError(f"{self.container.path.name}: this Model is closed (load it again)")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_mode(c: dict) -> str:
    """How the C core reads expert pieces, from its statistics: "O_DIRECT", "buffered, pages dropped after use" (the
    default's fallback where the file system refuses O_DIRECT; read_note says why) or "buffered" (direct=False,
    drop_cache=False: the page cache keeps what was read, outside the budget)."""
    if c["direct"]:
        return "O_DIRECT"
    return "buffered, pages dropped after use" if c["drop_cache"] else "buffered"


def _c_engine_class():
    """CEngine, or one clear error when the C core cannot be loaded (engine='numpy' is the only other engine)."""
    try:
        from .engine_c import CEngine
    except (ImportError, OSError) as e:
        raise EdgeMoEError(f"the C core is not available ({e}); build it (pip install -e ., or cmake -S native -B "
                           f"build and set EDGEMOE_NATIVE_LIB), or pass engine='numpy' for the slow reference engine"
                           ) from None
    return CEngine


MIN_AUTO_CTX = 64  # the shortest context context_for_budget offers: below it a chat holds hardly a turn


def default_max_ctx(spec) -> int:
    """The context edgemoe.load uses when max_ctx is not given: the model's, at most 4096."""
    return int(min(spec.max_position, 4096))


def budget_plan(path, max_ctx: int, threads: int, mode: str, precision: int | None, n_seq: int) -> dict:
    """The C core's plan for a budgeted load (minimum and its parts), without loading anything."""
    return _c_engine_class().stream_plan(path, max_ctx, threads=threads, mode=mode, precision=precision,
                                         n_seq=n_seq)


def context_for_budget(path: str | Path, memory_budget, threads: int = 1, mode: str = "exact",
                       precision: int | None = None, n_seq: int = 1, limit: int | None = None,
                       leave_experts: bool = True) -> int | None:
    """The context a budget gets when none is asked for: the largest power of two from MIN_AUTO_CTX up to the
    model's default (or `limit`) whose KV cache the budget holds beside the dense weights and scratch while leaving
    the expert cache at least as much as the KV cache takes (leave_experts=False: the largest it holds at all); if no
    context leaves that much, the largest the budget holds; None if none does. The rest of the budget is expert
    cache, and a starved expert cache costs reads on every token (measured: a 4096 context took 268 of 630 MB, hit
    rate 21 % against 63 % at 256)."""
    budget = parse_bytes(memory_budget)
    c = open_container(path, verify=False)
    try:
        top = default_max_ctx(c.spec)
    finally:
        c.close()
    if limit is not None:
        top = min(top, limit)
    if budget is None:
        return top
    ctx = 1 << (max(top, 1).bit_length() - 1)
    fitting = None
    for c in ([top] if top != ctx else []) + [ctx >> i for i in range(ctx.bit_length()) if ctx >> i >= MIN_AUTO_CTX]:
        plan = budget_plan(path, c, threads, mode, precision, n_seq)
        if plan["minimum_bytes"] > budget:
            continue
        fitting = fitting or c
        if not leave_experts or plan["kv_bytes"] <= budget - (plan["dense_bytes"] + plan["kv_bytes"] +
                                                                plan["scratch_bytes"]):
            return c
    return fitting


def load(path: str | Path, memory_budget=None, threads: int | None = None, engine: str = "auto",
         max_ctx: int | None = None, verify: bool = True, precision: int | None = None, mode: str = "exact",
         prefetch: int = 1, verify_reads: str | None = None, n_seq: int | None = None, **stream_options) -> Model:
    """Open a `.emoe` container.

    memory_budget: "1.5GB", bytes, or None (unlimited: the file is mapped). With a budget the C core holds the dense
    weights, the KV cache for max_ctx, scratch and a byte-budgeted expert cache within it, streaming experts from the
    file; a budget below the minimum raises an error stating it. mode: "exact" (default; output identical to the
    all-resident model), "adaptive" (MWQ: skip refinement planes that would stall), "ondemand" (baseline: LRU, no
    prefetch). prefetch: 0 none, 1 before each layer's attention (default), 2 also the next layer.
    stream_options: prefetch_extra, io_threads, direct, drop_cache (see CEngine.open_streaming). With a budget the
    expert reads use O_DIRECT by default, so the page cache does not hold the file beside the budget; where the file
    system refuses O_DIRECT they are buffered and their pages dropped after use; stats["read_mode"] says which ran
    (and stats["read_note"] why O_DIRECT is off). The budget bounds the C core's memory (dense weights, KV cache,
    scratch, expert cache), not the Python process around it: `edgemoe fit` reports that process's total.
    verify_reads: with a budget, "first" (default when verify), "always" (every read of an expert piece) or "never".
    precision: for MWQ containers, the number of bit planes every expert runs at (1 = the base plane only;
    default: all stored planes). Bits per weight = base bits + precision - 1.
    verify: check checksums: without a budget every tensor now; with one, the dense weights at load and each expert
    piece on its first read (reading the whole file up front would put all of it in memory).
    n_seq: sequences the KV cache holds for Model.generate_batch (default 1). With a budget the budget includes the KV
    cache of all of them and a batch runs at most n_seq sequences at once; without one generate_batch grows it as
    needed.
    """
    streaming = memory_budget is not None or mode != "exact"
    if stream_options and not streaming:  # they would be ignored: say so instead
        raise EdgeMoEError(f"{', '.join(sorted(stream_options))}: option(s) of loading under a memory budget "
                           "(memory_budget=..., or mode='adaptive' / 'ondemand'); without one they do nothing")
    # Without a budget every checksum is checked here (zlib's CRC-32 runs at memory speed; the C container's own
    # check, emoe_container_verify, is several times slower today); with one, the C core checks what it reads.
    container = open_container(path, verify=verify and not streaming)
    reads = verify_reads or ("first" if verify else "never")
    opts = {"prefetch": prefetch, "verify": reads, **stream_options} if streaming else None
    try:
        if verify and streaming and "tokenizer.json" in container.tensors:
            container.verify("tokenizer.json")  # the C core checks what it reads; the tokenizer is read here
        return Model(container, memory_budget, threads, engine, max_ctx, precision, mode, opts, n_seq, verify)
    except BaseException:
        container.close()
        raise


__all__ = ["FINISH_REASONS", "GLOBAL_TENSORS", "Generation", "GenerationStream", "Model", "context_for_budget", "load"]
