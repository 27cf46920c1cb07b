"""The C MWQ search (native/src/mwq_fit.c via edgemoe_export.mwq_native) against the NumPy reference (`_fit_mwq`).

Same method, so the planes must agree except where float rounding decides a near-tie between candidates: the search
ranks candidates on float32 residuals, and the sums over a group are accumulated in a different order (NumPy's einsum
in float32, the C code in double). Where a near-tie flips, the C pick can be worse at one prefix and better at
another; measured on 36 random matrices the per-prefix error moved by at most 0.22 % (either way) and most matrices
had identical planes. So: at most 1 % of the plane bytes differ and per prefix k the C fit's error is within 1 % of
the reference's, on random weights, with random anisotropic Grams and with the trained small model's own weights and
calibration Grams.
"""

from pathlib import Path

import numpy as np
import pytest

from edgemoe.errors import EdgeMoEError

SMALL_MOE = Path(__file__).resolve().parents[1] / "export" / "assets" / "small-moe"


def weights(kind, out=96, in_=256, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return (0.05 * rng.standard_normal((out, in_))).astype(np.float32)
    w = 0.05 * rng.standard_t(3, (out, in_))
    w[:, rng.choice(in_, 4, replace=False)] *= 4
    return w.astype(np.float32)


def gram_of(in_, g, n=3000, seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, in_)) * np.exp(rng.standard_normal(in_))).astype(np.float32)
    xb = x.reshape(n, in_ // g, g).astype(np.float64)
    return np.einsum("ngi,ngj->gij", xb, xb)


def compare(W, gram, base_bits, bits, group):
    from edgemoe_export.mwq import quantize_matrix, reconstruction_error

    ref = quantize_matrix(W, gram, base_bits, bits, group, impl="numpy")
    new = quantize_matrix(W, gram, base_bits, bits, group, impl="c", threads=1)
    assert new.quant_params() == ref.quant_params()
    for k in range(1, ref.n_planes + 1):
        e_ref = reconstruction_error(W, ref.dequantize(k), gram, group)
        e_new = reconstruction_error(W, new.dequantize(k), gram, group)
        assert e_new <= e_ref * 1.01 + 1e-12, (k, e_new, e_ref)
    differ = sum(int((a != b).sum()) for a, b in zip(ref.planes, new.planes))
    total = sum(a.size for a in ref.planes)
    assert differ <= 0.01 * total, f"{differ} of {total} plane bytes differ: not the same method"
    return ref, new


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("base_bits,bits", [(2, 4), (2, 2), (2, 8), (4, 6), (8, 8)])
def test_c_fit_matches_the_reference_and_is_no_worse(kind, weighted, base_bits, bits):
    W = weights(kind)
    compare(W, gram_of(W.shape[1], 64) if weighted else None, base_bits, bits, 64)


@pytest.mark.skipif(not (SMALL_MOE / "model.safetensors").exists() or not (SMALL_MOE / "calib.txt").exists(),
                    reason="the trained small model is not shipped in this checkout")
def test_c_fit_on_the_trained_model_with_its_calibration_grams():
    from edgemoe_export.calibrate import calibrate, load_calibration_ids
    from edgemoe_export.sources import open_source

    ck = open_source(SMALL_MOE)
    seqs = load_calibration_ids(ck.tokenizer_json, SMALL_MOE / "calib.txt", 2048, 256, ck.spec.vocab)
    cal = next(iter(calibrate(ck, seqs, group_size=128, show_progress=False)))
    e = int(np.argmax(cal.expert_tokens))
    for m, gram in (("gate", cal.gram_in[e]), ("down", cal.gram_mid[e])):
        W = cal.experts[f"blk.0.expert.{e}.ffn_{m}.weight"].astype(np.float32)
        compare(W, gram, 2, 4, 128)


def test_threads_split_rows_without_changing_the_planes():
    from edgemoe_export.mwq import quantize_matrix

    W, gram = weights("heavy", out=67), gram_of(256, 64)  # 67 rows: uneven halves
    one = quantize_matrix(W, gram, 2, 5, 64, threads=1)
    two = quantize_matrix(W, gram, 2, 5, 64, threads=2)
    assert all(np.array_equal(a, b) for a, b in zip(one.planes, two.planes))


def test_bad_arguments_are_refused():
    from edgemoe_export import mwq_native
    from edgemoe_export.mwq import quantize_matrix

    W = weights("gauss", out=8, in_=64)
    with pytest.raises(EdgeMoEError, match="emoe_mwq_fit"):
        mwq_native.fit(W, None, 2, 9, 4, 64)  # 9 planes: more than the format has
    with pytest.raises(ValueError, match="impl"):
        quantize_matrix(W, None, 2, 4, 64, impl="fortran")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_the_gram_product_tiles_give_the_same_planes_bit_for_bit(group):
    """The Gram products' SIMD tiles (AVX-512 8 x 32 for groups of 32k, 6 x 16, AVX2 4 x 8) differ in how many rows
    and columns share a step, never in the FMA chain of an output: every ISA gives the same planes."""
    from edgemoe_export import mwq_native
    from edgemoe_export.mwq import _Metric

    from edgemoe import _native

    isas = [i for i in (_native.ISA_AVX2, _native.ISA_AVX512VNNI) if _native.isa_supported(i)]
    if len(isas) < 2:
        pytest.skip("needs a CPU with both AVX2 and AVX-512 to compare their tiles")
    W = weights("heavy", out=45, in_=256)  # 45 rows: a partial row block and tile remainders
    G32 = _Metric(gram_of(256, group), 256 // group, group).G32
    fits = [mwq_native.fit(W, G32, 2, 3, 4, group, threads=1, isa=i) for i in isas]
    flat = [[*f[:3], *(x for plane in f[3] for x in plane)] for f in fits]  # s1, m1, codes, (scale, signs) per plane
    assert len(flat[0]) == 7 and all(np.array_equal(a, b) for a, b in zip(*flat))
