/* aarch64 MWQ plane kernels: NEON (base armv8-a) and NEON + SDOT (armv8.2-a dotprod, selected at run time only when
 * HWCAP says so, as in kernels_neon.c).
 *
 * The same algorithm and activation layout as kernels_mwq_avx2.c (read its header comment): a chunk is the 32 code
 * bytes of a row (256/b1 inputs), unpacked by shifts into P = 8/b1 vectors of 32 byte codes (two q registers each)
 * that line up with the prepared activations; residual planes are replicated sign bytes turned into 0x00/0xFF masks
 * with vtst (-1 where B = +1), so dot(x, mask) = -sum_{B=+1} x and the table holds -2 s_p. Every dot product lands
 * in 8 int32 lanes (two int32x4), lane L = bytes 4L..4L+3 of each 32-byte vector:
 *   with SDOT: vdotq_s32 (exact);
 *   without:   vmull_s8 / vmull_high_s8 products, vpaddq_s16 (pairs), summed over the P vectors in int16 (bounds as
 *              in the AVX2 file: <= 7620, or 32512 for the single b1 = 8 vector), then vpaddlq_s16 to int32.
 * b1 = 8 codes are recentred to q - 128 (int8) and 128 * sum x goes into c. Tiles: one row x up to 4 tokens, the
 * same operations per (row, token) in every tile (decode == prefill bit for bit).
 * F32 activations: 8 weights rebuilt in registers bit-identically to edgemoe/mwq.py (s1*q + m1, then +-s_p), fma.
 */
#include "internal.h"
#include "kernel_walks.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#define NEON_INLINE static inline __attribute__((always_inline))
#if defined(__clang__)
#define DOTPROD_TARGET __attribute__((target("dotprod")))
#else
#define DOTPROD_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#define TABW (MWQ_SEG_GROUPS + 8)

NEON_INLINE float h2f(uint16_t h) { return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0); }
NEON_INLINE float32x4_t h2f4(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

/* f32 scales of one row segment: s1, c = m1 (+ 128 s1 if b1 = 8) - sum_p s_p, r[p] = -2 s_p. */
typedef struct {
    float s1[TABW], c[TABW], r[MWQ_MAX_PLANES - 1][TABW];
} seg_tab;

NEON_INLINE void load_scales(const mwq_matrix *w, int64_t o, int64_t g0, int n, seg_tab *tab) {
    const size_t base = (size_t)(o * (w->cols / w->group) + g0);
    const int nr = w->k - 1, b8 = w->base_bits == 8;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float32x4_t s1 = h2f4(w->s1 + base + j);
        float32x4_t c = h2f4(w->m1 + base + j);
        if (b8) c = vaddq_f32(c, vmulq_n_f32(s1, 128.0f));
        for (int p = 0; p < nr; p++) {
            const float32x4_t sp = h2f4(w->rs[p] + base + j);
            c = vsubq_f32(c, sp);
            vst1q_f32(tab->r[p] + j, vnegq_f32(vaddq_f32(sp, sp)));
        }
        vst1q_f32(tab->s1 + j, s1);
        vst1q_f32(tab->c + j, c);
    }
    for (; j < n; j++) {
        const float s1 = h2f(w->s1[base + j]);
        float c = h2f(w->m1[base + j]);
        if (b8) c = c + s1 * 128.0f;
        for (int p = 0; p < nr; p++) {
            const float sp = h2f(w->rs[p][base + j]);
            c = c - sp;
            tab->r[p][j] = -(sp + sp);
        }
        tab->s1[j] = s1;
        tab->c[j] = c;
    }
}

typedef struct {
    float32x4_t lo, hi;
} f32x8;

/* Per-lane scales: broadcast (one group per chunk) or lane L -> group idx[L] via a byte table lookup. */
NEON_INLINE f32x8 svec(int single, const float *p, uint8x16_t blo, uint8x16_t bhi) {
    if (single) {
        const float32x4_t v = vld1q_dup_f32(p);
        return (f32x8){v, v};
    }
    const uint8x16x2_t tb = {{vreinterpretq_u8_f32(vld1q_f32(p)), vreinterpretq_u8_f32(vld1q_f32(p + 4))}};
    return (f32x8){vreinterpretq_f32_u8(vqtbl2q_u8(tb, blo)), vreinterpretq_f32_u8(vqtbl2q_u8(tb, bhi))};
}

