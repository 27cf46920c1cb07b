"""Every bad input gets one clear message naming the file and the problem, and exit status 1 from the CLI."""

import json
import shutil

from subprocess_python import PYTHON

from edgemoe.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def test_export_of_missing_path(capsys, tmp_path):
    code, err = run_cli(capsys, "export", tmp_path / "nope", "-o", tmp_path / "o.emoe")
    assert code == 1 and "nope" in err and "no such file" in err
    assert not (tmp_path / "o.emoe").exists()


def test_export_of_directory_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "export", tmp_path / "empty", "-o", tmp_path / "o.emoe")
    assert code == 1 and "no config.json" in err and "empty" in err


def test_export_of_unsupported_architecture_lists_supported_ones(capsys, tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, err = run_cli(capsys, "export", d, "-o", tmp_path / "o.emoe")
    assert code == 1 and "'llama' is not supported" in err and "OLMoE" in err and "Mixtral" in err


def test_export_of_truncated_safetensors(capsys, tmp_path, tiny_dir):
    d = tmp_path / "trunc"
    shutil.copytree(tiny_dir("olmoe"), d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    code, err = run_cli(capsys, "export", d, "-o", tmp_path / "o.emoe")
    assert code == 1 and "model.safetensors" in err and "truncated" in err
    assert not (tmp_path / "o.emoe").exists() and not (tmp_path / "o.emoe.tmp").exists()


def test_export_of_shapes_that_disagree_with_config(capsys, tmp_path, tiny_dir):
    d = tmp_path / "shapes"
    shutil.copytree(tiny_dir("mixtral"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48  # the experts in the file are 40 wide
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "export", d, "-o", tmp_path / "o.emoe")
    assert code == 1 and "model.safetensors" in err and "has shape" in err and "config.json implies" in err
    assert list(tmp_path.glob("o.emoe*")) == []  # no half-written output


def test_truncated_container(capsys, tmp_path, tiny_emoe):
    p = tmp_path / "t.emoe"
    data = tiny_emoe("olmoe", 32).read_bytes()
    p.write_bytes(data[: len(data) - 100])
    code, err = run_cli(capsys, "info", p)
    assert code == 1 and "t.emoe" in err and "truncated" in err
    p.write_bytes(data[:100])
    code, err = run_cli(capsys, "run", p, "-p", "hi")
    assert code == 1 and "truncated" in err


def test_container_with_wrong_checksum(capsys, tmp_path, tiny_emoe):
    import edgemoe.container as cont

    src = tiny_emoe("qwen3moe", 32)
    c = cont.open_container(src)
    t = c.tensors["blk.1.expert.3.ffn_up.weight"]
    c.close()
    data = bytearray(src.read_bytes())
    data[t.offset + 5] ^= 0xFF
    p = tmp_path / "bad.emoe"
    p.write_bytes(bytes(data))
    code, err = run_cli(capsys, "run", p, "-p", "hi")
    assert code == 1 and "bad.emoe" in err and "checksum mismatch" in err and "blk.1.expert.3.ffn_up.weight" in err


def test_not_a_container(capsys, tmp_path):
    p = tmp_path / "x.emoe"
    p.write_bytes(b"GGUF" + b"\0" * 5000)
    code, err = run_cli(capsys, "info", p)
    assert code == 1 and "not an edgemoe container" in err


def test_unsupported_bits_and_bad_budget(capsys, tmp_path, tiny_dir, tiny_emoe):
    # MWQ takes 2..8 total bits (5 is a valid MWQ width now), floats 16 or 32: 9 is none of them
    code, err = run_cli(capsys, "export", tiny_dir("olmoe"), "-o", tmp_path / "o.emoe", "--bits", "9")
    assert code == 1 and "--bits 9" in err
    code, err = run_cli(capsys, "run", tiny_emoe("olmoe", 32), "-p", "hi", "--budget", "lots")
    assert code == 1 and "cannot read size 'lots'" in err
    code, err = run_cli(capsys, "run", tiny_emoe("olmoe", 32), "-p", "hi", "--budget", "3XB")
    assert code == 1 and "unknown unit 'xb'" in err and "GiB" in err
    code, err = run_cli(capsys, "fit", tiny_emoe("olmoe", 32), "--budget", "2 GB", "--no-measure", "--max-ctx", "32")
    assert code == 0  # a space before the unit is fine
    code, err = run_cli(capsys, "run", tiny_emoe("olmoe", 32), "-p", "hi", "--budget", "1KB")
    assert code == 1 and "smaller than the dense part" in err


def test_cli_entry_point_help(tmp_path):
    import subprocess

    # cwd elsewhere: from the repository root, `python -m` would import the source tree instead of the installed package
    out = subprocess.run([*PYTHON, "-m", "edgemoe", "export", "--help"], check=False,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "--bits" in out.stdout and "Hugging Face" in out.stdout
