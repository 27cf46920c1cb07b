"""Calibration: stream text through the model one layer at a time and collect what compression needs.

One pass serves every later stage (MC-SMoE merging, MWQ scale fitting, the pre-attention predictor):
per layer, the expert selection counts, a sample of router logits, and per expert the Gram blocks X_g^T X_g of its
inputs (gate/up side: the normalized hidden state; down side: the activation) for groups of `group_size` input
channels. Gram blocks instead of X keep memory bounded: ||W X^T - W_hat X^T||^2 restricted to a group's
diagonal block is all the scale fitting uses. Only one layer's weights are materialized at a time; the hidden
states of the calibration tokens are carried from layer to layer.
"""

from __future__ import annotations

import functools
from collections import ChainMap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.arch import GLOBAL_TENSORS, ArchSpec, dense_tensor_names, expert_tensor_name
from edgemoe.errors import EdgeMoEError
from edgemoe.reference import (
    attention_block,
    batched_mixer,
    ffn_block,
    ffn_inputs,
    layer_output,
    rms_norm,
    router_logits,
)

from .blas import one_blas_thread
from .checkpoint import Checkpoint
from .progress import progress


@dataclass
class LayerCalibration:
    layer: int
    dense: dict[str, np.ndarray]  # container name -> f32, this layer's dense tensors
    experts: dict[str, np.ndarray]  # container name -> f32 [out, in], this layer's expert matrices
    n_tokens: int = 0  # calibration tokens that passed through the layer
    freq: np.ndarray | None = None  # [E] top-k selection counts
    router_logits: np.ndarray | None = None  # [T_sample, E] true router logits
    pre_attn_input: np.ndarray | None = None  # [T_sample, H] attn_norm(layer input): what a predictor can see early
    gram_in: dict[int, np.ndarray] = field(default_factory=dict)  # e -> [H/g, g, g] f32 of routed tokens' inputs
    gram_mid: dict[int, np.ndarray] = field(default_factory=dict)  # e -> [I/g, g, g] f32 of the activation
    expert_tokens: np.ndarray | None = None  # [E] routed tokens per expert
    saliency: np.ndarray | None = None  # [E] REAP: mean over routed tokens of gate weight x ||expert output||
    hidden_out: list[np.ndarray] | None = None  # per sequence [T, H]: the layer's output (original weights)


