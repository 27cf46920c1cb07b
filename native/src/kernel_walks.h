/* How the per-ISA kernel files walk a matrix product in tiles: the loops every ISA shares, so that each file holds
 * only its tile bodies (the arithmetic). Every (row, token) result goes through the same operations whatever the
 * tile, so the tile sizes change speed, never results (decode == prefill bit for bit).
 */
#ifndef EDGEMOE_KERNEL_WALKS_H
#define EDGEMOE_KERNEL_WALKS_H

/* Dense kernels (emoe_kernels.matmul): inside a function with the parameters (cols, w, w_stride, x, x_stride, y, ldy,
 * n_tok, r0, r1), walk rows (outer) and tokens (inner) in tiles: TILE(R, TT, w_row, x_tok, y_tok) computes one
 * R x TT tile, with `o` its first row. Decode uses DEC rows per tile (then 4, then 1), prefill 2 x 4 (then 2 x 3/2/1
 * and 1 x 4/1 at the edges). */
#define EMOE_WALK_TILES(DEC, TILE)                                                                                    \
    do {                                                                                                              \
        const char *wb_ = (const char *)w, *xb_ = (const char *)x;                                                    \
        int64_t o = r0;                                                                                               \
        if (n_tok == 1) {                                                                                             \
            for (; o + DEC <= r1; o += DEC) TILE(DEC, 1, wb_ + (size_t)o * w_stride, xb_, y);                         \
            for (; o + 4 <= r1; o += 4) TILE(4, 1, wb_ + (size_t)o * w_stride, xb_, y);                               \
            for (; o < r1; o++) TILE(1, 1, wb_ + (size_t)o * w_stride, xb_, y);                                       \
            break;                                                                                                    \
        }                                                                                                             \
        for (; o < r1; o += 2) {                                                                                      \
            const char *wr_ = wb_ + (size_t)o * w_stride;                                                             \
            int t = 0;                                                                                                \
            if (o + 2 <= r1) {                                                                                        \
                for (; t + 4 <= n_tok; t += 4) TILE(2, 4, wr_, xb_ + (size_t)t * x_stride, y + (size_t)t * ldy);      \
                switch (n_tok - t) {                                                                                  \
                case 3: TILE(2, 3, wr_, xb_ + (size_t)t * x_stride, y + (size_t)t * ldy); break;                      \
                case 2: TILE(2, 2, wr_, xb_ + (size_t)t * x_stride, y + (size_t)t * ldy); break;                      \
                case 1: TILE(2, 1, wr_, xb_ + (size_t)t * x_stride, y + (size_t)t * ldy); break;                      \
                default: break;                                                                                       \
                }                                                                                                     \
            } else {                                                                                                  \
                for (; t + 4 <= n_tok; t += 4) TILE(1, 4, wr_, xb_ + (size_t)t * x_stride, y + (size_t)t * ldy);      \
                for (; t < n_tok; t++) TILE(1, 1, wr_, xb_ + (size_t)t * x_stride, y + (size_t)t * ldy);              \
            }                                                                                                         \
        }                                                                                                             \
    } while (0)

/* Dense kernels whose prefill tiles hold one row (the Q8_0 x f32 kernels): the same parameters and TILE as
 * EMOE_WALK_TILES; decode 4 rows per tile (then 1), prefill 1 row x 4 tokens (then x 1). */
#define EMOE_WALK_ROW_TILES(TILE)                                                                                     \
    do {                                                                                                              \
        const char *wb_ = (const char *)w, *xb_ = (const char *)x;                                                    \
        int64_t o = r0;                                                                                               \
        if (n_tok == 1) {                                                                                             \
            for (; o + 4 <= r1; o += 4) TILE(4, 1, wb_ + (size_t)o * w_stride, xb_, y);                               \
            for (; o < r1; o++) TILE(1, 1, wb_ + (size_t)o * w_stride, xb_, y);                                       \
            break;                                                                                                    \
        }                                                                                                             \
        for (; o < r1; o++) {                                                                                         \
            const char *wr_ = wb_ + (size_t)o * w_stride;                                                             \
            int t = 0;                                                                                                \
            for (; t + 4 <= n_tok; t += 4) TILE(1, 4, wr_, xb_ + (size_t)t * x_stride, y + (size_t)t * ldy);          \
            for (; t < n_tok; t++) TILE(1, 1, wr_, xb_ + (size_t)t * x_stride, y + (size_t)t * ldy);                  \
        }                                                                                                             \
    } while (0)

