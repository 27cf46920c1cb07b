/* HEBF (hottest-expert-bit-first, D^2MoE) scheduling of one MoE layer's expert pieces (hebf.c). The streaming engine
 * that runs it: stream_forward.c (the per-layer executor behind the model's stream hooks) and stream_load.c
 * (emoe_container_load_streaming, the budget plan); public API in edgemoe.h.
 *
 * Input: the routed (expert, weight) pairs of a block of tokens and, per pair, how many planes that token needs
 * (exact mode: all planes the model runs at; adaptive or mixed precision: fewer for some tokens). Output: the
 * (expert, level) pieces in load order:
 *   1. by level: every base plane (level 0) before any refinement plane (level 1, then 2, ...), so an expert's lower
 *      planes always load before its higher ones and every expert can start at base precision as early as possible;
 *   2. within a level, by the number of tokens that need this expert at >= this level (batch N), then by the sum of
 *      their routing weights (batch 1: the routing weight), then by expert id (deterministic).
 * The caller loads the pieces in this order (priority key = rank) and computes each expert as soon as its pieces
 * land, so I/O of the colder pieces overlaps the computation of the hotter ones.
 */
#ifndef EDGEMOE_HEBF_H
#define EDGEMOE_HEBF_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
    int32_t expert; /* stored expert id */
    int32_t level;  /* 0 = base plane */
    int32_t n_tok;  /* tokens needing this expert at >= this level */
    float weight;   /* sum of those tokens' routing weights for it */
} emoe_hebf_item;

/* Bytes of workspace emoe_hebf_order needs for n_experts x max_levels. */
size_t emoe_hebf_work_bytes(int n_experts, int max_levels);

/* experts/weights/levels: [n_tok * k] (token-major). experts[i] < 0 = no expert in that slot (ignored). levels[i] =
 * planes needed, clamped to 1..max_levels (levels NULL = max_levels for all). A token naming one expert in several
 * slots (merged experts) counts once, with the weights summed and the largest level. work: emoe_hebf_work_bytes of
 * scratch, or NULL to allocate. Writes at most max_out items to out; returns the number of items, or a negative
 * status (EMOE_ERR_ARG: bad input or out too small, EMOE_ERR_NOMEM). */
int emoe_hebf_order(int n_tok, int k, const int32_t *experts, const float *weights, const int32_t *levels,
                    int n_experts, int max_levels, emoe_hebf_item *out, int max_out, void *work);

#endif
