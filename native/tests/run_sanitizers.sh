#!/bin/sh
# Build the core's C test programs (kernels + forward pass, MWQ planes, the container parser, the expert cache and its
# I/O threads) with AddressSanitizer and UndefinedBehaviorSanitizer and run them. Exit status nonzero on any failure or
# sanitizer report. The core's sources are compiled once (in parallel) and linked into every program.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
NATIVE=$(dirname "$HERE")
CC=${CC:-gcc}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/edgemoe_san_XXXXXX")
trap 'rm -rf "$OUT"' EXIT
FLAGS="-std=c11 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
FLAGS="$FLAGS -Wall -Wextra -Werror -ffp-contract=off -I$NATIVE/include -I$NATIVE/src"
export CC FLAGS OUT
echo "== build the core (-fsanitize=address,undefined)"
# shellcheck disable=SC2086
ls "$NATIVE"/src/*.c | xargs -P "$(nproc 2>/dev/null || echo 2)" -I{} sh -c '$CC $FLAGS -c "$1" -o "$OUT/$(basename "$1" .c).o"' sh {}
status=0
for prog in test_kernels test_mwq test_container test_cache; do
    echo "== $prog"
    # shellcheck disable=SC2086
    "$CC" $FLAGS "$HERE/$prog.c" "$OUT"/*.o -o "$OUT/$prog" -lpthread -lm
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$OUT/$prog" >"$OUT/$prog.log" 2>&1 || { status=1; tail -30 "$OUT/$prog.log"; }
    tail -2 "$OUT/$prog.log"
done
exit $status
