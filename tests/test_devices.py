"""The standalone benchmark binary and the device tooling (issue 9).

- `edgemoe-bench` (x86 build) prints llama-bench-shaped JSON, and its greedy token ids equal the Python runtime's
  (NumPy engine, argmax over `logits(prompt + generated)` step by step).
- The aarch64 build (devices/build_aarch64.sh, static, base armv8-a) gives the same ids under qemu-aarch64, with the
  dotprod kernels (qemu's default CPU) and without them (-cpu cortex-a53, the run-time fallback).
- The ssh and adb runners: the exact commands of --dry-run, and a full run against stand-in ssh/scp/adb programs
  that execute locally; merging real JSON produced under qemu into one table.
- The container reader survives truncation/corruption fuzzing under ASan + UBSan.

Greedy ids can legitimately differ between two correct implementations when the top two logits tie within float
error; the test model (tiny qwen3moe, f32) is used because its top-1/top-2 margins along the compared path are large
(about 0.1 in logit units, checked below, against differences of about 1e-6 between the engines).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ROOT / "devices"
sys.path.insert(0, str(DEVICES))
import merge_results
import sweep

N_PROMPT, N_GEN = 12, 10
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit along the greedy path: far above engine differences (~1e-6)
QEMU_CPUS = {"max": "neon_dotprod", "cortex-a53": "neon"}


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, check=False, **kw)


@pytest.fixture(scope="session")
def bench_aarch64(tmp_path_factory) -> Path:
    missing = [t for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64") if not shutil.which(t)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install -y gcc-aarch64-linux-gnu qemu-user)")
    out = tmp_path_factory.mktemp("aarch64")
    r = _run(["sh", DEVICES / "build_aarch64.sh", out])
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "edgemoe-bench"


@pytest.fixture(scope="session")
def model(tiny_emoe) -> Path:
    return tiny_emoe("qwen3moe", 32)


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory, model) -> Path:
    import edgemoe

    with edgemoe.load(model, engine="numpy") as m:
        vocab = m.spec.vocab
    ids = np.random.default_rng(7).integers(3, vocab, N_PROMPT)
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_text(" ".join(map(str, ids)) + "\n")
    return path


@pytest.fixture(scope="session")
def python_greedy(model, prompt_file) -> dict:
    """The NumPy engine's greedy continuation and the smallest top-1/top-2 margin on the way."""
    import edgemoe

    ids = [int(t) for t in prompt_file.read_text().split()]
    out, margins = [], []
    with edgemoe.load(model, engine="numpy") as m:
        for _ in range(N_GEN):
            logits = m.logits(ids + out)[-1]
            top2 = np.sort(logits)[-2:]
            margins.append(float(top2[1] - top2[0]))
            out.append(int(np.argmax(logits)))
    return {"prompt": ids, "tokens": out, "min_margin": min(margins)}


def _bench_json(prefix: list, binary: Path, model: Path, prompt_file: Path, *extra) -> list[dict]:
    r = _run([*prefix, binary, model, "--prompt-file", prompt_file, "-n", N_GEN, "-r", 2, "--print-tokens", "--json",
              *extra])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="session")
def x86_results(bench_x86, model, prompt_file) -> list[dict]:
    return _bench_json([], bench_x86, model, prompt_file)


@pytest.fixture(scope="session")
def qemu_results(bench_aarch64, model, prompt_file) -> dict[str, list[dict]]:
    """cpu -> the aarch64 binary's JSON under qemu-aarch64 -cpu cpu, run by devices/run_qemu.sh."""
    out = {}
    for cpu in QEMU_CPUS:
        r = _run(["sh", DEVICES / "run_qemu.sh", model, "--prompt-file", prompt_file, "-n", N_GEN, "-r", 2,
                  "--print-tokens", "--json"], env={**os.environ, "BIN": str(bench_aarch64), "QEMU_CPUS": cpu})
        assert r.returncode == 0 and f"== qemu-aarch64 -cpu {cpu}" in r.stderr, r.stderr
        out[cpu] = json.loads(r.stdout)
    return out


