"""MC-SMoE expert merging (M-SMoE grouping + permutation alignment + frequency-weighted merge), as plain functions.

Everything here maps plain data (NumPy arrays, lists, dicts) to plain data; the streaming calibration and the
container writing live in `merge_stage.py`. Algorithm notes: `shared/design/ALGORITHMS.md` section 1.

* `group_counts`   -- how many stored experts each layer keeps (adaptive global rule, or a fixed count).
* `group_experts`  -- e -> group: dominant experts by frequency, the others by router-logit similarity.
* `align_to`       -- SwiGLU/ReGLU-aware permutation of a member's intermediate neurons onto the dominant expert.
* `merge_layer`    -- one layer: `mcsmoe` (align + frequency-weighted average), `average`, `prune` (by selection
                     frequency) or `reap` (pruning by REAP saliency).
* `low_rank_approx` / `low_rank_plus_residual` -- optional compression of a merged matrix (measured in the study).

Conventions: expert matrices are f32 `[out, in]` as in the container: gate/up `[I, H]`, down `[H, I]`. Group g's
dominant expert is the g-th smallest dominant expert id, so a merge where every expert is its own group is the
identity map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edgemoe.arch import ArchSpec, expert_tensor_name

METHODS = ("mcsmoe", "average", "prune", "reap")
EXPERIMENTAL_METHODS = ("regmean",)  # studied in bench/merge_study.py, not offered on the command line
# the export's default: the method that measured best on the trained small model (BENCHMARKS.md, "With REAP and the
# output-preserving merge": +14.9 % held-out perplexity at ratio 0.5, against +30.5 % for mcsmoe)
DEFAULT_METHOD = "reap"


# ----------------------------------------------------------------------------------------------------------------
# How many groups per layer
# ----------------------------------------------------------------------------------------------------------------


def group_counts(freqs: Sequence[np.ndarray | None], merge_ratio: float | None = None,
                 experts_per_layer: int | None = None, min_groups: int = 1) -> list[int]:
    """Stored experts per layer (0 for a dense layer, given as None in `freqs`).

    `merge_ratio` R in (0, 1]: the M-SMoE adaptive global rule. Each layer's selection counts are normalized to
    sum 1, each layer's most used expert is set to 1 (so every layer keeps at least one), and the round(R * total)
    largest values over all layers are kept; a layer's count is how many of its values were kept. (The reference
    thresholds at `sorted[total]`, which undershoots the target on ties; taking exactly the top `total` entries,
    ties broken by layer then expert id, hits it.) `experts_per_layer` N: N in every layer. Each count is then
    clipped to [min_groups, E] (pass min_groups=top_k for `prune`, which must leave top_k routable experts).
    """
    if (merge_ratio is None) == (experts_per_layer is None):
        raise ValueError("give exactly one of merge_ratio and experts_per_layer")
    sizes = [0 if f is None else len(f) for f in freqs]
    if experts_per_layer is not None:
        if experts_per_layer < 1:
            raise ValueError(f"experts_per_layer={experts_per_layer} must be >= 1")
        counts = [min(experts_per_layer, n) for n in sizes]
    else:
        if not 0.0 < merge_ratio <= 1.0:
            raise ValueError(f"merge_ratio={merge_ratio} must be in (0, 1]")
        total = round(merge_ratio * sum(sizes))
        vals, owner = [], []
        for layer, f in enumerate(freqs):
            if f is None:
                continue
            f = np.asarray(f, dtype=np.float64)
            s = f.sum()
            fn = f / s if s > 0 else np.full(len(f), 1.0 / len(f))
            fn[int(np.argmax(fn))] = 1.0  # np.argmax: the lowest id among ties
            vals.append(fn)
            owner.append(np.full(len(f), layer))
        counts = [0] * len(freqs)
        if vals:
            v, o = np.concatenate(vals), np.concatenate(owner)
            order = np.argsort(-v, kind="stable")[:total]
            for layer in o[order]:
                counts[int(layer)] += 1
    return [0 if n == 0 else int(min(max(c, min_groups, 1), n)) for c, n in zip(counts, sizes)]


# ----------------------------------------------------------------------------------------------------------------
# Which experts form a group
# ----------------------------------------------------------------------------------------------------------------


def router_similarity(router_logits: np.ndarray) -> np.ndarray:
    """[T, E] -> [E, E]: Sim(i, j) = (cos(H[:, i], H[:, j]) + 1) / 2."""
    h = np.asarray(router_logits, dtype=np.float64)
    h = h / np.maximum(np.linalg.norm(h, axis=0, keepdims=True), 1e-12)
    return (h.T @ h + 1.0) / 2.0


def dominant_experts(freq: np.ndarray, n_groups: int) -> np.ndarray:
    """The `n_groups` most selected experts, ascending by id (frequency ties: lower id wins)."""
    order = np.argsort(-np.asarray(freq, dtype=np.float64), kind="stable")
    return np.sort(order[:n_groups])


def group_experts(freq: np.ndarray, router_logits: np.ndarray, n_groups: int) -> list[int]:
    """e -> group id in 0..n_groups-1. Group g's dominant expert is the g-th smallest dominant id."""
    freq = np.asarray(freq, dtype=np.float64)
    E = len(freq)
    if not 1 <= n_groups <= E:
        raise ValueError(f"n_groups={n_groups} must be in 1..{E}")
    dom = dominant_experts(freq, n_groups)
    sim = router_similarity(router_logits)
    emap = [-1] * E
    for g, e in enumerate(dom):
        emap[int(e)] = g
    for e in np.argsort(-freq, kind="stable"):  # the rest, most used first (the order only matters with capacity)
        if emap[int(e)] < 0:
            emap[int(e)] = int(np.argmax(sim[int(e), dom]))
    return emap


