/* Private declarations shared by the files of the C core. */
#ifndef EDGEMOE_INTERNAL_H
#define EDGEMOE_INTERNAL_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "edgemoe.h"

#define QK 32 /* values per quantization block */

/* Q8_0 weight block: exactly ggml's block_q8_0 (34 bytes). */
typedef struct {
    uint16_t d;    /* f16 scale */
    int8_t qs[QK]; /* value = d * qs[j] */
} block_q8_0;

/* Quantized activation block (internal only): an f32 scale keeps the activation error small. 36 bytes. */
typedef struct {
    float d;
    int8_t qs[QK]; /* in [-127, 127], never -128 (the SIMD sign trick relies on it) */
} block_q8_act;

_Static_assert(sizeof(block_q8_0) == EMOE_Q8_0_BLOCK_BYTES, "block_q8_0 must be 34 bytes (ggml layout)");
_Static_assert(sizeof(block_q8_act) == 36, "block_q8_act must be 36 bytes");

/* ---- IEEE half <-> single, bit exact (round to nearest even), portable ---- */
static inline float fp32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t fp32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13); /* normal: rebias 15 -> 127 */
    } else if (man == 0) {
        bits = sign; /* zero */
    } else { /* subnormal: normalize */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FFu) << 13);
    }
    return fp32_from_bits(bits);
}
static inline uint16_t f32_to_f16(float f) {
    uint32_t x = fp32_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u | ((ax >> 13) & 0x3FFu) : 0));
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds to >= 65520: overflow to inf */
    if (ax < 0x38800000u) { /* result is subnormal or zero: value = ax_float / 2^-24 rounded */
        if (ax < 0x33000000u) return (uint16_t)sign; /* < 2^-25: rounds to 0 */
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t q = (ax - 0x38000000u) >> 13; /* rebias 127 -> 15, exponent and mantissa together */
    uint32_t rem = ax & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1))) q++;
    return (uint16_t)(sign | q);
}

/* ---- kernel table: one per instruction set ----
 * matmul: Y[t*ldy + o] = sum_{i<cols} W[o,i] X[t,i] for rows o in [r0, r1) and tokens t in [0, n_tok).
 *   w: row-major weights, w_stride bytes between rows; x: n_tok rows, x_stride bytes apart: f32 for F32/F16
 *   weights and for KQ8_F32 (Q8_0 weights, f32 activations), block_q8_act for Q8_0 (quantized activations). */
#define KQ8_F32 3 /* kernel index: Q8_0 weights x f32 activations (the exact, slower path) */
typedef void (*matmul_fn)(int64_t cols, const void *w, size_t w_stride, const void *x, size_t x_stride, float *y,
                          size_t ldy, int n_tok, int64_t r0, int64_t r1);
typedef struct {
    int isa;
    const char *name;
    matmul_fn matmul[4]; /* indexed by EMOE_F32, EMOE_F16, EMOE_Q8_0, KQ8_F32 */
    void (*quantize_act)(const float *x, block_q8_act *y, int64_t n); /* n % 32 == 0 */
    void (*f16_to_f32)(const uint16_t *x, float *y, int64_t n);
    void (*f32_to_f16)(const float *x, uint16_t *y, int64_t n);
    void (*axpy_f32)(float a, const float *x, float *y, int64_t n); /* y += a x */
    void (*axpy_f16)(float a, const uint16_t *x, float *y, int64_t n);
} emoe_kernels;

extern const emoe_kernels emoe_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
#define EMOE_HAVE_AVX2 1
extern const emoe_kernels emoe_kernels_avx2;
extern const emoe_kernels emoe_kernels_avx512vnni;
int emoe_x86_gfni_vbmi(void); /* 1 if the CPU also has GFNI + AVX512_VBMI (the AVX-512 MWQ kernels need them) */
#endif
#if defined(__aarch64__)
#define EMOE_HAVE_NEON 1
extern const emoe_kernels emoe_kernels_neon;
extern const emoe_kernels emoe_kernels_neon_dotprod;
#endif

/* The kernel table of an ISA, or NULL if this CPU/build cannot run it. EMOE_ISA_AUTO gives the best. */
const emoe_kernels *emoe_kernels_get(int isa);

/* ---- thread pool ---- */
/* fn(ctx, task, thread) is called once for each task in [0, n_tasks), spread over the pool's threads (thread 0 is the
 * caller); returns when all are done. Tasks are taken dynamically (atomic counter), so a slow core does not stall. */
typedef void (*pool_task_fn)(void *ctx, int task, int thread);
void pool_run(emoe_pool *pool, pool_task_fn fn, void *ctx, int n_tasks);

