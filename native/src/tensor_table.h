/* The tensor table: every tensor a model reads, stated once (role, container name pattern, shape in terms of
 * config fields, the layers that have it and the arch option it needs, a doc). Name resolution and expected shapes
 * (model.c), the resident and the streaming loaders (load.c, stream_load.c) and the checks all walk this table; the
 * core exports it (emoe_tensor_table_json): edgemoe/arch.py's TENSOR_TABLE and docs/FORMAT.md's tensor names are made
 * from that. A new tensor is one row here (a new shape term or layer kind: a TD_ / TL_ value with its name and doc in
 * tensor_table.c, and its value in Python's arch._dim / arch._layer_has, which tests/test_tensor_table.py checks). */
#ifndef EDGEMOE_TENSOR_TABLE_H
#define EDGEMOE_TENSOR_TABLE_H
#include <stddef.h>
#include <stdint.h>

#include "edgemoe.h"

typedef struct emoe_model emoe_model;

enum { TT_GLOBAL = 0, TT_LAYER = 1, TT_EXPERT = 2 }; /* the name pattern has 0, 1 (layer) or 2 (layer, expert) %d */
/* Shape terms (names and docs: tensor_table.c TD_INFO). */
enum { TD_ONE, TD_HIDDEN, TD_VOCAB, TD_Q, TD_KV, TD_QNORM, TD_KNORM, TD_EXPERTS, TD_EXPERT_FFN, TD_SHARED_FFN,
       TD_DENSE_FFN, TD_HEADS, TD_LA_CONV_DIM, TD_LA_CONV_TAPS, TD_LA_V, TD_LA_HEADS, TD_LA_VDIM, TD_CONV_IN,
       TD_CONV_KERNEL, TD_O, TD_Q_LORA, TD_KV_LORA, TD_KV_A, TD_KV_B };
/* Which layers have the tensor (with its option below): attention layers are those of no other kind (linear, conv);
 * dense-MLP layers are the non-MoE ones and, with dense_beside_moe, the MoE ones too; TL_ATTN_V: attention layers
 * with their own values (not Gemma-4's global layers under global_k_eq_v). */
enum { TL_ALL, TL_MOE, TL_DENSE, TL_ATTN, TL_LINEAR, TL_CONV, TL_ATTN_V };
/* Whether a model the config has it for must have it. */
enum {
    TN_REQUIRED,    /* always */
    TN_UNLESS_TIED, /* unless tie_embeddings (the lm_head) */
    TN_OPTIONAL,    /* never (the fitted expert predictor) */
    TN_IF_ROUTED,   /* when some routed expert maps to this stored expert (merged layers may store unused ones) */
};

typedef struct {
    const char *role;    /* Python's role key (edgemoe/arch.py TENSOR_TABLE) */
    const char *pattern; /* container name; %d = the layer, then the expert */
    int scope;           /* TT_* */
    int rows, cols;      /* TD_*; 1-D tensors have rows = TD_ONE */
    int layers;          /* TL_*: the layers that have it (global tensors: TL_ALL) */
    int32_t option;      /* offsetof an int32 emoe_config field that must be non-zero (an arch option), or -1 */
    const char *option_name; /* its arch key, or NULL */
    int unless;          /* 1: the option must be zero instead (UNLESS: plain q/k/v projections without MLA) */
    int need;            /* TN_* */
    size_t slot;         /* offsetof the tensor_ref in emoe_model (TT_GLOBAL) or layer_weights (TT_LAYER); for
                          * TT_EXPERT the matrix index 0..2 (gate, up, down) in layer_weights.experts */
    const char *doc;     /* what it is, beyond its shape and condition (Markdown; "" if nothing): FORMAT.md's notes */
} tt_entry;

extern const tt_entry tt_table[];
extern const int tt_count;

/* One instance of a table entry (a concrete tensor of a concrete model). */
typedef struct {
    int entry; /* index into tt_table */
    int layer, expert;
    int64_t rows, cols;
    int one_d, required;
    char name[96];
} tt_item;

/* The value of a shape term for layer l of this config (model.c's derived sizes; globals: l ignored). */
int64_t tt_dim(const emoe_model *m, int dim, int layer);
/* Whether layer l of the model has entry e (scope TT_GLOBAL: l ignored). */
int tt_present(const emoe_model *m, int e, int layer);
/* Parse a container name: the table entry it matches (-1: none) and its numbers. Numbers are plain decimals without
 * leading zeros, so one tensor has one name. */
int tt_parse(const char *name, int *layer, int *expert);
/* Write entry e's name for (layer, expert) into buf; the length, or -1 if it does not fit. */
int tt_name(char *buf, size_t n, int e, int layer, int expert);
/* Fill item for entry e at (layer, expert): name, shape, flags. */
void tt_instance(const emoe_model *m, int e, int layer, int expert, tt_item *item);
/* Call fn for every tensor the model reads, in table order: globals, then per layer its tensors followed by its stored
 * experts' matrices (expert-major). Stops at the first nonzero return of fn and returns it; else 0. */
int tt_walk(const emoe_model *m, int (*fn)(void *ctx, const tt_item *it), void *ctx);
/* Why entry e is absent from a config (for messages): its option ("qkv_bias"; with unless: that it must be 0) or its
 * layer kind ("a MoE layer"). */
const char *tt_condition_name(int e);

#endif
