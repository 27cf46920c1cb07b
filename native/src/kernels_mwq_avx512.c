/* x86-64 MWQ plane kernels with AVX-512 VNNI + VBMI + GFNI (256-bit vectors via AVX512VL), for the default base
 * plane of 2 bits and groups g with g % 128 == 0 or g in {32, 64}; other (b1, g) and the f32-activation path use the
 * AVX2 kernels (mwq.c picks them, with the AVX2 activation layout).
 *
 * Why a different activation layout than AVX2: the cost of the AVX2 kernel is in turning plane bits into bytes. Here
 * one GF(2) affine instruction (vgf2p8affineqb) does it for 32 bytes, but it applies one bit-matrix per 8-byte qword,
 * so every qword must take the same bit position from its bytes. The layout (mwq.c, prep of xp layout 1) is built so
 * that it does: per chunk of 128 inputs (4 activation blocks of 32, 16 sign bytes, 32 code bytes), vector v = 0..3,
 * byte j = 4L + a (lane L = 0..7, a = 0..3) holds input
 *     i = 32*(L % 4) + 8*a + t,   t = 2v + L / 4
 * i.e. lane L covers 16 inputs of block L % 4 (over the 4 vectors), and qword q of vector v takes bit t of sign
 * byte i / 8 = 4*(L % 4) + a, with t the same for the whole qword (t = 2v in the low 128 bits, 2v + 1 in the high).
 *   sign plane: the 16 sign bytes broadcast to both halves ARE the byte source for every v (byte j <- sign byte j % 16),
 *     so a vector of 0/1 bytes costs one vgf2p8affineqb, and one vpdpbusd (bits unsigned x activations signed) sums
 *     the activations whose sign is +1 into the lane: 2 vector ops per 32 weights per plane (AVX2: about 4.5).
 *   base plane: input i's code is bits 2(i%4)..+1 of code byte i/4 = 8*(L%4) + 2a + v/2 (t/4 = v/2), the shift
 *     2(t%4) again uniform per qword: one vpermb per pair of vectors (v/2) and one vgf2p8affineqb (shift + mask) per
 *     vector, then vpdpbusd (codes unsigned 0..3 x activations signed).
 * Per chunk and lane the int32 sums are exact (|code| <= 3, 16 products: < 2^24), then exactly as in the AVX2 kernel
 *     t = s1*iq + sum_p 2 s_p * ik_p + c * sx,   acc = acc + d * t     (c = m1 - sum_p s_p)
 * with d the lane's activation block scale and sx the sum of its 16 activations (both in xp). Tiles: one row x up to
 * 4 tokens, every (row, token) through the same operations, so decode == prefill bit for bit. (Decode tiles of 2 or 4
 * rows were faster in cache but slower from DRAM, which is where decode runs: 4 rows x k planes are too many
 * concurrent streams for one core; measured 12 vs 11 (2 rows) vs 7 GB/s (4 rows) at k = 4 on 47 MiB of planes.)
 */
#include "internal.h"
#include "kernel_walks.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define MV_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni"
#define MV_FN __attribute__((target(MV_TARGET)))
#define MV_INLINE static inline __attribute__((always_inline, target(MV_TARGET)))
#define TABW (MWQ_SEG_GROUPS + 8) /* + 8: a permuted scale load reads 8 floats */
#define CHUNK 128                 /* inputs per chunk (b1 = 2: 32 code bytes) */

MV_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* f32 scales of one row segment: s1, c = m1 - sum_p s_p, r[p] = 2 s_p (the AVX2 kernel's table). */
typedef struct {
    float s1[TABW], c[TABW], r[MWQ_MAX_PLANES - 1][TABW];
} seg_tab;

MV_INLINE void load_scales(const mwq_matrix *w, int64_t o, int64_t g0, int n, seg_tab *tab) {
    const size_t base = (size_t)(o * (w->cols / w->group) + g0);
    const int nr = w->k - 1;
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->s1 + base + j)));
        __m256 c = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->m1 + base + j)));
        for (int p = 0; p < nr; p++) {
            const __m256 sp = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->rs[p] + base + j)));
            c = _mm256_sub_ps(c, sp);
            _mm256_storeu_ps(tab->r[p] + j, _mm256_add_ps(sp, sp));
        }
        _mm256_storeu_ps(tab->s1 + j, s1);
        _mm256_storeu_ps(tab->c + j, c);
    }
    for (; j < n; j++) {
        const float s1 = _cvtsh_ss(w->s1[base + j]);
        float c = _cvtsh_ss(w->m1[base + j]);
        for (int p = 0; p < nr; p++) {
            const float sp = _cvtsh_ss(w->rs[p][base + j]);
            c = c - sp;
            tab->r[p][j] = sp + sp;
        }
        tab->s1[j] = s1;
        tab->c[j] = c;
    }
}

