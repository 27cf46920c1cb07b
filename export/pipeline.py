"""`edgemoe export`: checkpoint -> container, streamed layer by layer.

The container's dense part (embeddings, norms, attention, routers, shared experts, lm_head) is written first,
then each expert matrix in its own 4 KiB-aligned region. Only one layer's tensors are in memory at a time.

Stages (one function each):
1. `_check_options` / `_plan`: validate the options and decide the storage of every part;
2. `_write_dense`: the tokenizer and every dense tensor (f32, f16 or Q8_0);
3. `_write_experts_float` (--bits 32/16) or `_write_experts_mwq` (--bits 2..8): the expert matrices. The MWQ path
   streams calibration text through the model one layer at a time (`calibrate.py`, a second pass over the
   checkpoint) and fits each expert's bit planes to that expert's own inputs (`mwq.py`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.arch import EXPERT_MATRICES, expert_tensor_name
from edgemoe.container import ContainerWriter
from edgemoe.errors import EdgeMoEError
from edgemoe.quant import Q8_0_BLOCK, quantize_q8_0

from .mwq import NESTINGS, check_bits, choose_group_size, quantize_matrix
from .progress import progress
from .sources import open_source as open_checkpoint  # HF directory or .gguf
from .summary import ExportRecorder, stage

FLOAT_BITS = (32, 16)
MWQ_BITS = tuple(range(8, 1, -1))  # 8..2: total bits of the nested planes
SUPPORTED_BITS = FLOAT_BITS + MWQ_BITS
DEFAULT_CALIB_TOKENS = 16384
CALIB_SEQ_LEN = 256
CALIB_FILE = "calib.txt"  # a checkpoint directory may ship its own calibration text under this name


def min_calib_tokens(group_size: int) -> int:
    """Below this many routed calibration tokens an expert's planes are fitted to the weight-only error.

    A Gram block of `group_size` channels built from n tokens has rank <= n: with n < group_size the weighted fit
    is blind in group_size - n directions, and near n = group_size the sample covariance is still mostly noise (the
    weighted fit then chases that noise). Twice the group size gives a full-rank, roughly conditioned estimate.
    """
    return 2 * group_size


@dataclass
class Plan:
    bits: int
    dense_bits: int
    base_bits: int | None = None
    group_size: int | None = None
    nesting: str | None = None
    calib: Path | None = None
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    dense_f16_fallback: list[str] = field(default_factory=list)  # matrices Q8_0 cannot store (in % 32 != 0)
    calib_tokens_used: int = 0

    @property
    def mwq(self) -> bool:
        return self.bits in MWQ_BITS


def _check_options(bits, dense_bits, base_bits, nesting, calib_tokens) -> None:
    if bits not in SUPPORTED_BITS:
        raise EdgeMoEError(f"--bits {bits} is not available; supported: 32, 16 (floats) or 8..2 (MWQ bit planes)")
    if dense_bits not in (None, 32, 16, 8):
        raise EdgeMoEError(f"--dense-bits {dense_bits}: expected 8, 16 or 32")
    if bits in MWQ_BITS:
        check_bits(base_bits, bits)
        if nesting not in NESTINGS:
            raise EdgeMoEError(f"--nesting {nesting!r}: expected one of {', '.join(NESTINGS)}")
        if calib_tokens < CALIB_SEQ_LEN:
            raise EdgeMoEError(f"--calib-tokens {calib_tokens}: need at least {CALIB_SEQ_LEN}")


def _plan(ckpt, src: Path, bits, dense_bits, base_bits, group_size, nesting, calib, calib_tokens) -> Plan:
    spec = ckpt.spec
    if bits in FLOAT_BITS:
        return Plan(bits, dense_bits or bits)
    g = choose_group_size([spec.hidden, spec.expert_ffn], group_size)
    plan = Plan(bits, dense_bits or 8, base_bits, g, nesting, None, calib_tokens)
    if nesting == "msb":
        return plan  # MSB slicing is min/max per group: no calibration
    calib_path = Path(calib) if calib else (src if src.is_dir() else src.parent) / CALIB_FILE
    if not calib_path.exists():
        where = f"{calib}: no such file" if calib else f"{src} has no {CALIB_FILE}"
        raise EdgeMoEError(f"--bits {bits} fits the expert planes to calibration text ({where}): pass --calib FILE, "
                           f"a UTF-8 text like the model's training data (not its evaluation text)")
    if ckpt.tokenizer_json is None:
        raise EdgeMoEError(f"{src}: no tokenizer.json, which calibration (--bits {bits}) needs")
    plan.calib = calib_path
    return plan


def _encode_dense(name: str, arr: np.ndarray, plan: Plan) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """Storage for one dense tensor: 1-D tensors (norms, biases) and every bias stay f32; matrices follow
    --dense-bits."""
    width = plan.dense_bits
    if arr.ndim == 1 or name.endswith(".bias") or width == 32:
        return arr.astype(np.float32), "f32", arr.shape
    if width == 8:
        if arr.shape[-1] % Q8_0_BLOCK == 0:
            return quantize_q8_0(arr), "q8_0", arr.shape
        plan.dense_f16_fallback.append(name)
    return arr.astype(np.float16), "f16", arr.shape


def _write_dense(w: ContainerWriter, ckpt, plan: Plan, show_progress: bool) -> None:
    if ckpt.tokenizer_json is not None:
        w.add_tensor("tokenizer.json", np.frombuffer(ckpt.tokenizer_json, np.uint8), "bytes", kind="blob")
    for name, arr in ckpt.global_tensors().items():
        with stage(w, "quantize"):  # the writes inside are charged to "write"
            w.add_tensor(name, *_encode_dense(name, arr, plan))
    for layer in progress(range(ckpt.spec.n_layers), "dense layers (read, quantize, write)", show_progress):
        for name, arr in ckpt.layer_dense(layer).items():
            with stage(w, "quantize"):
                w.add_tensor(name, *_encode_dense(name, arr, plan))


def _write_experts_float(w: ContainerWriter, ckpt, plan: Plan, show_progress: bool) -> None:
    spec = ckpt.spec
    dtype, np_dtype = ("f32", np.float32) if plan.bits == 32 else ("f16", np.float16)
    for layer in progress(range(spec.n_layers), f"expert layers (read, {dtype}, write)", show_progress):
        if not spec.is_moe_layer(layer):
            continue
        for name, arr in ckpt.layer_experts(layer):
            with stage(w, "quantize"):
                w.add_tensor(name, arr.astype(np_dtype), dtype, kind="expert")


@dataclass
class ExpertLayer:
    layer: int
    experts: dict[str, np.ndarray]  # container name -> f32 [out, in]
    gram_in: dict[int, np.ndarray] = field(default_factory=dict)
    gram_mid: dict[int, np.ndarray] = field(default_factory=dict)
    tokens: np.ndarray | None = None  # [E] routed calibration tokens per expert


def _expert_layers(ckpt, plan: Plan, show_progress: bool, rec: ExportRecorder | None = None):
    """Yield each MoE layer's experts with their calibration statistics (mwq) or without (msb)."""
    spec = ckpt.spec
    rec = rec or ExportRecorder(None)
    if plan.nesting == "msb":
        for layer in progress(range(spec.n_layers), f"MWQ-{plan.bits} (msb) per layer", show_progress):
            if spec.is_moe_layer(layer):
                yield ExpertLayer(layer, dict(ckpt.layer_experts(layer)))
        return
    from .calibrate import calibrate, load_calibration_ids

    seq_len = min(CALIB_SEQ_LEN, spec.max_position)
    with rec.clock.stage("calibrate"):
        seqs = load_calibration_ids(ckpt.tokenizer_json, plan.calib, plan.calib_tokens, seq_len, spec.vocab)
    plan.calib_tokens_used = sum(len(s) for s in seqs)
    stream = calibrate(ckpt, seqs, group_size=plan.group_size, show_progress=show_progress)
    for cal in rec.clock.iterate(stream, "calibrate"):
        if spec.is_moe_layer(cal.layer):
            rec.note_routing(cal.layer, cal.expert_tokens, plan.calib_tokens_used)
            yield ExpertLayer(cal.layer, cal.experts, cal.gram_in, cal.gram_mid, cal.expert_tokens)


