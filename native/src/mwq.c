/* MWQ bit planes: plane sizes, plane resolution, the activation preparation, the threaded driver and the public
 * kernel entry point. The kernels are in kernels_mwq_{scalar,avx2,neon}.c; the layout is docs/FORMAT.md
 * "MWQ bit planes". */
#include <math.h>
#include <stdlib.h>

#include "internal.h"
#include "mwq_lut.h"

#define MIN_CHUNK_ROWS 16
#define TASKS_PER_THREAD 8
#define MAX_JOBS 32 /* as in matmul.c */
#define MAX_INPUTS 32

int64_t mwq_plane_bytes(int plane, int base_bits, int group, int64_t rows, int64_t cols) {
    if (plane < 1 || plane > MWQ_MAX_PLANES || (base_bits != 2 && base_bits != 4 && base_bits != 8)) return 0;
    if (group <= 0 || group % 8 || rows < 0 || cols <= 0 || cols % group) return 0;
    const int64_t ng = cols / group;
    if (plane == 1) return 4 * rows * ng + rows * cols / 8 * base_bits;
    return 2 * rows * ng + rows * cols / 8;
}

int64_t emoe_mwq_plane_bytes(int plane, int base_bits, int group, int64_t rows, int64_t cols) {
    return mwq_plane_bytes(plane, base_bits, group, rows, cols);
}

int mwq_matrix_init(mwq_matrix *m, const void *base, const int64_t *off, int k, int base_bits, int group,
                    int64_t rows, int64_t cols) {
    if (!base || !off || k < 1 || k > MWQ_MAX_PLANES || !mwq_plane_bytes(1, base_bits, group, rows, cols))
        return EMOE_ERR_ARG;
    memset(m, 0, sizeof(*m));
    m->rows = rows;
    m->cols = cols;
    m->k = k;
    m->base_bits = base_bits;
    m->group = group;
    const size_t n = (size_t)(rows * (cols / group));
    for (int p = 0; p < k; p++) {
        const char *pl = (const char *)base + off[p];
        if ((uintptr_t)pl % 2) return EMOE_ERR_ARG; /* f16 scales */
        if (p == 0) {
            m->s1 = (const uint16_t *)pl;
            m->m1 = m->s1 + n;
            m->codes = (const uint8_t *)(m->m1 + n);
        } else {
            m->rs[p - 1] = (const uint16_t *)pl;
            m->signs[p - 1] = (const uint8_t *)(m->rs[p - 1] + n);
        }
    }
    return EMOE_OK;
}

const mwq_kernels *mwq_kernels_get(int isa) {
    if (isa == EMOE_ISA_AUTO) isa = emoe_isa_best();
    if (!emoe_isa_supported(isa)) return NULL;
    switch (isa) {
    case EMOE_ISA_SCALAR: return &mwq_kernels_scalar;
#if defined(EMOE_HAVE_AVX2)
    case EMOE_ISA_AVX2: return &mwq_kernels_avx2;
    case EMOE_ISA_AVX512VNNI: return emoe_x86_gfni_vbmi() ? &mwq_kernels_avx512vnni : &mwq_kernels_avx2;
#endif
#if defined(EMOE_HAVE_NEON)
    case EMOE_ISA_NEON: return &mwq_kernels_neon;
    case EMOE_ISA_NEON_DOTPROD: return &mwq_kernels_neon_dotprod;
#endif
    default: return NULL;
    }
}

/* ---- activation preparation ---- */

/* One token: per block of 32 with the ISA's quantizer (bit-exact across ISAs), the last partial block (cols % 32
 * values, zero padded) with the same formula in scalar code. */
static void quantize_row(const emoe_kernels *k, const float *x, int64_t cols, block_q8_act *q) {
    const int64_t nfull = cols / QK, rem = cols % QK;
    if (nfull) k->quantize_act(x, q, nfull * QK);
    if (!rem) return;
    const float *xb = x + nfull * QK;
    float amax = 0.0f;
    for (int64_t j = 0; j < rem; j++) {
        const float a = xb[j] < 0 ? -xb[j] : xb[j];
        amax = a > amax ? a : amax;
    }
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    block_q8_act *b = &q[nfull];
    b->d = d;
    memset(b->qs, 0, sizeof(b->qs));
    for (int64_t j = 0; j < rem; j++) b->qs[j] = (int8_t)(int)nearbyintf(xb[j] * id);
}

/* The SIMD layout of one token (see mwq_act in internal.h): per chunk of 32P inputs (P blocks of 32), vector s byte i
 * = q[P*i + s], then the lanes' block scales and sums. */
