/* The I/O thread(s): read byte ranges of the container file into caller-owned memory, in priority order.
 *
 * A client (the expert cache) submits requests (id, tag, key); the thread pops the lowest key first (FIFO among equal
 * keys), asks the client to describe the request (start(commit = 0): still wanted? which file range, which
 * destination?), commits it (start(commit = 1): the client marks it "loading"), reads it with pread/preadv outside the
 * lock, checks its CRC-32 if asked, and reports the outcome with done(). Requests are cancelled lazily: the client
 * bumps the piece's tag, and start() rejects a popped entry whose tag is stale.
 *
 * Consecutive queue entries whose file ranges follow each other (gaps up to EMOE_IO_MAX_GAP bytes, e.g. the 0..63
 * bytes between MWQ planes) are merged into one preadv: reading precision k of an MWQ matrix is one system call.
 *
 * Locking: one mutex shared with the client (cfg.mu). submit/pause/stats are called with it held; start() and done()
 * are called by the I/O thread with it held; the reads themselves run without it. After every done() the thread
 * broadcasts cfg.cv_done, on which the compute thread sleeps while it waits for a piece.
 *
 * Errors (short read = truncated file, EIO, CRC mismatch) are reported through done() with a message naming the file,
 * offset and piece; the thread itself never stops on an error, so a later request for the same range retries.
 */
#ifndef EDGEMOE_IO_THREAD_H
#define EDGEMOE_IO_THREAD_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "crc32.h"   /* emoe_crc32_fast: the reader checks pieces with it, and so do its clients */
#include "edgemoe.h" /* emoe_status: EMOE_ERR_IO, EMOE_ERR_CORRUPT */

#define EMOE_IO_ALIGN 4096        /* O_DIRECT alignment of offsets, lengths and buffers (also the slot alignment) */
#define EMOE_IO_MAX_GAP 4096      /* largest hole between two ranges merged into one read */
#define EMOE_IO_MAX_MERGE 64      /* ranges per merged read */
#define EMOE_IO_MSG_LEN 384

typedef struct {
    void *dst;        /* where the bytes go */
    size_t dst_cap;   /* writable bytes at dst (>= len; O_DIRECT reads straight into dst when it is aligned and
                         dst_cap >= len rounded up to EMOE_IO_ALIGN) */
    uint64_t off;     /* absolute file offset */
    uint64_t len;     /* bytes */
    uint32_t crc32;   /* expected CRC-32 of the len bytes (zlib's) */
    int check_crc;    /* 1: verify it */
    const char *what; /* names the piece in error messages (e.g. "plane 2 of tensor 'blk.0.expert.3.ffn_up.weight'") */
} emoe_io_job;

/* Called with *mu held. commit = 0: return 1 and fill *job if request (id, tag) is still wanted, else 0 (the entry is
 * dropped). commit = 1: the same request is about to be read: mark it loading (it must not be cancelled now). */
typedef int (*emoe_io_start_fn)(void *ctx, int id, uint32_t tag, int commit, emoe_io_job *job);
/* Called with *mu held when the read of request id finished: status 0 = ok, else negative with msg set. seconds: the
 * wall time of the read this request was part of, shared pro rata by bytes among merged requests. */
typedef void (*emoe_io_done_fn)(void *ctx, int id, int status, const char *msg, double seconds, uint64_t bytes);

typedef struct {
    const char *path;
    int n_threads;           /* I/O threads, >= 1 */
    int direct;              /* 1: open with O_DIRECT (aligned reads through a bounce buffer when needed) */
    int drop_cache;          /* 1: posix_fadvise(DONTNEED) after each buffered read (emulates a device whose page cache
                                cannot hold the file) */
    size_t max_merge_bytes;  /* upper bound of one merged read (0 = never merge) */
    pthread_mutex_t *mu;     /* shared with the client */
    pthread_cond_t *cv_done; /* broadcast after each done() */
    emoe_io_start_fn start;
    emoe_io_done_fn done;
    void *ctx;
} emoe_io_config;

typedef struct emoe_io emoe_io;

/* Open the file (twice when direct: a buffered fd for the fallback) and start the threads. NULL on failure with a
 * message in err. If the file system refuses O_DIRECT the reader falls back to buffered reads and says so in
 * emoe_io_note(). */
emoe_io *emoe_io_new(const emoe_io_config *cfg, char *err, size_t errlen);
/* Stop and join the threads (a read in progress finishes first; queued requests are dropped without done()), close
 * the file. Call without holding *mu. */
void emoe_io_free(emoe_io *io);

/* With *mu held: queue request (id, tag) at priority key (lower = sooner). EMOE_ERR_NOMEM if the queue cannot grow. */
int emoe_io_submit(emoe_io *io, int id, uint32_t tag, uint64_t key);
/* With *mu held: 1 = threads take no new request (tests use it to fill the queue first), 0 = resume. */
void emoe_io_pause(emoe_io *io, int paused);
/* Entries in the queue (stale ones included). With *mu held. */
size_t emoe_io_queued(const emoe_io *io);
int emoe_io_direct(const emoe_io *io);      /* O_DIRECT actually in effect */
const char *emoe_io_note(const emoe_io *io); /* "" or why O_DIRECT is off */
/* Bytes of memory the reader holds besides the caller's buffers (bounce buffers, scratch), for the budget. */
size_t emoe_io_overhead_bytes(const emoe_io_config *cfg);
/* System calls made so far (reads, merged reads count once). With *mu held. */
uint64_t emoe_io_syscalls(const emoe_io *io);

#endif
