/* Tests of the streaming path's building blocks, alone: the I/O thread (priority order, merged reads, short reads,
 * O_DIRECT), the expert cache (byte accounting under random load, eviction order, pins, checksum and read errors with
 * retry, budget errors) and the HEBF scheduler. Files are written to $TMPDIR (default /tmp).
 *
 *   test_cache [--iters N] [--seed S]
 *   test_cache --bench-evict N [--policy lru|cyclic|freq]   (time one eviction with N pieces; no tests)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "edgemoe.h"
#include "expert_cache.h"
#include "hebf.h"
#include "io_thread.h"


static uint64_t rng_state = 0x1234567;
static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static char tmpdir[512];

static char *make_file(const char *name, size_t size, unsigned char **content) {
    static char path[1024];
    snprintf(path, sizeof path, "%s/%s.%d", tmpdir, name, (int)getpid());
    unsigned char *buf = malloc(size);
    for (size_t i = 0; i < size; i++) buf[i] = (unsigned char)(rnd() >> 24);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, size, f) != size) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
    fclose(f);
    *content = buf;
    return path;
}

static void patch_file(const char *path, uint64_t off, const void *data, size_t n) {
    int fd = open(path, O_WRONLY);
    if (fd < 0 || pwrite(fd, data, n, (off_t)off) != (ssize_t)n) {
        fprintf(stderr, "cannot patch %s\n", path);
        exit(2);
    }
    close(fd);
}

/* ---- status strings: every EMOE_* status of edgemoe.h has its own message ---- */

static void test_status_strings(void) {
    const int codes[] = {EMOE_OK, EMOE_ERR_ARG, EMOE_ERR_NOMEM, EMOE_ERR_NOT_READY, EMOE_ERR_CTX, EMOE_ERR_ISA,
                         EMOE_ERR_THREAD, EMOE_ERR_IO, EMOE_ERR_CORRUPT, EMOE_ERR_BUDGET, EMOE_ERR_FORMAT,
                         EMOE_ERR_INVALID};
    const int n = (int)(sizeof codes / sizeof codes[0]);
    const char *unknown = emoe_status_string(-1000);
    CHECK(unknown && !strcmp(unknown, "unknown error"), "status -1000 -> \"unknown error\", got \"%s\"", unknown);
    for (int i = 0; i < n; i++) {
        CHECK(codes[i] == -i, "status codes are 0..-%d in order (code %d at %d)", n - 1, codes[i], i);
        const char *s = emoe_status_string(codes[i]);
        CHECK(s && *s && strcmp(s, unknown), "status %d has no message", codes[i]);
        for (int j = 0; j < i; j++)
            CHECK(strcmp(s, emoe_status_string(codes[j])), "statuses %d and %d share the message \"%s\"", codes[i],
                  codes[j], s);
    }
    CHECK(!strcmp(emoe_status_string(EMOE_ERR_INVALID + -1), unknown), "the status after the last is unknown: "
          "add its message to core.c and this list");
}

/* ---- CRC ---- */

static void test_crc(void) {
    unsigned char buf[5000];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)(rnd() >> 13);
    for (int t = 0; t < 200; t++) {
        const size_t off = rnd() % 17, len = rnd() % (sizeof buf - 17);
        const uint32_t seed = t % 3 ? 0 : (uint32_t)rnd();
        CHECK(emoe_crc32_fast(seed, buf + off, len) == emoe_crc32(seed, buf + off, len), "crc32 fast != reference "
              "(off %zu len %zu)", off, len);
    }
    CHECK(emoe_crc32_fast(0, "123456789", 9) == 0xCBF43926u, "crc32 check value");
}

/* ---- the I/O thread alone ---- */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    emoe_io_job jobs[64];
    int wanted[64];
    int order[64], n_done;
    int status[64];
    char msg[64][EMOE_IO_MSG_LEN];
} io_ctx;

static int t_start(void *ctx, int id, uint32_t tag, int commit, emoe_io_job *job) {
    io_ctx *x = ctx;
    (void)tag;
    if (!x->wanted[id]) return 0;
    *job = x->jobs[id];
    if (commit) x->wanted[id] = 0;
    return 1;
}

static void t_done(void *ctx, int id, int status, const char *msg, double s, uint64_t b) {
    io_ctx *x = ctx;
    (void)s, (void)b;
    x->status[id] = status;
    snprintf(x->msg[id], sizeof x->msg[id], "%s", msg);
    x->order[x->n_done++] = id;
}

static void wait_done(io_ctx *x, int n) {
    pthread_mutex_lock(&x->mu);
    while (x->n_done < n) pthread_cond_wait(&x->cv, &x->mu);
    pthread_mutex_unlock(&x->mu);
}

