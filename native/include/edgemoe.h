/* edgemoe C core: public API.
 *
 * A model is a description (the arch JSON, validated into the core's private emoe_config) plus borrowed weight pointers
 * (usually into an mmap of the container), a KV cache, scratch buffers and a persistent thread pool. Any number of
 * models may be open at once; the library keeps no mutable global state except the result of CPU feature detection.
 *
 * Errors: every function that can fail returns an emoe_status (0 = ok, negative = error). Model functions also keep a
 * human-readable message, emoe_model_last_error(m). Nothing here calls exit() or abort().
 *
 * Threads: a model runs its work on its own pool; call each model from one thread at a time (different models may
 * be used from different threads concurrently).
 *
 * Matrices are row-major [out, in] (the Hugging Face orientation): y[o] = sum_i W[o,i] x[i].
 * Weight types: f32, f16 (IEEE half), Q8_0 (ggml's layout: blocks of 32 along the input dim, each
 * {uint16 f16 scale d; int8 qs[32]} = 34 bytes, value = d * q). Norm weights and biases are always f32.
 * Expert matrices may also be MWQ bit planes (docs/FORMAT.md "MWQ bit planes"), run at any precision k: see
 * emoe_matmul_mwq and emoe_model_set_expert_mwq.
 */
#ifndef EDGEMOE_H
#define EDGEMOE_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes ---- */
typedef enum {
    EMOE_OK = 0,
    EMOE_ERR_ARG = -1,       /* an argument is invalid (bad name, shape, dtype, token id, ...) */
    EMOE_ERR_NOMEM = -2,     /* allocation failed */
    EMOE_ERR_NOT_READY = -3, /* a required tensor has not been set */
    EMOE_ERR_CTX = -4,       /* the KV cache (max_ctx) is full */
    EMOE_ERR_ISA = -5,       /* the requested instruction set is not supported by this CPU/build */
    EMOE_ERR_THREAD = -6,    /* thread creation failed */
    EMOE_ERR_IO = -7,        /* reading expert weights failed (I/O error, file truncated or replaced) */
    EMOE_ERR_CORRUPT = -8,   /* expert weights failed their CRC-32 (the file is damaged) */
    EMOE_ERR_BUDGET = -9,    /* the memory budget is below the minimum this model and context need */
    EMOE_ERR_FORMAT = -10,   /* not an edgemoe container (wrong magic), or a version this reader does not know */
    EMOE_ERR_INVALID = -11,  /* a container index or arch description that breaks the format (types, ranges, keys) */
} emoe_status;

const char *emoe_version(void);
const char *emoe_status_string(int status);

/* CRC-32 (IEEE 802.3, zlib-compatible), continuing from `crc` (0 to start). */
uint32_t emoe_crc32(uint32_t crc, const void *data, size_t len);

/* ---- weight types ---- */
enum { EMOE_F32 = 0, EMOE_F16 = 1, EMOE_Q8_0 = 2 };
#define EMOE_QK8_0 32            /* values per Q8_0 block */
#define EMOE_Q8_0_BLOCK_BYTES 34 /* bytes per Q8_0 block */

/* Bytes of one row of `cols` values of type `dtype` (cols % 32 == 0 for Q8_0), or 0 if invalid. */
size_t emoe_row_bytes(int dtype, int64_t cols);

/* Quantize n f32 values (n % 32 == 0) to Q8_0, exactly like ggml's reference quantizer:
 * d = max|x| / 127, q = roundf(x / d) (round half away from zero), d stored as f16. dst holds n/32*34 bytes. */
int emoe_quantize_q8_0(const float *src, void *dst, int64_t n);
/* dst[i] = d * q (f32). */
int emoe_dequantize_q8_0(const void *src, float *dst, int64_t n);
/* IEEE half <-> single (round to nearest even), n values. */
void emoe_f32_to_f16(const float *src, uint16_t *dst, int64_t n);
void emoe_f16_to_f32(const uint16_t *src, float *dst, int64_t n);