# ---------------------------------------------------------------------------------------------------- the binary
def test_bench_json_has_llama_bench_fields(x86_results, model):
    assert [r["test"] for r in x86_results] == [f"pp{N_PROMPT}", f"tg{N_GEN}"]
    for r in x86_results:
        for key in ("model_filename", "n_threads", "n_prompt", "n_gen", "avg_ts", "stddev_ts", "samples_ts", "test",
                    "avg_ns", "stddev_ns", "samples_ns", "p50_ms", "p95_ms", "peak_rss_bytes", "isa", "tokens"):
            assert key in r, key
        assert r["model_filename"] == str(model) and r["n_threads"] == 1 and r["engine"] == "edgemoe"
        assert len(r["samples_ts"]) == 2 and all(t > 0 for t in r["samples_ts"]) and r["avg_ts"] > 0
        assert r["peak_rss_bytes"] > 0 and r["isa"] in ("avx2", "avx512vnni", "scalar", "neon", "neon_dotprod")
        assert r["prompt_source"] == "file" and r["budget_enforced"] is False
    pp, tg = x86_results
    assert (pp["n_prompt"], pp["n_gen"], pp["p50_ms"]) == (N_PROMPT, 0, None)
    assert (tg["n_prompt"], tg["n_gen"]) == (0, N_GEN) and 0 < tg["p50_ms"] <= tg["p95_ms"]


def test_bench_greedy_tokens_equal_python_runtime(x86_results, python_greedy):
    assert python_greedy["min_margin"] > MIN_MARGIN, "the test model has near-ties: pick another seed/model"
    assert x86_results[0]["prompt_ids"] == python_greedy["prompt"]
    assert x86_results[0]["tokens"] == python_greedy["tokens"]


def test_bench_scalar_kernels_give_the_same_tokens(bench_x86, model, prompt_file, x86_results):
    res = _bench_json([], bench_x86, model, prompt_file, "--isa", "scalar", "-r", "1")
    assert res[0]["isa"] == "scalar" and res[0]["isa_forced"] is True
    assert res[0]["tokens"] == x86_results[0]["tokens"]


@pytest.mark.parametrize("cpu", list(QEMU_CPUS))
def test_aarch64_under_qemu_gives_the_same_tokens(qemu_results, x86_results, python_greedy, cpu):
    res = qemu_results[cpu]
    assert res[0]["isa"] == QEMU_CPUS[cpu]  # dotprod chosen at run time only where the CPU has it
    assert "aarch64" in res[0]["system"]
    assert res[0]["tokens"] == x86_results[0]["tokens"] == python_greedy["tokens"]


def test_container_tests_pass_on_aarch64_under_qemu(model, tmp_path):
    """native/tests/test_container.c cross-compiled (aarch64: unsigned char, other alignment) on a cortex-a53."""
    if not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")):
        pytest.skip("aarch64-linux-gnu-gcc or qemu-aarch64 not installed")
    native = ROOT / "native"
    binary = tmp_path / "test_container"
    r = _run(["aarch64-linux-gnu-gcc", "-std=c11", "-O2", "-march=armv8-a", "-static", "-Wall", "-Wextra", "-Werror",
              "-ffp-contract=off", "-I", native / "include", "-I", native / "src", native / "tests/test_container.c",
              *sorted((native / "src").glob("*.c")), "-o", binary, "-lpthread", "-lm"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "cortex-a53", binary, model, "--iters", "100",
              "--tmp", tmp_path])
    assert r.returncode == 0 and "all passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_bench_random_prompt_is_stated_and_reproducible(bench_x86, model):
    runs = [json.loads(_run([bench_x86, model, "-p", 8, "-n", 4, "-r", 1, "--print-tokens", "--json",
                             "--seed", 5]).stdout) for _ in range(2)]
    assert runs[0][0]["prompt_source"] == "random" and runs[0][0]["prompt_seed"] == 5
    assert runs[0][0]["prompt_ids"] == runs[1][0]["prompt_ids"] and runs[0][0]["tokens"] == runs[1][0]["tokens"]
    r = _run([bench_x86, model, "-p", 8, "-n", 4, "-r", 1, "--budget", "1GB"])
    assert r.returncode == 0
    # the budget is enforced now (expert cache): the run under 1GB must still complete and report its peak RSS
    assert "| tg4 |" in r.stdout and "peak RSS" in r.stdout