# ----------------------------------------------------------------------------------------------------------------
# Permutation alignment
# ----------------------------------------------------------------------------------------------------------------

Expert = tuple  # (gate [I, H], up [I, H], down [H, I])


def alignment_permutation(ref: Expert, tgt: Expert) -> np.ndarray:
    """perm with tgt neuron perm[i] matched to ref neuron i, maximizing W1r W1t^T + W3r W3t^T + W2r^T W2t."""
    from scipy.optimize import linear_sum_assignment

    (gr, ur, dr), (gt, ut, dt) = ref, tgt
    f64 = lambda a: np.asarray(a, dtype=np.float64)
    cost = f64(gr) @ f64(gt).T + f64(ur) @ f64(ut).T + f64(dr).T @ f64(dt)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def permute_expert(expert: Expert, perm: np.ndarray) -> Expert:
    """Reorder the intermediate neurons: rows of gate/up, columns of down. The function is unchanged."""
    gate, up, down = expert
    return gate[perm], up[perm], down[:, perm]


def align_to(ref: Expert, tgt: Expert) -> Expert:
    """`tgt` with its intermediate neurons permuted to match `ref` (computes exactly the same function)."""
    return permute_expert(tgt, alignment_permutation(ref, tgt))


def permute_gram_blocks(blocks: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Diagonal Gram blocks of activations whose neurons are reordered by `perm` (new i = old perm[i]).

    Only the diagonal blocks of the old Gram are known. An entry of a new block is copied when both of its old
    neurons were in one old block and set to 0 otherwise; that is the exact permuted Gram multiplied entrywise by a
    PSD 0/1 mask, so the result stays positive semi-definite (Schur product) and the diagonal is exact.
    """
    nb, g, _ = blocks.shape
    old_block, old_pos = perm // g, perm % g
    out = np.empty_like(blocks)
    for b in range(nb):
        ob, op = old_block[b * g:(b + 1) * g], old_pos[b * g:(b + 1) * g]
        vals = blocks[ob[:, None], op[:, None], op[None, :]]
        out[b] = np.where(ob[:, None] == ob[None, :], vals, 0.0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Merging one layer
# ----------------------------------------------------------------------------------------------------------------


def _expert(experts: dict, layer: int, e: int) -> Expert:
    return tuple(np.asarray(experts[expert_tensor_name(layer, e, m)], dtype=np.float32) for m in ("gate", "up", "down"))


def merge_layer(experts: dict, layer: int, spec: ArchSpec, freq: np.ndarray, router_logits: np.ndarray | None,
                n_groups: int, method: str = "mcsmoe", low_rank: int | None = None, return_perms: bool = False,
                align: bool = True, gram_in: dict | None = None, gram_mid: dict | None = None,
                saliency: np.ndarray | None = None):
    """Merge one layer's experts into `n_groups` stored experts.

    Returns `(merged, expert_map)`: container name (`expert_tensor_name(layer, g, m)`) -> f32 array, and the
    per-layer e -> g list (-1 = pruned). With `return_perms`, a third item `perms`: e -> the permutation applied
    to expert e's neurons before merging (None = not permuted), so callers can carry per-neuron statistics along.

    mcsmoe:  each member aligned to its group's dominant expert, then W_g = sum f_i W_i / sum f_i (f = selection
             counts; a group nobody selected gets the uniform average; a one-member group is copied exactly).
    average: uniform average of the members, no alignment.
    prune:   the n_groups most selected experts are kept unchanged, every other expert maps to -1 (the runtime
             masks it out of routing, so the router's softmax renormalizes over the kept ones).
    reap:    as prune, but the kept experts are the n_groups with the largest REAP saliency (`saliency`, [E]: mean
             over routed tokens of gate weight x output norm, `calibrate.expert_saliency`).
    low_rank r: every stored matrix replaced by its best rank-r approximation (truncated SVD), for measurement;
             the container still stores the dense product (factorized storage is not in the format).
    align=False: mcsmoe without the permutation alignment (an ablation for the study).
    regmean: (experimental) grouping and alignment as mcsmoe, then per matrix the data-aware merge
             W_g = argmin sum_i ||(W - W_i) X_i^T||^2 + lam ||W - W_mcsmoe||^2, solved per diagonal Gram block
             (`gram_in`/`gram_mid`: e -> [in/gs, gs, gs] blocks from calibration; RegMean, Jin et al. 2023,
             restricted to the block-diagonal Grams the calibration pass keeps).
    """
    if method not in METHODS + EXPERIMENTAL_METHODS:
        raise ValueError(f"merge method {method!r}: expected one of {METHODS + EXPERIMENTAL_METHODS}")
    E = spec.n_experts
    freq = np.asarray(freq, dtype=np.float64)
    perms: dict = {e: None for e in range(E)}
    merged: dict = {}

    def store(g: int, ex: Expert) -> None:
        for m, w in zip(("gate", "up", "down"), ex):
            w = w if low_rank is None else low_rank_approx(w, low_rank)
            merged[expert_tensor_name(layer, g, m)] = np.ascontiguousarray(w, dtype=np.float32)

    if method in ("prune", "reap"):
        if n_groups < spec.top_k:
            raise ValueError(f"{method} keeps {n_groups} experts in layer {layer}, fewer than top_k={spec.top_k}")
        if method == "reap" and saliency is None:
            raise ValueError("reap ranks experts by their saliency: calibrate with collect_saliency=True")
        emap = [-1] * E
        for g, e in enumerate(dominant_experts(freq if method == "prune" else saliency, n_groups)):
            emap[int(e)] = g
            store(g, _expert(experts, layer, int(e)))
    else:
        if router_logits is None:
            raise ValueError("grouping needs the router logits of the calibration tokens")
        emap = group_experts(freq, router_logits, n_groups)
        dom = dominant_experts(freq, n_groups)
        for g in range(n_groups):
            members = [e for e in range(E) if emap[e] == g]
            d = int(dom[g])
            ref = _expert(experts, layer, d)
            if len(members) == 1:
                store(g, ref)
                continue
            f = freq[members]
            if method in ("mcsmoe", "regmean") and f.sum() > 0:
                wts = f / f.sum()
            else:
                wts = np.full(len(members), 1.0 / len(members))
            acc = [np.zeros(w.shape, np.float64) for w in ref]
            aligned = []
            for e, wt in zip(members, wts):
                ex = ref if e == d else _expert(experts, layer, e)
                if method in ("mcsmoe", "regmean") and align and e != d:
                    perms[e] = alignment_permutation(ref, ex)
                    ex = permute_expert(ex, perms[e])
                for a, w in zip(acc, ex):
                    a += wt * w
                if method == "regmean":
                    aligned.append(ex)
            if method == "regmean":
                gin = [None if gram_in is None else gram_in.get(e) for e in members]
                gmid = [None if gram_mid is None or e not in gram_mid else
                        gram_mid[e] if perms[e] is None else permute_gram_blocks(gram_mid[e], perms[e])
                        for e in members]
                acc = [_regmean([ex[i] for ex in aligned], grams, acc[i])
                       for i, grams in enumerate((gin, gin, gmid))]
            store(g, tuple(acc))
    return (merged, emap, perms) if return_perms else (merged, emap)


def _regmean(ws: list, grams: list, prior: np.ndarray, ridge: float = 0.1) -> np.ndarray:
    """min_W sum_i ||(W - W_i) X_i^T||^2 + lam ||W - prior||^2 per diagonal block of input channels, with
    lam = ridge * mean diagonal of the summed block (so it scales with the data). Members without a Gram only
    enter through the prior."""
    have = [i for i, gm in enumerate(grams) if gm is not None]
    if not have:
        return prior
    grams = [None if gm is None else np.asarray(gm, np.float64) for gm in grams]  # calibration stores float32
    nb, gs, _ = grams[have[0]].shape
    out = np.empty(prior.shape, np.float64)
    for b in range(nb):
        sl = slice(b * gs, (b + 1) * gs)
        G = sum(grams[i][b] for i in have)
        lam = ridge * max(float(np.trace(G)) / gs, 1e-12)
        rhs = sum(np.asarray(ws[i][:, sl], np.float64) @ grams[i][b] for i in have) + lam * prior[:, sl]
        out[:, sl] = np.linalg.solve(G + lam * np.eye(gs), rhs.T).T  # G symmetric
    return out


# ----------------------------------------------------------------------------------------------------------------
# Optional compression of a (merged) matrix
# ----------------------------------------------------------------------------------------------------------------


def low_rank_factors(w: np.ndarray, r: int) -> tuple:
    """W [m, n] ~ L [m, r] @ R [r, n] (truncated SVD, singular values split as sqrt on both sides, LoSparse-style)."""
    u, s, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    r = min(r, len(s))
    rs = np.sqrt(s[:r])
    return (u[:, :r] * rs).astype(np.float32), (rs[:, None] * vt[:r]).astype(np.float32)


def low_rank_approx(w: np.ndarray, r: int) -> np.ndarray:
    left, right = low_rank_factors(w, r)
    return left @ right


def rtn_quantize(w: np.ndarray, bits: int, group: int = 128) -> np.ndarray:
    """Round-to-nearest asymmetric per-group quantization along the input dim (f16 scale and zero per group),
    returned dequantized. A stand-in quantizer for comparing low-rank + residual against plain quantization."""
    w = np.asarray(w, dtype=np.float32)
    m, n = w.shape
    g = group if n % group == 0 else n
    b = w.reshape(m, n // g, g)
    lo, hi = b.min(axis=2, keepdims=True), b.max(axis=2, keepdims=True)
    qmax = 2**bits - 1
    scale = (np.maximum(hi - lo, 1e-8) / qmax).astype(np.float16).astype(np.float32)
    zero = np.round(-lo / scale)
    q = np.clip(np.round(b / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(m, n).astype(np.float32)


def rtn_bytes(shape: tuple, bits: int, group: int = 128) -> int:
    m, n = shape
    g = group if n % group == 0 else n
    return m * n * bits // 8 + m * (n // g) * 4  # codes + f16 scale + f16 zero per group


def low_rank_plus_residual(w: np.ndarray, r: int, quantize: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """L R (f16) + quantize(W - L R): the low-rank part keeps the largest directions nearly exactly and the
    residual, with a smaller range, goes to a cheap quantizer. Returned reconstructed, f32."""
    left, right = low_rank_factors(w, r)
    lr = left.astype(np.float16).astype(np.float32) @ right.astype(np.float16).astype(np.float32)
    return (lr + quantize(np.asarray(w, np.float32) - lr)).astype(np.float32)


def low_rank_bytes(shape: tuple, r: int, bytes_per_weight: int = 2) -> int:
    m, n = shape
    return r * (m + n) * bytes_per_weight
