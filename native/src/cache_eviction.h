/* The expert cache's eviction policy: which READY or queued piece goes first. Each evictable piece is on one list
 * (and under EMOE_EVICT_FREQ, or while queued, one heap) that its state says (expert_cache_internal.h); a victim
 * costs O(groups). Called with the cache's mutex held. */
#ifndef EDGEMOE_CACHE_EVICTION_H
#define EDGEMOE_CACHE_EVICTION_H
#include <stddef.h>

#include "expert_cache_internal.h"

enum { EMOE_FOR_DEMAND, EMOE_FOR_PREFETCH }; /* who needs the room: a demand read or a prefetch */

/* The lists and heaps for c->n pieces in c->n_groups groups. EMOE_OK or EMOE_ERR_NOMEM (cache_eviction_free
 * releases what was made). */
int cache_eviction_init(emoe_cache *c, const emoe_piece_desc *pieces);
void cache_eviction_free(emoe_cache *c);
size_t cache_eviction_overhead_bytes(int n_pieces, int n_groups);

/* The list a piece's state puts it on (L_NONE: pinned, loading, empty or failed). */
int cache_wanted_list(const emoe_cache *c, const piece *p);
/* Put the piece on the list its state says, at the most recently used end when touch (or when it moves). */
void cache_relist(emoe_cache *c, int id, int touch);
/* Take the piece off its list and heap. */
void cache_unlist(emoe_cache *c, int id);
/* An unused prefetch whose layer has passed: make it the first victim of its list (never used, first to go). */
void cache_first_victim(emoe_cache *c, int id);
/* A queued piece's priority key changed: restore the queue heap's order. */
void cache_key_changed(emoe_cache *c, int id);

/* The next piece to evict (or, for demand, a queued request to cancel); -1 if none. */
int cache_pick_victim(emoe_cache *c, int why);
/* Decayed use frequency as of the current epoch (what EMOE_EVICT_FREQ ranks by, on an absolute scale). */
double cache_retention(const emoe_cache *c, const piece *p);

/* Lists and heaps consistent with the pieces' states. EMOE_OK or EMOE_ERR_ARG with a message. */
int cache_eviction_check(const emoe_cache *c, char *err, size_t errlen);

#endif
