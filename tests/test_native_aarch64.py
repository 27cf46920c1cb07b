"""The C core on aarch64: cross-compiled (base armv8-a, static) and run under qemu-user, once with dotprod and once
as a Cortex-A53 (no dotprod: the SDOT kernels must not be selected). See native/tests/run_aarch64.sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "native" / "tests" / "run_aarch64.sh"


@pytest.mark.skipif(
    not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
    reason="needs the aarch64 cross compiler and qemu-user: apt-get install -y gcc-aarch64-linux-gnu qemu-user",
)
def test_native_core_on_aarch64_with_and_without_dotprod(tmp_path):
    proc = subprocess.run(["sh", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "isa neon_dotprod  ok" in out  # default qemu CPU: the SDOT path ran
    assert "best isa: neon\n" in out  # cortex-a53: dotprod was not selected
    assert "aarch64: all passed" in out
