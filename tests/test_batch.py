"""Batch decoding (issue 6, item 6): one model holds several sequences; a decode step of all of them is one block, so
an expert chosen by several sequences is read and run once.

Rows of a block are computed independently of one another in every C kernel (the activation quantization of Q8_0 /
MWQ is per row, the matmul partitions rows of the weights, attention is per token), and the streaming engine sums
each token's experts in the same order as the resident one, so a sequence's logits in a batch must equal its logits
decoded alone bit for bit: the tests compare with assert_array_equal, no tolerance.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

N = importlib.import_module("edgemoe._native")
if not hasattr(N, "open_streaming"):
    pytest.skip("this build of the C core has no streaming engine", allow_module_level=True)

from test_budget import write_container
from test_native_forward import SPECS, random_tensors

import edgemoe
from edgemoe.errors import EdgeMoEError

MAX_CTX = 64
PROMPT_LENGTHS = (5, 9, 3, 14)
STEPS = (8, 3, 8, 5)  # decode steps per sequence: the batch shrinks as sequences finish


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    cache: dict[tuple, Path] = {}

    def get(spec_name: str, expert_dtype: str = "f32") -> Path:
        key = (spec_name, expert_dtype)
        if key not in cache:
            spec = SPECS[spec_name]
            cache[key] = write_container(root / f"{spec_name}_{expert_dtype}.emoe", spec, random_tensors(spec),
                                         expert_dtype)
        return cache[key]

    return get


def minimum_budget(path: Path, n_seq: int, max_ctx: int = MAX_CTX, threads: int = 1) -> int:
    """The minimum the engine states for n_seq sequences."""
    with pytest.raises(N.BudgetError) as e:
        edgemoe.load(path, memory_budget=1, max_ctx=max_ctx, threads=threads, n_seq=n_seq)
    msg = str(e.value)
    return int(msg.split("below the minimum ")[1].split("(")[1].split(" bytes")[0])


def prompts_for(spec_name: str, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, SPECS[spec_name].vocab, n).tolist() for n in PROMPT_LENGTHS]


def decode_alone(engine, prompt: list[int], steps: int) -> list[np.ndarray]:
    """Greedy: the prompt's last logits, then each decoded token's logits (sequence 0, one token at a time)."""
    logits = [engine.prefill(prompt)]
    for _ in range(steps):
        logits.append(engine.decode(int(np.argmax(logits[-1]))))
    return logits


def decode_batched(engine, prompts: list[list[int]], steps) -> list[list[np.ndarray]]:
    """The same greedy decoding with every prompt in its own sequence slot and one decode_batch per step over the
    sequences not finished yet (passed in reverse slot order, so rows and slots are not the same numbers)."""
    logits = [[engine.prefill(p, seq=i)] for i, p in enumerate(prompts)]
    for step in range(max(steps)):
        seqs = [i for i in reversed(range(len(prompts))) if step < steps[i]]
        out = engine.decode_batch([int(np.argmax(logits[i][-1])) for i in seqs], seqs)
        assert out.shape == (len(seqs), engine.spec.vocab)
        for row, i in enumerate(seqs):
            logits[i].append(out[row])
    return logits


@pytest.mark.parametrize("budgeted", [False, True], ids=["resident", "budget"])
@pytest.mark.parametrize("spec_name,expert_dtype", [("olmoe", "f32"), ("olmoe", "q8_0"), ("olmoe", "mwq"),
                                                    ("qwen3moe", "mwq"), ("smallthinker", "f32"), ("merged", "mwq"),
                                                    ("dense_shared", "f16")])
def test_forward_batch_rows_are_bit_identical_to_decoding_alone(containers, spec_name, expert_dtype, budgeted):
    path = containers(spec_name, expert_dtype)
    prompts = prompts_for(spec_name)
    with edgemoe.load(path, max_ctx=MAX_CTX, threads=2) as ref:
        alone = [decode_alone(ref._engine, p, s) for p, s in zip(prompts, STEPS)]
    # under the budget's minimum for 4 sequences the cache holds one layer's top-k experts: every layer evicts
    budget = minimum_budget(path, 4, threads=2) if budgeted else None
    with edgemoe.load(path, max_ctx=MAX_CTX, threads=2, n_seq=4, memory_budget=budget) as m:
        assert m._engine.n_seq == 4
        batched = decode_batched(m._engine, prompts, STEPS)
        assert [m._engine.seq_n_past(i) for i in range(4)] == [n + s for n, s in zip(PROMPT_LENGTHS, STEPS)]
        assert m._engine.seq_cached_ids(1)[: PROMPT_LENGTHS[1]] == prompts[1]
        st = m.stats
    for a_seq, b_seq in zip(alone, batched):
        assert len(a_seq) == len(b_seq)
        for a, b in zip(a_seq, b_seq):
            np.testing.assert_array_equal(a, b)
    if budgeted:
        assert st["evictions"] > 0 and st["bytes_read"] > 0
        assert sum(st["budget_parts"].values()) <= budget
        assert st["budget_parts"]["kv_cache"] == 4 * minimum_kv_bytes(path)


def minimum_kv_bytes(path: Path) -> int:
    """One sequence's KV cache (f32) as the budget counts it."""
    spec = edgemoe.container.open_container(path, verify=False).spec
    return 2 * spec.n_layers * MAX_CTX * spec.n_kv_heads * spec.head_dim * 4


