"""Calibration: stream text through the model one layer at a time and collect what compression needs.

One pass serves every later stage (MC-SMoE merging, MWQ scale fitting, the pre-attention predictor):
per layer, the expert selection counts, a sample of router logits, and per expert the Gram blocks X_g^T X_g of its
inputs (gate/up side: the normalized hidden state; down side: the activation) for groups of `group_size` input
channels. Gram blocks instead of X keep memory bounded: ||W X^T - W_hat X^T||^2 restricted to a group's
diagonal block is all the scale fitting uses. Only one layer's weights are materialized at a time; the hidden
states of the calibration tokens are carried from layer to layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.arch import GLOBAL_TENSORS, ArchSpec, dense_tensor_names, expert_tensor_name
from edgemoe.errors import EdgeMoEError
from edgemoe.reference import attention, expert_bias, ffn, ffn_hidden, rms_norm, route, router_logits

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
    gram_in: dict[int, np.ndarray] = field(default_factory=dict)  # e -> [H/g, g, g] of routed tokens' inputs
    gram_mid: dict[int, np.ndarray] = field(default_factory=dict)  # e -> [I/g, g, g] of the activation
    expert_tokens: np.ndarray | None = None  # [E] routed tokens per expert
    hidden_out: list[np.ndarray] | None = None  # per sequence [T, H]: the layer's output (original weights)


def gram_blocks(x: np.ndarray, group: int) -> np.ndarray:
    """[n, d] -> [d/group, group, group] diagonal blocks of x^T x (float64 accumulation)."""
    n, d = x.shape
    xb = x.reshape(n, d // group, group).astype(np.float64)
    return np.matmul(xb.transpose(1, 2, 0), xb.transpose(1, 0, 2))  # batched BLAS; einsum here was 10x slower


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
              collect_grams: bool = True, show_progress: bool = True) -> Iterator[LayerCalibration]:
    """Yield one LayerCalibration per layer, in order. The caller may modify `experts` before the next layer."""
    spec: ArchSpec = ckpt.spec
    embed = next(arr for name, arr in ckpt.global_tensor_items() if name == GLOBAL_TENSORS["embed"])
    hidden = [embed[s].astype(np.float32) for s in seqs]
    del embed
    lengths = [len(s) for s in seqs]
    total = sum(lengths)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(total, size=min(total, sample_tokens), replace=False))
    gi = group_size if spec.hidden % group_size == 0 else spec.hidden
    gm = group_size if spec.expert_ffn % group_size == 0 else spec.expert_ffn
    for layer in progress(range(spec.n_layers), "calibrating layers", show_progress):
        dense = ckpt.layer_dense(layer)
        experts = dict(ckpt.layer_experts(layer)) if spec.is_moe_layer(layer) else {}
        weights = {**dense, **experts}
        w = weights.__getitem__
        names = dense_tensor_names(spec, layer)
        cal = LayerCalibration(layer, dense, experts, n_tokens=total)
        after_attn, layer_inputs = [], []
        for x in hidden:
            layer_inputs.append(x)
            after_attn.append(x + attention(spec, layer, rms_norm(x, w(names["attn_norm"]), spec.norm_eps), w, names))
        h = np.concatenate(after_attn)
        x_in = np.concatenate(layer_inputs)
        hn = rms_norm(h, w(names["ffn_norm"]), spec.norm_eps)
        if spec.is_moe_layer(layer):
            router_x = x_in if spec.router_input == "layer_input" else hn
            logits = router_logits(spec, router_x, w, names)
            ids, gates = route(spec, logits)
            cal.freq = np.bincount(ids.reshape(-1), minlength=spec.n_experts).astype(np.float64)
            cal.router_logits = logits[sample]
            cal.pre_attn_input = rms_norm(x_in[sample], w(names["attn_norm"]), spec.norm_eps)
            cal.expert_tokens = np.zeros(spec.n_experts, dtype=np.int64)
            out = np.zeros_like(hn)
            for e in range(spec.n_experts):
                rows, slot = np.nonzero(ids == e)
                cal.expert_tokens[e] = len(rows)
                if not len(rows):
                    continue
                xe = hn[rows]
                bias = expert_bias(spec, w, names, e)
                act = ffn_hidden(spec, xe, w(expert_tensor_name(layer, e, "gate")),
                                 w(expert_tensor_name(layer, e, "up")), bias)
                y = act @ w(expert_tensor_name(layer, e, "down")).T
                out[rows] += gates[rows, slot][:, None] * (y if bias is None else y + bias[2])
                if collect_grams:
                    cal.gram_in[e] = gram_blocks(xe, gi)
                    cal.gram_mid[e] = gram_blocks(act, gm)
            if spec.shared_ffn:
                sh = ffn(spec, hn, w(names["sh_gate"]), w(names["sh_up"]), w(names["sh_down"]))
                if spec.shared_gate:
                    sh = sh / (1.0 + np.exp(-(hn @ w(names["sh_gate_inp"]))))[:, None]
                out += sh
        else:
            out = ffn(spec, hn, w(names["mlp_gate"]), w(names["mlp_up"]), w(names["mlp_down"]))
        h = h + out
        hidden = np.split(h, np.cumsum(lengths)[:-1])
        cal.hidden_out = hidden
        yield cal