/* ---- instruction sets ---- */
enum {
    EMOE_ISA_AUTO = -1,  /* the best one this CPU supports */
    EMOE_ISA_SCALAR = 0, /* portable C reference */
    EMOE_ISA_AVX2 = 1,   /* x86-64 AVX2 + FMA + F16C */
    EMOE_ISA_NEON = 2,   /* aarch64 Advanced SIMD (base armv8-a) */
    EMOE_ISA_NEON_DOTPROD = 3, /* aarch64 NEON + SDOT (armv8.2-a dotprod), selected only if HWCAP says so */
    EMOE_ISA_AVX512VNNI = 4,   /* x86-64 AVX2 level + AVX-512 F/BW/VL + VNNI (cpuid + XGETBV: ZMM and opmask state) */
    EMOE_ISA_COUNT = 5,
};
int emoe_isa_supported(int isa);    /* 1 if this CPU + build can run it */
/* what EMOE_ISA_AUTO resolves to; env EDGEMOE_ISA=scalar|avx2|neon|neon_dotprod|avx512vnni overrides (if supported) */
int emoe_isa_best(void);
const char *emoe_isa_name(int isa); /* "scalar", "avx2", ... or NULL */

/* ---- thread pool ----
 * Persistent pthreads; the calling thread is worker 0, so n_threads=1 creates no thread. */
typedef struct emoe_pool emoe_pool;
emoe_pool *emoe_pool_new(int n_threads); /* NULL on failure */
void emoe_pool_free(emoe_pool *pool);
int emoe_pool_threads(const emoe_pool *pool);

/* ---- kernels (for tests and benchmarks; the forward pass uses the same code) ----
 * Y[t, o] = sum_i W[o, i] X[t, i] for o < rows, t < n_tok; W is `rows` rows of `cols` values of type wtype,
 * X is [n_tok, cols] f32 and Y is [n_tok, rows] f32. pool may be NULL (single thread).
 * For Q8_0 weights X is first quantized per block of 32 to int8 with an f32 scale (see emoe_quantize_act) and the
 * dot products are integer; with wtype = EMOE_Q8_0 | EMOE_MATMUL_F32_ACT the weights are dequantized on the fly and
 * multiplied with f32 activations instead (exact, about half the speed). Other types: f32 products and sums. */
#define EMOE_MATMUL_F32_ACT 0x100
int emoe_matmul(emoe_pool *pool, int isa, int wtype, const void *w, int64_t rows, int64_t cols, const float *x,
                int64_t n_tok, float *y);
/* The activation quantizer of the Q8_0 path: per block of 32, d = max|x|/127 (f32), q = round-half-even(x/d).
 * dst receives n/32 blocks of {float d; int8 q[32]} (36 bytes each). Exposed so tests can check SIMD == scalar. */
int emoe_quantize_act(int isa, const float *src, void *dst, int64_t n);
/* y[i] += a * x[i] with x of type xtype (EMOE_F32 or EMOE_F16): the attention value accumulation kernel. */
int emoe_axpy(int isa, int xtype, float a, const void *x, float *y, int64_t n);
/* f32 <-> f16 row conversion with a given ISA (for tests). */
int emoe_convert_f16(int isa, int to_f16, const void *src, void *dst, int64_t n);

/* ---- MWQ bit planes ----
 * An [rows, cols] matrix in groups of `group` inputs (ng = cols / group per row) stored as planes P1..PK
 * (docs/FORMAT.md "MWQ bit planes"):
 *   P1 = s1 f16[rows*ng] | m1 f16[rows*ng] | codes (base_bits bits each, little-endian within bytes, row-major)
 *   Pp = s_p f16[rows*ng] | signs (1 bit per weight, bit j of a byte = weight j, 1 -> +1, 0 -> -1)   (p >= 2)
 * and run at precision k <= K: W_hat_k = s1*q + m1 + sum_{p=2..k} s_p*B_p (only planes 1..k are read).
 * base_bits in {2, 4, 8}; group a multiple of 8 that divides cols; K <= EMOE_MWQ_MAX_PLANES. Plane p lives at
 * (const char *)planes_base + plane_offsets[p-1] (each 2-byte aligned). Containers store the planes in order and
 * adjacent (64-byte aligned), so precision k is the byte range [0, plane_offsets[k-1] + emoe_mwq_plane_bytes(k, ...)).
 *
 * Like Q8_0, the default path quantizes the activations to int8 per block of 32 inputs (d = max|x|/127, the last
 * block of a row may be shorter when cols % 32 != 0) and uses integer dot products: per (row, group, block) the base
 * plane gives sum q*x_q, every residual plane 2*sum_{bit=1} x_q - sum x_q (sign flips of x), combined with the f32
 * scales. The result is the exact product of W_hat_k with the quantized activations up to f32 rounding.
 * base_bits | EMOE_MATMUL_F32_ACT keeps the activations f32 (W_hat_k is rebuilt 8 weights at a time in registers,
 * bit-identical to edgemoe/mwq.py's dequantize, then f32 fma; slower).
 * SIMD kernels run when 256/base_bits (the inputs of 32 code bytes) and group divide one another (every power-of-two
 * group >= 16, and >= 8 for base_bits 4 and 8); other groups run the scalar kernel on every ISA. */
