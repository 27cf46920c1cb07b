/* x86-64 kernels: AVX-512 F/BW/VL + VNNI (on top of AVX2 + FMA + F16C).
 *
 * Only the Q8_0 x int8-activation matmul is new here; the f32/f16 matmuls, the exact f32-activation Q8_0 path and
 * the conversion / axpy helpers are the AVX2 ones (memory-bound already, or not on the decode path). Every function
 * carries a target attribute, so the library stays baseline x86-64; dispatch.c selects this table only when cpuid and
 * XGETBV say the CPU and OS support it.
 *
 * Q8_0 tiles put one weight ROW per f32 lane: R = 8 rows per tile. Per block b and row r, vpdpbusd on 256-bit
 * vectors computes |w| (unsigned) times sign(w)*x (signed) as 8 exact int32 partial sums (the sign trick, as in the
 * AVX2 path: |w| <= 128, |x| <= 127), then a transpose-add tree (vphaddd) turns the 8 rows' 8 partial vectors into
 * one vector of 8 row sums (exact integers < 2^24). The 8 rows' f16 scales come in with one gather, and
 *     acc[r] = acc[r] + (float)isum[r] * (dw[r] * dx)
 * is one mul + one add for 8 rows, the same f32 operations in the same order as the scalar reference: this path gives
 * exactly the scalar result, and decode (1 token) equals prefill (any token count) bit for bit. Compared with the
 * AVX2 tile (per row and block: maddubs, madd, cvt, fma and a broadcast scale), per row and block only the load,
 * abs, sign and vpdpbusd remain; the rest is shared by 8 rows.
 * (256-bit vectors: on AMD Zen 4, 512-bit ops run as two 256-bit halves, and Q8_0 blocks are 32 bytes.)
 */
#include "internal.h"
#include "kernel_tables.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define V512_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
#define V512_FN __attribute__((target(V512_TARGET)))
#define V512_INLINE static inline __attribute__((always_inline, target(V512_TARGET)))
#define PREFETCH_MAX_STRIDE 4096 /* as in kernels_avx2.c: short rows are prefetched a tile ahead */
#define DECODE_PF_HINT _MM_HINT_T1       /* as in kernels_avx2.c: into L2 */

/* 8 vectors of 8 int32 -> one vector whose lane r is the sum of v[r]'s lanes (exact integer adds). */
V512_INLINE __m256i hsum8x8(const __m256i v[8]) {
    const __m256i h01 = _mm256_hadd_epi32(v[0], v[1]), h23 = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i h45 = _mm256_hadd_epi32(v[4], v[5]), h67 = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
    /* a = [r0..r3 of lanes 0-3 | r0..r3 of lanes 4-7], b the same for rows 4..7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* One tile: R (<= 8) rows from w (w_stride bytes apart) x TT tokens, nb blocks. Lanes >= R are computed on zeros and
 * not stored. */
V512_INLINE void tile_q8(int R, int TT, int64_t nb, const char *w, size_t w_stride, const char *x, size_t x_stride,
                         float *y, size_t ldy) {
    __m256 acc[4];
#pragma GCC unroll 4
    for (int t = 0; t < TT; t++) acc[t] = _mm256_setzero_ps();
    const __m256i vidx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)w_stride));
    const __mmask8 rmask = (__mmask8)((1u << R) - 1u);
    for (int64_t b = 0; b < nb; b++) {
        const char *wb = w + (size_t)b * sizeof(block_q8_0);
        if (TT == 1 && w_stride <= PREFETCH_MAX_STRIDE) {
            const uintptr_t next = (uintptr_t)w + (size_t)R * w_stride + (size_t)b * R * sizeof(block_q8_0);
            for (int k = 0; k < R * (int)sizeof(block_q8_0); k += 64)
                _mm_prefetch((const char *)(next + (uintptr_t)k), DECODE_PF_HINT);
        }
        /* the 8 rows' f16 scales: a gather of the dwords at the blocks' starts, low halves packed, widened */
        const __m256i dd = R == 8 ? _mm256_i32gather_epi32((const int *)wb, vidx, 1)
                                  : _mm256_mmask_i32gather_epi32(_mm256_setzero_si256(), rmask, vidx, wb, 1);
        const __m256 dw = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(dd));
        __m256i wq[8], aw[8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            wq[r] = r < R ? _mm256_loadu_si256((const __m256i *)(wb + (size_t)r * w_stride + 2)) : _mm256_setzero_si256();
            aw[r] = _mm256_abs_epi8(wq[r]);
        }
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const block_q8_act *xb = (const block_q8_act *)(x + (size_t)t * x_stride) + b;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)xb->qs);
            __m256i p[8];
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++)
                p[r] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw[r], _mm256_sign_epi8(xq, wq[r]));
            const __m256 f = _mm256_cvtepi32_ps(hsum8x8(p));
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(f, _mm256_mul_ps(dw, _mm256_set1_ps(xb->d))));
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < TT; t++) _mm256_mask_storeu_ps(y + (size_t)t * ldy, rmask, acc[t]);
}

