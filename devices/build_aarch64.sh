#!/bin/sh
# Cross-compile edgemoe-bench for aarch64 Linux (Raspberry Pi 4/5 and other 64-bit ARM boards) as one static binary.
#
#   devices/build_aarch64.sh [OUT_DIR]        -> OUT_DIR/edgemoe-bench (default: build/aarch64)
#
# Base ISA armv8-a (NEON only): the dotprod kernels carry their own target attributes and are picked at run time from
# the CPU's HWCAP, so this one binary runs on a Cortex-A53 (Pi 3, no dotprod) and uses SDOT on a Cortex-A76 (Pi 5).
# Static linking: nothing to install on the board; copy the file and run it.
# Needs: apt-get install -y gcc-aarch64-linux-gnu   (override the compiler with CC_AARCH64=...)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
NATIVE="$ROOT/native"
CC=${CC_AARCH64:-aarch64-linux-gnu-gcc}
OUT=${1:-$ROOT/build/aarch64}
command -v "$CC" >/dev/null 2>&1 || { echo "missing $CC (apt-get install -y gcc-aarch64-linux-gnu)" >&2; exit 2; }
mkdir -p "$OUT"
# Same flags as native/CMakeLists.txt: warnings are errors, no silent FMA contraction in the scalar reference.
"$CC" -std=c11 -O2 -march=armv8-a -static -Wall -Wextra -Werror -ffp-contract=off \
    -I"$NATIVE/include" -I"$NATIVE/src" \
    "$NATIVE/tools/edgemoe_bench.c" "$NATIVE"/src/*.c \
    -o "$OUT/edgemoe-bench" -lpthread -lm
echo "$OUT/edgemoe-bench"
