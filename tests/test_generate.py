"""Model.generate / reset / KV-cache reuse / chat templates, on tiny random models.

KV reuse is compared bitwise with a fresh run for the C engines: the kept positions hold the keys and values a
fresh prefill computes (each row of a block is computed independently of the others, so block boundaries do not
change a bit), and the remaining tokens then see exactly the same inputs.
"""

import importlib
import shutil

import numpy as np
import pytest
from tiny_models import CHAT_TEMPLATE, add_chat_template  # tests/ is on sys.path (conftest.py)

import edgemoe as em
from edgemoe.chat_template import render_plain_transcript
from edgemoe.errors import EdgeMoEError
from edgemoe.sampling import SamplingParams, sample
from edgemoe.textstream import TextStream

PROMPT = "the quick brown fox jumps over"
SAMPLED = {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 1.2,
           "repeat_last_n": 16}
ENGINES = [{"engine": "c"}, {"memory_budget": "64MB"}, {"engine": "numpy"}]
ENGINE_IDS = ["c", "c-stream", "numpy"]


@pytest.fixture(scope="module")
def olmoe(tiny_emoe):
    return tiny_emoe("olmoe", 32)


def _ids(n: int, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(3, 300, n)]


# ---- sampling wired into generate ------------------------------------------------------------------------------
def test_generate_samples_like_a_fresh_loop_over_sample(olmoe):
    """generate's tokens are those of sample() with the same parameters and generator, each step on the logits of a
    fresh prefill of prompt + output (so the wiring of every parameter, the penalty's history and decode are
    checked at once)."""
    with em.load(olmoe) as m:
        prompt = m.encode(PROMPT)
        params, rng, out = SamplingParams(**SAMPLED), np.random.default_rng(5), []
        for _ in range(12):
            out.append(sample(m._engine.prefill(prompt + out), params, rng, prompt + out))
        m.reset()
        got = m.generate(PROMPT, max_new_tokens=12, seed=5, stop_at_eos=False, **SAMPLED)
        assert got == m.tokenizer.decode(out)


def test_sampling_with_a_seed_is_reproducible_and_seeds_differ(olmoe):
    with em.load(olmoe) as m:
        runs = {seed: [m.generate(PROMPT, max_new_tokens=16, seed=seed, stop_at_eos=False, **SAMPLED)
                       for _ in range(2)] for seed in range(4)}
        assert all(a == b for a, b in runs.values())
        assert len({a for a, _ in runs.values()}) > 1  # four seeds that all draw the same 16 tokens: not sampling


def test_greedy_is_the_argmax_chain(olmoe):
    with em.load(olmoe) as m:
        ids, out = m.encode(PROMPT), []
        for _ in range(8):
            out.append(int(np.argmax(m._engine.prefill(ids + out))))
        assert m.generate(ids, max_new_tokens=8, stop_at_eos=False) == m.tokenizer.decode(out)


def test_bad_generation_arguments_are_refused_at_call_time(olmoe):
    with em.load(olmoe, max_ctx=16) as m:
        for kwargs, match in [({"top_p": 0.0}, "top_p"), ({"temperature": -1}, "temperature"),
                              ({"min_p": 1.0}, "min_p"), ({"max_new_tokens": -1}, "max_new_tokens"),
                              ({"stop": 5}, "stop"), ({"stop": ["a", None]}, "stop")]:
            with pytest.raises(EdgeMoEError, match=match):
                m.generate("the", stream=True, **kwargs)  # raised before the first piece is asked for
        with pytest.raises(EdgeMoEError, match=r"37 prompt tokens exceed the context of 16 tokens"):
            m.generate(list(range(3, 40)), stream=True)
        assert m.generate("the", max_new_tokens=0) == ""


def test_generation_ends_when_the_context_is_full(olmoe):
    with em.load(olmoe, max_ctx=12) as m:
        m.generate(_ids(9), max_new_tokens=50, stop_at_eos=False)
        assert m.stats["decode_tokens"] == 2  # 9 prompt + 3 new = 12 positions: the third is never decoded


