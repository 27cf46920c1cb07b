/* The I/O thread(s): a priority queue of read requests, pread/preadv into the client's memory, CRC-32 checks
 * (crc32.c). See io_thread.h for the protocol. */
#define _GNU_SOURCE
#include "io_thread.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "edgemoe.h"

/* O_DIRECT bounce buffer per thread (merged or unaligned reads go through it in chunks of this size). It is part of
 * the budget's scratch, and O_DIRECT is the default under a budget: 512 KiB keeps that at 1 MiB for 2 threads (was
 * 4 MiB each) while a chunk stays large enough for sequential device speed. */
#define BOUNCE_BYTES ((size_t)512 << 10)

typedef struct {
    uint64_t key, seq;
    int id;
    uint32_t tag;
} io_entry;

struct emoe_io;
typedef struct {
    struct emoe_io *io;
    pthread_t thread;
    int started;
    unsigned char *gap;    /* [EMOE_IO_MAX_GAP] sink for the holes of merged reads */
    unsigned char *bounce; /* [BOUNCE_BYTES], EMOE_IO_ALIGN-aligned (direct only) */
} io_worker;

struct emoe_io {
    emoe_io_config cfg;
    char *path;
    int fd;        /* buffered */
    int dfd;       /* O_DIRECT, or -1 */
    struct stat st0; /* the file as opened: size, mtime, inode (file_changed) */
    char note[EMOE_IO_MSG_LEN];
    pthread_cond_t cv_work;
    io_entry *heap; /* binary min-heap on (key, seq) */
    size_t n, cap;
    uint64_t seq, syscalls;
    int paused, stop;
    int n_workers;
    io_worker *workers;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- the queue ---- */

static int entry_less(const io_entry *a, const io_entry *b) {
    return a->key < b->key || (a->key == b->key && a->seq < b->seq);
}

static void heap_up(emoe_io *io, size_t i) {
    while (i) {
        size_t p = (i - 1) / 2;
        if (!entry_less(&io->heap[i], &io->heap[p])) break;
        io_entry t = io->heap[i];
        io->heap[i] = io->heap[p];
        io->heap[p] = t;
        i = p;
    }
}

static void heap_down(emoe_io *io, size_t i) {
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < io->n && entry_less(&io->heap[l], &io->heap[m])) m = l;
        if (r < io->n && entry_less(&io->heap[r], &io->heap[m])) m = r;
        if (m == i) break;
        io_entry t = io->heap[i];
        io->heap[i] = io->heap[m];
        io->heap[m] = t;
        i = m;
    }
}

static io_entry heap_pop(emoe_io *io) {
    io_entry top = io->heap[0];
    io->heap[0] = io->heap[--io->n];
    if (io->n) heap_down(io, 0);
    return top;
}

int emoe_io_submit(emoe_io *io, int id, uint32_t tag, uint64_t key) {
    if (io->n == io->cap) {
        size_t cap = io->cap ? 2 * io->cap : 256;
        io_entry *h = realloc(io->heap, cap * sizeof(io_entry));
        if (!h) return EMOE_ERR_NOMEM;
        io->heap = h, io->cap = cap;
    }
    io->heap[io->n] = (io_entry){.key = key, .seq = io->seq++, .id = id, .tag = tag};
    heap_up(io, io->n++);
    pthread_cond_signal(&io->cv_work);
    return EMOE_OK;
}

void emoe_io_pause(emoe_io *io, int paused) {
    io->paused = paused ? 1 : 0;
    if (!paused) pthread_cond_broadcast(&io->cv_work);
}

size_t emoe_io_queued(const emoe_io *io) { return io->n; }
int emoe_io_direct(const emoe_io *io) { return io->dfd >= 0; }
const char *emoe_io_note(const emoe_io *io) { return io->note; }
uint64_t emoe_io_syscalls(const emoe_io *io) { return io->syscalls; }

size_t emoe_io_overhead_bytes(const emoe_io_config *cfg) {
    const size_t per = EMOE_IO_MAX_GAP + (cfg->direct ? BOUNCE_BYTES + EMOE_IO_ALIGN : 0) + sizeof(io_worker);
    return (size_t)(cfg->n_threads > 0 ? cfg->n_threads : 1) * per + sizeof(struct emoe_io) + 64 * 1024 /* queue */;
}

/* ---- reading ---- */

