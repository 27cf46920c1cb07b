/* x86-64 kernels: AVX2 + FMA + F16C.
 *
 * Every function here carries __attribute__((target("avx2,fma,f16c"))), so the file needs no special compiler flags
 * and the rest of the library stays baseline x86-64; dispatch.c selects this table only when cpuid says the CPU (and
 * the OS, via XGETBV) supports all three.
 *
 * Matmul tiling: a tile is R weight rows x TT tokens with one 8-lane f32 accumulator per (row, token). Each weight
 * vector is loaded (and for f16/Q8_0 converted) once and reused across the TT tokens, and each activation vector is
 * reused across the R rows. Decode (one token) uses R=4 (f32/f16) or R=8 (Q8_0) rows so that many independent FMA
 * chains hide latency; prefill uses 2x4 tiles. Rows are walked in the outer loop so one weight row streams from
 * memory once per block of tokens. Every tile accumulates each (row, token) dot product in the same order (one
 * accumulator, blocks in order, then the same horizontal sum), so decode and prefill give bit-identical results.
 */
#include "internal.h"
#include "kernel_tables.h"
#include "kernel_walks.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

/* Decode walks R rows at once; when rows are short (<= 4 KiB) those are R short interleaved streams that the hardware
 * prefetcher catches too late (measured: 4 GB/s on 512x1024 Q8_0 matrices, 10-13 GB/s with this), so the decode tiles
 * prefetch the next tile (the R rows that follow, contiguous in memory) linearly while computing this one. Into L2
 * (T1), not L1: from DRAM that streamed 6-40 % more (BENCHMARKS.md, issue 16 dispatch section), the L1 fill buffers
 * being the limit when every line is prefetched into L1. */
#define PREFETCH_MAX_STRIDE 4096
#define DECODE_PF_HINT _MM_HINT_T1

#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

AVX2_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_INLINE __m256 load8(int f16, const char *p) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)) : _mm256_loadu_ps((const float *)p);
}

AVX2_INLINE float wval(int f16, const char *row, int64_t i) {
    return f16 ? _cvtsh_ss(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* One R x TT tile of the f32/f16 matmul at output row o. */
AVX2_INLINE void tile_float(int f16, int R, int TT, int64_t cols, const char *w, size_t w_stride, const char *x,
                            size_t x_stride, float *y, size_t ldy, int64_t o) {
    const size_t esz = f16 ? 2 : 4;
    __m256 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8) {
        if (TT == 1 && w_stride <= PREFETCH_MAX_STRIDE && i % 16 == 0) { /* see PREFETCH_MAX_STRIDE */
            const uintptr_t next = (uintptr_t)w + (size_t)R * w_stride + (size_t)i * esz * R;
            for (int k = 0; k < R * 16 * (int)esz; k += 64)
                _mm_prefetch((const char *)(next + (uintptr_t)k), DECODE_PF_HINT);
        }
        __m256 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) wv[r] = load8(f16, w + (size_t)r * w_stride + (size_t)i * esz);
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const __m256 xv = _mm256_loadu_ps((const float *)(x + (size_t)t * x_stride) + i);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            float s = hsum8(acc[r][t]);
            const float *xr = (const float *)(x + (size_t)t * x_stride);
            for (int64_t j = i; j < cols; j++) s += wval(f16, w + (size_t)r * w_stride, j) * xr[j];
            y[(size_t)t * ldy + (size_t)o + (size_t)r] = s;
        }
}


#define TILE_F32(R, TT, wr, xr, yr) tile_float(0, R, TT, cols, wr, w_stride, xr, x_stride, yr, ldy, o)
#define TILE_F16(R, TT, wr, xr, yr) tile_float(1, R, TT, cols, wr, w_stride, xr, x_stride, yr, ldy, o)
#define TILE_Q8(R, TT, wr, xr, yr) tile_q8(R, TT, nb, wr, w_stride, xr, x_stride, yr, ldy, o)

AVX2_FN static void matmul_f32(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                               size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    EMOE_WALK_TILES(4, TILE_F32);
}
AVX2_FN static void matmul_f16(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                               size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    EMOE_WALK_TILES(4, TILE_F16);
}

/* Q8_0 weights x Q8 activations. Per block: |w| (unsigned) times sign(w)*x (signed) with maddubs gives exact int16
 * pair sums (|w| <= 128, |x| <= 127, so |pair| <= 32512), madd with ones widens to 8 int32 partial sums, which are
 * converted to f32 (exact: each |partial| <= 4*128*127 < 2^24) and accumulated with fma by the block scale dw*dx.
 * The integer part is exact; only the f32 accumulation order differs from the scalar reference. */
