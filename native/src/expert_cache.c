/* The expert cache: slots, piece states, eviction, byte accounting, statistics. See expert_cache.h. */
#define _GNU_SOURCE
#include "expert_cache.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <math.h>
#include <time.h>

#include "edgemoe.h"

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
    uint64_t off, len;
} extent;

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
    unsigned char *arena;
    uint64_t arena_bytes, used, peak_used;
    extent *free_ext; /* sorted by offset, coalesced */
    size_t n_free, cap_free;
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
    char err[EMOE_IO_MSG_LEN + 128];
};

#define EMOE_CACHE_DECAY 0.9 /* per epoch (token): a use 7 tokens ago counts half */

/* EMOE_EVICT_CYCLIC's static order key: freq * DECAY^(now - freq_epoch) compares like log(freq) + freq_epoch * -log
 * (DECAY), which changes only when the piece is used. An unused prefetch is protected (+inf) until it expires. */
static double freq_key(const piece *p) {
    if (p->pf) return INFINITY;
    if (p->freq <= 0) return -INFINITY;
    return log(p->freq) - (double)p->freq_epoch * log(EMOE_CACHE_DECAY);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

uint64_t emoe_cache_slot_bytes(uint64_t nbytes) {
    return (nbytes + EMOE_IO_ALIGN - 1) / EMOE_IO_ALIGN * EMOE_IO_ALIGN;
}

/* ---- extent allocator over [0, arena_bytes) ---- */

static int ext_alloc(emoe_cache *c, uint64_t size, uint64_t *off) {
    for (size_t i = 0; i < c->n_free; i++) { /* first fit: keeps the touched part of the arena compact */
        extent *e = &c->free_ext[i];
        if (e->len < size) continue;
        *off = e->off;
        e->off += size, e->len -= size;
        if (!e->len) {
            memmove(e, e + 1, (c->n_free - i - 1) * sizeof(extent));
            c->n_free--;
        }
        return 1;
    }
    return 0;
}

static int ext_free(emoe_cache *c, uint64_t off, uint64_t len) {
    size_t lo = 0, hi = c->n_free; /* first extent with offset > off */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c->free_ext[mid].off > off) hi = mid;
        else lo = mid + 1;
    }
    const size_t i = lo;
    const int join_prev = i > 0 && c->free_ext[i - 1].off + c->free_ext[i - 1].len == off;
    const int join_next = i < c->n_free && off + len == c->free_ext[i].off;
    if (join_prev && join_next) {
        c->free_ext[i - 1].len += len + c->free_ext[i].len;
        memmove(&c->free_ext[i], &c->free_ext[i + 1], (c->n_free - i - 1) * sizeof(extent));
        c->n_free--;
    } else if (join_prev) {
        c->free_ext[i - 1].len += len;
    } else if (join_next) {
        c->free_ext[i].off = off, c->free_ext[i].len += len;
    } else {
        if (c->n_free == c->cap_free) { /* cannot happen: there are never more holes than pieces + 1 */
            size_t cap = c->cap_free ? 2 * c->cap_free : 64;
            extent *g = realloc(c->free_ext, cap * sizeof(extent));
            if (!g) return EMOE_ERR_NOMEM;
            c->free_ext = g, c->cap_free = cap;
        }
        memmove(&c->free_ext[i + 1], &c->free_ext[i], (c->n_free - i) * sizeof(extent));
        c->free_ext[i] = (extent){off, len};
        c->n_free++;
    }
    return EMOE_OK;
}

/* ---- heaps ---- */

static int ready_list(const emoe_cache *c, int pf, int cls, int group) {
    return L_READY0 + (pf * 2 + cls) * c->n_groups + group;
}

/* The heap of a piece on list `which` (H_NONE: none). */
static int heap_of_list(const emoe_cache *c, int which) {
    if (which == L_QUEUED) return H_QUEUED;
    if (c->policy != EMOE_EVICT_FREQ || which < L_READY0 || which >= ready_list(c, 1, 0, 0)) return H_NONE;
    return H_READY0 + (which - L_READY0); /* non-prefetched READY lists, (class, group) */
}

/* Does piece a belong above piece b in heap h? */
static int heap_above(const emoe_cache *c, int h, int a, int b) {
    const piece *x = &c->p[a], *y = &c->p[b];
    if (h == H_QUEUED) return x->key > y->key || (x->key == y->key && a > b);
    return x->hkey < y->hkey || (x->hkey == y->hkey && x->last_use < y->last_use);
}

static void heap_set(emoe_cache *c, pheap *hp, int i, int id) {
    hp->a[i] = id;
    c->p[id].hpos = i;
}

static void heap_sift(emoe_cache *c, int h, int i) {
    pheap *hp = &c->heaps[h];
    const int id = hp->a[i];
    while (i > 0 && heap_above(c, h, id, hp->a[(i - 1) / 2])) { /* up */
        heap_set(c, hp, i, hp->a[(i - 1) / 2]);
        i = (i - 1) / 2;
    }
    for (;;) { /* down */
        int k = 2 * i + 1;
        if (k >= hp->n) break;
        if (k + 1 < hp->n && heap_above(c, h, hp->a[k + 1], hp->a[k])) k++;
        if (!heap_above(c, h, hp->a[k], id)) break;
        heap_set(c, hp, i, hp->a[k]);
        i = k;
    }
    heap_set(c, hp, i, id);
}