static void test_io(int direct) {
    unsigned char *content;
    const size_t size = 3 << 20;
    char *path = strdup(make_file("edgemoe_io", size, &content));
    io_ctx *x = calloc(1, sizeof *x);
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->cv, NULL);
    emoe_io_config cfg = {.path = path, .n_threads = 1, .direct = direct, .max_merge_bytes = 1 << 20, .mu = &x->mu,
                          .cv_done = &x->cv, .start = t_start, .done = t_done, .ctx = x};
    char err[256];
    emoe_io *io = emoe_io_new(&cfg, err, sizeof err);
    CHECK(io != NULL, "emoe_io_new: %s", err);
    if (!io) return;
    if (direct) printf("  O_DIRECT: %s%s\n", emoe_io_direct(io) ? "on" : "off ", emoe_io_note(io));
    /* 1. priority order: 8 scattered requests with shuffled keys, queued while paused */
    unsigned char *bufs[64];
    const int n1 = 8;
    uint64_t keys[8] = {50, 10, 70, 20, 80, 30, 60, 40};
    pthread_mutex_lock(&x->mu);
    emoe_io_pause(io, 1);
    for (int i = 0; i < n1; i++) {
        const uint64_t off = (uint64_t)i * 300000 + (uint64_t)(rnd() % 1000), len = 1000 + rnd() % 100000;
        if (posix_memalign((void **)&bufs[i], 4096, (len + 8191) & ~(uint64_t)4095)) exit(2);
        x->jobs[i] = (emoe_io_job){.dst = bufs[i], .dst_cap = (len + 8191) & ~(uint64_t)4095, .off = off, .len = len,
                                   .crc32 = emoe_crc32(0, content + off, len), .check_crc = 1, .what = "job"};
        x->wanted[i] = 1;
        emoe_io_submit(io, i, 0, keys[i]);
    }
    emoe_io_pause(io, 0);
    pthread_mutex_unlock(&x->mu);
    wait_done(x, n1);
    const int expect[8] = {1, 3, 5, 7, 0, 6, 2, 4};
    for (int i = 0; i < n1; i++) {
        CHECK(x->order[i] == expect[i], "completion %d: request %d, expected %d (priority order)", i, x->order[i],
              expect[i]);
        const int id = x->order[i];
        CHECK(x->status[id] == 0, "request %d: %s", id, x->msg[id]);
        CHECK(!memcmp(bufs[id], content + x->jobs[id].off, x->jobs[id].len), "request %d: wrong bytes", id);
    }
    /* 2. adjacent ranges (gaps < 4 KiB, like MWQ planes) merge into one read */
    pthread_mutex_lock(&x->mu);
    x->n_done = 0;
    const uint64_t sys0 = emoe_io_syscalls(io);
    emoe_io_pause(io, 1);
    uint64_t off = 2 << 20;
    for (int i = 0; i < 6; i++) {
        const uint64_t len = 5000 + rnd() % 20000, id = 10 + (uint64_t)i;
        if (posix_memalign((void **)&bufs[id], 4096, (len + 8191) & ~(uint64_t)4095)) exit(2);
        x->jobs[id] = (emoe_io_job){.dst = bufs[id], .dst_cap = (len + 8191) & ~(uint64_t)4095, .off = off,
                                    .len = len, .crc32 = emoe_crc32(0, content + off, len), .check_crc = 1};
        x->wanted[id] = 1;
        emoe_io_submit(io, (int)id, 0, 100 + (uint64_t)i);
        off += len + (uint64_t)(i % 2 ? 0 : 37);
    }
    emoe_io_pause(io, 0);
    pthread_mutex_unlock(&x->mu);
    wait_done(x, 6);
    pthread_mutex_lock(&x->mu);
    const uint64_t calls = emoe_io_syscalls(io) - sys0;
    pthread_mutex_unlock(&x->mu);
    CHECK(calls == 1, "6 adjacent ranges took %llu reads, expected 1 (merged)", (unsigned long long)calls);
    for (int i = 0; i < 6; i++) {
        const int id = 10 + i;
        CHECK(x->status[id] == 0 && !memcmp(bufs[id], content + x->jobs[id].off, x->jobs[id].len),
              "merged request %d: status %d %s", id, x->status[id], x->msg[id]);
    }
    /* 3. a wrong checksum and a read past the end of the file are errors, and the thread goes on */
    pthread_mutex_lock(&x->mu);
    x->n_done = 0;
    x->jobs[20] = x->jobs[10];
    x->jobs[20].crc32 ^= 1;
    x->jobs[21] = x->jobs[11];
    x->jobs[21].off = size - 100;
    x->jobs[22] = x->jobs[12];
    x->wanted[20] = x->wanted[21] = x->wanted[22] = 1;
    emoe_io_submit(io, 20, 0, 1);
    emoe_io_submit(io, 21, 0, 2);
    emoe_io_submit(io, 22, 0, 3);
    pthread_mutex_unlock(&x->mu);
    wait_done(x, 3);
    CHECK(x->status[20] == EMOE_ERR_CORRUPT && strstr(x->msg[20], "checksum"), "bad crc: status %d (%s)",
          x->status[20], x->msg[20]);
    CHECK(x->status[21] == EMOE_ERR_IO && strstr(x->msg[21], "short read"), "read past EOF: status %d (%s)",
          x->status[21], x->msg[21]);
    CHECK(x->status[22] == 0, "the thread must go on after errors: %s", x->msg[22]);
    emoe_io_free(io);
    for (int i = 0; i < 64; i++)
        if (i < n1 || (i >= 10 && i < 16)) free(bufs[i]);
    unlink(path);
    free(path);
    free(content);
    pthread_mutex_destroy(&x->mu);
    pthread_cond_destroy(&x->cv);
    free(x);
}

/* ---- the cache ---- */

typedef struct {
    char *path;
    unsigned char *content;
    size_t size;
    int n;
    emoe_piece_desc *d;
} piece_file;

/* n_mat "matrices", each stored as K planes (P1 4 KiB aligned, later planes 64-byte aligned after the previous). */
static piece_file make_pieces(int n_mat, int K, uint64_t base_len, uint64_t ref_len) {
    piece_file pf = {0};
    pf.n = n_mat * K;
    pf.d = calloc((size_t)pf.n, sizeof(emoe_piece_desc));
    uint64_t off = 4096;
    for (int m = 0; m < n_mat; m++) {
        off = (off + 4095) & ~(uint64_t)4095;
        for (int k = 0; k < K; k++) {
            off = (off + 63) & ~(uint64_t)63;
            const uint64_t len = (k ? ref_len : base_len) + (uint64_t)(rnd() % 64);
            pf.d[m * K + k] = (emoe_piece_desc){.off = off, .nbytes = len, .level = k, .name = "synthetic"};
            off += len;
        }
    }
    pf.size = off + 1000;
    pf.path = strdup(make_file("edgemoe_cache", pf.size, &pf.content));
    for (int i = 0; i < pf.n; i++) pf.d[i].crc32 = emoe_crc32(0, pf.content + pf.d[i].off, pf.d[i].nbytes);
    return pf;
}

static void free_pieces(piece_file *pf) {
    unlink(pf->path);
    free(pf->path);
    free(pf->content);
    free(pf->d);
}

static int cache_policy = EMOE_EVICT_LRU, cache_groups = 1; /* of the caches new_cache makes */

static emoe_cache *new_cache(piece_file *pf, uint64_t cap, int direct, int threads, int verify) {
    emoe_cache_config cfg = {.path = pf->path, .capacity = cap, .n_pieces = pf->n, .pieces = pf->d,
                             .io_threads = threads, .direct = direct, .verify = verify, .n_groups = cache_groups,
                             .policy = cache_policy};
    char err[256];
    emoe_cache *c = emoe_cache_new(&cfg, err, sizeof err);
    CHECK(c != NULL, "emoe_cache_new: %s", err);
    return c;
}

static void check_cache(emoe_cache *c, const char *when) {
    char err[256];
    int rc = emoe_cache_check(c, err, sizeof err);
    CHECK(rc == EMOE_OK, "accounting broken %s: %s", when, err);
    emoe_cache_stats s;
    emoe_cache_get_stats(c, &s);
    CHECK(s.used <= s.capacity && s.peak_used <= s.capacity, "used %llu / peak %llu > capacity %llu %s",
          (unsigned long long)s.used, (unsigned long long)s.peak_used, (unsigned long long)s.capacity, when);
}

