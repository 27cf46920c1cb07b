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
} mm_job;
/* Run several matmuls that share the same input X [n_tok, cols] f32 (e.g. q/k/v, or gate/up) in one dispatch.
 * Q8_0 jobs quantize X to qbuf (n_tok * cols/32 blocks) first, unless q8_f32_act (then X stays f32 and qbuf may be
 * NULL). */
void mm_run(emoe_pool *pool, const emoe_kernels *k, const mm_job *jobs, int n_jobs, const float *x, int64_t cols,
            int n_tok, block_q8_act *qbuf, int q8_f32_act);

#endif
