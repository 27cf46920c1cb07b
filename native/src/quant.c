/* Weight quantization (f32 -> Q8_0, ggml-compatible) and f16 conversion helpers of the public API. */
#include <math.h>

#include "internal.h"

int emoe_quantize_q8_0(const float *src, void *dst, int64_t n) {
    if (!src || !dst || n < 0 || n % QK) return EMOE_ERR_ARG;
    block_q8_0 *y = dst;
    for (int64_t b = 0; b < n / QK; b++) {
        const float *x = src + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f; /* as ggml's quantize_row_q8_0_ref: ((1 << 7) - 1) */
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = f32_to_f16(d);
        for (int j = 0; j < QK; j++) y[b].qs[j] = (int8_t)roundf(x[j] * id);
    }
    return EMOE_OK;
}

int emoe_dequantize_q8_0(const void *src, float *dst, int64_t n) {
    if (!src || !dst || n < 0 || n % QK) return EMOE_ERR_ARG;
    const block_q8_0 *x = src;
    for (int64_t b = 0; b < n / QK; b++) {
        const float d = f16_to_f32(x[b].d);
        for (int j = 0; j < QK; j++) dst[b * QK + j] = d * (float)x[b].qs[j];
    }
    return EMOE_OK;
}

void emoe_f32_to_f16(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

void emoe_f16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(src[i]);
}