/* Acquire one group, wait for it, compare its bytes with the file, release. Returns the wait status. */
static int use_group(emoe_cache *c, piece_file *pf, const int *ids, int n, uint64_t key0) {
    uint64_t keys[32];
    for (int i = 0; i < n; i++) keys[i] = key0 + (uint64_t)i;
    int rc = emoe_cache_acquire(c, ids, n, keys);
    if (rc) return rc;
    int starts[2] = {0, n};
    rc = emoe_cache_wait_groups(c, ids, starts, NULL, 1, NULL, 0);
    if (rc == 0)
        for (int i = 0; i < n; i++) {
            const unsigned char *d = emoe_cache_data(c, ids[i]);
            CHECK(d && !memcmp(d, pf->content + pf->d[ids[i]].off, pf->d[ids[i]].nbytes), "piece %d: wrong bytes",
                  ids[i]);
        }
    emoe_cache_release(c, ids, n);
    return rc;
}

static void test_cache_random(int iters, int direct, int threads, int policy) {
    const int n_mat = 24, K = 3;
    piece_file pf = make_pieces(n_mat, K, 20000, 9000);
    for (int i = 0; i < pf.n; i++) pf.d[i].group = (i / K) % 4; /* 4 layers: every policy's per-layer structures */
    cache_policy = policy, cache_groups = 4;
    const uint64_t cap = 5 * emoe_cache_slot_bytes(20064) + 7 * emoe_cache_slot_bytes(9064);
    emoe_cache *c = new_cache(&pf, cap, direct, threads, EMOE_VERIFY_ALWAYS);
    cache_policy = EMOE_EVICT_LRU, cache_groups = 1;
    if (!c) return;
    int full = 0, ok = 0;
    for (int it = 0; it < iters; it++) {
        emoe_cache_set_position(c, it % 4, (uint64_t)it / 8);
        if (rnd() % 5 == 0) /* the prefetches of a passed layer: first to go */
            emoe_cache_expire_prefetches(c, 1u << 20, (1u << 20) + 1);
        int ids[12], n = 0;
        const int n_m = 1 + (int)(rnd() % 3); /* 1..3 matrices, each a prefix of its planes */
        for (int j = 0; j < n_m; j++) {
            const int m = (int)(rnd() % n_mat), k = 1 + (int)(rnd() % K);
            for (int p = 0; p < k; p++) {
                int dup = 0;
                for (int q = 0; q < n; q++) dup |= ids[q] == m * K + p;
                if (!dup) ids[n++] = m * K + p;
            }
        }
        if (rnd() % 3 == 0) { /* a prefetch of something else first */
            int pids[3];
            const int m = (int)(rnd() % n_mat);
            for (int p = 0; p < 3; p++) pids[p] = m * K + p;
            emoe_cache_prefetch(c, pids, 1 + (int)(rnd() % 3), 1u << 20, INFINITY);
        }
        int rc = use_group(c, &pf, ids, n, (uint64_t)it * 16);
        for (int retry = 0; rc == EMOE_CACHE_FULL && retry < 100; retry++) { /* in-flight prefetches: wait, retry */
            full++;
            emoe_cache_wait_io(c);
            rc = use_group(c, &pf, ids, n, (uint64_t)it * 16);
        }
        if (rc == EMOE_CACHE_FULL) full++;
        else ok++;
        CHECK(rc == EMOE_OK, "iteration %d: status %d: %s", it, rc, emoe_cache_error(c));
        if (it % 7 == 0) check_cache(c, "during the random run");
    }
    check_cache(c, "after the random run");
    emoe_cache_stats s;
    emoe_cache_get_stats(c, &s);
    uint64_t hits = 0, misses = 0;
    for (int l = 0; l < EMOE_CACHE_MAX_LEVELS; l++) hits += s.hits[l], misses += s.misses[l] + s.late[l];
    printf("  random (policy %d, direct=%d, %d io threads): %d groups served, %d full; hits %llu misses %llu, %llu evictions, "
           "%llu cancelled, %.1f MB read in %llu syscalls, peak %llu of %llu bytes\n",
           policy, direct, threads, ok, full, (unsigned long long)hits, (unsigned long long)misses,
           (unsigned long long)s.evictions, (unsigned long long)s.cancelled, s.bytes_read / 1e6,
           (unsigned long long)s.read_syscalls, (unsigned long long)s.peak_used, (unsigned long long)s.capacity);
    CHECK(hits > 0 && misses > 0 && s.evictions > 0, "the random run should hit, miss and evict");
    CHECK(s.crc_checked == s.pieces_read && !s.crc_failures, "verify=always: %llu checked, %llu read, %llu failed",
          (unsigned long long)s.crc_checked, (unsigned long long)s.pieces_read, (unsigned long long)s.crc_failures);
    emoe_cache_free(c);
    free_pieces(&pf);
}