# ---- stop strings and streaming ------------------------------------------------------------------------------
def test_stop_strings_end_the_text_before_them_streaming_or_not(olmoe):
    with em.load(olmoe) as m:
        full = m.generate(PROMPT, max_new_tokens=40, stop_at_eos=False)
        assert len(full) > 20
        for stop in (full[10:13], [full[17:19], "never-generated"], full[10:13] + "never"):
            stops = [stop] if isinstance(stop, str) else stop
            cut = min((i for i in (full.find(s) for s in stops) if i >= 0), default=len(full))
            text = m.generate(PROMPT, max_new_tokens=40, stop_at_eos=False, stop=stop)
            pieces = list(m.generate(PROMPT, max_new_tokens=40, stop_at_eos=False, stop=stop, stream=True))
            assert text == full[:cut] and "".join(pieces) == text
            assert all(pieces)


def test_text_stream_holds_back_partial_stops_and_characters():
    """Byte tokens (decode = UTF-8 with replacement): no piece ends in half a character or in text that could begin
    the stop string; a false start is released as soon as it is decided."""
    text = "héllo wörld ENx then END rest"
    ts = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ["END"])
    pieces = []
    for b in text.encode():
        pieces.append(ts.push(b))
        if ts.stopped:
            break
    assert "".join(pieces) == "héllo wörld ENx then "
    assert "\ufffd" not in "".join(pieces)
    i = pieces.index("ENx")  # "E" and "EN" were held back, then released together when "x" ruled the stop out
    assert pieces[i - 2:i] == ["", ""] and ts.flush() == ""
    ts = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ["END"])
    assert [ts.push(b) for b in b"ab EN"] == ["a", "b", " ", "", ""] and ts.flush() == "EN"


def test_streaming_splits_no_multibyte_character(tmp_path, olmoe):
    """A tokenizer whose tokens are single bytes of multi-byte characters: pieces are still whole characters."""
    with em.load(olmoe) as m:
        vocab = m.tokenizer._tok.get_vocab()
        # byte-level BPE: "Ã" and "©" are the byte tokens 0xC3 and 0xA9 of "é"
        ids = [vocab["Ã"], vocab["©"]] * 3
        ts = TextStream(m.tokenizer.decode)
        pieces = [ts.push(i) for i in ids] + [ts.flush()]
        assert pieces == ["", "é", "", "é", "", "é", ""]


# ---- reset and KV-cache reuse --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"engine": "c"}, {"memory_budget": "64MB"}], ids=["c", "c-stream"])
def test_truncate_then_extend_equals_a_fresh_prefill_bitwise(olmoe, kwargs):
    ids = _ids(40)
    with em.load(olmoe, **kwargs) as m:
        e = m._engine
        fresh = e.prefill(ids[:30]).copy()
        e.prefill(ids[:5])
        for t in ids[5:25]:
            e.decode(t)
        assert e.cached_ids == ids[:25] and e.n_past == 25
        e.truncate(12)
        assert e.cached_ids == ids[:12] and e.n_past == 12
        assert np.array_equal(e.extend(ids[12:30]), fresh)
        with pytest.raises(EdgeMoEError, match=r"n_keep 31 is outside 0\.\.30"):
            e.truncate(31)
        e.truncate(0)
        assert e.n_past == 0 and np.array_equal(e.extend(ids[:30]), fresh)


@pytest.mark.parametrize("kwargs", ENGINES, ids=ENGINE_IDS)
def test_a_prompt_extending_the_cached_sequence_reuses_it(olmoe, kwargs):
    """Turn 1 leaves prompt + output (but the last sampled token) in the cache; turn 2's prompt starts with them:
    only the rest is run, and the text is that of a fresh model."""
    first = _ids(10)
    with em.load(olmoe, **kwargs) as m:
        m.generate(first, max_new_tokens=6, stop_at_eos=False, **SAMPLED)
        cached = m._engine.cached_ids
        assert len(cached) == 15 and cached[:10] == first
        second = cached + _ids(5, seed=1)
        m.reset_stats()
        reused = m.generate(second, max_new_tokens=8, stop_at_eos=False, **SAMPLED)
        assert m.stats["prompt_tokens_reused"] == 15 and m.stats["prefill_tokens"] == 5
        m.reset()
        assert m._engine.cached_ids == []
        m.reset_stats()
        fresh = m.generate(second, max_new_tokens=8, stop_at_eos=False, **SAMPLED)
        assert m.stats["prompt_tokens_reused"] == 0 and m.stats["prefill_tokens"] == 20
        assert reused == fresh


