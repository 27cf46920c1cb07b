/* aarch64 table-lookup MWQ plane kernels (math and tables in mwq_lut.h): NEON (base armv8-a) and NEON + dotprod
 * (selected at run time when HWCAP says so, like kernels_mwq_neon.c).
 *
 * Lanes are rows: a tile of 4 rows, one int32 lane per row. Per block, each row's 4 sign bytes are loaded into one
 * 32-bit lane, so byte q of a lane is sign byte q (groups 2q, 2q + 1): its low nibbles index the block's 64-byte
 * table of the even groups and its high nibbles that of the odd groups, one vqtbl4q each with index nibble | 16 q
 * (L and H tables: 4 lookups per plane and block for 4 rows x 32 inputs). Each row's 8 code bytes are split into its
 * even and odd bytes (one vqtbl2q each), and each code byte's low and high bits gathered into nibbles by 16-entry
 * tables (vqtbl1q), then the same lookups with iq = T[n0] + 2 T[n1]. Byte sums stay in range (L + 2 L' <= 180
 * unsigned, H + 2 H' in [-96, 84]); the 4 bytes of a lane are summed by vdotq (dotprod) or pairwise widening adds,
 * exact either way. Then the f32 stage of mwq_lut.h per lane, in the scalar reference's order (vfmaq = fmaf).
 * Tails (fewer than 4 rows) repeat the last row in the unused lanes and store only the valid ones.
 */
#include "mwq_lut.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#define NEON_INLINE static inline __attribute__((always_inline))
#if defined(__clang__)
#define DOTPROD_TARGET __attribute__((target("dotprod")))
#else
#define DOTPROD_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

/* 16-entry nibble maps: a code byte's low nibble holds codes 0, 1 (bits b0 b1 b0 b1), its high nibble codes 2, 3 */
static const uint8_t EVL[16] = {0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3}; /* low bits of codes 0, 1 */
static const uint8_t ODL[16] = {0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3}; /* high bits of codes 0, 1 */
static const uint8_t EO[2][16] = {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
                                  {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
static const uint8_t POS[16] = {0, 16, 32, 48, 0, 16, 32, 48, 0, 16, 32, 48, 0, 16, 32, 48};

/* sum over each lane's 4 bytes of L + 16 H (L unsigned, H signed): pairwise widening adds, or dotprod */
NEON_INLINE int32x4_t lane_sum_nodot(uint8x16_t l, int8x16_t h) {
    const int32x4_t a = vreinterpretq_s32_u32(vpaddlq_u16(vpaddlq_u8(l)));
    return vaddq_s32(a, vshlq_n_s32(vpaddlq_s16(vpaddlq_s8(h)), 4));
}
static inline __attribute__((always_inline)) DOTPROD_TARGET int32x4_t lane_sum_dot(uint8x16_t l, int8x16_t h) {
    const uint32x4_t a = vdotq_u32(vdupq_n_u32(0), l, vdupq_n_u8(1));
    return vdotq_s32(vreinterpretq_s32_u32(a), h, vdupq_n_s8(16));
}

typedef struct {
    uint8x16x4_t le, lo, he, ho;
} tabs4;

/* The looked-up bytes of the two nibble halves: lo indexes tables (L0, H0), hi (L1, H1); two: weight 2 on hi.
 * *l = L0[lo] + w L1[hi], *h = H0[lo] + w H1[hi]. */
NEON_INLINE void lookup(uint8x16_t lo, uint8x16_t hi, const uint8x16x4_t *L0, const uint8x16x4_t *L1,
                        const uint8x16x4_t *H0, const uint8x16x4_t *H1, int two, uint8x16_t *l, int8x16_t *h) {
    uint8x16_t l1 = vqtbl4q_u8(*L1, hi);
    int8x16_t h1 = vreinterpretq_s8_u8(vqtbl4q_u8(*H1, hi));
    if (two) {
        l1 = vaddq_u8(l1, l1);
        h1 = vaddq_s8(h1, h1);
    }
    *l = vaddq_u8(vqtbl4q_u8(*L0, lo), l1);
    *h = vaddq_s8(vreinterpretq_s8_u8(vqtbl4q_u8(*H0, lo)), h1);
}

NEON_INLINE float32x4_t scales4(const uint16_t *const *p, int64_t j) {
    const uint16_t v[4] = {p[0][j], p[1][j], p[2][j], p[3][j]};
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(v)));
}

