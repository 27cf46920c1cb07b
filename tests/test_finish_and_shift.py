"""Why a generation ended (finish_reason), the opt-in context shift and prompt truncation, on a tiny model.

The shift is checked against fresh runs: after each shift, every next token must be the argmax of a fresh prefill
of exactly the tokens the shift kept (the first n_keep, then the newest half of the rest).
"""

import numpy as np
import pytest

import edgemoe as em
from edgemoe.errors import ContextError, EdgeMoEError

ENGINES = [{"engine": "c"}, {"memory_budget": "64MB"}, {"engine": "numpy"}]
ENGINE_IDS = ["c", "c-stream", "numpy"]


@pytest.fixture(scope="module")
def olmoe(tiny_emoe):
    return tiny_emoe("olmoe", 32)


def _ids(n: int, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(3, 300, n)]


def _fresh_shifted_greedy(engine, prompt: list[int], n: int, max_ctx: int, n_keep: int) -> tuple[list[int], int]:
    """The tokens a shifting greedy generation must give, each from a fresh prefill of the shifted context."""
    ctx, out, shifts = list(prompt), [], 0
    while len(out) < n:
        tok = int(np.argmax(engine.prefill(ctx)))
        out.append(tok)
        ctx.append(tok)
        if len(out) < n and len(ctx) >= max_ctx:
            d = (len(ctx) - n_keep) // 2
            del ctx[n_keep:n_keep + d]
            shifts += 1
    return out, shifts


@pytest.mark.parametrize("kwargs", ENGINES, ids=ENGINE_IDS)
@pytest.mark.parametrize("n_keep", [0, 3])
def test_context_shift_continues_exactly_as_a_fresh_run_on_the_shifted_tokens(olmoe, kwargs, n_keep):
    prompt = _ids(10)
    with em.load(olmoe, max_ctx=16, **kwargs) as m:
        r = m.generate(prompt, max_new_tokens=30, stop_at_eos=False, context_shift=True, n_keep=n_keep,
                       return_info=True)
        want, shifts = _fresh_shifted_greedy(m._engine, prompt, 30, 16, n_keep)
        assert shifts >= 3 and r.context_shifts == shifts
        assert r.finish_reason == "length" and r.completion_tokens == 30
        assert r.text == m.tokenizer.decode(want)
        assert m.stats["context_shifts"] == shifts and m.stats["finish_reason"] == "length"


def test_finish_reasons_stop_length_context(olmoe):
    with em.load(olmoe, max_ctx=12) as m:
        r = m.generate(_ids(9), max_new_tokens=50, stop_at_eos=False, return_info=True)
        assert (r.finish_reason, r.completion_tokens, r.prompt_tokens) == ("context", 3, 9)
        r = m.generate(_ids(4), max_new_tokens=2, stop_at_eos=False, return_info=True)
        assert (r.finish_reason, r.completion_tokens) == ("length", 2)
        full = m.generate(_ids(4), max_new_tokens=6, stop_at_eos=False)
        r = m.generate(_ids(4), max_new_tokens=6, stop_at_eos=False, stop=full[2:4], return_info=True)
        assert r.finish_reason == "stop" and r.text == full[:full.find(full[2:4])]
        assert m.generate("x", max_new_tokens=0, return_info=True).finish_reason == "length"
        s = m.generate(_ids(9), max_new_tokens=50, stop_at_eos=False, stream=True)
        assert s.finish_reason is None
        text = "".join(s)
        assert s.finish_reason == "context" and s.info.text == text
        assert m.stats["finish_reasons"] == {"stop": 1, "length": 3, "context": 2}


def test_end_of_sequence_is_a_stop(olmoe):
    with em.load(olmoe) as m:
        prompt = _ids(6)
        first = int(np.argmax(m._engine.prefill(prompt)))
        m.spec.eos_token_id, saved = first, m.spec.eos_token_id  # the next token is "end of sequence"
        try:
            r = m.generate(prompt, max_new_tokens=5, return_info=True)
        finally:
            m.spec.eos_token_id = saved
        assert (r.text, r.finish_reason, r.completion_tokens) == ("", "stop", 0)


def test_a_long_prompt_is_refused_or_truncated(olmoe):
    with em.load(olmoe, max_ctx=16) as m:
        ids = _ids(40)
        with pytest.raises(ContextError, match="40 prompt tokens exceed the context of 16") as e:
            m.generate(ids)
        assert (e.value.n_tokens, e.value.max_ctx) == (40, 16)
        left = m.generate(ids, max_new_tokens=4, truncate="left", return_info=True, stop_at_eos=False)
        assert (left.prompt_tokens, left.prompt_tokens_truncated) == (12, 28)
        assert left.text == m.generate(ids[-12:], max_new_tokens=4, stop_at_eos=False)
        right = m.generate(ids, max_new_tokens=20, truncate="right", return_info=True, stop_at_eos=False)
        assert right.prompt_tokens == 8 and right.finish_reason == "context"  # at least half the context kept
        assert right.text == m.generate(ids[:8], max_new_tokens=20, stop_at_eos=False)
        with pytest.raises(EdgeMoEError, match="truncate 'middle'"):
            m.generate(ids, truncate="middle")
        with pytest.raises(EdgeMoEError, match="n_keep 15"):
            m.generate(ids[:4], context_shift=True, n_keep=15)


@pytest.mark.parametrize("kwargs", ENGINES, ids=ENGINE_IDS)
def test_a_batch_reports_finish_reasons_and_shifts_like_single_generations(olmoe, kwargs):
    prompts = [_ids(10, 1), _ids(3, 2), _ids(12, 3)]
    budget_seqs = {"n_seq": 3} if "memory_budget" in kwargs else {}
    with em.load(olmoe, max_ctx=16, **kwargs, **budget_seqs) as m:
        args = {"stop_at_eos": False, "context_shift": True, "n_keep": 2, "return_info": True}
        singles = [m.generate(p, max_new_tokens=25, **args) for p in prompts]
        batch = m.generate_batch(prompts, max_new_tokens=25, **args)
        assert [b.text for b in batch] == [s.text for s in singles]
        assert [(b.finish_reason, b.context_shifts) for b in batch] == \
            [(s.finish_reason, s.context_shifts) for s in singles]
        assert all(b.context_shifts >= 2 for b in batch)
        plain = m.generate_batch(prompts, max_new_tokens=25, stop_at_eos=False, return_info=True)
        assert [p.finish_reason for p in plain] == ["context", "context", "context"]
