/* The expert cache: a byte-budgeted, plane-granular cache of expert pieces in anonymous memory, filled by the I/O
 * thread.
 *
 * A piece is one plane of one expert matrix: (layer, stored expert, matrix gate|up|down, plane). f32/f16/q8_0
 * experts have one plane (the whole matrix); MWQ experts have K (P1 = base, P2.. = residual planes), each its own
 * piece, so eviction can drop refinement planes and keep base planes. Reading precision k of a matrix is still one
 * system call: the I/O thread merges the adjacent planes of a queue run into one preadv.
 *
 * Memory: one anonymous mapping of `capacity` bytes (MAP_NORESERVE: pages count in RSS only once touched), carved
 * into 4 KiB-aligned slots by a first-fit extent allocator with coalescing. Nothing goes through the page cache's
 * mapping of the file: RSS of the cache <= capacity, whatever the access pattern. emoe_cache_check() recomputes the
 * accounting from scratch (slots disjoint, inside the arena, used == sum of slots <= capacity).
 *
 * Piece states: EMPTY -> QUEUED (slot allocated, request in the I/O queue) -> LOADING (being read) -> READY, or
 * ERROR (read error / checksum mismatch; the slot is freed and the next request retries). Pinned pieces (acquired by
 * the compute thread and not yet released) and LOADING pieces are never evicted.
 *
 * Eviction, when a slot is needed: (1) demand requests first cancel queued, unpinned prefetches (no I/O spent yet),
 * lowest priority first; then (2) READY refinement planes; then (3) READY base planes; within (2) and (3) by the
 * policy (EMOE_EVICT_LRU: least recently used; EMOE_EVICT_CYCLIC: furthest next use by layer order, then LRU;
 * EMOE_EVICT_FREQ: lowest decayed use frequency). Prefetches only take free memory or evict (2)/(3) pieces whose
 * decayed use frequency is below the prefetched piece's own plus the caller's confidence in it, never cancel other
 * prefetches nor evict an unused prefetched piece. Choosing a victim costs O(layers), not O(pieces): per-(class,
 * layer) LRU lists and, for the queue and FREQ, binary heaps (O(log pieces) per change); a real model has 10k-70k
 * pieces (test_cache --bench-evict 70000: about 8 us per acquire with FREQ, 360-620 us with the former full scan).
 *
 * Thread safety: every function takes the cache's mutex; the compute thread and the I/O thread(s) share it.
 */
#ifndef EDGEMOE_EXPERT_CACHE_H
#define EDGEMOE_EXPERT_CACHE_H
#include <stddef.h>
#include <stdint.h>

#include "io_thread.h"

#define EMOE_CACHE_FULL 1     /* emoe_cache_acquire: not now (everything evictable is pinned or loading) */

#define EMOE_CACHE_MAX_LEVELS 16 /* plane levels with their own statistics */
/* Largest merged read: a read in progress cannot be cancelled or overtaken by a demand read, so a mispredicted
 * prefetch can hold the disk for at most this long; 4 MiB already reaches the sequential bandwidth of the SSDs and
 * virtual disks measured (MACHINE.md). */
#define EMOE_CACHE_MAX_MERGE ((size_t)4 << 20)

enum { EMOE_PIECE_EMPTY = 0, EMOE_PIECE_QUEUED, EMOE_PIECE_LOADING, EMOE_PIECE_READY, EMOE_PIECE_ERROR };
enum { EMOE_VERIFY_NEVER = 0, EMOE_VERIFY_FIRST = 1, EMOE_VERIFY_ALWAYS = 2 };
/* Which READY piece goes first (after queued prefetches, and refinement planes before base planes):
 * LRU: the least recently used. CYCLIC: LRU at the granularity of epochs (tokens), ties to the layer whose next
 * visit is furthest (a model's layers run in order: the layer just computed). FREQ: LRU + frequency: the lowest use
 * count decayed by 0.9 per epoch first, ties as CYCLIC. Plain LRU evicts exactly the pieces about to be reused once
 * the cache holds less than one token's experts (every access misses); CYCLIC and FREQ keep a stable subset. */