static inline void prep_chunk(const int P, const block_q8_act *q, uint8_t *out) {
    int8_t v[128];
    for (int j = 0; j < P; j++) memcpy(v + 32 * j, q[j].qs, 32);
    int8_t *o = (int8_t *)out;
    for (int s = 0; s < P; s++)
        for (int i = 0; i < 32; i++) o[32 * s + i] = v[P * i + s];
    float *d = (float *)(out + 32 * P), *sx = d + 8;
    for (int L = 0; L < 8; L++) {
        int32_t sum = 0;
        for (int m = 4 * P * L; m < 4 * P * (L + 1); m++) sum += v[m];
        d[L] = q[4 * P * L / 32].d;
        sx[L] = (float)sum;
    }
}

/* xp layout 1 (b1 = 2, kernels_mwq_avx512.c): chunk of 128 inputs = 4 blocks; vector v byte j = 4L + a holds input
 * 32*(L%4) + 8a + 2v + L/4 (lane L: 16 inputs of block L % 4), then d[L] and sx[L] as in layout 0. */
static void prep_chunk_vnni(const block_q8_act *q, uint8_t *out) {
    int8_t *o = (int8_t *)out;
    float *d = (float *)(out + 128), *sx = d + 8;
    for (int L = 0; L < 8; L++) {
        const block_q8_act *b = &q[L % 4];
        int32_t sum = 0;
        for (int v = 0; v < 4; v++)
            for (int a = 0; a < 4; a++) {
                const int8_t xv = b->qs[8 * a + 2 * v + L / 4];
                o[32 * v + 4 * L + a] = xv;
                sum += xv;
            }
        d[L] = b->d;
        sx[L] = (float)sum;
    }
}

static void prep_xp(int layout, int base_bits, int64_t cols, const block_q8_act *q, uint8_t *xp) {
    if (layout == 1) {
        for (int64_t c = 0; c < cols / 128; c++) prep_chunk_vnni(q + c * 4, xp + (size_t)c * MWQ_XP_CHUNK_BYTES(2));
        return;
    }
    const int P = 8 / base_bits;
    const int64_t nch = cols / (32 * P);
    const size_t cb = MWQ_XP_CHUNK_BYTES(base_bits);
    for (int64_t c = 0; c < nch; c++) {
        const block_q8_act *qc = q + c * P;
        uint8_t *out = xp + (size_t)c * cb;
        if (P == 4) prep_chunk(4, qc, out);
        else if (P == 2) prep_chunk(2, qc, out);
        else prep_chunk(1, qc, out);
    }
}

size_t mwq_xpbuf_bytes(int64_t cols, int n_tok) {
    size_t mx = cols % 32 ? 0 : mwq_lut_bytes(cols); /* the LUT kernels' tables (mwq_lut.h) */
    for (int b1 = 2; b1 <= 8; b1 *= 2) mx = mwq_xp_bytes(b1, cols) > mx ? mwq_xp_bytes(b1, cols) : mx;
    return mx * (size_t)(n_tok > 0 ? n_tok : 1) + 64;
}

/* ---- threaded driver ---- */

typedef struct {
    const mwq_kernels *mk;
    const mwq_job *jobs;
    const mwq_act *acts; /* job j reads acts[jobs[j].xi] */
    int f32_act;
    int64_t chunk;
    int task_start[MAX_JOBS + 1];
} mwq_ctx;

static void mwq_task(void *arg, int task, int thread) {
    (void)thread;
    const mwq_ctx *c = arg;
    int j = 0;
    while (task >= c->task_start[j + 1]) j++;
    const mwq_job *jb = &c->jobs[j];
    const int64_t r0 = (int64_t)(task - c->task_start[j]) * c->chunk;
    const int64_t r1 = r0 + c->chunk < jb->w.rows ? r0 + c->chunk : jb->w.rows;
    const mwq_fn fn = c->f32_act ? c->mk->matmul_f32 : c->mk->matmul_q8;
    fn(&jb->w, &c->acts[jb->xi], jb->y, jb->ldy, r0, r1);
}

/* Jobs [0, n) all have the same base_bits (the xp layout is ready for it); job j reads acts[jobs[j].xi]. */
static void dispatch(emoe_pool *pool, const mwq_kernels *mk, const mwq_job *jobs, int n, const mwq_act *acts,
                     int f32_act) {
    while (n > 0) {
        const int nj = n < MAX_JOBS ? n : MAX_JOBS;
        mwq_ctx c = {.mk = mk, .jobs = jobs, .acts = acts, .f32_act = f32_act};
        int64_t total = 0;
        for (int j = 0; j < nj; j++) total += jobs[j].w.rows;
        const int nt = emoe_pool_threads(pool);
        int64_t chunk = (total + (int64_t)nt * TASKS_PER_THREAD - 1) / ((int64_t)nt * TASKS_PER_THREAD);
        if (chunk < MIN_CHUNK_ROWS) chunk = MIN_CHUNK_ROWS;
        c.chunk = (chunk + MWQ_LUT_TILE - 1) & ~(int64_t)(MWQ_LUT_TILE - 1); /* whole LUT tiles */
        c.task_start[0] = 0;
        for (int j = 0; j < nj; j++)
            c.task_start[j + 1] = c.task_start[j] + (int)((jobs[j].w.rows + c.chunk - 1) / c.chunk);
        if (c.task_start[nj] > 0) pool_run(pool, mwq_task, &c, c.task_start[nj]);
        jobs += nj;
        n -= nj;
    }
}

