/* The expert cache's API: piece states, demand and prefetch requests, the I/O thread's callbacks, waiting, byte
 * accounting and statistics. Its memory is cache_arena.c's, the choice of victims cache_eviction.c's. See
 * expert_cache.h. */
#define _GNU_SOURCE
#include "expert_cache.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache_eviction.h"
#include "edgemoe.h"
#include "expert_cache_internal.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

uint64_t emoe_cache_slot_bytes(uint64_t nbytes) { return emoe_arena_slot_bytes(nbytes); }

/* ---- slots ---- */

static void drop_slot(emoe_cache *c, piece *p) {
    if (!p->slot_bytes) return;
    emoe_arena_release(&c->arena, p->slot, p->slot_bytes);
    p->slot_bytes = 0;
}

/* Evict or cancel piece id (READY unpinned, or QUEUED unpinned). */
static void evict(emoe_cache *c, int id) {
    piece *p = &c->p[id];
    if (p->state == EMOE_PIECE_READY) c->st.evictions++, c->st.evicted_bytes += p->nbytes;
    else c->st.cancelled++;
    if (p->pf) c->st.prefetch_wasted++, p->pf = 0;
    cache_unlist(c, id);
    drop_slot(c, p);
    p->state = EMOE_PIECE_EMPTY;
    p->tag++; /* a queued entry of it in the I/O queue is now stale */
    p->demand = 0;
}


/* Give piece id a slot, evicting as needed: for a prefetch only pieces whose retention is below `limit`. 1 = done,
 * 0 = no victim left. */
static int alloc_slot(emoe_cache *c, int id, int why, double limit) {
    piece *p = &c->p[id];
    const uint64_t need = emoe_cache_slot_bytes(p->nbytes);
    if (need > c->arena.bytes) return 0;
    for (;;) {
        uint64_t off;
        if (emoe_arena_alloc(&c->arena, need, &off)) {
            p->slot = off, p->slot_bytes = need;
            return 1;
        }
        const int v = cache_pick_victim(c, why);
        if (v < 0) return 0;
        /* a prefetch is a guess: it may displace only what the cache values less (a QUEUED victim is demand's) */
        if (why == EMOE_FOR_PREFETCH && !(cache_retention(c, &c->p[v]) < limit)) return 0;
        evict(c, v);
    }
}

static int queue_piece(emoe_cache *c, int id, uint64_t key) {
    piece *p = &c->p[id];
    p->state = EMOE_PIECE_QUEUED;
    p->key = key;
    cache_key_changed(c, id);
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
    *job = (emoe_io_job){.dst = c->arena.base + p->slot, .dst_cap = p->slot_bytes, .off = p->off, .len = p->nbytes,
                         .crc32 = p->crc, .check_crc = check, .what = p->name};
    if (commit) {
        p->state = EMOE_PIECE_LOADING;
        p->checking = (uint8_t)check;
        cache_relist(c, id, 0);
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
        cache_first_victim(c, id);
    } else {
        cache_relist(c, id, 1);
    }
    p->expired = 0;
}

/* ---- lifetime ---- */

size_t emoe_cache_overhead_bytes(const emoe_cache_config *cfg) {
    emoe_io_config io = {.n_threads = cfg->io_threads, .direct = cfg->direct};
    /* per piece: its record, up to two free extents, a prefetch-list entry; the lists and heaps; the I/O buffers */
    return sizeof(struct emoe_cache) + (size_t)cfg->n_pieces * (sizeof(piece) + 2 * sizeof(emoe_extent) + sizeof(int)) +
           cache_eviction_overhead_bytes(cfg->n_pieces, cfg->n_groups) + emoe_io_overhead_bytes(&io);
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
    c->p = calloc((size_t)(c->n ? c->n : 1), sizeof(piece));
    if (!c->p || cache_eviction_init(c, cfg->pieces)) goto nomem;
    for (int i = 0; i < c->n; i++) {
        const emoe_piece_desc *d = &cfg->pieces[i];
        c->p[i] = (piece){.off = d->off, .nbytes = d->nbytes, .crc = d->crc32, .name = d->name, .prev = -1,
                          .next = -1, .heap = H_NONE, .hpos = -1, .level = (int16_t)(d->level < 0 ? 0 : d->level),
                          .group = d->group};
    }
    if (emoe_arena_init(&c->arena, cfg->capacity, (size_t)c->n, err, errlen)) goto fail;
    c->st.capacity = c->arena.bytes;
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
    c->st.drop_cache = !c->st.direct && cfg->drop_cache;
    c->st.read_note = emoe_io_note(c->io);
    return c;
nomem:
    if (err) snprintf(err, errlen, "out of memory creating the expert cache");
fail:
    if (c) {
        emoe_arena_free(&c->arena);
        free(c->p);
        cache_eviction_free(c);
        free(c);
    }
    return NULL;
}