#define EMOE_MWQ_MAX_PLANES 8
/* base_bits | EMOE_MWQ_NO_LUT: do not use the table-lookup kernels (native/src/mwq_lut.h: base_bits 2, group % 32
 * == 0; they are the default where the ISA has them: scalar, avx512vnni with GFNI + VBMI, neon) but the per-plane
 * dot-product kernels above (for comparisons and benchmarks; the results differ by f32 rounding only). */
#define EMOE_MWQ_NO_LUT 0x200
/* 1 if emoe_matmul_mwq on this ISA (EMOE_ISA_AUTO = the best) uses table-lookup kernels for (base_bits 2, group % 32
 * == 0); 0 if it runs its per-plane kernels there too. */
int emoe_mwq_lut_available(int isa);
/* Bytes of plane `plane` (1 = base) of an MWQ matrix, scales included; 0 if a parameter is invalid. */
int64_t emoe_mwq_plane_bytes(int plane, int base_bits, int group, int64_t rows, int64_t cols);
/* Y[t, o] = sum_i W_hat_k[o, i] X[t, i]: X is [n_tok, cols] f32, Y is [n_tok, rows] f32, pool may be NULL. */
int emoe_matmul_mwq(emoe_pool *pool, int isa, const void *planes_base, const int64_t *plane_offsets, int k,
                    int base_bits, int group, int64_t rows, int64_t cols, const float *x, int64_t n_tok, float *y);

/* ---- model ----
 * A model is created from its architecture description: the JSON object a container stores under "arch"
 * (docs/FORMAT.md "The arch object"; edgemoe/arch.py ArchSpec writes it). The core parses and validates every field
 * itself, so no other language mirrors its config struct and a file means the same thing to every reader. */
typedef struct emoe_model emoe_model;

/* Create a model for the arch JSON text arch_json[0..len) (need not be NUL-terminated) with a KV cache of max_ctx
 * positions (f16 if kv_f16, else f32) and a pool of n_threads. Returns NULL on any problem with a one-line message
 * in err and its kind in *status (if status != NULL; EMOE_OK on success): EMOE_ERR_INVALID for a description that
 * breaks the rules of docs/FORMAT.md "The arch object" (not valid strict JSON, unknown or missing keys, wrong types,
 * values out of range or inconsistent), EMOE_ERR_ARG for a bad max_ctx / n_threads, EMOE_ERR_NOMEM. */
emoe_model *emoe_model_new_json(const char *arch_json, size_t len, int max_ctx, int kv_f16, int n_threads, int *status,
                                char *err, size_t errlen);
/* Validate an arch JSON text as emoe_model_new_json would, without creating anything: EMOE_OK, or
 * EMOE_ERR_INVALID / EMOE_ERR_NOMEM with the message in err ("arch: ..."). */
int emoe_arch_check(const char *arch_json, size_t len, char *err, size_t errlen);
/* The arch object's schema, the one list of its keys (native/src/arch_fields.h), as JSON text: an array with one
 * object per key in table order: {"name", "kind" (int | float | bool | enum | string | id | list | map), "type" (the
 * Python type), "required", "default" (null when required or none), "lo"/"hi" (int, id, float: the float's lo is
 * exclusive unless "zero_ok"), "names" (enum: allowed strings, the first is the default), "max_bytes" (string),
 * "doc"}. edgemoe/arch.py builds ArchSpec from it. Writes at most len bytes (NUL-terminated, truncated if short) and
 * returns the full text's length without the NUL, like snprintf: call with (NULL, 0) to size the buffer. */
