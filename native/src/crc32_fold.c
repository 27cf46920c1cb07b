/* CRC-32 (zlib's) by folding: the expert pieces are checked as they arrive from storage, so the check must run
 * well above the storage's bandwidth (slicing-by-8 does ~1.3 GB/s, about what an SSD reads: the check cost as much
 * CPU per token as the experts' arithmetic). x86: carry-less multiplication (PCLMULQDQ on 4 x 128-bit lanes,
 * VPCLMULQDQ on 4 x 512-bit with AVX-512); aarch64: the ARMv8 CRC32 instructions (they compute this polynomial).
 *
 * The folding, for the reflected polynomial P (0x04C11DB7): a 16-byte block B followed by D more bits of message
 * contributes B(x) x^D; splitting B into its first 8 bytes H and last 8 bytes L, B x^D == H (x^(D+64) mod P) +
 * L (x^D mod P) (mod P), a product of degree < 96 that replaces the block D bits later. In the reflected bit order a
 * 64 x 64 carry-less product comes out one bit short, so the constants are x^(D+63) and x^(D-1) mod P, bit-reversed
 * into the top half of a 64-bit lane. The last 16 bytes left after folding are a message with the same CRC
 * remainder as everything before them, so they and the tail go through the byte table (crc32.c), which also
 * keeps this file free of a Barrett reduction. The initial value is XORed into the first 4 bytes. */
#include "crc32.h"

#include <stdint.h>
#include <string.h>

/* x^e mod P, bit-reversed into a 64-bit lane (bit i <-> x^(63-i)): K(D + 63), K(D - 1) per fold distance D */
#define K_128_LO 0x65673b4600000000ull  /* x^191: fold by 128 bits (one 16-byte block) */
#define K_128_HI 0x9ba54c6f00000000ull  /* x^127 */
#define K_512_LO 0x653d982200000000ull  /* x^575: fold by 512 bits (four blocks) */
#define K_512_HI 0xcad38e8f00000000ull  /* x^511 */
#define K_2048_LO 0x7cc8e1e700000000ull /* x^2111: fold by 2048 bits (four 64-byte vectors) */
#define K_2048_HI 0x03f9f86300000000ull /* x^2047 */

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>

#define TARGET_CLMUL __attribute__((target("pclmul,sse4.1")))
#define TARGET_VCLMUL __attribute__((target("pclmul,sse4.1,avx512f,avx512bw,vpclmulqdq")))

