"""The NumPy reference forward pass (fp32 math, a fresh sequence, all positions).

It is deliberately plain: the C core is tested against it, and it is tested against transformers. It follows the
architecture description in `arch.py`; nothing here is specific to one family.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .arch import GLOBAL_TENSORS, ArchSpec, dense_tensor_names, expert_tensor_name

WeightFn = Callable[[str], np.ndarray]  # container name -> float32 array with the logical shape


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)).astype(np.float32) * w


def rope_inv_freq(spec: ArchSpec) -> np.ndarray:
    """inv_freq [rope_dim/2] in f32 like HF: theta^-(2j/d), or YaRN's blend (modeling_rope_utils._compute_yarn_
    parameters): interpolated (/ rope_factor) below dim `low`, extrapolated above `high`, a linear ramp between."""
    d = spec.rope_dim
    pos_freqs = (np.float64(spec.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))).astype(
        np.float32)
    inv = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if spec.rope_scaling != "yarn":
        return inv

    def corr(rot: float) -> float:
        return d * math.log(spec.yarn_orig_ctx / (rot * 2 * math.pi)) / (2 * math.log(spec.rope_theta))

    low, high = corr(spec.yarn_beta_fast), corr(spec.yarn_beta_slow)
    if spec.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extra = (np.float32(1) - ramp).astype(np.float32)
    interp = (np.float32(1.0) / (np.float32(spec.rope_factor) * pos_freqs)).astype(np.float32)
    return (interp * (np.float32(1) - extra) + inv * extra).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, spec: ArchSpec) -> np.ndarray:
    """Rotate the first `rope_dim` dims of each head. x: [T, heads, head_dim]."""
    rope_dim, kind = spec.rope_dim, spec.rope_kind
    freqs = positions[:, None].astype(np.float32) * rope_inv_freq(spec)[None, :]  # [T, rope_dim/2]
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]
    if spec.rope_attn_factor != 1.0:  # YaRN's attention scaling, on cos and sin (so on q and k)
        cos, sin = cos * np.float32(spec.rope_attn_factor), sin * np.float32(spec.rope_attn_factor)
    out = x.copy()
    r = x[..., :rope_dim]
    if kind == "neox":  # pairs (i, i + d/2): HF rotate_half
        a, b = r[..., : rope_dim // 2], r[..., rope_dim // 2 :]
        out[..., : rope_dim // 2] = a * cos - b * sin
        out[..., rope_dim // 2 : rope_dim] = b * cos + a * sin
    else:  # norm: adjacent pairs (2i, 2i+1)
        a, b = r[..., 0::2], r[..., 1::2]
        out[..., 0:rope_dim:2] = a * cos - b * sin
        out[..., 1:rope_dim:2] = b * cos + a * sin
    return out


def global_rope(x: np.ndarray, positions: np.ndarray, spec: ArchSpec) -> np.ndarray:
    """Gemma-4's proportional RoPE on a full-attention layer: pairs (j, j + d/2) over the whole head (d = x's last
    size) turn at theta^(-2j/d) for j < global_rope_angles; the other pairs keep angle 0 (unchanged)."""
    d, n = x.shape[-1], spec.global_rope_angles
    theta = np.float32(spec.global_rope_theta or spec.rope_theta)
    inv = np.zeros(d // 2, np.float32)
    inv[:n] = np.float32(1.0) / theta ** (np.arange(0, 2 * n, 2, dtype=np.float32) / np.float32(d))
    freqs = positions[:, None].astype(np.float32) * inv[None, :]
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(np.float32)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3))))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def route(spec: ArchSpec, logits: np.ndarray, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Router logits [T, E] -> (expert ids [T, k], weights [T, k]): chosen by probability (+ the selection-only
    score bias, among the topk_group best groups when n_group > 1), weighted by probability (renormalized if
    norm_topk) times routed_scaling."""
    probs = softmax(logits) if spec.router_fn == "softmax" else 1.0 / (1.0 + np.exp(-logits))
    sel = probs if bias is None else probs + bias
    sel = np.where(np.isneginf(logits), -np.inf, sel)  # pruned by a merge map
    if spec.n_group > 1:
        T, G = sel.shape[0], spec.n_group
        grouped = np.sort(sel.reshape(T, G, -1), axis=-1)
        gscore = grouped[..., -1] if spec.group_score == "max" else grouped[..., -1] + grouped[..., -2]
        keep = np.argsort(-gscore, axis=-1, kind="stable")[:, : spec.topk_group]
        mask = np.zeros((T, G), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        sel = np.where(np.repeat(mask, sel.shape[1] // G, axis=-1), sel, -np.inf)
    # stable sort on -sel: ties go to the lower expert id, like torch.topk on CPU in practice
    ids = np.argsort(-sel, axis=-1, kind="stable")[:, : spec.top_k]
    weights = np.take_along_axis(probs, ids, axis=-1)
    if spec.norm_topk:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.float32(spec.norm_topk_eps))
    return ids, (weights * np.float32(spec.routed_scaling)).astype(np.float32)


def ffn(spec: ArchSpec, x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
        bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        on_act: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """The gated FFN; `on_act(act)` sees the down projection's input (the exporter's calibration collects it)."""
    act = ffn_hidden(spec, x, gate, up, bias)
    if on_act is not None:
        on_act(act)
    y = act @ down.T
    return y if bias is None else y + bias[2]


def router_logits(spec: ArchSpec, x: np.ndarray, w: WeightFn, names: dict[str, str]) -> np.ndarray:
    logits = x @ w(names["router"]).T
    return logits + w(names["router_b"]) if spec.router_bias else logits


def expert_bias(spec: ArchSpec, w: WeightFn, names: dict[str, str], e: int):
    """Stored expert e's (gate, up, down) biases, or None."""
    return tuple(w(names[b])[e] for b in ("gate_b", "up_b", "down_b")) if spec.expert_bias else None


def ffn_hidden(spec: ArchSpec, x: np.ndarray, gate: np.ndarray, up: np.ndarray,
               bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The activation the down projection reads: act(gate x + bg) * (up x + bu) for the spec's activation."""
    g, u = x @ gate.T, x @ up.T
    if bias is not None:
        g, u = g + bias[0], u + bias[1]
    if spec.activation == "swiglu_clamp":  # gpt-oss: (clamp(up) + 1) * g * sigmoid(alpha g), g clamped above
        g, u = np.minimum(g, spec.swiglu_limit), np.clip(u, -spec.swiglu_limit, spec.swiglu_limit)
        h = (u + np.float32(1)) * (g / (np.float32(1) + np.exp(-g * np.float32(spec.swiglu_alpha))))
    elif spec.activation == "geglu_tanh":
        h = gelu_tanh(g) * u
    else:
        h = (silu(g) if spec.activation == "swiglu" else np.maximum(g, 0.0)) * u
    return h


def attention(spec: ArchSpec, layer: int, x: np.ndarray, w: WeightFn, names: dict[str, str]) -> np.ndarray:
    """Causal self-attention over x [T, H], or over a batch of equal-length fresh sequences x [S, T, H] at once (the
    exporter's calibration: one projection matmul for all of them). The softmax runs in place on the scores."""
    T, lead = x.shape[-2], x.shape[:-2]
    nh, nkv, hd = spec.n_heads, spec.layer_kv_heads(layer), spec.layer_head_dim(layer)
    q, k = x @ w(names["wq"]).T, x @ w(names["wk"]).T
    v = x @ w(names["wv"]).T if "wv" in names else k  # Gemma-4's global_k_eq_v: values = the raw keys
    if spec.qkv_bias:
        q, k, v = q + w(names["bq"]), k + w(names["bk"]), v + w(names["bv"])
    if spec.qk_norm == "full":
        q, k = rms_norm(q, w(names["q_norm"]), spec.norm_eps), rms_norm(k, w(names["k_norm"]), spec.norm_eps)
    q, k, v = q.reshape(*lead, T, nh, hd), k.reshape(*lead, T, nkv, hd), v.reshape(*lead, T, nkv, hd)
    if spec.qk_norm == "head":
        q, k = rms_norm(q, w(names["q_norm"]), spec.norm_eps), rms_norm(k, w(names["k_norm"]), spec.norm_eps)
    if spec.v_norm:  # Gemma-4: values RMS-normalized per head, no weight
        v = rms_norm(v, np.float32(1.0), spec.norm_eps)
    if spec.global_rope_angles and spec.is_global_layer(layer):
        q, k = global_rope(q, np.arange(T), spec), global_rope(k, np.arange(T), spec)
    elif layer not in spec.nope_layers:
        pos = np.arange(T)
        q, k = rope(q, pos, spec), rope(k, pos, spec)
    rep = nh // nkv
    k, v = np.repeat(k, rep, axis=-2), np.repeat(v, rep, axis=-2)  # [..., T, nh, hd]
    # einsum, not BLAS: one sequence gives the same bits as always (the C core's int8-activation tests compare
    # against this within rounding; a BLAS product's other summation order flipped a near-tied routing choice)
    scores = np.einsum("...thd,...shd->...hts", q, k)  # [..., nh, T, T]
    if spec.attn_scale:
        scores *= np.float32(spec.attn_scale)
    else:
        scores /= np.float32(np.sqrt(hd))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = j > i
    if spec.sliding_window and layer in spec.swa_layers:
        mask |= j <= i - spec.sliding_window
    np.copyto(scores, np.float32(-np.inf), where=mask)
    if spec.attn_sinks:  # gpt-oss: a per-head logit joins the softmax, its probability is dropped
        sinks = np.broadcast_to(w(names["sinks"])[:, None, None], (*lead, nh, T, 1))
        probs = softmax(np.concatenate([scores, sinks], axis=-1))[..., :T]
    else:  # softmax in place: the scores are this function's own array
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        probs = scores
    out = np.einsum("...hts,...shd->...thd", probs, v).reshape(*lead, T, nh * hd)
    if spec.attn_gate:  # Qwen3.5 / Next: gated attention output
        out = out / (np.float32(1) + np.exp(-(x @ w(names["attn_gate"]).T)))
    out = out @ w(names["wo"]).T
    return out + w(names["bo"]) if spec.o_bias else out


def batched_mixer(spec: ArchSpec, layer: int) -> bool:
    """Whether the layer's token mixer takes a batch of equal-length sequences [S, T, H] (plain attention); the
    other layer kinds (linear attention, short convolution, MLA) run one sequence at a time."""
    return layer not in spec.linear_attn_layers and layer not in spec.conv_layers and not spec.kv_lora_rank


def _l2norm(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + np.float32(1e-6))


def gated_deltanet(spec: ArchSpec, x: np.ndarray, w: WeightFn, names: dict[str, str]) -> np.ndarray:
    """A Gated DeltaNet layer (Qwen3.5 / Next linear attention) over a fresh sequence, token by token (the recurrent
    form; the "linear" ArchSpec.layer_kind, native/src/deltanet.h)."""
    T = x.shape[0]
    KH, VH, dk, dv, taps = (spec.linear_k_heads, spec.linear_v_heads, spec.linear_k_dim, spec.linear_v_dim,
                            spec.linear_conv)
    qkv = x @ w(names["la_qkv"]).T  # [T, C]
    conv = w(names["la_conv"]).reshape(qkv.shape[1], taps)
    padded = np.concatenate([np.zeros((taps - 1, qkv.shape[1]), np.float32), qkv])
    mixed = sum(padded[j:j + T] * conv[:, j] for j in range(taps))  # causal depthwise conv
    mixed = silu(mixed.astype(np.float32))
    q = _l2norm(mixed[:, : KH * dk].reshape(T, KH, dk)) / np.float32(np.sqrt(dk))
    k = _l2norm(mixed[:, KH * dk : 2 * KH * dk].reshape(T, KH, dk))
    v = mixed[:, 2 * KH * dk :].reshape(T, VH, dv)
    q, k = np.repeat(q, VH // KH, axis=1), np.repeat(k, VH // KH, axis=1)  # v-head h reads k-head h // (VH / KH)
    beta = 1.0 / (1.0 + np.exp(-(x @ w(names["la_b"]).T)))
    a = x @ w(names["la_a"]).T + w(names["la_dt"])
    softplus = np.where(a > 20, a, np.log1p(np.exp(np.minimum(a, 20))))
    decay = np.exp(-np.exp(w(names["la_a_log"])) * softplus).astype(np.float32)  # [T, VH]
    S = np.zeros((VH, dk, dv), np.float32)
    out = np.zeros((T, VH, dv), np.float32)
    for t in range(T):
        S = S * decay[t][:, None, None]
        delta = (v[t] - np.einsum("hij,hi->hj", S, k[t])) * beta[t][:, None]
        S = S + k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hij,hi->hj", S, q[t])
    z = (x @ w(names["la_z"]).T).reshape(T, VH, dv)
    gated = rms_norm(out, w(names["la_norm"]), spec.norm_eps) * silu(z)
    return gated.reshape(T, VH * dv).astype(np.float32) @ w(names["la_out"]).T


def shortconv(spec: ArchSpec, x: np.ndarray, w: WeightFn, names: dict[str, str]) -> np.ndarray:
    """LFM2's short convolution (transformers' Lfm2MoeShortConv) over a fresh sequence: (B, C, x) = in_proj(x) in
    thirds, a causal depthwise convolution of conv_kernel taps over B * x (zeros before the start), times C, then
    out_proj."""
    H, K, T = spec.hidden, spec.conv_kernel, x.shape[0]
    bcx = x @ w(names["conv_in"]).T
    u = bcx[:, :H] * bcx[:, 2 * H:]
    padded = np.concatenate([np.zeros((K - 1, H), np.float32), u])
    taps = w(names["conv_w"])  # [H, K]; tap K-1 reads the current token
    y = sum(taps[:, k] * padded[k:k + T] for k in range(K))
    return (bcx[:, H:2 * H] * y) @ w(names["conv_out"]).T


def mixer(spec: ArchSpec, layer: int, x: np.ndarray, w: WeightFn, names: dict[str, str]) -> np.ndarray:
    """The layer's token mixer on its normed input: attention, or the layer kind that replaces it."""
    kind = spec.layer_kind(layer)
    if kind == "linear":
        return gated_deltanet(spec, x, w, names)
    if kind == "conv":
        return shortconv(spec, x, w, names)
    if spec.kv_lora_rank:
        return mla_attention(spec, x, w, names)
    return attention(spec, layer, x, w, names)


def mla_attention(spec: ArchSpec, x: np.ndarray, w: WeightFn, names: dict[str, str]) -> np.ndarray:
    """Multi-head Latent Attention as transformers computes it (DeepSeek-V2/V3): the latent c = kv_a_norm(first
    kv_lora_rank outputs of wkv_a x) and the shared RoPE key (its last rope_dim outputs) are what a cache holds; wkv_b
    expands c into every head's no-RoPE key and its value. Queries: wq x, or wq_b(q_a_norm(wq_a x))."""
    T, nh, hd, nope, r, vd = x.shape[0], spec.n_heads, spec.head_dim, spec.qk_nope_dim, spec.rope_dim, spec.v_head_dim
    if spec.q_lora_rank:
        q = rms_norm(x @ w(names["wq_a"]).T, w(names["q_a_norm"]), spec.mla_norm_eps) @ w(names["wq_b"]).T
    else:
        q = x @ w(names["wq"]).T
    q = q.reshape(T, nh, hd)
    kva = x @ w(names["wkv_a"]).T
    latent = rms_norm(kva[:, : spec.kv_lora_rank], w(names["kv_a_norm"]), spec.mla_norm_eps)
    pos = np.arange(T)
    q_pe = rope(q[..., nope:], pos, spec)  # [T, nh, r]: rope() turns the first rope_dim dims, here all of them
    k_pe = rope(kva[:, None, spec.kv_lora_rank:], pos, spec)  # [T, 1, r]
    kv = (latent @ w(names["wkv_b"]).T).reshape(T, nh, nope + vd)
    k = np.concatenate([kv[..., :nope], np.broadcast_to(k_pe, (T, nh, r))], axis=-1)
    qf = np.concatenate([q[..., :nope], q_pe], axis=-1)
    scores = np.einsum("thd,shd->hts", qf, k)
    scores = scores * np.float32(spec.attn_scale) if spec.attn_scale else scores / np.float32(np.sqrt(hd))
    scores = np.where((np.arange(T)[None, :] > np.arange(T)[:, None])[None], -np.inf, scores)
    out = np.einsum("hts,shd->thd", softmax(scores), kv[..., nope:]).reshape(T, nh * vd)
    return out @ w(names["wo"]).T




def moe(spec: ArchSpec, layer: int, x: np.ndarray, router_x: np.ndarray, w: WeightFn, names: dict[str, str],
        on_route: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
        on_expert: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
    """Routed experts (one at a time, over the tokens routed to each) plus the optional shared expert.

    on_route(layer, ids, weights) sees the routing; on_expert(e, rows, x_rows, act) each stored expert's routed
    token rows, their inputs and the activation entering its down projection (the exporter's calibration).

    With a merge map, experts mapped to -1 are masked out of routing, and when top-k selects several members of
    one merged group their weights are summed and the group's expert runs once.
    """
    logits = router_logits(spec, router_x, w, names)
    emap = spec.layer_expert_map(layer)
    if emap is not None:
        logits = np.where(np.asarray(emap)[None, :] < 0, -np.inf, logits)
    # the bias only when the layer has one, so route(spec, logits) keeps its two-argument form for every other family
    ids, weights = route(spec, logits, w(names["score_bias"])) if spec.score_bias else route(spec, logits)
    if on_route is not None:
        on_route(layer, ids, weights)
    stored = ids if emap is None else np.asarray(emap)[ids]
    out = np.zeros_like(x)
    for e in np.unique(stored):
        rows = np.nonzero((stored == e).any(axis=1))[0]
        gate_w = np.where(stored[rows] == e, weights[rows], 0.0).sum(axis=1)
        gate, up, down = (w(expert_tensor_name(layer, int(e), m)) for m in ("gate", "up", "down"))
        xr = x[rows]
        hook = None if on_expert is None else (lambda act, e=int(e), rows=rows, xr=xr: on_expert(e, rows, xr, act))
        bias = expert_bias(spec, w, names, int(e))
        out[rows] += gate_w[:, None].astype(np.float32) * ffn(spec, xr, gate, up, down, bias, hook)
    if spec.shared_ffn:
        sh = ffn(spec, x, w(names["sh_gate"]), w(names["sh_up"]), w(names["sh_down"]))
        if spec.shared_gate:
            sh = sh / (1.0 + np.exp(-(x @ w(names["sh_gate_inp"]))))[:, None]
        out += sh
    return out


def post_norm(spec: ArchSpec, y: np.ndarray, w: WeightFn, names: dict[str, str], role: str) -> np.ndarray:
    """A block's output normalized by the layer's `role` norm when the layer has it (Gemma-4), else unchanged."""
    return rms_norm(y, w(names[role]), spec.norm_eps) if role in names else y


def ffn_inputs(spec: ArchSpec, layer: int, x_in: np.ndarray, h: np.ndarray, w: WeightFn,
               names: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(the experts' input, the router's input) of a MoE layer from its input x_in and post-attention residual h:
    the experts read ffn_norm(h) (moe_pre_norm(h) beside a dense MLP); the router the same (ffn_norm), the raw layer
    input (layer_input) or h RMS-normalized without a weight (residual_norm)."""
    hn = rms_norm(h, w(names["moe_pre_norm" if spec.dense_beside_moe else "ffn_norm"]), spec.norm_eps)
    router_x = {"ffn_norm": hn, "layer_input": x_in}.get(spec.router_input)
    return hn, rms_norm(h, np.float32(1.0), spec.norm_eps) if router_x is None else router_x


def ffn_block(spec: ArchSpec, layer: int, x_in: np.ndarray, h: np.ndarray, w: WeightFn, names: dict[str, str],
              on_route=None, on_expert=None) -> np.ndarray:
    """The feed-forward block's output (before the residual add): the dense MLP, the MoE block, or (Gemma-4) both
    side by side, each branch with its own norms; then the layer's post_ffn_norm when it has one."""
    dense = None
    if not spec.is_moe_layer(layer) or spec.dense_beside_moe:
        dense = ffn(spec, rms_norm(h, w(names["ffn_norm"]), spec.norm_eps), w(names["mlp_gate"]), w(names["mlp_up"]),
                    w(names["mlp_down"]))
        dense = post_norm(spec, dense, w, names, "mlp_post_norm")
    if spec.is_moe_layer(layer):
        hn, router_x = ffn_inputs(spec, layer, x_in, h, w, names)
        y = post_norm(spec, moe(spec, layer, hn, router_x, w, names, on_route, on_expert), w, names, "moe_post_norm")
        dense = y if dense is None else dense + y
    return post_norm(spec, dense, w, names, "post_ffn_norm")


def attention_block(spec: ArchSpec, layer: int, x: np.ndarray, w: WeightFn, names: dict[str, str]) -> np.ndarray:
    """x + the attention block's output (or the block of the layer kind that replaces attention: mixer()),
    post_attn_norm'ed when the layer has it, x residual_scale."""
    att = mixer(spec, layer, rms_norm(x, w(names["attn_norm"]), spec.norm_eps), w, names)
    return x + post_norm(spec, att, w, names, "post_attn_norm") * np.float32(spec.residual_scale)


def layer_output(spec: ArchSpec, h: np.ndarray, y: np.ndarray, w: WeightFn, names: dict[str, str]) -> np.ndarray:
    """The layer's output from its post-attention residual h and feed-forward output y (times its layer_scale)."""
    x = h + y * np.float32(spec.residual_scale)
    return x * w(names["layer_scale"]) if spec.layer_scale else x


def reference_logits(spec: ArchSpec, w: WeightFn, ids, on_route=None) -> np.ndarray:
    """Logits [T, vocab] for the token ids of a fresh sequence."""
    ids = np.asarray(ids, dtype=np.int64)
    x = w(GLOBAL_TENSORS["embed"])[ids].astype(np.float32) * np.float32(spec.embed_scale)
    for layer in range(spec.n_layers):
        names = dense_tensor_names(spec, layer)
        h = attention_block(spec, layer, x, w, names)
        x = layer_output(spec, h, ffn_block(spec, layer, x, h, w, names, on_route), w, names)
    x = rms_norm(x, w(GLOBAL_TENSORS["final_norm"]), spec.norm_eps)
    head = w(GLOBAL_TENSORS["embed"] if spec.tie_embeddings else GLOBAL_TENSORS["lm_head"])
    logits = ((x @ head.T) / np.float32(spec.logit_divisor)).astype(np.float32)
    if spec.logit_softcap:
        cap = np.float32(spec.logit_softcap)
        logits = (np.tanh(logits / cap) * cap).astype(np.float32)
    return logits
