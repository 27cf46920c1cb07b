"""MWQ fitting (exporter side): nested base + binary residual planes, MSB slicing, and plain RTN for comparison.

The byte layout lives in `edgemoe.mwq` (device side); this module decides the codes and scales.

Per expert matrix W [out, in], groups of `group_size` along the input dimension, and per group g the Gram block
G_g = X_g^T X_g of the expert's calibration inputs (from `calibrate.py`). The error a fit minimizes is the
activation-aware error restricted to the group's diagonal block, per (row, group):

    err(row, g) = (w - w_hat) G_g (w - w_hat)^T

and with `gram=None` (an expert that saw too few calibration tokens) G_g = I, i.e. the plain weight error.

mwq nesting, per (row, group), greedy and nested:
- Base plane candidates: D^2MoE's fit (min/max init, then a few alternations of codes = clamp(round((w - m1)/s1))
  and the weighted least-squares (s1, m1) for fixed codes), and min/max-type ranges sized for the nested grid at a
  few spans (`SPANS`).
- Residual plane k: B = sign(R), R = W - W_hat_{k-1} (sign(0) = +1), scale s_k = (R G B^T) / (B G B^T), the weighted
  least-squares scale for the fixed signs, or the binary-expansion scale s1 / 2^k.
- The candidate kept is the one with the smallest weighted error summed over all prefixes k = 1..K, each
  normalized by the best candidate's error at that k. Why not the alternation alone: its least-squares (s1, m1)
  shrink the range and leave the clipped weights with residuals far above the others, which one sign and one scale
  per group cannot remove; on Gaussian and Student-t weights the 8-bit prefix then had 10-30x the error of RTN-8.
  Why not least-squares residual scales alone: they are myopic, and the deep prefixes suffer. The selection keeps
  each prefix within a few percent of (usually below) independent RTN at the same bits; see tests/test_mwq.py.
- Every scale is rounded to float16 before the next plane is fitted, so each plane corrects exactly what the device
  will reconstruct. The least-squares scale never raises the weighted error (s_k = 0 is feasible, and rounding moves
  s_k by far less than |s_k|). An expansion step can overshoot a group whose residual is already small (a +-1
  plane has no zero), so for one (row, group) the error may rise at some k; over a matrix it falls with every k
  (each expansion step halves the residual range). Requiring per-group monotonicity was tried: it costs the deep
  prefixes 1.5-2x error (they lose the expansion chains), so it is not done.
- msb nesting: per-group 8-bit codes on 256 equal bins over [min, max] (q8 = floor), sliced into the same plane
  format (see `_fit_msb`); the Gram is not used (MatQuant's min/max quantizer).

Two implementations of the mwq search: `_fit_mwq` here (NumPy, vectorized over rows, groups and candidates; the
readable reference) and native/src/mwq_fit.c (`mwq_native`, the default: per (row, group) without temporaries, the
G products batched with AVX-512/AVX2 FMA, rows split across threads). At OLMoE-1B-7B's expert shape [1024, 2048],
4 bits, with Grams: 1.05 CPU s per matrix in NumPy, 0.31 in C (weight-only 0.67 / 0.11; quantize_matrix with its
encoding, one thread); the planes are the same up to float rounding at near-ties (tests/test_mwq_fit_native.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgemoe.errors import EdgeMoEError
from edgemoe.mwq import (
    BASE_BITS,
    GROUP_MULTIPLE,
    bits_per_weight,
    check_params,
    dequantize,
    encode_base_plane,
    encode_residual_plane,
)

from .blas import one_blas_thread

NESTINGS = ("mwq", "msb")
IMPLS = ("c", "numpy")  # the mwq search: native/src/mwq_fit.c (the default) or `_fit_mwq` below (the reference)
MAX_BITS = 8
DEFAULT_GROUP = 128
DAMPING = 0.01  # ridge added to each normalized Gram block (as GPTQ's percdamp): keeps the 2x2 solves well posed
# rows x in x candidates fitted at once: small enough that the search's float32 arrays (about 1 MB each) stay in
# cache between its many elementwise passes; 1 << 23 (33 MB arrays) was 1.8x slower at OLMoE's expert shapes with
# identical planes (rows are independent, so the block size never changes the result)
CHUNK_ELEMENTS = 1 << 18
F16_MAX = float(np.finfo(np.float16).max)


@dataclass
class QuantizedMatrix:
    shape: tuple[int, int]
    base_bits: int
    total_bits: int
    group_size: int
    nesting: str
    planes: list[np.ndarray]  # uint8 bytes of P1 .. PK
    weighted: bool = False  # fitted with a Gram block (False: weight-only error)
    extra: dict = field(default_factory=dict)

    @property
    def n_planes(self) -> int:
        return len(self.planes)

    def dequantize(self, k: int | None = None) -> np.ndarray:
        out, in_ = self.shape
        return dequantize(self.planes, k or self.n_planes, out, in_, self.base_bits, self.group_size)

    def quant_params(self) -> dict:
        return {"base_bits": self.base_bits, "group_size": self.group_size, "nesting": self.nesting,
                "weighted": self.weighted}


def n_planes_for(base_bits: int, total_bits: int) -> int:
    return total_bits - base_bits + 1


def check_bits(base_bits: int, total_bits: int) -> None:
    if base_bits not in BASE_BITS:
        raise EdgeMoEError(f"--base-bits {base_bits}: expected one of {', '.join(map(str, BASE_BITS))}")
    if not base_bits <= total_bits <= MAX_BITS:
        raise EdgeMoEError(f"--bits {total_bits} with --base-bits {base_bits}: the total must be in "
                           f"{base_bits}..{MAX_BITS} (base plane plus one bit per residual plane)")


def choose_group_size(dims: list[int], requested: int | None = None) -> int:
    """The group size for matrices whose input dimensions are `dims`.

    `requested=None` (auto): 128 when it divides every dimension, else the largest power of two below 128 that does
    (at least 8). An explicit size must be a multiple of 8 that divides every dimension.
    """
    auto = next((g for g in (128, 64, 32, 16, 8) if all(d % g == 0 for d in dims)), None)
    if requested is None:
        if auto is None:
            raise EdgeMoEError(f"no group size in 8..128 divides the expert input dimensions {sorted(set(dims))}")
        return auto
    if requested <= 0 or requested % GROUP_MULTIPLE or any(d % requested for d in dims):
        hint = f"; try --group-size {auto}" if auto else ""
        raise EdgeMoEError(f"--group-size {requested} must be a multiple of {GROUP_MULTIPLE} dividing the expert input "
                           f"dimensions {sorted(set(dims))}{hint}")
    return requested


# --- the metric: products with the per-group Gram blocks ---------------------------------------------------
class _Metric:
    """x -> G x per (row, group) for x [out, ng, g]; identity when no Gram is given."""

    def __init__(self, gram: np.ndarray | None, ng: int, g: int):
        if gram is None:
            self.G = None
            self.G1 = np.ones((ng, g))
            self.c = np.full(ng, float(g))
            return
        gram = np.asarray(gram, dtype=np.float64)
        if gram.shape != (ng, g, g):
            raise ValueError(f"Gram blocks of shape {gram.shape}, expected {(ng, g, g)}")
        # scale each block to mean diagonal 1 (the fit is invariant to it) and add a small ridge
        scale = np.trace(gram, axis1=1, axis2=2) / g
        scale = np.where(scale > 0, scale, 1.0)
        G = gram / scale[:, None, None] + DAMPING * np.eye(g)[None]
        self.G = G
        self.G32 = G.astype(np.float32)
        self.G1 = G.sum(axis=2)  # G 1, [ng, g]
        self.c = self.G1.sum(axis=1)  # 1^T G 1, [ng]

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.G is None:
            return x
        # one float32 [out, g] @ [g, g] product per group (contiguous operands keep BLAS fast; a loop over the
        # in/g groups, never over rows)
        r = np.empty(x.shape, np.float32)
        for n in range(x.shape[1]):
            r[:, n, :] = np.ascontiguousarray(x[:, n, :], dtype=np.float32) @ self.G32[n]
        return r  # float32: G is only known to a few digits anyway (a sample estimate, damped)

    def ones_dot(self, x: np.ndarray) -> np.ndarray:
        """1^T G x per (row, group) -> [out, ng]."""
        return np.einsum("ng,ong->on", self.G1, x)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ong,ong->on", a, b).astype(np.float64)


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 (saturating) and return as float64."""
    return np.clip(x, -F16_MAX, F16_MAX).astype(np.float16).astype(np.float64)


