"""The C core's test programs under AddressSanitizer + UndefinedBehaviorSanitizer (leaks included)."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "native" / "tests" / "run_sanitizers.sh"


def test_native_tests_are_clean_under_asan_and_ubsan():
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    r = subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