TARGET_CLMUL static inline __m128i fold128(__m128i acc, __m128i k, __m128i next) {
    const __m128i lo = _mm_clmulepi64_si128(acc, k, 0x00), hi = _mm_clmulepi64_si128(acc, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

/* len >= 64; returns the register (not inverted) after the whole buffer, starting from register c */
TARGET_CLMUL static uint32_t crc_clmul(uint32_t c, const uint8_t *p, size_t len) {
    const __m128i k512 = _mm_set_epi64x((long long)K_512_HI, (long long)K_512_LO);
    const __m128i k128 = _mm_set_epi64x((long long)K_128_HI, (long long)K_128_LO);
    __m128i a0 = _mm_loadu_si128((const __m128i *)p), a1 = _mm_loadu_si128((const __m128i *)(p + 16)),
            a2 = _mm_loadu_si128((const __m128i *)(p + 32)), a3 = _mm_loadu_si128((const __m128i *)(p + 48));
    a0 = _mm_xor_si128(a0, _mm_cvtsi32_si128((int)c));
    p += 64, len -= 64;
    for (; len >= 64; p += 64, len -= 64) {
        a0 = fold128(a0, k512, _mm_loadu_si128((const __m128i *)p));
        a1 = fold128(a1, k512, _mm_loadu_si128((const __m128i *)(p + 16)));
        a2 = fold128(a2, k512, _mm_loadu_si128((const __m128i *)(p + 32)));
        a3 = fold128(a3, k512, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    __m128i a = fold128(fold128(fold128(a0, k128, a1), k128, a2), k128, a3);
    for (; len >= 16; p += 16, len -= 16) a = fold128(a, k128, _mm_loadu_si128((const __m128i *)p));
    uint8_t last[16];
    _mm_storeu_si128((__m128i *)last, a);
    return emoe_crc32_bytes(emoe_crc32_bytes(0, last, 16), p, len);
}

TARGET_VCLMUL static inline __m512i fold512(__m512i acc, __m512i k, __m512i next) {
    const __m512i lo = _mm512_clmulepi64_epi128(acc, k, 0x00), hi = _mm512_clmulepi64_epi128(acc, k, 0x11);
    return _mm512_ternarylogic_epi64(lo, hi, next, 0x96); /* lo ^ hi ^ next */
}

/* len >= 256 */
TARGET_VCLMUL static uint32_t crc_vclmul(uint32_t c, const uint8_t *p, size_t len) {
    const __m512i k2048 = _mm512_set4_epi64((long long)K_2048_HI, (long long)K_2048_LO, (long long)K_2048_HI,
                                            (long long)K_2048_LO);
    const __m512i k512 = _mm512_set4_epi64((long long)K_512_HI, (long long)K_512_LO, (long long)K_512_HI,
                                           (long long)K_512_LO);
    __m512i a0 = _mm512_loadu_si512(p), a1 = _mm512_loadu_si512(p + 64), a2 = _mm512_loadu_si512(p + 128),
            a3 = _mm512_loadu_si512(p + 192);
    a0 = _mm512_xor_si512(a0, _mm512_castsi128_si512(_mm_cvtsi32_si128((int)c)));
    p += 256, len -= 256;
    for (; len >= 256; p += 256, len -= 256) {
        a0 = fold512(a0, k2048, _mm512_loadu_si512(p));
        a1 = fold512(a1, k2048, _mm512_loadu_si512(p + 64));
        a2 = fold512(a2, k2048, _mm512_loadu_si512(p + 128));
        a3 = fold512(a3, k2048, _mm512_loadu_si512(p + 192));
    }
    __m512i a = fold512(fold512(fold512(a0, k512, a1), k512, a2), k512, a3);
    for (; len >= 64; p += 64, len -= 64) a = fold512(a, k512, _mm512_loadu_si512(p));
    /* four 16-byte lanes in message order: fold them into the last one, then the 16-byte tail as on 128 bits */
    const __m128i k128 = _mm_set_epi64x((long long)K_128_HI, (long long)K_128_LO);
    __m128i x = fold128(_mm512_extracti32x4_epi32(a, 0), k128, _mm512_extracti32x4_epi32(a, 1));
    x = fold128(fold128(x, k128, _mm512_extracti32x4_epi32(a, 2)), k128, _mm512_extracti32x4_epi32(a, 3));
    for (; len >= 16; p += 16, len -= 16) x = fold128(x, k128, _mm_loadu_si128((const __m128i *)p));
    uint8_t last[16];
    _mm_storeu_si128((__m128i *)last, x);
    return emoe_crc32_bytes(emoe_crc32_bytes(0, last, 16), p, len);
}

int emoe_crc32_fold_level(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 1) & 1) || !((c >> 19) & 1)) return 0; /* PCLMULQDQ, SSE4.1 */
    int level = 1;
    if (__get_cpuid_max(0, 0) >= 7 && ((c >> 27) & 1)) { /* OSXSAVE: ZMM state enabled by the OS? */
        unsigned xlo, xhi;
        __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
        __cpuid_count(7, 0, a, b, c, d);
        const int avx512 = ((b >> 16) & 1) && ((b >> 30) & 1); /* AVX512F, AVX512BW */
        if ((xlo & 0xE6) == 0xE6 && avx512 && ((c >> 10) & 1)) level = 2; /* VPCLMULQDQ */
    }
    return level;
}

uint32_t emoe_crc32_fold(int level, uint32_t crc, const void *data, size_t len) {
    const uint8_t *p = data;
    const uint32_t c = ~crc;
    if (level >= 2 && len >= 256) return ~crc_vclmul(c, p, len);
    if (level >= 1 && len >= 64) return ~crc_clmul(c, p, len);
    return ~emoe_crc32_bytes(c, p, len);
}

#elif defined(__aarch64__)
#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif

__attribute__((target("+crc"))) static uint32_t crc_armv8(uint32_t c, const uint8_t *p, size_t len) {
    for (; len >= 8; p += 8, len -= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __crc32d(c, v);
    }
    for (; len; p++, len--) c = __crc32b(c, *p);
    return c;
}

int emoe_crc32_fold_level(void) { return (getauxval(AT_HWCAP) & HWCAP_CRC32) ? 1 : 0; }

uint32_t emoe_crc32_fold(int level, uint32_t crc, const void *data, size_t len) {
    const uint32_t c = ~crc;
    return ~(level >= 1 ? crc_armv8(c, data, len) : emoe_crc32_bytes(c, data, len));
}

#else
int emoe_crc32_fold_level(void) { return 0; }
uint32_t emoe_crc32_fold(int level, uint32_t crc, const void *data, size_t len) {
    (void)level;
    return ~emoe_crc32_bytes(~crc, data, len);
}
#endif