static void heap_insert(emoe_cache *c, int h, int id) {
    pheap *hp = &c->heaps[h];
    c->p[id].heap = h; /* capacity: every piece that can be on it (counted at creation) */
    heap_set(c, hp, hp->n++, id);
    heap_sift(c, h, hp->n - 1);
}

static void heap_remove(emoe_cache *c, int id) {
    piece *p = &c->p[id];
    if (p->heap == H_NONE) return;
    pheap *hp = &c->heaps[p->heap];
    const int i = p->hpos, last = hp->a[--hp->n];
    const int h = p->heap;
    p->heap = H_NONE, p->hpos = -1;
    if (last == id) return;
    heap_set(c, hp, i, last);
    heap_sift(c, h, i);
}

/* ---- lists ---- */

static double freq_key(const piece *p);

/* Put a piece that just joined list `which` on that list's heap. */
static void heap_join(emoe_cache *c, int id, int which) {
    const int h = heap_of_list(c, which);
    if (h == H_NONE) return;
    c->p[id].hkey = freq_key(&c->p[id]);
    heap_insert(c, h, id);
}

static void list_remove(emoe_cache *c, int id) {
    piece *p = &c->p[id];
    heap_remove(c, id);
    if (p->list == L_NONE) return;
    plist *l = &c->lists[p->list];
    if (p->prev >= 0) c->p[p->prev].next = p->next;
    else l->head = p->next;
    if (p->next >= 0) c->p[p->next].prev = p->prev;
    else l->tail = p->prev;
    p->prev = p->next = -1;
    p->list = L_NONE;
}

static void list_append(emoe_cache *c, int id, int which) {
    piece *p = &c->p[id];
    plist *l = &c->lists[which];
    p->list = which;
    p->last_use = ++c->clock; /* lists stay ordered by last_use, so heads of different lists compare */
    p->prev = l->tail, p->next = -1;
    if (l->tail >= 0) c->p[l->tail].next = id;
    else l->head = id;
    l->tail = id;
    heap_join(c, id, which);
}

static void list_prepend(emoe_cache *c, int id, int which) {
    piece *p = &c->p[id];
    plist *l = &c->lists[which];
    p->list = which;
    p->last_use = 0;
    p->use_epoch = 0;
    p->freq = 0.0; /* an expired prefetch: never used, first to go */
    p->prev = -1, p->next = l->head;
    if (l->head >= 0) c->p[l->head].prev = id;
    else l->tail = id;
    l->head = id;
    heap_join(c, id, which);
}

static int wanted_list(const emoe_cache *c, const piece *p) {
    if (p->pins) return L_NONE;
    if (p->state == EMOE_PIECE_READY) return ready_list(c, p->pf ? 1 : 0, p->level > 0 ? 0 : 1, p->group);
    if (p->state == EMOE_PIECE_QUEUED) return L_QUEUED;
    return L_NONE;
}

/* Put the piece on the list its state says, at the most recently used end when touch (or when it moves). */
static void relist(emoe_cache *c, int id, int touch) {
    piece *p = &c->p[id];
    const int w = wanted_list(c, p);
    if (w == p->list && !touch) return;
    list_remove(c, id);
    if (w != L_NONE) list_append(c, id, w);
}

/* ---- slots ---- */

static void drop_slot(emoe_cache *c, piece *p) {
    if (!p->slot_bytes) return;
    ext_free(c, p->slot, p->slot_bytes);
    c->used -= p->slot_bytes;
    p->slot_bytes = 0;
}

/* Evict or cancel piece id (READY unpinned, or QUEUED unpinned). */
static void evict(emoe_cache *c, int id) {
    piece *p = &c->p[id];
    if (p->state == EMOE_PIECE_READY) c->st.evictions++, c->st.evicted_bytes += p->nbytes;
    else c->st.cancelled++;
    if (p->pf) c->st.prefetch_wasted++, p->pf = 0;
    list_remove(c, id);
    drop_slot(c, p);
    p->state = EMOE_PIECE_EMPTY;
    p->tag++; /* a queued entry of it in the I/O queue is now stale */
    p->demand = 0;
}

enum { FOR_DEMAND, FOR_PREFETCH };

/* The next piece to evict (or, for demand, a queued request to cancel); -1 if none. Costs O(groups), whatever the
 * number of pieces: each (class, group) offers one candidate, its list head or its heap top. */
