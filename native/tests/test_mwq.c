/* C-only tests of the MWQ plane kernels and of MWQ experts in the forward pass, on every ISA this CPU runs (natively,
 * under ASan+UBSan, and under qemu-aarch64 with and without dotprod: native/tests/run_aarch64.sh).
 *
 * - every kernel (int8 and f32 activations) at every k, base_bits 2/4/8, group sizes 8..256 (SIMD-handled and
 *   scalar-fallback ones, chunk tails, several groups per chunk), 1..9 tokens: against a double-precision reference
 *   built from the dequantized matrix (the same f32 operations as edgemoe/mwq.py) and, for the int8 path, the same
 *   activation quantization; normalized MSE <= 1e-7, and SIMD vs scalar <= 1e-7;
 * - the integer part bit-exact: with unit scales and activations that quantize to themselves every ISA gives exactly
 *   the scalar result (pins the code/sign bit order of every unpacking path);
 * - decode == prefill and 1 thread == 2 threads, bit for bit;
 * - the table-lookup kernels (mwq_lut.h; base_bits 2, group % 32 == 0): their integer sums equal sum code*x and
 *   sum_{B=+1} x computed directly; every ISA's LUT kernel equals the scalar LUT reference bit for bit at every k,
 *   odd row counts (tile tails), superchunk tails and 1..6 tokens; they differ from the per-plane dot-product kernels
 *   (EMOE_MWQ_NO_LUT) by f32 rounding only (normalized MSE <= 1e-9, measured up to ~2e-11);
 * - a tiny model whose experts are MWQ planes: with f32 activations it matches the same model given the dequantized
 *   experts as f32 matrices (1e-5 relative), decode == prefill with int8 activations, precision checks.
 * Exit status 0 = all passed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgemoe.h"
#include "check.h"
#include "arch.h" /* emoe_config, emoe_model_new: the core's private config */
#include "internal.h"
#include "mwq_lut.h"


static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static uint32_t rnd_u32(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float rnd_f(void) { return (float)((rnd_u32() >> 8) * (1.0 / 16777216.0) * 2.0 - 1.0); }

static double nmse(const float *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += b[i] * b[i];
    }
    return den > 0 ? num / den : num;
}

/* ---- planes ---- */

typedef struct {
    uint8_t *buf; /* all planes, each 64-byte aligned */
    int64_t off[EMOE_MWQ_MAX_PLANES];
    int K, b1, g;
    int64_t rows, cols;
} planes_t;

/* Random planes. unit: s1 = 1, m1 = 0, every s_p = 1 (integer weights, for the exactness test). */
static planes_t make_planes(int64_t rows, int64_t cols, int b1, int g, int K, int unit) {
    planes_t p = {.K = K, .b1 = b1, .g = g, .rows = rows, .cols = cols};
    int64_t tot = 0;
    for (int i = 1; i <= K; i++) {
        p.off[i - 1] = tot;
        tot += (emoe_mwq_plane_bytes(i, b1, g, rows, cols) + 63) / 64 * 64;
    }
    p.buf = malloc((size_t)tot + 64);
    const int64_t n = rows * (cols / g);
    for (int i = 1; i <= K; i++) {
        uint8_t *pl = p.buf + p.off[i - 1];
        const int64_t nb = emoe_mwq_plane_bytes(i, b1, g, rows, cols);
        for (int64_t j = 0; j < nb; j++) pl[j] = (uint8_t)rnd_u32();
        uint16_t *s = (uint16_t *)pl;
        for (int64_t j = 0; j < n; j++) {
            const float s1 = unit ? 1.0f : 0.01f + 0.05f * (rnd_f() + 1.0f);
            if (i == 1) {
                s[j] = f32_to_f16(s1);
                s[n + j] = f32_to_f16(unit ? 0.0f : -s1 * (float)((1 << b1) - 1) * 0.5f + 0.01f * rnd_f());
            } else {
                s[j] = f32_to_f16(unit ? 1.0f : s1 * ldexpf(1.0f, -(i - 1)));
            }
        }
    }
    return p;
}

