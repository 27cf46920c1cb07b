/* AVX2 (+ FMA, F16C) table-lookup MWQ plane kernels; math and tables in mwq_lut.h.
 *
 * Residual planes by table lookup. AVX2 has no 64-entry byte permute, only vpshufb: 16 entries per 128-bit lane, a
 * different table in each lane. So lanes are rows at byte width: a 128-bit lane holds one sign byte column (the same
 * byte q of a block) of 16 rows, and the two lanes of a vector hold columns q, q + 1 (q = 0, 2), whose 16-entry tables
 * are adjacent in the block's table (mwq_lut.h: the even groups' tables at 16 q, the odd ones' at 64 + 16 q): one
 * aligned 32-byte load is the table of a vector, low nibbles look up T + 32 (q / 2), high nibbles T + 64 + 32 (q / 2).
 * Getting there: per chunk of 8 blocks (256 inputs), 16 rows' 32 sign bytes are transposed 16 x 16 bytes within each
 * 128-bit lane (4 rounds of unpacklo/hi_epi8, 64 shuffles), then vperm2i128 pairs the columns; paid once per tile and
 * plane for up to 4 tokens. Sums: per nibble lookup L <= 60, H in [-32, 28]; a block's 8 L lookups add to <= 240
 * (unsigned bytes), the H ones to [-128, 112] (signed); H + 128 and L interleaved feed vpmaddubsw with (1, 16):
 * L + 16 H + 2048 per row and lane in int16, the two lanes summed (bias 4096, removed), then int32.
 *
 * The base plane (2-bit codes) without tables: through tables it would be two bit planes, each with the transpose, a
 * bit gather and 8 lookups (measured: 43 % of the kernel's time at k = 4). Instead each row's code bytes, as they lie,
 * are shifted and masked into 4 vectors of codes (shared by up to 4 tokens) and multiplied with the activations laid
 * out in the same order (act4, once per tile, 4 blocks and token) by vpmaddubsw, giving the exact integer block sums
 * iq of mwq_lut.h
 * (pair <= 762, four in int16 <= 3048), hadd'ed and transposed to rows. Integer sums are exact whatever computes
 * them, so the f32 stage is unchanged: mwq_lut.h's order, 8 rows per vector, the same result as the scalar reference.
 * Tails: fewer than 16 rows repeat the last row and store only the valid ones; blocks past the row end are masked
 * loads (zero) and zero activations, never stored.
 */
#include "mwq_lut.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define LUT2_TARGET "avx2,fma,f16c"
#define LUT2_FN __attribute__((target(LUT2_TARGET)))
#define LUT2_INLINE static inline __attribute__((always_inline, target(LUT2_TARGET)))
#define CH_BLOCKS 8 /* blocks of 32 inputs per chunk: 32 sign bytes, 64 code bytes per row */
#define TT_MAX 4    /* tokens per pass over a tile */

/* In-lane 16 x 16 byte transpose: on return a[j] lane h byte r = former a[r] lane h byte j. One round maps
 * (vector v, byte p) to (v << 1 | p >> 3, p << 1 | v >> 3) (4-bit indices), i.e. rotates the 8-bit (v, p) left by
 * one; four rounds swap v and p. */
LUT2_INLINE void transpose16(__m256i a[16]) {
    for (int round = 0; round < 4; round++) {
        __m256i b[16];
        for (int i = 0; i < 8; i++) {
            b[2 * i] = _mm256_unpacklo_epi8(a[i], a[i + 8]);
            b[2 * i + 1] = _mm256_unpackhi_epi8(a[i], a[i + 8]);
        }
        for (int i = 0; i < 16; i++) a[i] = b[i];
    }
}

/* Dwords [dw0, dw0 + n) (n <= 8) of 16 rows (row r at p[r] + 4 dw0), zero past n, transposed: a[j] lane h = byte
 * column 16 h + j of the 32 loaded bytes, byte r = row r. */
LUT2_INLINE void load_t(const uint8_t *const *p, int64_t dw0, int n, __m256i a[16]) {
    if (n == 8) {
        for (int r = 0; r < 16; r++) a[r] = _mm256_loadu_si256((const __m256i *)(const void *)(p[r] + 4 * dw0));
    } else {
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int r = 0; r < 16; r++) a[r] = _mm256_maskload_epi32((const int *)(const void *)(p[r] + 4 * dw0), m);
    }
    transpose16(a);
}

