/* AVX-512 (F/BW/VL + VNNI + VBMI + GFNI) table-lookup MWQ plane kernels; math and tables in mwq_lut.h.
 *
 * Lanes are rows: a tile of 16 rows, one int32 lane per row. The planes are row-major, so per superchunk of 512
 * inputs (16 blocks) each plane's 16 x 64 bytes are transposed as a 16 x 16 dword matrix: dword lane r of vector c
 * then holds row r's 32 sign bits of block c (the codes: 2 dwords per block). In that vector byte q of a lane is sign
 * byte q of the block (groups 2q, 2q + 1): its low nibbles index the block's 64-byte table of the even groups and its
 * high nibbles that of the odd groups (mwq_lut.h), so one vpermb looks up 64 nibbles at once with index
 * nibble | 16 q. Per block and plane: 2 lookups (L, H) per nibble half, the halves
 * added in bytes, then vpdpbusd with 1 and 16 sums each lane's 4 bytes into its row: ik = sum L + 16 sum H.
 * The codes (bytes reordered at load so a block's first dword holds the even groups, its second the odd ones): one
 * vgf2p8affineqb per vector gathers each code byte's low bits into its low nibble and high bits into
 * its high nibble, then the same lookups, iq = T[n0] + 2 T[n1]. Byte sums stay in range: L <= 60, so L + L' <= 120 and
 * L + 2 L' <= 180 (unsigned bytes); H in [-32, 28], so H + H' and H + 2 H' lie in [-96, 84] (signed bytes).
 * Then the f32 stage of mwq_lut.h, 16 rows per vector, in the same order as the scalar reference (fma = fmaf).
 * Up to 4 tokens share one transposition. Tails (fewer than 16 rows) repeat the last row in the unused lanes and
 * store only the valid ones, so every row goes through the same operations whatever the tile.
 */
#include "mwq_lut.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define LUT_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni"
#define LUT_FN __attribute__((target(LUT_TARGET)))
#define LUT_INLINE static inline __attribute__((always_inline, target(LUT_TARGET)))
#define SC_BLOCKS 16 /* blocks of 32 inputs per superchunk (64 sign bytes per row) */
#define TT_MAX 4     /* tokens per pass over a tile */

/* 16 x 16 dword transpose: on return r[c] lane i = former r[i] lane c. */
LUT_INLINE void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* u[4i + c] 128-bit lane L = dwords 4L + c of rows 4i .. 4i + 3 */
    for (int c = 0; c < 4; c++) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
        const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
        r[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
    }
}

/* Load dwords [dw0, dw0 + n) (n <= 16) of 16 rows (row r at p[r] + 4 dw0) and transpose them into out[0..15].
 * codes: reorder the bytes of every qword (a block's 8 code bytes = groups 0..7) to 0, 2, 4, 6, 1, 3, 5, 7, so that a
 * block's first dword holds the even groups and its second the odd ones, like the sign bytes' nibbles. */
LUT_INLINE void load_t(const uint8_t *const *p, int64_t dw0, int n, int codes, __m512i *out) {
    const __mmask16 m = (__mmask16)((1u << n) - 1u);
    const __m512i eo = _mm512_set1_epi64(0x0705030106040200LL); /* bytes 0, 2, 4, 6, 1, 3, 5, 7 */
    const __m512i sh = _mm512_add_epi8(eo, _mm512_set_epi64(8 * 0x0101010101010101LL, 0, 8 * 0x0101010101010101LL, 0,
                                                            8 * 0x0101010101010101LL, 0, 8 * 0x0101010101010101LL, 0));
    __m512i r[16];
    for (int i = 0; i < 16; i++) {
        r[i] = _mm512_maskz_loadu_epi32(m, p[i] + 4 * dw0);
        if (codes) r[i] = _mm512_shuffle_epi8(r[i], sh);
    }
    transpose16(r);
    for (int i = 0; i < 16; i++) _mm512_store_si512(out + i, r[i]);
}