/* Rows o0 .. o0 + nrows - 1 (nrows <= 4), token t; instantiated without and with dotprod. */
#define DEF_TILE(TILE_NAME, TILE_ATTR, LANE_SUM) \
TILE_ATTR void TILE_NAME(const mwq_matrix *w, const mwq_act *a, int64_t o0, int nrows, int t, float *y, size_t ldy) { \
    const int64_t cols = w->cols, nb = cols / 32, bpg = w->group / 32, ng = cols / w->group; \
    const int nr = w->k - 1; \
    const uint8_t *cp[4], *sp[MWQ_MAX_PLANES - 1][4]; \
    const uint16_t *scp[MWQ_MAX_PLANES + 1][4]; \
    for (int r = 0; r < 4; r++) { \
        const int64_t o = o0 + (r < nrows ? r : nrows - 1); \
        cp[r] = w->codes + (size_t)(o * cols / 4); \
        for (int p = 0; p < nr; p++) sp[p][r] = w->signs[p] + (size_t)(o * cols / 8); \
        scp[0][r] = w->s1 + (size_t)(o * ng); \
        scp[1][r] = w->m1 + (size_t)(o * ng); \
        for (int p = 0; p < nr; p++) scp[p + 2][r] = w->rs[p] + (size_t)(o * ng); \
    } \
    const uint8_t *lut = a->xp + (size_t)t * a->xp_stride; \
    const float *dv = mwq_lut_d(lut, cols); \
    const uint8x16_t m15 = vdupq_n_u8(15), pos = vld1q_u8(POS), evl = vld1q_u8(EVL), odl = vld1q_u8(ODL); \
    const uint8x16_t evh = vshlq_n_u8(evl, 2), odh = vshlq_n_u8(odl, 2); \
    const uint8x16_t eo0 = vld1q_u8(EO[0]), eo1 = vld1q_u8(EO[1]); \
    float32x4_t F[MWQ_MAX_PLANES], acc = vdupq_n_f32(0.0f); \
    for (int q = 0; q <= nr; q++) F[q] = vdupq_n_f32(0.0f); \
    for (int64_t b = 0; b < nb; b++) { \
        const uint8_t *T = lut + (size_t)b * MWQ_LUT_BLOCK_BYTES; \
        tabs4 tb = {vld1q_u8_x4(T), vld1q_u8_x4(T + 64), vld1q_u8_x4(T + 128), vld1q_u8_x4(T + 192)}; \
        const float32x4_t d = vdupq_n_f32(dv[b]); \
        /* codes: rows' 8 bytes -> even bytes and odd bytes (4 per row lane) -> low-bit and high-bit nibbles */ \
        const uint8x16x2_t cv = {{vcombine_u8(vld1_u8(cp[0] + 8 * b), vld1_u8(cp[1] + 8 * b)), \
                                  vcombine_u8(vld1_u8(cp[2] + 8 * b), vld1_u8(cp[3] + 8 * b))}}; \
        int32x4_t I = vdupq_n_s32(0); \
        for (int h = 0; h < 2; h++) { \
            const uint8x16_t c = vqtbl2q_u8(cv, h ? eo1 : eo0); \
            const uint8x16_t cl = vandq_u8(c, m15), ch = vshrq_n_u8(c, 4); \
            const uint8x16_t n0 = vorrq_u8(vqtbl1q_u8(evl, cl), vqtbl1q_u8(evh, ch)); \
            const uint8x16_t n1 = vorrq_u8(vqtbl1q_u8(odl, cl), vqtbl1q_u8(odh, ch)); \
            const uint8x16x4_t *L = h ? &tb.lo : &tb.le, *H = h ? &tb.ho : &tb.he; \
            uint8x16_t l; \
            int8x16_t hh; \
            lookup(vorrq_u8(n0, pos), vorrq_u8(n1, pos), L, L, H, H, 1, &l, &hh); \
            I = vaddq_s32(I, LANE_SUM(l, hh)); \
        } \
        F[0] = vfmaq_f32(F[0], d, vcvtq_f32_s32(I)); \
        for (int p = 0; p < nr; p++) { \
            uint32_t u[4]; \
            for (int r = 0; r < 4; r++) memcpy(&u[r], sp[p][r] + 4 * b, 4); \
            const uint8x16_t s = vreinterpretq_u8_u32(vld1q_u32(u)); \
            const uint8x16_t lo = vorrq_u8(vandq_u8(s, m15), pos), hi = vorrq_u8(vshrq_n_u8(s, 4), pos); \
            uint8x16_t l; \
            int8x16_t hh; \
            lookup(lo, hi, &tb.le, &tb.lo, &tb.he, &tb.ho, 0, &l, &hh); \
            const int32x4_t J = LANE_SUM(l, hh); \
            F[p + 1] = vfmaq_f32(F[p + 1], d, vcvtq_f32_s32(J)); \
        } \
        if ((b + 1) % bpg) continue; \
        const int64_t j = b / bpg; \
        const float32x4_t Sx = vdupq_n_f32(mwq_lut_group_sx(lut, cols, w->group, j)); \
        float32x4_t tt = vmulq_f32(scales4(scp[0], j), F[0]); \
        tt = vfmaq_f32(tt, scales4(scp[1], j), Sx); \
        for (int p = 0; p < nr; p++) \
            tt = vfmaq_f32(tt, scales4(scp[p + 2], j), vsubq_f32(vmulq_f32(vdupq_n_f32(2.0f), F[p + 1]), Sx)); \
        acc = vaddq_f32(acc, tt); \
        for (int q = 0; q <= nr; q++) F[q] = vdupq_n_f32(0.0f); \
    } \
    float out[4]; \
    vst1q_f32(out, acc); \
    for (int r = 0; r < nrows; r++) y[(size_t)t * ldy + (size_t)(o0 + r)] = out[r]; \
}
DEF_TILE(tile_nodot, static inline __attribute__((always_inline)), lane_sum_nodot)
DEF_TILE(tile_dot, static inline __attribute__((always_inline)) DOTPROD_TARGET, lane_sum_dot)

