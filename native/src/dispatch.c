/* Runtime CPU feature detection and kernel-table selection.
 *
 * The only mutable global of the library lives here: the detected feature set, computed once (pthread_once) and
 * read-only afterwards. The library is built for the baseline ISA (never -march=native); SIMD tables are chosen at
 * run time, so one binary runs on any x86-64 or aarch64 CPU. Env EDGEMOE_ISA=scalar|avx2|neon|neon_dotprod|avx512vnni
 * overrides the automatic choice (ignored if that ISA is unsupported).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

static const char *const isa_names[EMOE_ISA_COUNT] = {"scalar", "avx2", "neon", "neon_dotprod", "avx512vnni"};

static pthread_once_t detect_once = PTHREAD_ONCE_INIT;
static int isa_ok[EMOE_ISA_COUNT]; /* written once by detect() */
static int isa_auto;
static int x86_gfni_vbmi; /* the AVX-512 MWQ kernels also need GFNI and AVX512_VBMI (see mwq_kernels_get) */

#if defined(__x86_64__) || defined(_M_X64)
static int x86_has_avx2_fma_f16c(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c)) return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0)); /* OS saves XMM and YMM state? */
    if ((xlo & 6u) != 6u) return 0;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1; /* AVX2 */
}

/* AVX-512 F + BW + VL + VNNI, and the OS saves the opmask and ZMM state (XCR0 bits 5-7, with 1-2 for XMM/YMM). */
static int x86_has_avx512vnni(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, 0) < 7 || !__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 0xE6u) != 0xE6u) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    const int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
    return f && bw && vl && vnni;
}
static int x86_has_gfni_vbmi(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return ((c >> 1) & 1) && ((c >> 8) & 1); /* AVX512_VBMI, GFNI */
}
#endif

static void detect(void) {
    isa_ok[EMOE_ISA_SCALAR] = 1;
    isa_auto = EMOE_ISA_SCALAR;
#if defined(EMOE_HAVE_AVX2)
    if (x86_has_avx2_fma_f16c()) {
        isa_ok[EMOE_ISA_AVX2] = 1, isa_auto = EMOE_ISA_AVX2;
        if (x86_has_avx512vnni()) {
            isa_ok[EMOE_ISA_AVX512VNNI] = 1, isa_auto = EMOE_ISA_AVX512VNNI;
            x86_gfni_vbmi = x86_has_gfni_vbmi();
        }
    }
#endif
#if defined(EMOE_HAVE_NEON)
    isa_ok[EMOE_ISA_NEON] = 1, isa_auto = EMOE_ISA_NEON;
#if defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) isa_ok[EMOE_ISA_NEON_DOTPROD] = 1, isa_auto = EMOE_ISA_NEON_DOTPROD;
#elif defined(__APPLE__)
    isa_ok[EMOE_ISA_NEON_DOTPROD] = 1, isa_auto = EMOE_ISA_NEON_DOTPROD; /* every Apple arm64 CPU has dotprod */
#endif
#endif
    const char *env = getenv("EDGEMOE_ISA");
    if (env)
        for (int i = 0; i < EMOE_ISA_COUNT; i++)
            if (!strcmp(env, isa_names[i]) && isa_ok[i]) isa_auto = i;
}

int emoe_isa_supported(int isa) {
    pthread_once(&detect_once, detect);
    return isa >= 0 && isa < EMOE_ISA_COUNT && isa_ok[isa];
}

int emoe_isa_best(void) {
    pthread_once(&detect_once, detect);
    return isa_auto;
}

int emoe_x86_gfni_vbmi(void) {
    pthread_once(&detect_once, detect);
    return x86_gfni_vbmi;
}

const char *emoe_isa_name(int isa) { return isa >= 0 && isa < EMOE_ISA_COUNT ? isa_names[isa] : NULL; }

const emoe_kernels *emoe_kernels_get(int isa) {
    if (isa == EMOE_ISA_AUTO) isa = emoe_isa_best();
    if (!emoe_isa_supported(isa)) return NULL;
    switch (isa) {
    case EMOE_ISA_SCALAR: return &emoe_kernels_scalar;
#if defined(EMOE_HAVE_AVX2)
    case EMOE_ISA_AVX2: return &emoe_kernels_avx2;
    case EMOE_ISA_AVX512VNNI: return &emoe_kernels_avx512vnni;
#endif
#if defined(EMOE_HAVE_NEON)
    case EMOE_ISA_NEON: return &emoe_kernels_neon;
    case EMOE_ISA_NEON_DOTPROD: return &emoe_kernels_neon_dotprod;
#endif
    default: return NULL;
    }
}
