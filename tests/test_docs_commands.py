"""Every command of docs/tutorial.md and of the README's Use section, run as written on a tiny model.

The tutorial's $SRC (the shipped model) becomes a tiny OLMoE checkpoint with the files the tutorial reads (calib.txt,
heldout/shakespeare.txt); the README's placeholders (path/to/hf-model, held_out.txt) become the same. Not run:
`pip install` lines (the package is installed), and `edgemoe serve`, which runs until stopped (test_serve.py drives
it). Each command must exit 0 without a traceback; the tutorial's Python block is run too.
"""

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from subprocess_python import PYTHON

ROOT = Path(__file__).resolve().parent.parent
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 30


def fenced_blocks(md: str, tag: str = "") -> list[str]:
    """The ``` blocks of a markdown file opened with `tag` ("" = untagged: commands), in order."""
    blocks, current, open_tag = [], None, None
    for line in md.splitlines():
        if line.startswith("```"):
            if current is None:
                current, open_tag = [], line[3:].strip()
            else:
                if open_tag == tag:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands(block: str) -> list[str]:
    """`edgemoe ...` lines of a block, backslash continuations joined, trailing `# comments` dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line.startswith("edgemoe ") and not line.startswith("edgemoe serve"):
            out.append(line)
    return out


@pytest.fixture(scope="module")
def src(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "small-moe"
    shutil.copytree(tiny_dir("qwen3moe"), d)  # llama.cpp runs its GQA (its olmoe cannot)
    config = json.loads((d / "config.json").read_text())  # a real model's context: bench's default -p 512 -n 128
    config["max_position_embeddings"] = 1024
    (d / "config.json").write_text(json.dumps(config))
    (d / "calib.txt").write_text(TEXT)
    (d / "heldout").mkdir()
    (d / "heldout" / "shakespeare.txt").write_text(TEXT)
    return d


def python(code: str, cwd: Path) -> None:
    r = subprocess.run([*PYTHON, "-c", code], check=False, cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr


def run(cmd: str, cwd: Path, env_src: Path):
    import shlex

    args = shlex.split(cmd.replace("$SRC", str(env_src)))
    r = subprocess.run([*PYTHON, "-m", *args], check=False, cwd=cwd, capture_output=True, text=True,
                       timeout=600, input="hello\n" if args[1] == "chat" else None)
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{cmd}\n{r.stdout}\n{r.stderr}"
    return r


def test_every_tutorial_command_runs_as_written(src, tmp_path):
    md = (ROOT / "docs" / "tutorial.md").read_text()
    cmds = [c for b in fenced_blocks(md) for c in commands(b)]
    inline = re.findall(r"`(edgemoe chat [^`]+)`", md)  # the chat line sits in a bullet
    assert len(cmds) >= 5 and inline
    for cmd in cmds + inline:
        if "--vs-llama-cpp" in cmd:
            importlib.import_module("llama_cpp")
        if "--vs-onnx" in cmd:
            importlib.import_module("onnxruntime")
        run(cmd, tmp_path, src)
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
    python(fenced_blocks(md, "python")[0], tmp_path)


def test_every_readme_use_command_runs_as_written(src, tmp_path):
    md = (ROOT / "README.md").read_text()
    use = md[md.index("## Use"):]
    use = use[:use.index("\n## ", 5)]
    cmds = [c for b in fenced_blocks(use) for c in commands(b)]
    assert any(c.startswith("edgemoe export") for c in cmds) and len(cmds) >= 7
    (tmp_path / "held_out.txt").write_text(TEXT)
    for cmd in cmds:
        cmd = cmd.replace("path/to/hf-model", str(src))
        if "--vs-llama-cpp" in cmd:
            importlib.import_module("llama_cpp")
        run(cmd, tmp_path, src)
    python(fenced_blocks(use, "python")[0], tmp_path)  # on the model.emoe the commands wrote
