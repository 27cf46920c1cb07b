/* The expert cache's memory: an anonymous mapping and its first-fit extent allocator. See cache_arena.h. */
#define _GNU_SOURCE
#include "cache_arena.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "edgemoe.h"
#include "io_thread.h"

uint64_t emoe_arena_slot_bytes(uint64_t nbytes) {
    return (nbytes + EMOE_IO_ALIGN - 1) / EMOE_IO_ALIGN * EMOE_IO_ALIGN;
}

int emoe_arena_init(emoe_arena *a, uint64_t capacity, size_t max_slots, char *err, size_t errlen) {
    *a = (emoe_arena){0};
    a->cap_free = max_slots + 2; /* never more holes than slots + 1 */
    a->free_ext = calloc(a->cap_free, sizeof(emoe_extent));
    if (!a->free_ext) {
        if (err) snprintf(err, errlen, "out of memory creating the expert cache");
        return EMOE_ERR_NOMEM;
    }
    a->bytes = capacity / EMOE_IO_ALIGN * EMOE_IO_ALIGN;
    if (!a->bytes) return EMOE_OK;
    void *m = mmap(NULL, (size_t)a->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        if (err) snprintf(err, errlen, "expert cache: cannot reserve %llu bytes of address space",
                          (unsigned long long)a->bytes);
        free(a->free_ext);
        *a = (emoe_arena){0};
        return EMOE_ERR_NOMEM;
    }
    a->base = m;
    a->free_ext[0] = (emoe_extent){0, a->bytes};
    a->n_free = 1;
    return EMOE_OK;
}

void emoe_arena_free(emoe_arena *a) {
    if (a->base) munmap(a->base, (size_t)a->bytes);
    free(a->free_ext);
    *a = (emoe_arena){0};
}

int emoe_arena_alloc(emoe_arena *a, uint64_t size, uint64_t *off) {
    for (size_t i = 0; i < a->n_free; i++) { /* first fit: keeps the touched part of the arena compact */
        emoe_extent *e = &a->free_ext[i];
        if (e->len < size) continue;
        *off = e->off;
        e->off += size, e->len -= size;
        if (!e->len) {
            memmove(e, e + 1, (a->n_free - i - 1) * sizeof(emoe_extent));
            a->n_free--;
        }
        a->used += size;
        if (a->used > a->peak_used) a->peak_used = a->used;
        return 1;
    }
    return 0;
}

int emoe_arena_release(emoe_arena *a, uint64_t off, uint64_t len) {
    size_t lo = 0, hi = a->n_free; /* first extent with offset > off */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (a->free_ext[mid].off > off) hi = mid;
        else lo = mid + 1;
    }
    const size_t i = lo;
    const int join_prev = i > 0 && a->free_ext[i - 1].off + a->free_ext[i - 1].len == off;
    const int join_next = i < a->n_free && off + len == a->free_ext[i].off;
    if (join_prev && join_next) {
        a->free_ext[i - 1].len += len + a->free_ext[i].len;
        memmove(&a->free_ext[i], &a->free_ext[i + 1], (a->n_free - i - 1) * sizeof(emoe_extent));
        a->n_free--;
    } else if (join_prev) {
        a->free_ext[i - 1].len += len;
    } else if (join_next) {
        a->free_ext[i].off = off, a->free_ext[i].len += len;
    } else {
        if (a->n_free == a->cap_free) { /* cannot happen: there are never more holes than slots + 1 */
            size_t cap = a->cap_free ? 2 * a->cap_free : 64;
            emoe_extent *g = realloc(a->free_ext, cap * sizeof(emoe_extent));
            if (!g) return EMOE_ERR_NOMEM;
            a->free_ext = g, a->cap_free = cap;
        }
        memmove(&a->free_ext[i + 1], &a->free_ext[i], (a->n_free - i) * sizeof(emoe_extent));
        a->free_ext[i] = (emoe_extent){off, len};
        a->n_free++;
    }
    a->used -= len;
    return EMOE_OK;
}

static int cmp_extent(const void *x, const void *y) {
    const emoe_extent *p = x, *q = y;
    return (p->off > q->off) - (p->off < q->off);
}

int emoe_arena_check(const emoe_arena *a, emoe_extent *slots, size_t n, char *err, size_t errlen) {
#define FAIL(...)                                                                                                     \
    do {                                                                                                              \
        if (err) snprintf(err, errlen, __VA_ARGS__);                                                                  \
        return EMOE_ERR_ARG;                                                                                          \
    } while (0)
    uint64_t used = 0, free_bytes = 0;
    for (size_t i = 0; i < n; i++) used += slots[i].len;
    for (size_t i = 0; i < a->n_free; i++) {
        if (i && a->free_ext[i - 1].off + a->free_ext[i - 1].len >= a->free_ext[i].off)
            FAIL("free extents %zu and %zu are not sorted, disjoint and coalesced", i - 1, i);
        free_bytes += a->free_ext[i].len;
    }
    if (used != a->used) FAIL("used = %llu but the slots add up to %llu", (unsigned long long)a->used,
                              (unsigned long long)used);
    if (used > a->bytes) FAIL("used %llu > capacity %llu", (unsigned long long)used, (unsigned long long)a->bytes);
    if (used + free_bytes != a->bytes)
        FAIL("slots %llu + free %llu != arena %llu", (unsigned long long)used, (unsigned long long)free_bytes,
             (unsigned long long)a->bytes);
    /* slots and free extents, merged in offset order, must not overlap (with the sums above: they tile the arena) */
    qsort(slots, n, sizeof(emoe_extent), cmp_extent);
    size_t i = 0, j = 0;
    const emoe_extent *prev = NULL;
    while (i < n || j < a->n_free) {
        const emoe_extent *e = j >= a->n_free || (i < n && slots[i].off < a->free_ext[j].off) ? &slots[i++]
                                                                                              : &a->free_ext[j++];
        if (e->off + e->len > a->bytes) FAIL("extent at %llu runs past the arena", (unsigned long long)e->off);
        if (prev && prev->off + prev->len > e->off)
            FAIL("extents at %llu and %llu overlap", (unsigned long long)prev->off, (unsigned long long)e->off);
        prev = e;
    }
#undef FAIL
    return EMOE_OK;
}