static unsigned code_at(const planes_t *p, int64_t idx) {
    const uint8_t *codes = p->buf + p->off[0] + 4 * p->rows * (p->cols / p->g);
    const int64_t bit = idx * p->b1;
    return (codes[bit >> 3] >> (bit & 7)) & ((1u << p->b1) - 1u);
}
static int sign_at(const planes_t *p, int plane, int64_t idx) { /* plane >= 2 */
    const uint8_t *signs = p->buf + p->off[plane - 1] + 2 * p->rows * (p->cols / p->g);
    return (signs[idx >> 3] >> (idx & 7)) & 1;
}
/* W_hat_k with edgemoe/mwq.py's f32 operations: s1*q + m1, then += s_p*B_p in plane order. */
static float *dequant(const planes_t *p, int k) {
    const int64_t ng = p->cols / p->g;
    float *w = malloc((size_t)(p->rows * p->cols) * 4);
    const uint16_t *s1 = (const uint16_t *)(p->buf + p->off[0]), *m1 = s1 + p->rows * ng;
    for (int64_t o = 0; o < p->rows; o++)
        for (int64_t i = 0; i < p->cols; i++) {
            const int64_t gi = o * ng + i / p->g, idx = o * p->cols + i;
            float v = f16_to_f32(s1[gi]) * (float)code_at(p, idx) + f16_to_f32(m1[gi]);
            for (int pl = 2; pl <= k; pl++) {
                const float sp = f16_to_f32(((const uint16_t *)(p->buf + p->off[pl - 1]))[gi]);
                v += sign_at(p, pl, idx) ? sp : -sp;
            }
            w[idx] = v;
        }
    return w;
}

/* The activation quantization of the int8 path (per block of 32, the last block may be shorter), dequantized. */
static void quantize_emulated(const float *x, int64_t n, double *out) {
    for (int64_t b = 0; b < n; b += 32) {
        const int64_t e = b + 32 < n ? b + 32 : n;
        float amax = 0.0f;
        for (int64_t i = b; i < e; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int64_t i = b; i < e; i++) out[i] = (double)nearbyintf(x[i] * id) * (double)d;
    }
}

static void reference(const float *w, const float *x, int64_t rows, int64_t cols, int T, int q8, double *y) {
    double *xe = malloc((size_t)cols * sizeof(double));
    for (int t = 0; t < T; t++) {
        if (q8) quantize_emulated(x + t * cols, cols, xe);
        else
            for (int64_t i = 0; i < cols; i++) xe[i] = x[t * cols + i];
        for (int64_t o = 0; o < rows; o++) {
            double s = 0;
            for (int64_t i = 0; i < cols; i++) s += (double)w[o * cols + i] * xe[i];
            y[t * rows + o] = s;
        }
    }
    free(xe);
}

static int run(emoe_pool *pool, int isa, const planes_t *p, int k, int f32_act, const float *x, int T, float *y) {
    return emoe_matmul_mwq(pool, isa, p->buf, p->off, k, p->b1 | (f32_act ? EMOE_MATMUL_F32_ACT : 0), p->g, p->rows,
                           p->cols, x, T, y);
}

/* (b1, g, cols): SIMD with one group per chunk, several groups per chunk, chunk tails, scalar fallback (g = 8 for
 * b1 = 2, g = 96 / 48 where neither of chunk and group divides the other), partial activation blocks. */
static const int cases[][3] = {
    {2, 128, 256}, {2, 128, 384}, {2, 64, 320}, {2, 32, 160}, {2, 16, 144}, {2, 256, 512}, {2, 8, 72},
    {2, 96, 192},  {4, 128, 256}, {4, 64, 192}, {4, 32, 96},  {4, 16, 80},  {4, 8, 40},    {4, 48, 96},
    {8, 128, 256}, {8, 32, 96},   {8, 16, 48},  {8, 8, 24},   {8, 64, 64},  {8, 96, 192},
};