/* 32 code bytes -> P vectors (x 2 halves) of byte codes, vector s byte i = code of input P*i + s; b1 = 8: q - 128. */
NEON_INLINE void expand_codes(int P, const uint8_t *codes, int8x16_t sub[4][2]) {
    for (int h = 0; h < 2; h++) {
        const uint8x16_t v = vld1q_u8(codes + 16 * h);
        if (P == 4) {
            const uint8x16_t m = vdupq_n_u8(3);
            sub[0][h] = vreinterpretq_s8_u8(vandq_u8(v, m));
            sub[1][h] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), m));
            sub[2][h] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), m));
            sub[3][h] = vreinterpretq_s8_u8(vshrq_n_u8(v, 6));
        } else if (P == 2) {
            sub[0][h] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15)));
            sub[1][h] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        } else {
            sub[0][h] = vreinterpretq_s8_u8(veorq_u8(v, vdupq_n_u8(0x80)));
        }
    }
}

/* 4P sign bytes -> P vectors of masks (0xFF where B = +1) in the same order (see kernels_mwq_avx2.c). */
NEON_INLINE void expand_signs(int P, const uint8_t *sp, int8x16_t sub[4][2]) {
    uint8x16_t r[2], bits;
    if (P == 4) {
        const uint8x16_t v = vld1q_u8(sp);
        r[0] = vzip1q_u8(v, v);
        r[1] = vzip2q_u8(v, v);
        bits = vreinterpretq_u8_u16(vdupq_n_u16(0x1001));
    } else if (P == 2) {
        const uint8x8_t v8 = vld1_u8(sp);
        const uint8x16_t v = vcombine_u8(v8, v8);
        static const uint8_t ilo[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
        static const uint8_t ihi[16] = {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7};
        r[0] = vqtbl1q_u8(v, vld1q_u8(ilo));
        r[1] = vqtbl1q_u8(v, vld1q_u8(ihi));
        bits = vreinterpretq_u8_u32(vdupq_n_u32(0x40100401u));
    } else {
        uint32_t u;
        memcpy(&u, sp, 4);
        const uint8x16_t v = vreinterpretq_u8_u32(vdupq_n_u32(u));
        static const uint8_t ilo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
        static const uint8_t ihi[16] = {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
        r[0] = vqtbl1q_u8(v, vld1q_u8(ilo));
        r[1] = vqtbl1q_u8(v, vld1q_u8(ihi));
        bits = vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201ull));
    }
    for (int s = 0; s < P; s++) {
        const uint8x16_t m = vshlq_u8(bits, vdupq_n_s8((int8_t)s));
        sub[s][0] = vreinterpretq_s8_u8(vtstq_u8(r[0], m));
        sub[s][1] = vreinterpretq_s8_u8(vtstq_u8(r[1], m));
    }
}

/* sum over the P vectors of the 4-byte dot products of half h (bytes 16h .. 16h+15 of each 32-byte vector) */
NEON_INLINE int16x8_t pair16(int8x16_t a, int8x16_t b) {
    return vpaddq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)), vmull_high_s8(a, b));
}
NEON_INLINE int32x4_t dot_nodot(int P, int8x16_t sub[4][2], const int8_t *xt, int h) {
    int16x8_t s = pair16(sub[0][h], vld1q_s8(xt + 16 * h));
    for (int j = 1; j < P; j++) s = vaddq_s16(s, pair16(sub[j][h], vld1q_s8(xt + 32 * j + 16 * h)));
    return vpaddlq_s16(s);
}
static inline __attribute__((always_inline)) DOTPROD_TARGET int32x4_t dot_sdot(int P, int8x16_t sub[4][2],
                                                                              const int8_t *xt, int h) {
    int32x4_t s = vdotq_s32(vdupq_n_s32(0), sub[0][h], vld1q_s8(xt + 16 * h));
    for (int j = 1; j < P; j++) s = vdotq_s32(s, sub[j][h], vld1q_s8(xt + 32 * j + 16 * h));
    return s;
}

