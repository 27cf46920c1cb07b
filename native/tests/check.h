/* What the C test programs share: CHECK, which counts a check, reports a failure with its place and goes on (so one
 * run lists every failure), and the two counters each program's main() turns into its exit status. One test program
 * per translation unit, so the statics are that program's own. */
#ifndef EDGEMOE_TESTS_CHECK_H
#define EDGEMOE_TESTS_CHECK_H

#include <stdio.h>

static int n_check = 0, n_fail = 0;

#define CHECK(cond, ...)                                                                                              \
    do {                                                                                                              \
        n_check++;                                                                                                    \
        if (!(cond)) {                                                                                                \
            n_fail++;                                                                                                 \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                               \
            printf(__VA_ARGS__);                                                                                      \
            printf("\n");                                                                                             \
            fflush(stdout);                                                                                           \
        }                                                                                                             \
    } while (0)

#endif