/* f16 scales of groups [j0, j0 + n) (n <= 16) of 16 rows (row r's at p[r] + j0) as f32, transposed: out[c] lane r =
 * row r's scale of group j0 + c. (Cheaper than gathers, which cost a group end as much as several blocks.) */
LUT_INLINE void scales_t(const uint16_t *const *p, int64_t j0, int n, __m512 *out) {
    const __mmask16 m = (__mmask16)((1u << n) - 1u);
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_castps_si512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p[i] + j0)));
    transpose16(r);
    for (int i = 0; i < 16; i++) out[i] = _mm512_castsi512_ps(r[i]);
}

/* sum L + 16 sum H over the 4 bytes of each lane: lo/hi = table indices of the two nibble halves (into the tables
 * L0/H0 and L1/H1), two = 0 (signs: two groups) or 1 (codes: the high bits of the same group, weight 2). */
LUT_INLINE __m512i lookup(__m512i I, __m512i lo, __m512i hi, __m512i L0, __m512i L1, __m512i H0, __m512i H1,
                          int two) {
    __m512i l0 = _mm512_permutexvar_epi8(lo, L0), l1 = _mm512_permutexvar_epi8(hi, L1);
    __m512i h0 = _mm512_permutexvar_epi8(lo, H0), h1 = _mm512_permutexvar_epi8(hi, H1);
    if (two) {
        l1 = _mm512_add_epi8(l1, l1);
        h1 = _mm512_add_epi8(h1, h1);
    }
    I = _mm512_dpbusd_epi32(I, _mm512_add_epi8(l0, l1), _mm512_set1_epi8(1));
    return _mm512_dpbusd_epi32(I, _mm512_set1_epi8(16), _mm512_add_epi8(h0, h1));
}

/* Prefetch part `s` of `parts` of the planes of rows [on, on + nn) into L2 (each plane's rows are one contiguous
 * range). The tile walks 16 rows x k planes at once, more streams than the hardware prefetchers follow from DRAM;
 * fetching the next tile sequentially while this one computes keeps the planes coming at streaming speed. */
LUT_INLINE void prefetch_tile(const int nr, const mwq_matrix *w, int64_t on, int64_t nn, int64_t s, int64_t parts) {
    if (nn <= 0) return;
    for (int q = 0; q <= nr; q++) {
        const uint8_t *base = q == 0 ? w->codes + (size_t)(on * w->cols / 4) : w->signs[q - 1] + (size_t)(on * w->cols / 8);
        const int64_t lines = (nn * w->cols / (q == 0 ? 4 : 8) + 63) / 64;
        for (int64_t l = s * lines / parts; l < (s + 1) * lines / parts; l++)
            _mm_prefetch((const char *)base + 64 * l, _MM_HINT_T1);
    }
}