/* Software prefetch of the plane streams, as in kernels_mwq_avx2.c: every 16/P chunks, PF_CHUNKS chunks ahead. */
#define PF_CHUNKS 16
NEON_INLINE void prefetch_planes(int P, int nr, const uint8_t *codes, const uint8_t *const *signs, size_t soff) {
    for (int j = 0; j < 512 / P; j += 64) __builtin_prefetch(codes + 32 * PF_CHUNKS + j);
    for (int p = 0; p < nr; p++) __builtin_prefetch(signs[p] + soff + 4 * P * PF_CHUNKS);
}

/* The row code, instantiated without (nodot) and with SDOT (sdot). */
#define DEFINE_MWQ_Q8(SFX, ATTR, DOT)                                                                                 \
    static inline __attribute__((always_inline)) ATTR void chunk_q8_##SFX(                                           \
        const int P, const int TT, const int single, int nr, const uint8_t *codes, const uint8_t *const *signs,       \
        size_t soff, const uint8_t *xc, size_t xs, const float *ts1, const float *tc, const float *tr,               \
        uint8x16_t blo, uint8x16_t bhi, f32x8 *acc) {                                                                 \
        int8x16_t sub[4][2];                                                                                          \
        f32x8 t[4];                                                                                                   \
        expand_codes(P, codes, sub);                                                                                  \
        const f32x8 S1 = svec(single, ts1, blo, bhi);                                                                 \
        _Pragma("GCC unroll 4") for (int u = 0; u < TT; u++) {                                                        \
            const int8_t *xt = (const int8_t *)(xc + (size_t)u * xs);                                                 \
            t[u].lo = vmulq_f32(vcvtq_f32_s32(DOT(P, sub, xt, 0)), S1.lo);                                            \
            t[u].hi = vmulq_f32(vcvtq_f32_s32(DOT(P, sub, xt, 1)), S1.hi);                                            \
        }                                                                                                             \
        for (int p = 0; p < nr; p++) {                                                                                \
            expand_signs(P, signs[p] + soff, sub);                                                                    \
            const f32x8 S = svec(single, tr + (size_t)p * TABW, blo, bhi);                                            \
            _Pragma("GCC unroll 4") for (int u = 0; u < TT; u++) {                                                    \
                const int8_t *xt = (const int8_t *)(xc + (size_t)u * xs);                                             \
                t[u].lo = vfmaq_f32(t[u].lo, vcvtq_f32_s32(DOT(P, sub, xt, 0)), S.lo);                                \
                t[u].hi = vfmaq_f32(t[u].hi, vcvtq_f32_s32(DOT(P, sub, xt, 1)), S.hi);                                \
            }                                                                                                         \
        }                                                                                                             \
        const f32x8 Cv = svec(single, tc, blo, bhi);                                                                  \
        _Pragma("GCC unroll 4") for (int u = 0; u < TT; u++) {                                                        \
            const float *xf = (const float *)(xc + (size_t)u * xs + 32 * P);                                          \
            t[u].lo = vfmaq_f32(t[u].lo, Cv.lo, vld1q_f32(xf + 8));                                                   \
            t[u].hi = vfmaq_f32(t[u].hi, Cv.hi, vld1q_f32(xf + 12));                                                  \
            acc[u].lo = vfmaq_f32(acc[u].lo, t[u].lo, vld1q_f32(xf));                                                 \
            acc[u].hi = vfmaq_f32(acc[u].hi, t[u].hi, vld1q_f32(xf + 4));                                             \
        }                                                                                                             \
    }                                                                                                                 \
    static inline __attribute__((always_inline)) ATTR void row_q8_##SFX(const int P, const int single, const int TT, \
                                                                         const mwq_matrix *w, const mwq_act *a,      \
                                                                         int64_t o, int t0, float *y, size_t ldy) {  \
        const int64_t cols = w->cols, g = w->group, C = 32 * P;                                                      \
        const int64_t cols_full = cols / C * C;                                                                       \
        const int nr = w->k - 1;                                                                                      \
        const int64_t seg_w = single ? g * (g < 1024 ? 1024 / g : 1) : 1024;                                          \
        const int64_t cpg = single ? g / C : 1, gpc = single ? 0 : C / g;                                             \
        uint8_t bl[16], bh[16]; /* lane L -> bytes of float idx[L] = 4PL / g */                                       \
        for (int L = 0; L < 8; L++)                                                                                   \
            for (int b = 0; b < 4; b++) {                                                                             \
                const int v = single ? b : (int)(4 * (4 * P * L / g) + b);                                            \
                if (L < 4) bl[4 * L + b] = (uint8_t)v;                                                                \
                else bh[4 * (L - 4) + b] = (uint8_t)v;                                                                \
            }                                                                                                         \
        const uint8x16_t blo = vld1q_u8(bl), bhi = vld1q_u8(bh);                                                      \
        const size_t cb = (size_t)MWQ_XP_CHUNK_BYTES(8 / P);                                                          \
        const int64_t rw = o * cols;                                                                                  \
        const uint8_t *xc0 = a->xp + (size_t)t0 * a->xp_stride;                                                       \
        seg_tab tab;                                                                                                  \
        f32x8 acc[4];                                                                                                 \
        _Pragma("GCC unroll 4") for (int u = 0; u < TT; u++) acc[u].lo = acc[u].hi = vdupq_n_f32(0.0f);               \
        for (int64_t s0 = 0; s0 < cols_full; s0 += seg_w) {                                                           \
            const int64_t s1e = s0 + seg_w < cols_full ? s0 + seg_w : cols_full;                                     \
            load_scales(w, o, s0 / g, (int)((s1e - s0) / g), &tab);                                                   \
            int64_t gl = 0, cig = 0;                                                                                  \
            for (int64_t c0 = s0; c0 < s1e; c0 += C) {                                                                \
                const uint8_t *cp = w->codes + (size_t)((rw + c0) / P);                                               \
                const size_t soff = (size_t)((rw + c0) / 8);                                                          \
                if ((c0 / C) % (16 / P) == 0) prefetch_planes(P, nr, cp, w->signs, soff);                             \
                chunk_q8_##SFX(P, TT, single, nr, cp, w->signs, soff, xc0 + (size_t)(c0 / C) * cb, a->xp_stride,      \
                               tab.s1 + gl, tab.c + gl, tab.r[0] + gl, blo, bhi, acc);                                \
                if (!single) gl += gpc;                                                                               \
                else if (++cig == cpg) cig = 0, gl++;                                                                 \
            }                                                                                                         \
        }                                                                                                             \
        _Pragma("GCC unroll 4") for (int u = 0; u < TT; u++) {                                                        \
            float s = vaddvq_f32(vaddq_f32(acc[u].lo, acc[u].hi));                                                    \
            if (cols_full < cols)                                                                                     \
                s += mwq_dot_q8_scalar(w, o, a->xq + (size_t)(t0 + u) * a->xq_stride, cols_full, cols);               \
            y[(size_t)(t0 + u) * ldy + (size_t)o] = s;                                                                \
        }                                                                                                             \
    }