/* Columns c0 and c1 of a transposed load (both < 32) as the two lanes of one vector. */
LUT2_INLINE __m256i pair(const __m256i a[16], int c0, int c1) {
    /* column c is lane c / 16 of a[c % 16]; the two columns here are always in the same half */
    return c0 < 16 ? _mm256_permute2x128_si256(a[c0], a[c1], 0x20)
                   : _mm256_permute2x128_si256(a[c0 - 16], a[c1 - 16], 0x31);
}

/* The 4 activation vectors of 4 blocks (128 inputs, natural order in x[4]): vector s byte j = input 4j + s of the 128
 * (lane 0: blocks 0-1, lane 1: blocks 2-3), the order in which shifting a row's 32 code bytes right by 2s and masking
 * gives the codes (code byte j = inputs 4j .. 4j + 3). */
LUT2_INLINE void act4(const block_q8_act *const x[4], __m256i xs[4]) {
    const __m256i G = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, /* lane 0 */
                                       0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m256i y[4]; /* y[q] lane h dword s = inputs 64h + 16q + 4m + s, m = 0..3 */
    for (int q = 0; q < 4; q++)
        y[q] = _mm256_shuffle_epi8(_mm256_loadu2_m128i((const __m128i *)(const void *)(x[2 + q / 2]->qs + 16 * (q % 2)),
                                                       (const __m128i *)(const void *)(x[q / 2]->qs + 16 * (q % 2))),
                                   G);
    /* 4 x 4 dword transpose per lane: xs[s] dword q = y[q] dword s */
    const __m256i t0 = _mm256_unpacklo_epi32(y[0], y[1]), t1 = _mm256_unpackhi_epi32(y[0], y[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(y[2], y[3]), t3 = _mm256_unpackhi_epi32(y[2], y[3]);
    xs[0] = _mm256_unpacklo_epi64(t0, t2), xs[1] = _mm256_unpackhi_epi64(t0, t2);
    xs[2] = _mm256_unpacklo_epi64(t1, t3), xs[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* Integer code sums iq of 4 blocks for 8 rows (row r's 32 code bytes at p[r] + 4 dw0, n dwords valid) and TT tokens
 * (activations xs[u]): out[u][c] lane r = row r's iq of block c. Per row the codes are unpacked once for the tokens;
 * vpmaddubsw(codes, x) per shift (pair <= 2 * 3 * 127, four summed <= 3048 in int16), vpmaddwd to int32 half-block
 * lanes, then pairs of rows hadd'ed and the 8 x 4 result transposed. */
LUT2_INLINE void codes8(const int TT, const uint8_t *const *p, int64_t dw0, int n, const __m256i xs[][4],
                        __m256i out[][4]) {
    const __m256i M3 = _mm256_set1_epi8(3), ONE = _mm256_set1_epi16(1);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i h[TT_MAX][4];
    for (int r2 = 0; r2 < 4; r2++) {
        __m256i R[TT_MAX][2];
        for (int e = 0; e < 2; e++) {
            const int r = 2 * r2 + e;
            const __m256i c = n == 8 ? _mm256_loadu_si256((const __m256i *)(const void *)(p[r] + 4 * dw0))
                                     : _mm256_maskload_epi32((const int *)(const void *)(p[r] + 4 * dw0), m);
            const __m256i c0 = _mm256_and_si256(c, M3), c1 = _mm256_and_si256(_mm256_srli_epi16(c, 2), M3);
            const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(c, 4), M3);
            const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(c, 6), M3);
            for (int u = 0; u < TT; u++) {
                __m256i s16 = _mm256_maddubs_epi16(c0, xs[u][0]);
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c1, xs[u][1]));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c2, xs[u][2]));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c3, xs[u][3]));
                R[u][e] = _mm256_madd_epi16(s16, ONE); /* lane L = inputs 16L .. 16L + 15 */
            }
        }
        for (int u = 0; u < TT; u++)
            h[u][r2] = _mm256_hadd_epi32(R[u][0], R[u][1]); /* [a.b0 a.b1 b.b0 b.b1 | a.b2 a.b3 b.b2 b.b3] */
    }
    for (int u = 0; u < TT; u++) {
        for (int g = 0; g < 2; g++) { /* rows 4g .. 4g + 3 */
            const __m256 A = _mm256_castsi256_ps(h[u][2 * g]), B = _mm256_castsi256_ps(h[u][2 * g + 1]);
            const __m256 ev = _mm256_shuffle_ps(A, B, 0x88), od = _mm256_shuffle_ps(A, B, 0xDD); /* blocks 0|2, 1|3 */
            h[u][2 * g] = _mm256_castps_si256(ev), h[u][2 * g + 1] = _mm256_castps_si256(od);
        }
        out[u][0] = _mm256_permute2x128_si256(h[u][0], h[u][2], 0x20);
        out[u][2] = _mm256_permute2x128_si256(h[u][0], h[u][2], 0x31);
        out[u][1] = _mm256_permute2x128_si256(h[u][1], h[u][3], 0x20);
        out[u][3] = _mm256_permute2x128_si256(h[u][1], h[u][3], 0x31);
    }
}

