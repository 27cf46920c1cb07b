/* CRC-32 (zlib's) for the core's own files. emoe_crc32 (edgemoe.h) is the byte-table reference; emoe_crc32_fast
 * gives the same results many times faster, for checking expert pieces as they arrive: carry-less multiplication
 * on x86 (PCLMULQDQ / VPCLMULQDQ), the CRC32 instructions on aarch64, slicing-by-8 elsewhere (crc32_fold.c). */
#ifndef EDGEMOE_CRC32_H
#define EDGEMOE_CRC32_H
#include <stddef.h>
#include <stdint.h>

uint32_t emoe_crc32_fast(uint32_t crc, const void *data, size_t len);
int emoe_crc32_fast_level(void); /* the path emoe_crc32_fast takes here: 0 slicing-by-8, 1 PCLMULQDQ or ARMv8
                                  * CRC32, 2 VPCLMULQDQ (AVX-512) */

/* the parts, for the tests: the register-level slicing-by-8 loop (no inversions) and the folding at a given level
 * (the caller checks the CPU has it: emoe_crc32_fold_level) */
uint32_t emoe_crc32_bytes(uint32_t reg, const void *data, size_t len);
int emoe_crc32_fold_level(void);
uint32_t emoe_crc32_fold(int level, uint32_t crc, const void *data, size_t len);

#endif