size_t emoe_arch_schema_json(char *buf, size_t len);
/* The tensor table, the one list of the tensors a model reads (native/src/tensor_table.c), as JSON text: an object
 * {"dims", "layer_kinds", "needs": [{"name", "doc"}...], "tensors": [...]} with one object per tensor in table order:
 * {"role", "pattern" (the container name with {layer} and {expert} for its numbers), "scope" (global | layer |
 * expert), "rows" (a dims name; null for a 1-D tensor), "cols", "layers" (a layer_kinds name: the layers that have
 * it), "option" (an arch key that must be set, i.e. non-zero / true / not its enum's first value; null if none),
 * "negated" (true: the option must be unset instead), "need" (a needs name), "doc"}. edgemoe/arch.py builds its
 * TENSOR_TABLE from it. Same contract as emoe_arch_schema_json (snprintf: (NULL, 0) sizes the buffer). */
size_t emoe_tensor_table_json(char *buf, size_t len);
void emoe_model_free(emoe_model *m);
int emoe_model_status(const emoe_model *m);         /* the creation status (EMOE_OK if usable) */
const char *emoe_model_last_error(const emoe_model *m); /* message of the last failed call ("" if none) */

/* Register a tensor by its container name (the tensor table's: emoe_tensor_table_json). The pointer is borrowed: it
 * must stay valid until the model is freed. Matrices: rows x cols as in the table, dtype EMOE_F32/F16/Q8_0 (Q8_0
 * needs cols % 32 == 0). 1-D tensors (norms, biases, ffn_gate_inp_shexp): rows = 1, cols = length, dtype EMOE_F32. */
int emoe_model_set_tensor(emoe_model *m, const char *name, int dtype, const void *data, int64_t rows, int64_t cols);
/* The shape the model expects for `name` (1-D tensors: rows = 1); EMOE_ERR_ARG if the name is not one of its
 * tensors. */
int emoe_model_expected_shape(emoe_model *m, const char *name, int64_t *rows, int64_t *cols);
/* The tensors this model reads, from the one tensor table (native/src/tensor_table.c, emoe_tensor_table_json):
 * globals, then per layer its tensors followed by its stored experts' matrices. Returns the count; for 0 <= i < count
 * also fills tensor i's name (at most n bytes, NUL-terminated), ndim (1 or 2), shape (1-D tensors: rows = 1) and
 * whether a model must have it (0: lm_head with tie_embeddings, the optional fitted predictor
 * blk.L.ffn_gate_inp_pre.weight, a merged layer's stored expert no routed expert maps to). Any pointer may be NULL. */
int emoe_model_tensor(emoe_model *m, int i, char *name, size_t n, int *ndim, int64_t *rows, int64_t *cols,
                      int *required);
/* EMOE_OK if every required tensor is set, else EMOE_ERR_NOT_READY naming the first missing one. */
int emoe_model_ready(emoe_model *m);
/* Register an expert matrix (blk.L.expert.E.ffn_{gate,up,down}.weight) stored as MWQ bit planes: n_planes planes at
 * base + plane_offsets[p-1] (see emoe_matmul_mwq; the offsets are copied, the planes borrowed until the model is
 * freed). Replaces any earlier registration of that name. */
int emoe_model_set_expert_mwq(emoe_model *m, const char *name, const void *base, const int64_t *plane_offsets,
                              int n_planes, int base_bits, int group, int64_t rows, int64_t cols);
/* Run every MWQ expert at k planes (1..EMOE_MWQ_MAX_PLANES; 0 = all its stored planes, the default). An expert
 * storing fewer than k planes is an error at emoe_model_ready / emoe_forward. */
