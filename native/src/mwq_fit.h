/* MWQ plane fitting for the exporter (export/mwq_native.py calls it through ctypes; see mwq_fit.c). */
#ifndef EDGEMOE_MWQ_FIT_H
#define EDGEMOE_MWQ_FIT_H

#include <stdint.h>

/* Fits rows [row0, row1) of W [rows, cols] (f32, row-major) in groups of `group` columns.
 * gram: [cols / group, group, group] f32 Gram blocks, already normalized and damped (export/mwq.py `_Metric`), or
 * NULL for the weight-only error. n_planes = total_bits - base_bits + 1 (1..7); isa: EMOE_ISA_* for the products.
 * Outputs (only rows [row0, row1) written): s1_out, m1_out [rows, cols / group] (float16 values); q_out [rows, cols]
 * base codes; scales_out [n_planes - 1, rows, cols / group] residual scales; signs_out [n_planes - 1, rows, cols]
 * 1 where the residual plane's sign is +. Returns EMOE_OK, EMOE_ERR_ARG or EMOE_ERR_NOMEM. */
int emoe_mwq_fit(const float *W, int64_t rows, int64_t cols, int64_t row0, int64_t row1, int group,
                 const float *gram, int base_bits, int n_planes, int iters, int isa, float *s1_out, float *m1_out,
                 uint8_t *q_out, float *scales_out, uint8_t *signs_out);

#endif