def test_sequences_are_independent_and_truncate_reset_per_sequence(containers):
    path = containers("olmoe", "q8_0")
    prompts = prompts_for("olmoe", seed=2)
    with edgemoe.load(path, max_ctx=MAX_CTX) as ref:
        alone = [decode_alone(ref._engine, p, 4) for p in prompts[:2]]
    with edgemoe.load(path, max_ctx=MAX_CTX, n_seq=2) as m:
        e = m._engine
        e.prefill(prompts[0], seq=0)
        e.prefill(prompts[1][:2], seq=1)
        e.truncate(1, seq=1)  # keep one position of sequence 1, then continue it
        np.testing.assert_array_equal(e.extend(prompts[1][1:], seq=1), alone[1][0])
        e.reset(seq=0)  # sequence 1 is untouched by resetting 0
        assert e.seq_n_past(0) == 0 and e.seq_n_past(1) == len(prompts[1])
        np.testing.assert_array_equal(e.prefill(prompts[0]), alone[0][0])
        np.testing.assert_array_equal(e.decode(int(np.argmax(alone[1][0])), seq=1), alone[1][1])


# ---- errors ----------------------------------------------------------------------------------------------------
def test_batch_errors_are_raised_with_a_message_and_advance_nothing(containers):
    path = containers("olmoe", "f32")
    with edgemoe.load(path, max_ctx=8, n_seq=3) as m:
        e = m._engine
        e.prefill([1, 2, 3], seq=0)
        e.prefill([4, 5, 6, 7, 8, 9, 10, 11], seq=1)  # sequence 1 fills its context
        with pytest.raises(EdgeMoEError, match="sequence 0 appears twice"):
            e.decode_batch([1, 2], [0, 0])
        with pytest.raises(EdgeMoEError, match=r"sequence 3 is outside 0\.\.2"):
            e.decode_batch([1, 2], [0, 3])
        with pytest.raises(EdgeMoEError, match=r"sequence -1 is outside 0\.\.2"):
            e._h.forward_batch(np.array([1], np.int32), np.array([-1], np.int32), None)
        with pytest.raises(EdgeMoEError, match="context full: sequence 1 holds max_ctx = 8"):
            e.decode_batch([1, 2], [0, 1])
        with pytest.raises(EdgeMoEError, match="outside the vocabulary"):
            e.decode_batch([1, 10_000], [0, 2])
        with pytest.raises(EdgeMoEError, match="2 tokens for 1 sequences"):
            e._h.forward_batch(np.array([1, 2], np.int32), np.array([0], np.int32), None)
        with pytest.raises(EdgeMoEError, match="sequence 7 is outside"):
            e.prefill([1], seq=7)
        with pytest.raises(EdgeMoEError, match="n_keep 5 is outside 0..3"):
            e.truncate(5, seq=0)
        assert [e.seq_n_past(i) for i in range(3)] == [3, 8, 0]  # no failed call advanced a sequence
        with pytest.raises(EdgeMoEError, match="n_seq 0 must be >= 1"):
            e.set_n_seq(0)
        e.decode_batch([5, 6], [2, 0])  # still usable
        assert [e.seq_n_past(i) for i in range(3)] == [4, 8, 1]