/* ---- threaded matmul driver (matmul.c) ---- */
typedef struct {
    int wtype;
    const void *w;     /* [rows, cols] */
    int64_t rows;
    float *y;          /* [n_tok, ldy] */
    size_t ldy;        /* floats between token rows of y */
    int xi;            /* mm_run_multi: the input it reads (index into `in`); mm_run: 0 */
} mm_job;
/* One input of a multi-input dispatch: n_tok rows of cols floats. */
typedef struct {
    const float *x;
    int n_tok;
} mm_input;
/* Run several matmuls that share the same input X [n_tok, cols] f32 (e.g. q/k/v, or gate/up) in one dispatch.
 * Q8_0 jobs quantize X to qbuf (n_tok * cols/32 blocks) first, unless q8_f32_act (then X stays f32 and qbuf may be
 * NULL). */
void mm_run(emoe_pool *pool, const emoe_kernels *k, const mm_job *jobs, int n_jobs, const float *x, int64_t cols,
            int n_tok, block_q8_act *qbuf, int q8_f32_act);
/* The same for jobs reading different inputs (job j reads in[jobs[j].xi]; every input has cols columns), e.g. the
 * down projections of all routed experts: each input is quantized once (qbuf holds the sum of the inputs' n_tok
 * rows), then one dispatch runs every job. Each (row, token) result is the one mm_run gives. */
void mm_run_multi(emoe_pool *pool, const emoe_kernels *k, const mm_job *jobs, int n_jobs, const mm_input *in,
                  int n_in, int64_t cols, block_q8_act *qbuf, int q8_f32_act);

/* ---- MWQ bit planes (mwq.c, kernels_mwq_*.c; byte layout: docs/FORMAT.md "MWQ bit planes") ----
 * An [rows, cols] matrix in groups of g along the input dimension (ng = cols / g per row), stored as planes
 * P1 = s1 f16[rows*ng] | m1 f16[rows*ng] | codes (b1 bits each, little-endian within bytes) and
 * Pp (p >= 2) = s_p f16[rows*ng] | signs (1 bit, bit j of a byte = weight j, 1 -> +1, 0 -> -1).
 * W_hat_k = s1*q + m1 + sum_{p=2..k} s_p*B_p. The kernels compute Y = W_hat_k X from the planes without ever
 * forming W_hat in memory. */
#define MWQ_MAX_PLANES EMOE_MWQ_MAX_PLANES
#define MWQ_SEG_GROUPS 128 /* SIMD kernels convert a row's scales to f32 in segments of at most this many groups */

/* One MWQ matrix at precision k, its planes resolved to pointers. */
typedef struct {
    int64_t rows, cols;
    int k;         /* planes used, 1..MWQ_MAX_PLANES */
    int base_bits; /* b1: 2, 4 or 8 */
    int group;     /* g: a multiple of 8 that divides cols */
    const uint16_t *s1, *m1;                 /* [rows * ng] f16 */
    const uint8_t *codes;                    /* [rows * cols * b1 / 8] */
    const uint16_t *rs[MWQ_MAX_PLANES - 1];  /* plane p = 2..k: rs[p - 2] = s_p [rows * ng] f16 */
    const uint8_t *signs[MWQ_MAX_PLANES - 1]; /* plane p = 2..k: signs[p - 2] [rows * cols / 8] */
} mwq_matrix;

/* The activations of one call, prepared once for all rows.
 * Int8 path: each token's row is quantized per block of 32 inputs exactly like the Q8_0 path (d = max|x|/127,
 * q = round-half-even(x/d)); when cols % 32 != 0 the last block holds the remaining cols % 32 values (its d is their
 * max), zero padded. The SIMD kernels also read `xp`, the same int8 values rearranged per chunk of 256/b1 inputs
 * (the 32 code bytes of a row's chunk) so that unpacking the codes by shifts lines up with them:
 *   chunk c, P = 8/b1 vectors of 32 bytes: vector s, byte i = q[c*32P + P*i + s]; then float d[8], float sx[8]:
 *   for "lane" L (bytes 4L..4L+3 of every vector, i.e. inputs c*32P + 4PL .. + 4P - 1, all in one block of 32):
 *   d[L] = that block's scale, sx[L] = the sum of the lane's int8 values (as a float).
 * Only full chunks are in xp; the remaining cols % (32P) inputs are read from xq. */
typedef struct {
    int n_tok;
    const float *x;         /* f32 path: [n_tok][x_stride floats] */
    size_t x_stride;
    const block_q8_act *xq; /* int8 path: [n_tok][xq_stride blocks], natural order */
    size_t xq_stride;
    const uint8_t *xp;      /* int8 path, SIMD layout (32-byte aligned), or NULL */
    size_t xp_stride;       /* bytes between tokens */
} mwq_act;

#define MWQ_XP_CHUNK_BYTES(b1) (32 * (8 / (b1)) + 64) /* bytes of one chunk of 256/b1 inputs in xp */
/* Bytes of one token's xp for cols inputs. */
static inline size_t mwq_xp_bytes(int base_bits, int64_t cols) {
    return (size_t)(cols / (256 / base_bits)) * MWQ_XP_CHUNK_BYTES(base_bits);
}