/* 8 x 8 f32 transpose: on return r[c] lane i = former r[i] lane c. */
LUT2_INLINE void transpose8_ps(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
        r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
}

/* f16 scales of groups [j0, j0 + n) (n <= 8) of 16 rows (row r's at p[r] + j0) as f32: out[c][h] lane i = row 8h + i's
 * scale of group j0 + c. */
LUT2_INLINE void scales_t(const uint16_t *const *p, int64_t j0, int n, __m256 out[8][2]) {
    for (int h = 0; h < 2; h++) {
        __m256 r[8];
        for (int i = 0; i < 8; i++) {
            __m128i v;
            if (n == 8) {
                v = _mm_loadu_si128((const __m128i *)(const void *)(p[8 * h + i] + j0));
            } else {
                uint16_t tmp[8] = {0};
                memcpy(tmp, p[8 * h + i] + j0, (size_t)n * 2);
                v = _mm_loadu_si128((const __m128i *)(const void *)tmp);
            }
            r[i] = _mm256_cvtph_ps(v);
        }
        transpose8_ps(r);
        for (int c = 0; c < 8; c++) out[c][h] = r[c];
    }
}

/* int16 sums of 16 rows, lane 0 and lane 1 partial (lo: rows 0-7 of each lane, hi: rows 8-15), minus bias, as int32
 * -> f32, fma'd into F[0] (rows 0-7) and F[1] (rows 8-15). */
LUT2_INLINE void accumulate(__m256i lo, __m256i hi, __m256i bias, __m256 d, __m256 F[2]) {
    __m256i s = _mm256_add_epi16(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
    s = _mm256_sub_epi16(s, bias);
    const __m256i i0 = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s));
    const __m256i i1 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s, 1));
    F[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(i0), F[0]);
    F[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(i1), F[1]);
}

/* Prefetch part s of parts of the planes of rows [on, on + nn) into L2 (as mwq_lut_avx512.c: the tile reads 16 x k
 * streams at once, more than the hardware prefetchers follow). */
LUT2_INLINE void prefetch_tile(const int nr, const mwq_matrix *w, int64_t on, int64_t nn, int64_t s, int64_t parts) {
    if (nn <= 0) return;
    for (int q = 0; q <= nr; q++) {
        const uint8_t *base =
            q == 0 ? w->codes + (size_t)(on * w->cols / 4) : w->signs[q - 1] + (size_t)(on * w->cols / 8);
        const int64_t lines = (nn * w->cols / (q == 0 ? 4 : 8) + 63) / 64;
        for (int64_t l = s * lines / parts; l < (s + 1) * lines / parts; l++)
            _mm_prefetch((const char *)base + 64 * l, _MM_HINT_T1);
    }
}

