/* C-only tests of the core (no Python): every SIMD kernel against the scalar reference, the thread pool, CRC-32,
 * the Q8_0 quantizer, and a tiny model through the public API (decode == prefill, error paths).
 * Runs natively, under ASan+UBSan (-DEDGEMOE_SANITIZE=ON) and under qemu-aarch64 (native/tests/run_aarch64.sh).
 * Exit status 0 = all passed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgemoe.h"
#include "check.h"
#include "arch.h" /* emoe_config, emoe_model_new: the core's private config */
#include "internal.h"
#include "crc32.h"


static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd_u32(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float rnd_f(void) { return (float)((rnd_u32() >> 8) * (1.0 / 16777216.0) * 2.0 - 1.0); }
static void fill(float *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = rnd_f() * scale;
}

/* normalized MSE: sum (a-b)^2 / sum b^2 (test-backend-ops style) */
static double nmse(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return den > 0 ? num / den : num;
}

static void *make_weights(int wtype, const float *wf, int64_t rows, int64_t cols) {
    const size_t rb = emoe_row_bytes(wtype, cols);
    void *w = malloc(rb * (size_t)rows + 1);
    if (wtype == EMOE_F32) memcpy(w, wf, (size_t)(rows * cols) * 4);
    else if (wtype == EMOE_F16) emoe_f32_to_f16(wf, w, rows * cols);
    else emoe_quantize_q8_0(wf, w, rows * cols);
    return w;
}

static void test_matmul_vs_scalar(int isa, emoe_pool *pool) { /* with a pool: every third case (the same kernels) */
    static const int64_t shapes[][2] = {{1, 32},   {3, 64},   {4, 96},   {7, 128}, {17, 256},
                                        {33, 160}, {64, 512}, {5, 2048}, {9, 1024}};
    static const int toks[] = {1, 2, 3, 4, 5, 7, 8, 9, 13};
    for (int wtype = 0; wtype < 4; wtype++) /* 3 = Q8_0 with f32 activations */
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
            for (size_t ti = 0; ti < sizeof(toks) / sizeof(toks[0]); ti++) {
                if (pool && (si + ti) % 3) continue;
                int64_t rows = shapes[si][0], cols = shapes[si][1];
                if (wtype < EMOE_Q8_0 && ti % 2) cols += 3; /* odd widths exercise the float tails */
                const int wt = wtype == 3 ? EMOE_Q8_0 : wtype;
                const int api_wtype = wtype == 3 ? EMOE_Q8_0 | EMOE_MATMUL_F32_ACT : wtype;
                const int T = toks[ti];
                float *wf = malloc((size_t)(rows * cols) * 4), *x = malloc((size_t)(T * cols) * 4);
                float *y0 = malloc((size_t)(T * rows) * 4), *y1 = malloc((size_t)(T * rows) * 4);
                fill(wf, rows * cols, 1.0f);
                fill(x, T * cols, 2.0f);
                void *w = make_weights(wt, wf, rows, cols);
                int st0 = emoe_matmul(NULL, EMOE_ISA_SCALAR, api_wtype, w, rows, cols, x, T, y0);
                int st1 = emoe_matmul(pool, isa, api_wtype, w, rows, cols, x, T, y1);
                CHECK(st0 == 0 && st1 == 0, "matmul status %d %d", st0, st1);
                double e = nmse(y1, y0, T * rows);
                CHECK(e <= 1e-7, "matmul isa=%s wtype=%d rows=%lld cols=%lld T=%d nmse=%g", emoe_isa_name(isa), wtype,
                      (long long)rows, (long long)cols, T, e);
                free(w);
                free(wf);
                free(x);
                free(y0);
                free(y1);
            }
}

/* With every scale 1, a Q8_0 matmul sums integer products only: |sum| < 2^24 keeps every f32 step exact, so any
 * accumulation order must give exactly the scalar result. This pins the integer dot products bit for bit. */
static void test_q8_integer_exact(int isa) {
    const int64_t rows = 13, cols = 1024; /* 1024 * 127 * 128 < 2^24 */
    const int T = 6;
    block_q8_0 *w = malloc(sizeof(block_q8_0) * (size_t)(rows * cols / QK));
    float *x = malloc((size_t)(T * cols) * 4);
    float *y0 = malloc((size_t)(T * rows) * 4), *y1 = malloc((size_t)(T * rows) * 4);
    for (int64_t b = 0; b < rows * cols / QK; b++) {
        w[b].d = 0x3C00; /* 1.0 */
        for (int j = 0; j < QK; j++) w[b].qs[j] = (int8_t)((int)(rnd_u32() % 256) - 128); /* includes -128 */
    }
    /* activations whose quantization is the identity: each block has max |x| = 127, integers, so d = 1 */
    for (int t = 0; t < T; t++)
        for (int64_t i = 0; i < cols; i++)
            x[t * cols + i] = (i % QK == 0) ? 127.0f : (float)((int)(rnd_u32() % 255) - 127);
    emoe_matmul(NULL, EMOE_ISA_SCALAR, EMOE_Q8_0, w, rows, cols, x, T, y0);
    for (int tt = 1; tt <= T; tt++) {
        emoe_matmul(NULL, isa, EMOE_Q8_0, w, rows, cols, x, tt, y1);
        int same = 1;
        for (int t = 0; t < tt; t++)
            for (int64_t o = 0; o < rows; o++) same &= y1[t * rows + o] == y0[t * rows + o];
        CHECK(same, "q8_0 integer accumulation not exact isa=%s T=%d", emoe_isa_name(isa), tt);
    }
    free(w);
    free(x);
    free(y0);
    free(y1);
}

static void test_quantize_act(int isa) {
    const int64_t n = 32 * 64;
    float *x = malloc((size_t)n * 4);
    fill(x, n, 3.0f);
    for (int j = 0; j < 32; j++) x[32 + j] = 0.0f;                 /* an all-zero block */
    for (int j = 0; j < 32; j++) x[64 + j] = (float)(j - 16) * 0.5f; /* exact ties at x/d = k + 0.5 */
    x[64] = 127.0f * 0.5f;
    const size_t qbytes = sizeof(block_q8_act) * (size_t)(n / 32);
    block_q8_act *a = malloc(qbytes), *b = malloc(qbytes);
    emoe_quantize_act(EMOE_ISA_SCALAR, x, a, n);
    emoe_quantize_act(isa, x, b, n);
    CHECK(!memcmp(a, b, qbytes), "quantize_act isa=%s differs from scalar", emoe_isa_name(isa));
    int ok = 1;
    for (int64_t i = 0; i < n; i++) {
        const float err = fabsf(a[i / 32].qs[i % 32] * a[i / 32].d - x[i]);
        ok &= err <= 0.5f * a[i / 32].d * 1.0001f && a[i / 32].qs[i % 32] != -128;
    }
    CHECK(ok, "quantize_act error exceeds d/2");
    free(x);
    free(a);
    free(b);
}

static void test_f16(int isa) {
    /* every half -> f32, against the scalar conversion (NaN payloads compared as NaN) */
    uint16_t *h = malloc(65536 * 2);
    float *f0 = malloc(65536 * 4), *f1 = malloc(65536 * 4);
    for (int i = 0; i < 65536; i++) h[i] = (uint16_t)i;
    emoe_convert_f16(EMOE_ISA_SCALAR, 0, h, f0, 65536);
    emoe_convert_f16(isa, 0, h, f1, 65536);
    int ok = 1;
    for (int i = 0; i < 65536; i++) ok &= (isnan(f0[i]) && isnan(f1[i])) || !memcmp(&f0[i], &f1[i], 4);
    CHECK(ok, "f16->f32 isa=%s differs", emoe_isa_name(isa));
    /* f32 -> half: random values over the whole half range, subnormals, ties, overflow */
    const int n = 65536;
    float *x = malloc((size_t)n * 4);
    uint16_t *a = malloc((size_t)n * 2), *b = malloc((size_t)n * 2);
    for (int i = 0; i < n; i++) {
        const uint32_t r = rnd_u32();
        x[i] = fp32_from_bits((r & 0x80000000u) | (0x33000000u + (r % (0x47800000u - 0x33000000u))));
    }
    for (int i = 0; i < 1024; i++) x[i] = f16_to_f32((uint16_t)i) + f16_to_f32(1) * 0.5f; /* subnormal ties */
    x[1024] = 65519.0f, x[1025] = 65520.0f, x[1026] = -1e9f, x[1027] = 0.0f;
    emoe_convert_f16(EMOE_ISA_SCALAR, 1, x, a, n);
    emoe_convert_f16(isa, 1, x, b, n);
    CHECK(!memcmp(a, b, (size_t)n * 2), "f32->f16 isa=%s differs", emoe_isa_name(isa));
    /* round trip of every finite half through the scalar code */
    ok = 1;
    for (int i = 0; i < 65536; i++)
        if (!isnan(f0[i])) ok &= f32_to_f16(f0[i]) == (uint16_t)i;
    CHECK(ok, "f16 round trip");
    CHECK(f32_to_f16(65519.0f) == 0x7BFF && f32_to_f16(65520.0f) == 0x7C00 && f32_to_f16(1.0f) == 0x3C00,
          "f16 rounding edge cases");
    free(h);
    free(f0);
    free(f1);
    free(x);
    free(a);
    free(b);
}

static void test_axpy(int isa) {
    const int n = 131;
    float *x = malloc(n * 4), *y0 = malloc(n * 4), *y1 = malloc(n * 4);
    uint16_t *xh = malloc(n * 2);
    fill(x, n, 1.0f);
    emoe_f32_to_f16(x, xh, n);
    for (int xtype = 0; xtype < 2; xtype++) {
        fill(y0, n, 1.0f);
        memcpy(y1, y0, n * 4);
        emoe_axpy(EMOE_ISA_SCALAR, xtype, 0.37f, xtype ? (void *)xh : (void *)x, y0, n);
        emoe_axpy(isa, xtype, 0.37f, xtype ? (void *)xh : (void *)x, y1, n);
        CHECK(nmse(y1, y0, n) <= 1e-7, "axpy isa=%s xtype=%d", emoe_isa_name(isa), xtype);
    }
    free(x);
    free(y0);
    free(y1);
    free(xh);
}

static void test_pool_threads(void) {
    /* the threaded matmul runs the same kernel on the same rows: bit-identical to one thread */
    const int64_t rows = 301, cols = 256;
    const int T = 5;
    float *wf = malloc((size_t)(rows * cols) * 4), *x = malloc((size_t)(T * cols) * 4);
    float *y0 = malloc((size_t)(T * rows) * 4), *y1 = malloc((size_t)(T * rows) * 4);
    fill(wf, rows * cols, 1.0f);
    fill(x, T * cols, 1.0f);
    for (int nt = 2; nt <= 4; nt++) {
        emoe_pool *pool = emoe_pool_new(nt);
        CHECK(pool && emoe_pool_threads(pool) == nt, "pool_new(%d)", nt);
        for (int wtype = 0; wtype < 3; wtype++) {
            void *w = make_weights(wtype, wf, rows, cols);
            for (int rep = 0; rep < 50; rep++) { /* many back-to-back jobs: wakeup / completion races */
                const int tt = rep % 2 ? 1 : T; /* decode and prefill tiles may sum in different orders */
                emoe_matmul(NULL, EMOE_ISA_AUTO, wtype, w, rows, cols, x, tt, y0);
                memset(y1, 0, (size_t)(T * rows) * 4);
                emoe_matmul(pool, EMOE_ISA_AUTO, wtype, w, rows, cols, x, tt, y1);
                CHECK(!memcmp(y0, y1, (size_t)(tt * rows) * 4), "threads=%d wtype=%d rep=%d", nt, wtype, rep);
            }
            free(w);
        }
        emoe_pool_free(pool);
    }
    free(wf);
    free(x);
    free(y0);
    free(y1);
}

typedef struct {
    int hits[64];
    int job;
} stress_ctx;
static void stress_task(void *arg, int task, int thread) {
    stress_ctx *c = arg;
    (void)thread;
    c->hits[task] += 1 + c->job; /* each task must run exactly once per job */
}
static void test_pool_stress(void) {
    /* more threads than cores, thousands of tiny jobs: every task of every job runs exactly once */
    for (int nt = 2; nt <= 6; nt += 4) {
        emoe_pool *pool = emoe_pool_new(nt);
        stress_ctx c;
        int bad = 0;
        for (int job = 0; job < 3000; job++) {
            const int n = 1 + (int)(rnd_u32() % 64);
            memset(&c, 0, sizeof(c));
            c.job = job;
            pool_run(pool, stress_task, &c, n);
            for (int t = 0; t < 64; t++) bad += c.hits[t] != (t < n ? 1 + job : 0);
        }
        CHECK(bad == 0, "pool stress threads=%d: %d wrong task counts", nt, bad);
        emoe_pool_free(pool);
    }
}

/* every folding level this CPU has, against the byte table: lengths around each path's block sizes (16, 64, 256),
 * every alignment, a nonzero starting CRC, and one long buffer */
static void test_crc_fold(void) {
    enum { N = 1 << 17 };
    unsigned char *buf = malloc(N);
    for (int i = 0; i < N; i++) buf[i] = (unsigned char)(rnd_u32() >> 7);
    const int top = emoe_crc32_fold_level();
    printf("crc32 folding level here: %d\n", top);
    for (int level = 0; level <= top; level++) {
        int bad = 0, n = 0;
        for (size_t len = 0; len < 1100; len += len < 300 ? 1 : 37)
            for (size_t off = 0; off < 64; off += 1 + (off > 8) * 13, n++) {
                const uint32_t seed = (len + off) % 3 ? 0 : rnd_u32();
                bad += emoe_crc32_fold(level, seed, buf + off, len) != emoe_crc32(seed, buf + off, len);
            }
        bad += emoe_crc32_fold(level, 7, buf + 3, N - 3) != emoe_crc32(7, buf + 3, N - 3);
        CHECK(!bad, "crc32 folding level %d: %d of %d lengths/offsets differ from the byte table", level, bad, n + 1);
        CHECK(emoe_crc32_fold(level, 0, "123456789", 9) == 0xCBF43926u, "crc32 level %d check value", level);
    }
    CHECK(emoe_crc32_fast(0, buf, N) == emoe_crc32(0, buf, N) && emoe_crc32_fast_level() == top,
          "crc32_fast takes the best level");
    free(buf);
}

static void test_crc_and_quant(void) {
    test_crc_fold();
    CHECK(emoe_crc32(0, "123456789", 9) == 0xCBF43926u, "crc32 check value");
    CHECK(emoe_crc32(emoe_crc32(0, "1234", 4), "56789", 5) == 0xCBF43926u, "crc32 continuation");
    CHECK(emoe_crc32(0, "", 0) == 0, "crc32 empty");
    float x[64], y[64];
    fill(x, 64, 5.0f);
    block_q8_0 q[2];
    CHECK(emoe_quantize_q8_0(x, q, 64) == 0 && emoe_dequantize_q8_0(q, y, 64) == 0, "q8_0 quantize status");
    int ok = 1;
    for (int i = 0; i < 64; i++) ok &= fabsf(x[i] - y[i]) <= 5.0f / 127.0f * 0.51f + 1e-3f;
    CHECK(ok, "q8_0 round trip error");
    CHECK(emoe_quantize_q8_0(x, q, 33) == EMOE_ERR_ARG, "q8_0 needs n %% 32 == 0");
}

/* ---- a tiny model through the public API ---- */

typedef struct {
    char name[96];
    float *data;
    void *conv;
    int64_t rows, cols;
} tiny_tensor;

static int tiny_model_test(int isa, int wtype, int kv_f16, int n_threads, int q8_f32_act) {
    const int32_t dense[] = {1}, nope[] = {2}, swa[] = {0};
    emoe_config c = {.n_group = 1, .topk_group = 1, .routed_scaling = 1.0f,
                     .n_layers = 3, .hidden = 64, .vocab = 50, .n_heads = 4, .n_kv_heads = 2, .head_dim = 16,
                     .n_experts = 4, .top_k = 2, .expert_ffn = 32, .norm_eps = 1e-6f, .rope_kind = EMOE_ROPE_NEOX,
                     .rope_theta = 10000.0f, .rope_dim = 8, .qkv_bias = 1, .qk_norm = EMOE_QK_NORM_HEAD,
                     .router_fn = EMOE_ROUTER_SOFTMAX, .norm_topk = 1, .router_input = EMOE_ROUTER_IN_FFN_NORM,
                     .activation = EMOE_ACT_SWIGLU, .shared_ffn = 32, .shared_gate = 1, .dense_ffn = 64,
                     .sliding_window = 3, .tie_embeddings = 1, .n_dense_layers = 1, .n_nope_layers = 1,
                     .n_swa_layers = 1, .dense_layers = dense, .nope_layers = nope, .swa_layers = swa};
    const int max_ctx = 80; /* > EMOE_BLOCK so prefill runs two blocks */
    emoe_model *m = emoe_model_new(&c, max_ctx, kv_f16, n_threads);
    CHECK(m && emoe_model_status(m) == 0, "model_new: %s", m ? emoe_model_last_error(m) : "NULL");
    if (!m) return 1;
    CHECK(emoe_model_set_isa(m, isa) == 0, "set_isa");
    emoe_model_set_q8_f32_act(m, q8_f32_act);
    /* build the list of names from the same rules as arch.py */
    tiny_tensor ts[128];
    int nt = 0;
#define ADD(nm, r, cc)                                                                                                \
    do {                                                                                                              \
        snprintf(ts[nt].name, sizeof(ts[nt].name), "%s", nm);                                                         \
        ts[nt].rows = r, ts[nt].cols = cc, nt++;                                                                      \
    } while (0)
    char nm[96];
    ADD("token_embd.weight", 50, 64);
    ADD("output_norm.weight", 1, 64);
    for (int l = 0; l < 3; l++) {
        const char *sfx1[] = {"attn_norm.weight", "ffn_norm.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias",
                              "attn_q_norm.weight", "attn_k_norm.weight"};
        const int64_t len1[] = {64, 64, 64, 32, 32, 16, 16};
        for (int i = 0; i < 7; i++) {
            snprintf(nm, sizeof nm, "blk.%d.%s", l, sfx1[i]);
            ADD(nm, 1, len1[i]);
        }
        const char *sfx2[] = {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"};
        const int64_t r2[] = {64, 32, 32, 64}, c2[] = {64, 64, 64, 64};
        for (int i = 0; i < 4; i++) {
            snprintf(nm, sizeof nm, "blk.%d.%s", l, sfx2[i]);
            ADD(nm, r2[i], c2[i]);
        }
        if (l == 1) {
            snprintf(nm, sizeof nm, "blk.%d.ffn_gate.weight", l); ADD(nm, 64, 64);
            snprintf(nm, sizeof nm, "blk.%d.ffn_up.weight", l); ADD(nm, 64, 64);
            snprintf(nm, sizeof nm, "blk.%d.ffn_down.weight", l); ADD(nm, 64, 64);
            continue;
        }
        snprintf(nm, sizeof nm, "blk.%d.ffn_gate_inp.weight", l); ADD(nm, 4, 64);
        snprintf(nm, sizeof nm, "blk.%d.ffn_gate_shexp.weight", l); ADD(nm, 32, 64);
        snprintf(nm, sizeof nm, "blk.%d.ffn_up_shexp.weight", l); ADD(nm, 32, 64);
        snprintf(nm, sizeof nm, "blk.%d.ffn_down_shexp.weight", l); ADD(nm, 64, 32);
        snprintf(nm, sizeof nm, "blk.%d.ffn_gate_inp_shexp.weight", l); ADD(nm, 1, 64);
        for (int e = 0; e < 4; e++) {
            snprintf(nm, sizeof nm, "blk.%d.expert.%d.ffn_gate.weight", l, e); ADD(nm, 32, 64);
            snprintf(nm, sizeof nm, "blk.%d.expert.%d.ffn_up.weight", l, e); ADD(nm, 32, 64);
            snprintf(nm, sizeof nm, "blk.%d.expert.%d.ffn_down.weight", l, e); ADD(nm, 64, 32);
        }
    }
#undef ADD
    for (int i = 0; i < nt; i++) {
        const int one_d = ts[i].rows == 1;
        ts[i].data = malloc((size_t)(ts[i].rows * ts[i].cols) * 4);
        fill(ts[i].data, ts[i].rows * ts[i].cols, one_d ? 0.2f : 0.3f);
        if (one_d && strstr(ts[i].name, "norm"))
            for (int64_t j = 0; j < ts[i].cols; j++) ts[i].data[j] += 1.0f;
        const int dt = one_d ? EMOE_F32 : wtype;
        ts[i].conv = make_weights(dt, ts[i].data, ts[i].rows, ts[i].cols);
        if (i == 3) CHECK(emoe_model_ready(m) == EMOE_ERR_NOT_READY, "not ready yet");
        int st = emoe_model_set_tensor(m, ts[i].name, dt, ts[i].conv, ts[i].rows, ts[i].cols);
        CHECK(st == 0, "set_tensor %s: %s", ts[i].name, emoe_model_last_error(m));
    }
    CHECK(emoe_model_ready(m) == 0, "ready: %s", emoe_model_last_error(m));
    /* error paths */
    CHECK(emoe_model_set_tensor(m, "blk.9.attn_q.weight", EMOE_F32, ts[0].data, 64, 64) == EMOE_ERR_ARG, "layer range");
    CHECK(emoe_model_set_tensor(m, "blk.0.attn_q.weight", EMOE_F32, ts[0].data, 64, 63) == EMOE_ERR_ARG, "shape");
    CHECK(emoe_model_set_tensor(m, "blk.1.ffn_gate_inp.weight", EMOE_F32, ts[0].data, 4, 64) == EMOE_ERR_ARG,
          "router on a dense layer");
    CHECK(emoe_model_set_tensor(m, "blk.0.expert.4.ffn_up.weight", EMOE_F32, ts[0].data, 32, 64) == EMOE_ERR_ARG,
          "expert range");
    CHECK(emoe_model_set_tensor(m, "blk.0.attn_norm.weight", EMOE_F16, ts[0].data, 1, 64) == EMOE_ERR_ARG,
          "1-D must be f32");
    CHECK(emoe_model_set_tensor(m, "nonsense", EMOE_F32, ts[0].data, 1, 1) == EMOE_ERR_ARG, "unknown name");
    CHECK(strlen(emoe_model_last_error(m)) > 0, "error message");

    const int n = 70;
    int32_t tok[70];
    for (int i = 0; i < n; i++) tok[i] = (int32_t)(rnd_u32() % 50);
    float *pre = malloc((size_t)n * 50 * 4), *dec = malloc(50 * 4);
    CHECK(emoe_forward(m, tok, n, pre, 1) == 0, "prefill: %s", emoe_model_last_error(m));
    CHECK(emoe_model_n_past(m) == n, "n_past");
    int bad = tok[0];
    tok[0] = 50;
    CHECK(emoe_forward(m, tok, 1, dec, 0) == EMOE_ERR_ARG, "token out of range");
    tok[0] = bad;
    CHECK(emoe_forward(m, tok, 11, NULL, 0) == EMOE_ERR_CTX, "context full");
    emoe_model_reset(m);
    double worst = 0, scale = 0;
    for (int t = 0; t < n; t++) {
        CHECK(emoe_forward(m, tok + t, 1, dec, 0) == 0, "decode");
        for (int v = 0; v < 50; v++) {
            const double d = fabs((double)dec[v] - pre[t * 50 + v]);
            worst = d > worst ? d : worst;
            scale = fabs(pre[t * 50 + v]) > scale ? fabs(pre[t * 50 + v]) : scale;
        }
    }
    int finite = 1;
    for (int i = 0; i < n * 50; i++) finite &= isfinite(pre[i]);
    CHECK(finite && scale > 0, "logits finite");
    CHECK(worst == 0.0, "decode != prefill isa=%s wtype=%d kv_f16=%d: %g (scale %g)", emoe_isa_name(isa), wtype,
          kv_f16, worst, scale);
    free(pre);
    free(dec);
    for (int i = 0; i < nt; i++) free(ts[i].data), free(ts[i].conv);
    emoe_model_free(m);
    return 0;
}

static void test_bad_config(void) {
    emoe_config c = {.n_group = 1, .topk_group = 1, .routed_scaling = 1.0f,
                     .n_layers = 1, .hidden = 8, .vocab = 4, .n_heads = 3, .n_kv_heads = 2, .head_dim = 4};
    emoe_model *m = emoe_model_new(&c, 8, 0, 1);
    CHECK(m && emoe_model_status(m) == EMOE_ERR_ARG && strstr(emoe_model_last_error(m), "n_kv_heads"),
          "bad config is reported: %s", m ? emoe_model_last_error(m) : "NULL");
    int32_t tok = 0;
    CHECK(emoe_forward(m, &tok, 1, NULL, 0) == EMOE_ERR_ARG, "forward on a failed model");
    emoe_model_free(m);
}

int main(void) {
    printf("edgemoe %s, best isa: %s\n", emoe_version(), emoe_isa_name(emoe_isa_best()));
    test_crc_and_quant();
    test_f16(EMOE_ISA_SCALAR);
    test_bad_config();
    emoe_pool *pool = emoe_pool_new(2);
    for (int isa = 0; isa < EMOE_ISA_COUNT; isa++) {
        if (!emoe_isa_supported(isa)) {
            printf("skip isa %s (not supported here)\n", emoe_isa_name(isa));
            continue;
        }
        const int before = n_fail;
        if (isa != EMOE_ISA_SCALAR) {
            test_matmul_vs_scalar(isa, NULL);
            test_matmul_vs_scalar(isa, pool);
            test_q8_integer_exact(isa);
            test_quantize_act(isa);
            test_f16(isa);
            test_axpy(isa);
        }
        for (int wtype = 0; wtype < 3; wtype++)
            for (int kv = 0; kv < 2; kv++) tiny_model_test(isa, wtype, kv, 1 + (wtype + kv) % 2, 0);
        tiny_model_test(isa, EMOE_Q8_0, 0, 2, 1);
        printf("isa %-13s %s\n", emoe_isa_name(isa), n_fail == before ? "ok" : "FAILED");
    }
    emoe_pool_free(pool);
    test_pool_threads();
    test_pool_stress();
    printf("%d checks, %d failures\n", n_check, n_fail);
    return n_fail ? 1 : 0;
}
