#!/bin/sh
# Build native/tests/test_container.c with AddressSanitizer + UndefinedBehaviorSanitizer and run it: JSON parser
# tests, container checks, and the fuzz pass (truncations, byte flips, index mutations with repaired checksums) on its
# own synthetic container and on every container given.
#
#   native/tests/run_container_asan.sh [CONTAINER.emoe ...] [--iters N]
#
# Environment: CC (default gcc), OUT (build directory, default a temporary one). Exit status nonzero on any failure
# or sanitizer report.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
NATIVE=$(dirname "$HERE")
CC=${CC:-gcc}
OUT=${OUT:-${TMPDIR:-/tmp}/edgemoe_asan_$$}
mkdir -p "$OUT"
BIN="$OUT/test_container_asan"
echo "== build $BIN (-fsanitize=address,undefined)"
"$CC" -std=c11 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    -Wall -Wextra -Werror -ffp-contract=off -I"$NATIVE/include" -I"$NATIVE/src" \
    "$HERE/test_container.c" "$NATIVE"/src/*.c -o "$BIN" -lpthread -lm
# allocator_may_return_null: a mutated config may ask for an absurd buffer; the library must get NULL and say so.
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1:abort_on_error=0} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
status=0
TMPDIR="$OUT" "$BIN" "$@" || status=$?
[ "${OUT#"${TMPDIR:-/tmp}"/edgemoe_asan_}" = "$OUT" ] || rm -rf "$OUT"
exit $status