@pytest.mark.parametrize("kwargs", ENGINES, ids=ENGINE_IDS)
def test_the_same_prompt_again_reruns_only_its_last_token(olmoe, kwargs):
    ids = _ids(12, seed=2)
    with em.load(olmoe, **kwargs) as m:
        a = m.generate(ids, max_new_tokens=5, stop_at_eos=False)
        m.reset_stats()
        b = m.generate(ids, max_new_tokens=5, stop_at_eos=False)
        assert a == b and m.stats["prompt_tokens_reused"] == 11 and m.stats["prefill_tokens"] == 1
        # a prompt diverging at token 4 keeps only the first 4
        m.reset_stats()
        m.generate(ids[:4] + _ids(6, seed=3), max_new_tokens=1)
        assert m.stats["prompt_tokens_reused"] == 4


def test_logits_and_precision_changes_invalidate_the_cache(olmoe):
    ids = _ids(10)
    with em.load(olmoe) as m:
        m.generate(ids, max_new_tokens=3, stop_at_eos=False)
        m.logits(ids[:4])  # a fresh all-positions run
        assert m._engine.cached_ids == ids[:4]
        m._engine.set_isa("auto")  # other kernels: the kept keys/values would not be a fresh run's
        assert m._engine.cached_ids == [] and m._engine.n_past == 0


# ---- chat templates ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tiny_dir, tmp_path_factory):
    """The tiny OLMoE with CHAT_TEMPLATE in its tokenizer_config.json: (checkpoint dir, container)."""
    from edgemoe_export import export

    root = tmp_path_factory.mktemp("chat")
    src = add_chat_template(shutil.copytree(tiny_dir("olmoe"), root / "olmoe_chat"))
    return src, export(src, root / "chat.emoe", bits=32, show_progress=False)


CONVERSATIONS = [
    [{"role": "user", "content": "the quick brown fox"}],
    [{"role": "system", "content": "  answer briefly "}, {"role": "user", "content": "to be or not"},
     {"role": "assistant", "content": "that is the question"}, {"role": "user", "content": "é ü <&> \"q\""}],
]


def _hf_render(src, messages, add_generation_prompt=True):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(src)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(chat_model, messages, add_generation_prompt):
    src, path = chat_model
    with em.load(path) as m:
        assert m.chat_template == CHAT_TEMPLATE
        got = m.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == _hf_render(src, messages, add_generation_prompt)
    assert got.startswith("<s><|")  # bos_token reached the template


@pytest.mark.parametrize("layout", ["jinja-file", "named-list", "tojson"])
def test_other_template_layouts_are_exported_and_render_like_transformers(tiny_dir, tmp_path, layout):
    from edgemoe_export import export

    template = CHAT_TEMPLATE
    if layout == "tojson":  # transformers' tojson does not HTML-escape and keeps non-ASCII characters
        template = "{% for m in messages %}{{ m | tojson }}{{ m['content'] | tojson(indent=2) }}\n{% endfor %}"
    src = shutil.copytree(tiny_dir("olmoe"), tmp_path / "src")
    if layout == "named-list":
        add_chat_template(src, [{"name": "tool_use", "template": "{{ raise_exception('wrong one') }}"},
                                {"name": "default", "template": template}])
    else:
        add_chat_template(src, template, as_jinja_file=layout == "jinja-file")
    with em.load(export(src, tmp_path / "m.emoe", bits=32, show_progress=False)) as m:
        assert m.chat_template == template
        for messages in CONVERSATIONS:
            assert m.apply_chat_template(messages) == _hf_render(src, messages)


def test_template_errors_are_clear(chat_model):
    with em.load(chat_model[1]) as m:
        with pytest.raises(EdgeMoEError, match="the system message must come first"):
            m.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
        with pytest.raises(EdgeMoEError, match="messages must be a list"):
            m.apply_chat_template("hello")
        with pytest.raises(EdgeMoEError, match="message 0 must be a dict with a 'role'"):
            m.apply_chat_template([{"content": "no role"}])


def test_chat_uses_the_template_and_reuses_earlier_turns(chat_model):
    with em.load(chat_model[1]) as m:
        messages = [{"role": "user", "content": "the quick brown fox"}]
        reply = m.chat(messages, max_new_tokens=10)
        assert reply == m.generate(m.apply_chat_template(messages), max_new_tokens=10, stop=["</s>"])
        assert list(m.chat(messages, max_new_tokens=10, stream=True)) and \
            "".join(m.chat(messages, max_new_tokens=10, stream=True)) == reply
        turn1 = len(m.encode(m.apply_chat_template(messages)))
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "to be or not to be"}]
        m.reset_stats()
        second = m.chat(messages, max_new_tokens=10)
        prompt2 = len(m.encode(m.apply_chat_template(messages)))
        assert m.stats["prompt_tokens_reused"] >= turn1  # at least the whole first turn was kept
        assert m.stats["prefill_tokens"] == prompt2 - m.stats["prompt_tokens_reused"]
        m.reset()
        assert m.chat(messages, max_new_tokens=10) == second


