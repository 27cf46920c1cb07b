"""SIGTERM or Ctrl-C during `edgemoe export`: no OUT, no OUT.tmp, one line on stderr, status 128 + signum."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
from subprocess_python import PYTHON

SMALL_MOE = Path(__file__).resolve().parents[1] / "export" / "assets" / "small-moe"


@pytest.mark.skipif(not (SMALL_MOE / "model.safetensors").exists(),
                    reason="the trained small model is not shipped in this checkout")
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_export_removes_the_partial_file(tmp_path, sig, status):
    out = tmp_path / "model.emoe"
    tmp = out.with_name(out.name + ".tmp")
    # calibrated 4-bit export: the writer opens OUT.tmp before calibration starts, which then takes seconds
    p = subprocess.Popen(PYTHON + ["-m", "edgemoe", "export", str(SMALL_MOE), "-o", str(out), "--bits", "4",
                                   "--calib-tokens", "4096", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not tmp.exists():
            if p.poll() is not None:
                pytest.fail(f"the export ended (status {p.returncode}) before it started writing: {p.stderr.read()}")
            assert time.monotonic() < deadline, "no OUT.tmp after 120 s"
            time.sleep(0.01)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == status, err
    assert not tmp.exists(), "the temporary file was left behind"
    assert not out.exists(), "an interrupted export must not leave an output file"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgemoe: "), err
