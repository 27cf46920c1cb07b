/* The architecture description (docs/FORMAT.md "arch"): the container's `arch` JSON object, parsed and validated into
 * emoe_config, the core's internal view of edgemoe/arch.py's ArchSpec. Private to the C core: the public API takes
 * the JSON text (emoe_model_new_json, emoe_arch_check), so no other language mirrors this struct.
 *
 * One reader for every path: emoe_container_open (resident and budgeted loading), emoe_model_new_json (the Python
 * engine) and emoe_arch_check (edgemoe.arch.ArchSpec.from_json) all call emoe_arch_read. It checks every field: exact
 * types (integers are integer literals, booleans are true/false, enums known strings, layer lists integers), ranges
 * (sizes bounded so products cannot overflow, heads divide, 1 <= top_k <= n_experts, finite positive eps and theta,
 * even rope_dim <= head_dim, layer lists inside 0..n_layers-1 without repeats, expert_map rows valid), required keys
 * present, unknown keys refused. */
#ifndef EDGEMOE_ARCH_H
#define EDGEMOE_ARCH_H
#include <stddef.h>
#include <stdint.h>

#include "edgemoe.h"
#include "json.h"

#if defined(__GNUC__) || defined(__clang__)
#define ARCH_API __attribute__((visibility("hidden")))
#else
#define ARCH_API
#endif

enum { EMOE_ROPE_NEOX = 0, EMOE_ROPE_NORM = 1 };
enum { EMOE_QK_NORM_NONE = 0, EMOE_QK_NORM_HEAD = 1, EMOE_QK_NORM_FULL = 2 };
enum { EMOE_ROUTER_SOFTMAX = 0, EMOE_ROUTER_SIGMOID = 1 };
enum { EMOE_ROUTER_IN_FFN_NORM = 0, EMOE_ROUTER_IN_LAYER_INPUT = 1, EMOE_ROUTER_IN_RESIDUAL_NORM = 2 };
enum { EMOE_GROUP_TOP2_SUM = 0, EMOE_GROUP_MAX = 1 }; /* DeepSeek-V3 / GLM-4.5; DeepSeek-V2 group_limited_greedy */
enum { EMOE_ACT_SWIGLU = 0, EMOE_ACT_REGLU = 1, EMOE_ACT_SWIGLU_CLAMP = 2, EMOE_ACT_GEGLU_TANH = 3 };
enum { EMOE_ROPE_SCALING_NONE = 0, EMOE_ROPE_SCALING_YARN = 1 };

/* Bounds of the sizes (emoe_arch_read): every product the core forms (vocab * hidden, n_layers * n_experts,
 * n_heads * head_dim, ...) fits in int64, and per-row sizes in int32. */
#define EMOE_MAX_LAYERS 4096
#define EMOE_MAX_HIDDEN (1 << 18)
#define EMOE_MAX_VOCAB (1 << 24)
#define EMOE_MAX_HEADS 1024
#define EMOE_MAX_HEAD_DIM 4096
#define EMOE_MAX_EXPERTS (1 << 16)
#define EMOE_MAX_FFN (1 << 20)
#define EMOE_MAX_LAYER_EXPERTS (1 << 26) /* n_layers * n_experts of an expert map */
#define EMOE_MAX_CONV 64                  /* taps of a linear-attention layer's causal convolution */
#define EMOE_MAX_CONV_KERNEL 64           /* taps of a short convolution (LFM2: 3) */

/* The architecture as the forward pass reads it: one member per arch_fields.h line (meanings: its doc there). Layer
 * lists and expert_map are borrowed only during emoe_model_new (copied). */
typedef struct emoe_config {
#define ARCH_INT(name, required, lo, hi, def, doc) int32_t name;
#define ARCH_FLOAT(name, zero_ok, def, doc) float name;
#define ARCH_BOOL(name, def, doc) int32_t name;
#define ARCH_ENUM(name, names, doc) int32_t name;
#define ARCH_LIST(name, doc) \
    int32_t n_##name;        \
    const int32_t *name;
#include "arch_fields.h"
    /* Merged experts (ArchSpec.expert_map): [n_layers * n_experts], routed expert e of layer l -> stored expert
     * expert_map[l * n_experts + e], or -1 = pruned (masked out of routing). NULL = identity for every layer. A layer
     * stores max(map) + 1 experts; when top-k picks several members of one group their weights are summed and the
     * group's expert runs once. */
    const int32_t *expert_map;
} emoe_config;

/* A parsed arch object: the config plus the fields the forward pass does not use. Owns its memory. */
typedef struct {
    emoe_config cfg; /* layer lists and expert_map point into `ints` */
#define ARCH_STRING(name, doc) char *name;
#define ARCH_ID(name, lo, hi, def, doc) int64_t name; /* -1 when null */
#include "arch_fields.h"
    int32_t *ints; /* the layer lists (n_layers each, in arch_fields.h order), then expert_map */
} emoe_arch;

/* Read and validate the arch object `obj` of a parsed document into *out (zeroed first; free with emoe_arch_free, also
 * after a failure). Returns EMOE_OK, EMOE_ERR_INVALID (message in err: "arch: what, expected what") or
 * EMOE_ERR_NOMEM. */
ARCH_API int emoe_arch_read(const json_doc *d, int obj, emoe_arch *out, char *err, size_t errlen);
/* The same from JSON text (strict parser, the object at the root). */
ARCH_API int emoe_arch_parse(const char *json, size_t len, emoe_arch *out, char *err, size_t errlen);
ARCH_API void emoe_arch_free(emoe_arch *a);

/* Layer l's token mixer (ArchSpec.layer_kind): softmax attention (MLA included) with a KV cache, or the kind that
 * replaces it, from the layer lists (valid while they are set: emoe_model_new reads it before clearing them). */
enum { EMOE_LAYER_ATTENTION = 0, EMOE_LAYER_LINEAR = 1, EMOE_LAYER_CONV = 2 }; /* Gated DeltaNet; LFM2 short conv */
ARCH_API int emoe_arch_layer_kind(const emoe_config *c, int layer);
/* Whether layer l runs (softmax) attention, with its tensors and a KV cache: emoe_arch_layer_kind is ATTENTION. */
ARCH_API int emoe_arch_is_attention_layer(const emoe_config *c, int layer);
/* Whether layer l is a full-attention layer (not a sliding one): Gemma-4's global_* fields apply to it. */
ARCH_API int emoe_arch_is_global_layer(const emoe_config *c, int layer);
/* The widest KV row of any layer (n_kv_heads * head_dim, or the global layers' if wider): the KV cache's row. */
ARCH_API int64_t emoe_arch_kv_dim(const emoe_config *c);

/* Internal model creation from a validated config (model.c). Returns NULL only when memory runs out; otherwise check
 * emoe_model_status(m). */
emoe_model *emoe_model_new(const emoe_config *cfg, int max_ctx, int kv_f16, int n_threads);

/* The container's architecture (edgemoe_container.h): valid until emoe_container_close. */
const emoe_config *emoe_container_config(const emoe_container *c);

#endif