/* y[t*ldy + o] for rows o in [r0, r1) and all tokens of a. */
typedef void (*mwq_fn)(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1);
typedef struct {
    int isa;
    const char *name;
    int uses_xp;      /* matmul_q8 reads a->xp when mwq_simd_ok(b1, g) */
    int xp_layout;    /* 0: the layout above; 1: the AVX-512 layout (b1 = 2 only, kernels_mwq_avx512.c) */
    mwq_fn matmul_q8; /* int8 activations: integer dot products per plane */
    mwq_fn matmul_f32; /* f32 activations: each 8 weights dequantized in registers (bit-exact W_hat), f32 fma */
} mwq_kernels;

extern const mwq_kernels mwq_kernels_scalar;
#if defined(EMOE_HAVE_AVX2)
extern const mwq_kernels mwq_kernels_avx2;
extern const mwq_kernels mwq_kernels_avx512vnni;
#endif
#if defined(EMOE_HAVE_NEON)
extern const mwq_kernels mwq_kernels_neon;
extern const mwq_kernels mwq_kernels_neon_dotprod;
#endif
const mwq_kernels *mwq_kernels_get(int isa); /* NULL if unsupported */

/* The SIMD int8 kernels handle (b1, g) when every 4P-input lane of a chunk lies in one group and chunks and groups
 * nest: g % (32P) == 0, or 32P % g == 0 and g % (4P) == 0 (P = 8/b1). Other g use the scalar kernel. */
static inline int mwq_simd_ok(int base_bits, int group) {
    const int P = 8 / base_bits, C = 32 * P;
    return group % C == 0 || (C % group == 0 && group % (4 * P) == 0);
}
/* The AVX-512 kernels (xp layout 1) handle b1 = 2 with g % 128 == 0 or g in {32, 64}; mwq_run gives other (b1, g)
 * to the AVX2 kernels. */
static inline int mwq_vnni_ok(int base_bits, int group) {
    return base_bits == 2 && (group % 128 == 0 || group == 32 || group == 64);
}
/* Scalar building blocks (kernels_mwq_scalar.c), also used by the SIMD kernels for the inputs past the last full
 * chunk: the contribution of inputs [i0, i1) (multiples of 8) of row o to one token's output. */
float mwq_dot_q8_scalar(const mwq_matrix *w, int64_t o, const block_q8_act *xq, int64_t i0, int64_t i1);
float mwq_dot_f32_scalar(const mwq_matrix *w, int64_t o, const float *x, int64_t i0, int64_t i1);

/* Bytes of plane p (1 = base) of an MWQ matrix, or 0 if the parameters are invalid. */
int64_t mwq_plane_bytes(int plane, int base_bits, int group, int64_t rows, int64_t cols);
/* Resolve planes (plane p at base + off[p-1]) into m at precision k. Returns 0, or EMOE_ERR_ARG if invalid. */
int mwq_matrix_init(mwq_matrix *m, const void *base, const int64_t *off, int k, int base_bits, int group,
                    int64_t rows, int64_t cols);

/* ---- threaded MWQ driver (mwq.c) ---- */
typedef struct {
    mwq_matrix w;
    float *y;   /* [n_tok, ldy] */
    size_t ldy;
    int xi;     /* mwq_run_multi: the input it reads; mwq_run: 0 */
} mwq_job;
/* Run several MWQ matmuls that share the input X [n_tok, cols] f32 in one dispatch (kernels of isa).
 * Int8 path (f32_act = 0): X is quantized into qbuf (n_tok * ceil(cols/32) blocks) and, for the SIMD kernels, laid
 * out into xpbuf (n_tok * mwq_xp_bytes(b1, cols) bytes, 32-byte aligned; may be NULL when f32_act). */
void mwq_run(emoe_pool *pool, const emoe_kernels *k, const mwq_job *jobs, int n_jobs, const float *x, int64_t cols,
             int n_tok, block_q8_act *qbuf, uint8_t *xpbuf, int f32_act);
/* Jobs reading different inputs (job j reads in[jobs[j].xi], n_tok rows of cols floats each), like mm_run_multi:
 * qbuf and xpbuf hold the sum of the inputs' rows. One dispatch when every job takes the table-lookup kernels (the
 * default for base 2), else one mwq_run per input. Each (row, token) result is the one mwq_run gives. */
void mwq_run_multi(emoe_pool *pool, const emoe_kernels *k, const mwq_job *jobs, int n_jobs, const mm_input *in,
                   int n_in, int64_t cols, block_q8_act *qbuf, uint8_t *xpbuf, int f32_act);
/* Bytes of xpbuf mwq_run needs for n_tok tokens of cols inputs, any b1 (+ 32 for alignment). */
size_t mwq_xpbuf_bytes(int64_t cols, int n_tok);

#endif
