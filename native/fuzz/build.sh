#!/bin/sh
# Build the container fuzz target (native/fuzz/fuzz_container.c) with AddressSanitizer + UndefinedBehaviorSanitizer,
# and optionally replay a corpus through it with the scalar kernels and with the best SIMD kernels of this CPU
# (stores inside SIMD intrinsics are not instrumented by ASan, so the scalar run is the one that sees them).
#
#   native/fuzz/build.sh [--out DIR] [--run CORPUS_DIR_OR_FILE...]
#
# Builds DIR/fuzz_container (the replay driver; CC, default gcc; skipped when up to date) and, unless NO_LIBFUZZER=1,
# when CC_FUZZER (default clang) accepts
# -fsanitize=fuzzer, DIR/fuzz_container_libfuzzer (a libFuzzer binary: run it on a copy of a corpus directory,
# e.g. `DIR/fuzz_container_libfuzzer -max_total_time=300 -rss_limit_mb=2048 -timeout=20 CORPUS`).
# A corpus: `python tests/hostile_containers.py CORPUS [--every N]`. Exit status nonzero on a build failure or on any
# crash or sanitizer report during a replay. Sources: every native/src/*.c, so the script follows file moves.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
NATIVE=$(dirname "$HERE")
CC=${CC:-gcc}
CC_FUZZER=${CC_FUZZER:-clang}
OUT=${TMPDIR:-/tmp}/edgemoe_fuzz
RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --run) RUN=1; shift; break ;;
        *) echo "usage: $0 [--out DIR] [--run CORPUS...]" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
FLAGS="-std=c11 -O1 -g -Wall -Wextra -Werror -ffp-contract=off -I$NATIVE/include -I$NATIVE/src"

# Up to date: the binary is newer than every source and header (the build takes minutes on a small machine).
if [ -x "$OUT/fuzz_container" ] && [ -z "$(find "$HERE" "$NATIVE/src" "$NATIVE/include" -newer "$OUT/fuzz_container" \
        -name '*.[ch]' | head -1)" ]; then
    echo "== $OUT/fuzz_container is up to date"
    BUILT=0
else
    echo "== build $OUT/fuzz_container ($CC, $SAN)"
    # shellcheck disable=SC2086
    "$CC" $FLAGS $SAN "$HERE/fuzz_container.c" "$NATIVE"/src/*.c -o "$OUT/fuzz_container" -lpthread -lm
    BUILT=1
fi

if [ "$BUILT" = 1 ] && [ "${NO_LIBFUZZER:-0}" != 1 ] && command -v "$CC_FUZZER" >/dev/null 2>&1; then
    echo "== build $OUT/fuzz_container_libfuzzer ($CC_FUZZER, -fsanitize=fuzzer,address,undefined)"
    # shellcheck disable=SC2086
    if ! "$CC_FUZZER" $FLAGS -DEDGEMOE_LIBFUZZER -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
        -fno-omit-frame-pointer "$HERE/fuzz_container.c" "$NATIVE"/src/*.c -o "$OUT/fuzz_container_libfuzzer" \
        -lpthread -lm; then
        echo "   ($CC_FUZZER cannot build a libFuzzer target here; the replay driver is built)"
    fi
fi

[ "$RUN" = 1 ] || exit 0
[ $# -gt 0 ] || { echo "--run needs a corpus" >&2; exit 2; }
# allocator_may_return_null: a hostile size must come back as a failed allocation the library reports.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
for isa in scalar simd; do
    if [ $isa = scalar ]; then export EDGEMOE_ISA=scalar; else unset EDGEMOE_ISA; fi
    echo "== replay with the $isa kernels"
    "$OUT/fuzz_container" "$@" >"$OUT/replay_$isa.log" 2>"$OUT/replay_$isa.err" || status=1
    tail -1 "$OUT/replay_$isa.log"
    if [ $status != 0 ] || grep -q "ERROR: AddressSanitizer\|runtime error:\|ERROR: LeakSanitizer" "$OUT/replay_$isa.err"; then
        status=1
        grep -B1 -A25 "ERROR: AddressSanitizer\|runtime error:\|ERROR: LeakSanitizer" "$OUT/replay_$isa.err" | head -60
        grep "^== " "$OUT/replay_$isa.err" | tail -1
    fi
done
exit $status