def test_bench_refuses_bad_input_with_a_message(bench_x86, model, tmp_path):
    data = model.read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "magic": (b"GGUF" + data[4:], "not an edgemoe container"),
        "version": (data[:4] + (9).to_bytes(4, "little") + data[8:], "container version 9"),
        "index": (data[:-10] + b"x" + data[-9:], "checksum mismatch in the tensor index"),
    }
    for name, (blob, message) in cases.items():
        path = tmp_path / f"{name}.emoe"
        path.write_bytes(blob)
        r = _run([bench_x86, path, "-p", 4, "-n", 2, "-r", 1])
        assert r.returncode == 1 and message in r.stderr, (name, r.stderr)
    data_flip = bytearray(data)
    data_flip[5000] ^= 0xFF  # inside the first tensor: only --verify reads it
    path = tmp_path / "flip.emoe"
    path.write_bytes(bytes(data_flip))
    r = _run([bench_x86, path, "-p", 4, "-n", 2, "-r", 1, "--verify"])
    assert r.returncode == 1 and "checksum mismatch in tensor" in r.stderr
    r = _run([bench_x86, tmp_path / "missing.emoe"])
    assert r.returncode == 1 and "no such file" in r.stderr
    r = _run([bench_x86, model, "--threads", "0"])
    assert r.returncode == 2 and "expected an integer" in r.stderr
    r = _run([bench_x86, model, "--budget", "10KB"])
    assert r.returncode == 1 and "smaller than the dense part" in r.stderr
    r = _run([bench_x86, model, "--isa", "sse9"])
    assert r.returncode == 2


def test_bench_reads_a_v2_mwq_container_and_says_what_it_cannot_run(bench_x86, tiny_dir, tmp_path):
    from edgemoe_export import export

    path = export(tiny_dir("qwen3moe"), tmp_path / "mwq.emoe", bits=4, nesting="msb", show_progress=False)
    assert path.read_bytes()[4] == 2  # container version 2
    r = _run([bench_x86, path, "-p", 4, "-n", 2, "-r", 1, "--verify", "--json"])
    if r.returncode:  # the C core has no MWQ kernels yet: a clear refusal after the index (planes included) parsed
        assert "stored as mwq" in r.stderr and "crc" not in r.stderr.lower(), r.stderr
    else:
        assert json.loads(r.stdout)[0]["container_version"] == 2


# ----------------------------------------------------------------------------------------------------- runners
def _runner(script: str, *args, env=None) -> subprocess.CompletedProcess:
    return _run([sys.executable, DEVICES / script, *args], env=env, cwd=ROOT)