enum { EMOE_EVICT_LRU = 0, EMOE_EVICT_CYCLIC = 1, EMOE_EVICT_FREQ = 2 };

typedef struct {
    uint64_t off, nbytes; /* absolute file range; nbytes = 0: no such piece (never requested) */
    uint32_t crc32;       /* CRC-32 of the range */
    int32_t level;        /* 0 = base plane (or the only plane), 1.. = refinement planes */
    int32_t group;        /* 0..n_groups-1: the layer (for EMOE_EVICT_CYCLIC); 0 if unused */
    const char *name;     /* tensor name for messages (borrowed: must outlive the cache), or NULL */
} emoe_piece_desc;

typedef struct {
    const char *path;
    uint64_t capacity;              /* bytes for slots (the expert cache's share of the budget) */
    int n_pieces;
    const emoe_piece_desc *pieces;  /* [n_pieces], copied */
    int io_threads;                 /* >= 1 */
    int direct;                     /* O_DIRECT reads */
    int drop_cache;                 /* fadvise(DONTNEED) after buffered reads */
    int verify;                     /* EMOE_VERIFY_* (FIRST: each piece's first read; FORMAT.md's rule) */
    int n_groups;                   /* groups (layers) of the pieces, >= 1 */
    int policy;                     /* EMOE_EVICT_* */
} emoe_cache_config;

typedef struct {
    uint64_t hits[EMOE_CACHE_MAX_LEVELS];   /* acquired while READY */
    uint64_t misses[EMOE_CACHE_MAX_LEVELS]; /* acquired while absent (a demand read) */
    uint64_t late[EMOE_CACHE_MAX_LEVELS];   /* acquired while a prefetch of it was still queued or loading */
    uint64_t bytes_read, pieces_read, read_syscalls;
    uint64_t demand_bytes;                  /* bytes of demand reads (misses) */
    uint64_t evictions, evicted_bytes;      /* READY pieces dropped for space */
    uint64_t cancelled;                     /* queued requests dropped before any I/O */
    uint64_t prefetch_issued, prefetch_used, prefetch_wasted; /* pieces; wasted = evicted/cancelled unused */
    uint64_t crc_checked, crc_failures, read_errors;
    uint64_t capacity, used, peak_used, pinned_bytes;
    double stall_s;   /* time the compute thread waited for pieces (emoe_cache_wait_groups) */
    double io_busy_s; /* time the I/O threads spent reading */
    int direct;       /* O_DIRECT in effect */
    int drop_cache;   /* buffered reads, each followed by fadvise(DONTNEED) (the fallback when O_DIRECT is refused) */
    const char *read_note; /* "" or why O_DIRECT is not in effect although asked for (lives as long as the cache) */
} emoe_cache_stats;

typedef struct emoe_cache emoe_cache;

emoe_cache *emoe_cache_new(const emoe_cache_config *cfg, char *err, size_t errlen);
void emoe_cache_free(emoe_cache *c);
/* Memory the cache needs besides `capacity`: the piece table, the I/O thread's buffers. */
size_t emoe_cache_overhead_bytes(const emoe_cache_config *cfg);
/* Bytes a piece of nbytes takes in the arena (rounded up to the slot alignment). */
uint64_t emoe_cache_slot_bytes(uint64_t nbytes);

/* Demand: pin every piece of ids[0..n) (all or nothing). READY pieces are hits; absent ones get a slot (evicting as
 * described above) and are queued at priority keys[i] (lower = sooner); queued prefetches are moved up to keys[i].
 * Returns EMOE_OK, EMOE_CACHE_FULL (nothing pinned: wait for pins to be released, then retry), or an error
 * (EMOE_ERR_BUDGET when the pieces cannot fit even in an empty cache). */