static int pick_victim(emoe_cache *c, int why) {
    if (why == FOR_DEMAND && c->heaps[H_QUEUED].n) return c->heaps[H_QUEUED].a[0]; /* lowest-priority request */
    for (int cls = 0; cls < 2; cls++) { /* refinement planes before base planes */
        int best = -1, best_dist = 0;
        double best_key = 0.0;
        for (int g = 0; g < c->n_groups; g++) {
            /* distance to the group's next visit; the current position's group (its pieces in use are pinned)
             * counts as a full cycle away */
            const int dist = (g - c->position + c->n_groups) % c->n_groups ? (g - c->position + c->n_groups) %
                                                                                 c->n_groups
                                                                           : c->n_groups;
            /* unused prefetches are never evicted for another prefetch's bet; for demand they count as used at
             * their prefetch (LRU, CYCLIC) or as the most valuable pieces (FREQ) */
            const int pf_head = why == FOR_DEMAND ? c->lists[ready_list(c, 1, cls, g)].head : -1;
            if (c->policy == EMOE_EVICT_FREQ) {
                /* the lowest decayed use frequency first (LRU + frequency); equal ones (e.g. pieces used once in
                 * the same token) by the group whose next visit is furthest, then least recently used */
                const pheap *hp = &c->heaps[H_READY0 + cls * c->n_groups + g];
                const int id = hp->n ? hp->a[0] : pf_head;
                if (id < 0) continue;
                const piece *q = &c->p[id];
                const double kq = hp->n ? q->hkey : INFINITY;
                if (best < 0 || kq < best_key - 1e-9 ||
                    (kq <= best_key + 1e-9 && (dist > best_dist || (dist == best_dist &&
                                                                   q->last_use < c->p[best].last_use))))
                    best = id, best_dist = dist, best_key = kq;
                continue;
            }
            int id = c->lists[ready_list(c, 0, cls, g)].head; /* the group's least recently used piece */
            if (pf_head >= 0 && (id < 0 || c->p[pf_head].last_use < c->p[id].last_use)) id = pf_head;
            if (id < 0) continue;
            const piece *p = &c->p[id];
            if (c->policy == EMOE_EVICT_LRU) {
                if (best < 0 || p->last_use < c->p[best].last_use) best = id;
                continue;
            }
            /* CYCLIC: the oldest epoch, then the furthest next visit */
            if (best < 0 || p->use_epoch < c->p[best].use_epoch ||
                (p->use_epoch == c->p[best].use_epoch && dist > best_dist))
                best = id, best_dist = dist;
        }
        if (best >= 0) return best;
    }
    return -1;
}

/* Decayed use frequency as of the current epoch (what EMOE_EVICT_FREQ ranks by, on an absolute scale). */
static double retention(const emoe_cache *c, const piece *p) {
    if (p->freq <= 0) return 0.0;
    return p->freq * pow(EMOE_CACHE_DECAY, (double)(c->epoch > p->freq_epoch ? c->epoch - p->freq_epoch : 0));
}

/* Give piece id a slot, evicting as needed: for a prefetch only pieces whose retention is below `limit`. 1 = done,
 * 0 = no victim left. */
static int alloc_slot(emoe_cache *c, int id, int why, double limit) {
    piece *p = &c->p[id];
    const uint64_t need = emoe_cache_slot_bytes(p->nbytes);
    if (need > c->arena_bytes) return 0;
    for (;;) {
        uint64_t off;
        if (ext_alloc(c, need, &off)) {
            p->slot = off, p->slot_bytes = need;
            c->used += need;
            if (c->used > c->peak_used) c->peak_used = c->used;
            return 1;
        }
        const int v = pick_victim(c, why);
        if (v < 0) return 0;
        /* a prefetch is a guess: it may displace only what the cache values less (a QUEUED victim is demand's) */
        if (why == FOR_PREFETCH && !(retention(c, &c->p[v]) < limit)) return 0;
        evict(c, v);
    }
}

static int queue_piece(emoe_cache *c, int id, uint64_t key) {
    piece *p = &c->p[id];
    p->state = EMOE_PIECE_QUEUED;
    p->key = key;
    if (p->heap == H_QUEUED) heap_sift(c, H_QUEUED, p->hpos);
    p->tag++;
    return emoe_io_submit(c->io, id, p->tag, key);
}

/* ---- I/O callbacks (mutex held) ---- */

static int io_start(void *ctx, int id, uint32_t tag, int commit, emoe_io_job *job) {
    emoe_cache *c = ctx;
    if (id < 0 || id >= c->n) return 0;
    piece *p = &c->p[id];
    if (p->state != EMOE_PIECE_QUEUED || p->tag != tag) return 0;
    const int check = c->verify == EMOE_VERIFY_ALWAYS || (c->verify == EMOE_VERIFY_FIRST && !p->verified);
    *job = (emoe_io_job){.dst = c->arena + p->slot, .dst_cap = p->slot_bytes, .off = p->off, .len = p->nbytes,
                         .crc32 = p->crc, .check_crc = check, .what = p->name};
    if (commit) {
        p->state = EMOE_PIECE_LOADING;
        p->checking = (uint8_t)check;
        relist(c, id, 0);
    }
    return 1;
}

static void io_done(void *ctx, int id, int status, const char *msg, double seconds, uint64_t bytes) {
    emoe_cache *c = ctx;
    piece *p = &c->p[id];
    c->st.io_busy_s += seconds;
    if (p->checking) c->st.crc_checked++;
    if (!status) {
        p->state = EMOE_PIECE_READY;
        if (p->checking) p->verified = 1;
        c->st.bytes_read += bytes;
        c->st.pieces_read++;
        if (p->demand) c->st.demand_bytes += bytes;
    } else {
        if (status == EMOE_ERR_CORRUPT) c->st.crc_failures++;
        else c->st.read_errors++;
        snprintf(c->err, sizeof c->err, "%s (piece: plane %d of tensor '%s')", msg, p->level + 1,
                 p->name ? p->name : "?");
        p->state = EMOE_PIECE_ERROR;
        p->status = (int8_t)status;
        drop_slot(c, p);
        if (p->pf) c->st.prefetch_wasted++, p->pf = 0;
    }
    p->demand = 0;
    p->checking = 0;
    if (p->expired && p->state == EMOE_PIECE_READY && !p->pins) { /* a wasted prefetch: first to go */
        list_remove(c, id);
        list_prepend(c, id, wanted_list(c, p));
    } else {
        relist(c, id, 1);
    }
    p->expired = 0;
}

