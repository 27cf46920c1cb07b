"""The small things a new user reads: ppl's progress, the routing heatmap's axes and colour bar, the bench table's
file per engine, sizes in the units typed, ignore rules for what the tutorial writes."""

import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from subprocess_python import PYTHON

from edgemoe.bench import BenchResult, format_table
from edgemoe.png import CHAR_H, colour, draw_text, labelled_heatmap, text_width, write_png
from edgemoe.units import format_size_like

ROOT = Path(__file__).resolve().parent.parent


def edgemoe(cwd, *args):
    return subprocess.run([*PYTHON, "-m", "edgemoe", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def read_png(path) -> np.ndarray:
    """A minimal reader for the PNGs png.write_png writes (8-bit RGB, filter 0 on every row)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(tag + body) == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if tag == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_the_heatmap_has_cells_labels_and_a_colour_bar(tmp_path):
    u = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 1.0]])
    at: dict = {}
    write_png(tmp_path / "h.png", labelled_heatmap(u, "usage", layout=at))
    img = read_png(tmp_path / "h.png")  # what was written, read back
    left, top, cw, ch = at["left"], at["top"], at["cell_w"], at["cell_h"]
    for r in range(3):  # row = layer, column = expert, colour = value / max, the whole cell
        for c in range(4):
            cell = img[top + r * ch:top + (r + 1) * ch, left + c * cw:left + (c + 1) * cw]
            assert (cell == colour(u[r, c] / u.max())).all(), (r, c)
        band = img[top + r * ch:top + (r + 1) * ch, :left - 2]  # its layer number, in ink, left of the row
        assert (band.sum(axis=-1) < 300).any(), r
    for c in range(4):  # each expert number under its column
        below = img[top + 3 * ch + 2:top + 3 * ch + 2 + 2 * CHAR_H, left + c * cw:left + (c + 1) * cw]
        assert (below.sum(axis=-1) < 300).any(), c
    bar = img[top:top + 3 * ch, at["bar_x"]]  # the colour bar: the maximum at the top, 0 at the bottom
    assert (bar[0] == colour(1.0)).all() and (bar[-1] == colour(0.0)).all()
    assert (img[:top - 2].sum(axis=-1) < 300).any()  # a title above the grid


def test_text_is_drawn_from_the_font():
    img = np.full((20, 200, 3), 255, np.uint8)
    draw_text(img, 0, 0, "1")
    ink = np.argwhere(img.sum(axis=-1) < 300)
    assert ink[:, 1].max() < text_width("1") and ink[:, 0].max() < CHAR_H
    two = np.full((20, 200, 3), 255, np.uint8)
    draw_text(two, 0, 0, "7")
    assert not np.array_equal(img, two)


def test_analyze_writes_the_labelled_heatmap_and_explains_its_metrics(tmp_path, tiny_emoe):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be that is the question " * 30)
    r = edgemoe(tmp_path, "analyze", tiny_emoe("olmoe", 32), "--text", text, "--max-tokens", "96", "--ctx", "32",
                "--heatmap", tmp_path / "h.png")
    assert r.returncode == 0, r.stderr
    assert "routing: 96/96 tokens" in r.stderr  # progress, on stderr
    img = read_png(tmp_path / "h.png")
    assert img.shape[1] > 6 * 8 and img.shape[0] > 2 * 8
    r = edgemoe(tmp_path, "analyze", "--help")
    help_text = " ".join(r.stdout.split())
    assert "SCH segment cache hit rate" in help_text and "SRP segment routing best performance" in help_text


def test_ppl_reports_progress_unless_quiet(tmp_path, tiny_emoe):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    model = tiny_emoe("olmoe", 32)
    r = edgemoe(tmp_path, "ppl", model, "--text", text, "--ctx", "32", "--max-tokens", "128")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("perplexity: ")]
    assert len(lines) == 4 and lines[-1].startswith("perplexity: 128/128 tokens (100%")
    assert r.stdout.startswith("perplexity ") and "over 128 tokens" in r.stdout
    r = edgemoe(tmp_path, "ppl", model, "--text", text, "--ctx", "32", "--max-tokens", "128", "-q")
    assert r.returncode == 0 and r.stderr == ""


def test_the_bench_table_names_the_file_each_engine_ran():
    rs = [BenchResult("edgemoe", "pp8", 8, 0, 1, [10.0, 12.0]), BenchResult("llama.cpp", "pp8", 8, 0, 1, [5.0, 6.0]),
          BenchResult("onnxruntime", "pp8", 8, 0, 1, [4.0, 4.0])]
    table = format_table(rs, {"edgemoe": "m.emoe", "llama.cpp": "m.gguf", "onnxruntime": "m-onnx/model.onnx"})
    rows = {ln.split("|")[2].strip(): ln.split("|")[1].strip() for ln in table.splitlines()[2:5]}
    assert rows == {"edgemoe": "m.emoe", "llama.cpp": "m.gguf", "onnxruntime": "m-onnx/model.onnx"}


@pytest.mark.parametrize("n, typed, shown", [(8_000_000, "8MB", "8.0 MB"), (10_000, "10KB", "10.0 KB"),
                                             (1536 * 2**20, "1.5GiB", "1.5 GiB"), (2_500_000_000, "2.5GB", "2.5 GB"),
                                             (3 * 2**20, None, "3.0 MiB")])
def test_sizes_come_back_in_the_units_typed(n, typed, shown):
    assert format_size_like(n, typed) == shown


def test_the_tutorials_outputs_are_ignored_by_git(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["routing.png", "small.routing.png", "small-onnx/model.onnx", "small.emoe", "small-f16.gguf"]
    r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", *paths], check=False, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(paths)