int emoe_cache_acquire(emoe_cache *c, const int *ids, int n, const uint64_t *keys);
/* Prefetch: queue absent pieces at priority key without pinning them (READY ones are marked recently used).
 * Admission, so that a wrong guess cannot cost a more useful piece: free memory is always used; a READY unpinned
 * piece is evicted for it only if its retention score (emoe_cache_retention: its uses decayed to now) is below the
 * prefetched piece's own plus `confidence`, the caller's probability that the piece is about to be used
 * (-INFINITY: free memory only; INFINITY: evict as a demand read would, except queued requests and unused
 * prefetches). Never cancels queued requests. Stops at the first piece it cannot admit. Returns pieces queued. */
int emoe_cache_prefetch(emoe_cache *c, const int *ids, int n, uint64_t key, double confidence);
/* A piece's retention score: its acquires, each decayed by EMOE_CACHE_DECAY per epoch since (0: never used). */
double emoe_cache_retention(emoe_cache *c, int id);
/* Unpin. Pieces still in flight keep loading (and are evictable once READY). */
void emoe_cache_release(emoe_cache *c, const int *ids, int n);
/* Move queued (not yet loading) pieces to priority key (e.g. a background key for skipped refinement planes). */
void emoe_cache_requeue(emoe_cache *c, const int *ids, int n, uint64_t key);

/* Cancel queued, unpinned requests with lo <= key < hi (e.g. prefetches for layers already computed). Returns how
 * many were cancelled. */
int emoe_cache_cancel_queued(emoe_cache *c, uint64_t lo, uint64_t hi);

/* Prefetches whose queue key is in [lo, hi) and that were never acquired are expired: queued ones are cancelled,
 * resident ones become the first eviction candidates (least recently used end), loading ones will be when they land.
 * Call it when the layer they were predicted for has run. Returns how many were expired. */
int emoe_cache_expire_prefetches(emoe_cache *c, uint64_t lo, uint64_t hi);

/* Wait for a group of pinned pieces to be READY. Groups are ids[starts[g] .. starts[g+1]) for g < n_groups, the first
 * n_required[g] of each required, the rest optional; done[g] != 0 skips a group. Returns the index of the first
 * unskipped group whose pieces are all READY; if none and partial != 0, the first whose required pieces are READY;
 * otherwise blocks until one is (time counted as stall). Returns -1 if no group is left, or a negative status below
 * -1 (EMOE_ERR_IO / EMOE_ERR_CORRUPT, message in emoe_cache_error) if a required piece of an unskipped group failed. */
int emoe_cache_wait_groups(emoe_cache *c, const int *ids, const int *starts, const int *n_required, int n_groups,
                           const unsigned char *done, int partial);
/* Block until the next read completes (returns at once if nothing is queued or loading); counted as stall. Use it
 * after EMOE_CACHE_FULL when the caller holds no pins: in-flight prefetches become evictable once they land. */
void emoe_cache_wait_io(emoe_cache *c);
/* State of a piece (EMOE_PIECE_*). */
int emoe_cache_state(emoe_cache *c, int id);
/* Data of a READY piece (pinned by the caller), else NULL. */
const void *emoe_cache_data(emoe_cache *c, int id);
/* The message of the last error (I/O, checksum, budget). */
const char *emoe_cache_error(emoe_cache *c);

void emoe_cache_get_stats(emoe_cache *c, emoe_cache_stats *out);
void emoe_cache_reset_stats(emoe_cache *c);
/* Drop every unpinned READY piece and cancel queued ones (cold start for benchmarks). */
void emoe_cache_clear(emoe_cache *c);
/* Recompute the byte accounting from scratch; EMOE_OK or EMOE_ERR_ARG with a message (tests call it often). */
int emoe_cache_check(emoe_cache *c, char *err, size_t errlen);

/* EMOE_EVICT_CYCLIC: the group (layer) being computed now, and the epoch (a counter of tokens or forward blocks). */
void emoe_cache_set_position(emoe_cache *c, int group, uint64_t epoch);

/* Tests: hold / release the I/O threads (requests queue up meanwhile). */
void emoe_cache_pause_io(emoe_cache *c, int paused);

#endif
