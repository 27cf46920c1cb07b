/* MWQ plane fitting for the exporter: the candidate search of export/mwq.py (`_fit_mwq`), in C.
 *
 * export/mwq.py documents the method; this file computes the same fit per (row, group) without NumPy's temporaries:
 * - base candidates: the weighted least-squares base (`_wls_base`: min/max init, `iters` alternations of codes and
 *   the 2x2 weighted least-squares (s1, m1)), and the nested min/max ranges at the spans of `SPANS`;
 * - per base, residual planes with least-squares scales (schedule 0) and with binary-expansion scales s1 / 2^k
 *   (schedule 1); both schedules share the prefix k = 1 and the signs of plane 2;
 * - the pick: the smallest sum over k of the prefix error divided by the best candidate's error at k (first wins);
 * - the chosen candidate's planes refitted with the residual in double precision.
 * Scales are rounded to float16 before the next plane, as the device reconstructs them.
 *
 * The products with the Gram block G_g ([g, g], symmetric, already normalized and damped by the caller) are the
 * cost: they are batched over a block of rows and all candidates ([n, g] @ [g, g]) and run with AVX-512 or AVX2
 * FMA when the CPU has them (a float32 product, as NumPy's BLAS one; the sums over a group are in double here). With
 * G = NULL the metric is the identity (weight-only fitting) and there are no products.
 *
 * Groups are the outer loop so one G block stays in cache for all rows. Rows [row0, row1) only are written, so
 * callers split a matrix across threads without locks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "edgemoe.h"
#include "internal.h"
#include "mwq_fit.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FIT_X86 1
#endif

#define FIT_MAX_PLANES 7 /* planes K = total - base + 1 <= 8 - 2 + 1 */
#define FIT_N_SPANS 5
#define FIT_N_BASES (1 + FIT_N_SPANS)
#define FIT_N_CANDS (2 * FIT_N_BASES)
#define FIT_ROW_BLOCK 16 /* rows fitted together: products of [16 * 12, g] @ [g, g] reuse each G row many times */

static const double SPANS[FIT_N_SPANS] = {1.0, 0.95, 0.9, 0.8, 0.7}; /* = export/mwq.py SPANS */

static double round_f16(double x) { /* float16 rounding, saturating (as mwq.py `_f16`) */
    const double f16_max = 65504.0;
    if (x > f16_max) x = f16_max;
    if (x < -f16_max) x = -f16_max;
    return (double)f16_to_f32(f32_to_f16((float)x));
}

/* ---- Y[n, g] = X[n, g] @ G[g, g] ---- */
static void gemm_scalar(const float *X, int n, const float *G, int g, float *Y) {
    for (int v = 0; v < n; v++) {
        float *y = Y + (size_t)v * g;
        const float *x = X + (size_t)v * g;
        for (int j = 0; j < g; j++) y[j] = 0.0f;
        for (int i = 0; i < g; i++) {
            const float xi = x[i], *gr = G + (size_t)i * g;
            for (int j = 0; j < g; j++) y[j] += xi * gr[j];
        }
    }
}

#ifdef FIT_X86
/* 4 rows of X at a time, 8 (AVX2) or 16 (AVX-512) columns of G: accumulators stay in registers over i */
__attribute__((target("avx2,fma"))) static void gemm_avx2(const float *X, int n, const float *G, int g, float *Y) {
    int v = 0;
    for (; v + 4 <= n; v += 4) {
        const float *x0 = X + (size_t)v * g, *x1 = x0 + g, *x2 = x1 + g, *x3 = x2 + g;
        for (int j = 0; j < g; j += 8) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int i = 0; i < g; i++) {
                __m256 gr = _mm256_loadu_ps(G + (size_t)i * g + j);
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(x0[i]), gr, a0);
                a1 = _mm256_fmadd_ps(_mm256_set1_ps(x1[i]), gr, a1);
                a2 = _mm256_fmadd_ps(_mm256_set1_ps(x2[i]), gr, a2);
                a3 = _mm256_fmadd_ps(_mm256_set1_ps(x3[i]), gr, a3);
            }
            float *y = Y + (size_t)v * g + j;
            _mm256_storeu_ps(y, a0);
            _mm256_storeu_ps(y + g, a1);
            _mm256_storeu_ps(y + 2 * g, a2);
            _mm256_storeu_ps(y + 3 * g, a3);
        }
    }
    if (v < n) gemm_scalar(X + (size_t)v * g, n - v, G, g, Y + (size_t)v * g);
}

