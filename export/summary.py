"""What an export did, as data: time per stage, bytes per part before and after, the merge map, routing counts.

The exporter streams one layer at a time, so its stages (read, calibrate, merge, quantize, predictor, write)
interleave.
`StageClock` measures each stage's exclusive time: a stage entered inside another (the checkpoint read that
calibration triggers) is charged to itself and taken out of the outer one, so the stage times add up to the total.
`RecordingWriter` is the container writer that also times its writes and notes each stored tensor's size.
`ExportRecorder.summary()` is the plain dict saved as `metadata["export_summary"]` and printed by `edgemoe export`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TypeVar

import numpy as np

from edgemoe.container import ContainerWriter

STAGES = ("read", "calibrate", "merge", "quantize", "predictor", "write")
PARTS = ("embeddings", "attention", "norms", "router", "predictor", "shared expert", "dense FFN", "experts",
         "lm_head", "other")

T = TypeVar("T")


def part_of(name: str) -> str:
    """The part of the model a tensor belongs to, from its container (GGUF-style) or Hugging Face name."""
    n = name.lower()
    if "embed_tokens" in n or n.startswith("token_embd"):
        return "embeddings"
    if n.startswith("lm_head") or n in ("output.weight", "output.bias"):
        return "lm_head"
    if "shared_expert" in n or "shexp" in n:
        return "shared expert"
    if ".experts." in n or ".expert." in n or "_exps" in n:
        return "experts"
    if "ffn_gate_inp_pre" in n or "predictor" in n:
        return "predictor"
    if "ffn_gate_inp" in n or "router" in n or n.endswith("mlp.gate.weight") or "block_sparse_moe.gate." in n:
        return "router"
    if "norm" in n:
        return "norms"
    if "attn" in n:
        return "attention"
    if "mlp." in n or "ffn_" in n:
        return "dense FFN"
    return "other"


def source_tensor_sizes(ckpt) -> dict[str, tuple[int, int, str]]:
    """name -> (bytes, weights, dtype) as stored in the source (safetensors, GGUF or container); {} if unknown."""
    out: dict[str, tuple[int, int, str]] = {}
    files = getattr(getattr(ckpt, "tensors", None), "files", None)
    if files is not None:  # a Hugging Face directory (safetensors_lazy)
        for f in files:
            for name, e in f.entries.items():
                start, end = e["data_offsets"]
                out[name] = (end - start, int(np.prod(e["shape"], dtype=np.int64)), e["dtype"].lower())
        return out
    reader = getattr(ckpt, "_reader", None)
    if reader is not None:  # GGUF
        for t in reader.tensors:
            out[t.name] = (int(t.n_bytes), int(t.n_elements), t.tensor_type.name.lower())
        return out
    c = getattr(ckpt, "_c", None)
    if c is not None and hasattr(c, "tensors"):  # an .emoe container re-exported
        for name, t in c.tensors.items():
            if t.kind != "blob":
                out[name] = (t.nbytes, int(np.prod(t.shape)), t.dtype)
    return out


class StageClock:
    """Exclusive wall time per stage; nested stages are subtracted from the stage they run inside."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [stage, start, time spent in nested stages]
        self.t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            stage, start, nested = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed - nested
            if self._stack:
                self._stack[-1][2] += elapsed

    def iterate(self, items: Iterable[T], name: str) -> Iterator[T]:
        """Yield from `items`, charging the time each item takes to produce to stage `name`."""
        it = iter(items)
        while True:
            with self.stage(name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


class TimedSource:
    """A checkpoint whose tensor reads are charged to the "read" stage; everything else passes through."""

    def __init__(self, ckpt, clock: StageClock):
        self._ckpt, self._clock = ckpt, clock

    def __getattr__(self, name):
        return getattr(self._ckpt, name)

    def global_tensor_items(self):
        return self._clock.iterate(self._ckpt.global_tensor_items(), "read")

    def global_tensors(self):
        return dict(self.global_tensor_items())

    def layer_dense(self, layer: int):
        with self._clock.stage("read"):
            return self._ckpt.layer_dense(layer)

    def layer_experts(self, layer: int):
        return self._clock.iterate(self._ckpt.layer_experts(layer), "read")


class RecordingWriter(ContainerWriter):
    """The container writer, timing its writes (stage "write") and noting each tensor's stored size."""

    def __init__(self, path, spec, metadata, clock: StageClock):
        super().__init__(path, spec, metadata)
        self.clock = clock

    def add_tensor(self, *args, **kwargs):
        with self.clock.stage("write"):
            return super().add_tensor(*args, **kwargs)

    def add_planes(self, *args, **kwargs):
        with self.clock.stage("write"):
            return super().add_planes(*args, **kwargs)

    def close(self):
        with self.clock.stage("write"):
            return super().close()


class ExportRecorder:
    """Collects an export's figures; `summary()` turns them into the dict stored in the container."""

    def __init__(self, ckpt):
        self.clock = StageClock()
        self.source_sizes = source_tensor_sizes(ckpt)
        self.routing_tokens: int | None = None
        self.expert_tokens: dict[int, list[int]] = {}

    def source(self, ckpt) -> TimedSource:
        return TimedSource(ckpt, self.clock)

    def writer(self, path, spec, metadata) -> RecordingWriter:
        return RecordingWriter(path, spec, metadata, self.clock)

    def note_routing(self, layer: int, tokens_per_expert, n_tokens: int) -> None:
        """Calibration routing counts of one layer: routed (token, slot) pairs per stored expert."""
        if tokens_per_expert is not None:
            self.expert_tokens[layer] = [int(x) for x in np.asarray(tokens_per_expert).reshape(-1)]
            self.routing_tokens = int(n_tokens)

    def summary(self, w: ContainerWriter) -> dict:
        parts: dict[str, dict] = {}

        def row(part: str) -> dict:
            return parts.setdefault(part, {"tensors": 0, "weights": 0, "stored_bytes": 0, "stored_dtypes": [],
                                           "source_bytes": 0, "source_dtypes": []})

        for t in w.tensors:
            if t.kind == "blob":
                continue
            r = row(part_of(t.name))
            r["tensors"] += 1
            r["weights"] += int(np.prod(t.shape))
            r["stored_bytes"] += int(t.nbytes)
            dt = t.dtype if t.dtype != "mwq" else f"mwq{t.quant.get('base_bits', '?')}+{len(t.planes) - 1}"
            if dt not in r["stored_dtypes"]:
                r["stored_dtypes"].append(dt)
        for name, (nbytes, _, dtype) in self.source_sizes.items():
            r = row(part_of(name))
            r["source_bytes"] += nbytes
            if dtype not in r["source_dtypes"]:
                r["source_dtypes"].append(dtype)
        for r in parts.values():
            r["bits_per_weight"] = round(8 * r["stored_bytes"] / r["weights"], 4) if r["weights"] else None
        ordered = {p: parts[p] for p in PARTS if p in parts}
        out = {
            "stages_s": {s: round(self.clock.seconds.get(s, 0.0), 3) for s in STAGES if s in self.clock.seconds},
            "total_s": round(self.clock.total, 3),
            "parts": ordered,
            "source_bytes": sum(r["source_bytes"] for r in ordered.values()),
            "stored_bytes": sum(r["stored_bytes"] for r in ordered.values()),
        }
        emap = [w.spec.layer_expert_map(layer) for layer in range(w.spec.n_layers)]
        if any(m is not None for m in emap):
            out["merge_map"] = [None if m is None else {
                "experts": len(m), "stored": max(m) + 1 if m else 0,
                "groups": [[e for e, g in enumerate(m) if g == k] for k in range(max(m) + 1 if m else 0)],
                "pruned": [e for e, g in enumerate(m) if g < 0]} for m in emap]
        if self.expert_tokens:
            out["routing"] = {"calib_tokens": self.routing_tokens,
                              "expert_tokens": [self.expert_tokens.get(layer) for layer in range(w.spec.n_layers)]}
        return out


def stage(w, name: str):
    """`with stage(w, "quantize"):` times the block when `w` is a RecordingWriter, and does nothing otherwise."""
    clock = getattr(w, "clock", None)
    return clock.stage(name) if clock is not None else nullcontext()