# --- MWQ -------------------------------------------------------------------------------------------------------
SPANS = (1.0, 0.95, 0.9, 0.8, 0.7)  # base-plane range candidates, as fractions of the nested min/max range


def _codes(W: np.ndarray, s: np.ndarray, m: np.ndarray, L: int) -> np.ndarray:
    safe = np.where(s > 0, s, 1.0)[:, :, None]
    return np.clip(np.rint((W - m[:, :, None]) / safe), 0, L)


def _wls_base(W: np.ndarray, M: _Metric, bits: int, iters: int):
    """D^2MoE's base fit: min/max init, then alternate codes = round((w - m1)/s1) and the weighted least-squares
    (s1, m1) for fixed codes; keeps the best (s1, m1, q) per (row, group) by weighted base error."""
    L = (1 << bits) - 1
    lo, hi = W.min(axis=2), W.max(axis=2)
    s, m = (hi - lo) / L, lo.copy()
    GW = M.apply(W)
    wGw, oGw = _dot(W, GW), M.ones_dot(W)

    def error(s, m, q, Gq):  # (w - s q - m)^T G (w - s q - m), expanded so that only G q is needed
        qGq, qGw, oGq = _dot(q, Gq), _dot(q, GW), M.ones_dot(q)
        return wGw - 2 * (s * qGw + m * oGw) + s * s * qGq + 2 * s * m * oGq + m * m * M.c[None, :]

    q = _codes(W, s, m, L)
    best_s, best_m, best_q = s, m, q
    best_err = error(s, m, q, M.apply(q))
    for _ in range(iters):
        Gq = M.apply(q)
        a, b, c = _dot(q, Gq), M.ones_dot(q), M.c[None, :]
        d, f = _dot(q, GW), oGw
        det = a * c - b * b
        ok = det > 1e-9 * np.maximum(a * c, 1e-300)
        det_safe = np.where(ok, det, 1.0)
        s_new = np.where(ok, (c * d - b * f) / det_safe, s)
        m_new = np.where(ok, (a * f - b * d) / det_safe, m)
        ok &= s_new > 0
        s, m = np.where(ok, s_new, s), np.where(ok, m_new, m)
        err = error(s, m, q, Gq)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_m = np.where(better, s, best_s), np.where(better, m, best_m)
        best_q = np.where(better[:, :, None], q, best_q)
        q = _codes(W, s, m, L)
    return best_s, best_m, best_q


