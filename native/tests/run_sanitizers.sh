#!/bin/sh
# Build the core's C test programs (kernels + forward pass, MWQ planes) with AddressSanitizer and
# UndefinedBehaviorSanitizer and run them. Exit status nonzero on any failure or sanitizer report.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
NATIVE=$(dirname "$HERE")
CC=${CC:-gcc}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/edgemoe_san_XXXXXX")
status=0
for prog in test_kernels test_mwq; do
    [ -f "$HERE/$prog.c" ] || continue
    echo "== build $prog (-fsanitize=address,undefined)"
    "$CC" -std=c11 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
        -Wall -Wextra -Werror -ffp-contract=off -I"$NATIVE/include" -I"$NATIVE/src" \
        "$HERE/$prog.c" "$NATIVE"/src/*.c -o "$OUT/$prog" -lpthread -lm
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$OUT/$prog" >"$OUT/$prog.log" 2>&1 || { status=1; tail -30 "$OUT/$prog.log"; }
    tail -2 "$OUT/$prog.log"
done
rm -rf "$OUT"
exit $status
