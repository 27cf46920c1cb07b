"""GGUF for llama.cpp's `qwen35moe` (Qwen3.5/3.6-MoE): what differs from the generic writer in gguf_export.py.

llama.cpp's graph (src/models/qwen35moe.cpp): full-attention layers read q_proj as one `attn_q` [2 * q, H] with each
head's query rows followed by its gate rows (edgemoe splits them into attn_q + attn_gate: interleaved back here);
Gated DeltaNet layers read `attn_qkv`, `attn_gate` (z), `ssm_beta`, `ssm_alpha`, `ssm_conv1d` [C, taps], `ssm_dt`,
`ssm_a` = -exp(A_log), `ssm_norm`, `ssm_out`; the pre-FFN norm is `post_attention_norm`. Its DeltaNet broadcasts the
k-heads over the v-heads tiled (v-head j reads k-head j % K) where transformers repeats them (v-head h reads k-head
h // (V / K)), so every per-v-head row is permuted into llama.cpp's order. It needs key and value heads of one size
(ssm.state_size) and the full-attention layers every full_attention_interval-th layer.
"""

from __future__ import annotations

import numpy as np

from edgemoe.arch import ArchSpec
from edgemoe.errors import EdgeMoEError

ARCH = "qwen35moe"
RENAMES = {"ffn_norm": "post_attention_norm.weight", "la_qkv": "attn_qkv.weight", "la_z": "attn_gate.weight",
           "la_b": "ssm_beta.weight", "la_a": "ssm_alpha.weight", "la_conv": "ssm_conv1d.weight",
           "la_dt": "ssm_dt.bias", "la_a_log": "ssm_a", "la_norm": "ssm_norm.weight", "la_out": "ssm_out.weight"}


def attention_interval(spec: ArchSpec) -> int | None:
    """The n with full attention exactly on layers n-1, 2n-1, ... (llama.cpp's full_attention_interval), or None."""
    attn = [i for i in range(spec.n_layers) if spec.is_attention_layer(i)]
    for n in range(1, spec.n_layers + 1):
        if attn == [i for i in range(spec.n_layers) if (i + 1) % n == 0]:
            return n
    return None


def check(spec: ArchSpec, where: str) -> None:
    if spec.linear_k_dim != spec.linear_v_dim:
        raise EdgeMoEError(f"{where}: llama.cpp's qwen35moe needs linear_key_head_dim == linear_value_head_dim "
                           f"(one ssm.state_size), got {spec.linear_k_dim} and {spec.linear_v_dim}")
    if attention_interval(spec) is None:
        raise EdgeMoEError(f"{where}: llama.cpp's qwen35moe places full attention on every full_attention_interval-th "
                           f"layer; this model's linear-attention layers {spec.linear_attn_layers} follow no interval")
    if not (spec.attn_gate and spec.qk_norm == "head" and spec.shared_gate and spec.norm_topk
            and spec.router_fn == "softmax" and not spec.dense_layers):
        raise EdgeMoEError(f"{where}: llama.cpp's qwen35moe runs gated attention with per-head QK-norm and MoE layers "
                           "with a softmax router, renormalized top-k and a gated shared expert")


def _v_head_order(spec: ArchSpec) -> np.ndarray:
    """perm[j] = the transformers v-head that is llama.cpp's v-head j (tiled k-head broadcast)."""
    K, V = spec.linear_k_heads, spec.linear_v_heads
    r = V // K
    return np.array([(j % K) * r + j // K for j in range(V)])


def layer_tensors(spec: ArchSpec, layer: int, names: dict[str, str], dense: dict[str, np.ndarray]):
    """(GGUF name, array) of one layer's dense tensors in edgemoe's role order, as llama.cpp's qwen35moe reads them;
    `dense` may be None (shapes only: arrays of zeros are not made, the shapes are yielded as tuples)."""
    p = f"blk.{layer}."
    perm, dv = _v_head_order(spec), spec.linear_v_dim
    qk = 2 * spec.linear_k_heads * spec.linear_k_dim

    def rows_by_head(a, start, width):  # reorder [start:] rows in blocks of `width` by perm
        return np.concatenate([a[:start], a[start:].reshape(len(perm), width, *a.shape[1:])[perm]
                               .reshape(-1, *a.shape[1:])])

    for role, name in names.items():
        if role == "attn_gate":
            continue  # written inside attn_q
        gname = p + RENAMES[role] if role in RENAMES else name
        if dense is None:
            shape = expected_shape(spec, role)
            yield gname, shape
            continue
        a = dense[name]
        if role == "wq" and spec.attn_gate:
            nh, hd = spec.n_heads, spec.head_dim
            g = dense[names["attn_gate"]]
            a = np.stack([a.reshape(nh, hd, -1), g.reshape(nh, hd, -1)], axis=1).reshape(2 * nh * hd, -1)
        elif role == "la_qkv":
            a = rows_by_head(a, qk, dv)
        elif role == "la_conv":
            a = rows_by_head(a.reshape(-1, spec.linear_conv), qk, dv)
        elif role == "la_z":
            a = rows_by_head(a, 0, dv)
        elif role in ("la_b", "la_a", "la_dt"):
            a = a[perm]
        elif role == "la_a_log":
            a = -np.exp(a[perm].astype(np.float64)).astype(np.float32)
        elif role == "la_out":
            a = a.reshape(a.shape[0], len(perm), dv)[:, perm].reshape(a.shape[0], -1)
        yield gname, np.ascontiguousarray(a, dtype=np.float32)


def expected_shape(spec: ArchSpec, role: str) -> tuple[int, ...]:
    from .checkpoint import expected_shapes

    if role == "wq":
        return (2 * spec.n_heads * spec.head_dim, spec.hidden)
    if role == "la_conv":
        return (2 * spec.linear_k_heads * spec.linear_k_dim + spec.linear_v_heads * spec.linear_v_dim,
                spec.linear_conv)
    return expected_shapes(spec, 0)[role]


def write_metadata(w, spec: ArchSpec) -> None:
    w.add_expert_shared_feed_forward_length(spec.shared_ffn)
    w.add_ssm_conv_kernel(spec.linear_conv)
    w.add_ssm_inner_size(spec.linear_v_heads * spec.linear_v_dim)
    w.add_ssm_state_size(spec.linear_k_dim)
    w.add_ssm_time_step_rank(spec.linear_v_heads)
    w.add_ssm_group_count(spec.linear_k_heads)
    w.add_full_attention_interval(attention_interval(spec))
    half = spec.rope_dim // 2  # text positions are equal in every section: any split of the rotated pairs works
    w.add_rope_dimension_sections([half - 2 * (half // 3), half // 3, half // 3, 0])
