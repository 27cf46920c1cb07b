"""`edgemoe export --onnx OUT_DIR`: an MoE checkpoint -> an ONNX decoder graph with a KV cache, for onnxruntime.

The graph is built with `onnx.helper` from the architecture description (never traced with torch.onnx), one
layer at a time from any Checkpoint-like source (HF directory, GGUF, edgemoe container). Inputs and outputs follow
onnxruntime-genai's decoder layout, so a plain onnxruntime loop can prefill and then decode:

  inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64, position_ids [batch, seq] int64,
           past_key_values.{i}.key / .value [batch, n_kv_heads, past, head_dim] float32
  outputs  logits [batch, seq, vocab] float32, present.{i}.key / .value [batch, n_kv_heads, past + seq, head_dim]

Ops (everything runs on onnxruntime's CPU execution provider; choices verified against it, see tests/test_onnx.py):
- RMSNorm, RoPE (neox halves or norm pairs, partial rotary dims), QK-norm (per head and over the projection),
  GQA attention with the causal / padding / sliding-window mask, shared experts with a sigmoid gate, dense MLPs,
  Granite's scalings (embedding, attention, residual: Mul; logits: Div):
  standard ONNX ops (opset 21), so NNCF and `onnx.checker` see a plain graph. GQA is done without repeating K/V:
  the query heads of one KV group are stacked along the sequence axis ([B, kv, rep*S, hd]) and the mask is tiled.
- Routed experts: `com.microsoft.MoE` (fp32) or `com.microsoft.QMoE` (int8 / int4), which softmax the router
  input over all experts, take the top-k and optionally renormalize:
  * SwiGLU experts: gate and up rows interleaved (`swiglu_fusion=1`, the only fused layout the CPU EP runs; FC3
    is not implemented there), activation_alpha=1, activation_beta=0.
  * ReGLU experts (SmallThinker, relu(gate) * up): the CPU EP has no gated ReLU without FC3, so they run as
    SwiGLU with activation_alpha = 1e6: G * sigmoid(alpha G) differs from relu(G) by at most 0.28 / alpha
    = 2.8e-7 absolute (max_t t * sigmoid(-t) = 0.278), below fp32 rounding of the activations.
  * softmax routing: the router logits as they are; normalize_routing_weights = the family's norm_topk.
  * sigmoid routing with top-k renormalization (SmallThinker's default): the router input is log sigmoid(l)
    (= -softplus(-l), monotonic, so the same top-k); softmax then renormalization over the top-k gives
    sigmoid(l_i) / sum_top-k sigmoid(l_j) exactly, as the model defines.
  * merged experts (an edgemoe container with expert_map): each group's expert is copied into its members'
    slots (same function; see sources.WeightSource); pruned slots get -1e30 added to their router input, so
    they never win the top-k and carry no weight.
  Anything else (sigmoid routing without renormalization), or `moe_op="standard"`: standard ops, a dense
  weighted sum over all experts with the top-k weights scattered into an [tokens, E] matrix (correct, E/k times
  the expert compute).
- weights="int8" / "int4": the dense MatMuls (attention, router, shared expert, lm_head) are compressed by NNCF
  `compress_weights` on the ONNX model (INT8_ASYM per channel; INT4_SYM with `group_size`, matrices whose input
  width the group does not divide get a smaller group or stay INT8, NNCF's backup); the embedding and lm_head
  stay INT8_ASYM (NNCF's backup for them). Routed experts are packed for QMoE by this module: symmetric int8 per
  output channel, or int4 in blocks of `group_size` along the input (per output channel when no power-of-two
  block >= 16 divides both widths), zero point 2^(bits-1), fp32 activations (accuracy_level 0: the CPU EP's
  block-wise int8 path quantizes activations to int8, measured 2e-2 relative, so int8 experts use per-channel
  scales, which keep fp32 activations). With the standard-ops expert path the experts stay fp32 (NNCF does not
  compress the 3-D batched expert MatMuls).
- External data (`model.onnx.data`) when the initializers exceed 1 GB (`external_data=None`), or on request.

What onnxruntime 1.31.1's CPU EP does with these graphs (measured; tests/test_onnx.py):
- RMSNorm is written as Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul, which its optimizer fuses into its own
  SimplifiedLayerNormalization (that op is registered in the default domain by onnxruntime only, so writing it
  directly fails `onnx.checker`).
- com.microsoft.GroupQueryAttention runs on CPU and matched the standard-ops attention (3e-7, batch 1, prefill +
  decode with separate past/present buffers), but it takes seqlens_k / total_sequence_length instead of the
  attention mask, so the standard ops stay (they handle left padding and sliding windows directly).
- QMoE ignores normalize_routing_weights=0 (it always renormalizes the top-k; MoE does not): handled above.
- Block-wise int8 QMoE quantizes activations to int8 (2e-2 relative): int8 experts use per-channel scales.
- NNCF's int4 DequantizeLinear + MatMul is fused into MatMulNBits with accuracy_level 4 (int8 activations) unless
  the session sets `session.qdq_matmulnbits_accuracy_level` = 0; both are within the same bounds on the tiny
  models (the weight rounding dominates).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

from edgemoe.arch import GLOBAL_TENSORS, ArchSpec, dense_tensor_names, expert_tensor_name
from edgemoe.errors import EdgeMoEError

from .progress import progress

WEIGHT_MODES = ("fp32", "int8", "int4")
MOE_OPS = ("auto", "ort", "standard")
REGLU_ALPHA = 1e6  # SwiGLU's sigmoid(alpha * G) as a step function: |G sigmoid(alpha G) - relu(G)| <= 0.28 / alpha
MASKED = -1e30  # attention scores / router inputs that must never win (finite: a fully masked row stays finite)
EXTERNAL_DATA_BYTES = 1 << 30
IR_VERSION = 10  # opset 21 needs IR >= 10; onnxruntime 1.31 reads IR <= 13


def _open_any(src):
    """HF directory, .gguf, .emoe container (merged maps expanded; pruned experts kept for masking), or an opened
    Checkpoint-like object."""
    if hasattr(src, "layer_experts"):
        return src, False
    p = Path(src)
    if p.is_file() and p.suffix.lower() == ".emoe":
        from .sources import ContainerSource

        return ContainerSource(p, expand_merged=True, allow_pruned=True), True
    from .sources import open_source

    return open_source(p), False


# ---------------------------------------------------------------------------------------------------------------
# graph builder


class _Graph:
    def __init__(self):
        from onnx import helper

        self.h = helper
        self.nodes = []
        self.inits = []
        self._n = 0
        self._consts: dict[tuple, str] = {}
        self.init_bytes = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        arr = np.ascontiguousarray(arr)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.init_bytes += arr.nbytes
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs, n_out: int = 1, name: str | None = None, domain: str | None = None, **attrs):
        base = name or op_type.lower()
        outs = [self.name(base) for _ in range(n_out)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(self.h.make_node(op_type, list(inputs), outs, name=self.name(f"n_{base}"), **kw, **attrs))
        return outs[0] if n_out == 1 else outs

    def op_to(self, op_type: str, inputs, outputs, **attrs):
        self.nodes.append(self.h.make_node(op_type, list(inputs), list(outputs), name=self.name(f"n_{op_type}"),
                                           **attrs))
        return outputs[0]

    # common pieces
    def matmul(self, x: str, w_out_in: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """x @ W.T (+ b) with W given [out, in]; the initializer is stored [in, out] for MatMul (and NNCF)."""
        w = self.init(name + ".weight", np.ascontiguousarray(w_out_in.T.astype(np.float32)))
        y = self.op("MatMul", [x, w], name=name)
        if bias is not None:
            y = self.op("Add", [y, self.init(name + ".bias", bias.astype(np.float32))], name=name + "_bias")
        return y

    def rms_norm(self, x: str, w: np.ndarray, eps: float, name: str) -> str:
        # Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern onnxruntime's optimizer fuses into its
        # SimplifiedLayerNormalization kernel (which onnx.checker does not know, so it is not written directly)
        sq = self.op("Pow", [x, self.const(2.0, np.float32)], name=name + "_sq")
        ms = self.op("ReduceMean", [sq, self.const([-1])], name=name + "_ms", keepdims=1)
        den = self.op("Sqrt", [self.op("Add", [ms, self.const(eps, np.float32)], name=name + "_eps")],
                      name=name + "_sqrt")
        y = self.op("Div", [x, den], name=name + "_div")
        return self.op("Mul", [y, self.init(name + ".weight", w.astype(np.float32))], name=name)


def _ffn(g: _Graph, spec: ArchSpec, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray, name: str) -> str:
    a = g.matmul(x, gate, name + ".gate_proj")
    act = (g.op("Mul", [a, g.op("Sigmoid", [a], name=name + "_sig")], name=name + "_silu")
           if spec.activation == "swiglu" else g.op("Relu", [a], name=name + "_relu"))
    u = g.matmul(x, up, name + ".up_proj")
    return g.matmul(g.op("Mul", [act, u], name=name + "_glu"), down, name + ".down_proj")


# ---------------------------------------------------------------------------------------------------------------
# expert packing for QMoE


def _qmoe_block(spec: ArchSpec, group_size: int) -> int:
    """Largest power-of-two block <= group_size (>= 16) dividing both expert input widths; 0 = per output row."""
    b = 1 << (max(16, int(group_size)).bit_length() - 1)
    while b >= 16:
        if spec.hidden % b == 0 and spec.expert_ffn % b == 0:
            return b
        b //= 2
    return 0


def quantize_qmoe(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[E, N, K] f32 -> (packed uint8 [E, N, K*bits/8], scales [E, N] or [E, N, K/block], dequantized f32).

    Symmetric: scale = max|w| / (2^(bits-1) - 1) per output row (block=0) or per block of the input; codes
    q = round(w / scale) + 2^(bits-1) (QMoE's default zero point); int4 packs the even k in the low nibble."""
    E, N, K = w.shape
    qmax, zp = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    wb = w.reshape(E, N, K // block, block) if block else w.reshape(E, N, 1, K)
    scale = (np.abs(wb).max(-1, keepdims=True) / qmax).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1.0), scale)
    q = np.clip(np.rint(wb / scale), -qmax, qmax).astype(np.int16)
    deq = (q * scale).reshape(E, N, K).astype(np.float32)
    codes = (q + zp).astype(np.uint8).reshape(E, N, K)
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = scale.reshape(E, N, -1) if block else scale.reshape(E, N)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales), deq