/* ---- lifetime ---- */

size_t emoe_cache_overhead_bytes(const emoe_cache_config *cfg) {
    emoe_io_config io = {.n_threads = cfg->io_threads, .direct = cfg->direct};
    const size_t groups = (size_t)(cfg->n_groups > 0 ? cfg->n_groups : 1);
    return sizeof(struct emoe_cache) + (size_t)cfg->n_pieces * (sizeof(piece) + 2 * sizeof(extent) + 3 * sizeof(int)) +
           (L_READY0 + 4 * groups) * sizeof(plist) + (H_READY0 + 2 * groups) * sizeof(pheap) +
           emoe_io_overhead_bytes(&io);
}

emoe_cache *emoe_cache_new(const emoe_cache_config *cfg, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    if (!cfg || !cfg->path || cfg->n_pieces < 0 || (cfg->n_pieces && !cfg->pieces)) {
        if (err) snprintf(err, errlen, "emoe_cache_new: bad configuration");
        return NULL;
    }
    emoe_cache *c = calloc(1, sizeof(*c));
    if (!c) goto nomem;
    c->verify = cfg->verify;
    c->n = cfg->n_pieces;
    c->n_groups = cfg->n_groups > 0 ? cfg->n_groups : 1;
    c->policy = cfg->policy;
    for (int i = 0; i < c->n; i++)
        if (cfg->pieces[i].group < 0 || cfg->pieces[i].group >= c->n_groups) {
            if (err) snprintf(err, errlen, "emoe_cache_new: piece %d has group %d, outside 0..%d", i,
                              cfg->pieces[i].group, c->n_groups - 1);
            free(c);
            return NULL;
        }
    c->n_lists = L_READY0 + 4 * c->n_groups;
    c->lists = calloc((size_t)c->n_lists, sizeof(plist));
    c->n_heaps = H_READY0 + 2 * c->n_groups;
    c->heaps = calloc((size_t)c->n_heaps, sizeof(pheap));
    c->heap_ids = malloc(2 * (size_t)(c->n ? c->n : 1) * sizeof(int));
    if (!c->lists || !c->heaps || !c->heap_ids) goto nomem;
    /* heap capacities: any piece may be queued; a READY heap holds at most its (class, group)'s pieces */
    c->heaps[H_QUEUED].cap = c->n;
    for (int i = 0; i < c->n; i++) c->heaps[H_READY0 + (cfg->pieces[i].level > 0 ? 0 : 1) * c->n_groups +
                                              cfg->pieces[i].group].cap++;
    for (int h = 0, at = 0; h < c->n_heaps; at += c->heaps[h].cap, h++) c->heaps[h].a = c->heap_ids + at;
    c->p = calloc((size_t)(c->n ? c->n : 1), sizeof(piece));
    c->cap_free = (size_t)c->n + 2;
    c->free_ext = calloc(c->cap_free, sizeof(extent));
    if (!c->p || !c->free_ext) goto nomem;
    for (int i = 0; i < c->n; i++) {
        const emoe_piece_desc *d = &cfg->pieces[i];
        c->p[i] = (piece){.off = d->off, .nbytes = d->nbytes, .crc = d->crc32, .name = d->name, .prev = -1,
                          .next = -1, .heap = H_NONE, .hpos = -1, .level = (int16_t)(d->level < 0 ? 0 : d->level), .group = d->group};
    }
    for (int l = 0; l < c->n_lists; l++) c->lists[l] = (plist){-1, -1};
    c->arena_bytes = cfg->capacity / EMOE_IO_ALIGN * EMOE_IO_ALIGN;
    if (c->arena_bytes) {
        void *a = mmap(NULL, (size_t)c->arena_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (a == MAP_FAILED) {
            if (err) snprintf(err, errlen, "expert cache: cannot reserve %llu bytes of address space",
                              (unsigned long long)c->arena_bytes);
            goto fail;
        }
        c->arena = a;
        c->free_ext[0] = (extent){0, c->arena_bytes};
        c->n_free = 1;
    }
    c->st.capacity = c->arena_bytes;
    if (pthread_mutex_init(&c->mu, NULL)) goto nomem;
    if (pthread_cond_init(&c->cv_done, NULL)) {
        pthread_mutex_destroy(&c->mu);
        goto nomem;
    }
    emoe_io_config io = {.path = cfg->path, .n_threads = cfg->io_threads > 0 ? cfg->io_threads : 1,
                         .direct = cfg->direct, .drop_cache = cfg->drop_cache, .max_merge_bytes = EMOE_CACHE_MAX_MERGE,
                         .mu = &c->mu, .cv_done = &c->cv_done, .start = io_start, .done = io_done, .ctx = c};
    c->io = emoe_io_new(&io, err, errlen);
    if (!c->io) {
        pthread_cond_destroy(&c->cv_done);
        pthread_mutex_destroy(&c->mu);
        goto fail;
    }
    c->st.direct = emoe_io_direct(c->io);
    return c;
nomem:
    if (err) snprintf(err, errlen, "out of memory creating the expert cache");
fail:
    if (c) {
        if (c->arena) munmap(c->arena, (size_t)c->arena_bytes);
        free(c->p);
        free(c->free_ext);
        free(c->lists);
        free(c->heaps);
        free(c->heap_ids);
        free(c);
    }
    return NULL;
}

void emoe_cache_free(emoe_cache *c) {
    if (!c) return;
    emoe_io_free(c->io); /* joins the threads: nothing touches the arena after this */
    pthread_cond_destroy(&c->cv_done);
    pthread_mutex_destroy(&c->mu);
    if (c->arena) munmap(c->arena, (size_t)c->arena_bytes);
    free(c->p);
    free(c->free_ext);
    free(c->pf_ids);
    free(c->lists);
    free(c->heaps);
    free(c->heap_ids);
    free(c);
}

/* ---- the compute thread's calls ---- */

static int valid_id(const emoe_cache *c, int id) { return id >= 0 && id < c->n && c->p[id].nbytes > 0; }

int emoe_cache_acquire(emoe_cache *c, const int *ids, int n, const uint64_t *keys) {
    if (!c || n < 0 || (n && (!ids || !keys))) return EMOE_ERR_ARG;
    for (int i = 0; i < n; i++)
        if (!valid_id(c, ids[i])) {
            snprintf(c->err, sizeof c->err, "emoe_cache_acquire: piece %d does not exist", ids[i]);
            return EMOE_ERR_ARG;
        }
    pthread_mutex_lock(&c->mu);
    int i, rc = EMOE_OK, compacted = 0;
again:
    for (i = 0; i < n; i++) {
        piece *p = &c->p[ids[i]];
        if (!compacted) p->entry = p->state;
        if (p->state == EMOE_PIECE_EMPTY || p->state == EMOE_PIECE_ERROR) {
            p->pins++; /* pinned first so that evictions for this request's later pieces spare it */
            if (!alloc_slot(c, ids[i], FOR_DEMAND, INFINITY)) {
                p->pins--;
                rc = EMOE_CACHE_FULL;
                break;
            }
            p->demand = 1;
            if (queue_piece(c, ids[i], keys[i])) {
                drop_slot(c, p);
                p->state = EMOE_PIECE_EMPTY;
                p->pins--;
                rc = EMOE_ERR_NOMEM;
                break;
            }
        } else {
            p->pins++;
            if (p->state == EMOE_PIECE_QUEUED || p->state == EMOE_PIECE_LOADING) p->demand = 1;
            if (p->state == EMOE_PIECE_QUEUED && keys[i] < p->key && queue_piece(c, ids[i], keys[i])) {
                p->pins--;
                rc = EMOE_ERR_NOMEM;
                break;
            }
        }
        relist(c, ids[i], 0);
    }
    if (rc) { /* roll back pieces 0..i-1: cancel the reads this call queued, unpin the rest */
        for (int j = 0; j < i; j++) {
            piece *p = &c->p[ids[j]];
            p->pins--;
            const uint8_t was = p->entry;
            if ((was == EMOE_PIECE_EMPTY || was == EMOE_PIECE_ERROR) && p->state == EMOE_PIECE_QUEUED && !p->pins) {
                list_remove(c, ids[j]);
                drop_slot(c, p);
                p->state = EMOE_PIECE_EMPTY;
                p->tag++;
                p->demand = 0;
            }
            relist(c, ids[j], 0);
        }
        if (rc == EMOE_CACHE_FULL) {
            uint64_t need = 0, busy = 0;
            for (int j = 0; j < n; j++) need += emoe_cache_slot_bytes(c->p[ids[j]].nbytes);
            for (int j = 0; j < c->n; j++)
                if (c->p[j].slot_bytes && (c->p[j].pins || c->p[j].state == EMOE_PIECE_LOADING)) busy++;
            if (need <= c->arena_bytes && !busy && !compacted) {
                /* nothing else holds memory, yet the request does not fit: the free space is fragmented (the
                 * request's own first pieces can split it). Empty the cache and place the request again. */
                for (int j = 0; j < c->n; j++)
                    if (!c->p[j].pins && (c->p[j].state == EMOE_PIECE_READY || c->p[j].state == EMOE_PIECE_QUEUED))
                        evict(c, j);
                compacted = 1;
                rc = EMOE_OK;
                goto again;
            }
            if (need > c->arena_bytes || !busy) { /* nothing will ever free up: it cannot fit */
                snprintf(c->err, sizeof c->err, "expert cache: %d pieces of %llu bytes do not fit in the cache of "
                         "%llu bytes (raise the memory budget)", n, (unsigned long long)need,
                         (unsigned long long)c->arena_bytes);
                rc = EMOE_ERR_BUDGET;
            }
        }
        pthread_mutex_unlock(&c->mu);
        return rc;
    }
    const uint64_t t = ++c->clock;
    for (i = 0; i < n; i++) {
        piece *p = &c->p[ids[i]];
        const int lv = p->level < EMOE_CACHE_MAX_LEVELS ? p->level : EMOE_CACHE_MAX_LEVELS - 1;
        if (p->entry == EMOE_PIECE_READY) c->st.hits[lv]++;
        else if (p->pf) c->st.late[lv]++;
        else c->st.misses[lv]++;
        if (p->pf) c->st.prefetch_used++, p->pf = 0;
        p->last_use = t;
        p->use_epoch = c->epoch;
        if (c->epoch >= p->freq_epoch) { /* one more use, the older ones decayed */
            p->freq = p->freq * pow(EMOE_CACHE_DECAY, (double)(c->epoch - p->freq_epoch)) + 1.0;
            p->freq_epoch = c->epoch;
        }
    }
    pthread_mutex_unlock(&c->mu);
    return EMOE_OK;
}

double emoe_cache_retention(emoe_cache *c, int id) {
    if (!c || id < 0 || id >= c->n) return 0.0;
    pthread_mutex_lock(&c->mu);
    const double r = retention(c, &c->p[id]);
    pthread_mutex_unlock(&c->mu);
    return r;
}

int emoe_cache_prefetch(emoe_cache *c, const int *ids, int n, uint64_t key, double confidence) {
    if (!c || n <= 0 || !ids) return 0;
    int queued = 0;
    pthread_mutex_lock(&c->mu);
    const uint64_t t = ++c->clock;
    for (int i = 0; i < n; i++) {
        if (!valid_id(c, ids[i])) continue;
        piece *p = &c->p[ids[i]];
        if (p->state == EMOE_PIECE_READY) {
            p->last_use = t;
            p->use_epoch = c->epoch;
            relist(c, ids[i], 1);
        } else if (p->state == EMOE_PIECE_QUEUED) {
            if (key < p->key && !queue_piece(c, ids[i], key)) relist(c, ids[i], 0);
        } else if (p->state == EMOE_PIECE_EMPTY || p->state == EMOE_PIECE_ERROR) {
            /* no room without displacing something worth more: stop here */
            if (!alloc_slot(c, ids[i], FOR_PREFETCH, retention(c, p) + confidence)) break;
            if (queue_piece(c, ids[i], key)) {
                drop_slot(c, p);
                p->state = EMOE_PIECE_EMPTY;
                break;
            }
            if (c->n_pf == c->cap_pf) {
                const size_t cap = c->cap_pf ? 2 * c->cap_pf : 256;
                int *g = realloc(c->pf_ids, cap * sizeof(int));
                if (g) c->pf_ids = g, c->cap_pf = cap;
            }
            if (c->n_pf < c->cap_pf) c->pf_ids[c->n_pf++] = ids[i];
            p->pf = 1;
            p->expired = 0;
            p->last_use = t;
            p->use_epoch = c->epoch;
            c->st.prefetch_issued++;
            relist(c, ids[i], 1);
            queued++;
        }
    }
    pthread_mutex_unlock(&c->mu);
    return queued;
}

void emoe_cache_release(emoe_cache *c, const int *ids, int n) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < n; i++) {
        if (!valid_id(c, ids[i]) || c->p[ids[i]].pins <= 0) continue;
        c->p[ids[i]].pins--;
        relist(c, ids[i], 1);
    }
    pthread_mutex_unlock(&c->mu);
}

