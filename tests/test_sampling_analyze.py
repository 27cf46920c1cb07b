"""Sampling semantics on synthetic inputs with known answers (the routing-analysis metrics: tests/test_analyze.py)."""

import numpy as np
import pytest

from edgemoe.errors import EdgeMoEError
from edgemoe.sampling import SamplingParams, apply_repetition_penalty, sample


def test_greedy_is_argmax_and_seeded_sampling_is_reproducible():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(0), []) == 1
    p = SamplingParams(temperature=1.0)
    a = [sample(logits, p, np.random.default_rng(7), []) for _ in range(5)]
    b = [sample(logits, p, np.random.default_rng(7), []) for _ in range(5)]
    assert a == b


def test_top_k_1_top_p_tiny_and_min_p_high_all_reduce_to_greedy():
    logits = np.random.default_rng(1).standard_normal(100).astype(np.float32)
    best = int(np.argmax(logits))
    for params in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6),
                   SamplingParams(temperature=2.0, min_p=0.999)):
        draws = {sample(logits, params, np.random.default_rng(s), []) for s in range(20)}
        assert draws == {best}


def test_top_k_restricts_support():
    logits = np.arange(10, dtype=np.float32)
    draws = {sample(logits, SamplingParams(temperature=5.0, top_k=3), np.random.default_rng(s), []) for s in range(200)}
    assert draws == {7, 8, 9}


def test_repetition_penalty_follows_llama_cpp_sign_rule():
    out = apply_repetition_penalty(np.array([2.0, -2.0, 1.0], np.float32), [0, 1], 2.0, 64)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_bad_sampling_parameters_are_refused():
    with pytest.raises(EdgeMoEError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(EdgeMoEError, match="temperature"):
        SamplingParams(temperature=-1)