def test_budget_counts_the_kv_cache_of_every_sequence(containers):
    path = containers("olmoe", "mwq")
    one, four = minimum_budget(path, 1), minimum_budget(path, 4)
    assert four - one == 3 * minimum_kv_bytes(path)  # the KV caches of 3 more sequences, nothing else
    with pytest.raises(N.BudgetError, match="x 4 sequences"):
        edgemoe.load(path, memory_budget=four - 1, max_ctx=MAX_CTX, n_seq=4)
    with edgemoe.load(path, memory_budget=four, max_ctx=MAX_CTX, n_seq=2) as m:  # budget counts 2, not 4
        with pytest.raises(N.BudgetError, match="the memory budget counted 2 at load"):
            m._engine.set_n_seq(3)
        m._engine.set_n_seq(1)
        assert m._engine.n_seq == 1
    with pytest.raises(EdgeMoEError, match=r"n_seq[ =]0"):
        edgemoe.load(path, max_ctx=MAX_CTX, n_seq=0)


# ---- Model.generate_batch ----------------------------------------------------------------------------------------
SAMPLED = {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}


@pytest.fixture(scope="module")
def tiny_olmoe(tiny_emoe, tiny_dir, tmp_path_factory):
    """bits -> the tiny OLMoE exported with f32 experts (32) or MWQ planes and Q8_0 dense weights (4; MSB nesting:
    no calibration text needed)."""
    made: dict[int, Path] = {}

    def get(bits: int) -> Path:
        if bits == 32:
            return tiny_emoe("olmoe", 32)
        if bits not in made:
            from edgemoe_export import export

            made[bits] = export(tiny_dir("olmoe"), tmp_path_factory.mktemp("mwq") / f"olmoe_{bits}.emoe", bits=bits,
                                nesting="msb", show_progress=False)
        return made[bits]

    return get


@pytest.fixture(scope="module")
def text_prompts():
    return ["the quick brown fox", "once upon a time there was", "hello", "one two three four five six seven"]


def min_model_budget(path: Path, n_seq: int, max_ctx: int) -> int:
    return minimum_budget(path, n_seq, max_ctx=max_ctx)