/* preadv until every iovec is full. Returns 0, or -errno; *got = bytes read (short at end of file). */
static int preadv_full(int fd, struct iovec *iov, int cnt, uint64_t off, uint64_t *got, uint64_t *calls) {
    *got = 0;
    while (cnt > 0) {
        ssize_t r = preadv(fd, iov, cnt, (off_t)off);
        (*calls)++;
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) return 0; /* end of file: the caller sees *got short */
        *got += (uint64_t)r;
        off += (uint64_t)r;
        size_t left = (size_t)r;
        while (cnt > 0 && left >= iov->iov_len) left -= iov->iov_len, iov++, cnt--;
        if (cnt > 0) iov->iov_base = (char *)iov->iov_base + left, iov->iov_len -= left;
    }
    return 0;
}

static int pread_full(int fd, void *buf, uint64_t len, uint64_t off, uint64_t *got, uint64_t *calls) {
    struct iovec v = {.iov_base = buf, .iov_len = (size_t)len};
    return preadv_full(fd, &v, 1, off, got, calls);
}

/* Read jobs[0..n) (ascending, non-overlapping file ranges). Returns 0 or an error with msg. */
static int do_read(io_worker *w, const emoe_io_job *jobs, int n, char *msg, size_t msglen, uint64_t *calls) {
    emoe_io *io = w->io;
    const uint64_t start = jobs[0].off, end = jobs[n - 1].off + jobs[n - 1].len;
    uint64_t got = 0;
    int rc;
    if (io->dfd < 0) {
        struct iovec iov[2 * EMOE_IO_MAX_MERGE];
        int cnt = 0;
        for (int i = 0; i < n; i++) {
            if (i && jobs[i].off > jobs[i - 1].off + jobs[i - 1].len)
                iov[cnt++] = (struct iovec){w->gap, (size_t)(jobs[i].off - jobs[i - 1].off - jobs[i - 1].len)};
            iov[cnt++] = (struct iovec){jobs[i].dst, (size_t)jobs[i].len};
        }
        rc = preadv_full(io->fd, iov, cnt, start, &got, calls);
        if (io->cfg.drop_cache) posix_fadvise(io->fd, (off_t)start, (off_t)(end - start), POSIX_FADV_DONTNEED);
    } else if (n == 1 && !((uintptr_t)jobs[0].dst % EMOE_IO_ALIGN) && !(start % EMOE_IO_ALIGN) &&
               jobs[0].dst_cap >= (jobs[0].len + EMOE_IO_ALIGN - 1) / EMOE_IO_ALIGN * EMOE_IO_ALIGN) {
        const uint64_t alen = (jobs[0].len + EMOE_IO_ALIGN - 1) / EMOE_IO_ALIGN * EMOE_IO_ALIGN;
        rc = pread_full(io->dfd, jobs[0].dst, alen, start, &got, calls);
        if (!rc && got > jobs[0].len) got = jobs[0].len; /* the aligned tail past the piece (or EOF) is ignored */
    } else { /* through the bounce buffer, in aligned chunks, copying each chunk's overlap with every job */
        const uint64_t a0 = start / EMOE_IO_ALIGN * EMOE_IO_ALIGN;
        rc = 0;
        for (uint64_t a = a0; a < end && !rc;) {
            uint64_t want = end - a;
            want = want > BOUNCE_BYTES ? BOUNCE_BYTES : (want + EMOE_IO_ALIGN - 1) / EMOE_IO_ALIGN * EMOE_IO_ALIGN;
            uint64_t g = 0;
            rc = pread_full(io->dfd, w->bounce, want, a, &g, calls);
            if (rc) break;
            for (int i = 0; i < n; i++) {
                const uint64_t lo = jobs[i].off > a ? jobs[i].off : a;
                const uint64_t hi0 = jobs[i].off + jobs[i].len, hi1 = a + g;
                const uint64_t hi = hi0 < hi1 ? hi0 : hi1;
                if (lo < hi) memcpy((char *)jobs[i].dst + (lo - jobs[i].off), w->bounce + (lo - a), (size_t)(hi - lo));
            }
            const uint64_t reached = a + g;
            if (g < want) { /* end of file inside this chunk */
                got = reached > start ? reached - start : 0;
                if (got > end - start) got = end - start;
                goto check;
            }
            a += want;
        }
        got = end - start;
    }
check:
    if (rc) {
        snprintf(msg, msglen, "%s: read error at offset %llu (%llu bytes, %s): %s", io->path,
                 (unsigned long long)start, (unsigned long long)(end - start), jobs[0].what ? jobs[0].what : "?",
                 strerror(-rc));
        return EMOE_ERR_IO;
    }
    if (got < end - start) {
        struct stat st;
        long long size = fstat(io->fd, &st) ? -1 : (long long)st.st_size;
        snprintf(msg, msglen, "%s: short read at offset %llu: got %llu of %llu bytes (%s); the file has %lld bytes "
                 "now: was it truncated or replaced while the model was open?", io->path, (unsigned long long)start,
                 (unsigned long long)got, (unsigned long long)(end - start), jobs[0].what ? jobs[0].what : "?", size);
        return EMOE_ERR_IO;
    }
    return 0;
}