static void test_kernels(int isa, emoe_pool *pool) {
    static const int toks[] = {1, 2, 3, 4, 5, 9};
    double worst_ref = 0, worst_simd = 0;
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        const int b1 = cases[ci][0], g = cases[ci][1];
        const int64_t cols = cases[ci][2], rows = 1 + (int64_t)(rnd_u32() % 40);
        const int K = b1 == 8 ? 3 : 9 - b1 > EMOE_MWQ_MAX_PLANES ? EMOE_MWQ_MAX_PLANES : 9 - b1;
        planes_t p = make_planes(rows, cols, b1, g, K, 0);
        for (int k = 1; k <= K; k++) {
            float *w = dequant(&p, k);
            for (size_t ti = 0; ti < sizeof(toks) / sizeof(toks[0]); ti++) {
                if (pool && ti % 2) continue;
                const int T = toks[ti];
                float *x = malloc((size_t)(T * cols) * 4), *y = malloc((size_t)(T * rows) * 4);
                float *ys = malloc((size_t)(T * rows) * 4);
                double *ref = malloc((size_t)(T * rows) * sizeof(double));
                for (int64_t i = 0; i < T * cols; i++) x[i] = 2.0f * rnd_f();
                for (int f32_act = 0; f32_act < 2; f32_act++) {
                    reference(w, x, rows, cols, T, !f32_act, ref);
                    const int st = run(pool, isa, &p, k, f32_act, x, T, y);
                    const int st0 = run(NULL, EMOE_ISA_SCALAR, &p, k, f32_act, x, T, ys);
                    CHECK(st == 0 && st0 == 0, "status %d %d", st, st0);
                    const double eref = nmse(y, ref, T * rows);
                    double *ysd = malloc((size_t)(T * rows) * sizeof(double));
                    for (int64_t i = 0; i < T * rows; i++) ysd[i] = ys[i];
                    const double esimd = nmse(y, ysd, T * rows);
                    free(ysd);
                    worst_ref = eref > worst_ref ? eref : worst_ref;
                    worst_simd = esimd > worst_simd ? esimd : worst_simd;
                    CHECK(eref <= 1e-7 && esimd <= 1e-7,
                          "isa=%s b1=%d g=%d [%lld,%lld] k=%d T=%d f32_act=%d: nmse vs reference %g, vs scalar %g",
                          emoe_isa_name(isa), b1, g, (long long)rows, (long long)cols, k, T, f32_act, eref, esimd);
                    if (T > 1) { /* decode == prefill: token by token gives the same bits */
                        int same = 1;
                        for (int t = 0; t < T; t++) {
                            run(pool, isa, &p, k, f32_act, x + t * cols, 1, ys);
                            same &= !memcmp(ys, y + t * rows, (size_t)rows * 4);
                        }
                        CHECK(same, "decode != prefill isa=%s b1=%d g=%d k=%d T=%d f32_act=%d", emoe_isa_name(isa),
                              b1, g, k, T, f32_act);
                    }
                }
                free(x);
                free(y);
                free(ys);
                free(ref);
            }
            free(w);
        }
        free(p.buf);
    }
    if (!pool) printf("  mwq kernels %-13s worst nmse vs reference %.2g, vs scalar %.2g\n", emoe_isa_name(isa),
                      worst_ref, worst_simd);
}

/* Unit scales and activations that quantize to themselves (integers, every block's max |x| = 127): every f32 step
 * of every kernel is exact, so all ISAs must give exactly the scalar result. */
static void test_integer_exact(int isa) {
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        const int b1 = cases[ci][0], g = cases[ci][1];
        const int64_t cols = cases[ci][2], rows = 7;
        const int K = b1 == 8 ? 2 : 4;
        planes_t p = make_planes(rows, cols, b1, g, K, 1);
        const int T = 3;
        float *x = malloc((size_t)(T * cols) * 4), *y0 = malloc((size_t)(T * rows) * 4);
        float *y1 = malloc((size_t)(T * rows) * 4);
        for (int64_t i = 0; i < T * cols; i++)
            x[i] = (i % cols) % 32 == 0 ? 127.0f : (float)((int)(rnd_u32() % 255) - 127);
        for (int k = 1; k <= K; k++) {
            run(NULL, EMOE_ISA_SCALAR, &p, k, 0, x, T, y0);
            run(NULL, isa, &p, k, 0, x, T, y1);
            CHECK(!memcmp(y0, y1, (size_t)(T * rows) * 4), "integer path not exact isa=%s b1=%d g=%d cols=%lld k=%d",
                  emoe_isa_name(isa), b1, g, (long long)cols, k);
        }
        free(x);
        free(y0);
        free(y1);
        free(p.buf);
    }
}


/* ---- table-lookup kernels ---- */

static int run_nolut(int isa, const planes_t *p, int k, const float *x, int T, float *y) {
    return emoe_matmul_mwq(NULL, isa, p->buf, p->off, k, p->b1 | EMOE_MWQ_NO_LUT, p->g, p->rows, p->cols, x, T, y);
}