def test_remote_runner_dry_run_prints_the_exact_commands():
    r = _runner("rpi/run_remote.py", "--host", "pi@pi5.local", "--model", "models/m.emoe", "--binary",
                "build/aarch64/edgemoe-bench", "--threads", "1,4", "--budgets", "none,1GB", "-p", "64", "-n", "16",
                "-r", "3", "--port", "2222", "--out", "res", "--dry-run")
    assert r.returncode == 0, r.stderr
    bench = "./edgemoe-bench m.emoe -p 64 -n 16 -r 3"
    ssh = "ssh -o BatchMode=yes -p 2222 pi@pi5.local"
    assert r.stdout.splitlines() == [
        f"{ssh} 'mkdir -p /tmp/edgemoe'",
        "scp -o BatchMode=yes -P 2222 build/aarch64/edgemoe-bench models/m.emoe pi@pi5.local:/tmp/edgemoe/",
        f"{ssh} 'chmod 755 /tmp/edgemoe/edgemoe-bench'",
        f"{ssh} 'cd /tmp/edgemoe && {bench} -t 1 --json' > res/pi5.local_t1_bnone.json",
        f"{ssh} 'cd /tmp/edgemoe && {bench} -t 4 --json' > res/pi5.local_t4_bnone.json",
        f"{ssh} 'cd /tmp/edgemoe && {bench} -t 1 --budget 1GB --json' > res/pi5.local_t1_b1GB.json",
        f"{ssh} 'cd /tmp/edgemoe && {bench} -t 4 --budget 1GB --json' > res/pi5.local_t4_b1GB.json",
    ]


def test_adb_runner_dry_run_prints_the_exact_commands():
    r = _runner("android/run_adb.py", "--serial", "R58M", "--model", "m.emoe", "--threads", "2", "--budgets",
                "512MB", "-p", "32", "-n", "8", "-r", "1", "--prompt-file", "ids.txt", "--device", "pixel7",
                "--out", "res", "--dry-run")
    assert r.returncode == 0, r.stderr
    d = "/data/local/tmp/edgemoe"
    assert r.stdout.splitlines() == [
        f"adb -s R58M shell 'mkdir -p {d}'",
        f"adb -s R58M push build/android-arm64/edgemoe-bench {d}/edgemoe-bench",
        f"adb -s R58M push m.emoe {d}/m.emoe",
        f"adb -s R58M push ids.txt {d}/ids.txt",
        f"adb -s R58M shell 'chmod 755 {d}/edgemoe-bench'",
        (f"adb -s R58M shell 'cd {d} && ./edgemoe-bench m.emoe -p 32 -n 8 -r 1 -t 2 --budget 512MB "
         f"--prompt-file ids.txt --json > {d}/result_t2_b512MB.json'"),
        f"adb -s R58M pull {d}/result_t2_b512MB.json res/pixel7_t2_b512MB.json",
    ]


FAKE_SSH = """#!/bin/sh
# stand-in for ssh: skip options and the host, run the command here
while [ $# -gt 1 ]; do case "$1" in -o|-p|-i) shift 2;; -*) shift;; *) shift; break;; esac; done
exec sh -c "$1"
"""
FAKE_SCP = """#!/bin/sh
# stand-in for scp: skip options, copy the files into the directory after "host:"
files=""
while [ $# -gt 1 ]; do case "$1" in -o|-P|-i) shift 2;; *) files="$files $1"; shift;; esac; done
dest=${1#*:}
mkdir -p "$dest" && cp $files "$dest"
"""
FAKE_ADB = """#!/bin/sh
# stand-in for adb: -s SERIAL ignored; shell runs here; push/pull copy; the "phone" is the local file system
[ "$1" = "-s" ] && shift 2
cmd=$1; shift
case "$cmd" in shell) exec sh -c "$*";; push|pull) mkdir -p "$(dirname "$2")" && cp "$1" "$2";; esac
"""


def _fake_bin(tmp_path: Path) -> dict:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP), ("adb", FAKE_ADB)):
        p = bindir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def test_remote_runner_end_to_end_with_stand_in_ssh(bench_x86, model, tmp_path):
    """The real (non-dry) path: copy, run the sweep, save annotated JSON, print the table. ssh/scp are stand-ins that
    run locally, with the host build of the binary; what a board does is not claimed here."""
    env = _fake_bin(tmp_path)
    out = tmp_path / "results"
    r = _runner("rpi/run_remote.py", "--host", "pi@board", "--remote-dir", tmp_path / "remote", "--model", model,
                "--binary", bench_x86, "--threads", "1,2", "--budgets", "none,1GB", "-p", "8", "-n", "4", "-r", "1",
                "--out", out, env=env)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["board_t1_b1GB.json", "board_t1_bnone.json", "board_t2_b1GB.json", "board_t2_bnone.json"]
    recs = json.loads((out / "board_t2_b1GB.json").read_text())
    assert [r_["test"] for r_ in recs] == ["pp8", "tg4"] and {r_["n_threads"] for r_ in recs} == {2}
    assert recs[0]["device"] == "board" and recs[0]["budget_bytes"] == 10**9 and "--budget 1GB" in recs[0]["command"]
    assert r.stdout.count("| board |") == 8


