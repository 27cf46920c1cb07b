"""The calibration pass computes the same model as the reference, one layer at a time."""

import numpy as np
import pytest
from conftest import FAMILIES

import edgemoe
from edgemoe.reference import rms_norm


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_stream_reproduces_the_forward_pass(family, tiny_dir, tiny_emoe):
    from edgemoe_export.calibrate import calibrate
    from edgemoe_export.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_dir(family))
    seqs = [np.random.default_rng(i).integers(3, 320, 16) for i in range(3)]
    layers = list(calibrate(ckpt, seqs, group_size=32, show_progress=False))
    assert [c.layer for c in layers] == list(range(ckpt.spec.n_layers))
    g = ckpt.global_tensors()
    head = g.get("output.weight", g["token_embd.weight"])
    with edgemoe.load(tiny_emoe(family, 32), engine="numpy") as m:
        for s, h in zip(seqs, layers[-1].hidden_out):
            ours = rms_norm(h, g["output_norm.weight"], ckpt.spec.norm_eps) @ head.T
            ref = m.logits(s)
            assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
    cal = layers[0]
    k = ckpt.spec.top_k
    assert cal.freq.sum() == k * 48 and cal.expert_tokens.sum() == k * 48
    # Gram blocks are X^T X of exactly the routed tokens: their trace is the routed inputs' squared norm
    for gram in cal.gram_in.values():
        assert gram.shape == (ckpt.spec.hidden // 32, 32, 32)
        assert np.all(np.trace(gram, axis1=1, axis2=2) > 0)
