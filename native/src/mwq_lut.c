/* Table-lookup MWQ plane kernels: the per-token table build, the scalar reference and the kernel selection.
 * The math, the table layout and the f32 order are in mwq_lut.h; SIMD kernels in mwq_lut_{avx2,avx512,neon}.c. */
#include <math.h>

#include "mwq_lut.h"

void mwq_lut_build(const block_q8_act *xq, int64_t cols, uint8_t *lut) {
    const int64_t nb = cols / 32;
    float *d = (float *)(void *)(lut + (size_t)nb * MWQ_LUT_BLOCK_BYTES);
    int32_t *sx = (int32_t *)(void *)(d + nb);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *L = lut + (size_t)b * MWQ_LUT_BLOCK_BYTES;
        int8_t *H = (int8_t *)(L + 128);
        int32_t s = 0;
        for (int m = 0; m < 8; m++) {
            const int8_t *x = xq[b].qs + 4 * m;
            uint8_t *l = L + 64 * (m & 1) + 16 * (m >> 1);
            int8_t *h = H + 64 * (m & 1) + 16 * (m >> 1);
            l[0] = 0;
            h[0] = 0;
            /* entry n = entry n without its lowest set bit + that bit's input */
            for (int n = 1; n < 16; n++) {
                const int j = __builtin_ctz((unsigned)n);
                l[n] = (uint8_t)(l[n & (n - 1)] + (x[j] & 15));
                h[n] = (int8_t)(h[n & (n - 1)] + (x[j] >> 4));
            }
            s += x[0] + x[1] + x[2] + x[3];
        }
        d[b] = xq[b].d;
        sx[b] = s;
    }
}

static inline unsigned even_bits(unsigned c) { /* bits 0,2,4,6 -> 0..3 (the codes' low bits) */
    return (c & 1u) | ((c >> 1) & 2u) | ((c >> 2) & 4u) | ((c >> 3) & 8u);
}

/* sum x over the set bits of nibble n of group m: L + 16 H (even groups first, then odd: see mwq_lut.h) */
static inline int32_t tl(const uint8_t *T, int m, unsigned n) {
    const int e = 64 * (m & 1) + 16 * (m >> 1) + (int)n;
    return (int32_t)T[e] + 16 * (int32_t)(int8_t)T[128 + e];
}

void mwq_lut_block_ints(const mwq_matrix *w, int64_t o, int64_t b, const uint8_t *lut, int32_t *I) {
    const uint8_t *T = lut + (size_t)b * MWQ_LUT_BLOCK_BYTES;
    const int64_t i0 = o * w->cols + 32 * b;
    const uint8_t *c = w->codes + i0 / 4;
    int32_t iq = 0;
    for (int m = 0; m < 8; m++) iq += tl(T, m, even_bits(c[m])) + 2 * tl(T, m, even_bits(c[m] >> 1));
    I[0] = iq;
    for (int p = 0; p + 1 < w->k; p++) {
        const uint8_t *s = w->signs[p] + i0 / 8;
        int32_t ik = 0;
        for (int q = 0; q < 4; q++) ik += tl(T, 2 * q, s[q] & 15u) + tl(T, 2 * q + 1, s[q] >> 4);
        I[p + 1] = ik;
    }
}

float mwq_lut_group_sx(const uint8_t *lut, int64_t cols, int group, int64_t j) {
    const float *d = mwq_lut_d(lut, cols);
    const int32_t *sx = mwq_lut_sx(lut, cols);
    float Sx = 0.0f;
    for (int64_t b = j * (group / 32); b < (j + 1) * (group / 32); b++) Sx = fmaf(d[b], (float)sx[b], Sx);
    return Sx;
}

float mwq_lut_dot_scalar(const mwq_matrix *w, int64_t o, const uint8_t *lut) {
    const int64_t ng = w->cols / w->group, bpg = w->group / 32;
    const float *d = mwq_lut_d(lut, w->cols);
    const int k = w->k;
    float acc = 0.0f;
    for (int64_t j = 0; j < ng; j++) {
        float F[MWQ_MAX_PLANES] = {0};
        for (int64_t b = j * bpg; b < (j + 1) * bpg; b++) {
            int32_t I[MWQ_MAX_PLANES];
            mwq_lut_block_ints(w, o, b, lut, I);
            for (int q = 0; q < k; q++) F[q] = fmaf(d[b], (float)I[q], F[q]);
        }
        const float Sx = mwq_lut_group_sx(lut, w->cols, w->group, j);
        const size_t gi = (size_t)(o * ng + j);
        float t = f16_to_f32(w->s1[gi]) * F[0];
        t = fmaf(f16_to_f32(w->m1[gi]), Sx, t);
        for (int p = 1; p < k; p++) t = fmaf(f16_to_f32(w->rs[p - 1][gi]), 2.0f * F[p] - Sx, t);
        acc = acc + t;
    }
    return acc;
}

static void matmul_lut_scalar(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {
    for (int t = 0; t < a->n_tok; t++) {
        const uint8_t *lut = a->xp + (size_t)t * a->xp_stride;
        for (int64_t o = r0; o < r1; o++) y[(size_t)t * ldy + (size_t)o] = mwq_lut_dot_scalar(w, o, lut);
    }
}

const mwq_kernels mwq_lut_kernels_scalar = {
    .isa = EMOE_ISA_SCALAR,
    .name = "lut-scalar",
    .uses_xp = 1,
    .xp_layout = MWQ_XP_LAYOUT_LUT,
    .matmul_q8 = matmul_lut_scalar,
    .matmul_f32 = NULL,
};

const mwq_kernels *mwq_lut_kernels_get(int isa) {
    if (isa == EMOE_ISA_AUTO) isa = emoe_isa_best();
    if (!emoe_isa_supported(isa)) return NULL;
    switch (isa) {
    case EMOE_ISA_SCALAR: return &mwq_lut_kernels_scalar;
#if defined(EMOE_HAVE_AVX2)
    case EMOE_ISA_AVX2: return &mwq_lut_kernels_avx2;
    case EMOE_ISA_AVX512VNNI: return emoe_x86_gfni_vbmi() ? &mwq_lut_kernels_avx512 : &mwq_lut_kernels_avx2;
#endif
#if defined(EMOE_HAVE_NEON)
    case EMOE_ISA_NEON: return &mwq_lut_kernels_neon;
    case EMOE_ISA_NEON_DOTPROD: return &mwq_lut_kernels_neon_dotprod;
#endif
    default: return NULL;
    }
}

int emoe_mwq_lut_available(int isa) { return mwq_lut_kernels_get(isa) != NULL; }