#ifdef __APPLE__
#define ST_MTIM(st) ((st).st_mtimespec)
#else
#define ST_MTIM(st) ((st).st_mtim)
#endif

/* Bytes read without a CRC check (verify "first": a piece evicted and read again; verify "never") are trusted as they
 * are only while the file is still the one opened. Once its size, inode or modification time differ (a container
 * overwritten in place: same inode, new bytes), every read is checked against its CRC instead, so the model stops
 * with a clear error rather than computing with other weights, yet a file restored in place reads fine again. A file
 * replaced by rename keeps serving its old inode through this fd, which stays consistent. One fstat per unchecked
 * read (merged reads count once); a failed fstat counts as a change. */
static int file_changed(const emoe_io *io) {
    struct stat st;
    if (fstat(io->fd, &st)) return 1;
    return !(st.st_size == io->st0.st_size && st.st_ino == io->st0.st_ino && st.st_dev == io->st0.st_dev &&
             ST_MTIM(st).tv_sec == ST_MTIM(io->st0).tv_sec && ST_MTIM(st).tv_nsec == ST_MTIM(io->st0).tv_nsec);
}

static void *io_main(void *arg) {
    io_worker *w = arg;
    emoe_io *io = w->io;
    const emoe_io_config *cfg = &io->cfg;
    emoe_io_job jobs[EMOE_IO_MAX_MERGE];
    int ids[EMOE_IO_MAX_MERGE], st[EMOE_IO_MAX_MERGE];
    char msg[EMOE_IO_MSG_LEN], msgs[EMOE_IO_MAX_MERGE][EMOE_IO_MSG_LEN];
    pthread_mutex_lock(cfg->mu);
    for (;;) {
        while (!io->stop && (io->paused || !io->n)) pthread_cond_wait(&io->cv_work, cfg->mu);
        if (io->stop) break;
        int n = 0;
        while (io->n && !n) {
            io_entry e = heap_pop(io);
            if (cfg->start(cfg->ctx, e.id, e.tag, 0, &jobs[0])) {
                cfg->start(cfg->ctx, e.id, e.tag, 1, &jobs[0]);
                ids[n++] = e.id;
            }
        }
        if (!n) continue;
        uint64_t end = jobs[0].off + jobs[0].len;
        while (cfg->max_merge_bytes && n < EMOE_IO_MAX_MERGE && io->n) {
            const io_entry e = io->heap[0];
            if (!cfg->start(cfg->ctx, e.id, e.tag, 0, &jobs[n])) { /* stale: drop it */
                heap_pop(io);
                continue;
            }
            const emoe_io_job *j = &jobs[n];
            if (j->off < end || j->off - end > EMOE_IO_MAX_GAP || j->off + j->len - jobs[0].off > cfg->max_merge_bytes)
                break;
            heap_pop(io);
            cfg->start(cfg->ctx, e.id, e.tag, 1, &jobs[n]);
            ids[n++] = e.id;
            end = j->off + j->len;
        }
        pthread_mutex_unlock(cfg->mu);

        uint64_t calls = 0, total = 0;
        const double t0 = now_s();
        msg[0] = '\0';
        const int rc = do_read(w, jobs, n, msg, sizeof msg, &calls);
        int unchecked = 0;
        for (int i = 0; i < n; i++) unchecked |= !jobs[i].check_crc;
        const int changed = !rc && unchecked && file_changed(io);
        const double secs = now_s() - t0;
        for (int i = 0; i < n; i++) {
            total += jobs[i].len;
            st[i] = rc;
            msgs[i][0] = '\0';
            if (rc) {
                snprintf(msgs[i], sizeof msgs[i], "%s", msg);
            } else if (jobs[i].check_crc || changed) {
                const uint32_t crc = emoe_crc32_fast(0, jobs[i].dst, (size_t)jobs[i].len);
                if (crc != jobs[i].crc32) {
                    st[i] = EMOE_ERR_CORRUPT;
                    snprintf(msgs[i], sizeof msgs[i], "%s: checksum mismatch in %s (offset %llu, %llu bytes): CRC-32 "
                             "%08x, the index says %08x; %s", io->path, jobs[i].what ? jobs[i].what : "?",
                             (unsigned long long)jobs[i].off, (unsigned long long)jobs[i].len, crc, jobs[i].crc32,
                             changed ? "the file was modified after the model opened it: reload the model"
                                     : "the file is damaged: re-export or re-download it");
                }
            }
        }
        pthread_mutex_lock(cfg->mu);
        io->syscalls += calls;
        for (int i = 0; i < n; i++)
            cfg->done(cfg->ctx, ids[i], st[i], msgs[i], total ? secs * (double)jobs[i].len / (double)total : 0.0,
                      rc ? 0 : jobs[i].len);
        pthread_cond_broadcast(cfg->cv_done);
    }
    pthread_mutex_unlock(cfg->mu);
    return NULL;
}

