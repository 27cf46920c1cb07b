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


FUZZ_BUILD = Path(__file__).resolve().parents[1] / "native" / "fuzz" / "build.sh"
SANITIZER_REPORT = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


def _replay_chunk(binary: Path, files: list[Path], isa: str) -> tuple[list[tuple[str, str]], str]:
    """Replay files through the sanitizer build; on a crash, sanitizer report or hang, note the input and go on with
    the next one. -> ([(file name, what happened)], the driver's last summary line)."""
    import os

    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    env.pop("EDGEMOE_ISA", None)
    if isa == "scalar":
        env["EDGEMOE_ISA"] = "scalar"
    found, summary, rest = [], "", list(files)
    while rest:
        try:
            r = subprocess.run([str(binary), *map(str, rest)], capture_output=True, text=True, timeout=120 + 2 * len(rest),
                               env=env, check=False)
            err, hung = r.stderr, False
        except subprocess.TimeoutExpired as e:
            err, hung = (e.stderr or b"").decode(errors="replace"), True
        started = [line[3:] for line in err.splitlines() if line.startswith("== ")]
        report = next((line for line in err.splitlines() if any(s in line for s in SANITIZER_REPORT)), None)
        if not hung and report is None and r.returncode == 0:
            summary = r.stdout.strip().splitlines()[-1]
            break
        last = started[-1] if started else str(rest[0])
        what = "hang" if hung else report or f"exit status {r.returncode}: {err.strip().splitlines()[-1:]}"
        found.append((Path(last).name, what.strip()[:300]))
        rest = rest[rest.index(Path(last)) + 1 :] if Path(last) in rest else rest[1:]
    return found, summary


def test_container_fuzz_corpus_is_clean_under_asan_and_ubsan(tiny_dir, tmp_path):
    """The hostile container corpus (tests/hostile_containers.py) through native/fuzz/fuzz_container.c built with
    ASan + UBSan: open with every CRC checked, resident and budgeted load, a 2-token forward; scalar kernels and the
    best SIMD kernels. Every 3rd case by default, all of them with EDGEMOE_FUZZ_FULL=1."""
    import os
    import sys

    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    sys.path.insert(0, str(Path(__file__).parent))
    import hostile_containers as hc

    out = tmp_path / "build"
    r = subprocess.run(["sh", str(FUZZ_BUILD), "--out", str(out)], capture_output=True, text=True, timeout=1800,
                       check=False, env=dict(os.environ, NO_LIBFUZZER="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    bases = hc.load_bases(hc.build_bases(tmp_path / "bases", tiny_dir))
    cases = hc.sample(hc.cases(bases), 1 if os.environ.get("EDGEMOE_FUZZ_FULL") == "1" else 3)
    names = {hc.file_name(c): c.label for c in cases}
    found, summaries = [], []
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for start in range(0, len(cases), 400):  # bounded disk use: 400 files at a time
        files = []
        for c in cases[start : start + 400]:
            f = corpus / hc.file_name(c)
            f.write_bytes(hc.materialize(c, bases[c.base]))
            files.append(f)
        for isa in ("scalar", "simd"):
            bad, summary = _replay_chunk(out / "fuzz_container", files, isa)
            found += [(isa, names.get(name, name), what) for name, what in bad]
            summaries.append(f"{isa}: {summary}")
        for f in files:
            f.unlink()
    print("\n".join(summaries))
    assert not found, f"{len(found)} of {len(cases)} cases x 2 ISAs failed under ASan/UBSan:\n" + "\n".join(
        f"  [{isa}] {label}: {what}" for isa, label, what in found[:80])