__attribute__((target("avx2,fma,avx512f"))) static void gemm_avx512(const float *X, int n, const float *G, int g,
                                                                    float *Y) {
    int v = 0;
    for (; v + 6 <= n; v += 6) {
        const float *x0 = X + (size_t)v * g;
        for (int j = 0; j < g; j += 16) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
            for (int i = 0; i < g; i++) {
                __m512 gr = _mm512_loadu_ps(G + (size_t)i * g + j);
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(x0[i]), gr, a0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(x0[g + i]), gr, a1);
                a2 = _mm512_fmadd_ps(_mm512_set1_ps(x0[2 * g + i]), gr, a2);
                a3 = _mm512_fmadd_ps(_mm512_set1_ps(x0[3 * g + i]), gr, a3);
                a4 = _mm512_fmadd_ps(_mm512_set1_ps(x0[4 * g + i]), gr, a4);
                a5 = _mm512_fmadd_ps(_mm512_set1_ps(x0[5 * g + i]), gr, a5);
            }
            float *y = Y + (size_t)v * g + j;
            _mm512_storeu_ps(y, a0);
            _mm512_storeu_ps(y + g, a1);
            _mm512_storeu_ps(y + 2 * g, a2);
            _mm512_storeu_ps(y + 3 * g, a3);
            _mm512_storeu_ps(y + 4 * g, a4);
            _mm512_storeu_ps(y + 5 * g, a5);
        }
    }
    if (v < n) gemm_avx2(X + (size_t)v * g, n - v, G, g, Y + (size_t)v * g);
}

/* 8 rows of X at a time, 32 columns of G: 16 accumulators, and per step over i 2 loads of G and 8 broadcasts for
 * 16 FMAs (the 6 x 16 tile above: 7 loads for 6 FMAs, and G streamed from L2 once per 6 rows instead of 8). Every
 * output is the same FMA chain over i = 0..g-1 as in the tiles above, so the results are bit for bit the same. */
#define FIT_ROW8(r)                                                                                                   \
    {                                                                                                                 \
        const __m512 xr = _mm512_set1_ps(x0[(size_t)(r) * g + i]);                                                    \
        a##r##0 = _mm512_fmadd_ps(xr, g0, a##r##0);                                                                   \
        a##r##1 = _mm512_fmadd_ps(xr, g1, a##r##1);                                                                   \
    }