void emoe_cache_requeue(emoe_cache *c, const int *ids, int n, uint64_t key) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < n; i++)
        if (valid_id(c, ids[i]) && c->p[ids[i]].state == EMOE_PIECE_QUEUED && c->p[ids[i]].key != key &&
            !queue_piece(c, ids[i], key))
            relist(c, ids[i], 0);
    pthread_mutex_unlock(&c->mu);
}

int emoe_cache_cancel_queued(emoe_cache *c, uint64_t lo, uint64_t hi) {
    if (!c) return 0;
    int n = 0;
    pthread_mutex_lock(&c->mu);
    for (int id = c->lists[L_QUEUED].head; id >= 0;) {
        const int next = c->p[id].next;
        if (c->p[id].key >= lo && c->p[id].key < hi) evict(c, id), n++;
        id = next;
    }
    pthread_mutex_unlock(&c->mu);
    return n;
}

int emoe_cache_expire_prefetches(emoe_cache *c, uint64_t lo, uint64_t hi) {
    if (!c) return 0;
    int n = 0;
    pthread_mutex_lock(&c->mu);
    size_t keep = 0;
    for (size_t i = 0; i < c->n_pf; i++) {
        const int id = c->pf_ids[i];
        piece *p = &c->p[id];
        if (!p->pf) continue; /* acquired, evicted or cancelled since: drop the entry */
        if (p->key < lo || p->key >= hi) {
            c->pf_ids[keep++] = id;
            continue;
        }
        n++;
        if (p->state == EMOE_PIECE_QUEUED && !p->pins) {
            evict(c, id); /* counts it wasted */
            continue;
        }
        c->st.prefetch_wasted++;
        p->pf = 0;
        if (p->state == EMOE_PIECE_LOADING) p->expired = 1;
        else if (p->state == EMOE_PIECE_READY && !p->pins) {
            list_remove(c, id);
            list_prepend(c, id, wanted_list(c, p));
        }
    }
    c->n_pf = keep;
    pthread_mutex_unlock(&c->mu);
    return n;
}