DEFINE_MWQ_Q8(nodot, , dot_nodot)
DEFINE_MWQ_Q8(sdot, DOTPROD_TARGET, dot_sdot)

MWQ_DEF_Q8(nodot, , row_q8_nodot)
MWQ_DEF_Q8(sdot, DOTPROD_TARGET, row_q8_sdot)

/* ---- f32 activations ---- */

/* Weights i .. i+7 of a row (flat index fi, one group), bit-identical to edgemoe/mwq.py: s1*q + m1, then +-s_p. */
NEON_INLINE void deq8(const int B1, int nr, const mwq_matrix *w, size_t fi, float32x4_t S1, float32x4_t M1,
                      const float32x4_t *SP, const float32x4_t *NSP, float32x4_t *wlo, float32x4_t *whi) {
    uint32x4_t qlo, qhi;
    if (B1 == 2) {
        uint16_t u;
        memcpy(&u, w->codes + fi / 4, 2);
        const uint32x4_t v = vdupq_n_u32(u);
        static const int32_t sl[4] = {0, -2, -4, -6}, sh[4] = {-8, -10, -12, -14};
        qlo = vandq_u32(vshlq_u32(v, vld1q_s32(sl)), vdupq_n_u32(3));
        qhi = vandq_u32(vshlq_u32(v, vld1q_s32(sh)), vdupq_n_u32(3));
    } else if (B1 == 4) {
        uint32_t u;
        memcpy(&u, w->codes + fi / 2, 4);
        const uint32x4_t v = vdupq_n_u32(u);
        static const int32_t sl[4] = {0, -4, -8, -12}, sh[4] = {-16, -20, -24, -28};
        qlo = vandq_u32(vshlq_u32(v, vld1q_s32(sl)), vdupq_n_u32(15));
        qhi = vandq_u32(vshlq_u32(v, vld1q_s32(sh)), vdupq_n_u32(15));
    } else {
        const uint16x8_t h = vmovl_u8(vld1_u8(w->codes + fi));
        qlo = vmovl_u16(vget_low_u16(h));
        qhi = vmovl_high_u16(h);
    }
    float32x4_t lo = vaddq_f32(vmulq_f32(S1, vcvtq_f32_u32(qlo)), M1);
    float32x4_t hi = vaddq_f32(vmulq_f32(S1, vcvtq_f32_u32(qhi)), M1);
    static const uint32_t bl[4] = {1, 2, 4, 8}, bh[4] = {16, 32, 64, 128};
    const uint32x4_t bitl = vld1q_u32(bl), bith = vld1q_u32(bh);
    for (int p = 0; p < nr; p++) {
        const uint32x4_t b = vdupq_n_u32(w->signs[p][fi / 8]);
        lo = vaddq_f32(lo, vbslq_f32(vtstq_u32(b, bitl), SP[p], NSP[p]));
        hi = vaddq_f32(hi, vbslq_f32(vtstq_u32(b, bith), SP[p], NSP[p]));
    }
    *wlo = lo;
    *whi = hi;
}