#define FIT_STORE8(r)                                                                                                 \
    {                                                                                                                 \
        _mm512_storeu_ps(Y + (size_t)(v + (r)) * g + j, a##r##0);                                                     \
        _mm512_storeu_ps(Y + (size_t)(v + (r)) * g + j + 16, a##r##1);                                                \
    }
__attribute__((target("avx2,fma,avx512f"))) static void gemm_avx512_wide(const float *X, int n, const float *G,
                                                                         int g, float *Y) {
    int v = 0;
    for (; v + 8 <= n; v += 8) {
        const float *x0 = X + (size_t)v * g;
        for (int j = 0; j < g; j += 32) {
            __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
                   a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00, a60 = a00, a61 = a00, a70 = a00, a71 = a00;
            for (int i = 0; i < g; i++) {
                const __m512 g0 = _mm512_loadu_ps(G + (size_t)i * g + j);
                const __m512 g1 = _mm512_loadu_ps(G + (size_t)i * g + j + 16);
                FIT_ROW8(0) FIT_ROW8(1) FIT_ROW8(2) FIT_ROW8(3) FIT_ROW8(4) FIT_ROW8(5) FIT_ROW8(6) FIT_ROW8(7)
            }
            FIT_STORE8(0) FIT_STORE8(1) FIT_STORE8(2) FIT_STORE8(3) FIT_STORE8(4) FIT_STORE8(5) FIT_STORE8(6)
            FIT_STORE8(7)
        }
    }
    if (v < n) gemm_avx512(X + (size_t)v * g, n - v, G, g, Y + (size_t)v * g);
}
#endif

typedef void (*gemm_fn)(const float *X, int n, const float *G, int g, float *Y);

static gemm_fn pick_gemm(int isa, int g) {
#ifdef FIT_X86
    if (isa == EMOE_ISA_AUTO) isa = emoe_isa_best();
    if (isa == EMOE_ISA_AVX512VNNI && g % 32 == 0 && emoe_isa_supported(isa)) return gemm_avx512_wide;
    if (isa == EMOE_ISA_AVX512VNNI && g % 16 == 0 && emoe_isa_supported(isa)) return gemm_avx512;
    if ((isa == EMOE_ISA_AVX512VNNI || isa == EMOE_ISA_AVX2) && g % 8 == 0 && emoe_isa_supported(EMOE_ISA_AVX2))
        return gemm_avx2;
#else
    (void)isa;
    (void)g;
#endif
    return gemm_scalar;
}

/* ---- the fitting state of one group ---- */
typedef struct {
    int g, L, K, iters;
    const float *G; /* [g, g] or NULL (identity) */
    double *G1;     /* G 1, [g] (all ones for the identity) */
    double c;       /* 1^T G 1 */
    gemm_fn gemm;
    /* scratch for FIT_ROW_BLOCK rows */
    float *X, *Y, *R; /* [rb * cands, g]: product operands, search residuals */
    double *w, *GW, *Rd; /* [rb, g] */
    float *q;            /* [rb * bases, g] codes of each base (small integers, exact; float so loops vectorize) */
    float *wq;           /* [rb, g] the least-squares base's current codes */
    double s1[FIT_ROW_BLOCK * FIT_N_BASES], m1[FIT_ROW_BLOCK * FIT_N_BASES];
    double err[FIT_MAX_PLANES][FIT_ROW_BLOCK * FIT_N_CANDS]; /* prefix errors [k][v * cands + c] */
} fit_state;

/* Y = X G for the first n vectors of X; the identity metric: X itself */
static const float *product(fit_state *st, int n) {
    if (!st->G) return st->X;
    st->gemm(st->X, n, st->G, st->g, st->Y);
    return st->Y;
}

/* sums over a group in double, with 8 partial sums: one serial chain of additions would be latency-bound (g adds of
 * 4 cycles each) and cannot be vectorized without reassociating; these sums are much of the weight-only fit's time */
#if defined(FIT_X86) && defined(__linux__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
/* one copy per ISA, picked at load time (an ifunc): the conversions and products run 4 or 8 doubles wide */
#define FIT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef FIT_CLONES
#define FIT_CLONES
#endif
#define DOT4(name, ta, tb)                                                                                            \
    FIT_CLONES static double name(const ta *a, const tb *b, int n) {                                                  \
        double acc[8] = {0};                                                                                          \
        int i = 0;                                                                                                    \
        for (; i + 8 <= n; i += 8)                                                                                    \
            for (int j = 0; j < 8; j++) acc[j] += (double)a[i + j] * (double)b[i + j]; /* 8 lanes: one vector */     \
        for (; i < n; i++) acc[0] += (double)a[i] * (double)b[i];                                                     \
        return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));                     \
    }
DOT4(dot_dd, double, double)
DOT4(dot_ff, float, float)
DOT4(dot_df, double, float)
DOT4(dot_fd, float, double)