int emoe_model_set_precision(emoe_model *m, int k);
int emoe_model_precision(const emoe_model *m); /* 0 = all stored planes */
/* Q8_0 and MWQ matmuls: 0 = quantize activations to int8 per block of 32 (default: fast, llama.cpp-like, adds
 * ~0.2-0.5% error per dot product), 1 = keep activations f32 (exact w.r.t. the dequantized weights, slower). */
int emoe_model_set_q8_f32_act(emoe_model *m, int on);
/* Choose the kernels (EMOE_ISA_AUTO = best); EMOE_ERR_ISA if unsupported. */
int emoe_model_set_isa(emoe_model *m, int isa);
int emoe_model_isa(const emoe_model *m);

/* Run n_tokens tokens at positions n_past.. (appending to the KV cache). Long inputs are processed in blocks.
 * logits_out: NULL, or [n_tokens, vocab] if all_logits, else [vocab] (the last token's). */
int emoe_forward(emoe_model *m, const int32_t *tokens, int n_tokens, float *logits_out, int all_logits);
int emoe_model_n_past(const emoe_model *m);
void emoe_model_reset(emoe_model *m); /* clear the KV cache and conv state (n_past = 0) */
/* Keep the first n_keep positions of the KV cache (0 <= n_keep <= n_past, else EMOE_ERR_ARG): the next
 * emoe_forward continues at position n_keep. For reusing a shared prompt prefix. A model with conv layers (LFM2)
 * keeps their rolling state, not one entry per position: n_keep must be 0 or n_past (else EMOE_ERR_ARG). */
int emoe_model_truncate(emoe_model *m, int n_keep);

/* ---- several sequences: batch decoding ----
 * A model holds n_seq sequences (1 by default), each with its own KV cache region and n_past; the single-sequence
 * calls above (emoe_forward, emoe_model_n_past, emoe_model_reset, emoe_model_truncate) act on sequence 0.
 * emoe_forward_batch runs one new token of each of n distinct sequences as one block: every layer's work is done
 * once for the n tokens, so an expert routed to by several sequences is read (under a memory budget) and run once.
 * A token's logits do not depend on the other tokens of its block (same bits as decoding it alone).
 * Every call returns EMOE_ERR_ARG for a sequence outside 0..n_seq-1 (message in emoe_model_last_error). */
/* Resize to n_seq >= 1 sequences: reallocates the KV cache (n_seq x n_layers x max_ctx x kv_dim) and empties every
 * sequence. EMOE_ERR_NOMEM (the old cache stays), or for a model under a memory budget EMOE_ERR_BUDGET beyond the
 * n_seq the budget counted at load (emoe_stream_options.n_seq). */
int emoe_model_set_n_seq(emoe_model *m, int n_seq);
int emoe_model_n_seq(const emoe_model *m);
/* emoe_forward for sequence seq: its n_tokens tokens at positions seq_n_past(seq).. (EMOE_ERR_CTX if they do not
 * fit in max_ctx, nothing run). */
int emoe_forward_seq(emoe_model *m, int seq, const int32_t *tokens, int n_tokens, float *logits_out, int all_logits);
/* tokens[i] is the next token of sequence seqs[i] (distinct, else EMOE_ERR_ARG), at position seq_n_past(seqs[i]);
 * logits_out: NULL or [n, vocab]. EMOE_ERR_CTX if one of the sequences already holds max_ctx positions. On any error
 * no sequence advances. */
int emoe_forward_batch(emoe_model *m, const int32_t *tokens, const int32_t *seqs, int n, float *logits_out);
int emoe_model_seq_n_past(emoe_model *m, int seq); /* positions sequence seq holds, or EMOE_ERR_ARG (< 0) */
int emoe_model_truncate_seq(emoe_model *m, int seq, int n_keep); /* emoe_model_truncate for sequence seq */
void emoe_model_reset_seq(emoe_model *m, int seq); /* empty sequence seq (a bad seq is ignored) */