/* gf2p8affine matrices (one per qword; result bit i = parity(matrix byte 7-i AND input byte)). */
#define BIT_TO(out, in) ((uint64_t)(1u << (in)) << (8 * (7 - (out))))
#define SIGN_M(v) BIT_TO(0, 2 * (v)), BIT_TO(0, 2 * (v)), BIT_TO(0, 2 * (v) + 1), BIT_TO(0, 2 * (v) + 1)
#define CODE_Q(sh) (BIT_TO(0, sh) | BIT_TO(1, (sh) + 1))
#define CODE_M(sh) CODE_Q(sh), CODE_Q(sh), CODE_Q((sh) + 2), CODE_Q((sh) + 2)
/* vpermb sources of the code bytes: byte j <- code byte 8*((j/4) % 4) + 2*(j % 4) + h */
#define PB4(L, h) 8 * ((L) % 4) + (h), 8 * ((L) % 4) + 2 + (h), 8 * ((L) % 4) + 4 + (h), 8 * ((L) % 4) + 6 + (h)
#define PERM(h) PB4(0, h), PB4(1, h), PB4(2, h), PB4(3, h), PB4(4, h), PB4(5, h), PB4(6, h), PB4(7, h)
typedef struct {
    uint64_t sign_m[4][4], code_m[2][4];
    uint8_t perm[2][32];
} kconst;
static const kconst KC __attribute__((aligned(32))) = {
    .sign_m = {{SIGN_M(0)}, {SIGN_M(1)}, {SIGN_M(2)}, {SIGN_M(3)}},
    .code_m = {{CODE_M(0)}, {CODE_M(4)}},
    .perm = {{PERM(0)}, {PERM(1)}},
};
/* the table's address through an empty asm: the constants stay memory operands instead of being rebuilt in loops */
static inline const kconst *kconst_opaque(void) {
    const kconst *k = &KC;
    __asm__("" : "+r"(k));
    return k;
}
#define LD(p) _mm256_load_si256((const __m256i *)(const void *)(p))

/* The per-lane scale vector: one group for the whole chunk (broadcast), or lane L -> group idx[L]. */
MV_INLINE __m256 svec(int single, const float *p, __m256i idx) {
    return single ? _mm256_broadcast_ss(p) : _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx);
}

MV_INLINE __m256i dot4(const __m256i sub[4], const int8_t *xt) {
    /* two chains of two: vpdpbusd's latency would otherwise serialize the chunk */
    __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), sub[0], _mm256_load_si256((const __m256i *)xt));
    __m256i u = _mm256_dpbusd_epi32(_mm256_setzero_si256(), sub[1], _mm256_load_si256((const __m256i *)(xt + 32)));
    s = _mm256_dpbusd_epi32(s, sub[2], _mm256_load_si256((const __m256i *)(xt + 64)));
    u = _mm256_dpbusd_epi32(u, sub[3], _mm256_load_si256((const __m256i *)(xt + 96)));
    return _mm256_add_epi32(s, u);
}

/* One chunk of one row for TT tokens (xc: the chunk of the first token in xp, xs: bytes between tokens). */
MV_INLINE void chunk_q8(const int TT, const int single, int nr, const uint8_t *codes, const uint8_t *const *signs,
                        size_t soff, const uint8_t *xc, size_t xs, const float *ts1, const float *tc, const float *tr,
                        __m256i idx, __m256 *acc) {
    const kconst *kc = kconst_opaque();
    __m256i sub[4];
    __m256 t[4];
    const __m256i cv = _mm256_loadu_si256((const __m256i *)codes);
    const __m256i pa = _mm256_permutexvar_epi8(LD(kc->perm[0]), cv), pb = _mm256_permutexvar_epi8(LD(kc->perm[1]), cv);
    sub[0] = _mm256_gf2p8affine_epi64_epi8(pa, LD(kc->code_m[0]), 0);
    sub[1] = _mm256_gf2p8affine_epi64_epi8(pa, LD(kc->code_m[1]), 0);
    sub[2] = _mm256_gf2p8affine_epi64_epi8(pb, LD(kc->code_m[0]), 0);
    sub[3] = _mm256_gf2p8affine_epi64_epi8(pb, LD(kc->code_m[1]), 0);
    const __m256 S1 = svec(single, ts1, idx);
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++)
        t[u] = _mm256_mul_ps(_mm256_cvtepi32_ps(dot4(sub, (const int8_t *)(xc + (size_t)u * xs))), S1);
    for (int p = 0; p < nr; p++) {
        const __m256i sv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(signs[p] + soff)));
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++)
            sub[v] = _mm256_gf2p8affine_epi64_epi8(sv, LD(kc->sign_m[v]), 0);
        const __m256 S = svec(single, tr + (size_t)p * TABW, idx);
#pragma GCC unroll 4
        for (int u = 0; u < TT; u++)
            t[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4(sub, (const int8_t *)(xc + (size_t)u * xs))), S, t[u]);
    }
    const __m256 Cv = svec(single, tc, idx);
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) {
        const float *xf = (const float *)(xc + (size_t)u * xs + CHUNK);
        t[u] = _mm256_fmadd_ps(Cv, _mm256_load_ps(xf + 8), t[u]);
        acc[u] = _mm256_fmadd_ps(t[u], _mm256_load_ps(xf), acc[u]);
    }
}