/* clamp(round((w - m) / s), 0, L), round half to even (as NumPy's rint). Clamping to [0, L] first gives the same
 * integers (rounding is monotonic and 0, L are integers), and adding and subtracting 1.5 * 2^52 then rounds without
 * a libm call: a branch-free loop the compiler vectorizes. */
static void codes(const double *w, int g, double s, double m, int L, float *q) {
    const double safe = s > 0 ? s : 1.0, magic = 6755399441055744.0, top = L;
    for (int i = 0; i < g; i++) {
        double x = (w[i] - m) / safe;
        x = x > 0.0 ? x : 0.0;
        x = x < top ? x : top;
        q[i] = (float)((x + magic) - magic); /* IEEE: not folded without -ffast-math; SSE2 doubles */
    }
}

static void load_codes(float *x, const float *q, int g) { memcpy(x, q, sizeof(float) * (size_t)g); }

/* the least-squares base of row v (export/mwq.py `_wls_base`): fills base 0's s1, m1, codes */
static void wls_bases(fit_state *st, int rb, const double *lo, const double *hi) {
    const int g = st->g, L = st->L;
    double wGw[FIT_ROW_BLOCK], oGw[FIT_ROW_BLOCK], s[FIT_ROW_BLOCK], m[FIT_ROW_BLOCK], best[FIT_ROW_BLOCK];
    for (int v = 0; v < rb; v++)
        for (int i = 0; i < g; i++) st->X[(size_t)v * g + i] = (float)st->w[(size_t)v * g + i];
    const float *P = product(st, rb);
    for (int v = 0; v < rb; v++) {
        const double *w = st->w + (size_t)v * g;
        double *GW = st->GW + (size_t)v * g;
        for (int i = 0; i < g; i++) GW[i] = P[(size_t)v * g + i];
        wGw[v] = dot_dd(w, GW, g);
        oGw[v] = dot_dd(st->G1, w, g);
        s[v] = (hi[v] - lo[v]) / L;
        m[v] = lo[v];
        codes(w, g, s[v], m[v], L, st->wq + (size_t)v * g);
    }
    for (int it = 0; it <= st->iters; it++) {
        if (it != 1) { /* pass 1 reads the codes of pass 0, whose product P still holds */
            for (int v = 0; v < rb; v++) load_codes(st->X + (size_t)v * g, st->wq + (size_t)v * g, g);
            P = product(st, rb);
        }
        for (int v = 0; v < rb; v++) {
            const float *q = st->wq + (size_t)v * g;
            const float *Gq = P + (size_t)v * g;
            const double *GW = st->GW + (size_t)v * g;
            const double a = dot_ff(q, Gq, g), b = dot_fd(q, st->G1, g), c = st->c, d = dot_fd(q, GW, g), f = oGw[v];
            if (it > 0) { /* the weighted least-squares (s1, m1) for these codes */
                const double det = a * c - b * b;
                const double ac = a * c > 1e-300 ? a * c : 1e-300;
                if (det > 1e-9 * ac) {
                    const double sn = (c * d - b * f) / det, mn = (a * f - b * d) / det;
                    if (sn > 0) {
                        s[v] = sn;
                        m[v] = mn;
                    }
                }
            }
            /* (w - s q - m)^T G (w - s q - m), expanded */
            const double err = wGw[v] - 2 * (s[v] * d + m[v] * f) + s[v] * s[v] * a + 2 * s[v] * m[v] * b +
                               m[v] * m[v] * c;
            float *bq = st->q + (size_t)(v * FIT_N_BASES) * g;
            if (it == 0 || err < best[v]) {
                best[v] = err;
                st->s1[v * FIT_N_BASES] = s[v];
                st->m1[v * FIT_N_BASES] = m[v];
                memcpy(bq, q, sizeof(float) * (size_t)g);
            }
            if (it > 0 && it < st->iters) codes(st->w + (size_t)v * g, g, s[v], m[v], L, st->wq + (size_t)v * g);
        }
    }
}

