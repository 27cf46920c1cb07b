#!/bin/sh
# Build edgemoe-bench for Android phones (arm64-v8a) with the Android NDK's CMake toolchain file.
#
#   ANDROID_NDK=/path/to/android-ndk-r27 devices/android/build_android.sh [BUILD_DIR]
#     -> BUILD_DIR/edgemoe-bench (default build/android-arm64)
#
# ABI arm64-v8a, API level 28 (Android 9; override with ANDROID_PLATFORM=android-NN, at least 21). The NEON kernels
# run on every arm64 phone; the dotprod (SDOT) kernels are picked at run time from getauxval(AT_HWCAP), so one binary
# serves a Cortex-A53 and a Cortex-X. Any NDK with build/cmake/android.toolchain.cmake works (written against r26/r27).
# STATUS: written against the NDK's documented toolchain file; NOT yet built with a real NDK nor run on a phone (no NDK
# here). The same sources are cross-compiled for aarch64 Linux and run under qemu in tests/test_devices.py.
# Then: python devices/android/run_adb.py --model MODEL.emoe --threads 1,4
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
NDK=${ANDROID_NDK:-${ANDROID_NDK_HOME:-${ANDROID_NDK_ROOT:-}}}
if [ -z "$NDK" ]; then
    echo "set ANDROID_NDK to the NDK directory (Android Studio: SDK Manager > SDK Tools > NDK; or the standalone" >&2
    echo "download from developer.android.com/ndk/downloads)" >&2
    exit 2
fi
TOOLCHAIN="$NDK/build/cmake/android.toolchain.cmake"
[ -f "$TOOLCHAIN" ] || { echo "$TOOLCHAIN not found: is ANDROID_NDK an NDK directory?" >&2; exit 2; }
OUT=${1:-$ROOT/build/android-arm64}
cmake -S "$ROOT/native" -B "$OUT" \
    -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" \
    -DANDROID_ABI=arm64-v8a \
    -DANDROID_PLATFORM="${ANDROID_PLATFORM:-android-28}" \
    -DCMAKE_BUILD_TYPE=Release
cmake --build "$OUT" --target edgemoe-bench -j "${JOBS:-2}"
echo "$OUT/edgemoe-bench"