@pytest.mark.parametrize("bits", [32, 4])
@pytest.mark.parametrize("where", ["c", "budget", "budget-2-slots", "numpy"])
def test_generate_batch_equals_generate_alone(tiny_olmoe, text_prompts, bits, where):
    """Each text of generate_batch is generate()'s for that prompt alone: greedy and sampled (one generator per
    prompt, seeded with `seed`), with stop strings and the end of the context ending sequences at different steps.
    "budget-2-slots": 4 prompts through 2 sequence slots (later prompts start when earlier ones finish)."""
    path = tiny_olmoe(bits)
    with edgemoe.load(path) as m:
        n_tok = [len(m.encode(p)) for p in text_prompts]
        i_long = int(np.argmax(n_tok))
        unbounded = m.generate(text_prompts[i_long], max_new_tokens=12, stop_at_eos=False)
    max_ctx = n_tok[i_long] + 6  # the longest prompt reaches the end of the context before max_new_tokens
    kw = {"engine": "numpy"} if where == "numpy" else {}
    with edgemoe.load(path, max_ctx=max_ctx, **kw) as ref:
        greedy = [ref.generate(p, max_new_tokens=12, stop_at_eos=False) for p in text_prompts]
        stop = greedy[1][len(greedy[1]) // 2:][:3]  # a string the second prompt's continuation contains
        stopped = [ref.generate(p, max_new_tokens=12, stop=stop, stop_at_eos=False) for p in text_prompts]
        sampled = [ref.generate(p, max_new_tokens=10, seed=7, **SAMPLED) for p in text_prompts]
    assert len(stopped[1]) < len(greedy[1]) and len(greedy[i_long]) < len(unbounded)  # both ways of ending
    if where.startswith("budget"):
        n_seq = 2 if where == "budget-2-slots" else 4
        kw = {"memory_budget": min_model_budget(path, n_seq, max_ctx), "n_seq": n_seq}
    with edgemoe.load(path, max_ctx=max_ctx, **kw) as m:
        assert m.generate_batch(text_prompts, max_new_tokens=12, stop_at_eos=False) == greedy
        assert m.generate_batch(text_prompts, max_new_tokens=12, stop=stop, stop_at_eos=False) == stopped
        assert m.generate_batch(text_prompts, max_new_tokens=10, seed=7, **SAMPLED) == sampled
        ids = [m.encode(p) for p in text_prompts]
        assert m.generate_batch(ids, max_new_tokens=12, stop_at_eos=False) == greedy  # token-id prompts
        assert m.generate_batch(text_prompts, max_new_tokens=0) == [""] * 4
        assert m.generate(text_prompts[0], max_new_tokens=12, stop_at_eos=False) == greedy[0]  # generate() after
        st = m.stats
        if where != "numpy":
            assert m._engine.n_seq == (kw.get("n_seq") or 4)  # without a budget it grew to the batch
        if where.startswith("budget"):
            assert st["evictions"] > 0


def test_generate_batch_bad_prompts(tiny_emoe):
    with edgemoe.load(tiny_emoe("olmoe", 32), max_ctx=32) as m:
        with pytest.raises(EdgeMoEError, match="prompt tokens \\(prompt 1\\)"):
            m.generate_batch(["hello", []])
        with pytest.raises(EdgeMoEError, match="list of prompts"):
            m.generate_batch("hello")
        with pytest.raises(EdgeMoEError, match="outside the vocabulary"):
            m.generate_batch([[1, 2], [10**9]])
        with pytest.raises(EdgeMoEError, match="max_new_tokens"):
            m.generate_batch(["hello"], max_new_tokens=-1)


# ---- what batching is for ----------------------------------------------------------------------------------------
def test_batching_reads_fewer_bytes_per_generated_token_under_a_budget(containers):
    """The same decode steps of the same 4 sequences under the same budget, one sequence at a time and as batches
    of 4: with the cache holding about one layer's experts, each step reads every expert its tokens route to, and
    a batch reads an expert chosen by several sequences once. Bytes read come from the cache's own counters
    (prefetch off: only demand reads, so the figure does not depend on timing)."""
    path = containers("olmoe", "f32")
    prompts, steps = prompts_for("olmoe", seed=3), 10
    budget = minimum_budget(path, 4)
    per_token = {}
    for batch in (1, 4):
        with edgemoe.load(path, memory_budget=budget, max_ctx=MAX_CTX, n_seq=4, prefetch=0) as m:
            e = m._engine
            toks = [int(np.argmax(e.prefill(p, seq=i))) for i, p in enumerate(prompts)]
            m.reset_stats()
            for _ in range(steps):
                for lo in range(0, 4, batch):
                    seqs = list(range(lo, lo + batch))
                    out = e.decode_batch([toks[i] for i in seqs], seqs)
                    for row, i in enumerate(seqs):
                        toks[i] = int(np.argmax(out[row]))
            st = m.stats
        assert st["tokens"] == 4 * steps
        per_token[batch] = st["bytes_read_per_token"]
    spec = SPECS["olmoe"]
    expert_bytes = 3 * spec.hidden * spec.expert_ffn * 4
    # batch 1 reads about top_k experts per MoE layer per token; a batch of 4 shares the experts of its tokens
    assert per_token[1] >= 0.9 * spec.top_k * spec.n_layers * expert_bytes
    assert per_token[4] < 0.8 * per_token[1], per_token