def gram_blocks(x: np.ndarray, group: int) -> np.ndarray:
    """[n, d] -> [d/group, group, group] float32 diagonal blocks of x^T x (one BLAS product per block).

    float32 accumulation and storage: the blocks only weight the MWQ fit and the merge, which damp them (relative
    error ~1e-6 against the sampling noise of a few thousand tokens); float64 products took a third of a calibrated
    layer, and float64 storage 0.2 GB per OLMoE layer. Consumers that sum blocks do it in float64 (`merge_stage`)."""
    d = x.shape[1]
    x = np.asarray(x, np.float32)
    out = np.empty((d // group, group, group), np.float32)
    with one_blas_thread():  # small products: 2 BLAS threads took ~10x the CPU time on the shared machine
        for b in range(d // group):  # a column slice of x is a strided BLAS operand: no copy of x
            xb = x[:, b * group : (b + 1) * group]
            np.matmul(xb.T, xb, out=out[b])
    return out


def expert_saliency(gate_w: np.ndarray, act: np.ndarray, down: np.ndarray) -> float:
    """REAP's saliency of one expert (Lasby et al. 2025, router-weighted expert activation pruning): the mean over
    the tokens routed to it of gate weight x ||expert output||_2, the output being its down projection of `act`
    (expert biases left out). An expert the router trusts little, or whose output is small, contributes little when
    it is removed."""
    if len(gate_w) == 0:
        return 0.0
    out = np.asarray(act, np.float32) @ np.asarray(down, np.float32).T
    return float(np.mean(np.asarray(gate_w, np.float64) * np.linalg.norm(out, axis=1)))


def compact(arr: np.ndarray) -> np.ndarray:
    """An f32 weight matrix as float16 when that is exact (an f16 checkpoint, the usual case), else unchanged.

    A layer's experts are held while it is calibrated and quantized: 1.6 GB in f32 at OLMoE-1B-7B's size, half in
    f16. The consumers (matmuls, the merge, the MWQ fit) convert up as they read, so the results are identical."""
    if arr.dtype != np.float32:
        return arr
    half = arr.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), arr) else arr


def as_f32(weights: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A weight for the forward pass, float16 (see `compact`) converted here: NumPy's matmul of float32 by float16
    converts inside the product, 1.3x slower than converting first (measured at OLMoE's expert shape)."""
    arr = weights[name]
    return arr.astype(np.float32) if arr.dtype == np.float16 else arr


def layer_experts(ckpt, layer: int) -> dict[str, np.ndarray]:
    """One MoE layer's expert matrices, container name -> [out, in] (float16 when exact, see `compact`)."""
    return {name: compact(arr) for name, arr in ckpt.layer_experts(layer)}


def load_calibration_ids(tokenizer_json: bytes | None, path: str | Path | None, n_tokens: int, seq_len: int,
                         vocab: int) -> list[np.ndarray]:
    """Tokenize a calibration text into sequences of `seq_len` (at most `n_tokens` tokens in all)."""
    if path is None:
        raise EdgeMoEError("calibration needs text: pass --calib FILE")
    p = Path(path)
    if not p.exists():
        raise EdgeMoEError(f"{p}: calibration text not found")
    if tokenizer_json is None:
        raise EdgeMoEError("the checkpoint has no tokenizer.json, which calibration on text needs")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    ids = np.array(tok.encode(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False).ids)
    ids = ids[ids < vocab]
    if len(ids) < seq_len:
        raise EdgeMoEError(f"{p}: only {len(ids)} tokens; calibration needs at least {seq_len}")
    chunks = len(ids) // seq_len
    n_seq = max(1, min(chunks, n_tokens // seq_len))
    # evenly spaced windows over the whole file: a text made of several domains is sampled from all of them
    starts = np.linspace(0, chunks - 1, n_seq).round().astype(int) * seq_len
    return [ids[s : s + seq_len] for s in starts]


def calibrate(ckpt: Checkpoint, seqs: list[np.ndarray], group_size: int = 128, sample_tokens: int = 8192,
              collect_grams: bool = True, show_progress: bool = True,
              collect_saliency: bool = False,
              on_expert_done: Callable[[LayerCalibration, int], None] | None = None) -> Iterator[LayerCalibration]:
    """Yield one LayerCalibration per layer, in order. The caller may modify `experts` before the next layer.

    The layer is computed by the reference forward pass (`edgemoe.reference`: the layer's blocks, `moe`); its hooks
    hand over the routing and each expert's routed inputs, from which the statistics are taken. collect_saliency:
    also REAP's saliency per expert (`expert_saliency`; one more down projection per expert, so only on request).
    on_expert_done(cal, e): called as soon as expert e's statistics are complete (its forward pass is done), while
    the layer's other experts still run: the exporter starts fitting e's planes then, and may drop e's matrices from
    `cal.experts` once fitted (the pass never reads them again).
    """
    spec: ArchSpec = ckpt.spec
    embed = next(arr for name, arr in ckpt.global_tensor_items() if name == GLOBAL_TENSORS["embed"])
    lengths = [len(s) for s in seqs]
    # the calibration tokens' hidden states as one [tokens, H] array (sequences one after the other)
    hidden = np.concatenate([embed[s].astype(np.float32) * np.float32(spec.embed_scale) for s in seqs])
    del embed
    total = sum(lengths)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(total, size=min(total, sample_tokens), replace=False))
    gi = group_size if spec.hidden % group_size == 0 else spec.hidden
    gm = group_size if spec.expert_ffn % group_size == 0 else spec.expert_ffn
    for layer in progress(range(spec.n_layers), "calibrating layers", show_progress):
        dense = ckpt.layer_dense(layer)
        experts = layer_experts(ckpt, layer) if spec.is_moe_layer(layer) else {}
        weights = ChainMap(dense, experts)  # a view: an expert dropped from `experts` (fitted, see on_expert_done) is gone
        w = functools.partial(as_f32, weights)
        names = dense_tensor_names(spec, layer)
        cal = LayerCalibration(layer, dense, experts, n_tokens=total)
        x_in = hidden
        h = mixer_all(spec, layer, x_in, lengths, w, names)
        del hidden
        if spec.is_moe_layer(layer):
            # the router's input and the pre-attention state only at the sampled tokens (both are row-wise)
            _, router_x = ffn_inputs(spec, layer, x_in[sample], h[sample], w, names)
            cal.router_logits = router_logits(spec, router_x, w, names)
            cal.pre_attn_input = rms_norm(x_in[sample], w(names["attn_norm"]), spec.norm_eps)
            del router_x
            cal.expert_tokens = np.zeros(spec.n_experts, dtype=np.int64)

            cal.saliency = np.zeros(spec.n_experts) if collect_saliency else None
            routing = {}

            def on_route(_layer, ids, weights, cal=cal, routing=routing):
                cal.freq = np.bincount(ids.reshape(-1), minlength=spec.n_experts).astype(np.float64)
                routing["ids"], routing["weights"] = ids, weights

            def on_expert(e, rows, xr, act, cal=cal, routing=routing, w=w, layer=layer):
                cal.expert_tokens[e] = len(rows)
                if collect_grams:
                    cal.gram_in[e] = gram_blocks(xr, gi)
                    cal.gram_mid[e] = gram_blocks(act, gm)
                if cal.saliency is not None:
                    ids, weights = routing["ids"][rows], routing["weights"][rows]
                    gate_w = np.where(ids == e, weights, 0.0).sum(axis=1)
                    down = w(expert_tensor_name(layer, e, "down"))
                    cal.saliency[e] = expert_saliency(gate_w, act, down)
                if on_expert_done is not None:
                    on_expert_done(cal, e)

            # the layer input is only read again when the router reads it (SmallThinker): else it is freed here, one
            # [tokens, H] array less while the experts run
            if spec.router_input != "layer_input":
                x_in = None
            out = ffn_block(spec, layer, x_in, h, w, names, on_route, on_expert)
            routing.clear()
        else:
            out = ffn_block(spec, layer, x_in, h, w, names)
        del x_in
        hidden = layer_output(spec, h, out, w, names)
        del h, out
        cal.hidden_out = np.split(hidden, np.cumsum(lengths)[:-1])
        yield cal
        # drop this layer's weights before the next layer is read (the caller has dropped or cleared its `cal`), so
        # the stream holds one layer of experts, not two
        del cal, dense, experts, weights, w
        on_route = on_expert = None  # the hooks hold `cal` too


ATTN_CHUNK_TOKENS = 2048  # tokens whose attention runs at once: [S, heads, T, T] scores of ~30 MB at OLMoE's shape


def mixer_all(spec: ArchSpec, layer: int, x: np.ndarray, lengths: list[int], w, names: dict[str, str]) -> np.ndarray:
    """`attention_block` over every calibration sequence (x: [tokens, H], the sequences one after the other).

    Equal-length sequences go through plain attention in batches of ATTN_CHUNK_TOKENS tokens ([S, T, H]: one
    projection matmul per batch); other layer kinds and unequal lengths one sequence at a
    time. Same arithmetic either way (tests/test_calibrate.py)."""
    out = np.empty_like(x)
    T = lengths[0]
    if batched_mixer(spec, layer) and all(n == T for n in lengths):
        per = max(1, ATTN_CHUNK_TOKENS // T)
        for s0 in range(0, len(lengths), per):
            rows = slice(s0 * T, min(len(lengths), s0 + per) * T)
            out[rows] = attention_block(spec, layer, x[rows].reshape(-1, T, x.shape[1]), w, names).reshape(-1,
                                                                                                            x.shape[1])
        return out
    start = 0
    for n in lengths:
        out[start : start + n] = attention_block(spec, layer, x[start : start + n], w, names)
        start += n
    return out