/* Each plane streams sequentially; a software prefetch PF_CHUNKS chunks ahead, issued every 4 chunks (one line of
 * each sign plane, two of codes), as in the AVX2 kernel. */
#define PF_CHUNKS 16
MV_INLINE void prefetch_planes(int nr, const uint8_t *codes, const uint8_t *const *signs, size_t soff) {
    _mm_prefetch((const char *)codes + 32 * PF_CHUNKS, _MM_HINT_T0);
    _mm_prefetch((const char *)codes + 32 * PF_CHUNKS + 64, _MM_HINT_T0);
    for (int p = 0; p < nr; p++) _mm_prefetch((const char *)signs[p] + soff + 16 * PF_CHUNKS, _MM_HINT_T0);
}

/* Row o, tokens t0 .. t0+TT-1. single: g % 128 == 0 (a chunk lies in one group), else g is 32 or 64. */
MV_INLINE void row_q8(const int single, const int TT, const mwq_matrix *w, const mwq_act *a, int64_t o, int t0,
                      float *y, size_t ldy) {
    const int64_t cols = w->cols, g = w->group;
    const int64_t cols_full = cols / CHUNK * CHUNK;
    const int nr = w->k - 1;
    const int64_t seg_w = single ? g * (g < 1024 ? 1024 / g : 1) : 1024;
    const int64_t cpg = single ? g / CHUNK : 1, gpc = single ? 0 : CHUNK / g;
    /* lane L covers block L % 4 of the chunk: its group is 32 * (L % 4) / g */
    const int g32 = (int)(single ? 1 : g / 32);
    const __m256i idx = single ? _mm256_setzero_si256()
                               : _mm256_setr_epi32(0, 1 / g32, 2 / g32, 3 / g32, 0, 1 / g32, 2 / g32, 3 / g32);
    const size_t cb = (size_t)MWQ_XP_CHUNK_BYTES(2);
    const int64_t rw = o * cols;
    seg_tab tab;
    __m256 acc[4];
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) acc[u] = _mm256_setzero_ps();
    const uint8_t *cp = w->codes + (size_t)(rw / 4), *xc = a->xp + (size_t)t0 * a->xp_stride;
    size_t soff = (size_t)(rw / 8);
    int64_t ci = 0;
    for (int64_t s0 = 0; s0 < cols_full; s0 += seg_w) {
        const int64_t s1e = s0 + seg_w < cols_full ? s0 + seg_w : cols_full;
        load_scales(w, o, s0 / g, (int)((s1e - s0 + g - 1) / g), &tab);
        int64_t gl = 0, cig = 0;
        for (int64_t c0 = s0; c0 < s1e; c0 += CHUNK, cp += 32, soff += 16, xc += cb, ci++) {
            if (ci % 4 == 0) prefetch_planes(nr, cp, w->signs, soff);
            chunk_q8(TT, single, nr, cp, w->signs, soff, xc, a->xp_stride, tab.s1 + gl, tab.c + gl, tab.r[0] + gl,
                     idx, acc);
            if (!single) gl += gpc;
            else if (++cig == cpg) cig = 0, gl++;
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < TT; u++) {
        float s = hsum8(acc[u]);
        if (cols_full < cols) s += mwq_dot_q8_scalar(w, o, a->xq + (size_t)(t0 + u) * a->xq_stride, cols_full, cols);
        y[(size_t)(t0 + u) * ldy + (size_t)o] = s;
    }
}

MWQ_DEF_ROWS(MV_FN, q8_one, row_q8, 1)
MWQ_DEF_ROWS(MV_FN, q8_multi, row_q8, 0)

/* mwq.c only hands this kernel (b1, g) with mwq_vnni_ok and the layout-1 xp; anything else is a caller bug, but the
 * scalar kernel still gives the right answer from xq. */
static void matmul_q8(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {
    if (!a->xp || w->base_bits != 2 || !mwq_vnni_ok(w->base_bits, w->group)) {
        mwq_kernels_scalar.matmul_q8(w, a, y, ldy, r0, r1);
        return;
    }
    (w->group % CHUNK == 0 ? q8_one : q8_multi)(w, a, y, ldy, r0, r1);
}

static void matmul_f32(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {
    mwq_kernels_avx2.matmul_f32(w, a, y, ldy, r0, r1);
}

const mwq_kernels mwq_kernels_avx512vnni = {
    .isa = EMOE_ISA_AVX512VNNI,
    .name = "avx512vnni",
    .uses_xp = 1,
    .xp_layout = 1,
    .matmul_q8 = matmul_q8,
    .matmul_f32 = matmul_f32,
};

#else
typedef int emoe_kernels_mwq_avx512_unused; /* ISO C forbids an empty translation unit */
#endif
