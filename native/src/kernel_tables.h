/* The table a dense kernel file exports (emoe_kernels, internal.h): every ISA fills it from functions of the same
 * names, so the table is written once. MATMUL_Q8_0: the file's Q8_0 x int8 kernel (NEON has two). */
#ifndef EDGEMOE_KERNEL_TABLES_H
#define EDGEMOE_KERNEL_TABLES_H

#define EMOE_KERNEL_TABLE(ISA, NAME, MATMUL_Q8_0)                                                                     \
    {                                                                                                                 \
        .isa = ISA, .name = NAME, .matmul = {matmul_f32, matmul_f16, MATMUL_Q8_0, matmul_q8_0_f32},                   \
        .quantize_act = quantize_act, .f16_to_f32 = f16_to_f32_row, .f32_to_f16 = f32_to_f16_row,                     \
        .axpy_f32 = axpy_f32, .axpy_f16 = axpy_f16,                                                                   \
    }

#endif
