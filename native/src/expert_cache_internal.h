/* The expert cache's private state, shared by its files: expert_cache.c (the API: piece states, reads, statistics),
 * cache_eviction.c (which piece goes first) and cache_arena.c (the memory). Nothing outside them includes it. */
#ifndef EDGEMOE_EXPERT_CACHE_INTERNAL_H
#define EDGEMOE_EXPERT_CACHE_INTERNAL_H
#include <pthread.h>
#include <stdint.h>

#include "cache_arena.h"
#include "expert_cache.h"

/* Lists of evictable pieces: L_QUEUED (queued, unpinned), then one READY list per (prefetched, class, group):
 * prefetched = an unused prefetch (pf), class 0 = refinement planes, 1 = base planes; group = layer. Each list is in
 * touch order (head = least recently used), so LRU and CYCLIC find their victim among the list heads: O(groups).
 * Heaps make the other choices independent of the piece count too (O(log pieces) per change, O(groups) per victim):
 * H_QUEUED holds L_QUEUED by priority key (top = the highest key, the request demand cancels first); under
 * EMOE_EVICT_FREQ one heap per (class, group) holds that non-prefetched READY list by (decayed-frequency key,
 * last use) (top = the group's victim). A piece is on at most one list and one heap. */
enum { L_NONE = 0, L_QUEUED = 1, L_READY0 = 2 };
enum { H_NONE = -1, H_QUEUED = 0, H_READY0 = 1 };

typedef struct {
    uint64_t off, nbytes;
    uint64_t slot, slot_bytes; /* arena offset and charged bytes; slot_bytes = 0: no slot */
    uint64_t key;              /* queue priority while QUEUED */
    uint64_t last_use;
    uint64_t use_epoch; /* the epoch (token / forward block) of its last acquire or prefetch */
    double freq;        /* acquires, decayed by EMOE_CACHE_DECAY per epoch, as of freq_epoch (kept across evictions) */
    uint64_t freq_epoch;
    double hkey;  /* its FREQ heap key (freq_key), fixed while it is on the heap */
    const char *name;
    uint32_t crc, tag;
    int32_t pins;
    int32_t heap, hpos; /* the heap it is on (H_*) and its index there */
    int32_t group;  /* layer (eviction by distance to the next use) */
    int prev, next; /* links of the list the piece is on */
    int list;
    int16_t level;
    uint8_t state;
    uint8_t verified; /* passed its CRC once */
    uint8_t pf;       /* queued/loaded by a prefetch and not yet acquired */
    uint8_t demand;   /* its current read was demanded (a miss or a late prefetch) */
    uint8_t checking; /* its current read checks the CRC */
    uint8_t entry;    /* state when the current emoe_cache_acquire reached it */
    uint8_t expired;  /* an unused prefetch whose layer has passed: goes to the LRU end when it lands */
    int8_t status;    /* the error of its last read (ERROR state) */
} piece;

typedef struct {
    int head, tail; /* head = least recently used */
} plist;

typedef struct {
    int *a;    /* piece ids, a binary heap (a slice of emoe_cache.heap_ids) */
    int n, cap;
} pheap;

struct emoe_cache {
    pthread_mutex_t mu;
    pthread_cond_t cv_done;
    emoe_io *io;
    int verify;
    emoe_arena arena;
    piece *p;
    int n;
    plist *lists; /* [L_READY0 + 4 * n_groups] */
    pheap *heaps; /* [H_READY0 + 2 * n_groups]; ids in heap_ids */
    int *heap_ids;
    int n_lists, n_heaps, n_groups, policy, position; /* position: the layer being computed (EMOE_EVICT_CYCLIC) */
    uint64_t epoch;                          /* the token / forward block being computed (EMOE_EVICT_CYCLIC) */
    int *pf_ids; /* pieces prefetched and not yet acquired or expired (pf = 1), maybe stale entries */
    size_t n_pf, cap_pf;
    uint64_t clock;
    emoe_cache_stats st;
    char err[EMOE_IO_MSG_LEN + 128];     /* written under mu (the I/O threads write it too) */
    char err_out[EMOE_IO_MSG_LEN + 128]; /* the compute thread's copy, taken under mu */
};

#define EMOE_CACHE_DECAY 0.9 /* per epoch (token): a use 7 tokens ago counts half */

#endif
