"""MWQ bit planes: packing, fitting quality, the MSB identity, container v2, export and runtime precision."""

import itertools
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import edgemoe
from edgemoe.arch import ArchSpec
from edgemoe.container import EXPERT_ALIGN, PLANE_ALIGN, ContainerWriter, open_container
from edgemoe.errors import EdgeMoEError, FormatError
from edgemoe.mwq import bits_per_weight, dequantize, pack_codes, pack_signs, plane_nbytes, unpack_codes, unpack_signs

CALIB_TEXT = ("the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. "
              "a stitch in time saves nine; all that glitters is not gold. ") * 60


def mwq():
    from edgemoe_export import mwq as m

    return m


def weights(kind: str, out=64, in_=128, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return (0.05 * rng.standard_normal((out, in_))).astype(np.float32)
    # trained-like: heavy tails (Student-t, 3 degrees of freedom) and a few large channels
    w = 0.05 * rng.standard_t(3, (out, in_))
    w[:, rng.choice(in_, 4, replace=False)] *= 4
    return w.astype(np.float32)


def gram_of(in_, g, n=4000, seed=1):
    """Gram blocks of anisotropic inputs (channel scales spread over ~2 orders of magnitude)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, in_)) * np.exp(rng.standard_normal(in_))
    xb = x.reshape(n, in_ // g, g)
    return np.einsum("ngi,ngj->gij", xb, xb), x


# --- the byte layout ------------------------------------------------------------------------------------------
def test_packing_round_trip_and_bit_order():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        q = rng.integers(0, 1 << bits, 4096).astype(np.uint8)
        raw = pack_codes(q, bits)
        assert raw.nbytes == 4096 * bits // 8 and np.array_equal(unpack_codes(raw, bits, 4096), q)
    # 2-bit: code j of a byte in bits 2j..2j+1 (little-endian within the byte)
    assert pack_codes(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_codes(np.array([0xA, 0x5]), 4).tolist() == [0x5A]
    # signs: bit j of a byte = weight j, 1 -> +1
    signs = np.array([1, -1, -1, 1, -1, -1, -1, 1])
    assert pack_signs(signs).tolist() == [0b10001001]
    b = np.where(rng.random(1000) < 0.5, 1.0, -1.0)
    assert np.array_equal(unpack_signs(pack_signs(b), 1000), b)


def test_plane_sizes_and_bits_per_weight():
    assert plane_nbytes(1, 256, 512, 2, 128) == 256 * 4 * 4 + 256 * 512 // 4
    assert plane_nbytes(2, 256, 512, 2, 128) == 256 * 4 * 2 + 256 * 512 // 8
    assert bits_per_weight(1, 2, 128) == 2.25 and bits_per_weight(2, 2, 128) == 1.125
    assert sum(bits_per_weight(p, 2, 128) for p in (1, 2, 3)) == 4.5  # = Q4_0
    with pytest.raises(ValueError, match="does not divide"):
        plane_nbytes(1, 4, 40, 2, 16)


# --- fitting quality -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gauss", "student_t"])
@pytest.mark.parametrize("weighted", [False, True])
def test_error_shrinks_monotonically_with_k(kind, weighted):
    m = mwq()
    g = 32
    W = weights(kind)
    gram, x = gram_of(W.shape[1], g)
    qm = m.quantize_matrix(W, gram if weighted else None, base_bits=2, total_bits=8, group_size=g)
    assert qm.n_planes == 7 and qm.weighted == weighted
    w_err = [m.reconstruction_error(W, qm.dequantize(k), gram, g) for k in range(1, 8)]
    u_err = [m.reconstruction_error(W, qm.dequantize(k), None, g) for k in range(1, 8)]
    act_err = [np.linalg.norm((W - qm.dequantize(k)) @ x.T) for k in range(1, 8)]
    assert all(b < a for a, b in itertools.pairwise(w_err)), w_err
    assert all(b < a for a, b in itertools.pairwise(u_err)), u_err
    assert all(b < a for a, b in itertools.pairwise(act_err)), act_err
    # nesting costs little: every prefix of the 8-bit export is within 1.5x of independent RTN at those bits in
    # the error it was fitted for, and at 4 bits the exported-at-4 planes are no worse than RTN-4
    metric = gram if weighted else None
    for k in range(1, 7):
        rtn = m.reconstruction_error(W, m.rtn_fake_quant(W, k + 1, g), metric, g)
        assert m.reconstruction_error(W, qm.dequantize(k), metric, g) <= 1.5 * rtn
    q4 = m.quantize_matrix(W, metric, base_bits=2, total_bits=4, group_size=g)
    assert m.reconstruction_error(W, q4.dequantize(), metric, g) <= m.reconstruction_error(
        W, m.rtn_fake_quant(W, 4, g), metric, g)


def test_weighted_fit_beats_weight_only_on_the_activation_error():
    m = mwq()
    W, g = weights("student_t"), 32
    gram, x = gram_of(W.shape[1], g)
    for bits in (2, 3, 4):
        a = m.quantize_matrix(W, gram, 2, bits, g).dequantize()
        b = m.quantize_matrix(W, None, 2, bits, g).dequantize()
        assert np.linalg.norm((W - a) @ x.T) < np.linalg.norm((W - b) @ x.T)


@pytest.mark.parametrize("base_bits", [2, 4])
def test_msb_nesting_is_exactly_the_plane_format(base_bits):
    """w = s * ((q8 >> (8-r)) << (8-r) + 2^(7-r) - z) at r bits equals dequantizing r - b1 + 1 planes."""
    m = mwq()
    g = 16
    W = weights("student_t", 32, 64)
    Wg = W.astype(np.float64).reshape(32, 4, g)
    planes, q8, s, lo = m._fit_msb(Wg, base_bits, 8 - base_bits + 1)
    qm = m.quantize_matrix(W, None, base_bits, 8, g, nesting="msb")
    assert all(np.array_equal(a, b) for a, b in zip(planes, qm.planes))
    q8 = q8.astype(np.int64)
    for r in range(base_bits, 9):
        direct = s[:, :, None] * (((q8 >> (8 - r)) << (8 - r)) + 2.0 ** (7 - r)) + lo[:, :, None]
        ours = dequantize(qm.planes, r - base_bits + 1, 32, 64, base_bits, g)
        np.testing.assert_allclose(ours, direct.reshape(32, 64), rtol=0, atol=1e-6 * np.abs(W).max())
    # at 8 bits every weight is within half a bin (s / 2, s = group range / 256) of its value, plus the shift of the
    # bins by the float16 rounding of m1 (at most 2^-11 |m1|)
    m1 = np.frombuffer(qm.planes[0][2 * 128 : 4 * 128].tobytes(), np.float16).astype(np.float64).reshape(32, 4)
    err = np.abs(W - qm.dequantize()).reshape(32, 4, g)
    assert np.all(err <= (s / 2 + np.abs(m1) * 2.0 ** -11)[:, :, None] * 1.001 + 1e-7)


def test_quantizer_rejects_bad_parameters():
    m = mwq()
    W = weights("gauss", 8, 40)
    with pytest.raises(EdgeMoEError, match="group-size"):
        m.quantize_matrix(W, None, 2, 4, 16)
    with pytest.raises(EdgeMoEError, match="--bits 9"):
        m.quantize_matrix(W, None, 2, 9, 8)
    with pytest.raises(EdgeMoEError, match="--base-bits 3"):
        m.quantize_matrix(W, None, 3, 4, 8)
    assert m.choose_group_size([64, 40]) == 8 and m.choose_group_size([256, 384]) == 128
    with pytest.raises(EdgeMoEError, match="--group-size 8"):
        m.choose_group_size([64, 40], 128)


# --- container v2 --------------------------------------------------------------------------------------------
def small_spec():
    return ArchSpec(family="test", n_layers=1, hidden=64, vocab=16, n_heads=2, n_kv_heads=1, head_dim=4,
                    n_experts=2, top_k=1, expert_ffn=24)


def write_mwq(path, total_bits=5):
    m = mwq()
    qms = {}
    with ContainerWriter(path, small_spec(), {"bits": total_bits}) as w:
        w.add_tensor("token_embd.weight", np.ones((16, 64), np.float32), "f32")
        for e in range(2):
            name = f"blk.0.expert.{e}.ffn_gate.weight"
            qm = m.quantize_matrix(weights("gauss", 24, 64, seed=e), None, 2, total_bits, 8)
            w.add_planes(name, qm.planes, qm.shape, quant=qm.quant_params())
            qms[name] = qm
    return qms


def test_planes_round_trip_layout_and_version(tmp_path):
    qms = write_mwq(tmp_path / "m.emoe")
    assert struct.unpack("<4sI", (tmp_path / "m.emoe").read_bytes()[:8]) == (b"EMOE", 2)
    c = open_container(tmp_path / "m.emoe")
    assert c.version == 2
    for name, qm in qms.items():
        t = c.tensors[name]
        assert t.dtype == "mwq" and t.kind == "expert" and t.offset % EXPERT_ALIGN == 0 and t.n_planes == 4
        assert t.quant["base_bits"] == 2 and t.quant["group_size"] == 8 and t.quant["nesting"] == "mwq"
        assert [p["bits"] for p in t.planes] == [2, 1, 1, 1]
        for a, b in zip(t.planes, t.planes[1:]):  # in order, each 64-byte aligned: precision k is one range
            assert a["offset"] + a["nbytes"] <= b["offset"] < a["offset"] + a["nbytes"] + PLANE_ALIGN
            assert b["offset"] % PLANE_ALIGN == 0
        assert t.planes[-1]["offset"] + t.planes[-1]["nbytes"] == t.offset + t.nbytes
        for k in range(1, 5):
            views = c.planes(name, k)
            assert len(views) == k and all(np.array_equal(v, p) for v, p in zip(views, qm.planes))
            np.testing.assert_array_equal(dequantize(views, k, 24, 64, 2, 8), qm.dequantize(k))
        with pytest.raises(FormatError, match="cannot read 5"):
            c.planes(name, 5)
    c.close()


def test_corrupted_plane_is_reported_when_read(tmp_path):
    p = tmp_path / "m.emoe"
    write_mwq(p)
    name = "blk.0.expert.1.ffn_gate.weight"
    c = open_container(p)
    plane3 = c.tensors[name].planes[2]
    c.close()
    data = bytearray(p.read_bytes())
    data[plane3["offset"] + 7] ^= 0x10
    bad = tmp_path / "bad.emoe"
    bad.write_bytes(bytes(data))
    c = open_container(bad, verify=False)
    assert len(c.planes(name, 2)) == 2  # the damaged plane is not read at k = 2
    with pytest.raises(FormatError, match=rf"plane 3 of 4 of tensor '{name}'") as e:
        c.planes(name, 3)
    assert "checksum mismatch" in str(e.value) and "bad.emoe" in str(e.value)
    c.close()
    with pytest.raises(FormatError, match=rf"plane 3 of 4 of tensor '{name}'"):
        open_container(bad)  # full verification at open names the plane too


def test_v1_containers_still_load(tiny_emoe):
    path = tiny_emoe("olmoe", 32)
    assert struct.unpack("<4sI", path.read_bytes()[:8]) == (b"EMOE", 1)
    with edgemoe.load(path, engine="numpy") as m:
        assert m.container.version == 1 and m.precision is None
        assert np.isfinite(m.logits([3, 4, 5])).all()
        with pytest.raises(EdgeMoEError, match="needs MWQ experts"):
            edgemoe.load(path, engine="numpy", precision=2)


def test_unknown_version_is_refused(tmp_path):
    write_mwq(tmp_path / "m.emoe")
    data = bytearray((tmp_path / "m.emoe").read_bytes())
    data[4:8] = struct.pack("<I", 3)
    (tmp_path / "v3.emoe").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="version 3"):
        open_container(tmp_path / "v3.emoe")


# --- export and runtime precision ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(CALIB_TEXT)
    return p


@pytest.fixture(scope="module")
def mwq8(tiny_dir, calib_file, tmp_path_factory):
    """olmoe exported with 8 MWQ bits (7 planes) and fp32 dense weights: the experts are the only difference."""
    from edgemoe_export import export

    out = tmp_path_factory.mktemp("mwq") / "olmoe_mwq8.emoe"
    return export(tiny_dir("olmoe"), out, bits=8, dense_bits=32, calib=calib_file, calib_tokens=2048,
                  show_progress=False)


def test_logits_approach_fp32_as_k_grows(mwq8, tiny_emoe):
    ids = np.random.default_rng(0).integers(3, 300, 64)
    with edgemoe.load(tiny_emoe("olmoe", 32), engine="numpy") as ref_model:
        ref = ref_model.logits(ids)
        # the same model with every expert rounded to nearest on an 8-bit grid per group (RTN-8, the same group size)
        g = open_container(mwq8, verify=False).metadata["group_size"]
        eng = ref_model._engine
        for name, t in ref_model.container.tensors.items():
            if t.kind == "expert":
                eng._cache[name] = mwq().rtn_fake_quant(eng.weight(name), 8, g)
        rtn8 = ref_model.logits(ids)

    def err(a):
        """Median over positions of the relative RMS logit error: robust to the rare position where a tiny weight
        change flips a near-tied routing decision (those jump by O(1) at any precision, RTN-8 included)."""
        return float(np.median(np.sqrt(((a - ref) ** 2).mean(axis=1) / (ref ** 2).mean(axis=1))))

    errs = []
    for k in range(1, 8):
        with edgemoe.load(mwq8, engine="numpy", precision=k) as m:
            assert m.engine_name == "numpy" and m.precision == k
            errs.append(err(m.logits(ids)))
    assert all(b < a for a, b in itertools.pairwise(errs)), errs
    # Bound at k = 7 (8 bits). An 8-bit grid over a group's range r has step r/255, so each weight moves by at most
    # half a step, RMS step/sqrt(12); RTN-8 realizes exactly that perturbation, and `rtn8` is what it does to these
    # logits (to first order the logit error is linear in the weight error while no routing decision flips). MWQ's
    # 8-bit prefix is fitted for every prefix at once, not only the last: its RMS weight error at k = 7 is up to ~1.6x
    # RTN-8's (measured on these tiny models), so we allow 2x RTN-8's logit error, plus an absolute 1e-4 for the
    # float32 noise of the dequantization and the forward pass.
    assert errs[-1] <= 2 * err(rtn8) + 1e-4, (errs, err(rtn8))
    assert errs[0] > 10 * errs[-1]  # and 2 bits really is coarser


SMALL_MOE = Path(__file__).resolve().parents[1] / "export" / "assets" / "small-moe"


@pytest.mark.skipif(not (SMALL_MOE / "model.safetensors").exists() or not (SMALL_MOE / "calib.txt").exists(),
                    reason="the trained small model is not shipped in this checkout")
def test_trained_model_at_8_bits_stays_within_the_rtn8_bound(tmp_path):
    """The same derivation as above, on the trained small model (group size 128, calibration on its calib.txt)."""
    from edgemoe_export import export

    ref_path = export(SMALL_MOE, tmp_path / "f32.emoe", bits=32, show_progress=False)
    out = export(SMALL_MOE, tmp_path / "mwq8.emoe", bits=8, dense_bits=32, calib_tokens=2048, show_progress=False)
    text = (SMALL_MOE / "heldout" / "shakespeare.txt").read_text(encoding="utf-8")[:4000]
    with edgemoe.load(ref_path, engine="numpy") as m:
        ids = m.tokenizer.encode(text)[:96]
        ref = m.logits(ids)
        eng = m._engine
        for name, t in m.container.tensors.items():
            if t.kind == "expert":
                eng._cache[name] = mwq().rtn_fake_quant(eng.weight(name), 8, 128)
        rtn8 = m.logits(ids)

    def err(a):
        return float(np.median(np.sqrt(((a - ref) ** 2).mean(axis=1) / (ref ** 2).mean(axis=1))))

    errs = []
    for k in (1, 3, 7):
        with edgemoe.load(out, engine="numpy", precision=k) as m:
            errs.append(err(m.logits(ids)))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] <= 2 * err(rtn8) + 1e-4, (errs, err(rtn8))


def test_export_bits4_default_dense_q8_and_precision_checks(tiny_dir, calib_file, tmp_path):
    from edgemoe_export import export

    src = tmp_path / "qwen2moe"
    shutil.copytree(tiny_dir("qwen2moe"), src)
    shutil.copy(calib_file, src / "calib.txt")  # a checkpoint's own calib.txt is the default calibration text
    out = export(src, tmp_path / "q.emoe", bits=4, calib_tokens=512, show_progress=False)
    c = open_container(out)
    md = c.metadata
    assert md["bits"] == 4 and md["base_bits"] == 2 and md["nesting"] == "mwq" and md["calib_source"] == "calib.txt"
    assert md["group_size"] == 8 and md["dense_bits"] == 8 and md["mwq_planes"] == 3  # expert_ffn = 40: g = 8
    assert c.tensors["blk.0.attn_q.weight"].dtype == "q8_0"
    assert "blk.0.ffn_down_shexp.weight" in md["dense_f16_fallback"]  # 56 inputs: not a multiple of 32
    # fallback to the weight-only error is recorded per expert and matches the planes' own record
    for e in range(6):
        prefix = f"blk.0.expert.{e}"
        below = md["expert_calib_tokens"][prefix] < md["mwq_min_tokens"]
        assert (prefix in md["mwq_weight_only_experts"]) == below
        assert c.tensors[prefix + ".ffn_up.weight"].quant["weighted"] == (not below)
    c.close()
    ids = [5, 9, 17, 33, 65, 129]
    for k in (1, 2, 3):
        with edgemoe.load(out, engine="numpy", precision=k) as m:
            ref = m.logits(ids)
        # auto: the C engine when it is built and runs MWQ experts, else a clean fall back to NumPy
        with edgemoe.load(out, engine="auto", precision=k) as m:
            got = m.logits(ids)
            if m.engine_name == "numpy":
                np.testing.assert_array_equal(got, ref)
            else:  # the C core quantizes activations to int8 (Q8_0 dense, plane kernels): the tolerance of
                # tests/test_native_forward.py for unquantized-activation references, median token within 5e-2
                assert m.engine_name == "c"
                per_token = np.sqrt(((got - ref) ** 2).mean(axis=1) / (ref ** 2).mean(axis=1))
                assert np.median(per_token) <= 5e-2, (k, per_token)
    for bad in (0, 4, 1.5):
        with pytest.raises(EdgeMoEError, match=r"choose 1\.\.3 \(2\.\.4 bits\)"):
            edgemoe.load(out, engine="numpy", precision=bad)


def test_cli_export_msb_and_info(tiny_dir, tmp_path, capsys):
    from edgemoe.cli import main

    out = tmp_path / "m.emoe"
    assert main(["export", str(tiny_dir("mixtral")), "-o", str(out), "--bits", "4", "--nesting", "msb",
                 "--dense-bits", "16", "-q"]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MWQ experts: 3 planes (base 2 bits + 2 residual), group 8, nesting msb" in text
    assert "plane 1 (2 bits)" in text and "6.000 bits/weight" in text  # g = 8: 2 + 32/8 bits
    assert main(["export", str(tiny_dir("mixtral")), "-o", str(out), "--bits", "4", "--group-size", "16"]) == 1
    assert "--group-size 8" in capsys.readouterr().err
