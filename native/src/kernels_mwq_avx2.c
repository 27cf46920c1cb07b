/* x86-64 MWQ plane kernels: AVX2 + FMA + F16C (per-function target attributes, selected at run time like
 * kernels_avx2.c).
 *
 * Int8 activations. A row is walked in chunks of 256/b1 inputs = the 32 code bytes of one ymm load (P = 8/b1 codes
 * per byte). Shifting and masking that load gives P vectors of byte codes, vector s holding the codes of inputs
 * P*i + s (i = 0..31); the activations were laid out once per call in the same order (mwq_act.xp), so maddubs
 * (codes unsigned, x signed) multiplies matching pairs. Each residual plane's 4P sign bytes are replicated with one
 * pshufb so that byte i of vector s holds the bit of input P*i + s, which and + min turn into 0/1 bytes:
 * maddubs(bits, x) sums the activations whose sign is +1. Every product sum lands in 8 int32 lanes, lane L covering
 * the 4P inputs 4PL .. 4PL+4P-1 of the chunk (one activation block of 32 and one group), exact (see below), and per
 * chunk
 *     t   = s1*iq + sum_p 2 s_p * ik_p + c * sx        (per lane, f32; c = m1 - sum_p s_p [+ 128 s1 for b1 = 8])
 *     acc = acc + d * t                                (d = the lane's activation scale)
 * which is d * (s1*sum q x + m1*sum x + sum_p s_p*sum B_p x), i.e. W_hat_k times the quantized activations. The group
 * scales are f16 -> f32 converted (and c, 2 s_p precomputed) once per row segment of up to 128 groups; when a chunk
 * holds several groups (32P % g == 0) their scales are spread over the lanes with one permute.
 * Exactness: b1 = 2: |code| <= 3, a maddubs pair <= 762, four summed in int16 <= 3048; b1 = 4: 2 * 3810; b1 = 8:
 * codes are recentred to q - 128 (|.| <= 128, abs/sign trick as Q8_0: pair <= 32512) and the 128 * sum x is folded
 * into c; sign planes: 0/1 times x, <= 4 * 254. All int32 lane sums are < 2^24, so the f32 conversions are exact.
 * Tiles: one row x up to 4 tokens (the unpacked codes and sign bits are reused across the tokens); every
 * (row, token) result goes through the same operations in the same order whatever the tile, so decode == prefill
 * bit for bit.
 *
 * F32 activations: 8 weights at a time are rebuilt in registers, w = s1*q + m1 then w += +-s_p (the same f32
 * operations as edgemoe/mwq.py, so bit-identical weights), and fma'd with x; one row x up to 4 tokens.
 */
#include "internal.h"
#include "kernel_walks.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define TABW (MWQ_SEG_GROUPS + 8) /* + 8: a permuted scale load reads 8 floats */

AVX2_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* f32 scales of one row segment: s1, c = m1 (+ 128 s1 if b1 = 8) - sum_p s_p, r[p] = 2 s_p. */
typedef struct {
    float s1[TABW], c[TABW], r[MWQ_MAX_PLANES - 1][TABW];
} seg_tab;

AVX2_INLINE void load_scales(const mwq_matrix *w, int64_t o, int64_t g0, int n, seg_tab *tab) {
    const size_t base = (size_t)(o * (w->cols / w->group) + g0);
    const int nr = w->k - 1, b8 = w->base_bits == 8;
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->s1 + base + j)));
        __m256 c = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->m1 + base + j)));
        if (b8) c = _mm256_add_ps(c, _mm256_mul_ps(s1, _mm256_set1_ps(128.0f)));
        for (int p = 0; p < nr; p++) {
            const __m256 sp = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->rs[p] + base + j)));
            c = _mm256_sub_ps(c, sp);
            _mm256_storeu_ps(tab->r[p] + j, _mm256_add_ps(sp, sp));
        }
        _mm256_storeu_ps(tab->s1 + j, s1);
        _mm256_storeu_ps(tab->c + j, c);
    }
    for (; j < n; j++) {
        const float s1 = _cvtsh_ss(w->s1[base + j]);
        float c = _cvtsh_ss(w->m1[base + j]);
        if (b8) c = c + s1 * 128.0f;
        for (int p = 0; p < nr; p++) {
            const float sp = _cvtsh_ss(w->rs[p][base + j]);
            c = c - sp;
            tab->r[p][j] = sp + sp;
        }
        tab->s1[j] = s1;
        tab->c[j] = c;
    }
}