/* The integer sums of the tables: iq = sum code*x_q and ik_p = sum_{B_p = +1} x_q per block, against a direct loop. */
static void test_lut_ints(void) {
    const int64_t rows = 5, cols = 256;
    planes_t p = make_planes(rows, cols, 2, 64, 8, 0);
    mwq_matrix w;
    CHECK(mwq_matrix_init(&w, p.buf, p.off, 8, 2, 64, rows, cols) == 0, "matrix");
    block_q8_act xq[8];
    for (int b = 0; b < 8; b++) {
        xq[b].d = 0.5f + (float)b;
        for (int i = 0; i < 32; i++) xq[b].qs[i] = (int8_t)((int)(rnd_u32() % 255) - 127);
        xq[b].qs[b] = -127, xq[b].qs[31 - b] = 127; /* the extremes */
    }
    uint8_t *lut = aligned_alloc(64, mwq_lut_bytes(cols));
    mwq_lut_build(xq, cols, lut);
    int ok = 1;
    for (int64_t o = 0; o < rows; o++)
        for (int64_t b = 0; b < 8; b++) {
            int32_t I[8], iq = 0, ik[8] = {0};
            mwq_lut_block_ints(&w, o, b, lut, I);
            for (int i = 0; i < 32; i++) {
                const int64_t idx = o * cols + 32 * b + i;
                iq += (int32_t)code_at(&p, idx) * xq[b].qs[i];
                for (int pl = 2; pl <= 8; pl++) ik[pl - 1] += sign_at(&p, pl, idx) ? xq[b].qs[i] : 0;
            }
            ok &= I[0] == iq;
            for (int pl = 2; pl <= 8; pl++) ok &= I[pl - 1] == ik[pl - 1];
        }
    CHECK(ok, "LUT integer sums differ from the direct sums");
    free(lut);
    free(p.buf);
}

/* Every ISA's LUT kernels == the scalar LUT reference, bit for bit; close to the per-plane kernels. */
static void test_lut(int isa, emoe_pool *pool) {
    /* (g, cols): superchunk (512 inputs) tails, one block, groups across superchunks, > 16 groups (scale refills) */
    static const int shapes[][2] = {{32, 32}, {32, 96}, {64, 512}, {128, 640}, {96, 1056}, {256, 1536}, {1024, 2048},
                                    {32, 1024}};
    static const int row_counts[] = {1, 7, 16, 17, 33, 50, 19, 24};
    static const int toks[] = {1, 2, 5, 6};
    double worst = 0;
    const int has_lut = mwq_lut_kernels_get(isa) != NULL;
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        const int g = shapes[si][0];
        const int64_t cols = shapes[si][1], rows = row_counts[si];
        planes_t p = make_planes(rows, cols, 2, g, 8, 0);
        for (int k = 1; k <= 8; k++)
            for (size_t ti = 0; ti < sizeof(toks) / sizeof(toks[0]); ti++) {
                const int T = toks[ti];
                float *x = malloc((size_t)(T * cols) * 4), *y = malloc((size_t)(T * rows) * 4);
                float *ys = malloc((size_t)(T * rows) * 4), *yo = malloc((size_t)(T * rows) * 4);
                for (int64_t i = 0; i < T * cols; i++) x[i] = 3.0f * rnd_f();
                const int st = emoe_matmul_mwq(pool, isa, p.buf, p.off, k, 2, g, rows, cols, x, T, y);
                const int st0 = run(NULL, EMOE_ISA_SCALAR, &p, k, 0, x, T, ys);
                const int st1 = run_nolut(isa, &p, k, x, T, yo);
                CHECK(st == 0 && st0 == 0 && st1 == 0, "status %d %d %d", st, st0, st1);
                /* an ISA without LUT kernels runs its per-plane kernels: then only close to the scalar reference */
                CHECK(!has_lut || !memcmp(y, ys, (size_t)(T * rows) * 4),
                      "LUT isa=%s g=%d [%lld,%lld] k=%d T=%d != scalar", emoe_isa_name(isa), g, (long long)rows,
                      (long long)cols, k, T);
                double *yod = malloc((size_t)(T * rows) * sizeof(double));
                for (int64_t i = 0; i < T * rows; i++) yod[i] = has_lut ? yo[i] : ys[i];
                const double e = nmse(y, yod, T * rows);
                worst = e > worst ? e : worst;
                CHECK(e <= 1e-9, "LUT vs per-plane kernels isa=%s g=%d k=%d T=%d: nmse %g", emoe_isa_name(isa), g, k,
                      T, e);
                free(yod);
                free(x);
                free(y);
                free(ys);
                free(yo);
            }
        free(p.buf);
    }
    if (!pool)
        printf("  lut kernels %-13s %s, worst nmse vs the per-plane kernels %.2g\n", emoe_isa_name(isa),
               mwq_lut_kernels_get(isa) ? mwq_lut_kernels_get(isa)->name : "(none: per-plane kernels)", worst);
}

