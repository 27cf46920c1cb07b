/* aarch64 kernels: Advanced SIMD (NEON, part of base armv8-a), plus a Q8_0 matmul using SDOT (vdotq_s32).
 *
 * The SDOT functions carry a target attribute (armv8.2-a+dotprod) so the library is built for base armv8-a and still
 * runs on cores without dotprod (Cortex-A53, A72 as in the Pi 4): dispatch.c selects emoe_kernels_neon_dotprod only
 * when getauxval(AT_HWCAP) has HWCAP_ASIMDDP. Tiling is as in kernels_avx2.c (R rows x TT tokens of 4-lane f32
 * accumulators; decode R=8, prefill 2x4; one accumulator per (row, token) everywhere, so decode == prefill bit for
 * bit).
 */
#include "internal.h"
#include "kernel_tables.h"
#include "kernel_walks.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#define NEON_INLINE static inline __attribute__((always_inline))
/* decode tiles prefetch the next tile when rows are short: see PREFETCH_MAX_STRIDE in kernels_avx2.c */
#define PREFETCH_MAX_STRIDE 4096
#if defined(__clang__)
#define DOTPROD_TARGET __attribute__((target("dotprod")))
#else
#define DOTPROD_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

NEON_INLINE float32x4_t load4(int f16, const char *p) {
    return f16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p))) : vld1q_f32((const float *)p);
}
/* f16 -> f32 with the FCVTL instruction (the portable f16_to_f32 is integer bit twiddling: too slow per block) */
NEON_INLINE float h2f(uint16_t h) { return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0); }

NEON_INLINE float wval(int f16, const char *row, int64_t i) {
    return f16 ? f16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

NEON_INLINE void tile_float(int f16, int R, int TT, int64_t cols, const char *w, size_t w_stride, const char *x,
                            size_t x_stride, float *y, size_t ldy, int64_t o) {
    const size_t esz = f16 ? 2 : 4;
    float32x4_t acc[8][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) acc[r][t] = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 4 <= cols; i += 4) {
        if (TT == 1 && w_stride <= PREFETCH_MAX_STRIDE && i % 16 == 0) {
            const uintptr_t next = (uintptr_t)w + (size_t)R * w_stride + (size_t)i * esz * R;
            for (int k = 0; k < R * 16 * (int)esz; k += 64)
                __builtin_prefetch((const void *)(next + (uintptr_t)k));
        }
        float32x4_t wv[8];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) wv[r] = load4(f16, w + (size_t)r * w_stride + (size_t)i * esz);
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const float32x4_t xv = vld1q_f32((const float *)(x + (size_t)t * x_stride) + i);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) acc[r][t] = vfmaq_f32(acc[r][t], wv[r], xv);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            float s = vaddvq_f32(acc[r][t]);
            const float *xr = (const float *)(x + (size_t)t * x_stride);
            for (int64_t j = i; j < cols; j++) s += wval(f16, w + (size_t)r * w_stride, j) * xr[j];
            y[(size_t)t * ldy + (size_t)o + (size_t)r] = s;
        }
}


#define TILE_F32(R, TT, wr, xr, yr) tile_float(0, R, TT, cols, wr, w_stride, xr, x_stride, yr, ldy, o)
#define TILE_F16(R, TT, wr, xr, yr) tile_float(1, R, TT, cols, wr, w_stride, xr, x_stride, yr, ldy, o)

static void matmul_f32(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                       size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    EMOE_WALK_TILES(8, TILE_F32);
}
static void matmul_f16(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                       size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    EMOE_WALK_TILES(8, TILE_F16);
}

/* Q8_0 x Q8 activations, integer dot per block. Without dotprod: vmull_s8/vmlal_high_s8 give int16 sums of two
 * products (|w| <= 128, |x| <= 127: |sum| <= 32512, no overflow), vpaddlq/vpadalq widen to int32. With dotprod: SDOT.
 * Both are exact; the per-block int32x4 partials are converted to f32 and fma'd with the scale dw*dx. */