/* Constants, read from memory as instruction operands. The table's address goes through an empty asm so the compiler
 * cannot see the values: otherwise GCC rebuilds each one inside the loop (mov + vmovd + vpbroadcast, 2 ALU ops). */
#define M4(s) 1 << (s), 16 << (s)
#define M4ROW(s) M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s), M4(s)
#define M2(s) 1 << (s), 4 << (s), 16 << (s), 64 << (s)
#define M2ROW(s) M2(s), M2(s), M2(s), M2(s), M2(s), M2(s), M2(s), M2(s)
#define M1ROW 1, 2, 4, 8, 16, 32, 64, 128
#define B32(v) v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v
typedef struct {
    uint8_t ones8[32], ones16[32], m3[32], m15[32], x80[32];
    uint8_t bits4[4][32], bits2[2][32], bits1[32]; /* sign bit masks: byte i of vector s: bit P*(i % b1) + s */
    uint8_t rep4[32], rep2[32], rep1[32];          /* pshufb: byte i <- sign byte i / b1 */
} kconst;
static const kconst KC __attribute__((aligned(32))) = {
    .ones8 = {B32(1)},
    .ones16 = {1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0},
    .m3 = {B32(3)},
    .m15 = {B32(15)},
    .x80 = {B32(0x80)},
    .bits4 = {{M4ROW(0)}, {M4ROW(1)}, {M4ROW(2)}, {M4ROW(3)}},
    .bits2 = {{M2ROW(0)}, {M2ROW(1)}},
    .bits1 = {M1ROW, M1ROW, M1ROW, M1ROW},
    .rep4 = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15},
    .rep2 = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    .rep1 = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
};
static inline const kconst *kconst_opaque(void) {
    const kconst *k = &KC;
    __asm__("" : "+r"(k));
    return k;
}
#define LD(p) _mm256_load_si256((const __m256i *)(const void *)(p))

/* 32 code bytes -> P vectors of byte codes (vector s, byte i = code of input P*i + s). b1 = 8: sub[0] = q - 128 as
 * int8, sub[1] = |q - 128| (the maddubs operands of the abs/sign trick). */
AVX2_INLINE void expand_codes(int P, const kconst *kc, const uint8_t *codes, __m256i sub[4]) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)codes);
    if (P == 4) {
        const __m256i m = LD(kc->m3);
        sub[0] = _mm256_and_si256(v, m);
        sub[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m);
        sub[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
        sub[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m);
    } else if (P == 2) {
        const __m256i m = LD(kc->m15);
        sub[0] = _mm256_and_si256(v, m);
        sub[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    } else {
        sub[0] = _mm256_xor_si256(v, LD(kc->x80));
        sub[1] = _mm256_abs_epi8(sub[0]);
    }
}

/* 4P sign bytes -> P vectors of 0/1 bytes in the same order: byte i of vector s = bit P*(i % b1) + s of sign byte
 * i / b1 (b1 = 8/P). One pshufb replicates the bytes, and + min per vector extracts the bits. */
AVX2_INLINE void expand_signs(int P, const kconst *kc, const uint8_t *sp, __m256i sub[4]) {
    __m256i r;
    if (P == 4) {
        r = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)sp)), LD(kc->rep4));
    } else if (P == 2) {
        uint64_t u;
        memcpy(&u, sp, 8);
        r = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)u), LD(kc->rep2));
    } else {
        uint32_t u;
        memcpy(&u, sp, 4);
        r = _mm256_shuffle_epi8(_mm256_set1_epi32((int)u), LD(kc->rep1));
    }
    for (int s = 0; s < P; s++) {
        const __m256i m = P == 4 ? LD(kc->bits4[s]) : P == 2 ? LD(kc->bits2[s]) : LD(kc->bits1);
        sub[s] = _mm256_min_epu8(_mm256_and_si256(r, m), LD(kc->ones8));
    }
}

/* sum_s maddubs(sub[s] (unsigned), x_s (signed)) in int16, widened to 8 int32 lanes */
AVX2_INLINE __m256i dot_u(int P, const kconst *kc, const __m256i sub[4], const int8_t *xt) {
    __m256i s = _mm256_maddubs_epi16(sub[0], _mm256_load_si256((const __m256i *)xt));
    for (int j = 1; j < P; j++)
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(sub[j], _mm256_load_si256((const __m256i *)(xt + 32 * j))));
    return _mm256_madd_epi16(s, LD(kc->ones16));
}