def _write_experts_mwq(w: ContainerWriter, ckpt, plan: Plan, show_progress: bool,
                       rec: ExportRecorder | None = None) -> dict:
    """Write every expert matrix as nested planes, layer by layer. Returns metadata to record."""
    spec = ckpt.spec
    g = plan.group_size
    min_tokens = min_calib_tokens(g)
    weight_only: list[str] = []
    tokens_per_expert: dict[str, int] = {}
    quant = {"base_bits": plan.base_bits, "group_size": g, "nesting": plan.nesting}
    fit_s = 0.0
    for el in _expert_layers(ckpt, plan, show_progress, rec):
        t0 = time.perf_counter()
        for e in range(spec.stored_experts(el.layer)):
            prefix = f"blk.{el.layer}.expert.{e}"
            seen = int(el.tokens[e]) if el.tokens is not None and e < len(el.tokens) else 0
            weighted = plan.nesting == "mwq" and seen >= min_tokens
            if plan.nesting == "mwq":
                tokens_per_expert[prefix] = seen
                if not weighted:
                    weight_only.append(prefix)
            for matrix in EXPERT_MATRICES:
                name = expert_tensor_name(el.layer, e, matrix)
                gram = (el.gram_mid if matrix == "down" else el.gram_in).get(e) if weighted else None
                with stage(w, "quantize"):
                    qm = quantize_matrix(el.experts[name], gram, plan.base_bits, plan.bits, g, plan.nesting)
                w.add_planes(name, qm.planes, qm.shape, kind="expert", quant={**quant, "weighted": qm.weighted})
        dt = time.perf_counter() - t0
        fit_s += dt
        if show_progress:
            print(f"  layer {el.layer}: {spec.stored_experts(el.layer)} experts quantized in {dt:.1f} s",
                  file=sys.stderr)
        el.experts.clear()
    meta = {}
    if show_progress:
        print(f"MWQ fitting took {fit_s:.1f} s in all", file=sys.stderr)
    if plan.nesting == "mwq":
        if show_progress:
            print(f"MWQ: {len(weight_only)} of {len(tokens_per_expert)} experts saw fewer than {min_tokens} "
                  f"calibration tokens and were fitted to the weight-only error", file=sys.stderr)
        meta.update(calib_source=plan.calib.name, calib_tokens=plan.calib_tokens_used, mwq_min_tokens=min_tokens,
                    mwq_weight_only_experts=weight_only, expert_calib_tokens=tokens_per_expert)
    return meta


