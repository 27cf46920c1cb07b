"""The calibration pass computes the same model as the reference, one layer at a time."""

import numpy as np
import pytest
from conftest import FAMILIES

import edgemoe
from edgemoe.reference import rms_norm


@pytest.mark.parametrize("lengths", [(16, 16, 16), (16, 9, 23)], ids=["batched", "per-sequence"])
@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_stream_reproduces_the_forward_pass(family, lengths, tiny_dir, tiny_emoe):
    """Equal-length sequences take the batched attention path (several sequences per call), others one at a time:
    both must give the model's logits."""
    from edgemoe_export.calibrate import calibrate
    from edgemoe_export.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_dir(family))
    seqs = [np.random.default_rng(i).integers(3, 320, n) for i, n in enumerate(lengths)]
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
    assert cal.freq.sum() == k * sum(lengths) and cal.expert_tokens.sum() == k * sum(lengths)
    # Gram blocks are X^T X of exactly the routed tokens: their trace is the routed inputs' squared norm
    for gram in cal.gram_in.values():
        assert gram.shape == (ckpt.spec.hidden // 32, 32, 32)
        assert np.all(np.trace(gram, axis1=1, axis2=2) > 0)


def _batched_vs_single(ckpt, seq_len: int = 24, n_seqs: int = 3) -> float:
    """Worst relative difference over the layers between attention_block on [S, T, H] at once and per sequence."""
    from edgemoe.arch import dense_tensor_names
    from edgemoe.reference import attention_block, batched_mixer

    spec = ckpt.spec
    x = np.random.default_rng(7).normal(0, 1, (n_seqs, seq_len, spec.hidden)).astype(np.float32)
    worst = 0.0
    for layer in range(spec.n_layers):
        assert batched_mixer(spec, layer)
        w, names = ckpt.layer_dense(layer).__getitem__, dense_tensor_names(spec, layer)
        both = attention_block(spec, layer, x, w, names)
        one = np.stack([attention_block(spec, layer, x[i], w, names) for i in range(n_seqs)])
        assert both.shape == one.shape == x.shape and both.dtype == np.float32
        worst = max(worst, float(np.abs(both - one).max() / np.abs(one).max()))
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_attention_equals_one_sequence_at_a_time(family, tiny_dir):
    """The calibration's batched attention (edgemoe.reference.attention on [S, T, H]) is the per-sequence forward
    pass, which tests/test_parity_transformers.py holds to transformers."""
    from edgemoe_export.checkpoint import open_checkpoint

    assert _batched_vs_single(open_checkpoint(tiny_dir(family))) <= 1e-5


@pytest.mark.parametrize("builder", ["gptoss", "gemma4"])
def test_batched_attention_with_sinks_windows_and_global_rope(builder, tmp_path):
    """The attention features the four families above lack: gpt-oss's sinks, sliding window (5 < 24 tokens) and
    YaRN; Gemma-4's proportional RoPE, keys as values, value norm and per-head q/k norms."""
    from edgemoe_export.sources import open_source

    if builder == "gptoss":
        from tiny_gptoss import build_tiny_gptoss as build
    else:
        from tiny_gemma4 import build_tiny_gemma4 as build
    assert _batched_vs_single(open_source(build(tmp_path / builder))) <= 1e-5
