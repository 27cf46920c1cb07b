#!/bin/sh
# Run the aarch64 edgemoe-bench under qemu-user, twice: qemu's default CPU (NEON + dotprod: the SDOT kernels) and
# -cpu cortex-a53 (no dotprod: the run-time check must fall back to plain NEON; any SDOT would be SIGILL).
# Emulated timings mean nothing; this checks that the binary runs and what it computes (compare --print-tokens).
#
#   devices/run_qemu.sh MODEL.emoe [edgemoe-bench options...]
#     e.g. devices/run_qemu.sh tiny.emoe -p 16 -n 8 -r 1 --print-tokens --json
#
# Environment: BIN (default build/aarch64/edgemoe-bench, built if missing), QEMU_AARCH64 (default qemu-aarch64),
# QEMU_CPUS (default "max cortex-a53"). Exit status nonzero if any run fails.
# Needs: apt-get install -y gcc-aarch64-linux-gnu qemu-user
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
[ $# -ge 1 ] || { echo "usage: $0 MODEL.emoe [edgemoe-bench options...]" >&2; exit 2; }
QEMU=${QEMU_AARCH64:-qemu-aarch64}
BIN=${BIN:-$ROOT/build/aarch64/edgemoe-bench}
command -v "$QEMU" >/dev/null 2>&1 || { echo "missing $QEMU (apt-get install -y qemu-user)" >&2; exit 2; }
[ -x "$BIN" ] || "$HERE/build_aarch64.sh" "$(dirname "$BIN")" >/dev/null
status=0
for cpu in ${QEMU_CPUS:-max cortex-a53}; do
    echo "== qemu-aarch64 -cpu $cpu" >&2
    "$QEMU" -L /usr/aarch64-linux-gnu -cpu "$cpu" "$BIN" "$@" || status=1
done
exit $status
