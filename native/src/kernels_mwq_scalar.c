/* Scalar MWQ plane kernels: the reference every SIMD path is tested against, and the fallback for group sizes the
 * SIMD kernels do not handle (see mwq_simd_ok). Portable C, one weight at a time.
 *
 * Int8 activations (matmul_q8): for each run of inputs that lies in one group j and one activation block b (runs are
 * at least 8 inputs: g and 32 are multiples of 8), exact int32 sums
 *   iq = sum q*x_q,  sx = sum x_q,  ik_p = sum_{B_p = +1} x_q
 * then y += d_b * (s1*iq + m1*sx + sum_p s_p*(2*ik_p - sx)) in f32.
 * F32 activations (matmul_f32): w = s1*q + m1, then w += s_p * B_p plane by plane (s_p * (+-1) is exact, so this is
 * bit-identical to edgemoe/mwq.py's float32 dequantize), then y += w * x.
 */
#include "internal.h"

static inline unsigned code_at(const uint8_t *codes, int b1, int64_t idx) {
    if (b1 == 8) return codes[idx];
    const int64_t bit = idx * b1;
    return (codes[bit >> 3] >> (bit & 7)) & ((1u << b1) - 1u);
}
static inline int sign_bit(const uint8_t *signs, int64_t idx) { return (signs[idx >> 3] >> (idx & 7)) & 1; }

float mwq_dot_q8_scalar(const mwq_matrix *w, int64_t o, const block_q8_act *xq, int64_t i0, int64_t i1) {
    const int64_t g = w->group, ng = w->cols / g, rbase = o * w->cols;
    const int nr = w->k - 1;
    float acc = 0.0f;
    int64_t i = i0;
    while (i < i1) {
        const int64_t j = i / g, b = i / QK;
        int64_t end = (j + 1) * g;
        if ((b + 1) * QK < end) end = (b + 1) * QK;
        if (i1 < end) end = i1;
        int32_t iq = 0, sx = 0, ik[MWQ_MAX_PLANES - 1] = {0};
        for (; i < end; i++) {
            const int32_t xv = xq[b].qs[i % QK];
            iq += (int32_t)code_at(w->codes, w->base_bits, rbase + i) * xv;
            sx += xv;
            for (int p = 0; p < nr; p++)
                if (sign_bit(w->signs[p], rbase + i)) ik[p] += xv;
        }
        const int64_t gi = o * ng + j;
        float t = f16_to_f32(w->s1[gi]) * (float)iq + f16_to_f32(w->m1[gi]) * (float)sx;
        for (int p = 0; p < nr; p++) t += f16_to_f32(w->rs[p][gi]) * (float)(2 * ik[p] - sx);
        acc += xq[b].d * t;
    }
    return acc;
}

float mwq_dot_f32_scalar(const mwq_matrix *w, int64_t o, const float *x, int64_t i0, int64_t i1) {
    const int64_t g = w->group, ng = w->cols / g, rbase = o * w->cols;
    const int nr = w->k - 1;
    float acc = 0.0f;
    for (int64_t i = i0; i < i1;) {
        const int64_t j = i / g, gi = o * ng + j;
        const int64_t end = (j + 1) * g < i1 ? (j + 1) * g : i1;
        const float s1 = f16_to_f32(w->s1[gi]), m1 = f16_to_f32(w->m1[gi]);
        float sp[MWQ_MAX_PLANES - 1];
        for (int p = 0; p < nr; p++) sp[p] = f16_to_f32(w->rs[p][gi]);
        for (; i < end; i++) {
            float wv = s1 * (float)code_at(w->codes, w->base_bits, rbase + i) + m1;
            for (int p = 0; p < nr; p++) wv += sign_bit(w->signs[p], rbase + i) ? sp[p] : -sp[p];
            acc += wv * x[i];
        }
    }
    return acc;
}

static void matmul_q8(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; o++)
        for (int t = 0; t < a->n_tok; t++)
            y[(size_t)t * ldy + (size_t)o] = mwq_dot_q8_scalar(w, o, a->xq + (size_t)t * a->xq_stride, 0, w->cols);
}

static void matmul_f32(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; o++)
        for (int t = 0; t < a->n_tok; t++)
            y[(size_t)t * ldy + (size_t)o] = mwq_dot_f32_scalar(w, o, a->x + (size_t)t * a->x_stride, 0, w->cols);
}

const mwq_kernels mwq_kernels_scalar = {
    .isa = EMOE_ISA_SCALAR,
    .name = "scalar",
    .uses_xp = 0,
    .matmul_q8 = matmul_q8,
    .matmul_f32 = matmul_f32,
};
