"""DeepSeek-V3-style routing (score_bias, n_group / topk_group, routed_scaling) end to end on GLM-4.5 MoE and
ERNIE-4.5 MoE: HF checkpoint -> export -> container -> NumPy and C engines == transformers, and the options matter
(dropping the bias or the group limit changes the logits of these checkpoints)."""

import dataclasses
import importlib

import numpy as np
import pytest
from conftest import hf_logits, rel_err
from tiny_v3route import build_v3_model

import edgemoe

importlib.import_module("edgemoe_export")
importlib.import_module("transformers")

IDS = np.random.default_rng(0).integers(3, 320, 24)
TYPES = ("glm4_moe", "ernie4_5_moe", "ernie4_5_moe_i2")


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """model_type -> (checkpoint dir, {bits: container})."""
    from edgemoe_export import export

    root = tmp_path_factory.mktemp("v3route")
    cache = {}

    def get(model_type: str, bits: int = 32):
        if model_type not in cache:
            cache[model_type] = (build_v3_model(model_type, root / model_type), {})
        ckpt, conts = cache[model_type]
        if bits not in conts:  # MWQ bits calibrate on a little text (routing through the selection bias too)
            calib = root / "calib.txt"
            calib.write_text("the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. " * 40)
            extra = {} if bits in (16, 32) else {"calib": calib, "calib_tokens": 1024, "dense_bits": 32}
            conts[bits] = export(ckpt, root / f"{model_type}_{bits}.emoe", bits=bits, show_progress=False, **extra)
        return ckpt, conts[bits]

    return get


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("engine", ["numpy", "c"])
def test_fp32_container_logits_match_transformers(v3, model_type, engine):
    if engine == "c":
        importlib.import_module("edgemoe._native")
    ckpt, path = v3(model_type)
    with edgemoe.load(path, engine=engine, threads=2) as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_logits(ckpt, IDS)) <= 1e-5


@pytest.mark.parametrize("model_type", TYPES)
def test_mwq8_container_logits_stay_close_to_transformers(v3, model_type):
    importlib.import_module("edgemoe._native")
    ckpt, path = v3(model_type, 8)
    with edgemoe.load(path, engine="c", threads=2) as m:
        ours = m.logits(IDS)
    ref = hf_logits(ckpt, IDS)
    per_token = np.abs(ours - ref).max(1) / np.abs(ref).max()
    # 8-bit MWQ experts (Q8 activations): ~1% per token; a routing near-tie may move one token more
    assert np.median(per_token) <= 5e-2
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.8


@pytest.mark.parametrize("model_type", TYPES)
def test_prefill_equals_token_by_token_decode(v3, model_type):
    importlib.import_module("edgemoe._native")
    _, path = v3(model_type)
    with edgemoe.load(path, engine="c", threads=2) as m:
        full = m.logits(IDS)
        eng = m._engine
        eng.reset()
        steps = [eng.prefill(IDS[:1].tolist())] + [eng.decode(int(t)) for t in IDS[1:]]
    np.testing.assert_array_equal(np.stack(steps), full)


@pytest.mark.parametrize("model_type", TYPES)
def test_bias_and_group_limit_matter(v3, model_type):
    """The reference without the selection bias (and, for GLM, without the group limit) disagrees with transformers:
    these checkpoints really exercise both."""
    from edgemoe.reference import reference_logits

    ckpt, path = v3(model_type)
    ref = hf_logits(ckpt, IDS)
    with edgemoe.load(path, engine="numpy") as m:
        spec, w = m.spec, m._engine.weight
        assert spec.score_bias
        assert rel_err(reference_logits(spec, w, IDS), ref) <= 1e-5
        assert rel_err(reference_logits(dataclasses.replace(spec, score_bias=False), w, IDS), ref) > 1e-3
        if model_type == "glm4_moe":
            assert spec.n_group == 4 and spec.topk_group == 2 and spec.routed_scaling == 2.5
            no_groups = dataclasses.replace(spec, n_group=1, topk_group=1)
            assert rel_err(reference_logits(no_groups, w, IDS), ref) > 1e-3


# --- GGUF: llama.cpp's glm4moe (through llama-cpp-python) is the oracle -----------------------------------------


def _needs_llama_and_gguf():
    importlib.import_module("gguf")
    importlib.import_module("llama_cpp")