/* MWQ kernels (mwq_fn): define `ATTR static void NAME(w, a, y, ldy, r0, r1)` that walks one row at a time, its tokens
 * in tiles of 4, then the 3, 2 or 1 left: ROW(args..., TT, w, a, o, t, y, ldy) computes row o for tokens t..t+TT-1
 * (the row's codes and signs are unpacked once per tile). ATTR: the ISA's target attribute, or nothing. */
#define MWQ_DEF_ROWS(ATTR, NAME, ROW, ...)                                                                            \
    ATTR static void NAME(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {     \
        for (int64_t o = r0; o < r1; o++) {                                                                           \
            int t = 0;                                                                                                \
            for (; t + 4 <= a->n_tok; t += 4) ROW(__VA_ARGS__, 4, w, a, o, t, y, ldy);                                \
            switch (a->n_tok - t) {                                                                                   \
            case 3: ROW(__VA_ARGS__, 3, w, a, o, t, y, ldy); break;                                                   \
            case 2: ROW(__VA_ARGS__, 2, w, a, o, t, y, ldy); break;                                                   \
            case 1: ROW(__VA_ARGS__, 1, w, a, o, t, y, ldy); break;                                                   \
            default: break;                                                                                           \
            }                                                                                                         \
        }                                                                                                             \
    }

/* MWQ with int8 activations for base planes of 2, 4 or 8 bits (P = 4, 2, 1 codes per byte): ROW(P, single, TT, ...)
 * is one row x TT tokens, single = every chunk of 256/b1 inputs lies in one group. Defines matmul_q8_SFX, which
 * takes the (b1, g) its chunks support (mwq_simd_ok) and hands anything else to the scalar kernel. */
#define MWQ_DEF_Q8(SFX, ATTR, ROW)                                                                                    \
    MWQ_DEF_ROWS(ATTR, q8_b2_one_##SFX, ROW, 4, 1)                                                                    \
    MWQ_DEF_ROWS(ATTR, q8_b2_multi_##SFX, ROW, 4, 0)                                                                  \
    MWQ_DEF_ROWS(ATTR, q8_b4_one_##SFX, ROW, 2, 1)                                                                    \
    MWQ_DEF_ROWS(ATTR, q8_b4_multi_##SFX, ROW, 2, 0)                                                                  \
    MWQ_DEF_ROWS(ATTR, q8_b8_one_##SFX, ROW, 1, 1)                                                                    \
    MWQ_DEF_ROWS(ATTR, q8_b8_multi_##SFX, ROW, 1, 0)                                                                  \
    static void matmul_q8_##SFX(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0,              \
                                int64_t r1) {                                                                         \
        if (!a->xp || !mwq_simd_ok(w->base_bits, w->group)) {                                                         \
            mwq_kernels_scalar.matmul_q8(w, a, y, ldy, r0, r1);                                                       \
            return;                                                                                                   \
        }                                                                                                             \
        const int single = w->group % (256 / w->base_bits) == 0;                                                      \
        switch (w->base_bits) {                                                                                       \
        case 2: (single ? q8_b2_one_##SFX : q8_b2_multi_##SFX)(w, a, y, ldy, r0, r1); break;                          \
        case 4: (single ? q8_b4_one_##SFX : q8_b4_multi_##SFX)(w, a, y, ldy, r0, r1); break;                          \
        default: (single ? q8_b8_one_##SFX : q8_b8_multi_##SFX)(w, a, y, ldy, r0, r1); break;                         \
        }                                                                                                             \
    }

/* MWQ with f32 activations: ROW(B1, TT, ...) rebuilds the weights of base width B1 in registers. Defines
 * matmul_f32, dispatching on the base width. */
#define MWQ_DEF_F32(ATTR, ROW)                                                                                        \
    MWQ_DEF_ROWS(ATTR, f32_b2, ROW, 2)                                                                                \
    MWQ_DEF_ROWS(ATTR, f32_b4, ROW, 4)                                                                                \
    MWQ_DEF_ROWS(ATTR, f32_b8, ROW, 8)                                                                                \
    static void matmul_f32(const mwq_matrix *w, const mwq_act *a, float *y, size_t ldy, int64_t r0, int64_t r1) {     \
        switch (w->base_bits) {                                                                                       \
        case 2: f32_b2(w, a, y, ldy, r0, r1); break;                                                                  \
        case 4: f32_b4(w, a, y, ldy, r0, r1); break;                                                                  \
        default: f32_b8(w, a, y, ldy, r0, r1); break;                                                                 \
        }                                                                                                             \
    }

#endif