def _span_base(W: np.ndarray, bits: int, n_planes: int, span: float):
    """A base plane whose nested grid covers `span` of [min, max]: with residual scales halving, the K-plane grid is
    uniform with step s1 / 2^(K-1) over [m1 - h, m1 + L s1 + h], h = s1 (1/2 - 2^-K); span 1 makes that exactly
    [min, max] (the K-bit RTN grid), smaller spans clip the extremes a little, which favours the short prefixes."""
    L = (1 << bits) - 1
    lo, hi = W.min(axis=2), W.max(axis=2)
    h = 0.5 - 2.0 ** -n_planes
    s = span * (hi - lo) / (L + 2 * h)
    m = 0.5 * (lo + hi) - s * L / 2
    return s, m, _codes(W, s, m, L)


def _residual_planes(W: np.ndarray, M: _Metric, s1, m1, q, n_planes: int, halving, keep: bool):
    """Binary residual planes on top of a base: B = sign(R) and s_k the weighted least-squares scale, or, where
    `halving` (bool [out, ng]) is set, the binary-expansion scale s_k = s1 / 2^k (which makes the span-1 base
    reproduce the uniform (b1 + k - 1)-bit grid). Returns the weighted error of every prefix [K, out, ng] and, with
    `keep`, the planes' (scale, signs)."""
    R = W - (s1[:, :, None] * q + m1[:, :, None]).astype(W.dtype)
    errs = [_dot(R, M.apply(R))]
    planes = []
    one = np.ones((), W.dtype)
    for k in range(2, n_planes + 1):
        B = np.where(R >= 0, one, -one)
        GB = M.apply(B)
        bGb = _dot(B, GB)
        rGb = _dot(R, GB)
        s = _f16(np.where(halving, s1 * 2.0 ** -k, rGb / bGb))
        # new error from the old one: (R - s B) G (R - s B) = R G R - 2 s R G B + s^2 B G B
        errs.append(errs[-1] - 2 * s * rGb + s * s * bGb)
        R -= s.astype(W.dtype)[:, :, None] * B
        if keep:
            planes.append((s, B > 0))
    return np.stack(errs), planes