int emoe_cache_wait_groups(emoe_cache *c, const int *ids, const int *starts, const int *n_required, int n_groups,
                           const unsigned char *done, int partial) {
    if (!c || n_groups < 0 || (n_groups && (!ids || !starts))) return EMOE_ERR_ARG;
    pthread_mutex_lock(&c->mu);
    double t0 = -1.0;
    int result;
    for (;;) {
        int any = 0, full = -1, part = -1, fail = 0;
        for (int g = 0; g < n_groups && full < 0 && !fail; g++) {
            if (done && done[g]) continue;
            any = 1;
            const int req = n_required ? n_required[g] : starts[g + 1] - starts[g];
            int all = 1, req_ok = 1;
            for (int j = starts[g]; j < starts[g + 1]; j++) {
                const piece *p = &c->p[ids[j]];
                if (p->state == EMOE_PIECE_ERROR) {
                    fail = p->status ? p->status : EMOE_ERR_IO;
                    break;
                }
                if (p->state != EMOE_PIECE_READY) {
                    all = 0;
                    if (j - starts[g] < req) req_ok = 0;
                }
            }
            if (fail) break;
            if (all) full = g;
            else if (req_ok && part < 0) part = g;
        }
        if (fail) {
            result = fail;
            break;
        }
        if (!any) {
            result = -1;
            break;
        }
        if (full >= 0) {
            result = full;
            break;
        }
        if (partial && part >= 0) {
            result = part;
            break;
        }
        if (t0 < 0) t0 = now_s();
        pthread_cond_wait(&c->cv_done, &c->mu);
    }
    if (t0 >= 0) c->st.stall_s += now_s() - t0;
    pthread_mutex_unlock(&c->mu);
    return result;
}