static void test_api_errors(void) {
    planes_t p = make_planes(4, 64, 2, 32, 2, 0);
    float x[64] = {0}, y[4];
    CHECK(emoe_matmul_mwq(NULL, EMOE_ISA_SCALAR, p.buf, p.off, 3, 2, 32, 4, 64, x, 1, y) == 0,
          "k beyond K is not knowable here: reads what it is told");
    CHECK(emoe_matmul_mwq(NULL, EMOE_ISA_SCALAR, p.buf, p.off, 0, 2, 32, 4, 64, x, 1, y) == EMOE_ERR_ARG, "k = 0");
    CHECK(emoe_matmul_mwq(NULL, EMOE_ISA_SCALAR, p.buf, p.off, 1, 3, 32, 4, 64, x, 1, y) == EMOE_ERR_ARG, "b1 = 3");
    CHECK(emoe_matmul_mwq(NULL, EMOE_ISA_SCALAR, p.buf, p.off, 1, 2, 12, 4, 64, x, 1, y) == EMOE_ERR_ARG, "g = 12");
    CHECK(emoe_matmul_mwq(NULL, EMOE_ISA_SCALAR, p.buf, p.off, 1, 2, 48, 4, 64, x, 1, y) == EMOE_ERR_ARG,
          "g does not divide cols");
    CHECK(emoe_matmul_mwq(NULL, EMOE_ISA_SCALAR, NULL, p.off, 1, 2, 32, 4, 64, x, 1, y) == EMOE_ERR_ARG, "NULL");
    CHECK(emoe_mwq_plane_bytes(1, 2, 128, 256, 512) == 256 * 4 * 4 + 256 * 512 / 4, "plane 1 bytes");
    CHECK(emoe_mwq_plane_bytes(2, 2, 128, 256, 512) == 256 * 4 * 2 + 256 * 512 / 8, "plane 2 bytes");
    CHECK(emoe_mwq_plane_bytes(2, 2, 100, 256, 500) == 0, "invalid group");
    free(p.buf);
}

/* ---- a tiny model with MWQ experts ---- */

enum { H = 128, F = 64, V = 40, NE = 4, NL = 2 };

typedef struct {
    char name[96];
    int64_t rows, cols;
    float *f;       /* f32 values (dense tensors; experts: the dequantized W_hat at kq planes) */
    planes_t p;     /* experts */
    int expert;
} tt;

static int build(tt *ts) {
    int n = 0;
#define ADD(r, c, e, ...)                                                                                             \
    do {                                                                                                              \
        snprintf(ts[n].name, sizeof(ts[n].name), __VA_ARGS__);                                                        \
        ts[n].rows = r, ts[n].cols = c, ts[n].expert = e, n++;                                                        \
    } while (0)
    ADD(V, H, 0, "token_embd.weight");
    ADD(1, H, 0, "output_norm.weight");
    ADD(V, H, 0, "output.weight");
    for (int l = 0; l < NL; l++) {
        ADD(1, H, 0, "blk.%d.attn_norm.weight", l);
        ADD(1, H, 0, "blk.%d.ffn_norm.weight", l);
        ADD(64, H, 0, "blk.%d.attn_q.weight", l);
        ADD(32, H, 0, "blk.%d.attn_k.weight", l);
        ADD(32, H, 0, "blk.%d.attn_v.weight", l);
        ADD(H, 64, 0, "blk.%d.attn_output.weight", l);
        ADD(NE, H, 0, "blk.%d.ffn_gate_inp.weight", l);
        for (int e = 0; e < NE; e++) {
            ADD(F, H, 1, "blk.%d.expert.%d.ffn_gate.weight", l, e);
            ADD(F, H, 1, "blk.%d.expert.%d.ffn_up.weight", l, e);
            ADD(H, F, 1, "blk.%d.expert.%d.ffn_down.weight", l, e);
        }
    }
#undef ADD
    return n;
}