void emoe_cache_free(emoe_cache *c) {
    if (!c) return;
    emoe_io_free(c->io); /* joins the threads: nothing touches the arena after this */
    pthread_cond_destroy(&c->cv_done);
    pthread_mutex_destroy(&c->mu);
    emoe_arena_free(&c->arena);
    free(c->p);
    free(c->pf_ids);
    cache_eviction_free(c);
    free(c);
}

/* ---- the compute thread's calls ---- */

static int valid_id(const emoe_cache *c, int id) { return id >= 0 && id < c->n && c->p[id].nbytes > 0; }

int emoe_cache_acquire(emoe_cache *c, const int *ids, int n, const uint64_t *keys) {
    if (!c || n < 0 || (n && (!ids || !keys))) return EMOE_ERR_ARG;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < n; i++)
        if (!valid_id(c, ids[i])) {
            snprintf(c->err, sizeof c->err, "emoe_cache_acquire: piece %d does not exist", ids[i]);
            pthread_mutex_unlock(&c->mu);
            return EMOE_ERR_ARG;
        }
    int i, rc = EMOE_OK, compacted = 0;
again:
    for (i = 0; i < n; i++) {
        piece *p = &c->p[ids[i]];
        if (!compacted) p->entry = p->state;
        if (p->state == EMOE_PIECE_EMPTY || p->state == EMOE_PIECE_ERROR) {
            p->pins++; /* pinned first so that evictions for this request's later pieces spare it */
            if (!alloc_slot(c, ids[i], EMOE_FOR_DEMAND, INFINITY)) {
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
        cache_relist(c, ids[i], 0);
    }
    if (rc) { /* roll back pieces 0..i-1: cancel the reads this call queued, unpin the rest */
        for (int j = 0; j < i; j++) {
            piece *p = &c->p[ids[j]];
            p->pins--;
            const uint8_t was = p->entry;
            if ((was == EMOE_PIECE_EMPTY || was == EMOE_PIECE_ERROR) && p->state == EMOE_PIECE_QUEUED && !p->pins) {
                cache_unlist(c, ids[j]);
                drop_slot(c, p);
                p->state = EMOE_PIECE_EMPTY;
                p->tag++;
                p->demand = 0;
            }
            cache_relist(c, ids[j], 0);
        }
        if (rc == EMOE_CACHE_FULL) {
            uint64_t need = 0, busy = 0;
            for (int j = 0; j < n; j++) need += emoe_cache_slot_bytes(c->p[ids[j]].nbytes);
            for (int j = 0; j < c->n; j++)
                if (c->p[j].slot_bytes && (c->p[j].pins || c->p[j].state == EMOE_PIECE_LOADING)) busy++;
            if (need <= c->arena.bytes && !busy && !compacted) {
                /* nothing else holds memory, yet the request does not fit: the free space is fragmented (the
                 * request's own first pieces can split it). Empty the cache and place the request again. */
                for (int j = 0; j < c->n; j++)
                    if (!c->p[j].pins && (c->p[j].state == EMOE_PIECE_READY || c->p[j].state == EMOE_PIECE_QUEUED))
                        evict(c, j);
                compacted = 1;
                rc = EMOE_OK;
                goto again;
            }
            if (need > c->arena.bytes || !busy) { /* nothing will ever free up: it cannot fit */
                snprintf(c->err, sizeof c->err, "expert cache: %d pieces of %llu bytes do not fit in the cache of "
                         "%llu bytes (raise the memory budget)", n, (unsigned long long)need,
                         (unsigned long long)c->arena.bytes);
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
    const double r = cache_retention(c, &c->p[id]);
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
            cache_relist(c, ids[i], 1);
        } else if (p->state == EMOE_PIECE_QUEUED) {
            if (key < p->key && !queue_piece(c, ids[i], key)) cache_relist(c, ids[i], 0);
        } else if (p->state == EMOE_PIECE_EMPTY || p->state == EMOE_PIECE_ERROR) {
            /* no room without displacing something worth more: stop here */
            if (!alloc_slot(c, ids[i], EMOE_FOR_PREFETCH, cache_retention(c, p) + confidence)) break;
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
            cache_relist(c, ids[i], 1);
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
        cache_relist(c, ids[i], 1);
    }
    pthread_mutex_unlock(&c->mu);
}

void emoe_cache_requeue(emoe_cache *c, const int *ids, int n, uint64_t key) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < n; i++)
        if (valid_id(c, ids[i]) && c->p[ids[i]].state == EMOE_PIECE_QUEUED && c->p[ids[i]].key != key &&
            !queue_piece(c, ids[i], key))
            cache_relist(c, ids[i], 0);
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
            cache_first_victim(c, id);
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
    const void *d = p->state == EMOE_PIECE_READY && p->slot_bytes ? c->arena.base + p->slot : NULL;
    pthread_mutex_unlock(&c->mu);
    return d;
}

const char *emoe_cache_error(emoe_cache *c) {
    if (!c) return "cache is NULL";
    /* copied under the lock: an I/O thread may be writing the next failure's message into err right now */
    pthread_mutex_lock(&c->mu);
    memcpy(c->err_out, c->err, sizeof c->err_out);
    pthread_mutex_unlock(&c->mu);
    return c->err_out;
}

void emoe_cache_get_stats(emoe_cache *c, emoe_cache_stats *out) {
    if (!c || !out) return;
    pthread_mutex_lock(&c->mu);
    *out = c->st;
    out->used = c->arena.used;
    out->peak_used = c->arena.peak_used;
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
    const emoe_cache_stats keep = c->st; /* the read mode is not a counter */
    memset(&c->st, 0, sizeof c->st);
    c->st.capacity = c->arena.bytes;
    c->st.direct = keep.direct, c->st.drop_cache = keep.drop_cache, c->st.read_note = keep.read_note;
    c->arena.peak_used = c->arena.used;
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


int emoe_cache_check(emoe_cache *c, char *err, size_t errlen) {
    if (!c) return EMOE_ERR_ARG;
    pthread_mutex_lock(&c->mu);
    int rc = EMOE_OK;
    size_t n_slots = 0;
    emoe_extent *slots = malloc(((size_t)c->n + 1) * sizeof(emoe_extent));
    if (!slots) {
        pthread_mutex_unlock(&c->mu);
        return EMOE_ERR_NOMEM;
    }
    for (int i = 0; i < c->n && !rc; i++) { /* a slot exactly when the state needs one */
        const piece *p = &c->p[i];
        const int has = p->slot_bytes > 0;
        const int should = p->state == EMOE_PIECE_QUEUED || p->state == EMOE_PIECE_LOADING ||
                           p->state == EMOE_PIECE_READY;
        rc = EMOE_ERR_ARG;
        if (has != should) snprintf(err, err ? errlen : 0, "piece %d: state %d but %s slot", i, p->state, has ? "a" : "no");
        else if (p->pins < 0) snprintf(err, err ? errlen : 0, "piece %d: negative pin count %d", i, p->pins);
        else if (has && p->slot_bytes != emoe_cache_slot_bytes(p->nbytes))
            snprintf(err, err ? errlen : 0, "piece %d: slot of %llu bytes for %llu", i,
                     (unsigned long long)p->slot_bytes, (unsigned long long)p->nbytes);
        else rc = EMOE_OK;
        if (has) slots[n_slots++] = (emoe_extent){p->slot, p->slot_bytes};
    }
    if (!rc) rc = cache_eviction_check(c, err, errlen);
    if (!rc) rc = emoe_arena_check(&c->arena, slots, n_slots, err, errlen);
    free(slots);
    pthread_mutex_unlock(&c->mu);
    return rc;
}
