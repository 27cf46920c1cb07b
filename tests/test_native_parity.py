"""The C engine end to end: HF checkpoint -> export -> container -> edgemoe.load(engine="c") == transformers, and the
C engine == the NumPy engine on the same container (f32, f16 and Q8_0 dense storage)."""

import importlib

import numpy as np
import pytest
from conftest import FAMILIES, hf_logits, rel_err

import edgemoe

importlib.import_module("edgemoe._native")
importlib.import_module("edgemoe_export")

IDS = np.random.default_rng(0).integers(3, 320, 24)


@pytest.mark.parametrize("family", FAMILIES)
def test_c_engine_fp32_container_matches_transformers(family, tiny_dir, tiny_emoe):
    with edgemoe.load(tiny_emoe(family, 32), engine="c", threads=2) as m:
        assert m.engine_name == "c"
        ours = m.logits(IDS)
    assert rel_err(ours, hf_logits(tiny_dir(family), IDS)) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_c_engine_fp16_container_matches_transformers_on_rounded_weights(family, tiny_dir, tiny_emoe):
    with edgemoe.load(tiny_emoe(family, 16), engine="c") as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_logits(tiny_dir(family), IDS, round_fp16=True)) <= 1e-4


@pytest.mark.parametrize("family", ["qwen2moe", "olmoe"])
def test_c_engine_generate_equals_numpy_engine(family, tiny_emoe):
    prompt = [5, 17, 33, 101]
    outs = []
    for engine in ("c", "numpy"):
        with edgemoe.load(tiny_emoe(family, 32), engine=engine) as m:
            outs.append(m.generate(prompt, max_new_tokens=8, stop_at_eos=False))
    assert outs[0] == outs[1]
