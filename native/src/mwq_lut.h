/* Table-lookup (T-MAC style) MWQ plane kernels: declarations shared by mwq_lut*.c and mwq.c.
 *
 * For one token's int8 activations (quantized per block of 32 exactly as the other integer kernels do), every group of
 * 4 inputs gets a 16-entry table of the partial sums of its sign patterns, computed once per token and shared by all
 * rows, planes and matrices that read that input. A residual plane's nibble (4 sign bits) then costs one lookup instead
 * of 4 multiply-adds, and the 2-bit base plane is two such bit planes (the codes' low and high bits): time follows the
 * number of planes read. The tables are integers and split so that every entry fits a byte (exact, see below).
 *
 * Table layout (one token, cols % 32 == 0, nb = cols / 32 blocks of 32 inputs), 64-byte aligned:
 *   tab[nb][256]: block b = groups m = 0..7 of 4 inputs i = 32b + 4m + j (j = 0..3), each 16 entries n, the even
 *     groups first (entry e = 64 (m & 1) + 16 (m >> 1) + n: a sign byte's low nibbles then index one 64-byte table
 *     and its high nibbles the other, with 16 * byte position added):
 *       bytes   0..127  L[e] = sum_{bit j of n set} (x_i & 15)   (uint8, 0..60)
 *       bytes 128..255  H[e] = sum_{bit j of n set} (x_i >> 4)   (int8, -32..28; arithmetic shift)
 *     so sum_{bit j of n set} x_i = L[e] + 16 H[e] exactly (x = 16 (x >> 4) + (x & 15) for every int8 x).
 *   d[nb]  float: the block's activation scale;  sx[nb] int32: the sum of the block's int8 activations.
 *
 * Math per (row o, block b), all integer and exact:
 *   iq_b  = sum_i q_i x_i            = sum_m T[m][n0(code byte m)] + 2 T[m][n1(code byte m)]
 *           (code byte m holds the 4 codes of group m; n0 = their low bits, n1 = their high bits)
 *   ik_pb = sum_{B_p,i = +1} x_i     = sum over the 4 sign bytes: T[2c][low nibble] + T[2c + 1][high nibble]
 * then in f32 (the order every ISA follows, lane = row; fma = one rounding, libm fmaf in the scalar code):
 *   per block b of group j:  F_q = fma(d_b, (float)I_qb, F_q)   (q = codes, planes 2..k; F_q = 0 at group start)
 *                            Sx  = fma(d_b, (float)sx_b, Sx)
 *   per group j:             t = s1 * F_codes;  t = fma(m1, Sx, t);  t = fma(s_p, 2 F_p - Sx, t) for p = 2..k
 *                            acc = acc + t     (groups in order; y = acc)
 * which is sum_b d_b (s1 iq + m1 sx + sum_p s_p (2 ik_p - sx)): W_hat_k times the quantized activations, the same
 * value the other integer kernels compute, rounded in this fixed order so that all ISAs agree bit for bit.
 * Decode and prefill use the same per-token computation (decode == prefill bit for bit).
 *
 * Used for base_bits == 2 and group % 32 == 0 (mwq_lut_ok); other (b1, g) keep the other kernels. Kernels: scalar
 * (mwq_lut.c), AVX2 (mwq_lut_avx2.c; also AVX-512 CPUs without GFNI + VBMI), AVX-512 (mwq_lut_avx512.c), NEON.
 */
#ifndef EDGEMOE_MWQ_LUT_H
#define EDGEMOE_MWQ_LUT_H
#include "internal.h"

#define MWQ_LUT_BLOCK_BYTES 256
#define MWQ_LUT_TILE 16 /* rows per SIMD tile (the driver hands out row ranges in multiples of this) */

/* 1 if the LUT kernels compute this matrix (b1 = 2, g % 32 == 0, scale index offsets fit int32). */
static inline int mwq_lut_ok(const mwq_matrix *w) {
    return w->base_bits == 2 && w->group % 32 == 0 && w->rows * (w->cols / w->group) < (INT64_C(1) << 29);
}
/* Bytes of one token's tables for cols inputs (a multiple of 64). */
static inline size_t mwq_lut_bytes(int64_t cols) {
    const size_t nb = (size_t)(cols / 32);
    return (nb * MWQ_LUT_BLOCK_BYTES + nb * 8 + 63) & ~(size_t)63;
}
static inline const float *mwq_lut_d(const uint8_t *lut, int64_t cols) {
    return (const float *)(const void *)(lut + (size_t)(cols / 32) * MWQ_LUT_BLOCK_BYTES);
}
static inline const int32_t *mwq_lut_sx(const uint8_t *lut, int64_t cols) {
    return (const int32_t *)(const void *)(mwq_lut_d(lut, cols) + cols / 32);
}

/* Build one token's tables from its quantized activations (cols % 32 == 0) into lut (64-byte aligned). */
void mwq_lut_build(const block_q8_act *xq, int64_t cols, uint8_t *lut);

/* The scalar reference for row o (the SIMD kernels must equal it bit for bit). */
float mwq_lut_dot_scalar(const mwq_matrix *w, int64_t o, const uint8_t *lut);
/* Integer sums of row o, block b (for tests): I[0] = iq, I[p - 1] = ik_p for p = 2..k. */
void mwq_lut_block_ints(const mwq_matrix *w, int64_t o, int64_t b, const uint8_t *lut, int32_t *I);
/* Sx of group j (as above; shared by every ISA). */
float mwq_lut_group_sx(const uint8_t *lut, int64_t cols, int group, int64_t j);

/* LUT kernels (mwq_kernels with xp_layout 2: a->xp = token 0's tables, a->xp_stride bytes between tokens). */
#define MWQ_XP_LAYOUT_LUT 2
#define MWQ_RUN_NO_LUT 2 /* or'ed into mwq_run's f32_act: use the per-plane dot-product kernels instead */
extern const mwq_kernels mwq_lut_kernels_scalar;
#if defined(EMOE_HAVE_AVX2)
extern const mwq_kernels mwq_lut_kernels_avx2;
extern const mwq_kernels mwq_lut_kernels_avx512;
#endif
#if defined(EMOE_HAVE_NEON)
extern const mwq_kernels mwq_lut_kernels_neon;
extern const mwq_kernels mwq_lut_kernels_neon_dotprod;
#endif
/* The LUT kernels for an ISA (EMOE_ISA_AUTO = the best), or NULL if that ISA has none. */
const mwq_kernels *mwq_lut_kernels_get(int isa);

#endif