static void sign_of(const float *r, float *b, int g) {
    for (int i = 0; i < g; i++) b[i] = r[i] >= 0.0f ? 1.0f : -1.0f;
}

/* every candidate's prefix errors into st->err (export/mwq.py `_search_errors`) */
static void search(fit_state *st, int rb) {
    const int g = st->g, K = st->K, NB = FIT_N_BASES, NC = FIT_N_CANDS;
    for (int v = 0; v < rb; v++)
        for (int b = 0; b < NB; b++) {
            const int vb = v * NB + b;
            const double *w = st->w + (size_t)v * g;
            const float *q = st->q + (size_t)vb * g;
            float *x = st->X + (size_t)vb * g;
            for (int i = 0; i < g; i++) x[i] = (float)w[i] - (float)(st->s1[vb] * q[i] + st->m1[vb]);
        }
    const float *P = product(st, rb * NB);
    for (int vb = 0; vb < rb * NB; vb++) {
        const int v = vb / NB, b = vb % NB;
        const double e1 = dot_ff(st->X + (size_t)vb * g, P + (size_t)vb * g, g);
        st->err[0][v * NC + 2 * b] = st->err[0][v * NC + 2 * b + 1] = e1;
        /* keep R1 in both schedules' slots */
        memcpy(st->R + (size_t)(v * NC + 2 * b) * g, st->X + (size_t)vb * g, sizeof(float) * g);
        memcpy(st->R + (size_t)(v * NC + 2 * b + 1) * g, st->X + (size_t)vb * g, sizeof(float) * g);
    }
    if (K == 1) return;
    /* plane 2: signs of R1 shared by the schedules */
    for (int vb = 0; vb < rb * NB; vb++) sign_of(st->R + (size_t)(vb * 2) * g, st->X + (size_t)vb * g, g);
    P = product(st, rb * NB);
    for (int vb = 0; vb < rb * NB; vb++) {
        const int v = vb / NB;
        const float *B = st->X + (size_t)vb * g, *GB = P + (size_t)vb * g;
        const double bGb = dot_ff(B, GB, g), rGb = dot_ff(st->R + (size_t)(vb * 2) * g, GB, g);
        const double sc[2] = {round_f16(rGb / bGb), round_f16(st->s1[vb] * 0.25)};
        for (int h = 0; h < 2; h++) {
            const int c = vb * 2 + h - v * NC; /* = 2 b + h */
            st->err[1][v * NC + c] = st->err[0][v * NC + c] - 2 * sc[h] * rGb + sc[h] * sc[h] * bGb;
            float *R = st->R + (size_t)(vb * 2 + h) * g;
            const float sf = (float)sc[h];
            for (int i = 0; i < g; i++) R[i] -= sf * B[i];
        }
    }
    for (int k = 3; k <= K; k++) {
        for (int vc = 0; vc < rb * NC; vc++) sign_of(st->R + (size_t)vc * g, st->X + (size_t)vc * g, g);
        P = product(st, rb * NC);
        for (int vc = 0; vc < rb * NC; vc++) {
            const int v = vc / NC, c = vc % NC, b = c / 2, h = c % 2;
            const float *B = st->X + (size_t)vc * g, *GB = P + (size_t)vc * g;
            float *R = st->R + (size_t)vc * g;
            const double bGb = dot_ff(B, GB, g), rGb = dot_ff(R, GB, g);
            const double sc = round_f16(h ? st->s1[v * NB + b] * ldexp(1.0, -k) : rGb / bGb);
            st->err[k - 1][vc] = st->err[k - 2][vc] - 2 * sc * rGb + sc * sc * bGb;
            const float sf = (float)sc;
            for (int i = 0; i < g; i++) R[i] -= sf * B[i];
        }
    }
}

