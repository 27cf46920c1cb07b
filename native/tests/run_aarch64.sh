#!/bin/sh
# Cross-build the C core + its C test program for aarch64 (base armv8-a, static) and run it under qemu-user twice:
# with qemu's default CPU (has dotprod: tests the SDOT path) and with -cpu cortex-a53 (no dotprod: the runtime check
# must fall back, any SDOT instruction would SIGILL). Exit status nonzero on any failure.
# Needs: apt-get install -y gcc-aarch64-linux-gnu qemu-user
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
NATIVE=$(dirname "$HERE")
CC=${CC_AARCH64:-aarch64-linux-gnu-gcc}
QEMU=${QEMU_AARCH64:-qemu-aarch64}
OUT=${1:-${TMPDIR:-/tmp}/edgemoe_aarch64_$$}
for tool in "$CC" "$QEMU"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "missing $tool (apt-get install -y gcc-aarch64-linux-gnu qemu-user)" >&2; exit 2; }
done
mkdir -p "$OUT"
# the core's compute sources: read from native/CMakeLists.txt (EDGEMOE_COMPUTE_SOURCES), the one list of them
SOURCES=$(sed -n '/^set(EDGEMOE_COMPUTE_SOURCES/,/^)/p' "$NATIVE/CMakeLists.txt" | grep -o 'src/[a-z0-9_]*\.c' | \
    sed "s|^|$NATIVE/|" | tr '\n' ' ')
status=0
# test_kernels: the core's kernels and forward pass; test_mwq: the MWQ plane kernels and MWQ experts
for prog in test_kernels test_mwq; do
    BIN="$OUT/$prog"
    echo "== build $BIN (march=armv8-a, static)"
    "$CC" -std=c11 -O2 -march=armv8-a -static -Wall -Wextra -Werror -ffp-contract=off \
        -I"$NATIVE/include" -I"$NATIVE/src" "$NATIVE/tests/$prog.c" $SOURCES -o "$BIN" -lpthread -lm
    echo "== qemu-aarch64 $prog (default cpu: neon + dotprod)"
    "$QEMU" -L /usr/aarch64-linux-gnu "$BIN" || status=1
    echo "== qemu-aarch64 -cpu cortex-a53 $prog (no dotprod)"
    "$QEMU" -L /usr/aarch64-linux-gnu -cpu cortex-a53 "$BIN" || status=1
done
[ "${1:-}" ] || rm -rf "$OUT"
if [ $status -eq 0 ]; then echo "aarch64: all passed"; else echo "aarch64: FAILED"; fi
exit $status