/* ---- a hard memory budget: dense weights resident, experts streamed through a byte-budgeted cache ----
 * emoe_container_load_streaming reads the dense weights (embeddings, attention, routers, norms, shared experts) once
 * into anonymous memory, and gives every expert matrix's planes (f32/f16/q8_0: one piece per matrix; MWQ: one per
 * plane) to an expert cache of `budget - dense - KV cache - scratch` bytes, filled by a dedicated I/O thread with
 * pread (never through an mmap of the file). Per MoE layer the routed experts' pieces are loaded in HEBF order
 * (base planes first, hottest experts first) and each expert is computed as soon as its pieces have landed; before a
 * layer's attention its experts are predicted (the layer's router, or a fitted `blk.L.ffn_gate_inp_pre.weight`, on
 * attn_norm(layer input); SmallThinker: its own pre-attention router) and their reads queued.
 * Modes: EXACT (default) computes every expert at the model's precision, so output is bit-identical to the
 * all-resident model; ADAPTIVE computes an expert at whatever planes are resident rather than wait for a refinement
 * plane (MWQ only; base planes are always waited for); ONDEMAND is the baseline: no prefetch, each expert loaded
 * when it is reached and computed before the next is requested, plain LRU eviction.
 * Eviction (EXACT, ADAPTIVE): queued prefetches first, then refinement planes before base planes, then LRU +
 * frequency: the lowest use count decayed by 0.9 per token, ties to the layer whose next use is furthest (plain LRU
 * evicts exactly what the next layers need once the cache holds less than a token's experts). The option `evict`
 * overrides the policy (for experiments). */
typedef struct emoe_container emoe_container; /* edgemoe_container.h */
enum { EMOE_MODE_EXACT = 0, EMOE_MODE_ADAPTIVE = 1, EMOE_MODE_ONDEMAND = 2 };
enum { EMOE_VERIFY_READS_NEVER = 0, EMOE_VERIFY_READS_FIRST = 1, EMOE_VERIFY_READS_ALWAYS = 2 };
typedef struct {
    int64_t budget_bytes; /* everything the model holds: dense + KV cache + scratch + expert cache; <= 0: no limit */
    int32_t mode;           /* EMOE_MODE_* */
    int32_t prefetch;       /* 0 = none, 1 = before each layer's attention (default), 2 = also layer l+1 from layer
                               l's post-attention state while layer l's experts run */
    int32_t prefetch_extra; /* predict each token's top-(k + extra) experts (default 1) */
    int32_t precision;      /* MWQ experts: planes to run at (0 = all stored) */
    int32_t io_threads;     /* reader threads (default 2) */
    int32_t direct;         /* 1 (default): O_DIRECT reads, so the page cache does not hold the file beside the
                               budget; where the file system refuses O_DIRECT, buffered reads (emoe_stats says so) */
    int32_t drop_cache;     /* 1 (default): posix_fadvise(DONTNEED) after each buffered read (the fallback above, or
                               direct = 0): the pages a read brought in are dropped after use */
    int32_t verify;         /* EMOE_VERIFY_READS_*: CRC-32 of each piece on its first read (default) or every read;
                               dense weights are checked once at load unless NEVER */
    int32_t n_seq;          /* sequences whose KV cache the budget holds (default 1; see emoe_model_set_n_seq) */
    int32_t evict;          /* EMOE_EVICT_POLICY_*: AUTO (default) = LRU for ONDEMAND, FREQ otherwise; the others
                               force a policy (for experiments) */
    float prefetch_min_confidence; /* a prefetch may evict only above this probability that the expert is used
                                      (default 0.5; 0..1) */
} emoe_stream_options;
enum { EMOE_EVICT_POLICY_AUTO = 0, EMOE_EVICT_POLICY_LRU = 1, EMOE_EVICT_POLICY_CYCLIC = 2, EMOE_EVICT_POLICY_FREQ = 3 };
void emoe_stream_options_init(emoe_stream_options *o);