/* The per-lane scale vector: one group for the whole chunk (broadcast), or lane L -> group idx[L]. */
AVX2_INLINE __m256 svec(int single, const float *p, __m256i idx) {
    return single ? _mm256_broadcast_ss(p) : _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx);
}

/* One chunk of one row for TT tokens (xc: the chunk of the first token in xp, xs: bytes between tokens). */
AVX2_INLINE void chunk_q8(const int P, const int TT, const int single, int nr, const uint8_t *codes,
                          const uint8_t *const *signs, size_t soff, const uint8_t *xc, size_t xs, const float *ts1,
                          const float *tc, const float *tr, __m256i idx, __m256 *acc) {
    const kconst *kc = kconst_opaque();
    __m256i sub[4];
    __m256 t[4];
    expand_codes(P, kc, codes, sub);
    const __m256 S1 = svec(single, ts1, idx);
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) {
        const int8_t *xt = (const int8_t *)(xc + (size_t)u * xs);
        __m256i iq;
        if (P == 1)
            iq = _mm256_madd_epi16(
                _mm256_maddubs_epi16(sub[1], _mm256_sign_epi8(_mm256_load_si256((const __m256i *)xt), sub[0])),
                LD(kc->ones16));
        else
            iq = dot_u(P, kc, sub, xt);
        t[u] = _mm256_mul_ps(_mm256_cvtepi32_ps(iq), S1);
    }
    for (int p = 0; p < nr; p++) {
        expand_signs(P, kc, signs[p] + soff, sub);
        const __m256 S = svec(single, tr + (size_t)p * TABW, idx);
#pragma GCC unroll 4
        for (int u = 0; u < TT; u++) {
            const int8_t *xt = (const int8_t *)(xc + (size_t)u * xs);
            t[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u(P, kc, sub, xt)), S, t[u]);
        }
    }
    const __m256 Cv = svec(single, tc, idx);
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) {
        const float *xf = (const float *)(xc + (size_t)u * xs + 32 * P);
        t[u] = _mm256_fmadd_ps(Cv, _mm256_load_ps(xf + 8), t[u]);
        acc[u] = _mm256_fmadd_ps(t[u], _mm256_load_ps(xf), acc[u]);
    }
}

/* The planes are streamed with a software prefetch, each plane being its own sequential stream: issued every 16/P
 * chunks (64 bytes of each sign plane, 512/P bytes of codes), PF_CHUNKS chunks ahead. (Measured: a plane-by-plane
 * loop order with a next-row prefetch streams ~25% slower than this chunk-by-chunk order.) */
#define PF_CHUNKS 16
AVX2_INLINE void prefetch_planes(int P, int nr, const uint8_t *codes, const uint8_t *const *signs, size_t soff) {
    for (int j = 0; j < 512 / P; j += 64) _mm_prefetch((const char *)codes + 32 * PF_CHUNKS + j, _MM_HINT_T0);
    for (int p = 0; p < nr; p++) _mm_prefetch((const char *)signs[p] + soff + 4 * P * PF_CHUNKS, _MM_HINT_T0);
}

/* Row o, tokens t0 .. t0+TT-1. single: g % 32P == 0 (a chunk lies in one group), else 32P % g == 0. */
AVX2_INLINE void row_q8(const int P, const int single, const int TT, const mwq_matrix *w, const mwq_act *a,
                        int64_t o, int t0, float *y, size_t ldy) {
    const int64_t cols = w->cols, g = w->group, C = 32 * P;
    const int64_t cols_full = cols / C * C;
    const int nr = w->k - 1;
    const int64_t seg_w = single ? g * (g < 1024 ? 1024 / g : 1) : 1024;
    const int64_t cpg = single ? g / C : 1, gpc = single ? 0 : C / g;
    const __m256i idx = single ? _mm256_setzero_si256()
                               : _mm256_setr_epi32(0, (int)(4 * P / g), (int)(8 * P / g), (int)(12 * P / g),
                                                   (int)(16 * P / g), (int)(20 * P / g), (int)(24 * P / g),
                                                   (int)(28 * P / g));
    const size_t cb = (size_t)MWQ_XP_CHUNK_BYTES(8 / P);
    const int64_t rw = o * cols;
    seg_tab tab;
    __m256 acc[4];
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) acc[u] = _mm256_setzero_ps();
    const uint8_t *cp = w->codes + (size_t)(rw / P), *xc = a->xp + (size_t)t0 * a->xp_stride;
    size_t soff = (size_t)(rw / 8);
    int64_t ci = 0; /* chunk index in the row */
    for (int64_t s0 = 0; s0 < cols_full; s0 += seg_w) {
        const int64_t s1e = s0 + seg_w < cols_full ? s0 + seg_w : cols_full;
        load_scales(w, o, s0 / g, (int)((s1e - s0) / g), &tab);
        int64_t gl = 0, cig = 0;
        for (int64_t c0 = s0; c0 < s1e; c0 += C, cp += 32, soff += (size_t)(4 * P), xc += cb, ci++) {
            if (ci % (16 / P) == 0) prefetch_planes(P, nr, cp, w->signs, soff);
            chunk_q8(P, TT, single, nr, cp, w->signs, soff, xc, a->xp_stride, tab.s1 + gl, tab.c + gl, tab.r[0] + gl,
                     idx, acc);
            if (!single) gl += gpc;
            else if (++cig == cpg) cig = 0, gl++;
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) {
        float s = hsum8(acc[u]);
        if (cols_full < cols) s += mwq_dot_q8_scalar(w, o, a->xq + (size_t)(t0 + u) * a->xq_stride, cols_full, cols);
        y[(size_t)(t0 + u) * ldy + (size_t)o] = s;
    }
}