static void test_cache_policy(void) {
    /* 4 matrices x 2 planes; room for exactly 3 base + 2 refinement slots */
    piece_file pf = make_pieces(6, 2, 8000, 4000);
    const uint64_t sb = emoe_cache_slot_bytes(8064), sr = emoe_cache_slot_bytes(4064);
    emoe_cache *c = new_cache(&pf, 3 * sb + 2 * sr, 0, 1, EMOE_VERIFY_FIRST);
    if (!c) return;
    /* load m0 (base+ref), m1 (base+ref), m2 (base): full */
    int g0[2] = {0, 1}, g1[2] = {2, 3}, g2[1] = {4};
    CHECK(use_group(c, &pf, g0, 2, 0) == 0, "m0: %s", emoe_cache_error(c));
    CHECK(use_group(c, &pf, g1, 2, 0) == 0, "m1: %s", emoe_cache_error(c));
    CHECK(use_group(c, &pf, g2, 1, 0) == 0, "m2: %s", emoe_cache_error(c));
    /* touch m0's base so m1's base is the least recently used base */
    int b0[1] = {0};
    CHECK(use_group(c, &pf, b0, 1, 0) == 0, "m0 again");
    /* a new refinement-sized piece: evicts a refinement plane (m0's is the LRU one), not a base plane */
    int r3[1] = {7};
    CHECK(use_group(c, &pf, r3, 1, 0) == 0, "m3 ref: %s", emoe_cache_error(c));
    CHECK(emoe_cache_state(c, 1) == EMOE_PIECE_EMPTY, "the LRU refinement plane (m0 P2) should have been evicted");
    CHECK(emoe_cache_state(c, 0) == EMOE_PIECE_READY && emoe_cache_state(c, 2) == EMOE_PIECE_READY &&
              emoe_cache_state(c, 4) == EMOE_PIECE_READY, "base planes must stay while refinement planes can go");
    /* a base-sized piece: frees refinement planes first (m1 P2, then m3 P2: together not enough contiguous room
     * maybe), then the LRU base plane (m1's) */
    int b4[1] = {8};
    CHECK(use_group(c, &pf, b4, 1, 0) == 0, "m4 base: %s", emoe_cache_error(c));
    CHECK(emoe_cache_state(c, 0) == EMOE_PIECE_READY, "m0's base was used recently: it stays");
    check_cache(c, "after the policy test");
    /* pins: pin m0 base and m2 base, then ask for 2 more bases + 2 refs: must not evict the pinned ones */
    uint64_t keys[4] = {0, 1, 2, 3};
    int pin[2] = {0, 4};
    CHECK(emoe_cache_acquire(c, pin, 2, keys) == 0, "pin");
    int more[3] = {10, 8, 6};
    int rc = emoe_cache_acquire(c, more, 3, keys);
    CHECK(rc == EMOE_OK || rc == EMOE_CACHE_FULL, "acquire with pins: %d", rc);
    if (rc == EMOE_OK) {
        int st[2] = {0, 3};
        CHECK(emoe_cache_wait_groups(c, more, st, NULL, 1, NULL, 0) == 0, "wait");
        emoe_cache_release(c, more, 3);
    }
    CHECK(emoe_cache_state(c, 0) == EMOE_PIECE_READY && emoe_cache_state(c, 4) == EMOE_PIECE_READY,
          "pinned pieces must never be evicted");
    /* too much at once while pinned: FULL (not an error), nothing left pinned by the failed call */
    int big[4] = {2, 6, 8, 10};
    rc = emoe_cache_acquire(c, big, 4, keys);
    CHECK(rc == EMOE_CACHE_FULL, "4 bases + 2 pinned in a 3-base cache: expected FULL, got %d", rc);
    emoe_cache_stats s;
    emoe_cache_get_stats(c, &s);
    CHECK(s.pinned_bytes == 2 * sb, "after a failed acquire only the 2 earlier pins remain (%llu bytes pinned)",
          (unsigned long long)s.pinned_bytes);
    emoe_cache_release(c, pin, 2);
    /* more than the whole cache: a budget error with a message */
    int huge[5] = {0, 2, 4, 6, 8};
    rc = emoe_cache_acquire(c, huge, 5, keys);
    CHECK(rc == EMOE_ERR_BUDGET && strstr(emoe_cache_error(c), "do not fit"), "5 bases in a 3-base cache: %d (%s)", rc,
          emoe_cache_error(c));
    check_cache(c, "after pins");
    emoe_cache_free(c);
    free_pieces(&pf);
}

/* The layer-cyclic policy evicts the layer just computed (furthest next use); LRU evicts the oldest. */
static void test_cache_cyclic(void) {
    for (int policy = EMOE_EVICT_LRU; policy <= EMOE_EVICT_CYCLIC; policy++) {
        piece_file pf = make_pieces(8, 1, 20000, 0);
        for (int i = 0; i < 8; i++) pf.d[i].group = i / 2; /* 4 layers x 2 experts */
        emoe_cache_config cfg = {.path = pf.path, .capacity = 6 * emoe_cache_slot_bytes(20064), .n_pieces = 8,
                                 .pieces = pf.d, .io_threads = 1, .n_groups = 4, .policy = policy};
        char err[256];
        emoe_cache *c = emoe_cache_new(&cfg, err, sizeof err);
        CHECK(c != NULL, "emoe_cache_new: %s", err);
        if (!c) return;
        for (int l = 0; l < 3; l++) { /* layers 0, 1, 2 in order: 6 pieces, full */
            emoe_cache_set_position(c, l, 0);
            int g[2] = {2 * l, 2 * l + 1};
            CHECK(use_group(c, &pf, g, 2, 0) == 0, "layer %d", l);
        }
        emoe_cache_set_position(c, 3, 0);
        int g3[1] = {6};
        CHECK(use_group(c, &pf, g3, 1, 0) == 0, "layer 3");
        if (policy == EMOE_EVICT_LRU)
            CHECK(emoe_cache_state(c, 0) == EMOE_PIECE_EMPTY && emoe_cache_state(c, 4) == EMOE_PIECE_READY,
                  "LRU evicts layer 0's oldest piece");
        else /* position 3: layer 3 is being computed; the furthest next use among the others is layer 2's */
            CHECK(emoe_cache_state(c, 4) == EMOE_PIECE_EMPTY && emoe_cache_state(c, 0) == EMOE_PIECE_READY &&
                      emoe_cache_state(c, 2) == EMOE_PIECE_READY, "CYCLIC evicts the layer just computed (2)");
        check_cache(c, "after the cyclic test");
        emoe_cache_free(c);
        free_pieces(&pf);
    }
}

/* LRU + frequency: a piece used in many tokens outlives pieces used once more recently. */
static void test_cache_freq(void) {
    piece_file pf = make_pieces(6, 1, 20000, 0);
    for (int i = 0; i < 6; i++) pf.d[i].group = i % 3;
    emoe_cache_config cfg = {.path = pf.path, .capacity = 3 * emoe_cache_slot_bytes(20064), .n_pieces = 6,
                             .pieces = pf.d, .io_threads = 1, .n_groups = 3, .policy = EMOE_EVICT_FREQ};
    char err[256];
    emoe_cache *c = emoe_cache_new(&cfg, err, sizeof err);
    CHECK(c != NULL, "emoe_cache_new: %s", err);
    if (!c) return;
    int hot[1] = {0}, a[1] = {1}, b[1] = {2}, d[1] = {3};
    for (uint64_t t = 0; t < 5; t++) { /* piece 0 used in tokens 0..4 */
        emoe_cache_set_position(c, 0, t);
        CHECK(use_group(c, &pf, hot, 1, 0) == 0, "hot");
    }
    emoe_cache_set_position(c, 1, 5);
    CHECK(use_group(c, &pf, a, 1, 0) == 0, "a");
    emoe_cache_set_position(c, 2, 6);
    CHECK(use_group(c, &pf, b, 1, 0) == 0, "b");
    emoe_cache_set_position(c, 0, 7);
    CHECK(use_group(c, &pf, d, 1, 0) == 0, "d"); /* full: one must go */
    CHECK(emoe_cache_state(c, 0) == EMOE_PIECE_READY, "the hot piece (5 uses, the last 3 tokens ago) stays");
    CHECK(emoe_cache_state(c, 1) == EMOE_PIECE_EMPTY, "the piece used once, longest ago, goes");
    check_cache(c, "after the freq test");
    emoe_cache_free(c);
    free_pieces(&pf);
}