#define TILE_ROWS(R, o)                                                                                               \
    do {                                                                                                              \
        const char *wr_ = wb + (size_t)(o) * w_stride;                                                                \
        float *yr_ = y + (size_t)(o);                                                                                 \
        int t_ = 0;                                                                                                   \
        for (; t_ + 4 <= n_tok; t_ += 4)                                                                              \
            tile_q8(R, 4, nb, wr_, w_stride, xb + (size_t)t_ * x_stride, x_stride, yr_ + (size_t)t_ * ldy, ldy);      \
        for (; t_ < n_tok; t_++)                                                                                      \
            tile_q8(R, 1, nb, wr_, w_stride, xb + (size_t)t_ * x_stride, x_stride, yr_ + (size_t)t_ * ldy, ldy);      \
    } while (0)

V512_FN static void matmul_q8_0(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride,
                                float *y, size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK;
    const char *wb = (const char *)w, *xb = (const char *)x;
    int64_t o = r0;
    for (; o + 8 <= r1; o += 8) TILE_ROWS(8, o);
    switch (r1 - o) {
    case 7: TILE_ROWS(7, o); break;
    case 6: TILE_ROWS(6, o); break;
    case 5: TILE_ROWS(5, o); break;
    case 4: TILE_ROWS(4, o); break;
    case 3: TILE_ROWS(3, o); break;
    case 2: TILE_ROWS(2, o); break;
    case 1: TILE_ROWS(1, o); break;
    default: break;
    }
}

/* The AVX2 entries (static in kernels_avx2.c) through its table. */
static void matmul_f32(int64_t cols, const void *w, size_t ws, const void *x, size_t xs, float *y, size_t ldy, int n,
                       int64_t r0, int64_t r1) {
    emoe_kernels_avx2.matmul[EMOE_F32](cols, w, ws, x, xs, y, ldy, n, r0, r1);
}
static void matmul_f16(int64_t cols, const void *w, size_t ws, const void *x, size_t xs, float *y, size_t ldy, int n,
                       int64_t r0, int64_t r1) {
    emoe_kernels_avx2.matmul[EMOE_F16](cols, w, ws, x, xs, y, ldy, n, r0, r1);
}
static void matmul_q8_0_f32(int64_t cols, const void *w, size_t ws, const void *x, size_t xs, float *y, size_t ldy,
                            int n, int64_t r0, int64_t r1) {
    emoe_kernels_avx2.matmul[KQ8_F32](cols, w, ws, x, xs, y, ldy, n, r0, r1);
}
static void quantize_act(const float *x, block_q8_act *y, int64_t n) { emoe_kernels_avx2.quantize_act(x, y, n); }
static void f16_to_f32_row(const uint16_t *x, float *y, int64_t n) { emoe_kernels_avx2.f16_to_f32(x, y, n); }
static void f32_to_f16_row(const float *x, uint16_t *y, int64_t n) { emoe_kernels_avx2.f32_to_f16(x, y, n); }
static void axpy_f32(float a, const float *x, float *y, int64_t n) { emoe_kernels_avx2.axpy_f32(a, x, y, n); }
static void axpy_f16(float a, const uint16_t *x, float *y, int64_t n) { emoe_kernels_avx2.axpy_f16(a, x, y, n); }

const emoe_kernels emoe_kernels_avx512vnni = EMOE_KERNEL_TABLE(EMOE_ISA_AVX512VNNI, "avx512vnni", matmul_q8_0);

#else
typedef int emoe_kernels_avx512_unused; /* ISO C forbids an empty translation unit */
#endif