/* the candidate of row v with the smallest sum over k of err_k / best_k (first wins ties) */
static int pick(const fit_state *st, int v) {
    const int K = st->K, NC = st->K > 1 ? FIT_N_CANDS : FIT_N_BASES, stride = FIT_N_CANDS;
    double best[FIT_MAX_PLANES], top = 0.0;
    for (int k = 0; k < K; k++) {
        best[k] = INFINITY;
        for (int c = 0; c < NC; c++) {
            const int cc = K > 1 ? c : 2 * c; /* with one plane, slot 2 b holds base b */
            double e = st->err[k][v * stride + cc];
            if (e < best[k]) best[k] = e < 0 ? 0 : e;
        }
        if (best[k] > top) top = best[k];
    }
    int arg = 0;
    double arg_score = INFINITY;
    for (int c = 0; c < NC; c++) {
        const int cc = K > 1 ? c : 2 * c;
        double score = 0.0;
        for (int k = 0; k < K; k++) {
            double e = st->err[k][v * stride + cc], den = 1e-30 + 1e-12 * top;
            if (best[k] > den) den = best[k];
            score += (e > 0 ? e : 0) / den;
        }
        if (score < arg_score) {
            arg_score = score;
            arg = cc;
        }
    }
    return arg; /* candidate slot 2 b + h */
}