void mwq_run(emoe_pool *pool, const emoe_kernels *k, const mwq_job *jobs, int n_jobs, const float *x, int64_t cols,
             int n_tok, block_q8_act *qbuf, uint8_t *xpbuf, int f32_act) {
    if (n_tok <= 0 || n_jobs <= 0) return;
    const int no_lut = (f32_act & MWQ_RUN_NO_LUT) != 0;
    f32_act &= ~MWQ_RUN_NO_LUT;
    const mwq_kernels *mk = mwq_kernels_get(k->isa);
    if (!mk) mk = &mwq_kernels_scalar;
    mwq_act act = {.n_tok = n_tok, .x = x, .x_stride = (size_t)cols};
    if (f32_act) {
        dispatch(pool, mk, jobs, n_jobs, &act, 1);
        return;
    }
    const size_t nb = (size_t)((cols + QK - 1) / QK);
    for (int t = 0; t < n_tok; t++) quantize_row(k, x + (size_t)t * (size_t)cols, cols, qbuf + (size_t)t * nb);
    act.xq = qbuf;
    act.xq_stride = nb;
    uint8_t *xp = xpbuf ? (uint8_t *)(((uintptr_t)xpbuf + 63) & ~(uintptr_t)63) : NULL;
    const mwq_kernels *lk = no_lut || !xp ? NULL : mwq_lut_kernels_get(k->isa);
    if (lk) { /* the table-lookup kernels take every matrix they can (mwq_lut.h), for any n_tok */
        mwq_job lj[MAX_JOBS], oj[MAX_JOBS];
        int nl = 0, no = 0;
        for (int j = 0; j < n_jobs; j++) {
            if (mwq_lut_ok(&jobs[j].w)) lj[nl++] = jobs[j];
            else oj[no++] = jobs[j];
            if (nl == MAX_JOBS || no == MAX_JOBS || j == n_jobs - 1) {
                if (nl) {
                    const size_t ls = mwq_lut_bytes(cols);
                    for (int t = 0; t < n_tok; t++) mwq_lut_build(qbuf + (size_t)t * nb, cols, xp + (size_t)t * ls);
                    mwq_act la = act;
                    la.xp = xp;
                    la.xp_stride = ls;
                    dispatch(pool, lk, lj, nl, &la, 0);
                }
                if (no) mwq_run(pool, k, oj, no, x, cols, n_tok, qbuf, xpbuf, f32_act | MWQ_RUN_NO_LUT);
                nl = no = 0;
            }
        }
        return;
    }
    /* one dispatch per base_bits (the xp layout depends on it); consecutive jobs with the same b1 share it */
    for (int j0 = 0; j0 < n_jobs;) {
        const int b1 = jobs[j0].w.base_bits;
        int j1 = j0 + 1;
        while (j1 < n_jobs && jobs[j1].w.base_bits == b1) j1++;
        const mwq_kernels *mj = mk; /* the AVX-512 kernels cover fewer (b1, g): the rest run the AVX2 ones */
        for (int j = j0; j < j1; j++)
            if (mj->xp_layout == 1 && !mwq_vnni_ok(b1, jobs[j].w.group)) mj = mwq_kernels_get(EMOE_ISA_AVX2);
        int need_xp = 0;
        for (int j = j0; j < j1; j++) need_xp |= mj->uses_xp && mwq_simd_ok(b1, jobs[j].w.group);
        act.xp = NULL;
        act.xp_stride = 0;
        if (need_xp && xp) {
            act.xp_stride = mwq_xp_bytes(b1, cols);
            for (int t = 0; t < n_tok; t++)
                prep_xp(mj->xp_layout, b1, cols, qbuf + (size_t)t * nb, xp + (size_t)t * act.xp_stride);
            act.xp = xp;
        }
        dispatch(pool, act.xp || !need_xp ? mj : &mwq_kernels_scalar, jobs + j0, j1 - j0, &act, 0);
        j0 = j1;
    }
}