/* Rows o0 .. o0 + nrows - 1 (nrows <= 16), tokens t0 .. t0 + TT - 1; the next tile (prefetched) has nn rows. */
LUT_INLINE void tile(const int TT, const int nr, const mwq_matrix *w, const mwq_act *a, int64_t o0, int nrows, int t0,
                     float *y, size_t ldy, int64_t nn) {
    const int64_t cols = w->cols, nb = cols / 32, bpg = w->group / 32, ng = cols / w->group;
    const uint8_t *cp[16], *sp[MWQ_MAX_PLANES - 1][16];
    const uint16_t *scp[MWQ_MAX_PLANES + 1][16]; /* s1, m1, s_2 .. s_k of each row */
    for (int r = 0; r < 16; r++) {
        const int64_t o = o0 + (r < nrows ? r : nrows - 1);
        cp[r] = w->codes + (size_t)(o * cols / 4);
        for (int p = 0; p < nr; p++) sp[p][r] = w->signs[p] + (size_t)(o * cols / 8);
        scp[0][r] = w->s1 + (size_t)(o * ng);
        scp[1][r] = w->m1 + (size_t)(o * ng);
        for (int p = 0; p < nr; p++) scp[p + 2][r] = w->rs[p] + (size_t)(o * ng);
    }
    __m512 sc[MWQ_MAX_PLANES + 1][16]; /* scales of groups j0s .. j0s + 15 */
    int64_t j0s = -16;
    const uint8_t *lut[TT_MAX];
    for (int u = 0; u < TT; u++) lut[u] = a->xp + (size_t)(t0 + u) * a->xp_stride;
    const float *dv[TT_MAX];
    const int32_t *sxv[TT_MAX];
    for (int u = 0; u < TT; u++) dv[u] = mwq_lut_d(lut[u], cols), sxv[u] = mwq_lut_sx(lut[u], cols);

    const __m512i M15 = _mm512_set1_epi8(15);
    const __m512i POS = _mm512_set1_epi32(0x30201000); /* byte q of a dword: 16 q, its slot in a 64-byte table */
    /* vgf2p8affineqb matrix: result bit i (row byte 7 - i) = code bit 2i (i < 4), bit 2(i - 4) + 1 (i >= 4) */
    const __m512i GF = _mm512_set1_epi64((long long)0x0104104002082080ULL);

    __m512i tc[32], ts[MWQ_MAX_PLANES - 1][16];
    __m512 F[TT_MAX][MWQ_MAX_PLANES], acc[TT_MAX];
    for (int u = 0; u < TT; u++) {
        acc[u] = _mm512_setzero_ps();
        for (int q = 0; q <= nr; q++) F[u][q] = _mm512_setzero_ps();
    }
    const int64_t n_sc = (nb + SC_BLOCKS - 1) / SC_BLOCKS;
    for (int64_t s0 = 0; s0 < nb; s0 += SC_BLOCKS) {
        const int nblk = nb - s0 < SC_BLOCKS ? (int)(nb - s0) : SC_BLOCKS;
        prefetch_tile(nr, w, o0 + 16, nn, s0 / SC_BLOCKS, n_sc);
        load_t(cp, 2 * s0, 2 * nblk < 16 ? 2 * nblk : 16, 1, tc);
        if (nblk > 8) load_t(cp, 2 * s0 + 16, 2 * nblk - 16, 1, tc + 16);
        for (int p = 0; p < nr; p++) load_t(sp[p], s0, nblk, 0, ts[p]);
        for (int bl = 0; bl < nblk; bl++) {
            const int64_t b = s0 + bl;
            const __m512i e0 = _mm512_gf2p8affine_epi64_epi8(tc[2 * bl], GF, 0);
            const __m512i e1 = _mm512_gf2p8affine_epi64_epi8(tc[2 * bl + 1], GF, 0);
            const __m512i c0lo = _mm512_ternarylogic_epi32(e0, M15, POS, 0xEA);
            const __m512i c0hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(e0, 4), M15, POS, 0xEA);
            const __m512i c1lo = _mm512_ternarylogic_epi32(e1, M15, POS, 0xEA);
            const __m512i c1hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(e1, 4), M15, POS, 0xEA);
            for (int u = 0; u < TT; u++) {
                const __m512i *T = (const __m512i *)(const void *)(lut[u] + (size_t)b * MWQ_LUT_BLOCK_BYTES);
                const __m512i Le = _mm512_load_si512(T), Lo = _mm512_load_si512(T + 1);
                const __m512i He = _mm512_load_si512(T + 2), Ho = _mm512_load_si512(T + 3);
                const __m512 d = _mm512_set1_ps(dv[u][b]);
                __m512i I = lookup(_mm512_setzero_si512(), c0lo, c0hi, Le, Le, He, He, 1);
                I = lookup(I, c1lo, c1hi, Lo, Lo, Ho, Ho, 1);
                F[u][0] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(I), F[u][0]);
                for (int p = 0; p < nr; p++) {
                    const __m512i s = ts[p][bl];
                    const __m512i lo = _mm512_ternarylogic_epi32(s, M15, POS, 0xEA);
                    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(s, 4), M15, POS, 0xEA);
                    const __m512i J = lookup(_mm512_setzero_si512(), lo, hi, Le, Lo, He, Ho, 0);
                    F[u][p + 1] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(J), F[u][p + 1]);
                }
            }
            if ((b + 1) % bpg) continue;
            /* end of group j: t = s1 F0, fma(m1, Sx, t), fma(s_p, 2 F_p - Sx, t); acc += t */
            const int64_t j = b / bpg;
            if (j >= j0s + 16) {
                j0s = j;
                for (int q = 0; q < nr + 2; q++) scales_t(scp[q], j0s, ng - j0s < 16 ? (int)(ng - j0s) : 16, sc[q]);
            }
            const __m512 s1 = sc[0][j - j0s], m1 = sc[1][j - j0s];
            __m512 spv[MWQ_MAX_PLANES - 1];
            for (int p = 0; p < nr; p++) spv[p] = sc[p + 2][j - j0s];
            for (int u = 0; u < TT; u++) {
                __m128 sx = _mm_setzero_ps(); /* mwq_lut_group_sx, same fma chain */
                for (int64_t c = j * bpg; c <= b; c++)
                    sx = _mm_fmadd_ss(_mm_set_ss(dv[u][c]), _mm_set_ss((float)sxv[u][c]), sx);
                const __m512 Sx = _mm512_broadcastss_ps(sx);
                __m512 t = _mm512_mul_ps(s1, F[u][0]);
                t = _mm512_fmadd_ps(m1, Sx, t);
                for (int p = 0; p < nr; p++)
                    t = _mm512_fmadd_ps(spv[p], _mm512_fmsub_ps(_mm512_set1_ps(2.0f), F[u][p + 1], Sx), t);
                acc[u] = _mm512_add_ps(acc[u], t);
                for (int q = 0; q <= nr; q++) F[u][q] = _mm512_setzero_ps();
            }
        }
    }
    const __mmask16 m = (__mmask16)((1u << nrows) - 1u);
    for (int u = 0; u < TT; u++) _mm512_mask_storeu_ps(y + (size_t)(t0 + u) * ldy + (size_t)o0, m, acc[u]);
}