static emoe_model *tiny_model(int isa, int threads, const tt *ts, int n, int mwq, int q8_f32_act) {
    emoe_config c = {.n_group = 1, .topk_group = 1, .routed_scaling = 1.0f,
                     .n_layers = NL, .hidden = H, .vocab = V, .n_heads = 4, .n_kv_heads = 2, .head_dim = 16,
                     .n_experts = NE, .top_k = 2, .expert_ffn = F, .norm_eps = 1e-6f, .rope_kind = EMOE_ROPE_NEOX,
                     .rope_theta = 10000.0f, .router_fn = EMOE_ROUTER_SOFTMAX, .norm_topk = 1,
                     .activation = EMOE_ACT_SWIGLU};
    emoe_model *m = emoe_model_new(&c, 80, 0, threads);
    CHECK(m && emoe_model_status(m) == 0, "model_new");
    emoe_model_set_isa(m, isa);
    emoe_model_set_q8_f32_act(m, q8_f32_act);
    for (int i = 0; i < n; i++) {
        int st;
        if (ts[i].expert && mwq)
            st = emoe_model_set_expert_mwq(m, ts[i].name, ts[i].p.buf, ts[i].p.off, ts[i].p.K, ts[i].p.b1, ts[i].p.g,
                                           ts[i].rows, ts[i].cols);
        else
            st = emoe_model_set_tensor(m, ts[i].name, EMOE_F32, ts[i].f, ts[i].rows, ts[i].cols);
        CHECK(st == 0, "set %s: %s", ts[i].name, emoe_model_last_error(m));
    }
    return m;
}