MWQ_DEF_Q8(avx2, AVX2_FN, row_q8)

/* ---- f32 activations ---- */

/* Weights i .. i+7 of a row (flat weight index fi = o*cols + i, all in one group) as f32, bit-identical to
 * edgemoe/mwq.py's dequantize: w = s1*q + m1, then w += +-s_p in plane order. */
AVX2_INLINE __m256 deq8(const int B1, int nr, const mwq_matrix *w, size_t fi, __m256 S1, __m256 M1, const __m256 *SP) {
    __m256i q;
    if (B1 == 2) {
        uint16_t u;
        memcpy(&u, w->codes + fi / 4, 2);
        q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(u), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                             _mm256_set1_epi32(3));
    } else if (B1 == 4) {
        uint32_t u;
        memcpy(&u, w->codes + fi / 2, 4);
        q = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32((int)u), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
            _mm256_set1_epi32(15));
    } else {
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w->codes + fi)));
    }
    __m256 wv = _mm256_add_ps(_mm256_mul_ps(S1, _mm256_cvtepi32_ps(q)), M1);
    const __m256i bitv = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    for (int p = 0; p < nr; p++) {
        const __m256i b = _mm256_and_si256(_mm256_set1_epi32(w->signs[p][fi / 8]), bitv);
        const __m256 neg = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, _mm256_setzero_si256()));
        wv = _mm256_add_ps(wv, _mm256_xor_ps(SP[p], _mm256_and_ps(neg, signbit)));
    }
    return wv;
}

AVX2_INLINE void row_f32(const int B1, const int TT, const mwq_matrix *w, const mwq_act *a, int64_t o, int t0,
                         float *y, size_t ldy) {
    const int64_t cols = w->cols, g = w->group, ng = cols / g;
    const int nr = w->k - 1;
    __m256 acc[4];
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) acc[u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < ng; j++) {
        const size_t gi = (size_t)(o * ng + j);
        const __m256 S1 = _mm256_set1_ps(_cvtsh_ss(w->s1[gi])), M1 = _mm256_set1_ps(_cvtsh_ss(w->m1[gi]));
        __m256 SP[MWQ_MAX_PLANES - 1];
        for (int p = 0; p < nr; p++) SP[p] = _mm256_set1_ps(_cvtsh_ss(w->rs[p][gi]));
        for (int64_t i = j * g; i < (j + 1) * g; i += 8) {
            const __m256 wv = deq8(B1, nr, w, (size_t)(o * cols + i), S1, M1, SP);
#pragma GCC unroll 4
            for (int u = 0; u < TT; u++)
                acc[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a->x + (size_t)(t0 + u) * a->x_stride + (size_t)i),
                                         acc[u]);
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) y[(size_t)(t0 + u) * ldy + (size_t)o] = hsum8(acc[u]);
}

MWQ_DEF_F32(AVX2_FN, row_f32)

const mwq_kernels mwq_kernels_avx2 = {
    .isa = EMOE_ISA_AVX2,
    .name = "avx2",
    .uses_xp = 1,
    .matmul_q8 = matmul_q8_avx2,
    .matmul_f32 = matmul_f32,
};

#else
typedef int emoe_kernels_mwq_avx2_unused; /* ISO C forbids an empty translation unit */
#endif
