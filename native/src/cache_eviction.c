/* Which piece of the expert cache goes first: the lists and heaps of evictable pieces and the policy that picks a
 * victim (EMOE_EVICT_LRU / CYCLIC / FREQ; see expert_cache.h). Called under the cache's mutex. */
#include "cache_eviction.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "edgemoe.h"

/* ---- heaps ---- */

/* EMOE_EVICT_CYCLIC's static order key: freq * DECAY^(now - freq_epoch) compares like log(freq) + freq_epoch * -log
 * (DECAY), which changes only when the piece is used. An unused prefetch is protected (+inf) until it expires. */
static double freq_key(const piece *p) {
    if (p->pf) return INFINITY;
    if (p->freq <= 0) return -INFINITY;
    return log(p->freq) - (double)p->freq_epoch * log(EMOE_CACHE_DECAY);
}

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

/* Put a piece that just joined list `which` on that list's heap. */
static void heap_join(emoe_cache *c, int id, int which) {
    const int h = heap_of_list(c, which);
    if (h == H_NONE) return;
    c->p[id].hkey = freq_key(&c->p[id]);
    heap_insert(c, h, id);
}

void cache_unlist(emoe_cache *c, int id) {
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

int cache_wanted_list(const emoe_cache *c, const piece *p) {
    if (p->pins) return L_NONE;
    if (p->state == EMOE_PIECE_READY) return ready_list(c, p->pf ? 1 : 0, p->level > 0 ? 0 : 1, p->group);
    if (p->state == EMOE_PIECE_QUEUED) return L_QUEUED;
    return L_NONE;
}

/* Put the piece on the list its state says, at the most recently used end when touch (or when it moves). */
void cache_relist(emoe_cache *c, int id, int touch) {
    piece *p = &c->p[id];
    const int w = cache_wanted_list(c, p);
    if (w == p->list && !touch) return;
    cache_unlist(c, id);
    if (w != L_NONE) list_append(c, id, w);
}

/* ---- the policy ---- */

/* The next piece to evict (or, for demand, a queued request to cancel); -1 if none. Costs O(groups), whatever the
 * number of pieces: each (class, group) offers one candidate, its list head or its heap top. */
int cache_pick_victim(emoe_cache *c, int why) {
    if (why == EMOE_FOR_DEMAND && c->heaps[H_QUEUED].n) return c->heaps[H_QUEUED].a[0]; /* lowest-priority request */
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
            const int pf_head = why == EMOE_FOR_DEMAND ? c->lists[ready_list(c, 1, cls, g)].head : -1;
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
double cache_retention(const emoe_cache *c, const piece *p) {
    if (p->freq <= 0) return 0.0;
    return p->freq * pow(EMOE_CACHE_DECAY, (double)(c->epoch > p->freq_epoch ? c->epoch - p->freq_epoch : 0));
}

/* ---- lifetime and checks ---- */

int cache_eviction_init(emoe_cache *c, const emoe_piece_desc *pieces) {
    c->n_lists = L_READY0 + 4 * c->n_groups;
    c->lists = calloc((size_t)c->n_lists, sizeof(plist));
    c->n_heaps = H_READY0 + 2 * c->n_groups;
    c->heaps = calloc((size_t)c->n_heaps, sizeof(pheap));
    c->heap_ids = malloc(2 * (size_t)(c->n ? c->n : 1) * sizeof(int));
    if (!c->lists || !c->heaps || !c->heap_ids) return EMOE_ERR_NOMEM;
    /* heap capacities: any piece may be queued; a READY heap holds at most its (class, group)'s pieces */
    c->heaps[H_QUEUED].cap = c->n;
    for (int i = 0; i < c->n; i++) c->heaps[H_READY0 + (pieces[i].level > 0 ? 0 : 1) * c->n_groups +
                                              pieces[i].group].cap++;
    for (int h = 0, at = 0; h < c->n_heaps; at += c->heaps[h].cap, h++) c->heaps[h].a = c->heap_ids + at;
    for (int l = 0; l < c->n_lists; l++) c->lists[l] = (plist){-1, -1};
    return EMOE_OK;
}

void cache_eviction_free(emoe_cache *c) {
    free(c->lists);
    free(c->heaps);
    free(c->heap_ids);
    c->lists = NULL, c->heaps = NULL, c->heap_ids = NULL;
}

size_t cache_eviction_overhead_bytes(int n_pieces, int n_groups) {
    const size_t groups = (size_t)(n_groups > 0 ? n_groups : 1);
    return (size_t)n_pieces * 2 * sizeof(int) + (L_READY0 + 4 * groups) * sizeof(plist) +
           (H_READY0 + 2 * groups) * sizeof(pheap);
}

void cache_first_victim(emoe_cache *c, int id) {
    cache_unlist(c, id);
    list_prepend(c, id, cache_wanted_list(c, &c->p[id]));
}

void cache_key_changed(emoe_cache *c, int id) {
    if (c->p[id].heap == H_QUEUED) heap_sift(c, H_QUEUED, c->p[id].hpos);
}

int cache_eviction_check(const emoe_cache *c, char *err, size_t errlen) {
#define FAIL(...)                                                                                                     \
    do {                                                                                                              \
        if (err) snprintf(err, errlen, __VA_ARGS__);                                                                  \
        return EMOE_ERR_ARG;                                                                                          \
    } while (0)
    for (int i = 0; i < c->n; i++) {
        const int want = cache_wanted_list(c, &c->p[i]);
        if (c->p[i].list != want) FAIL("piece %d: on list %d, expected %d", i, c->p[i].list, want);
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
    return EMOE_OK;
}