NEON_INLINE int32x4_t dot_block_nodot(int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1) {
    int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    p0 = vmlal_high_s8(p0, w0, x0);
    int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
    p1 = vmlal_high_s8(p1, w1, x1);
    return vpadalq_s16(vpaddlq_s16(p0), p1);
}

#define Q8_TILE_BODY(DOT)                                                                                             \
    float32x4_t acc[8][4];                                                                                            \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                               \
        _Pragma("GCC unroll 4") for (int t = 0; t < TT; t++) acc[r][t] = vdupq_n_f32(0.0f);                           \
    for (int64_t b = 0; b < nb; b++) {                                                                                \
        if (TT == 1 && w_stride <= PREFETCH_MAX_STRIDE) {                                                             \
            const uintptr_t next = (uintptr_t)w + (size_t)R * w_stride + (size_t)b * R * sizeof(block_q8_0);         \
            for (int k = 0; k < R * (int)sizeof(block_q8_0); k += 64)                                                 \
                __builtin_prefetch((const void *)(next + (uintptr_t)k));                                              \
        }                                                                                                             \
        int8x16_t w0[8], w1[8];                                                                                       \
        float dw[8];                                                                                                  \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                         \
            const block_q8_0 *blk = (const block_q8_0 *)(w + (size_t)r * w_stride) + b;                               \
            w0[r] = vld1q_s8(blk->qs);                                                                                \
            w1[r] = vld1q_s8(blk->qs + 16);                                                                           \
            dw[r] = h2f(blk->d);                                                                               \
        }                                                                                                             \
        _Pragma("GCC unroll 4") for (int t = 0; t < TT; t++) {                                                        \
            const block_q8_act *xb = (const block_q8_act *)(x + (size_t)t * x_stride) + b;                            \
            const int8x16_t x0 = vld1q_s8(xb->qs), x1 = vld1q_s8(xb->qs + 16);                                        \
            const float dx = xb->d;                                                                                   \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                     \
                const int32x4_t p = DOT(w0[r], w1[r], x0, x1);                                                        \
                acc[r][t] = vfmaq_n_f32(acc[r][t], vcvtq_f32_s32(p), dw[r] * dx);                                     \
            }                                                                                                         \
        }                                                                                                             \
    }                                                                                                                 \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                               \
        _Pragma("GCC unroll 4") for (int t = 0; t < TT; t++) y[(size_t)t * ldy + (size_t)o + (size_t)r] =             \
            vaddvq_f32(acc[r][t]);

NEON_INLINE void tile_q8(int R, int TT, int64_t nb, const char *w, size_t w_stride, const char *x, size_t x_stride,
                         float *y, size_t ldy, int64_t o) {
    Q8_TILE_BODY(dot_block_nodot)
}

#define TILE_Q8(R, TT, wr, xr, yr) tile_q8(R, TT, nb, wr, w_stride, xr, x_stride, yr, ldy, o)
static void matmul_q8_0(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                        size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK;
    EMOE_WALK_TILES(8, TILE_Q8);
}

/* ---- SDOT variant ---- */
static inline __attribute__((always_inline)) DOTPROD_TARGET int32x4_t dot_block_sdot(int8x16_t w0, int8x16_t w1,
                                                                                    int8x16_t x0, int8x16_t x1) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, x0), w1, x1);
}
static inline __attribute__((always_inline)) DOTPROD_TARGET void tile_q8_sdot(int R, int TT, int64_t nb,
                                                                             const char *w, size_t w_stride,
                                                                             const char *x, size_t x_stride, float *y,
                                                                             size_t ldy, int64_t o) {
    Q8_TILE_BODY(dot_block_sdot)
}
#define TILE_Q8_SDOT(R, TT, wr, xr, yr) tile_q8_sdot(R, TT, nb, wr, w_stride, xr, x_stride, yr, ldy, o)
DOTPROD_TARGET static void matmul_q8_0_sdot(int64_t cols, const void *w, size_t w_stride, const void *x,
                                            size_t x_stride, float *y, size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK;
    EMOE_WALK_TILES(8, TILE_Q8_SDOT);
}

