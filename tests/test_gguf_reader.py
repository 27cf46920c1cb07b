"""GGUF as an export source (`open_gguf`, `open_source`), and merged models written to GGUF.

- HF tiny model -> GGUF (F32 / F16, by export_gguf) -> open_gguf -> container -> edgemoe NumPy engine ==
  transformers: F32 <= 1e-5 (fp32 storage and math on both sides; summation order only), F16 <= 1e-4 against
  transformers running the same fp16-rounded matrices (the GGUF keeps routers and 1-D tensors in F32), as in
  test_parity_transformers.py. SmallThinker (not in transformers) against the container exported from its HF
  layout.
- Q8_0 / Q4_0 / Q4_K_M / BF16 GGUF -> container == the NumPy reference on the GGUF's dequantized tensors, read
  independently with gguf-py; for Mixtral that reference keeps llama.cpp's permuted q/k rows and runs NORM RoPE,
  which checks the reader's choice (un-permute rows, keep NEOX) computes the same function. Near-exact (<= 1e-5).
- bad input (unsupported architecture, dense llama, unsupported tensor type, metadata / shape disagreement,
  unknown or missing tensors, not a GGUF) is refused by name before any output is written.
- a merged container (expert_map) -> GGUF with each group's experts duplicated into its members' slots ->
  llama.cpp (F32 KV cache) == edgemoe's merged model (<= 1e-4); pruned maps are refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err
from tiny_models_gguf import build_gguf_variant
from tiny_models_onnx import rewrite_gguf, write_merged_container
from tiny_smallthinker import build_tiny_smallthinker

gguf = importlib.import_module("gguf")

from edgemoe_export.gguf_export import export_gguf, export_gguf_from_container
from edgemoe_export.gguf_reader import open_gguf
from edgemoe_export.sources import open_source

import edgemoe
from edgemoe.errors import EdgeMoEError, FormatError, UnsupportedModelError

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA = True
except Exception:  # noqa: BLE001 - not installed, or its shared library fails to load
    HAVE_LLAMA = False
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not importable")

IDS = [int(i) for i in np.random.default_rng(0).integers(3, 312, size=24)]
FAMILIES = ("olmoe", "qwen2moe", "qwen3moe", "mixtral")
TEXTS = ["the quick brown fox jumps over the lazy dog",
         "To be, or not to be: 12345 67\n\tnew line   ünïcödé 🙂 we'll <s>x</s>"]


@pytest.fixture(scope="session")
def src_dir(tiny_dir, tmp_path_factory):
    """name -> HF checkpoint that llama.cpp's architecture can express (as in test_gguf.py)."""
    root = tmp_path_factory.mktemp("gguf_reader_src")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            if name == "olmoe":
                cache[name] = build_gguf_variant("olmoe_mha", root / name)
            elif name == "qwen2moe":
                cache[name] = build_gguf_variant("qwen2moe_hd", root / name)
            elif name == "qwen3moe_k256":
                cache[name] = build_gguf_variant(name, root / name)
            elif name.startswith("smallthinker_"):
                cache[name] = build_tiny_smallthinker(root / name, name.split("_", 1)[1])
            else:
                cache[name] = tiny_dir(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def gguf_of(src_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_reader_files")
    cache: dict[tuple, Path] = {}

    def get(name: str, gguf_type: str = "F32") -> Path:
        key = (name, gguf_type)
        if key not in cache:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # F16 fallback notices for rows not a multiple of 32
                cache[key] = export_gguf(src_dir(name), root / f"{name}_{gguf_type}.gguf", gguf_type,
                                         show_progress=False)
        return cache[key]

    return get


def to_container(src, out: Path, monkeypatch, bits: int = 32) -> Path:
    """`edgemoe_export.export` from any source path. Until pipeline.py calls `sources.open_source` (the lead's
    one-line change), route its `open_checkpoint` through `open_source` here."""
    from edgemoe_export import export, pipeline

    monkeypatch.setattr(pipeline, "open_checkpoint", open_source, raising=False)
    return export(src, out, bits=bits, show_progress=False)


def engine_logits(emoe: Path, ids=IDS) -> np.ndarray:
    with edgemoe.load(emoe, engine="numpy") as m:
        return m.logits(ids)


def hf_logits_rounded(model_dir: Path, ids, keep_f32=("mlp.gate.weight", "block_sparse_moe.gate.weight",
                                                        "shared_expert_gate.weight")) -> np.ndarray:
    """transformers with the matrices an F16 GGUF stores in F16 rounded to fp16 (routers and 1-D tensors stay)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith(keep_f32):
                p.copy_(p.half().float())
        return model(torch.tensor(np.asarray(ids))[None]).logits[0].float().numpy()


# ---------------------------------------------------------------------------------------------------------------
# F32 / F16 sources == transformers


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_source_matches_transformers(family, gguf_of, src_dir, tmp_path, monkeypatch):
    from conftest import hf_logits

    g = gguf_of(family, "F32")
    ck = open_gguf(g)
    assert ck.spec.rope_kind == "neox"  # Mixtral: llama.cpp's q/k row permutation undone on read
    emoe = to_container(g, tmp_path / "m.emoe", monkeypatch)
    got, ref = engine_logits(emoe), hf_logits(src_dir(family), IDS)
    err = rel_err(got, ref)
    print(f"{family} GGUF F32 -> container vs transformers: {err:.2e}")
    assert err <= 1e-5
    assert edgemoe.load(emoe, engine="numpy").spec.rope_kind == "neox"


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_gguf_source_matches_transformers_on_rounded_weights(family, gguf_of, src_dir, tmp_path, monkeypatch):
    from conftest import hf_logits

    emoe = to_container(gguf_of(family, "F16"), tmp_path / "m.emoe", monkeypatch)
    got = engine_logits(emoe)
    err = rel_err(got, hf_logits_rounded(src_dir(family), IDS))
    print(f"{family} GGUF F16 -> container vs transformers on fp16-rounded weights: {err:.2e}")
    assert err <= 1e-4
    assert rel_err(got, hf_logits(src_dir(family), IDS)) > 1e-5  # the rounding is really there


@pytest.mark.parametrize("variant", ["sigmoid_tied", "softmax", "hybrid"])
def test_smallthinker_gguf_source(variant, gguf_of, src_dir, tmp_path, monkeypatch):
    from edgemoe_export import export

    name = f"smallthinker_{variant}"
    from_hf = export(src_dir(name), tmp_path / "hf.emoe", bits=32, show_progress=False)
    from_gguf = to_container(gguf_of(name, "F32"), tmp_path / "g.emoe", monkeypatch)
    a, b = edgemoe.load(from_hf, engine="numpy"), edgemoe.load(from_gguf, engine="numpy")
    assert a.spec == b.spec  # tie, router_fn, SWA/NoPE layout all recovered from the metadata
    assert rel_err(b.logits(IDS), a.logits(IDS)) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# quantized sources == dequantize-then-reference


def _gguf_reference_logits(path: Path, ids) -> np.ndarray:
    """NumPy reference on the GGUF's tensors dequantized by gguf-py directly (not by the reader). Mixtral keeps
    llama.cpp's permuted q/k rows and runs NORM (adjacent-pair) RoPE, as llama.cpp does."""
    from edgemoe.arch import expert_tensor_name
    from edgemoe.reference import reference_logits

    spec = open_gguf(path).spec
    w: dict[str, np.ndarray] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        arr = arr.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if "_exps." in t.name:
            layer, matrix = int(t.name.split(".")[1]), t.name.split(".")[2][len("ffn_"): -len("_exps")]
            for e in range(arr.shape[0]):
                w[expert_tensor_name(layer, e, matrix)] = arr[e]
        else:
            w[t.name] = arr.reshape(-1) if t.name.endswith("_shexp.weight") and arr.size == spec.hidden else arr
    if spec.family == "mixtral":
        spec = dataclasses.replace(spec, rope_kind="norm")
    return reference_logits(spec, w.__getitem__, ids)


QUANT_CASES = [(f, t) for t in ("Q8_0", "Q4_0") for f in FAMILIES] + [("qwen3moe_k256", "Q4_K_M")]


@pytest.mark.parametrize("family,gguf_type", QUANT_CASES)
def test_quantized_gguf_source_equals_dequantized_reference(family, gguf_type, gguf_of, src_dir, tmp_path,
                                                            monkeypatch):
    from conftest import hf_logits

    if gguf_type == "Q4_K_M" and not HAVE_LLAMA:
        pytest.skip("Q4_K_M needs llama.cpp's quantizer (llama-cpp-python)")
    g = gguf_of(family, gguf_type)
    types = open_gguf(g).tensor_types()
    want = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K"}[gguf_type]
    assert types["blk.0.ffn_gate_exps.weight"] == want
    emoe = to_container(g, tmp_path / "m.emoe", monkeypatch)
    got = engine_logits(emoe)
    err = rel_err(got, _gguf_reference_logits(g, IDS))
    err_orig = rel_err(got, hf_logits(src_dir(family), IDS))
    print(f"{family} GGUF {gguf_type} -> container vs dequantize-then-reference {err:.2e} "
          f"(vs the original weights {err_orig:.2e})")
    assert err <= 1e-5
    assert err_orig > 100 * max(err, 1e-7)  # the reference really runs the quantized weights


def test_bf16_and_other_gguf_py_types(gguf_of, tmp_path, monkeypatch):
    """Types gguf-py dequantizes but export_gguf does not write (BF16, Q5_0, Q4_1), mixed in one file."""
    from gguf import GGMLQuantizationType as Q

    kinds = {"attn_q": Q.BF16, "attn_k": Q.Q5_0, "ffn_up_exps": Q.Q4_1, "ffn_gate_exps": Q.BF16}

    def fn(name, arr):
        for key, q in kinds.items():
            if f".{key}." in name:
                return name, arr, q
        return name, arr, None

    g = rewrite_gguf(gguf_of("qwen3moe", "F32"), tmp_path / "mixed.gguf", tensor_fn=fn)
    types = open_gguf(g).tensor_types()
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.1.ffn_up_exps.weight"] == "Q4_1"
    emoe = to_container(g, tmp_path / "m.emoe", monkeypatch)
    assert rel_err(engine_logits(emoe), _gguf_reference_logits(g, IDS)) <= 1e-5


def test_legacy_per_expert_mixtral_layout(gguf_of, src_dir, tmp_path, monkeypatch):
    """Mixtral GGUFs converted before early 2024 store blk.N.ffn_{gate,up,down}.E.weight, one tensor per expert."""
    from conftest import hf_logits

    captured = {}

    def split(name, arr):
        if "_exps." not in name:
            return name, arr, None
        captured[name] = arr
        return None

    g = rewrite_gguf(gguf_of("mixtral", "F32"), tmp_path / "tmp.gguf", tensor_fn=split)
    w = gguf.GGUFWriter(str(tmp_path / "legacy.gguf"), "llama")
    r = gguf.GGUFReader(str(g))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        w.add_key_value(key, f.contents(), f.types[0],
                        sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    for name, arr in captured.items():
        layer, matrix = name.split(".")[1], name.split(".")[2][: -len("_exps")]
        for e in range(arr.shape[0]):
            w.add_tensor(f"blk.{layer}.{matrix}.{e}.weight", np.ascontiguousarray(arr[e]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "legacy.gguf")).tensors}
    assert "blk.0.ffn_gate.3.weight" in names and "blk.0.ffn_gate_exps.weight" not in names
    emoe = to_container(tmp_path / "legacy.gguf", tmp_path / "m.emoe", monkeypatch)
    assert rel_err(engine_logits(emoe), hf_logits(src_dir("mixtral"), IDS)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and round trips


@pytest.mark.parametrize("name", ["qwen3moe", "smallthinker_sigmoid_tied"])
def test_tokenizer_rebuilt_from_gguf_metadata(name, gguf_of, src_dir):
    from tokenizers import Tokenizer

    orig = Tokenizer.from_file(str(src_dir(name) / "tokenizer.json"))
    rebuilt = Tokenizer.from_str(open_gguf(gguf_of(name)).tokenizer_json.decode())
    for text in TEXTS:
        ids = orig.encode(text, add_special_tokens=False).ids
        assert rebuilt.encode(text, add_special_tokens=False).ids == ids, text
        assert rebuilt.decode(ids, skip_special_tokens=False) == orig.decode(ids, skip_special_tokens=False)
    assert rebuilt.token_to_id("</s>" if name == "qwen3moe" else "<|endoftext|>") == 2


def test_no_tokenizer_gives_none(src_dir, tmp_path, monkeypatch):
    g = export_gguf(src_dir("qwen3moe"), tmp_path / "n.gguf", show_progress=False, tokenizer="none")
    assert open_gguf(g).tokenizer_json is None
    emoe = to_container(g, tmp_path / "n.emoe", monkeypatch)
    with edgemoe.load(emoe, engine="numpy") as m:
        assert m.tokenizer is None


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
def test_gguf_round_trip_is_identical(family, gguf_of, tmp_path):
    """GGUF -> reader -> GGUF writer gives the same tensors (Mixtral: un-permuted on read, permuted on write once)."""
    g = gguf_of(family, "F32")
    again = export_gguf(open_gguf(g), tmp_path / "again.gguf", "F32", show_progress=False)
    a = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(g)).tensors}
    b = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(again)).tensors}
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert np.array_equal(v, b[k]), k