NEON_INLINE void row_f32(const int B1, const int TT, const mwq_matrix *w, const mwq_act *a, int64_t o, int t0,
                         float *y, size_t ldy) {
    const int64_t cols = w->cols, g = w->group, ng = cols / g;
    const int nr = w->k - 1;
    float32x4_t acc[4][2];
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) acc[u][0] = acc[u][1] = vdupq_n_f32(0.0f);
    for (int64_t j = 0; j < ng; j++) {
        const size_t gi = (size_t)(o * ng + j);
        const float32x4_t S1 = vdupq_n_f32(h2f(w->s1[gi])), M1 = vdupq_n_f32(h2f(w->m1[gi]));
        float32x4_t SP[MWQ_MAX_PLANES - 1], NSP[MWQ_MAX_PLANES - 1];
        for (int p = 0; p < nr; p++) {
            SP[p] = vdupq_n_f32(h2f(w->rs[p][gi]));
            NSP[p] = vnegq_f32(SP[p]);
        }
        for (int64_t i = j * g; i < (j + 1) * g; i += 8) {
            float32x4_t wl, wh;
            deq8(B1, nr, w, (size_t)(o * cols + i), S1, M1, SP, NSP, &wl, &wh);
#pragma GCC unroll 4
            for (int u = 0; u < TT; u++) {
                const float *xr = a->x + (size_t)(t0 + u) * a->x_stride + (size_t)i;
                acc[u][0] = vfmaq_f32(acc[u][0], wl, vld1q_f32(xr));
                acc[u][1] = vfmaq_f32(acc[u][1], wh, vld1q_f32(xr + 4));
            }
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) y[(size_t)(t0 + u) * ldy + (size_t)o] = vaddvq_f32(vaddq_f32(acc[u][0], acc[u][1]));
}

MWQ_DEF_F32(, row_f32)

const mwq_kernels mwq_kernels_neon = {
    .isa = EMOE_ISA_NEON,
    .name = "neon",
    .uses_xp = 1,
    .matmul_q8 = matmul_q8_nodot,
    .matmul_f32 = matmul_f32,
};
const mwq_kernels mwq_kernels_neon_dotprod = {
    .isa = EMOE_ISA_NEON_DOTPROD,
    .name = "neon_dotprod",
    .uses_xp = 1,
    .matmul_q8 = matmul_q8_sdot,
    .matmul_f32 = matmul_f32,
};

#else
typedef int emoe_kernels_mwq_neon_unused; /* ISO C forbids an empty translation unit */
#endif