# ---------------------------------------------------------------------------------------------------------------
# the model


# The arch options this writer builds: key -> the values it supports (None: any value). Every other option must
# keep its default (ArchSpec's schema, native/src/arch_fields.h): one a model sets is refused by name, so a new
# option is refused until this writer learns it and is listed here. The required keys (sizes) are always built.
SUPPORTED_OPTIONS: dict[str, tuple | None] = {
    "norm_eps": None, "rope_kind": None, "rope_theta": None, "rope_dim": None, "qkv_bias": None, "qk_norm": None,
    "router_fn": None, "norm_topk": None, "router_input": ("ffn_norm", "layer_input"),
    "activation": ("swiglu", "reglu"), "shared_ffn": None, "shared_gate": None, "dense_ffn": None,
    "dense_layers": None, "nope_layers": None, "sliding_window": None, "swa_layers": None, "tie_embeddings": None,
    "embed_scale": None, "attn_scale": None, "residual_scale": None, "logit_divisor": None,
    "max_position": None, "bos_token_id": None, "eos_token_id": None,
}
# Why some refused options cannot be built yet (the onnxruntime operator limits): option -> text, or for an enum
# option, its value -> text. Only the explanation: the refusal itself needs no entry.
_WHY: dict[str, str | dict[str, str]] = {
    "activation": {
        "swiglu_clamp": "gpt-oss's clamped SwiGLU experts are not com.microsoft.MoE's activation, and its attention "
                        "sinks need a softmax over an extra logit (not in com.microsoft.GroupQueryAttention of the "
                        "pinned onnxruntime)",
        "geglu_tanh": "the experts are GELU-tanh gated (Gemma-4), and com.microsoft.MoE's 'geglu' activation is "
                      "CUDA-only in the pinned onnxruntime (its CPU kernel has relu, gelu, silu, swiglu); this writer "
                      "does not build Gemma-4's layer with standard ops either (per-layer head sizes, values = keys, "
                      "the dense MLP beside the experts)",
    },
    "kv_lora_rank": "Multi-head Latent Attention caches one latent per token, but this graph's cache inputs are "
                    "past_key_values.{i}.key / .value [batch, n_kv_heads, past, head_dim] of equal widths",
    "expert_map": "a source with an unexpanded expert_map is read through the container (pass the container path)",
}
# ... and why the layer kinds other than attention (ArchSpec.layer_kind) cannot be built yet.
_WHY_LAYER_KIND = {
    "conv": "short-convolution layers need their rolling state (the last conv_kernel - 1 inputs) as a past/present "
            "input and output beside the KV cache, and no onnxruntime operator keeps it "
            "(com.microsoft.GroupQueryAttention covers attention only)",
    "linear": "Gated DeltaNet layers carry a causal conv and a recurrent state between calls: they would need "
              "com.microsoft.CausalConvWithState and com.microsoft.GatedDeltaNet (in onnxruntime >= 1.32) with their "
              "states as graph inputs/outputs",
}