/* EMOE_EVICT_FREQ's victim (found through per-layer heaps) is the one a scan of every resident piece picks: the
 * lowest decayed frequency, ties to the layer whose next visit is furthest, then least recently used. Equal pieces in
 * a full cache: every miss evicts exactly one, predicted here by the scan. */
static void test_cache_freq_reference(int n, int slots, int groups, int steps) {
    piece_file pf = make_pieces(n, 1, 4000, 0);
    for (int i = 0; i < n; i++) pf.d[i].group = i % groups;
    cache_policy = EMOE_EVICT_FREQ, cache_groups = groups;
    emoe_cache *c = new_cache(&pf, (uint64_t)slots * emoe_cache_slot_bytes(4000), 0, 1, EMOE_VERIFY_NEVER);
    cache_policy = EMOE_EVICT_LRU, cache_groups = 1;
    if (!c) return;
    double *freq = calloc((size_t)n, sizeof(double));
    uint64_t *fep = calloc((size_t)n, sizeof(uint64_t)), *last = calloc((size_t)n, sizeof(uint64_t)), clock = 0;
    unsigned char *ready = calloc((size_t)n, 1);
    int n_ready = 0, wrong = 0;
    for (int it = 0; it < steps && !wrong; it++) {
        const uint64_t epoch = (uint64_t)it / 16;
        const int g = (int)(rnd() % (uint64_t)groups), per = n / groups;
        const uint64_t a = rnd() % (uint64_t)per, b = rnd() % (uint64_t)per; /* skewed: low indices are hot */
        const int id = (int)(a < b ? a : b) * groups + g;
        emoe_cache_set_position(c, g, epoch);
        int victim = -1;
        if (!ready[id] && n_ready == slots) {
            double best_key = 0.0;
            int best_dist = 0;
            for (int j = 0; j < n; j++) {
                if (!ready[j]) continue;
                const double k = freq[j] > 0 ? log(freq[j]) - (double)fep[j] * log(0.9) : -INFINITY;
                const int d0 = (j % groups - g + groups) % groups, dist = d0 ? d0 : groups;
                if (victim < 0 || k < best_key - 1e-9 ||
                    (k <= best_key + 1e-9 && (dist > best_dist || (dist == best_dist && last[j] < last[victim]))))
                    victim = j, best_key = k, best_dist = dist;
            }
        }
        CHECK(use_group(c, &pf, &id, 1, 0) == EMOE_OK, "step %d: %s", it, emoe_cache_error(c));
        if (epoch >= fep[id]) freq[id] = freq[id] * pow(0.9, (double)(epoch - fep[id])) + 1.0, fep[id] = epoch;
        last[id] = ++clock;
        if (!ready[id]) ready[id] = 1, n_ready++;
        if (victim >= 0) {
            ready[victim] = 0, n_ready--;
            if (emoe_cache_state(c, victim) != EMOE_PIECE_EMPTY) wrong = 1;
            CHECK(!wrong, "step %d: the scan's victim %d (layer %d) is still resident", it, victim, victim % groups);
        }
        if (it % 500 == 0 || it == steps - 1) {
            int agree = 1;
            for (int j = 0; j < n; j++) agree &= (emoe_cache_state(c, j) == EMOE_PIECE_READY) == ready[j];
            CHECK(agree, "step %d: the resident set differs from the reference's", it);
            check_cache(c, "in the reference run");
        }
    }
    emoe_cache_stats s;
    emoe_cache_get_stats(c, &s);
    printf("  %d pieces, %d slots, %d layers: %d steps, %llu evictions, all victims as the scan's: %s\n", n, slots,
           groups, steps, (unsigned long long)s.evictions, wrong ? "no" : "yes");
    CHECK(s.evictions > 0, "the reference run should evict");
    free(freq), free(fep), free(last), free(ready);
    emoe_cache_free(c);
    free_pieces(&pf);
}

static void test_cache_prefetch(void) {
    piece_file pf = make_pieces(8, 1, 30000, 0);
    emoe_cache *c = new_cache(&pf, 4 * emoe_cache_slot_bytes(30064), 0, 1, EMOE_VERIFY_FIRST);
    if (!c) return;
    int p[2] = {3, 5};
    CHECK(emoe_cache_prefetch(c, p, 2, 1000, INFINITY) == 2, "prefetch queues 2");
    int g[1] = {3};
    CHECK(use_group(c, &pf, g, 1, 0) == 0, "use a prefetched piece");
    emoe_cache_stats s;
    emoe_cache_get_stats(c, &s);
    CHECK(s.prefetch_issued == 2 && s.prefetch_used == 1, "prefetch issued %llu used %llu",
          (unsigned long long)s.prefetch_issued, (unsigned long long)s.prefetch_used);
    /* a prefetch never evicts an unused prefetched piece; demand does */
    int q[3] = {0, 1, 2};
    CHECK(use_group(c, &pf, q, 3, 0) == 0, "demand 3 (evicts what it must)");
    int q2[4] = {4, 6, 7, 0};
    emoe_cache_prefetch(c, q2, 4, 2000, INFINITY);
    check_cache(c, "after prefetches");
    emoe_cache_get_stats(c, &s);
    CHECK(s.used <= s.capacity, "prefetch respects the capacity");
    /* clear: everything unpinned goes */
    emoe_cache_clear(c);
    int wait_ids[1] = {4};
    (void)wait_ids;
    emoe_cache_get_stats(c, &s);
    check_cache(c, "after clear");
    emoe_cache_free(c);
    free_pieces(&pf);
}

/* Prefetch admission: a guess takes free memory, or evicts only a piece whose decayed use frequency is below the
 * guessed piece's own plus the caller's confidence; never a piece the cache values more. */