void mwq_run_multi(emoe_pool *pool, const emoe_kernels *k, const mwq_job *jobs, int n_jobs, const mm_input *in,
                   int n_in, int64_t cols, block_q8_act *qbuf, uint8_t *xpbuf, int f32_act) {
    if (n_jobs <= 0 || n_in <= 0) return;
    const int no_lut = (f32_act & MWQ_RUN_NO_LUT) != 0;
    f32_act &= ~MWQ_RUN_NO_LUT;
    const mwq_kernels *mk = mwq_kernels_get(k->isa);
    if (!mk) mk = &mwq_kernels_scalar;
    mwq_act acts[MAX_INPUTS];
    for (int i = 0; i < n_in && i < MAX_INPUTS; i++)
        acts[i] = (mwq_act){.n_tok = in[i].n_tok, .x = in[i].x, .x_stride = (size_t)cols};
    if (f32_act && n_in <= MAX_INPUTS) {
        dispatch(pool, mk, jobs, n_jobs, acts, 1);
        return;
    }
    uint8_t *xp = xpbuf ? (uint8_t *)(((uintptr_t)xpbuf + 63) & ~(uintptr_t)63) : NULL;
    const mwq_kernels *lk = no_lut || !xp || f32_act ? NULL : mwq_lut_kernels_get(k->isa);
    int all_lut = lk && n_in <= MAX_INPUTS;
    for (int j = 0; j < n_jobs && all_lut; j++) all_lut = mwq_lut_ok(&jobs[j].w);
    if (!all_lut) { /* the per-b1 activation layouts of the other kernels: one mwq_run per input */
        const int flags = f32_act | (no_lut ? MWQ_RUN_NO_LUT : 0);
        for (int i = 0; i < n_in; i++) {
            mwq_job sub[MAX_JOBS];
            int n = 0;
            for (int j = 0; j < n_jobs; j++) {
                if (jobs[j].xi == i) {
                    sub[n] = jobs[j];
                    sub[n++].xi = 0;
                }
                if (n && (n == MAX_JOBS || j == n_jobs - 1)) {
                    mwq_run(pool, k, sub, n, in[i].x, cols, in[i].n_tok, qbuf, xpbuf, flags);
                    n = 0;
                }
            }
        }
        return;
    }
    /* every input quantized and its tables built once, then one dispatch for all jobs */
    const size_t nb = (size_t)((cols + QK - 1) / QK), ls = mwq_lut_bytes(cols);
    size_t rows = 0;
    for (int i = 0; i < n_in; i++) {
        for (int t = 0; t < in[i].n_tok; t++) {
            block_q8_act *q = qbuf + (rows + (size_t)t) * nb;
            quantize_row(k, in[i].x + (size_t)t * (size_t)cols, cols, q);
            mwq_lut_build(q, cols, xp + (rows + (size_t)t) * ls);
        }
        acts[i].xq = qbuf + rows * nb;
        acts[i].xq_stride = nb;
        acts[i].xp = xp + rows * ls;
        acts[i].xp_stride = ls;
        rows += (size_t)in[i].n_tok;
    }
    dispatch(pool, lk, jobs, n_jobs, acts, 0);
}

/* ---- public entry point ---- */

int emoe_matmul_mwq(emoe_pool *pool, int isa, const void *planes_base, const int64_t *plane_offsets, int k,
                    int base_bits, int group, int64_t rows, int64_t cols, const float *x, int64_t n_tok, float *y) {
    const int f32_act = (base_bits & EMOE_MATMUL_F32_ACT) != 0, no_lut = (base_bits & EMOE_MWQ_NO_LUT) != 0;
    base_bits &= ~(EMOE_MATMUL_F32_ACT | EMOE_MWQ_NO_LUT);
    const emoe_kernels *kt = emoe_kernels_get(isa);
    if (!kt) return EMOE_ERR_ISA;
    if (!x || !y || n_tok < 0 || n_tok > INT32_MAX) return EMOE_ERR_ARG;
    mwq_job job = {.y = y, .ldy = (size_t)rows};
    int st = mwq_matrix_init(&job.w, planes_base, plane_offsets, k, base_bits, group, rows, cols);
    if (st) return st;
    if (n_tok == 0 || rows == 0) return EMOE_OK;
    block_q8_act *q = NULL;
    uint8_t *xp = NULL;
    if (!f32_act) {
        q = malloc((size_t)n_tok * (size_t)((cols + QK - 1) / QK) * sizeof(block_q8_act));
        xp = malloc(mwq_xpbuf_bytes(cols, (int)n_tok));
        if (!q || !xp) {
            free(q);
            free(xp);
            return EMOE_ERR_NOMEM;
        }
    }
    mwq_run(pool, kt, &job, 1, x, cols, (int)n_tok, q, xp, f32_act | (no_lut ? MWQ_RUN_NO_LUT : 0));
    free(q);
    free(xp);
    return EMOE_OK;
}