def unsupported_options(spec: ArchSpec) -> list[str]:
    """The options of `spec` this writer does not build, in the schema's order: set away from their default and not
    in SUPPORTED_OPTIONS, or set to a value it does not list."""
    out = []
    for f in dataclasses.fields(spec):
        if f.metadata["schema"]["required"]:
            continue
        value = getattr(spec, f.name)
        allowed = SUPPORTED_OPTIONS.get(f.name, ())
        if allowed is None:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if value not in allowed and value != default:
            out.append(f.name)
    return out


def check_supported(spec: ArchSpec) -> None:
    """Refuse, in one message naming them, the options this writer does not build (see SUPPORTED_OPTIONS)."""
    refused = unsupported_options(spec)
    if not refused:
        return
    kinds = dict.fromkeys(spec.layer_kind(layer) for layer in range(spec.n_layers))
    why = [_WHY_LAYER_KIND[k] for k in kinds if k in _WHY_LAYER_KIND]
    for name in refused:
        text = _WHY.get(name)
        text = text.get(getattr(spec, name)) if isinstance(text, dict) else text
        if text:
            why.append(text)
    settings = ", ".join(f"{name}={getattr(spec, name)!r}" for name in refused)
    raise EdgeMoEError(f"ONNX export: {spec.family} sets {settings}, which this ONNX writer does not build"
                       + (": " + "; ".join(why) if why else "") + ". Export to the edgemoe container or GGUF instead")