static void test_cache_prefetch_admission(void) {
    piece_file pf = make_pieces(6, 1, 20000, 0);
    emoe_cache_config cfg = {.path = pf.path, .capacity = 3 * emoe_cache_slot_bytes(20064), .n_pieces = 6,
                             .pieces = pf.d, .io_threads = 1, .n_groups = 1, .policy = EMOE_EVICT_FREQ};
    char err[256];
    emoe_cache *c = emoe_cache_new(&cfg, err, sizeof err);
    CHECK(c != NULL, "emoe_cache_new: %s", err);
    if (!c) return;
    int p0[1] = {0}, p1[1] = {1}, p2[1] = {2}, p3[1] = {3}, p4[1] = {4}, p5[1] = {5};
    /* free memory: any guess is admitted, even with no confidence at all */
    CHECK(emoe_cache_prefetch(c, p5, 1, 100, -INFINITY) == 1, "a prefetch into free memory is admitted");
    emoe_cache_wait_io(c);
    CHECK(use_group(c, &pf, p5, 1, 0) == 0, "use the prefetched piece");
    for (uint64_t t = 0; t < 3; t++) { /* piece 0 used in tokens 0..2, piece 1 in token 2 */
        emoe_cache_set_position(c, 0, t);
        CHECK(use_group(c, &pf, p0, 1, 0) == 0, "p0");
    }
    CHECK(use_group(c, &pf, p1, 1, 0) == 0, "p1"); /* full now: 5 (1 use, token 0), 0, 1 */
    double r0 = emoe_cache_retention(c, 0), r1 = emoe_cache_retention(c, 1), r5 = emoe_cache_retention(c, 5);
    CHECK(fabs(r0 - (1 + 0.9 + 0.81)) < 1e-9 && fabs(r1 - 1.0) < 1e-9 && fabs(r5 - 0.81) < 1e-9,
          "retention: %g %g %g, expected 2.71 1 0.81", r0, r1, r5);
    CHECK(emoe_cache_retention(c, 2) == 0.0, "a piece never used has retention 0");
    /* full: a guess worth less than every resident piece (0.81 at the least) is refused and evicts nothing */
    CHECK(emoe_cache_prefetch(c, p2, 1, 100, -INFINITY) == 0, "no free memory, no confidence: refused");
    CHECK(emoe_cache_prefetch(c, p2, 1, 100, 0.8) == 0, "confidence 0.8 < retention 0.81: refused");
    CHECK(emoe_cache_state(c, 5) == EMOE_PIECE_READY && emoe_cache_state(c, 0) == EMOE_PIECE_READY &&
          emoe_cache_state(c, 1) == EMOE_PIECE_READY, "refused prefetches evict nothing");
    /* ten tokens later piece 5 has decayed to 0.81 * 0.9^10 = 0.28; pieces 0 and 1 are used again */
    emoe_cache_set_position(c, 0, 12);
    CHECK(use_group(c, &pf, p0, 1, 0) == 0 && use_group(c, &pf, p1, 1, 0) == 0, "p0 p1 again");
    CHECK(emoe_cache_prefetch(c, p2, 1, 100, 0.25) == 0, "confidence 0.25 < 0.28: refused");
    CHECK(emoe_cache_state(c, 5) == EMOE_PIECE_READY, "still resident");
    CHECK(emoe_cache_prefetch(c, p2, 1, 100, 0.3) == 1, "confidence 0.3 > 0.28: admitted");
    CHECK(emoe_cache_state(c, 5) == EMOE_PIECE_EMPTY, "the piece worth less was evicted for it");
    CHECK(emoe_cache_state(c, 0) == EMOE_PIECE_READY && emoe_cache_state(c, 1) == EMOE_PIECE_READY,
          "the pieces worth more stay");
    emoe_cache_wait_io(c);
    CHECK(emoe_cache_prefetch(c, p3, 1, 100, 0.99) == 0, "an unused prefetch is never evicted for another guess, "
          "and pieces 0, 1 are worth more than 0.99");
    CHECK(emoe_cache_state(c, 2) == EMOE_PIECE_READY, "the unused prefetch stays");
    CHECK(use_group(c, &pf, p2, 1, 0) == 0, "use the prefetched piece 2");
    for (uint64_t t = 13; t < 40; t++) { /* piece 1 goes cold, 0 and 2 stay hot */
        emoe_cache_set_position(c, 0, t);
        CHECK(use_group(c, &pf, p0, 1, 0) == 0 && use_group(c, &pf, p2, 1, 0) == 0, "p0 p2");
    }
    /* the guessed piece's own history counts: piece 5 (evicted, its uses long ago) plus a confidence that alone
     * would not beat piece 1 */
    r1 = emoe_cache_retention(c, 1), r5 = emoe_cache_retention(c, 5);
    CHECK(r5 > 0.01 && r1 > r5 + 0.01 && r1 < 0.1, "retention: piece 1 %g, piece 5 %g", r1, r5);
    CHECK(emoe_cache_prefetch(c, p5, 1, 100, r1 - r5 - 0.005) == 0, "history + confidence < piece 1's: refused");
    CHECK(emoe_cache_prefetch(c, p4, 1, 100, r1 - r5 + 0.005) == 0, "the same confidence without history: refused");
    CHECK(emoe_cache_prefetch(c, p5, 1, 100, r1 - r5 + 0.005) == 1, "history + confidence > piece 1's: admitted");
    CHECK(emoe_cache_state(c, 1) == EMOE_PIECE_EMPTY && emoe_cache_state(c, 0) == EMOE_PIECE_READY &&
          emoe_cache_state(c, 2) == EMOE_PIECE_READY, "the coldest piece (1) went");
    emoe_cache_wait_io(c);
    CHECK(emoe_cache_prefetch(c, p4, 1, 100, INFINITY) == 1, "INFINITY: evicts as demand would");
    CHECK(emoe_cache_state(c, 5) != EMOE_PIECE_EMPTY, "but never an unused prefetch");
    emoe_cache_wait_io(c);
    emoe_cache_wait_io(c);
    check_cache(c, "after the admission test");
    emoe_cache_stats s;
    emoe_cache_get_stats(c, &s);
    CHECK(s.prefetch_issued == 4 && s.prefetch_used == 2, "prefetch issued %llu used %llu, expected 4 and 2",
          (unsigned long long)s.prefetch_issued, (unsigned long long)s.prefetch_used);
    emoe_cache_free(c);
    free_pieces(&pf);
}

/* Many pieces fail at once on several I/O threads: each writes its message while the compute thread reads the last
 * one. The message the caller gets must be whole (a torn or empty one was seen in CI). */
static void test_cache_concurrent_errors(int rounds) {
    piece_file pf = make_pieces(16, 2, 6000, 3000);
    emoe_cache *c = new_cache(&pf, (uint64_t)pf.n * emoe_cache_slot_bytes(6064), 0, 4, EMOE_VERIFY_ALWAYS);
    if (!c) return;
    for (int i = 0; i < pf.n; i++) { /* every piece corrupt */
        unsigned char bad = (unsigned char)(pf.content[pf.d[i].off + 10] ^ 0x55);
        patch_file(pf.path, pf.d[i].off + 10, &bad, 1);
    }
    int ids[32], bad_msgs = 0;
    for (int i = 0; i < pf.n; i++) ids[i] = i;
    for (int r = 0; r < rounds; r++) {
        const int rc = use_group(c, &pf, ids, pf.n, 0);
        const char *msg = emoe_cache_error(c);
        if (rc != EMOE_ERR_CORRUPT || !strstr(msg, "checksum mismatch") || !strstr(msg, "(piece: plane")) {
            if (!bad_msgs++) printf("  round %d: status %d, message '%s'\n", r, rc, msg);
        }
        emoe_cache_wait_io(c); /* let the stragglers land */
    }
    CHECK(bad_msgs == 0, "%d of %d rounds gave a wrong status or a torn message", bad_msgs, rounds);
    emoe_cache_free(c);
    free_pieces(&pf);
}