/* Rows o0 .. o0 + nrows - 1 (nrows <= 16), tokens t0 .. t0 + TT - 1; the next tile (prefetched) has nn rows. */
LUT2_INLINE void tile(const int TT, const int nr, const mwq_matrix *w, const mwq_act *a, int64_t o0, int nrows, int t0,
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
    __m256 sc[MWQ_MAX_PLANES + 1][8][2]; /* scales of groups j0s .. j0s + 7 */
    int64_t j0s = -8;
    const uint8_t *lut[TT_MAX];
    const float *dv[TT_MAX];
    const int32_t *sxv[TT_MAX];
    for (int u = 0; u < TT; u++) {
        lut[u] = a->xp + (size_t)(t0 + u) * a->xp_stride;
        dv[u] = mwq_lut_d(lut[u], cols), sxv[u] = mwq_lut_sx(lut[u], cols);
    }

    const __m256i M15 = _mm256_set1_epi8(15), X80 = _mm256_set1_epi8((char)0x80);
    const __m256i C116 = _mm256_set1_epi16(0x1001), B4096 = _mm256_set1_epi16(4096);
    const block_q8_act zero_blk = {0};

    /* per chunk, the weight side shared by the tokens: the sign nibbles of each block */
    __m256i slo[MWQ_MAX_PLANES - 1][CH_BLOCKS][2], shi[MWQ_MAX_PLANES - 1][CH_BLOCKS][2];
    __m256 F[TT_MAX][MWQ_MAX_PLANES][2], acc[TT_MAX][2];
    for (int u = 0; u < TT; u++) {
        acc[u][0] = acc[u][1] = _mm256_setzero_ps();
        for (int q = 0; q <= nr; q++) F[u][q][0] = F[u][q][1] = _mm256_setzero_ps();
    }
    const int64_t n_ch = (nb + CH_BLOCKS - 1) / CH_BLOCKS;
    for (int64_t b0 = 0; b0 < nb; b0 += CH_BLOCKS) {
        const int nblk = nb - b0 < CH_BLOCKS ? (int)(nb - b0) : CH_BLOCKS;
        prefetch_tile(nr, w, o0 + 16, nn, b0 / CH_BLOCKS, n_ch);
        for (int p = 0; p < nr; p++) { /* signs: 4 bytes per block, 8 blocks per load */
            __m256i t[16];
            load_t(sp[p], b0, nblk, t);
            for (int bl = 0; bl < nblk; bl++)
                for (int i = 0; i < 2; i++) {
                    const int c0 = 16 * (bl >> 2) + 4 * (bl & 3) + 2 * i;
                    const __m256i v = pair(t, c0, c0 + 1);
                    slo[p][bl][i] = _mm256_and_si256(v, M15);
                    shi[p][bl][i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), M15);
                }
        }
        /* the codes: per row against the activations (no table, no transpose), 4 blocks at a time */
        __m256i iq[TT_MAX][CH_BLOCKS][2];
        for (int q4 = 0; 4 * q4 < nblk; q4++) {
            const int nb4 = nblk - 4 * q4 < 4 ? nblk - 4 * q4 : 4;
            __m256i xs[TT_MAX][4], o8[TT_MAX][4];
            for (int u = 0; u < TT; u++) {
                const block_q8_act *xb[4];
                for (int c = 0; c < 4; c++) /* blocks past the row end: zeros, never read past the activations */
                    xb[c] = c < nb4 ? a->xq + (size_t)(t0 + u) * a->xq_stride + (size_t)(b0 + 4 * q4 + c) : &zero_blk;
                act4(xb, xs[u]);
            }
            for (int h = 0; h < 2; h++) {
                codes8(TT, cp + 8 * h, 2 * (b0 + 4 * q4), 2 * nb4, xs, o8);
                for (int u = 0; u < TT; u++)
                    for (int c = 0; c < nb4; c++) iq[u][4 * q4 + c][h] = o8[u][c];
            }
        }
        for (int u = 0; u < TT; u++) {
            __m256 Fu[MWQ_MAX_PLANES][2], accu[2] = {acc[u][0], acc[u][1]};
            for (int q = 0; q <= nr; q++) Fu[q][0] = F[u][q][0], Fu[q][1] = F[u][q][1];
            for (int bl = 0; bl < nblk; bl++) {
                const int64_t b = b0 + bl;
                const __m256i *T = (const __m256i *)(const void *)(lut[u] + (size_t)b * MWQ_LUT_BLOCK_BYTES);
                __m256i L[4], H[4];
                for (int i = 0; i < 4; i++) L[i] = _mm256_load_si256(T + i), H[i] = _mm256_load_si256(T + 4 + i);
                const __m256 d = _mm256_set1_ps(dv[u][b]);
                Fu[0][0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(iq[u][bl][0]), Fu[0][0]);
                Fu[0][1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(iq[u][bl][1]), Fu[0][1]);
                for (int p = 0; p < nr; p++) {
                    const __m256i *lo = slo[p][bl], *hi = shi[p][bl];
                    const __m256i Ls = _mm256_add_epi8(
                        _mm256_add_epi8(_mm256_shuffle_epi8(L[0], lo[0]), _mm256_shuffle_epi8(L[2], hi[0])),
                        _mm256_add_epi8(_mm256_shuffle_epi8(L[1], lo[1]), _mm256_shuffle_epi8(L[3], hi[1])));
                    const __m256i Hs = _mm256_add_epi8(
                        _mm256_add_epi8(_mm256_shuffle_epi8(H[0], lo[0]), _mm256_shuffle_epi8(H[2], hi[0])),
                        _mm256_add_epi8(_mm256_shuffle_epi8(H[1], lo[1]), _mm256_shuffle_epi8(H[3], hi[1])));
                    const __m256i Hb = _mm256_xor_si256(Hs, X80); /* H + 128: unsigned for vpmaddubsw */
                    const __m256i slo16 = _mm256_maddubs_epi16(_mm256_unpacklo_epi8(Ls, Hb), C116);
                    const __m256i shi16 = _mm256_maddubs_epi16(_mm256_unpackhi_epi8(Ls, Hb), C116);
                    accumulate(slo16, shi16, B4096, d, Fu[p + 1]);
                }
                if ((b + 1) % bpg) continue;
                /* end of group j: t = s1 F0, fma(m1, Sx, t), fma(s_p, 2 F_p - Sx, t); acc += t */
                const int64_t j = b / bpg;
                if (j - j0s >= 8) { /* token 0 loads the window of groups [8w, 8w + 8); a chunk's group ends all lie
                                     * in one window (group 8w starts at block 8w * bpg, a chunk boundary) */
                    j0s = j - j % 8;
                    for (int q = 0; q < nr + 2; q++) scales_t(scp[q], j0s, ng - j0s < 8 ? (int)(ng - j0s) : 8, sc[q]);
                }
                __m128 sx = _mm_setzero_ps(); /* mwq_lut_group_sx, same fma chain */
                for (int64_t c = j * bpg; c <= b; c++)
                    sx = _mm_fmadd_ss(_mm_set_ss(dv[u][c]), _mm_set_ss((float)sxv[u][c]), sx);
                const __m256 Sx = _mm256_broadcastss_ps(sx);
                for (int h = 0; h < 2; h++) {
                    __m256 t = _mm256_mul_ps(sc[0][j - j0s][h], Fu[0][h]);
                    t = _mm256_fmadd_ps(sc[1][j - j0s][h], Sx, t);
                    for (int p = 0; p < nr; p++)
                        t = _mm256_fmadd_ps(sc[p + 2][j - j0s][h],
                                            _mm256_fmsub_ps(_mm256_set1_ps(2.0f), Fu[p + 1][h], Sx), t);
                    accu[h] = _mm256_add_ps(accu[h], t);
                    for (int q = 0; q <= nr; q++) Fu[q][h] = _mm256_setzero_ps();
                }
            }
            acc[u][0] = accu[0], acc[u][1] = accu[1];
            for (int q = 0; q <= nr; q++) F[u][q][0] = Fu[q][0], F[u][q][1] = Fu[q][1];
        }
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows), lane);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows - 8), lane);
    for (int u = 0; u < TT; u++) {
        float *yo = y + (size_t)(t0 + u) * ldy + (size_t)o0;
        _mm256_maskstore_ps(yo, m0, acc[u][0]);
        if (nrows > 8) _mm256_maskstore_ps(yo + 8, m1, acc[u][1]);
    }
}

/* One function per number of residual planes (their loops then unroll). */
#define DEF_LUT(NAME, NR)                                                                                             \
    LUT2_FN static void NAME(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {  \
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

const mwq_kernels mwq_lut_kernels_avx2 = {
    .isa = EMOE_ISA_AVX2,
    .name = "lut-avx2",
    .uses_xp = 1,
    .xp_layout = MWQ_XP_LAYOUT_LUT,
    .matmul_q8 = matmul_lut,
    .matmul_f32 = NULL,
};

#else
typedef int emoe_mwq_lut_avx2_unused; /* ISO C forbids an empty translation unit */
#endif