static void test_model(int isa) {
    tt ts[64];
    const int n = build(ts);
    /* experts: b1 = 2, g = 64 (gate/up: 2 chunks of 64-input groups; down: cols 64 = a chunk tail), K = 4 */
    for (int i = 0; i < n; i++) {
        const int64_t cnt = ts[i].rows * ts[i].cols;
        ts[i].f = malloc((size_t)cnt * 4);
        if (ts[i].expert) {
            ts[i].p = make_planes(ts[i].rows, ts[i].cols, 2, ts[i].cols == H ? 64 : 32, 4, 0);
            continue;
        }
        const float sc = ts[i].rows == 1 ? 0.2f : 1.5f / sqrtf((float)ts[i].cols);
        for (int64_t j = 0; j < cnt; j++) ts[i].f[j] = sc * rnd_f() + (ts[i].rows == 1 ? 1.0f : 0.0f);
    }
    const int T = 70;
    int32_t tok[70];
    for (int t = 0; t < T; t++) tok[t] = (int32_t)(rnd_u32() % V);
    float *a = malloc((size_t)T * V * 4), *b = malloc((size_t)T * V * 4), *d = malloc(V * 4);
    for (int k = 1; k <= 4; k++) {
        for (int i = 0; i < n; i++)
            if (ts[i].expert) {
                free(ts[i].f);
                ts[i].f = dequant(&ts[i].p, k);
            }
        /* f32 activations: MWQ experts == the same model with W_hat_k as f32 matrices */
        emoe_model *mq = tiny_model(isa, 2, ts, n, 1, 1), *mf = tiny_model(isa, 2, ts, n, 0, 1);
        CHECK(emoe_model_set_precision(mq, k) == 0, "set_precision %d: %s", k, emoe_model_last_error(mq));
        CHECK(emoe_model_precision(mq) == k, "precision");
        CHECK(emoe_forward(mq, tok, T, a, 1) == 0 && emoe_forward(mf, tok, T, b, 1) == 0, "forward: %s",
              emoe_model_last_error(mq));
        double worst = 0, scale = 0;
        for (int i = 0; i < T * V; i++) {
            worst = fabs((double)a[i] - b[i]) > worst ? fabs((double)a[i] - b[i]) : worst;
            scale = fabs(b[i]) > scale ? fabs(b[i]) : scale;
        }
        CHECK(scale > 0 && worst <= 1e-5 * scale, "isa=%s k=%d: MWQ experts vs f32 W_hat: %g (scale %g)",
              emoe_isa_name(isa), k, worst, scale);
        emoe_model_free(mf);
        emoe_model_free(mq);
        /* int8 activations: decode == prefill, any thread count */
        mq = tiny_model(isa, 1 + k % 2, ts, n, 1, 0);
        emoe_model_set_precision(mq, k);
        CHECK(emoe_forward(mq, tok, T, a, 1) == 0, "forward q8: %s", emoe_model_last_error(mq));
        emoe_model_reset(mq);
        int same = 1;
        for (int t = 0; t < T; t++) {
            emoe_forward(mq, tok + t, 1, d, 0);
            same &= !memcmp(d, a + t * V, V * 4);
        }
        CHECK(same, "isa=%s k=%d: MWQ decode != prefill", emoe_isa_name(isa), k);
        /* int8 activations move the logits a little (a few 1e-3 relative per matmul; a routing near-tie can flip one
         * token's expert in this random model, so only a loose bound on the whole sequence) */
        double e2 = 0, s2 = 0;
        for (int i = 0; i < T * V; i++) e2 += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), s2 += (double)b[i] * b[i];
        CHECK(e2 <= 1e-2 * s2, "isa=%s k=%d: int8 activations vs f32: relative MSE %g", emoe_isa_name(isa), k, e2 / s2);
        emoe_model_free(mq);
    }
    /* precision and registration errors */
    emoe_model *m = tiny_model(isa, 1, ts, n, 1, 0);
    CHECK(emoe_model_set_precision(m, 5) == EMOE_ERR_ARG && strstr(emoe_model_last_error(m), "stores only 4"),
          "precision above the stored planes: %s", emoe_model_last_error(m));
    CHECK(emoe_model_set_precision(m, -1) == EMOE_ERR_ARG, "negative precision");
    CHECK(emoe_model_set_precision(m, 0) == 0 && emoe_model_ready(m) == 0, "precision 0 = all");
    int ie = 0;
    while (!ts[ie].expert) ie++;
    const planes_t *p0 = &ts[ie].p; /* an expert: gate [F, H] */
    CHECK(emoe_model_set_expert_mwq(m, "blk.0.attn_q.weight", p0->buf, p0->off, 4, 2, 64, 64, H) == EMOE_ERR_ARG &&
              strstr(emoe_model_last_error(m), "only expert"),
          "MWQ on a dense tensor");
    CHECK(emoe_model_set_expert_mwq(m, ts[ie].name, p0->buf, p0->off, 4, 3, 64, F, H) == EMOE_ERR_ARG, "b1 = 3");
    CHECK(emoe_model_set_expert_mwq(m, ts[ie].name, p0->buf, p0->off, 4, 2, 60, F, H) == EMOE_ERR_ARG, "g = 60");
    CHECK(emoe_model_set_expert_mwq(m, ts[ie].name, p0->buf, p0->off, 9, 2, 64, F, H) == EMOE_ERR_ARG, "K = 9");
    CHECK(emoe_model_set_expert_mwq(m, ts[ie].name, p0->buf, p0->off, 4, 2, 64, F, 64) == EMOE_ERR_ARG, "shape");
    /* an expert re-registered with fewer planes than the precision: reported by ready / forward */
    CHECK(emoe_model_set_precision(m, 4) == 0, "precision 4");
    CHECK(emoe_model_set_expert_mwq(m, ts[ie].name, p0->buf, p0->off, 2, 2, 64, F, H) == 0, "re-register");
    CHECK(emoe_forward(m, tok, 1, d, 0) == EMOE_ERR_ARG && strstr(emoe_model_last_error(m), ts[ie].name),
          "forward names the short expert: %s", emoe_model_last_error(m));
    emoe_model_free(m);
    for (int i = 0; i < n; i++) free(ts[i].f), free(ts[i].expert ? ts[i].p.buf : NULL);
    free(a);
    free(b);
    free(d);
}

int main(void) {
    printf("edgemoe %s mwq tests, best isa: %s\n", emoe_version(), emoe_isa_name(emoe_isa_best()));
    test_api_errors();
    test_lut_ints();
    emoe_pool *pool = emoe_pool_new(2);
    for (int isa = 0; isa < EMOE_ISA_COUNT; isa++) {
        if (!emoe_isa_supported(isa)) {
            printf("skip isa %s (not supported here)\n", emoe_isa_name(isa));
            continue;
        }
        const int before = n_fail;
        test_kernels(isa, NULL);
        test_kernels(isa, pool);
        test_integer_exact(isa);
        test_lut(isa, NULL);
        test_lut(isa, pool);
        test_model(isa);
        printf("mwq isa %-13s %s\n", emoe_isa_name(isa), n_fail == before ? "ok" : "FAILED");
    }
    emoe_pool_free(pool);
    printf("%d checks, %d failures\n", n_check, n_fail);
    return n_fail ? 1 : 0;
}