class _Builder:
    def __init__(self, ckpt, weights: str, moe_op: str, group_size: int, pruned: dict[int, list[int]]):
        self.ck = ckpt
        self.spec: ArchSpec = ckpt.spec
        self.weights = weights
        self.group_size = group_size
        self.pruned = pruned
        self.g = _Graph()
        s = self.spec
        self.ort_moe = moe_op != "standard" and (s.router_fn == "softmax" or s.norm_topk)
        if moe_op == "ort" and not self.ort_moe:
            raise EdgeMoEError("ONNX export: com.microsoft.MoE softmaxes the router input; sigmoid routing without "
                               "top-k renormalization cannot be expressed with it (use moe_op='standard')")
        self.expert_bits = {"fp32": 0, "int8": 8, "int4": 4}[weights] if self.ort_moe else 0
        self.qmoe_block = _qmoe_block(s, group_size) if self.expert_bits == 4 else 0
        if weights != "fp32" and not self.ort_moe:
            warnings.warn(f"ONNX export ({weights}): the experts run through standard ops and stay fp32 (NNCF does "
                          "not compress the batched expert MatMuls); only the dense MatMuls are compressed",
                          stacklevel=3)

    # --- shared sub-graphs -----------------------------------------------------------------------------------
    def _prologue(self):
        g, s = self.g, self.spec
        self.shape_ids = g.op("Shape", ["input_ids"], name="ids_shape")
        S = g.op("Gather", [self.shape_ids, g.const(1)], name="seq_len", axis=0)
        P = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"], name="past_shape"), g.const(2)],
                 name="past_len", axis=0)
        T = g.op("Add", [P, S], name="total_len")
        kpos = g.op("Range", [g.const(0), T, g.const(1)], name="kpos")  # [T]
        qpos = g.op("Range", [P, T, g.const(1)], name="qpos")  # [S]
        q_col = g.op("Unsqueeze", [qpos, g.const([1])], name="qpos_col")  # [S, 1]
        causal = g.op("LessOrEqual", [kpos, q_col], name="causal")  # [S, T]
        am = g.op("Cast", ["attention_mask"], name="am_bool", to=9)  # BOOL
        am = g.op("Unsqueeze", [am, g.const([1, 2])], name="am_4d")  # [B, 1, 1, T]
        allowed = g.op("And", [causal, am], name="allowed")  # [B, 1, S, T]
        rep = s.n_heads // s.n_kv_heads
        self.masks = {"full": self._tile(allowed, rep, "mask_full")}
        if s.sliding_window and s.swa_layers:
            lo = g.op("Sub", [q_col, g.const(s.sliding_window)], name="win_lo")
            inwin = g.op("Greater", [kpos, lo], name="in_window")
            self.masks["swa"] = self._tile(g.op("And", [allowed, inwin], name="allowed_swa"), rep, "mask_swa")
        # RoPE angles from position_ids, in fp32 like the reference: pos * inv_freq
        half = s.rope_dim // 2
        inv = (1.0 / (s.rope_theta ** (np.arange(0, s.rope_dim, 2, dtype=np.float32) / s.rope_dim))).astype(np.float32)
        pos = g.op("Cast", ["position_ids"], name="pos_f", to=1)
        pos = g.op("Unsqueeze", [pos, g.const([2])], name="pos_3d")  # [B, S, 1]
        ang = g.op("Mul", [pos, g.init("rope.inv_freq", inv.reshape(1, 1, half))], name="rope_angles")
        ang = g.op("Unsqueeze", [ang, g.const([1])], name="rope_angles_4d")  # [B, 1, S, half]
        if s.rope_kind == "norm":
            ang = g.op("Unsqueeze", [ang, g.const([4])], name="rope_angles_5d")  # [B, 1, S, half, 1]
        self.cos = g.op("Cos", [ang], name="rope_cos")
        self.sin = g.op("Sin", [ang], name="rope_sin")

    def _tile(self, allowed: str, rep: int, name: str) -> str:
        """[B, 1, S, T] -> [B, 1, rep*S, T]: row r*S + s is the mask of query s (GQA heads stacked along S)."""
        if rep == 1:
            return allowed
        return self.g.op("Tile", [allowed, self.g.const([1, 1, rep, 1])], name=name)

    def _rope(self, x: str, name: str) -> str:
        """x [B, heads, S, hd] -> rotated (the first rope_dim dims of each head)."""
        g, s = self.g, self.spec
        hd, rd = s.head_dim, s.rope_dim
        rot, rest = x, None
        if rd < hd:
            rot = g.op("Slice", [x, g.const([0]), g.const([rd]), g.const([3])], name=name + "_rot")
            rest = g.op("Slice", [x, g.const([rd]), g.const([hd]), g.const([3])], name=name + "_pass")
        if s.rope_kind == "neox":
            a = g.op("Slice", [rot, g.const([0]), g.const([rd // 2]), g.const([3])], name=name + "_a")
            b = g.op("Slice", [rot, g.const([rd // 2]), g.const([rd]), g.const([3])], name=name + "_b")
            axis = 3
        else:  # adjacent pairs: [B, h, S, rd/2, 2]
            rot = g.op("Reshape", [rot, g.const([0, 0, 0, rd // 2, 2])], name=name + "_pairs")
            a = g.op("Slice", [rot, g.const([0]), g.const([1]), g.const([4])], name=name + "_a")
            b = g.op("Slice", [rot, g.const([1]), g.const([2]), g.const([4])], name=name + "_b")
            axis = 4
        ra = g.op("Sub", [g.op("Mul", [a, self.cos]), g.op("Mul", [b, self.sin])], name=name + "_ra")
        rb = g.op("Add", [g.op("Mul", [b, self.cos]), g.op("Mul", [a, self.sin])], name=name + "_rb")
        out = g.op("Concat", [ra, rb], name=name + "_cat", axis=axis)
        if s.rope_kind == "norm":
            out = g.op("Reshape", [out, g.const([0, 0, 0, rd])], name=name + "_unpair")
        if rest is not None:
            out = g.op("Concat", [out, rest], name=name + "_full", axis=3)
        return out

    # --- one layer ---------------------------------------------------------------------------------------------
    def _attention(self, layer: int, x: str, d: dict, names: dict) -> str:
        g, s = self.g, self.spec
        p = f"model.layers.{layer}.self_attn"
        nh, nkv, hd = s.n_heads, s.n_kv_heads, s.head_dim
        q = g.matmul(x, d[names["wq"]], p + ".q_proj", d.get(names.get("bq")))
        k = g.matmul(x, d[names["wk"]], p + ".k_proj", d.get(names.get("bk")))
        v = g.matmul(x, d[names["wv"]], p + ".v_proj", d.get(names.get("bv")))
        if s.qk_norm == "full":
            q = g.rms_norm(q, d[names["q_norm"]], s.norm_eps, p + ".q_norm")
            k = g.rms_norm(k, d[names["k_norm"]], s.norm_eps, p + ".k_norm")
        q = g.op("Reshape", [q, g.const([0, 0, nh, hd])], name=p + "_q4")
        k = g.op("Reshape", [k, g.const([0, 0, nkv, hd])], name=p + "_k4")
        v = g.op("Reshape", [v, g.const([0, 0, nkv, hd])], name=p + "_v4")
        if s.qk_norm == "head":
            q = g.rms_norm(q, d[names["q_norm"]], s.norm_eps, p + ".q_norm")
            k = g.rms_norm(k, d[names["k_norm"]], s.norm_eps, p + ".k_norm")
        q = g.op("Transpose", [q], name=p + "_qT", perm=[0, 2, 1, 3])  # [B, nh, S, hd]
        k = g.op("Transpose", [k], name=p + "_kT", perm=[0, 2, 1, 3])  # [B, nkv, S, hd]
        v = g.op("Transpose", [v], name=p + "_vT", perm=[0, 2, 1, 3])
        if layer not in s.nope_layers:
            q, k = self._rope(q, p + "_rope_q"), self._rope(k, p + "_rope_k")
        pk = g.op_to("Concat", [f"past_key_values.{layer}.key", k], [f"present.{layer}.key"], axis=2)
        pv = g.op_to("Concat", [f"past_key_values.{layer}.value", v], [f"present.{layer}.value"], axis=2)
        q = g.op("Mul", [q, g.const(s.attn_scale or 1.0 / np.sqrt(hd), np.float32)], name=p + "_qscale")
        q = g.op("Reshape", [q, g.const([0, nkv, -1, hd])], name=p + "_qgroups")  # [B, nkv, rep*S, hd]
        scores = g.op("MatMul", [q, g.op("Transpose", [pk], name=p + "_kTT", perm=[0, 1, 3, 2])], name=p + "_scores")
        mask = self.masks["swa" if s.sliding_window and layer in s.swa_layers else "full"]
        scores = g.op("Where", [mask, scores, g.const(MASKED, np.float32)], name=p + "_masked")
        probs = g.op("Softmax", [scores], name=p + "_probs", axis=-1)
        out = g.op("MatMul", [probs, pv], name=p + "_ctx")  # [B, nkv, rep*S, hd]
        out = g.op("Reshape", [out, g.const([0, nh, -1, hd])], name=p + "_ctx4")
        out = g.op("Transpose", [out], name=p + "_ctxT", perm=[0, 2, 1, 3])
        out = g.op("Reshape", [out, g.const([0, 0, nh * hd])], name=p + "_ctx3")
        return g.matmul(out, d[names["wo"]], p + ".o_proj")

    def _residual(self, y: str, name: str) -> str:
        """A block's output as the residual stream adds it (Granite's residual_multiplier)."""
        if self.spec.residual_scale == 1.0:
            return y
        return self.g.op("Mul", [y, self.g.const(self.spec.residual_scale, np.float32)], name=name + "_scaled")

    def _router_input(self, logits: str, layer: int, name: str) -> str:
        """Router logits -> what MoE's softmax must see (see the module docstring)."""
        g, s = self.g, self.spec
        r = logits
        if s.router_fn == "sigmoid":  # log sigmoid(l) = -softplus(-l)
            r = g.op("Neg", [g.op("Softplus", [g.op("Neg", [r], name=name + "_neg")], name=name + "_sp")],
                     name=name + "_logsig")
        if layer in self.pruned:
            bias = np.zeros(s.n_experts, np.float32)
            bias[self.pruned[layer]] = MASKED
            r = g.op("Add", [r, g.init(name + ".pruned_mask", bias)], name=name + "_pruned")
        return r

    def _moe(self, layer: int, h: str, router_x: str, d: dict, names: dict, experts: dict) -> str:
        g, s = self.g, self.spec
        p = f"model.layers.{layer}.mlp"
        E, H = s.n_experts, s.hidden
        logits = g.matmul(router_x, d[names["router"]], p + ".gate")  # [B, S, E]
        gate = np.stack([experts[expert_tensor_name(layer, e, "gate")] for e in range(E)])
        up = np.stack([experts[expert_tensor_name(layer, e, "up")] for e in range(E)])
        down = np.stack([experts[expert_tensor_name(layer, e, "down")] for e in range(E)])
        h2 = g.op("Reshape", [h, g.const([-1, H])], name=p + "_tokens")  # [N, H]
        if self.ort_moe:
            r = g.op("Reshape", [self._router_input(logits, layer, p + ".router"), g.const([-1, E])],
                     name=p + "_router2d")
            fc1 = np.empty((E, 2 * s.expert_ffn, H), np.float32)  # interleaved rows g0, u0, g1, u1, ...
            fc1[:, 0::2], fc1[:, 1::2] = gate, up
            attrs = {"k": s.top_k, "activation_type": "swiglu", "swiglu_fusion": 1,
                     "activation_alpha": 1.0 if s.activation == "swiglu" else REGLU_ALPHA, "activation_beta": 0.0,
                     "normalize_routing_weights": int(s.norm_topk)}
            if not self.expert_bits:
                out = g.op("MoE", [h2, r, g.init(p + ".experts.fc1", fc1), "", g.init(p + ".experts.fc2", down)],
                           name=p + ".experts", domain="com.microsoft", **attrs)
            else:
                bits, block = self.expert_bits, self.qmoe_block
                q1, s1, _ = quantize_qmoe(fc1, bits, block)
                q2, s2, _ = quantize_qmoe(down, bits, block)
                if block:
                    attrs["block_size"] = block
                # onnxruntime 1.31's CPU QMoE renormalizes the top-k weights even with normalize_routing_weights=0
                # (measured: its output equals the renormalized reference to 4e-7). For routing without
                # renormalization, ask for it explicitly and multiply back by the top-k probability mass.
                attrs["normalize_routing_weights"] = 1
                out = g.op("QMoE", [h2, r, g.init(p + ".experts.fc1_q", q1), g.init(p + ".experts.fc1_scales", s1),
                                    "", g.init(p + ".experts.fc2_q", q2), g.init(p + ".experts.fc2_scales", s2)],
                           name=p + ".experts", domain="com.microsoft", expert_weight_bits=bits, **attrs)
                if not s.norm_topk:
                    probs = g.op("Softmax", [r], name=p + "_probs", axis=-1)
                    topv, _ = g.op("TopK", [probs, g.const([s.top_k])], n_out=2, name=p + "_topk", axis=-1)
                    mass = g.op("ReduceSum", [topv, g.const([-1])], name=p + "_topk_mass", keepdims=1)
                    out = g.op("Mul", [out, mass], name=p + "_unnormalized")
        else:
            out = self._moe_standard(layer, h2, logits, gate, up, down, p)
        out = g.op("Reshape", [out, g.op("Shape", [h], name=p + "_shape")], name=p + "_out")
        if s.shared_ffn:
            sh = _ffn(g, s, h, d[names["sh_gate"]], d[names["sh_up"]], d[names["sh_down"]], p + ".shared_expert")
            if s.shared_gate:
                gw = d[names["sh_gate_inp"]].reshape(1, H)
                sg = g.op("Sigmoid", [g.matmul(h, gw, p + ".shared_expert_gate")], name=p + "_shgate")
                sh = g.op("Mul", [sh, sg], name=p + "_shared")
            out = g.op("Add", [out, sh], name=p + "_with_shared")
        return out

    def _moe_standard(self, layer, h2, logits, gate, up, down, p) -> str:
        """Dense weighted sum over all experts with the top-k weights (standard ops only)."""
        g, s = self.g, self.spec
        E = s.n_experts
        lg = g.op("Reshape", [logits, g.const([-1, E])], name=p + "_logits2d")
        if layer in self.pruned:
            keep = np.ones(E, bool)
            keep[self.pruned[layer]] = False
            lg = g.op("Where", [g.init(p + ".keep", keep), lg, g.const(MASKED, np.float32)], name=p + "_pruned")
        probs = (g.op("Softmax", [lg], name=p + "_probs", axis=-1) if s.router_fn == "softmax"
                 else g.op("Sigmoid", [lg], name=p + "_probs"))
        topv, topi = g.op("TopK", [probs, g.const([s.top_k])], n_out=2, name=p + "_topk", axis=-1, largest=1,
                          sorted=1)
        if s.norm_topk:
            topv = g.op("Div", [topv, g.op("ReduceSum", [topv, g.const([-1])], name=p + "_topsum", keepdims=1)],
                        name=p + "_topnorm")
        zeros = g.op("Mul", [probs, g.const(0.0, np.float32)], name=p + "_zeros")
        dense_w = g.op("ScatterElements", [zeros, topi, topv], name=p + "_weights", axis=-1)  # [N, E]
        wg = g.init(p + ".experts.gate_t", np.ascontiguousarray(gate.transpose(0, 2, 1)))  # [E, H, I]
        wu = g.init(p + ".experts.up_t", np.ascontiguousarray(up.transpose(0, 2, 1)))
        wd = g.init(p + ".experts.down_t", np.ascontiguousarray(down.transpose(0, 2, 1)))  # [E, I, H]
        a = g.op("MatMul", [h2, wg], name=p + "_all_gate")  # [E, N, I]
        act = (g.op("Mul", [a, g.op("Sigmoid", [a], name=p + "_sig")], name=p + "_silu")
               if s.activation == "swiglu" else g.op("Relu", [a], name=p + "_relu"))
        y = g.op("MatMul", [g.op("Mul", [act, g.op("MatMul", [h2, wu], name=p + "_all_up")], name=p + "_glu"), wd],
                 name=p + "_all_down")  # [E, N, H]
        wt = g.op("Unsqueeze", [g.op("Transpose", [dense_w], name=p + "_wT", perm=[1, 0]), g.const([2])],
                  name=p + "_w3")  # [E, N, 1]
        return g.op("ReduceSum", [g.op("Mul", [y, wt], name=p + "_weighted"), g.const([0])], name=p + "_sum",
                    keepdims=0)

    # --- whole model ---------------------------------------------------------------------------------------------
    def build(self, show_progress: bool):
        from onnx import TensorProto, helper

        g, s, ck = self.g, self.spec, self.ck
        glob = ck.global_tensors()
        embed = glob[GLOBAL_TENSORS["embed"]]
        x = g.op("Gather", [g.init("model.embed_tokens.weight", embed), "input_ids"], name="embed", axis=0)
        if s.embed_scale != 1.0:  # Granite's multipliers (ArchSpec's scalings)
            x = g.op("Mul", [x, g.const(s.embed_scale, np.float32)], name="embed_scale")
        self._prologue()
        for layer in progress(range(s.n_layers), "ONNX layers", show_progress):
            names = dense_tensor_names(s, layer)
            d = ck.layer_dense(layer)
            p = f"model.layers.{layer}"
            layer_in = x
            h = g.rms_norm(x, d[names["attn_norm"]], s.norm_eps, p + ".input_layernorm")
            x = g.op("Add", [x, self._residual(self._attention(layer, h, d, names), p + "_attn")], name=p + "_attn_res")
            h = g.rms_norm(x, d[names["ffn_norm"]], s.norm_eps, p + ".post_attention_layernorm")
            if s.is_moe_layer(layer):
                experts = dict(ck.layer_experts(layer))
                router_x = layer_in if s.router_input == "layer_input" else h
                y = self._moe(layer, h, router_x, d, names, experts)
                del experts
            else:
                y = _ffn(g, s, h, d[names["mlp_gate"]], d[names["mlp_up"]], d[names["mlp_down"]], p + ".mlp")
            x = g.op("Add", [x, self._residual(y, p + "_ffn")], name=p + "_ffn_res")
            del d
        x = g.rms_norm(x, glob[GLOBAL_TENSORS["final_norm"]], s.norm_eps, "model.norm")
        head_out = "logits" if s.logit_divisor == 1.0 else "unscaled_logits"
        if s.tie_embeddings:  # share the embedding initializer: Gemm(x, E, transB=1) on [B*S, H]
            x2 = g.op("Reshape", [x, g.const([-1, s.hidden])], name="final_tokens")
            y = g.op("Gemm", [x2, "model.embed_tokens.weight"], name="lm_head", transB=1)
            out_shape = g.op("Concat", [self.shape_ids, g.const([s.vocab])], name="logits_shape", axis=0)
            g.op_to("Reshape", [y, out_shape], [head_out])
        else:
            w = g.init("lm_head.weight", np.ascontiguousarray(glob[GLOBAL_TENSORS["lm_head"]].T))
            g.op_to("MatMul", [x, w], [head_out])
        if s.logit_divisor != 1.0:
            g.op_to("Div", [head_out, g.const(s.logit_divisor, np.float32)], ["logits"])
        del glob

        f, i64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f, ["batch_size", "sequence_length", s.vocab])]
        for i in range(s.n_layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", f, ["batch_size", s.n_kv_heads, "past_sequence_length", s.head_dim]))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kv}", f, ["batch_size", s.n_kv_heads, "total_sequence_length", s.head_dim]))
        graph = helper.make_graph(g.nodes, "edgemoe_decoder", inputs, outputs, g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="edgemoe", ir_version=IR_VERSION)
        return model


@contextlib.contextmanager
def _nncf_logs_to_stderr(show: bool):
    """NNCF logs (INFO lines, a handler bound to sys.stdout at import) and its rich progress bars (a Console on
    sys.stdout) go to stderr, so stdout carries only results (the export summary); -q keeps its warnings only."""
    try:
        from nncf.common.logging.logger import nncf_logger
    except ImportError:
        nncf_logger = None
    saved = []
    if nncf_logger is not None:
        saved = [(h, h.stream) for h in nncf_logger.handlers if isinstance(h, logging.StreamHandler)]
        for h, _ in saved:
            h.setStream(sys.stderr)
        level = nncf_logger.level
        if not show:
            nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for h, stream in saved:
            h.setStream(stream)
        if nncf_logger is not None:
            nncf_logger.setLevel(level)


def _compress_dense(model, weights: str, group_size: int):
    """NNCF weight compression of the dense MatMuls / Gemm / Gather (not the MoE ops, which NNCF does not see)."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode
    except ImportError:
        raise EdgeMoEError("--onnx-weights int8/int4 needs NNCF: pip install nncf") from None
    # routers (and the shared-expert gate) stay fp32, as in the GGUF export: they are tiny, and rounding them
    # flips top-k decisions wherever two experts' logits are close
    keep_fp32 = nncf.IgnoredScope(patterns=[r".*\.mlp\.gate_\d+$", r".*\.shared_expert_gate_\d+$"], validate=False)
    if weights == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=keep_fp32)
    adv = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST,
                                        min_adjusted_group_size=16)
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group_size, ratio=1.0,
                                 ignored_scope=keep_fp32, advanced_parameters=adv)


def export_onnx(src, out_dir, weights: str = "fp32", opset: int = 21, *, moe_op: str = "auto", group_size: int = 32,
                external_data: bool | None = None, show_progress: bool = True) -> Path:
    """Write `out_dir/model.onnx` (+ `model.onnx.data` when large, + `tokenizer.json` when the source has one).

    src: a Hugging Face checkpoint directory, a .gguf file, an edgemoe .emoe container, or an opened Checkpoint-like
    object. weights: fp32 | int8 | int4 (NNCF on the dense MatMuls, QMoE packing for the experts). moe_op: auto
    (com.microsoft.MoE/QMoE whenever it can express the routing), ort (require it), standard (plain ONNX ops only).
    group_size: int4 group / block size along the input dimension. Returns the path of model.onnx.
    """
    weights = str(weights).lower()
    if weights not in WEIGHT_MODES:
        raise EdgeMoEError(f"--onnx-weights {weights!r}: expected one of {', '.join(WEIGHT_MODES)}")
    if moe_op not in MOE_OPS:
        raise EdgeMoEError(f"moe_op {moe_op!r}: expected one of {', '.join(MOE_OPS)}")
    if opset != 21:
        raise EdgeMoEError(f"opset {opset}: the ONNX export writes opset 21 (what NNCF's int4 DequantizeLinear "
                           "with blocks needs and onnxruntime 1.2x+ runs)")
    if int(group_size) < 16 or int(group_size) & (int(group_size) - 1):
        raise EdgeMoEError(f"group_size {group_size}: expected a power of two >= 16")
    try:
        import onnx
    except ImportError:
        raise EdgeMoEError("ONNX export needs onnx: pip install onnx") from None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgeMoEError(f"{out_dir}: exists and is not a directory; --onnx takes an output directory")
    if not out_dir.parent.exists():
        raise EdgeMoEError(f"{out_dir.parent}: output directory does not exist")

    ckpt, owned = _open_any(src)
    try:
        pruned = dict(getattr(ckpt, "pruned", {}) or {})
        check_supported(ckpt.spec)
        b = _Builder(ckpt, weights, moe_op, group_size, pruned)
        model = b.build(show_progress)
        tokenizer_json = ckpt.tokenizer_json
    finally:
        if owned:
            ckpt.close()
    if weights != "fp32":
        with _nncf_logs_to_stderr(show_progress):
            model = _compress_dense(model, weights, group_size)
        model.ir_version = IR_VERSION
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    use_external = total > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)

    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        path = tmp / "model.onnx"
        if use_external:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
            onnx.save_model(model, str(path))
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_bytes(tokenizer_json)
        out_dir.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
        if not use_external and (out_dir / "model.onnx.data").exists():
            (out_dir / "model.onnx.data").unlink()  # a stale file from an earlier, larger export
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "model.onnx"