def test_open_source_dispatch(src_dir, gguf_of, tmp_path):
    from edgemoe_export.checkpoint import Checkpoint

    assert isinstance(open_source(src_dir("qwen3moe")), Checkpoint)
    assert open_source(gguf_of("qwen3moe")).arch == "qwen3moe"
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    with pytest.raises(FormatError, match="directory .* or a .gguf file"):
        open_source(tmp_path / "x.bin")
    with pytest.raises(FormatError, match="no such file"):
        open_source(tmp_path / "missing.gguf")


# ---------------------------------------------------------------------------------------------------------------
# bad input: refused by name, no output written


def _refused(path: Path, exc, match: str, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(exc, match=match):
        open_gguf(path)
    out = tmp_path / "out.emoe"
    with pytest.raises(exc, match=match):
        to_container(path, out, monkeypatch)
    assert not out.exists() and not list(tmp_path.glob("out.emoe*"))


def test_unsupported_architecture_is_refused(gguf_of, tmp_path, monkeypatch):
    g = rewrite_gguf(gguf_of("qwen3moe"), tmp_path / "gpt2.gguf", arch="gpt2")
    _refused(g, UnsupportedModelError, "GGUF architecture 'gpt2' is not supported", tmp_path, monkeypatch)


def test_dense_llama_is_refused(gguf_of, tmp_path, monkeypatch):
    g = rewrite_gguf(gguf_of("mixtral"), tmp_path / "dense.gguf", drop=("llama.expert_count",
                                                                        "llama.expert_used_count"))
    _refused(g, UnsupportedModelError, "'llama' without experts", tmp_path, monkeypatch)


def test_unsupported_tensor_type_is_refused(gguf_of, tmp_path, monkeypatch):
    def fn(name, arr):
        return (name, arr.astype(np.int32), None) if name == "blk.1.attn_norm.weight" else (name, arr, None)

    g = rewrite_gguf(gguf_of("qwen3moe"), tmp_path / "i32.gguf", tensor_fn=fn)
    _refused(g, UnsupportedModelError, r"tensor 'blk\.1\.attn_norm\.weight' has type I32", tmp_path, monkeypatch)


@pytest.mark.parametrize("key,value,match", [
    ("qwen3moe.expert_feed_forward_length", 48,
     r"'blk\.0\.ffn_gate_exps\.weight' has shape \[8, 40, 64\].*implies \[8, 48, 64\]"),
    ("qwen3moe.attention.head_count_kv", 4, r"'blk\.0\.attn_k\.weight' has shape \[64, 64\].*implies \[128, 64\]"),
    ("qwen3moe.expert_count", 6, r"ffn_gate_inp\.weight' has shape \[8, 64\].*implies \[6, 64\]"),
    ("qwen3moe.vocab_size", 400, r"vocab_size = 400, but tensor 'token_embd\.weight' has 320 rows"),
])
def test_metadata_shape_mismatch_is_refused(key, value, match, gguf_of, tmp_path, monkeypatch):
    g = rewrite_gguf(gguf_of("qwen3moe"), tmp_path / "bad.gguf", kv={key: (value, gguf.GGUFValueType.UINT32)})
    _refused(g, FormatError, match, tmp_path, monkeypatch)


def test_missing_and_unknown_tensors_are_refused(gguf_of, tmp_path, monkeypatch):
    g = rewrite_gguf(gguf_of("qwen3moe"), tmp_path / "missing.gguf",
                     tensor_fn=lambda n, a: None if n == "blk.1.attn_v.weight" else (n, a, None))
    _refused(g, FormatError, r"missing tensor 'blk\.1\.attn_v\.weight'", tmp_path, monkeypatch)
    g = rewrite_gguf(gguf_of("qwen3moe"), tmp_path / "extra.gguf", kv={"qwen3moe.block_count": (1, gguf.GGUFValueType.UINT32)})
    _refused(g, UnsupportedModelError, r"tensor 'blk\.1\..*' .*is not part of a qwen3moe model", tmp_path, monkeypatch)


def test_not_a_gguf_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    _refused(bad, FormatError, "not a valid GGUF file|GGUF version", tmp_path, monkeypatch)


# ---------------------------------------------------------------------------------------------------------------
# merged models -> GGUF (llama.cpp has no e -> g map)


MERGE_CASES = {
    # qwen3moe: 8 experts, top-2, renormalized; mixtral: 4 experts, top-2, NORM RoPE rows permuted on write
    "qwen3moe": [[0, 0, 1, 2, 3, 3, 4, 5], [0, 1, 1, 1, 2, 3, 3, 4]],
    "mixtral": [[0, 0, 1, 1], [0, 1, 2, 2]],
}


@needs_llama
@pytest.mark.parametrize("family", sorted(MERGE_CASES))
def test_merged_container_gguf_runs_in_llama_cpp(family, src_dir, tmp_path):
    from test_gguf import llama_logits

    maps = MERGE_CASES[family]
    emoe = write_merged_container(src_dir(family), tmp_path / "merged.emoe", maps)
    out = export_gguf_from_container(emoe, tmp_path / "merged.gguf", "F32", show_progress=False)
    with edgemoe.load(emoe, engine="numpy") as m:
        assert m.spec.expert_map == maps
        ref = m.logits(IDS)
    got = llama_logits(out, IDS)
    err = rel_err(got, ref)
    # file-size cost of duplicating each group into its members' slots
    expert_bytes = sum(t.nbytes for t in edgemoe.container.open_container(emoe).tensors.values()
                       if t.kind == "expert")
    exps = sum(t.n_bytes for t in gguf.GGUFReader(str(out)).tensors if "_exps." in t.name)
    print(f"{family} merged GGUF vs edgemoe merged container: {err:.2e}; expert bytes: container {expert_bytes}, "
          f"GGUF {exps} (x{exps / expert_bytes:.2f}); files: {emoe.stat().st_size} B vs {out.stat().st_size} B")
    assert err <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    stored = sum(max(m) + 1 for m in maps)
    assert exps == pytest.approx(expert_bytes * sum(len(m) for m in maps) / stored, rel=1e-6)
    # discriminating: the unmerged model differs
    from conftest import hf_logits

    assert rel_err(got, hf_logits(src_dir(family), IDS)) > 100 * 1e-4


def test_pruned_map_is_refused_for_gguf(src_dir, tmp_path):
    emoe = write_merged_container(src_dir("qwen3moe"), tmp_path / "pruned.emoe",
                                  [[0, 0, 1, -1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
    with pytest.raises(EdgeMoEError, match=r"layer 0 prunes experts \[3\].*no GGUF computes this model"):
        export_gguf_from_container(emoe, tmp_path / "p.gguf", show_progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*gguf*"))


def test_merged_map_in_a_checkpoint_source_is_refused_by_plain_export_gguf(src_dir, tmp_path):
    from edgemoe_export import open_checkpoint

    ck = open_checkpoint(src_dir("qwen3moe"))
    ck.spec = dataclasses.replace(ck.spec, expert_map=MERGE_CASES["qwen3moe"])
    with pytest.raises(EdgeMoEError, match="export_gguf_from_container"):
        export_gguf(ck, tmp_path / "x.gguf", show_progress=False)
