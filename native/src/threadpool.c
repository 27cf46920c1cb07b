/* Persistent thread pool: n-1 pthreads created once, plus the calling thread as worker 0.
 *
 * A job is (fn, ctx, n_tasks). Tasks are claimed one at a time from an atomic counter, and the caller claims tasks
 * too, so a job finishes as soon as its tasks are done: the caller never waits for a worker that has not started
 * (on a busy machine a worker may be descheduled for a whole time slice; a barrier on every worker made two threads
 * slower than one under load). Between jobs a worker spins briefly (decode issues hundreds of small jobs per token
 * and a futex wake costs tens of microseconds) and then sleeps on a condition variable, so an idle model burns no CPU.
 *
 * Protocol (gen = job generation, all atomics seq_cst unless noted):
 *   caller: gen = g; wait active == 0; write fn/ctx/n_tasks; done = 0; claim = (g << 32 | 0);
 *           ready = g (under the mutex, broadcast if a worker sleeps); run tasks; wait done == n_tasks.
 *   worker: wait ready != seen; g = ready; active++; if gen != g: active--, start over (the job is being replaced);
 *           read fn/ctx/n_tasks; claim tasks by CAS on `claim` while its generation is g; done++ after each; active--.
 * A worker reads the job fields only while counted in `active` with gen == g, and the caller rewrites them only after
 * bumping gen and seeing active == 0, so the fields are never read while being written. A claim carries the
 * generation, so a late worker can never take a task of a newer job.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ volatile("yield" ::: "memory")
#else
#define CPU_RELAX() ((void)0)
#endif

#define SPIN_ITERS 20000 /* about 0.1-1 ms of spinning before sleeping */

struct emoe_pool {
    int n_threads;
    pthread_t *threads; /* [n_threads - 1] */
    pthread_mutex_t mu;
    pthread_cond_t cv_work;   /* workers wait here for a new job */
    pthread_cond_t cv_done;   /* the caller waits here for done == n_tasks */
    atomic_uint gen;          /* generation of the job being set up or run */
    atomic_uint ready;        /* generation whose fields are published */
    atomic_uint_fast64_t claim; /* (generation << 32) | next task index */
    atomic_int active;        /* workers reading the job fields / running its tasks */
    atomic_int done;          /* tasks finished in the current job */
    atomic_int stop;
    int n_sleeping;      /* workers blocked on cv_work (under mu) */
    int caller_sleeping; /* caller blocked on cv_done (under mu) */
    unsigned last_gen;   /* caller only */
    /* the job (see the protocol above) */
    pool_task_fn fn;
    void *ctx;
    int n_tasks;
};

typedef struct {
    emoe_pool *pool;
    int id;
} worker_arg;

/* Claim and run tasks of generation g until none is left. */
static void run_tasks(emoe_pool *p, unsigned g, pool_task_fn fn, void *ctx, int n_tasks, int id) {
    uint_fast64_t c = atomic_load(&p->claim);
    for (;;) {
        if ((unsigned)(c >> 32) != g || (int)(uint32_t)c >= n_tasks) return;
        if (!atomic_compare_exchange_weak(&p->claim, &c, c + 1)) continue; /* c reloaded */
        fn(ctx, (int)(uint32_t)c, id);
        if (atomic_fetch_add(&p->done, 1) + 1 == n_tasks && id != 0) {
            pthread_mutex_lock(&p->mu);
            if (p->caller_sleeping) pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
        c = atomic_load(&p->claim);
    }
}

static void *worker_main(void *arg) {
    emoe_pool *p = ((worker_arg *)arg)->pool;
    const int id = ((worker_arg *)arg)->id;
    free(arg);
    unsigned seen = 0;
    for (;;) {
        unsigned g = atomic_load_explicit(&p->ready, memory_order_acquire);
        for (int i = 0; g == seen && i < SPIN_ITERS && !atomic_load_explicit(&p->stop, memory_order_relaxed); i++) {
            CPU_RELAX();
            g = atomic_load_explicit(&p->ready, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            p->n_sleeping++;
            while ((g = atomic_load(&p->ready)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->cv_work, &p->mu);
            p->n_sleeping--;
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = g;
        atomic_fetch_add(&p->active, 1);
        if (atomic_load(&p->gen) == g) run_tasks(p, g, p->fn, p->ctx, p->n_tasks, id);
        atomic_fetch_sub(&p->active, 1);
    }
}

emoe_pool *emoe_pool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    emoe_pool *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->n_threads = 1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    atomic_init(&p->gen, 0);
    atomic_init(&p->ready, 0);
    atomic_init(&p->claim, 0);
    atomic_init(&p->active, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->stop, 0);
    if (n_threads > 1) {
        p->threads = calloc((size_t)n_threads - 1, sizeof(pthread_t));
        if (!p->threads) {
            emoe_pool_free(p);
            return NULL;
        }
        for (int i = 1; i < n_threads; i++) {
            worker_arg *a = malloc(sizeof(*a));
            if (a) a->pool = p, a->id = i;
            if (!a || pthread_create(&p->threads[i - 1], NULL, worker_main, a) != 0) {
                free(a);
                emoe_pool_free(p); /* stops the i - 1 workers already running */
                return NULL;
            }
            p->n_threads = i + 1;
        }
    }
    return p;
}

void emoe_pool_free(emoe_pool *p) {
    if (!p) return;
    if (p->n_threads > 1) {
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->stop, 1);
        pthread_cond_broadcast(&p->cv_work);
        pthread_mutex_unlock(&p->mu);
        for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i - 1], NULL);
    }
    free(p->threads);
    pthread_cond_destroy(&p->cv_done);
    pthread_cond_destroy(&p->cv_work);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

int emoe_pool_threads(const emoe_pool *p) { return p ? p->n_threads : 1; }

void pool_run(emoe_pool *p, pool_task_fn fn, void *ctx, int n_tasks) {
    if (n_tasks <= 0) return;
    if (!p || p->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    const unsigned g = ++p->last_gen ? p->last_gen : ++p->last_gen; /* 0 means "no job yet" to the workers */
    atomic_store(&p->gen, g); /* a worker checking in from now on backs off until the fields are published */
    for (int i = 0; atomic_load(&p->active) != 0; i++) /* workers leaving the previous job (a few instructions) */
        if (i < 1000) CPU_RELAX();
        else sched_yield(); /* ... unless one was descheduled inside that window */
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store(&p->done, 0);
    atomic_store(&p->claim, (uint_fast64_t)g << 32);
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->ready, g);
    if (p->n_sleeping) pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);

    run_tasks(p, g, fn, ctx, n_tasks, 0);

    for (int i = 0; i < SPIN_ITERS && atomic_load(&p->done) != n_tasks; i++) CPU_RELAX();
    if (atomic_load(&p->done) != n_tasks) {
        pthread_mutex_lock(&p->mu);
        p->caller_sleeping = 1;
        while (atomic_load(&p->done) != n_tasks) pthread_cond_wait(&p->cv_done, &p->mu);
        p->caller_sleeping = 0;
        pthread_mutex_unlock(&p->mu);
    }
}