def test_adb_runner_end_to_end_with_stand_in_adb(bench_x86, model, tmp_path):
    env = _fake_bin(tmp_path)
    out = tmp_path / "results"
    r = _runner("android/run_adb.py", "--remote-dir", tmp_path / "phone", "--model", model, "--binary", bench_x86,
                "--threads", "1", "-p", "8", "-n", "4", "-r", "1", "--device", "phone", "--out", out, env=env)
    assert r.returncode == 0, r.stderr
    recs = json.loads((out / "phone_t1_bnone.json").read_text())
    assert recs[0]["device"] == "phone" and recs[1]["test"] == "tg4" and recs[0]["budget_bytes"] is None
    assert (tmp_path / "phone" / "result_t1_bnone.json").exists()  # written on the "phone", then pulled


def test_merge_results_reads_json_from_qemu_runs(qemu_results, x86_results, tmp_path):
    """Real JSON printed by the aarch64 binary under qemu (and the x86 build) -> one table, and a plot if possible."""
    for cpu, res in qemu_results.items():
        sweep.save_results(json.dumps(res), tmp_path / f"qemu-{cpu}.json", f"qemu-{cpu}", "qemu-aarch64 ...")
    sweep.save_results(json.dumps(x86_results), tmp_path / "sub" / "x86.json", "x86-host", "edgemoe-bench ...")
    records = merge_results.load_results([tmp_path])
    assert len(records) == 6
    table = merge_results.markdown_table(records)
    lines = table.splitlines()
    assert len(lines) == 2 + 6
    assert any(line.startswith("| qemu-cortex-a53 |") and "| neon |" in line and f"| tg{N_GEN} |" in line
               for line in lines)
    assert any(line.startswith("| qemu-max |") and "| neon_dotprod |" in line for line in lines)
    md = tmp_path / "table.md"
    assert merge_results.main([str(tmp_path), "--out", str(md), "--plot", str(tmp_path / "plot.png")]) == 0
    assert md.read_text().strip() == table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "plot.png").exists()
    else:
        assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_results_refuses_what_is_not_a_result(tmp_path):
    (tmp_path / "bad.json").write_text('[{"test": "pp8"}]')
    with pytest.raises(merge_results.ResultError, match="lacks n_threads, avg_ts"):
        merge_results.load_results([tmp_path / "bad.json"])
    with pytest.raises(merge_results.ResultError, match="not JSON"):
        merge_results.parse_results("edgemoe-bench: x.emoe: truncated", "run")


# ---------------------------------------------------------------------------------------------- fuzz under ASan
def _asan_works(tmp_path: Path) -> bool:
    src = tmp_path / "a.c"
    src.write_text("int main(void) { return 0; }\n")
    r = _run(["gcc", "-fsanitize=address,undefined", src, "-o", tmp_path / "a.out"])
    return r.returncode == 0 and _run([tmp_path / "a.out"]).returncode == 0


def test_container_reader_survives_fuzzing_under_asan(model, tmp_path):
    if not shutil.which("gcc") or not _asan_works(tmp_path):
        pytest.skip("gcc with AddressSanitizer is not available")
    r = _run(["sh", ROOT / "native/tests/run_container_asan.sh", model, "--iters", "200"],
             env={**os.environ, "OUT": str(tmp_path / "asan")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "all passed" in r.stdout and "fuzz synthetic" in r.stdout and f"fuzz {model}" in r.stdout