void emoe_cache_wait_io(emoe_cache *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    int busy = 0;
    for (int i = 0; i < c->n && !busy; i++)
        busy = c->p[i].state == EMOE_PIECE_QUEUED || c->p[i].state == EMOE_PIECE_LOADING;
    if (busy) {
        const double t0 = now_s();
        pthread_cond_wait(&c->cv_done, &c->mu);
        c->st.stall_s += now_s() - t0;
    }
    pthread_mutex_unlock(&c->mu);
}

int emoe_cache_state(emoe_cache *c, int id) {
    if (!c || id < 0 || id >= c->n) return EMOE_PIECE_EMPTY;
    pthread_mutex_lock(&c->mu);
    const int s = c->p[id].state;
    pthread_mutex_unlock(&c->mu);
    return s;
}

const void *emoe_cache_data(emoe_cache *c, int id) {
    if (!c || id < 0 || id >= c->n) return NULL;
    pthread_mutex_lock(&c->mu);
    const piece *p = &c->p[id];
    const void *d = p->state == EMOE_PIECE_READY && p->slot_bytes ? c->arena + p->slot : NULL;
    pthread_mutex_unlock(&c->mu);
    return d;
}

const char *emoe_cache_error(emoe_cache *c) { return c ? c->err : "cache is NULL"; }

void emoe_cache_get_stats(emoe_cache *c, emoe_cache_stats *out) {
    if (!c || !out) return;
    pthread_mutex_lock(&c->mu);
    *out = c->st;
    out->used = c->used;
    out->peak_used = c->peak_used;
    out->read_syscalls = emoe_io_syscalls(c->io);
    uint64_t pinned = 0;
    for (int i = 0; i < c->n; i++)
        if (c->p[i].pins) pinned += c->p[i].slot_bytes;
    out->pinned_bytes = pinned;
    pthread_mutex_unlock(&c->mu);
}

void emoe_cache_reset_stats(emoe_cache *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    const int direct = c->st.direct;
    memset(&c->st, 0, sizeof c->st);
    c->st.capacity = c->arena_bytes;
    c->st.direct = direct;
    c->peak_used = c->used;
    pthread_mutex_unlock(&c->mu);
}

void emoe_cache_clear(emoe_cache *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n; i++) {
        piece *p = &c->p[i];
        if (p->pins) continue;
        if (p->state == EMOE_PIECE_READY || p->state == EMOE_PIECE_QUEUED) {
            const uint64_t ev = c->st.evictions, eb = c->st.evicted_bytes, ca = c->st.cancelled;
            evict(c, i);
            c->st.evictions = ev, c->st.evicted_bytes = eb, c->st.cancelled = ca; /* not policy evictions */
        }
    }
    pthread_mutex_unlock(&c->mu);
}

void emoe_cache_set_position(emoe_cache *c, int group, uint64_t epoch) {
    if (!c || group < 0 || group >= c->n_groups) return;
    pthread_mutex_lock(&c->mu);
    c->position = group;
    c->epoch = epoch;
    pthread_mutex_unlock(&c->mu);
}

void emoe_cache_pause_io(emoe_cache *c, int paused) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    emoe_io_pause(c->io, paused);
    pthread_mutex_unlock(&c->mu);
}