/* One function per number of residual planes (their accumulators then stay in registers). */
#define DEF_LUT(NAME, NR)                                                                                             \
    LUT_FN static void NAME(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {   \
        for (int64_t o0 = r0; o0 < r1; o0 += 16) {                                                                    \
            const int nrows = r1 - o0 < 16 ? (int)(r1 - o0) : 16;                                                     \
            const int64_t nn = r1 - o0 - 16 < 16 ? r1 - o0 - 16 : 16; /* rows of the next tile */                     \
            int t = 0;                                                                                                \
            for (; t + TT_MAX <= a->n_tok; t += TT_MAX)                                                               \
                tile(TT_MAX, NR, w, a, o0, nrows, t, y, ldy, t + TT_MAX < a->n_tok ? 0 : nn);                         \
            for (; t < a->n_tok; t++) tile(1, NR, w, a, o0, nrows, t, y, ldy, t + 1 < a->n_tok ? 0 : nn);             \
        }                                                                                                             \
    }
DEF_LUT(lut_k1, 0)
DEF_LUT(lut_k2, 1)
DEF_LUT(lut_k3, 2)
DEF_LUT(lut_k4, 3)
DEF_LUT(lut_k5, 4)
DEF_LUT(lut_k6, 5)
DEF_LUT(lut_k7, 6)
DEF_LUT(lut_k8, 7)

static void matmul_lut(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {
    static const mwq_fn by_k[MWQ_MAX_PLANES] = {lut_k1, lut_k2, lut_k3, lut_k4, lut_k5, lut_k6, lut_k7, lut_k8};
    by_k[w->k - 1](w, a, y, ldy, r0, r1);
}

const mwq_kernels mwq_lut_kernels_avx512 = {
    .isa = EMOE_ISA_AVX512VNNI,
    .name = "lut-avx512",
    .uses_xp = 1,
    .xp_layout = MWQ_XP_LAYOUT_LUT,
    .matmul_q8 = matmul_lut,
    .matmul_f32 = NULL,
};

#else
typedef int emoe_mwq_lut_avx512_unused; /* ISO C forbids an empty translation unit */
#endif