static void matmul_lut(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {
    for (int64_t o0 = r0; o0 < r1; o0 += 4)
        for (int t = 0; t < a->n_tok; t++) tile_nodot(w, a, o0, r1 - o0 < 4 ? (int)(r1 - o0) : 4, t, y, ldy);
}

DOTPROD_TARGET static void matmul_lut_dot(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0,
                                          int64_t r1) {
    for (int64_t o0 = r0; o0 < r1; o0 += 4)
        for (int t = 0; t < a->n_tok; t++) tile_dot(w, a, o0, r1 - o0 < 4 ? (int)(r1 - o0) : 4, t, y, ldy);
}

const mwq_kernels mwq_lut_kernels_neon = {
    .isa = EMOE_ISA_NEON,
    .name = "lut-neon",
    .uses_xp = 1,
    .xp_layout = MWQ_XP_LAYOUT_LUT,
    .matmul_q8 = matmul_lut,
    .matmul_f32 = NULL,
};

const mwq_kernels mwq_lut_kernels_neon_dotprod = {
    .isa = EMOE_ISA_NEON_DOTPROD,
    .name = "lut-neon-dotprod",
    .uses_xp = 1,
    .xp_layout = MWQ_XP_LAYOUT_LUT,
    .matmul_q8 = matmul_lut_dot,
    .matmul_f32 = NULL,
};

#else
typedef int emoe_mwq_lut_neon_unused; /* ISO C forbids an empty translation unit */
#endif