static int cmp_extent(const void *a, const void *b) {
    const extent *x = a, *y = b;
    return (x->off > y->off) - (x->off < y->off);
}

int emoe_cache_check(emoe_cache *c, char *err, size_t errlen) {
    if (!c) return EMOE_ERR_ARG;
    pthread_mutex_lock(&c->mu);
    int rc = EMOE_OK;
    size_t n_ext = 0;
    extent *all = malloc(((size_t)c->n + c->n_free + 1) * sizeof(extent));
    if (!all) {
        pthread_mutex_unlock(&c->mu);
        return EMOE_ERR_NOMEM;
    }
    uint64_t used = 0, free_bytes = 0;
#define FAIL(...)                                                                                                     \
    do {                                                                                                              \
        if (err) snprintf(err, errlen, __VA_ARGS__);                                                                  \
        rc = EMOE_ERR_ARG;                                                                                            \
        goto out;                                                                                                     \
    } while (0)
    for (int i = 0; i < c->n; i++) {
        const piece *p = &c->p[i];
        const int has = p->slot_bytes > 0;
        const int should = p->state == EMOE_PIECE_QUEUED || p->state == EMOE_PIECE_LOADING ||
                           p->state == EMOE_PIECE_READY;
        if (has != should) FAIL("piece %d: state %d but %s slot", i, p->state, has ? "a" : "no");
        if (p->pins < 0) FAIL("piece %d: negative pin count %d", i, p->pins);
        if (p->list != wanted_list(c, p)) FAIL("piece %d: on list %d, expected %d", i, p->list, wanted_list(c, p));
        if (!has) continue;
        if (p->slot_bytes != emoe_cache_slot_bytes(p->nbytes)) FAIL("piece %d: slot of %llu bytes for %llu", i,
                                                                   (unsigned long long)p->slot_bytes,
                                                                   (unsigned long long)p->nbytes);
        all[n_ext++] = (extent){p->slot, p->slot_bytes};
        used += p->slot_bytes;
    }
    for (size_t i = 0; i < c->n_free; i++) {
        if (i && c->free_ext[i - 1].off + c->free_ext[i - 1].len >= c->free_ext[i].off)
            FAIL("free extents %zu and %zu are not sorted, disjoint and coalesced", i - 1, i);
        all[n_ext++] = c->free_ext[i];
        free_bytes += c->free_ext[i].len;
    }
    if (used != c->used) FAIL("used = %llu but the slots add up to %llu", (unsigned long long)c->used,
                              (unsigned long long)used);
    if (used > c->arena_bytes) FAIL("used %llu > capacity %llu", (unsigned long long)used,
                                    (unsigned long long)c->arena_bytes);
    if (used + free_bytes != c->arena_bytes)
        FAIL("slots %llu + free %llu != arena %llu", (unsigned long long)used, (unsigned long long)free_bytes,
             (unsigned long long)c->arena_bytes);
    qsort(all, n_ext, sizeof(extent), cmp_extent);
    for (size_t i = 0; i < n_ext; i++) {
        if (all[i].off + all[i].len > c->arena_bytes) FAIL("extent at %llu runs past the arena",
                                                           (unsigned long long)all[i].off);
        if (i && all[i - 1].off + all[i - 1].len > all[i].off)
            FAIL("extents at %llu and %llu overlap", (unsigned long long)all[i - 1].off,
                 (unsigned long long)all[i].off);
    }
    for (int l = 1; l < c->n_lists; l++) { /* lists are consistent both ways */
        int prev = -1, count = 0;
        for (int id = c->lists[l].head; id >= 0; id = c->p[id].next) {
            if (c->p[id].list != l || c->p[id].prev != prev) FAIL("list %d is broken at piece %d", l, id);
            prev = id;
            if (++count > c->n) FAIL("list %d has a cycle", l);
        }
        if (c->lists[l].tail != prev) FAIL("list %d: tail %d, expected %d", l, c->lists[l].tail, prev);
    }
    for (int i = 0; i < c->n; i++) { /* heap membership follows the list; positions and order are consistent */
        const piece *p = &c->p[i];
        const int h = heap_of_list(c, p->list);
        if (p->heap != h) FAIL("piece %d: on heap %d, expected %d (list %d)", i, p->heap, h, p->list);
        if (h == H_NONE) continue;
        const pheap *hp = &c->heaps[h];
        if (p->hpos < 0 || p->hpos >= hp->n || hp->a[p->hpos] != i) FAIL("piece %d: bad heap position %d", i, p->hpos);
        if (p->hpos > 0 && heap_above(c, h, i, hp->a[(p->hpos - 1) / 2]))
            FAIL("heap %d: piece %d is above its parent", h, i);
        if (h != H_QUEUED && p->hkey != freq_key(p)) FAIL("piece %d: heap key %g, expected %g", i, p->hkey, freq_key(p));
    }
    for (int h = 0; h < c->n_heaps; h++)
        if (c->heaps[h].n < 0 || c->heaps[h].n > c->heaps[h].cap) FAIL("heap %d: %d of %d", h, c->heaps[h].n,
                                                                       c->heaps[h].cap);
#undef FAIL
out:
    free(all);
    pthread_mutex_unlock(&c->mu);
    return rc;
}
