/* The threaded matmul driver: splits the output rows of one or more matrices into chunks taken by the pool's threads,
 * and the kernel entry points exposed for tests and benchmarks. */
#include <stdlib.h>

#include "internal.h"

#define MAX_JOBS 32 /* jobs per dispatch (all routed experts' gate and up at top-k 16); more: further dispatches */
#define MAX_INPUTS 32
#define MIN_CHUNK_ROWS 16 /* a multiple of 4 so the decode tiles (4 rows) stay whole */
#define TASKS_PER_THREAD 8
#define PREFETCH_NEXT_BYTES 4096 /* of the next task's rows, prefetched when a task starts (see mm_task) */

typedef struct {
    const float *x;         /* [n_tok, cols] f32 */
    const block_q8_act *qx; /* [n_tok, cols/32] quantized x, or NULL */
    int n_tok;
} mm_in;

typedef struct {
    const emoe_kernels *k;
    const mm_job *jobs;
    const mm_in *in;
    int n_jobs, n_tasks;
    int64_t cols;
    int q8_f32_act;          /* Q8_0 jobs use the f32-activation kernel */
    int64_t chunk;           /* rows per task */
    int task_start[MAX_JOBS + 1];
} mm_ctx;

/* The job of a task and its rows [*r0, *r1). */
static const mm_job *task_rows(const mm_ctx *c, int task, int64_t *r0, int64_t *r1) {
    int j = 0;
    while (task >= c->task_start[j + 1]) j++;
    const mm_job *jb = &c->jobs[j];
    *r0 = (int64_t)(task - c->task_start[j]) * c->chunk;
    *r1 = *r0 + c->chunk < jb->rows ? *r0 + c->chunk : jb->rows;
    return jb;
}

static void mm_task(void *arg, int task, int thread) {
    (void)thread;
    const mm_ctx *c = arg;
    int64_t r0, r1;
    const mm_job *jb = task_rows(c, task, &r0, &r1);
    const size_t w_stride = emoe_row_bytes(jb->wtype, c->cols);
    if (task + 1 < c->n_tasks) { /* the next task (often another matrix) starts while this one runs: its first lines
                                  * are on their way instead of each new matrix starting its streams cold */
        int64_t n0, n1;
        const mm_job *nx = task_rows(c, task + 1, &n0, &n1);
        const char *p = (const char *)nx->w + (size_t)n0 * emoe_row_bytes(nx->wtype, c->cols);
        for (int b = 0; b < PREFETCH_NEXT_BYTES; b += 64) __builtin_prefetch(p + b, 0, 2);
    }
    const mm_in *in = &c->in[jb->xi];
    if (jb->wtype == EMOE_Q8_0 && c->q8_f32_act)
        c->k->matmul[KQ8_F32](c->cols, jb->w, w_stride, in->x, (size_t)c->cols * sizeof(float), jb->y, jb->ldy,
                              in->n_tok, r0, r1);
    else if (jb->wtype == EMOE_Q8_0)
        c->k->matmul[EMOE_Q8_0](c->cols, jb->w, w_stride, in->qx, (size_t)(c->cols / QK) * sizeof(block_q8_act),
                                jb->y, jb->ldy, in->n_tok, r0, r1);
    else
        c->k->matmul[jb->wtype](c->cols, jb->w, w_stride, in->x, (size_t)c->cols * sizeof(float), jb->y, jb->ldy,
                                in->n_tok, r0, r1);
}

void mm_run_multi(emoe_pool *pool, const emoe_kernels *k, const mm_job *jobs, int n_jobs, const mm_input *in,
                  int n_in, int64_t cols, block_q8_act *qbuf, int q8_f32_act) {
    if (n_jobs <= 0 || n_in <= 0) return;
    if (n_in > MAX_INPUTS) { /* never from the forward pass (n_in <= top_k); kept correct anyway */
        for (int i = 0; i < n_in; i++)
            for (int j = 0; j < n_jobs; j++)
                if (jobs[j].xi == i) {
                    mm_job one = jobs[j];
                    one.xi = 0;
                    mm_run(pool, k, &one, 1, in[i].x, cols, in[i].n_tok, qbuf, q8_f32_act);
                }
        return;
    }
    mm_in ins[MAX_INPUTS];
    int any_q8 = 0;
    for (int j = 0; j < n_jobs; j++) any_q8 |= jobs[j].wtype == EMOE_Q8_0;
    const int64_t nb = cols / QK;
    size_t q_rows = 0;
    for (int i = 0; i < n_in; i++) {
        ins[i] = (mm_in){.x = in[i].x, .qx = NULL, .n_tok = in[i].n_tok};
        if (!any_q8 || q8_f32_act) continue;
        ins[i].qx = qbuf + q_rows * (size_t)nb; /* each input quantized once, whatever the number of its jobs */
        for (int t = 0; t < in[i].n_tok; t++)
            k->quantize_act(in[i].x + (size_t)t * (size_t)cols, qbuf + (q_rows + (size_t)t) * (size_t)nb, cols);
        q_rows += (size_t)in[i].n_tok;
    }
    const int nt = emoe_pool_threads(pool);
    for (int j0 = 0; j0 < n_jobs; j0 += MAX_JOBS) {
        const int nj = n_jobs - j0 < MAX_JOBS ? n_jobs - j0 : MAX_JOBS;
        mm_ctx c = {.k = k, .jobs = jobs + j0, .in = ins, .n_jobs = nj, .cols = cols, .q8_f32_act = q8_f32_act};
        int64_t total = 0;
        for (int j = 0; j < nj; j++) total += c.jobs[j].rows;
        int64_t chunk = (total + (int64_t)nt * TASKS_PER_THREAD - 1) / ((int64_t)nt * TASKS_PER_THREAD);
        if (chunk < MIN_CHUNK_ROWS) chunk = MIN_CHUNK_ROWS;
        c.chunk = (chunk + 3) & ~(int64_t)3;
        c.task_start[0] = 0;
        for (int j = 0; j < nj; j++)
            c.task_start[j + 1] = c.task_start[j] + (int)((c.jobs[j].rows + c.chunk - 1) / c.chunk);
        c.n_tasks = c.task_start[nj];
        pool_run(pool, mm_task, &c, c.n_tasks);
    }
}