int emoe_mwq_fit(const float *W, int64_t rows, int64_t cols, int64_t row0, int64_t row1, int group,
                 const float *gram, int base_bits, int n_planes, int iters, int isa, float *s1_out, float *m1_out,
                 uint8_t *q_out, float *scales_out, uint8_t *signs_out) {
    if (!W || !s1_out || !m1_out || !q_out || rows <= 0 || cols <= 0 || group <= 0 || cols % group ||
        row0 < 0 || row1 > rows || row0 > row1 || base_bits < 1 || base_bits > 8 || n_planes < 1 ||
        n_planes > FIT_MAX_PLANES || iters < 0 || (n_planes > 1 && (!scales_out || !signs_out)))
        return EMOE_ERR_ARG;
    const int g = group, NC = FIT_N_CANDS;
    const int64_t ng = cols / g;
    fit_state st = {.g = g, .L = (1 << base_bits) - 1, .K = n_planes, .iters = iters, .gemm = pick_gemm(isa, g)};
    const size_t nvec = (size_t)FIT_ROW_BLOCK * NC * g;
    st.X = malloc(sizeof(float) * nvec);
    st.Y = malloc(sizeof(float) * nvec);
    st.R = malloc(sizeof(float) * nvec);
    st.w = malloc(sizeof(double) * FIT_ROW_BLOCK * g);
    st.GW = malloc(sizeof(double) * FIT_ROW_BLOCK * g);
    st.Rd = malloc(sizeof(double) * FIT_ROW_BLOCK * g);
    st.G1 = malloc(sizeof(double) * g);
    st.q = malloc(sizeof(float) * FIT_ROW_BLOCK * FIT_N_BASES * g);
    st.wq = malloc(sizeof(float) * FIT_ROW_BLOCK * g);
    int status = EMOE_OK;
    if (!st.X || !st.Y || !st.R || !st.w || !st.GW || !st.Rd || !st.G1 || !st.q || !st.wq) {
        status = EMOE_ERR_NOMEM;
        goto done;
    }
    const double h = 0.5 - ldexp(1.0, -n_planes);
    for (int64_t n = 0; n < ng; n++) {
        st.G = gram ? gram + (size_t)n * g * g : NULL;
        st.c = 0.0;
        for (int i = 0; i < g; i++) {
            double s = 0.0;
            if (st.G)
                for (int j = 0; j < g; j++) s += st.G[(size_t)i * g + j];
            else
                s = 1.0;
            st.G1[i] = s;
            st.c += s;
        }
        for (int64_t r = row0; r < row1; r += FIT_ROW_BLOCK) {
            const int rb = (int)(row1 - r < FIT_ROW_BLOCK ? row1 - r : FIT_ROW_BLOCK);
            double lo[FIT_ROW_BLOCK], hi[FIT_ROW_BLOCK];
            for (int v = 0; v < rb; v++) {
                const float *src = W + (size_t)(r + v) * cols + (size_t)n * g;
                double *w = st.w + (size_t)v * g;
                lo[v] = hi[v] = src[0];
                for (int i = 0; i < g; i++) {
                    w[i] = src[i];
                    if (w[i] < lo[v]) lo[v] = w[i];
                    if (w[i] > hi[v]) hi[v] = w[i];
                }
            }
            wls_bases(&st, rb, lo, hi);
            for (int v = 0; v < rb; v++) {
                const int v0 = v * FIT_N_BASES;
                st.s1[v0] = round_f16(st.s1[v0]);
                st.m1[v0] = round_f16(st.m1[v0]);
                for (int b = 1; b < FIT_N_BASES; b++) { /* nested min/max ranges (`_span_base`) */
                    const double s = SPANS[b - 1] * (hi[v] - lo[v]) / (st.L + 2 * h);
                    const double m = 0.5 * (lo[v] + hi[v]) - s * st.L / 2;
                    st.s1[v0 + b] = round_f16(s);
                    st.m1[v0 + b] = round_f16(m);
                    codes(st.w + (size_t)v * g, g, st.s1[v0 + b], st.m1[v0 + b], st.L,
                          st.q + (size_t)(v0 + b) * g);
                }
            }
            search(&st, rb);
            /* the chosen candidate's planes, residual in double (export/mwq.py `_residual_planes`) */
            int halving[FIT_ROW_BLOCK];
            for (int v = 0; v < rb; v++) {
                const int c = pick(&st, v), vb = v * FIT_N_BASES + c / 2;
                const int64_t row = r + v;
                halving[v] = c % 2;
                const float *q = st.q + (size_t)vb * g;
                const double *w = st.w + (size_t)v * g;
                double *Rd = st.Rd + (size_t)v * g;
                s1_out[row * ng + n] = (float)st.s1[vb];
                m1_out[row * ng + n] = (float)st.m1[vb];
                uint8_t *qo = q_out + (size_t)row * cols + (size_t)n * g;
                for (int i = 0; i < g; i++) qo[i] = (uint8_t)q[i];
                for (int i = 0; i < g; i++) Rd[i] = w[i] - (st.s1[vb] * q[i] + st.m1[vb]);
                st.s1[v] = st.s1[vb]; /* slot v now holds row v's chosen s1 (vb >= v: read before written) */
            }
            for (int k = 2; k <= n_planes; k++) {
                for (int v = 0; v < rb; v++)
                    for (int i = 0; i < g; i++) st.X[(size_t)v * g + i] = st.Rd[(size_t)v * g + i] >= 0 ? 1.0f : -1.0f;
                const float *P = product(&st, rb);
                for (int v = 0; v < rb; v++) {
                    const float *B = st.X + (size_t)v * g, *GB = P + (size_t)v * g;
                    double *Rd = st.Rd + (size_t)v * g;
                    const double bGb = dot_ff(B, GB, g), rGb = dot_df(Rd, GB, g);
                    const double sc = round_f16(halving[v] ? st.s1[v] * ldexp(1.0, -k) : rGb / bGb);
                    const int64_t row = r + v;
                    scales_out[((size_t)(k - 2) * rows + row) * ng + n] = (float)sc;
                    uint8_t *sg = signs_out + ((size_t)(k - 2) * rows + row) * cols + (size_t)n * g;
                    for (int i = 0; i < g; i++) {
                        Rd[i] -= sc * B[i];
                        sg[i] = B[i] > 0;
                    }
                }
            }
        }
    }
done:
    free(st.X);
    free(st.Y);
    free(st.R);
    free(st.w);
    free(st.GW);
    free(st.Rd);
    free(st.G1);
    free(st.q);
    free(st.wq);
    return status;
}