#define EMOE_READ_NOTE_LEN 384
#define EMOE_STATS_LEVELS 8 /* plane levels with their own hit/miss counters (level 0 = base plane) */
typedef struct {
    int64_t budget_bytes, minimum_bytes; /* as given (0 = no limit); the least this model + context can run in */
    int64_t dense_bytes, kv_bytes, scratch_bytes; /* resident parts counted against the budget */
    int64_t cache_capacity_bytes, cache_used_bytes, cache_peak_bytes, expert_bytes; /* expert_bytes: on disk */
    int32_t mode, direct, n_planes, run_planes;
    uint64_t hits[EMOE_STATS_LEVELS], misses[EMOE_STATS_LEVELS]; /* pieces found resident / read on demand */
    uint64_t late[EMOE_STATS_LEVELS];    /* pieces demanded while their prefetch was still in flight */
    uint64_t bytes_read, demand_bytes, read_syscalls, pieces_read, evictions, evicted_bytes, cancelled;
    uint64_t prefetch_issued, prefetch_used, prefetch_wasted; /* pieces */
    uint64_t pred_experts, pred_hits, pred_hits_k, true_experts; /* (token, layer, expert) counts of the
        pre-attention prediction: precision = pred_hits / pred_experts, recall = pred_hits / true_experts
        (pred_hits_k: hits among the first top_k predicted) */
    uint64_t ahead_experts, ahead_hits; /* the same for the layer-ahead prediction (prefetch = 2) */
    uint64_t experts_run, experts_at_planes[EMOE_STATS_LEVELS]; /* expert computations, by planes used */
    uint64_t tokens, forward_calls, crc_checked, crc_failures, read_errors;
    double stall_s, io_busy_s, forward_s; /* compute waiting for pieces; reader busy; inside emoe_forward */
    /* How expert pieces are read (never switched silently): direct = 1: O_DIRECT; else drop_cache = 1: buffered reads
     * whose pages are dropped after use (fadvise DONTNEED); else buffered, page cache kept. read_note: "" or why
     * O_DIRECT was asked for and is not in effect (the file system refused it, or the platform has none). */
    int32_t drop_cache;
    char read_note[EMOE_READ_NOTE_LEN];
} emoe_stats;

/* Open a model from a container under a memory budget (see above). The model copies what it needs: the container
 * may be closed right after. NULL on failure with a message in err; a budget below the minimum fails with a message
 * stating the minimum and its parts (emoe_container_stream_plan gives them as numbers). */
emoe_model *emoe_container_load_streaming(emoe_container *c, int max_ctx, int kv_f16, int n_threads,
                                          const emoe_stream_options *opts, char *err, size_t errlen);

/* What a model under a memory budget holds, as emoe_container_load_streaming counts it. */
typedef struct {
    int64_t minimum_bytes;   /* the least budget it runs in: dense + kv + scratch + min_cache */
    int64_t dense_bytes;     /* resident dense weights */
    int64_t kv_bytes;        /* KV cache of opts.n_seq sequences x max_ctx, plus conv layers' state (LFM2) */
    int64_t scratch_bytes;   /* activations, cache bookkeeping, thread stacks */
    int64_t min_cache_bytes; /* the smallest expert cache: one layer's top-k experts at base precision */
    int64_t full_cache_bytes; /* an expert cache holding every expert at the run precision (more is never used) */
    int64_t expert_bytes;    /* expert weights on disk */
} emoe_stream_plan;
/* emoe_container_load_streaming with typed results: returns EMOE_OK (*model = the model), EMOE_ERR_BUDGET when
 * opts->budget_bytes is below plan->minimum_bytes, or another status (EMOE_ERR_ARG: file or options refused,
 * EMOE_ERR_NOT_READY: a tensor missing, EMOE_ERR_IO, EMOE_ERR_CORRUPT, EMOE_ERR_NOMEM), with the message in err.
 * *plan (may be NULL) is filled whenever the file and options are usable, also on EMOE_ERR_BUDGET. model == NULL:
 * plan only (nothing is read beyond the index; returns EMOE_OK or EMOE_ERR_BUDGET for a usable file). */
int emoe_container_stream_load(emoe_container *c, int max_ctx, int kv_f16, int n_threads,
                               const emoe_stream_options *opts, emoe_model **model, emoe_stream_plan *plan, char *err,
                               size_t errlen);
/* Statistics since the last reset (all zero for a model without streaming, mode = -1). */
int emoe_model_stats(emoe_model *m, emoe_stats *out);
void emoe_model_reset_stats(emoe_model *m);
/* Drop every expert piece not in use (a cold cache, for benchmarks). */
int emoe_model_drop_cache(emoe_model *m);

#ifdef __cplusplus
}
#endif
#endif