/* ---- lifetime ---- */

static int probe_direct(int dfd) {
    void *buf = NULL;
    if (posix_memalign(&buf, EMOE_IO_ALIGN, EMOE_IO_ALIGN)) return -ENOMEM;
    ssize_t r = pread(dfd, buf, EMOE_IO_ALIGN, 0);
    int e = r < 0 ? -errno : 0;
    free(buf);
    return e;
}

emoe_io *emoe_io_new(const emoe_io_config *cfg, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    if (!cfg || !cfg->path || !cfg->mu || !cfg->cv_done || !cfg->start || !cfg->done || cfg->n_threads < 1 ||
        cfg->n_threads > 64) {
        if (err) snprintf(err, errlen, "emoe_io_new: bad configuration");
        return NULL;
    }
    emoe_io *io = calloc(1, sizeof(*io));
    if (!io) goto nomem;
    io->cfg = *cfg;
    io->fd = io->dfd = -1;
    io->path = strdup(cfg->path);
    if (!io->path) goto nomem;
    io->cfg.path = io->path;
    io->fd = open(cfg->path, O_RDONLY | O_CLOEXEC);
    if (io->fd < 0 || fstat(io->fd, &io->st0)) {
        if (err) snprintf(err, errlen, "%s: %s", cfg->path, strerror(errno));
        goto fail;
    }
    if (cfg->direct) {
#ifdef O_DIRECT
        io->dfd = open(cfg->path, O_RDONLY | O_CLOEXEC | O_DIRECT);
        int e = io->dfd < 0 ? -errno : probe_direct(io->dfd);
        if (e) {
            snprintf(io->note, sizeof io->note, "O_DIRECT refused by the file system (%s): buffered reads",
                     strerror(-e));
            if (io->dfd >= 0) close(io->dfd);
            io->dfd = -1;
        }
#else
        snprintf(io->note, sizeof io->note, "O_DIRECT is not available on this platform: buffered reads");
#endif
    }
    if (pthread_cond_init(&io->cv_work, NULL)) goto nomem;
    io->workers = calloc((size_t)cfg->n_threads, sizeof(io_worker));
    if (!io->workers) goto nomem_cv;
    io->n_workers = cfg->n_threads;
    for (int i = 0; i < io->n_workers; i++) {
        io_worker *w = &io->workers[i];
        w->io = io;
        w->gap = malloc(EMOE_IO_MAX_GAP);
        if (!w->gap) goto nomem_threads;
        if (io->dfd >= 0 && posix_memalign((void **)&w->bounce, EMOE_IO_ALIGN, BOUNCE_BYTES)) {
            w->bounce = NULL;
            goto nomem_threads;
        }
    }
    for (int i = 0; i < io->n_workers; i++) {
        if (pthread_create(&io->workers[i].thread, NULL, io_main, &io->workers[i])) {
            if (err) snprintf(err, errlen, "could not start the I/O thread");
            emoe_io_free(io);
            return NULL;
        }
        io->workers[i].started = 1;
    }
    return io;
nomem_threads:
    emoe_io_free(io);
    if (err) snprintf(err, errlen, "out of memory starting the I/O thread");
    return NULL;
nomem_cv:
    pthread_cond_destroy(&io->cv_work);
nomem:
    if (err) snprintf(err, errlen, "out of memory starting the I/O thread");
fail:
    if (io) {
        if (io->fd >= 0) close(io->fd);
        if (io->dfd >= 0) close(io->dfd);
        free(io->path);
        free(io);
    }
    return NULL;
}

void emoe_io_free(emoe_io *io) {
    if (!io) return;
    pthread_mutex_lock(io->cfg.mu);
    io->stop = 1;
    pthread_cond_broadcast(&io->cv_work);
    pthread_mutex_unlock(io->cfg.mu);
    for (int i = 0; i < io->n_workers; i++) {
        if (io->workers[i].started) pthread_join(io->workers[i].thread, NULL);
        free(io->workers[i].gap);
        free(io->workers[i].bounce);
    }
    free(io->workers);
    pthread_cond_destroy(&io->cv_work);
    free(io->heap);
    if (io->fd >= 0) close(io->fd);
    if (io->dfd >= 0) close(io->dfd);
    free(io->path);
    free(io);
}