def test_a_model_without_a_template_chats_in_a_plain_transcript(olmoe):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " the quick brown fox "}]
    assert render_plain_transcript(messages) == "System: be brief\nUser: the quick brown fox\nAssistant:"
    with em.load(olmoe) as m:
        assert m.chat_template is None
        with pytest.raises(EdgeMoEError, match="has no chat template"):
            m.apply_chat_template(messages)
        reply = m.chat(messages, max_new_tokens=12, stop_at_eos=False)
        expect = m.generate(render_plain_transcript(messages), max_new_tokens=12, stop_at_eos=False,
                            stop=["\nUser:", "\nSystem:"])
        assert reply == expect


def test_the_template_survives_a_gguf_round_trip(tiny_dir, tmp_path):
    """HF checkpoint -> GGUF (tokenizer.chat_template, bos/eos ids) -> .emoe: the same template and token strings."""
    importlib.import_module("gguf")
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf

    src = add_chat_template(shutil.copytree(tiny_dir("qwen3moe"), tmp_path / "src"))  # llama.cpp runs its GQA
    gguf_path = export_gguf(src, tmp_path / "m.gguf", "F32", show_progress=False)
    with em.load(export(gguf_path, tmp_path / "m.emoe", bits=32, show_progress=False)) as m:
        assert m.chat_template == CHAT_TEMPLATE
        assert m.container.metadata["chat_template_tokens"] == {"bos_token": "<s>", "eos_token": "</s>",
                                                                "pad_token": "<pad>"}
        for messages in CONVERSATIONS:
            assert m.apply_chat_template(messages) == _hf_render(src, messages)


def test_a_merged_export_keeps_the_template(chat_model, tmp_path):
    from edgemoe_export.merge_stage import export_merged

    src, _ = chat_model
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. " * 8)
    out = export_merged(src, tmp_path / "merged.emoe", experts_per_layer=3, method="average", calib_path=calib,
                        calib_tokens=64, seq_len=32, show_progress=False)
    with em.load(out) as m:
        assert m.chat_template == CHAT_TEMPLATE
        assert m.apply_chat_template(CONVERSATIONS[1]) == _hf_render(src, CONVERSATIONS[1])


def _metaspace_tokenizer():
    """A sentencepiece-style tokenizer (Metaspace: "▁" for spaces, stripped at the start of a decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "to be or not to be"] * 20,
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"]))
    return tok


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_text_stream_decodes_a_window_but_gives_the_full_decode(olmoe, kind):
    """TextStream re-decodes only recent tokens; after every token its text must be the decode of all of them
    (random ids: broken UTF-8 sequences for the byte-level tokenizer, word starts for the Metaspace one)."""
    if kind == "byte-level":
        with em.load(olmoe) as m:
            decode, vocab = m.tokenizer.decode, m.spec.vocab
    else:
        tok = _metaspace_tokenizer()
        decode, vocab = (lambda ids: tok.decode(ids, skip_special_tokens=False)), tok.get_vocab_size()
    ids = [int(i) for i in np.random.default_rng(1).integers(0, vocab, 700)]
    ts = TextStream(decode)
    pieces = []
    for n, i in enumerate(ids, start=1):
        pieces.append(ts.push(i))
        assert ts._text == decode(ids[:n]), n
    assert "".join(pieces) + ts.flush() == decode(ids)
    assert ts._start > 0  # the window did move


def test_a_stream_resumed_after_another_generation_is_refused(olmoe):
    with em.load(olmoe) as m:
        first = m.generate(PROMPT, max_new_tokens=8, stream=True, stop_at_eos=False)
        next(first)
        m.generate("to be or not", max_new_tokens=2)  # takes over the KV cache
        with pytest.raises(EdgeMoEError, match="resumed after another generate"):
            list(first)
        with pytest.raises(EdgeMoEError, match="no prompt tokens"):
            m.generate("")
