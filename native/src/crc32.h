/* CRC-32 (zlib's) for the core's own files. emoe_crc32 (edgemoe.h) is the byte-table reference; emoe_crc32_fast
 * gives the same results several times faster (slicing-by-8), for checking expert pieces while the model runs. */
#ifndef EDGEMOE_CRC32_H
#define EDGEMOE_CRC32_H
#include <stddef.h>
#include <stdint.h>

uint32_t emoe_crc32_fast(uint32_t crc, const void *data, size_t len);

#endif
