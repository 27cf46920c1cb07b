/* The expert cache's memory: one anonymous mapping carved into slots by a first-fit extent allocator with coalescing.
 *
 * MAP_NORESERVE: pages count in RSS only once touched, and nothing goes through the page cache's mapping of the file,
 * so the RSS of the cache is at most its capacity whatever the access pattern. Slots are EMOE_IO_ALIGN-aligned (the
 * I/O thread reads into them, with O_DIRECT too). Not thread-safe: the cache calls it under its mutex.
 */
#ifndef EDGEMOE_CACHE_ARENA_H
#define EDGEMOE_CACHE_ARENA_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t off, len;
} emoe_extent;

typedef struct {
    unsigned char *base;     /* the mapping, [bytes]; NULL when bytes = 0 */
    uint64_t bytes;          /* capacity, a multiple of EMOE_IO_ALIGN */
    uint64_t used, peak_used; /* bytes in slots now / at most since init or emoe_arena_reset_peak */
    emoe_extent *free_ext;   /* [n_free] free extents, sorted by offset, coalesced */
    size_t n_free, cap_free;
} emoe_arena;

/* Bytes a slot for nbytes takes (rounded up to the slot alignment). */
uint64_t emoe_arena_slot_bytes(uint64_t nbytes);
/* Map `capacity` bytes (rounded down to the alignment) for at most max_slots slots at a time. EMOE_OK, or
 * EMOE_ERR_NOMEM with a message. */
int emoe_arena_init(emoe_arena *a, uint64_t capacity, size_t max_slots, char *err, size_t errlen);
void emoe_arena_free(emoe_arena *a);
/* A slot of `size` bytes (from emoe_arena_slot_bytes): 1 and its offset, or 0 if no free extent is large enough. */
int emoe_arena_alloc(emoe_arena *a, uint64_t size, uint64_t *off);
/* Return a slot. EMOE_OK or EMOE_ERR_NOMEM. */
int emoe_arena_release(emoe_arena *a, uint64_t off, uint64_t len);
/* Check the accounting from scratch against the slots in use ([n], in any order; the array is sorted in place): the
 * free extents are sorted and coalesced, slots and free extents are disjoint, lie inside the arena and cover it, and
 * used = the sum of the slots. EMOE_OK or EMOE_ERR_ARG with a message. */
int emoe_arena_check(const emoe_arena *a, emoe_extent *slots, size_t n, char *err, size_t errlen);

#endif
