/* Scalar reference kernels: portable C, the definition every SIMD path is tested against. */
#include <math.h>

#include "internal.h"
#include "kernel_tables.h"

static void matmul_f32(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                       size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; o++) {
        const float *wr = (const float *)((const char *)w + (size_t)o * w_stride);
        for (int t = 0; t < n_tok; t++) {
            const float *xr = (const float *)((const char *)x + (size_t)t * x_stride);
            float s = 0.0f;
            for (int64_t i = 0; i < cols; i++) s += wr[i] * xr[i];
            y[(size_t)t * ldy + o] = s;
        }
    }
}

static void matmul_f16(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                       size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; o++) {
        const uint16_t *wr = (const uint16_t *)((const char *)w + (size_t)o * w_stride);
        for (int t = 0; t < n_tok; t++) {
            const float *xr = (const float *)((const char *)x + (size_t)t * x_stride);
            float s = 0.0f;
            for (int64_t i = 0; i < cols; i++) s += f16_to_f32(wr[i]) * xr[i];
            y[(size_t)t * ldy + o] = s;
        }
    }
}

/* Q8_0 weights x Q8 activations: exact int32 dot per block, then sum += isum * (dw * dx) in f32. */
static void matmul_q8_0(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                        size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK;
    for (int64_t o = r0; o < r1; o++) {
        const block_q8_0 *wr = (const block_q8_0 *)((const char *)w + (size_t)o * w_stride);
        for (int t = 0; t < n_tok; t++) {
            const block_q8_act *xr = (const block_q8_act *)((const char *)x + (size_t)t * x_stride);
            float s = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t is = 0;
                for (int j = 0; j < QK; j++) is += (int32_t)wr[b].qs[j] * (int32_t)xr[b].qs[j];
                s += (float)is * (f16_to_f32(wr[b].d) * xr[b].d);
            }
            y[(size_t)t * ldy + o] = s;
        }
    }
}

/* Q8_0 weights x f32 activations: per block, sb = sum_j q_j x_j in f32, then sum += d * sb. */
static void matmul_q8_0_f32(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                            size_t ldy, int n_tok, int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK;
    for (int64_t o = r0; o < r1; o++) {
        const block_q8_0 *wr = (const block_q8_0 *)((const char *)w + (size_t)o * w_stride);
        for (int t = 0; t < n_tok; t++) {
            const float *xr = (const float *)((const char *)x + (size_t)t * x_stride);
            float s = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                float sb = 0.0f;
                for (int j = 0; j < QK; j++) sb += (float)wr[b].qs[j] * xr[b * QK + j];
                s += f16_to_f32(wr[b].d) * sb;
            }
            y[(size_t)t * ldy + o] = s;
        }
    }
}

/* Activation quantization: d = amax/127, q = round-half-even(x * (1/d)); all SIMD paths compute the same bits. */
static void quantize_act(const float *x, block_q8_act *y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        for (int j = 0; j < QK; j++) y[b].qs[j] = (int8_t)(int)nearbyintf(xb[j] * id);
    }
}

static void f16_to_f32_row(const uint16_t *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = f16_to_f32(x[i]);
}
static void f32_to_f16_row(const float *x, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = f32_to_f16(x[i]);
}
static void axpy_f32(float a, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}
static void axpy_f16(float a, const uint16_t *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * f16_to_f32(x[i]);
}

const emoe_kernels emoe_kernels_scalar = EMOE_KERNEL_TABLE(EMOE_ISA_SCALAR, "scalar", matmul_q8_0);