AVX2_INLINE void tile_q8(int R, int TT, int64_t nb, const char *w, size_t w_stride, const char *x, size_t x_stride,
                         float *y, size_t ldy, int64_t o) {
    __m256 acc[8][4];
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if (TT == 1) { /* decode: one pass per row keeps the register count low (no wq/aw arrays) */
            if (w_stride <= PREFETCH_MAX_STRIDE) {
                const uintptr_t next = (uintptr_t)w + (size_t)R * w_stride + (size_t)b * R * sizeof(block_q8_0);
                for (int k = 0; k < R * (int)sizeof(block_q8_0); k += 64)
                    _mm_prefetch((const char *)(next + (uintptr_t)k), DECODE_PF_HINT);
            }
            const block_q8_act *xb = (const block_q8_act *)x + b;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)xb->qs);
            const float dx = xb->d;
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const block_q8_0 *blk = (const block_q8_0 *)(w + (size_t)r * w_stride) + b;
                const __m256i wq = _mm256_loadu_si256((const __m256i *)blk->qs);
                const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(wq), _mm256_sign_epi8(xq, wq));
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                acc[r][0] = _mm256_fmadd_ps(p, _mm256_set1_ps(_cvtsh_ss(blk->d) * dx), acc[r][0]);
            }
            continue;
        }
        __m256i wq[8], aw[8];
        float dw[8];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const block_q8_0 *blk = (const block_q8_0 *)(w + (size_t)r * w_stride) + b;
            wq[r] = _mm256_loadu_si256((const __m256i *)blk->qs);
            aw[r] = _mm256_abs_epi8(wq[r]);
            dw[r] = _cvtsh_ss(blk->d);
        }
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const block_q8_act *xb = (const block_q8_act *)(x + (size_t)t * x_stride) + b;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)xb->qs);
            const float dx = xb->d;
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const __m256i p16 = _mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xq, wq[r]));
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                acc[r][t] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw[r] * dx), acc[r][t]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) y[(size_t)t * ldy + (size_t)o + (size_t)r] = hsum8(acc[r][t]);
}

AVX2_FN static void matmul_q8_0(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride,
                                float *y, size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK;
    /* decode: 8 rows, so 8 independent FMA chains hide the latency (4 rows were latency-bound at ~4.5 cycles per
     * block); one accumulator per (row, token) in block order everywhere, so decode == prefill bit for bit */
    EMOE_WALK_TILES(8, TILE_Q8);
}

/* Q8_0 weights x f32 activations (the exact path): per block the 32 codes are widened to f32 (4 x 8 lanes) and
 * multiplied with x, t = w0*x0 + w1*x1 + w2*x2 + w3*x3 (mul then 3 fma), then acc += d * t. Tiles: decode 4 rows,
 * prefill 1 row x 4 tokens (the 4 converted weight vectors are reused across the tokens); same order in both. */
AVX2_INLINE void q8_widen(const block_q8_0 *blk, __m256 wv[4]) {
    const __m128i lo = _mm_loadu_si128((const __m128i *)blk->qs), hi = _mm_loadu_si128((const __m128i *)(blk->qs + 16));
    wv[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    wv[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    wv[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    wv[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}
AVX2_INLINE __m256 q8_block_dot(const __m256 wv[4], const float *x) {
    __m256 t = _mm256_mul_ps(wv[0], _mm256_loadu_ps(x));
    t = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(x + 8), t);
    t = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(x + 16), t);
    return _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(x + 24), t);
}
AVX2_INLINE void tile_q8f(int R, int TT, int64_t nb, const char *w, size_t w_stride, const char *x, size_t x_stride,
                          float *y, size_t ldy, int64_t o) {
    __m256 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const block_q8_0 *blk = (const block_q8_0 *)(w + (size_t)r * w_stride) + b;
            __m256 wv[4];
            q8_widen(blk, wv);
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(blk->d));
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                const float *xb = (const float *)(x + (size_t)t * x_stride) + b * QK;
                acc[r][t] = _mm256_fmadd_ps(d, q8_block_dot(wv, xb), acc[r][t]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) y[(size_t)t * ldy + (size_t)o + (size_t)r] = hsum8(acc[r][t]);
}

#define TILE_Q8F(R, TT, wr, xr, yr) tile_q8f(R, TT, nb, wr, w_stride, xr, x_stride, yr, ldy, o)

AVX2_FN static void matmul_q8_0_f32(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride,
                                    float *y, size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK;
    EMOE_WALK_ROW_TILES(TILE_Q8F);
}

/* Same bits as the scalar quantize_act: max|x| is order independent, d and 1/d are the same f32 operations, and
 * _mm256_round_ps(NEAREST_INT) is round-half-even like nearbyintf in the default rounding mode. */
#define RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
AVX2_FN static void quantize_act(const float *x, block_q8_act *y, int64_t n) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), RNE));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), RNE));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), RNE));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), RNE));
        i0 = _mm256_packs_epi32(i0, i1);
        i2 = _mm256_packs_epi32(i2, i3);
        i0 = _mm256_packs_epi16(i0, i2);
        _mm256_storeu_si256((__m256i *)y[b].qs, _mm256_permutevar8x32_epi32(i0, perm));
    }
}

AVX2_FN static void f16_to_f32_row(const uint16_t *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) y[i] = _cvtsh_ss(x[i]);
}
AVX2_FN static void f32_to_f16_row(const float *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}
AVX2_FN static void axpy_f32(float a, const float *x, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}
AVX2_FN static void axpy_f16(float a, const uint16_t *x, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))),
                                                _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * _cvtsh_ss(x[i]);
}

const emoe_kernels emoe_kernels_avx2 = EMOE_KERNEL_TABLE(EMOE_ISA_AVX2, "avx2", matmul_q8_0);

#else
typedef int emoe_kernels_avx2_unused; /* ISO C forbids an empty translation unit */
#endif