def export(src: str | Path, out: str | Path, bits: int = 32, dense_bits: int | None = None,
           show_progress: bool = True, base_bits: int = 2, group_size: int | None = None, nesting: str = "mwq",
           calib: str | Path | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS) -> Path:
    """Convert a Hugging Face MoE checkpoint directory into an .emoe container.

    bits: 32 / 16 store the experts as floats; 8..2 store them as MWQ bit planes (a `base_bits` base plane plus
    bits - base_bits binary residual planes), fitted on `calib` (default: `src`/calib.txt). dense_bits: storage of
    the dense matrices (default: = bits for float exports, 8 = Q8_0 when the experts are quantized).
    group_size: None = 128, or the largest power of two below it that divides the expert input dimensions.
    """
    _check_options(bits, dense_bits, base_bits, nesting, calib_tokens)
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise EdgeMoEError(f"{out}: is a directory; give the output file name, e.g. {out / 'model.emoe'}")
    if not out.parent.exists():
        raise EdgeMoEError(f"{out.parent}: output directory does not exist")
    ckpt = open_checkpoint(src)
    plan = _plan(ckpt, src, bits, dense_bits, base_bits, group_size, nesting, calib, calib_tokens)
    rec = ExportRecorder(ckpt)  # stage times and part sizes: metadata["export_summary"]
    metadata = {
        "source": str(src.resolve().name),
        "source_model_type": ckpt.config.get("model_type"),
        "bits": bits,
        "dense_bits": plan.dense_bits,
        "expert_dtype": "mwq" if plan.mwq else ("f32" if bits == 32 else "f16"),
        **getattr(ckpt, "chat_metadata", {}),  # chat_template (+ its special-token strings), when the source has one
    }
    if plan.mwq:
        metadata.update(base_bits=plan.base_bits, group_size=plan.group_size, nesting=plan.nesting,
                        mwq_planes=bits - plan.base_bits + 1)
    source = rec.source(ckpt)  # tensor reads charged to the "read" stage
    with rec.writer(out, ckpt.spec, metadata) as w:
        _write_dense(w, source, plan, show_progress)
        if plan.mwq:
            w.metadata.update(_write_experts_mwq(w, source, plan, show_progress, rec))
        else:
            _write_experts_float(w, source, plan, show_progress)
        if plan.dense_f16_fallback:
            w.metadata["dense_f16_fallback"] = plan.dense_f16_fallback
        w.metadata["export_summary"] = rec.summary(w)
    return out