def test_glm4moe_gguf_f32_matches_transformers_and_greedy_tokens_match(tmp_path):
    _needs_llama_and_gguf()
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf
    from test_gguf import llama_logits

    ckpt = build_v3_model("glm4_moe_g1", tmp_path / "glm")
    path = export_gguf(ckpt, tmp_path / "glm.gguf", "F32", show_progress=False)
    got, ref = llama_logits(path, IDS), hf_logits(ckpt, IDS)
    assert rel_err(got, ref) <= 1e-4  # fp32 on both sides (test_gguf.py's F32 tolerance)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # greedy decoding: edgemoe's C engine picks, llama.cpp agrees at every step
    cont = export(ckpt, tmp_path / "glm.emoe", bits=32, show_progress=False)
    prompt = IDS[:8].tolist()
    toks = []
    with edgemoe.load(cont, engine="c", threads=2) as m:
        logits = m._engine.prefill(prompt)
        for _ in range(8):
            toks.append(int(np.argmax(logits)))
            logits = m._engine.decode(toks[-1])
    seq = prompt + toks
    steps = llama_logits(path, seq[:-1])[len(prompt) - 1:].argmax(-1)
    assert steps.tolist() == toks
    from edgemoe_export.gguf_reader import GGUFCheckpoint

    from edgemoe.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="not supported yet"):  # no GGUF import for glm4moe yet
        GGUFCheckpoint(path)


def test_ernie45moe_gguf_f32_matches_transformers(tmp_path):
    _needs_llama_and_gguf()
    from edgemoe_export.gguf_export import export_gguf
    from test_gguf import llama_logits

    ckpt = build_v3_model("ernie4_5_moe", tmp_path / "ernie")
    path = export_gguf(ckpt, tmp_path / "ernie.gguf", "F32", show_progress=False)
    got, ref = llama_logits(path, IDS), hf_logits(ckpt, IDS)
    assert rel_err(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_ernie45moe_gguf_refuses_moe_every_second_layer(tmp_path):
    _needs_llama_and_gguf()
    from edgemoe_export.gguf_export import export_gguf

    from edgemoe.errors import EdgeMoEError

    ckpt = build_v3_model("ernie4_5_moe_i2", tmp_path / "ernie")
    with pytest.raises(EdgeMoEError, match="moe_layer_interval 1"):
        export_gguf(ckpt, tmp_path / "ernie.gguf", "F32", show_progress=False)
    assert not (tmp_path / "ernie.gguf").exists()


def test_glm4moe_gguf_refuses_group_limited_routing(tmp_path):
    _needs_llama_and_gguf()
    from edgemoe_export.gguf_export import export_gguf

    from edgemoe.errors import EdgeMoEError

    ckpt = build_v3_model("glm4_moe", tmp_path / "glm")
    with pytest.raises(EdgeMoEError, match="group-limited routing"):
        export_gguf(ckpt, tmp_path / "glm.gguf", "F32", show_progress=False)
    assert not (tmp_path / "glm.gguf").exists()


def test_onnx_export_refuses_v3_routing_clearly(v3, tmp_path):
    importlib.import_module("onnx")
    from edgemoe_export.onnx_export import export_onnx

    from edgemoe.errors import EdgeMoEError

    ckpt, _ = v3("glm4_moe")
    # the writer's generic check: every option away from its default that it does not build, by name
    with pytest.raises(EdgeMoEError, match=r"sets score_bias=True, n_group=4, topk_group=2, .*does not build"):
        export_onnx(ckpt, tmp_path / "onnx")


def test_merge_keeps_the_selection_bias_and_refuses_groups(v3, tmp_path):
    """MC-SMoE merge: ERNIE (no groups) merges, and the C and NumPy engines agree on the merged container (the bias
    is per routed expert, applied before the routed -> stored map); GLM with n_group > 1 is refused before writing."""
    importlib.import_module("edgemoe._native")
    from edgemoe_export.merge_stage import export_merged

    from edgemoe.errors import EdgeMoEError

    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    kw = {"merge_ratio": 0.5, "calib_path": calib, "calib_tokens": 256, "seq_len": 64, "bits": 32,
          "show_progress": False}
    out = export_merged(v3("ernie4_5_moe")[0], tmp_path / "m.emoe", **kw)
    with edgemoe.load(out, engine="numpy") as a, edgemoe.load(out, engine="c", threads=2) as b:
        assert a.spec.score_bias and any(len(set(m)) < len(m) for m in a.spec.expert_map if m)
        assert rel_err(b.logits(IDS), a.logits(IDS)) <= 1e-5
    with pytest.raises(EdgeMoEError, match="group-limited routing"):
        export_merged(v3("glm4_moe")[0], tmp_path / "g.emoe", **kw)
    assert not (tmp_path / "g.emoe").exists()


@pytest.mark.parametrize("model_type", ["glm4_moe", "ernie4_5_moe"])
def test_transformers_in_memory_layout_reads_like_the_saved_one(model_type, tmp_path):
    """save_original_format=False writes transformers 5's own names (fused experts; ERNIE's bias under the gate):
    the same model, the same container tensors."""
    from edgemoe_export import export

    paths = {}
    for fmt in (True, False):
        ckpt = build_v3_model(model_type, tmp_path / f"ckpt{fmt}", save_original_format=fmt)
        paths[fmt] = export(ckpt, tmp_path / f"m{fmt}.emoe", bits=32, show_progress=False)
    from edgemoe.container import open_container

    a, b = (open_container(paths[f], verify=False) for f in (True, False))
    assert a.spec == b.spec and sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        np.testing.assert_array_equal(a.raw(name), b.raw(name), err_msg=name)