/* Q8_0 weights x f32 activations (the exact path), as in kernels_avx2.c: per block t = sum of 8 widened code
 * vectors times x (mul then 7 fma), acc += d * t; decode 4 rows, prefill 1 row x 4 tokens, same order in both. */
NEON_INLINE void q8_widen(const block_q8_0 *blk, float32x4_t wv[8]) {
    const int8x16_t a = vld1q_s8(blk->qs), b = vld1q_s8(blk->qs + 16);
    const int16x8_t h[4] = {vmovl_s8(vget_low_s8(a)), vmovl_high_s8(a), vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b)};
    for (int i = 0; i < 4; i++) {
        wv[2 * i] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[i])));
        wv[2 * i + 1] = vcvtq_f32_s32(vmovl_high_s16(h[i]));
    }
}
NEON_INLINE void tile_q8f(int R, int TT, int64_t nb, const char *w, size_t w_stride, const char *x, size_t x_stride,
                          float *y, size_t ldy, int64_t o) {
    float32x4_t acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) acc[r][t] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const block_q8_0 *blk = (const block_q8_0 *)(w + (size_t)r * w_stride) + b;
            float32x4_t wv[8];
            q8_widen(blk, wv);
            const float d = h2f(blk->d);
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                const float *xb = (const float *)(x + (size_t)t * x_stride) + b * QK;
                float32x4_t s = vmulq_f32(wv[0], vld1q_f32(xb));
                for (int i = 1; i < 8; i++) s = vfmaq_f32(s, wv[i], vld1q_f32(xb + 4 * i));
                acc[r][t] = vfmaq_n_f32(acc[r][t], s, d);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) y[(size_t)t * ldy + (size_t)o + (size_t)r] = vaddvq_f32(acc[r][t]);
}

#define TILE_Q8F(R, TT, wr, xr, yr) tile_q8f(R, TT, nb, wr, w_stride, xr, x_stride, yr, ldy, o)

static void matmul_q8_0_f32(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                            size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK;
    EMOE_WALK_ROW_TILES(TILE_Q8F);
}

/* Same bits as the scalar quantize_act: vcvtnq_s32_f32 rounds to nearest, ties to even. */
static void quantize_act(const float *x, block_q8_act *y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int j = 0; j < 8; j++) {
            v[j] = vld1q_f32(xb + 4 * j);
            m = vmaxq_f32(m, vabsq_f32(v[j]));
        }
        const float amax = vmaxvq_f32(m);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        for (int j = 0; j < 8; j += 2) {
            const int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(v[j], id));
            const int32x4_t c = vcvtnq_s32_f32(vmulq_n_f32(v[j + 1], id));
            const int16x8_t h = vcombine_s16(vqmovn_s32(a), vqmovn_s32(c));
            vst1_s8(y[b].qs + 4 * j, vqmovn_s16(h));
        }
    }
}

static void f16_to_f32_row(const uint16_t *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(x + i))));
    for (; i < n; i++) y[i] = f16_to_f32(x[i]);
}
static void f32_to_f16_row(const float *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; i++) y[i] = f32_to_f16(x[i]);
}
static void axpy_f32(float a, const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}
static void axpy_f16(float a, const uint16_t *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(x + i))), a));
    for (; i < n; i++) y[i] += a * f16_to_f32(x[i]);
}

const emoe_kernels emoe_kernels_neon = EMOE_KERNEL_TABLE(EMOE_ISA_NEON, "neon", matmul_q8_0);
const emoe_kernels emoe_kernels_neon_dotprod = EMOE_KERNEL_TABLE(EMOE_ISA_NEON_DOTPROD, "neon_dotprod", matmul_q8_0_sdot);

#else
typedef int emoe_kernels_neon_unused; /* ISO C forbids an empty translation unit */
#endif