static void test_cache_errors(void) {
    piece_file pf = make_pieces(6, 2, 12000, 5000);
    emoe_cache *c = new_cache(&pf, 4 * emoe_cache_slot_bytes(12064), 0, 1, EMOE_VERIFY_ALWAYS);
    if (!c) return;
    /* corrupt plane 2 of matrix 3 (piece 7) */
    unsigned char bad = (unsigned char)(pf.content[pf.d[7].off + 100] ^ 0x55);
    patch_file(pf.path, pf.d[7].off + 100, &bad, 1);
    int g[2] = {6, 7};
    int rc = use_group(c, &pf, g, 2, 0);
    CHECK(rc == EMOE_ERR_CORRUPT, "corrupt plane: status %d, expected EMOE_ERR_CORRUPT", rc);
    CHECK(strstr(emoe_cache_error(c), "checksum") && strstr(emoe_cache_error(c), "plane 2"), "message: %s",
          emoe_cache_error(c));
    printf("  corrupt plane -> %s\n", emoe_cache_error(c));
    check_cache(c, "after a checksum error");
    /* the same request again fails again (re-read, not a cached failure), then succeeds once the file is fixed */
    CHECK(use_group(c, &pf, g, 2, 0) == EMOE_ERR_CORRUPT, "still corrupt");
    patch_file(pf.path, pf.d[7].off + 100, &pf.content[pf.d[7].off + 100], 1);
    CHECK(use_group(c, &pf, g, 2, 0) == 0, "after repair the piece reads fine: %s", emoe_cache_error(c));
    /* truncate the file: reads beyond the end fail cleanly (no hang), earlier pieces still work */
    emoe_cache_clear(c);
    if (truncate(pf.path, (off_t)pf.d[8].off + 10)) CHECK(0, "truncate: %s", strerror(errno));
    int t[2] = {8, 9};
    rc = use_group(c, &pf, t, 2, 0);
    CHECK(rc == EMOE_ERR_IO && strstr(emoe_cache_error(c), "short read"), "truncated: %d (%s)", rc,
          emoe_cache_error(c));
    printf("  truncated file -> %s\n", emoe_cache_error(c));
    int early[2] = {0, 1};
    CHECK(use_group(c, &pf, early, 2, 0) == 0, "pieces before the cut still read: %s", emoe_cache_error(c));
    check_cache(c, "after read errors");
    emoe_cache_stats s;
    emoe_cache_get_stats(c, &s);
    CHECK(s.crc_failures == 2 && s.read_errors >= 1, "crc failures %llu, read errors %llu",
          (unsigned long long)s.crc_failures, (unsigned long long)s.read_errors);
    emoe_cache_free(c);
    free_pieces(&pf);
}

/* Several groups in flight, computed as they land (the forward pass's loop), with partial (adaptive) waits. */
static void test_cache_groups(void) {
    piece_file pf = make_pieces(8, 3, 40000, 20000);
    emoe_cache *c = new_cache(&pf, 64 * emoe_cache_slot_bytes(40064), 0, 1, EMOE_VERIFY_FIRST);
    if (!c) return;
    int ids[12], starts[5] = {0, 3, 6, 9, 12}, req[4] = {1, 1, 1, 1};
    uint64_t keys[12];
    for (int g = 0; g < 4; g++)
        for (int k = 0; k < 3; k++) ids[g * 3 + k] = (2 * g) * 3 + k, keys[g * 3 + k] = (uint64_t)(k * 4 + g);
    emoe_cache_pause_io(c, 1);
    CHECK(emoe_cache_acquire(c, ids, 12, keys) == 0, "acquire 4 groups");
    emoe_cache_pause_io(c, 0);
    unsigned char done[4] = {0};
    int served = 0;
    for (;;) {
        int g = emoe_cache_wait_groups(c, ids, starts, req, 4, done, 0);
        if (g == -1) break;
        CHECK(g >= 0 && g < 4, "wait_groups: %d", g);
        if (g < 0) break;
        for (int k = 0; k < 3; k++)
            CHECK(emoe_cache_state(c, ids[g * 3 + k]) == EMOE_PIECE_READY, "group %d piece %d not ready", g, k);
        done[g] = 1;
        served++;
    }
    CHECK(served == 4, "served %d groups", served);
    emoe_cache_release(c, ids, 12);
    /* partial: base planes ready, refinement held back -> the group is returned at base precision */
    emoe_cache_clear(c);
    int one[3] = {3, 4, 5};
    uint64_t k3[3] = {0, 100, 101};
    CHECK(emoe_cache_acquire(c, one, 1, k3) == 0, "acquire the base");
    int st1[2] = {0, 1};
    CHECK(emoe_cache_wait_groups(c, one, st1, NULL, 1, NULL, 0) == 0, "base ready");
    emoe_cache_pause_io(c, 1);
    CHECK(emoe_cache_acquire(c, one + 1, 2, k3 + 1) == 0, "acquire the refinements (paused: stay queued)");
    int st3[2] = {0, 3}, rq[1] = {1};
    CHECK(emoe_cache_wait_groups(c, one, st3, rq, 1, NULL, 1) == 0, "partial wait returns at once");
    CHECK(emoe_cache_state(c, 4) == EMOE_PIECE_QUEUED, "refinement still queued");
    emoe_cache_requeue(c, one + 1, 2, ~(uint64_t)0 >> 1);
    emoe_cache_release(c, one, 3);
    emoe_cache_pause_io(c, 0);
    check_cache(c, "after groups");
    emoe_cache_free(c);
    free_pieces(&pf);
}

/* ---- HEBF ---- */

