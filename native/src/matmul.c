/* The threaded matmul driver: splits the output rows of one or more matrices into chunks taken by the pool's threads,
 * and the kernel entry points exposed for tests and benchmarks. */
#include <stdlib.h>

#include "internal.h"

#define MAX_JOBS 8
#define MIN_CHUNK_ROWS 16 /* a multiple of 4 so the decode tiles (4 rows) stay whole */
#define TASKS_PER_THREAD 8

typedef struct {
    const emoe_kernels *k;
    const mm_job *jobs;
    int n_jobs;
    int64_t cols;
    int n_tok;
    const float *x;          /* [n_tok, cols] f32 */
    const block_q8_act *qx;  /* [n_tok, cols/32] quantized x, or NULL */
    int q8_f32_act;          /* Q8_0 jobs use the f32-activation kernel */
    int64_t chunk;           /* rows per task */
    int task_start[MAX_JOBS + 1];
} mm_ctx;

static void mm_task(void *arg, int task, int thread) {
    (void)thread;
    const mm_ctx *c = arg;
    int j = 0;
    while (task >= c->task_start[j + 1]) j++;
    const mm_job *jb = &c->jobs[j];
    const int64_t r0 = (int64_t)(task - c->task_start[j]) * c->chunk;
    const int64_t r1 = r0 + c->chunk < jb->rows ? r0 + c->chunk : jb->rows;
    const size_t w_stride = emoe_row_bytes(jb->wtype, c->cols);
    if (jb->wtype == EMOE_Q8_0 && c->q8_f32_act)
        c->k->matmul[KQ8_F32](c->cols, jb->w, w_stride, c->x, (size_t)c->cols * sizeof(float), jb->y, jb->ldy,
                              c->n_tok, r0, r1);
    else if (jb->wtype == EMOE_Q8_0)
        c->k->matmul[EMOE_Q8_0](c->cols, jb->w, w_stride, c->qx, (size_t)(c->cols / QK) * sizeof(block_q8_act), jb->y,
                                jb->ldy, c->n_tok, r0, r1);
    else
        c->k->matmul[jb->wtype](c->cols, jb->w, w_stride, c->x, (size_t)c->cols * sizeof(float), jb->y, jb->ldy,
                                c->n_tok, r0, r1);
}

void mm_run(emoe_pool *pool, const emoe_kernels *k, const mm_job *jobs, int n_jobs, const float *x, int64_t cols,
            int n_tok, block_q8_act *qbuf, int q8_f32_act) {
    if (n_tok <= 0 || n_jobs <= 0) return;
    mm_ctx c = {.k = k, .jobs = jobs, .n_jobs = n_jobs, .cols = cols, .n_tok = n_tok, .x = x, .qx = NULL,
                .q8_f32_act = q8_f32_act};
    int64_t total = 0;
    int any_q8 = 0;
    for (int j = 0; j < n_jobs; j++) {
        total += jobs[j].rows;
        any_q8 |= jobs[j].wtype == EMOE_Q8_0;
    }
    if (any_q8 && !q8_f32_act) {
        const int64_t nb = cols / QK;
        for (int t = 0; t < n_tok; t++)
            k->quantize_act(x + (size_t)t * (size_t)cols, qbuf + (size_t)t * (size_t)nb, cols);
        c.qx = qbuf;
    }
    const int nt = emoe_pool_threads(pool);
    int64_t chunk = (total + (int64_t)nt * TASKS_PER_THREAD - 1) / ((int64_t)nt * TASKS_PER_THREAD);
    if (chunk < MIN_CHUNK_ROWS) chunk = MIN_CHUNK_ROWS;
    chunk = (chunk + 3) & ~(int64_t)3;
    c.chunk = chunk;
    /* jobs beyond MAX_JOBS are run in further dispatches */
    const int nj = n_jobs < MAX_JOBS ? n_jobs : MAX_JOBS;
    c.n_jobs = nj;
    c.task_start[0] = 0;
    for (int j = 0; j < nj; j++) c.task_start[j + 1] = c.task_start[j] + (int)((jobs[j].rows + chunk - 1) / chunk);
    pool_run(pool, mm_task, &c, c.task_start[nj]);
    if (n_jobs > nj) mm_run(pool, k, jobs + nj, n_jobs - nj, x, cols, n_tok, qbuf, q8_f32_act);
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