void mm_run(emoe_pool *pool, const emoe_kernels *k, const mm_job *jobs, int n_jobs, const float *x, int64_t cols,
            int n_tok, block_q8_act *qbuf, int q8_f32_act) {
    if (n_tok <= 0 || n_jobs <= 0) return;
    const mm_input in = {.x = x, .n_tok = n_tok}; /* every job's xi is 0 */
    mm_run_multi(pool, k, jobs, n_jobs, &in, 1, cols, qbuf, q8_f32_act);
}

/* ---- public kernel entry points ---- */

size_t emoe_row_bytes(int dtype, int64_t cols) {
    if (cols < 0) return 0;
    switch (dtype) {
    case EMOE_F32: return (size_t)cols * 4;
    case EMOE_F16: return (size_t)cols * 2;
    case EMOE_Q8_0: return cols % QK ? 0 : (size_t)(cols / QK) * sizeof(block_q8_0);
    default: return 0;
    }
}

int emoe_matmul(emoe_pool *pool, int isa, int wtype, const void *w, int64_t rows, int64_t cols, const float *x,
                int64_t n_tok, float *y) {
    const int f32_act = (wtype & EMOE_MATMUL_F32_ACT) != 0;
    wtype &= ~EMOE_MATMUL_F32_ACT;
    const emoe_kernels *k = emoe_kernels_get(isa);
    if (!k) return EMOE_ERR_ISA;
    if (!w || !x || !y || rows < 0 || cols <= 0 || n_tok < 0 || n_tok > INT32_MAX || emoe_row_bytes(wtype, cols) == 0)
        return EMOE_ERR_ARG;
    block_q8_act *q = NULL;
    if (wtype == EMOE_Q8_0 && !f32_act) {
        q = malloc((size_t)n_tok * (size_t)(cols / QK) * sizeof(block_q8_act) + 1);
        if (!q) return EMOE_ERR_NOMEM;
    }
    mm_job job = {.wtype = wtype, .w = w, .rows = rows, .y = y, .ldy = (size_t)rows};
    mm_run(pool, k, &job, 1, x, cols, (int)n_tok, q, f32_act);
    free(q);
    return EMOE_OK;
}

int emoe_quantize_act(int isa, const float *src, void *dst, int64_t n) {
    const emoe_kernels *k = emoe_kernels_get(isa);
    if (!k) return EMOE_ERR_ISA;
    if (!src || !dst || n < 0 || n % QK) return EMOE_ERR_ARG;
    k->quantize_act(src, dst, n);
    return EMOE_OK;
}

int emoe_axpy(int isa, int xtype, float a, const void *x, float *y, int64_t n) {
    const emoe_kernels *k = emoe_kernels_get(isa);
    if (!k) return EMOE_ERR_ISA;
    if (!x || !y || n < 0) return EMOE_ERR_ARG;
    if (xtype == EMOE_F32) k->axpy_f32(a, x, y, n);
    else if (xtype == EMOE_F16) k->axpy_f16(a, x, y, n);
    else return EMOE_ERR_ARG;
    return EMOE_OK;
}

int emoe_convert_f16(int isa, int to_f16, const void *src, void *dst, int64_t n) {
    const emoe_kernels *k = emoe_kernels_get(isa);
    if (!k) return EMOE_ERR_ISA;
    if (!src || !dst || n < 0) return EMOE_ERR_ARG;
    if (to_f16) k->f32_to_f16(src, dst, n);
    else k->f16_to_f32(src, dst, n);
    return EMOE_OK;
}