static void test_hebf(void) {
    emoe_hebf_item out[64];
    /* batch 1, 2 levels: base planes by weight, then refinement planes by weight */
    int32_t e1[4] = {5, 2, 7, 0};
    float w1[4] = {0.1f, 0.4f, 0.3f, 0.2f};
    int n = emoe_hebf_order(1, 4, e1, w1, NULL, 8, 2, out, 64, NULL);
    CHECK(n == 8, "batch 1: %d items", n);
    const int order[4] = {2, 7, 0, 5};
    for (int i = 0; i < 8 && n == 8; i++)
        CHECK(out[i].level == i / 4 && out[i].expert == order[i % 4], "batch 1 item %d: (%d, %d), expected (%d, %d)",
              i, out[i].expert, out[i].level, order[i % 4], i / 4);
    /* batch 3 with per-token levels: counts of tokens needing >= each level decide */
    int32_t e3[6] = {1, 2, 1, 3, 2, 1};
    float w3[6] = {0.5f, 0.5f, 0.9f, 0.1f, 0.6f, 0.4f};
    int32_t l3[6] = {3, 1, 2, 3, 1, 1};
    n = emoe_hebf_order(3, 2, e3, w3, l3, 4, 3, out, 64, NULL);
    /* level 0: e1 (3 tokens), e2 (2), e3 (1); level 1: e1 (2 tokens: t0,t1), e3 (1); level 2: e1 (1, w .5), e3 (1,
     * w .1) */
    const int ex[7][2] = {{1, 0}, {2, 0}, {3, 0}, {1, 1}, {3, 1}, {1, 2}, {3, 2}};
    CHECK(n == 7, "batch 3: %d items", n);
    for (int i = 0; i < 7 && n == 7; i++)
        CHECK(out[i].expert == ex[i][0] && out[i].level == ex[i][1], "batch 3 item %d: (%d, %d), expected (%d, %d)", i,
              out[i].expert, out[i].level, ex[i][0], ex[i][1]);
    /* merged experts: one token naming expert 4 twice counts once with summed weight */
    int32_t em[3] = {4, 4, 1};
    float wm[3] = {0.2f, 0.3f, 0.4f};
    n = emoe_hebf_order(1, 3, em, wm, NULL, 6, 1, out, 64, NULL);
    CHECK(n == 2 && out[0].expert == 4 && out[0].n_tok == 1 && out[0].weight > 0.49f && out[1].expert == 1,
          "merged duplicates: n=%d first (%d, n_tok %d, w %.2f)", n, out[0].expert, out[0].n_tok, out[0].weight);
    CHECK(emoe_hebf_order(1, 4, e1, w1, NULL, 8, 2, out, 3, NULL) == EMOE_ERR_ARG, "too small out -> error");
    int32_t bad[1] = {9};
    CHECK(emoe_hebf_order(1, 1, bad, w1, NULL, 8, 1, out, 64, NULL) == EMOE_ERR_ARG, "expert out of range -> error");
}

/* The cost of an eviction in a cache of n pieces (a real model: 16 layers x 64 experts x 3 matrices x planes, 10k to
 * 70k pieces): n pieces of 4 KiB in 16 layers, 4 plane levels, all reading the same 1 MiB of a file (only the
 * bookkeeping is measured); the cache holds a quarter of them. Each step acquires a random piece (a miss evicts one),
 * waits for it and releases it; the time of emoe_cache_acquire is averaged over the steps after the cache filled. */
static void bench_evict(int n, int policy, int steps) {
    unsigned char *content;
    char *path = strdup(make_file("edgemoe_evict", 1 << 20, &content));
    emoe_piece_desc *d = calloc((size_t)n, sizeof *d);
    for (int i = 0; i < n; i++)
        d[i] = (emoe_piece_desc){.off = (uint64_t)(i % 256) * 4096, .nbytes = 4096, .level = i % 4,
                                 .group = (i / 4) % 16};
    emoe_cache_config cfg = {.path = path, .capacity = (uint64_t)(n / 4) * 4096, .n_pieces = n, .pieces = d,
                             .io_threads = 1, .verify = EMOE_VERIFY_NEVER, .n_groups = 16, .policy = policy};
    char err[256];
    emoe_cache *c = emoe_cache_new(&cfg, err, sizeof err);
    if (!c) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    double t_acq = 0;
    uint64_t key = 0;
    for (int s = 0; s < n / 4 + steps; s++) {
        const int id = s < n / 4 ? s : (int)(rnd() % (uint64_t)n);
        emoe_cache_set_position(c, d[id].group, (uint64_t)s / 64);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        const int rc = emoe_cache_acquire(c, &id, 1, &key);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        int st[2] = {0, 1};
        if (rc || emoe_cache_wait_groups(c, &id, st, NULL, 1, NULL, 0) != 0) {
            fprintf(stderr, "acquire: %d %s\n", rc, emoe_cache_error(c));
            break;
        }
        emoe_cache_release(c, &id, 1);
        if (s >= n / 4) t_acq += (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    }
    emoe_cache_stats cs;
    emoe_cache_get_stats(c, &cs);
    printf("%d pieces, policy %d: %.2f us per acquire (%d acquires, %llu evictions)\n", n, policy, 1e6 * t_acq / steps,
           steps, (unsigned long long)cs.evictions);
    emoe_cache_free(c);
    free(d);
    unlink(path);
    free(path);
    free(content);
}

int main(int argc, char **argv) {
    int iters = 3000, bench_n = 0, policy = EMOE_EVICT_FREQ;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) rng_state = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--bench-evict") && i + 1 < argc) bench_n = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--policy") && i + 1 < argc) {
            ++i;
            policy = !strcmp(argv[i], "lru") ? EMOE_EVICT_LRU : !strcmp(argv[i], "cyclic") ? EMOE_EVICT_CYCLIC
                                                                                           : EMOE_EVICT_FREQ;
        }
    }
    const char *t = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s", t && *t ? t : "/tmp");
    if (bench_n > 0) {
        bench_evict(bench_n, policy, 5000);
        return 0;
    }
    printf("status strings\n");
    test_status_strings();
    printf("crc\n");
    test_crc();
    printf("io thread (buffered)\n");
    test_io(0);
    printf("io thread (O_DIRECT)\n");
    test_io(1);
    printf("cache: eviction policy and pins\n");
    test_cache_policy();
    printf("cache: layer-cyclic eviction\n");
    test_cache_cyclic();
    printf("cache: LRU + frequency eviction\n");
    test_cache_freq();
    printf("cache: prefetch\n");
    test_cache_prefetch();
    printf("cache: prefetch admission\n");
    test_cache_prefetch_admission();
    printf("cache: groups\n");
    test_cache_groups();
    printf("cache: errors\n");
    test_cache_errors();
    test_cache_concurrent_errors(200);
    printf("cache: random load\n");
    test_cache_random(iters, 0, 1, EMOE_EVICT_LRU);
    test_cache_random(iters / 3, 1, 1, EMOE_EVICT_FREQ);
    test_cache_random(iters / 3, 0, 2, EMOE_EVICT_CYCLIC);
    test_cache_random(iters / 3, 0, 2, EMOE_EVICT_FREQ);
    printf("cache: LRU + frequency victims against a reference scan\n");
    test_cache_freq_reference(3000, 600, 8, iters);
    printf("hebf\n");
    test_hebf();
    printf("%d checks, %d failures\n", n_check, n_fail);
    return n_fail ? 1 : 0;
}