def _fit_mwq(W: np.ndarray, M: _Metric, base_bits: int, n_planes: int, iters: int):
    """Choose per (row, group) among candidate fits, then write the planes of the chosen one.

    Candidates: base plane = the weighted least-squares fit (`_wls_base`) or a nested min/max range at a few spans
    (`_span_base`); residual scales = weighted least squares or binary expansion. The choice minimizes the weighted
    error summed over all prefixes k = 1..K, each normalized by the best candidate's error at that k, so that k = 1
    counts as much as k = K: every prefix must be good, not just the full precision.

    The two scale schedules of a base share its prefix k = 1 and the signs of plane 2 (both are functions of the base
    alone), so those are computed once per base and the candidates only split at the scale of plane 2: the same
    numbers as evaluating all candidates independently, with a third fewer G products at 4 bits.
    """
    L = (1 << base_bits) - 1
    bases = [_wls_base(W, M, base_bits, iters)]
    bases += [_span_base(W, base_bits, n_planes, a) for a in SPANS]
    bases = [(_f16(s), _f16(m), _codes(W, _f16(s), _f16(m), L) if i else q) for i, (s, m, q) in enumerate(bases)]
    shape = W.shape[:2]
    nb = len(bases)
    # all bases at once, stacked along the row axis (rows are independent), so each G product is one matmul per group
    s1, m1, q = (np.concatenate([b[i] for b in bases]) for i in range(3))
    # the search only ranks candidates, in float32 (ranking with the diagonal of G only was tried: 1.5x faster, but
    # 2x the logit error at 8 bits on the tiny test models); the chosen one is refitted below
    errs = _search_errors(np.tile(W.astype(np.float32), (nb, 1, 1)), M, s1, m1, q, n_planes, nb)  # [K, C, o, n]
    C = errs.shape[1]
    errs = np.maximum(errs, 0.0)
    best = errs.min(axis=1, keepdims=True)
    score = (errs / np.maximum(best, 1e-30 + 1e-12 * best.max())).sum(axis=0)  # [C, o, n]
    pick = score.argmin(axis=0)  # [o, n]; candidate c = base * n_schedules + schedule (first wins ties)
    n_sched = C // nb
    rows = np.arange(shape[0])[:, None] + shape[0] * (pick // n_sched)  # row of the chosen base in the stacked arrays
    cols = np.arange(shape[1])[None, :]
    s1, m1, q, halving = s1[rows, cols], m1[rows, cols], q[rows, cols], (pick % n_sched) == 1
    _, res = _residual_planes(W, M, s1, m1, q, n_planes, halving, keep=True)
    return s1, m1, q.astype(np.uint8), res


def _search_errors(W: np.ndarray, M: _Metric, s1, m1, q, n_planes: int, nb: int) -> np.ndarray:
    """The weighted error of every prefix k = 1..K for every candidate: the stacked bases [nb * o, ng, g] each with
    least-squares residual scales (schedule 0) and with binary-expansion scales (schedule 1). Returns
    [K, nb * 2, o, ng] (candidate = base * 2 + schedule; one schedule when K = 1).

    Same arithmetic as `_residual_planes` on each candidate separately (float32 planes, float64 scales and errors)."""
    nb_o, ng = s1.shape
    R = W - (s1[:, :, None] * q + m1[:, :, None]).astype(W.dtype)
    errs = [_dot(R, M.apply(R))[None]]
    one = np.ones((), W.dtype)
    if n_planes > 1:
        # plane 2: signs and their products shared by both schedules; the scale differs
        B = np.where(R >= 0, one, -one)
        GB = M.apply(B)
        bGb, rGb = _dot(B, GB), _dot(R, GB)
        s_ls, s_half = _f16(rGb / bGb), _f16(s1 * 2.0 ** -2)
        errs = [np.concatenate([errs[0], errs[0]])]  # [schedules, nb * o, ng]
        errs.append(np.stack([errs[0][0] - 2 * s * rGb + s * s * bGb for s in (s_ls, s_half)]))
        R = np.stack([R - s.astype(W.dtype)[:, :, None] * B for s in (s_ls, s_half)])  # [2, nb*o, ng, g]
        halving = np.stack([np.zeros_like(s1, bool), np.ones_like(s1, bool)])
        s1 = np.stack([s1, s1])
        R = R.reshape(2 * nb_o, ng, -1)
        for k in range(3, n_planes + 1):
            B = np.where(R >= 0, one, -one)
            GB = M.apply(B).reshape(2, nb_o, ng, -1)
            B = B.reshape(2, nb_o, ng, -1)
            Rv = R.reshape(2, nb_o, ng, -1)
            bGb = np.stack([_dot(B[i], GB[i]) for i in range(2)])
            rGb = np.stack([_dot(Rv[i], GB[i]) for i in range(2)])
            s = _f16(np.where(halving, s1 * 2.0 ** -k, rGb / bGb))
            errs.append(errs[-1] - 2 * s * rGb + s * s * bGb)
            Rv -= s.astype(W.dtype)[..., None] * B
    e = np.stack(errs).reshape(n_planes, -1, nb, nb_o // nb, ng)  # [K, schedules, nb, o, ng]
    return e.transpose(0, 2, 1, 3, 4).reshape(n_planes, -1, nb_o // nb, ng)  # candidate = base * schedules + schedule


# --- MSB slicing -------------------------------------------------------------------------------------------------
def _fit_msb(W: np.ndarray, base_bits: int, n_planes: int):
    """Per-group 8-bit codes q8 = floor((w - lo) / s) on 256 bins of width s = (hi - lo) / 256 over [lo, hi].

    Reading the top r bits and reconstructing at the bucket midpoint, w = s * ((q8 >> (8-r)) << (8-r) + 2^(7-r)) + lo
    (= s * (... - z) with z = -lo / s), is exactly the plane format: P1 holds the top b1 bits with
    s1 = s * 2^(8-b1), m1 = s * 2^(7-b1) + lo, and the residual plane of bit j (j = b1+1 .. r, bit 1 = MSB) holds
    B = 2 * bit_j - 1 with s_j = s * 2^(7-j). Powers of two times a float16 s are exact in float16, and q8 is computed
    from the stored (rounded) s and lo, so the identity holds exactly for the stored numbers.
    """
    lo, hi = W.min(axis=2), W.max(axis=2)
    s = (hi - lo) / 256
    s16 = np.clip(s, 0, F16_MAX).astype(np.float16)
    s16 = np.where(s16.astype(np.float64) < s, np.nextafter(s16, np.float16(np.inf)), s16).astype(np.float64)
    m1 = _f16(s16 * 2.0 ** (7 - base_bits) + lo)
    lo_eff = m1 - s16 * 2.0 ** (7 - base_bits)
    safe = np.where(s16 > 0, s16, 1.0)[:, :, None]
    q8 = np.clip(np.floor((W - lo_eff[:, :, None]) / safe), 0, 255).astype(np.uint8)
    q8 = np.where(s16[:, :, None] > 0, q8, 0).astype(np.uint8)
    out = W.shape[0]
    planes = [encode_base_plane(s16 * 2.0 ** (8 - base_bits), m1, (q8 >> (8 - base_bits)).reshape(out, -1), base_bits)]
    for j in range(base_bits + 1, base_bits + n_planes):
        bit = (q8 >> (8 - j)) & 1
        planes.append(encode_residual_plane(s16 * 2.0 ** (7 - j), (2.0 * bit - 1.0).reshape(out, -1)))
    return planes, q8, s16, lo_eff


# --- public API -------------------------------------------------------------------------------------------------
def quantize_matrix(W: np.ndarray, gram: np.ndarray | None = None, base_bits: int = 2, total_bits: int = 4,
                    group_size: int = DEFAULT_GROUP, nesting: str = "mwq", iters: int = 4, impl: str = "c",
                    threads: int | None = None) -> QuantizedMatrix:
    """Quantize W [out, in] into nested planes P1..PK (K = total_bits - base_bits + 1).

    gram: [in / group_size, group_size, group_size] Gram blocks X_g^T X_g of the matrix's inputs, or None for the
    weight-only error. nesting: "mwq" (fitted residual planes) or "msb" (sliced 8-bit codes; gram unused).
    impl: "c" (`mwq_native`, the C search on `threads` cores, default all) or "numpy" (`_fit_mwq` here, the
    readable reference; same method, the planes agree up to float rounding ties, see tests/test_mwq_fit_native.py).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r}: expected one of {IMPLS}")
    if nesting not in NESTINGS:
        raise EdgeMoEError(f"--nesting {nesting!r}: expected one of {NESTINGS}")
    check_bits(base_bits, total_bits)
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {W.shape}")
    out, in_ = W.shape
    try:
        ng = check_params(out, in_, base_bits, group_size)
    except ValueError as e:
        raise EdgeMoEError(f"{e}; choose --group-size accordingly") from None
    if not np.isfinite(W).all():
        raise EdgeMoEError("the matrix contains NaN or infinite weights")
    Wg = W.reshape(out, ng, group_size)
    K = n_planes_for(base_bits, total_bits)
    if nesting == "msb":
        planes, *_ = _fit_msb(Wg, base_bits, K)
        return QuantizedMatrix((out, in_), base_bits, total_bits, group_size, nesting, planes, weighted=False)
    M = _Metric(gram, ng, group_size)
    if impl == "c":
        from . import mwq_native

        s1, m1, q, res = mwq_native.fit(W, None if M.G is None else M.G32, base_bits, K, iters, group_size,
                                        threads or mwq_native.default_threads())
    else:
        # rows are independent: fit blocks of rows so the candidates' stacked arrays stay a few tens of MB
        step = max(1, CHUNK_ELEMENTS // (2 * (len(SPANS) + 1) * in_))
        with one_blas_thread():
            parts = [_fit_mwq(Wg[r : r + step], M, base_bits, K, iters) for r in range(0, out, step)]
        s1, m1, q = (np.concatenate([p[i] for p in parts]) for i in range(3))
        res = [(np.concatenate([p[3][k][0] for p in parts]), np.concatenate([p[3][k][1] for p in parts]))
               for k in range(K - 1)]
    planes = [encode_base_plane(s1, m1, q.reshape(out, in_), base_bits)]
    for s, signs in res:
        planes.append(encode_residual_plane(s, signs.reshape(out, in_)))
    return QuantizedMatrix((out, in_), base_bits, total_bits, group_size, nesting, planes, weighted=gram is not None)


def rtn_fake_quant(W: np.ndarray, bits: int, group_size: int = DEFAULT_GROUP) -> np.ndarray:
    """Independent per-group round-to-nearest, asymmetric min/max: s = (max - min) / (2^b - 1),
    z = round(-min / s), w_hat = s * (clamp(round(w / s) + z, 0, 2^b - 1) - z). Scale and zero as float16
    (b + 32 / group_size bits per weight on disk). Returns float32 [out, in]."""
    W = np.asarray(W, dtype=np.float64)
    out, in_ = W.shape
    if in_ % group_size:
        raise EdgeMoEError(f"group size {group_size} does not divide the input dimension {in_}")
    Wg = W.reshape(out, in_ // group_size, group_size)
    L = (1 << bits) - 1
    lo, hi = Wg.min(axis=2, keepdims=True), Wg.max(axis=2, keepdims=True)
    s = _f16((hi - lo) / L)
    safe = np.where(s > 0, s, 1.0)
    z = np.clip(np.rint(-lo / safe), 0, L)
    q = np.clip(np.rint(Wg / safe) + z, 0, L)
    return (s * (q - z)).reshape(out, in_).astype(np.float32)


def rtn_bits_per_weight(bits: int, group_size: int = DEFAULT_GROUP) -> float:
    return bits + 32 / group_size


def mwq_bits_per_weight(base_bits: int, k: int, group_size: int = DEFAULT_GROUP) -> float:
    """Bits per weight of the first k planes, scales included."""
    return sum(bits_per_weight(p, base_bits, group_size) for p in range(1, k + 1))


def reconstruction_error(W: np.ndarray, W_hat: np.ndarray, gram: np.ndarray | None = None,
                         group_size: int = DEFAULT_GROUP) -> float:
    """sum over (row, group) of e G_g e^T with e = W - W_hat (the raw Gram, no damping); G = I when gram is None."""
    E = np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)
    if gram is None:
        return float((E * E).sum())
    out, in_ = E.shape
    Eg = E.reshape(out, in_ // group_size, group_size)
    GE = np.matmul(np.asarray(gram, np.float64), Eg.transpose(1, 2, 0)).transpose(2, 0, 1)
    return float(_dot(Eg, GE).sum())
