"""Container v1: layout, alignment, checksums, atomic writes."""

import struct

import numpy as np
import pytest

import edgemoe
from edgemoe.arch import ArchSpec
from edgemoe.container import EXPERT_ALIGN, PREAMBLE_SIZE, ContainerWriter, open_container


def small_spec():
    return ArchSpec(family="test", n_layers=1, hidden=8, vocab=16, n_heads=2, n_kv_heads=1, head_dim=4,
                    n_experts=2, top_k=1, expert_ffn=4)


def test_round_trip_dense_first_and_experts_page_aligned(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((4, 8)).astype(np.float16)
    with ContainerWriter(tmp_path / "m.emoe", small_spec(), {"bits": 32}) as w:
        w.add_tensor("token_embd.weight", a, "f32")
        w.add_tensor("blk.0.expert.0.ffn_gate.weight", b, "f16", kind="expert")
        w.add_tensor("blk.0.expert.1.ffn_gate.weight", b, "f16", kind="expert")
    c = open_container(tmp_path / "m.emoe")
    assert np.array_equal(c.array("token_embd.weight"), a) and np.array_equal(c.array("blk.0.expert.1.ffn_gate.weight"), b)
    dense, e0, e1 = (c.tensors[n] for n in ("token_embd.weight", "blk.0.expert.0.ffn_gate.weight",
                                             "blk.0.expert.1.ffn_gate.weight"))
    assert dense.offset >= PREAMBLE_SIZE and dense.offset < e0.offset < e1.offset
    assert e0.offset % EXPERT_ALIGN == 0 and e1.offset % EXPERT_ALIGN == 0
    assert c.metadata == {"bits": 32} and c.spec.n_experts == 2
    c.close()


def test_failed_write_leaves_no_file(tmp_path):
    out = tmp_path / "m.emoe"
    with pytest.raises(RuntimeError), ContainerWriter(out, small_spec()) as w:
        w.add_tensor("x", np.zeros(4, np.float32), "f32")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_crc32_of_native_core_equals_zlib():
    import zlib

    from edgemoe import _native

    data = np.random.default_rng(1).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    assert _native.crc32(data) == zlib.crc32(data)
    assert _native.version() == edgemoe.__version__


def test_preamble_is_documented_layout(tmp_path):
    with ContainerWriter(tmp_path / "m.emoe", small_spec()) as w:
        w.add_tensor("x", np.zeros(4, np.float32), "f32")
    head = (tmp_path / "m.emoe").read_bytes()[:28]
    magic, version, index_offset, index_nbytes, _ = struct.unpack("<4sIQQI", head)
    assert magic == b"EMOE" and version == 1 and index_offset + index_nbytes == (tmp_path / "m.emoe").stat().st_size


def test_numpy_q8_0_quantizer_is_byte_identical_to_gguf_py():
    import gguf

    from edgemoe.quant import dequantize_q8_0, quantize_q8_0

    w = np.random.default_rng(3).standard_normal((48, 256)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    ours = quantize_q8_0(w)
    assert ours.tobytes() == gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).tobytes()
    assert np.abs(dequantize_q8_0(ours, w.shape) - w).max() <= np.abs(w).max() / 127  # half a step per block max
