"""MC-SMoE merging: grouping, alignment, merge, group dispatch, export, bounded memory."""

import tracemalloc

import numpy as np
import pytest
from conftest import FAMILIES

import edgemoe
from edgemoe.arch import ArchSpec, expert_tensor_name
from edgemoe.container import ContainerWriter, open_container
from edgemoe.reference import ffn

CALIB_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. "
    "def merge(a, b):\n    return sorted(a + b)\n\n"
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows. "
    "The quick brown fox jumps over the lazy dog while 42 tests run in parallel on two small cores. "
) * 12


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(CALIB_TEXT)
    return p


def _spec(activation="swiglu", E=6, top_k=2, H=32, I=24):
    return ArchSpec(family="olmoe", n_layers=1, hidden=H, vocab=16, n_heads=2, n_kv_heads=2, head_dim=H // 2,
                    n_experts=E, top_k=top_k, expert_ffn=I, activation=activation)


def _random_experts(rng, spec, layer=0):
    I, H = spec.expert_ffn, spec.hidden
    out = {}
    for e in range(spec.n_experts):
        out[expert_tensor_name(layer, e, "gate")] = rng.normal(0, 0.3, (I, H)).astype(np.float32)
        out[expert_tensor_name(layer, e, "up")] = rng.normal(0, 0.3, (I, H)).astype(np.float32)
        out[expert_tensor_name(layer, e, "down")] = rng.normal(0, 0.3, (H, I)).astype(np.float32)
    return out


# --- pure functions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "reglu"])
def test_alignment_preserves_function(activation):
    from edgemoe_export.merge import align_to, alignment_permutation, permute_expert

    rng = np.random.default_rng(0)
    spec = _spec(activation)
    ref = tuple(rng.normal(0, 0.3, s).astype(np.float32) for s in [(24, 32), (24, 32), (32, 24)])
    other = tuple(rng.normal(0, 0.3, s).astype(np.float32) for s in [(24, 32), (24, 32), (32, 24)])
    x = rng.normal(0, 1, (10, 32)).astype(np.float32)
    # a permuted copy of ref is aligned back to ref exactly
    perm = rng.permutation(24)
    shuffled = permute_expert(ref, perm)
    assert not np.array_equal(shuffled[0], ref[0])
    back = align_to(ref, shuffled)
    for a, b in zip(back, ref):
        np.testing.assert_array_equal(a, b)
    # aligning an unrelated expert changes its weights' order but not its function
    aligned = align_to(ref, other)
    p = alignment_permutation(ref, other)
    assert sorted(p.tolist()) == list(range(24))
    np.testing.assert_allclose(ffn(spec, x, *aligned), ffn(spec, x, *other), rtol=1e-5, atol=1e-5)


def test_alignment_moves_members_closer_to_the_reference():
    from edgemoe_export.merge import align_to, permute_expert

    rng = np.random.default_rng(1)
    ref = tuple(rng.normal(0, 1, s) for s in [(24, 32), (24, 32), (32, 24)])
    noisy = permute_expert(tuple(w + rng.normal(0, 0.5, w.shape) for w in ref), rng.permutation(24))
    aligned = align_to(ref, noisy)
    dist = lambda a, b: sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
    assert dist(aligned, ref) < 0.5 * dist(noisy, ref)


def test_group_counts_global_rule():
    from edgemoe_export.merge import group_counts

    freqs = [np.array([10, 10, 10, 10.0]), np.array([37, 1, 1, 1.0]), None, np.array([20, 15, 4, 1.0])]
    counts = group_counts(freqs, merge_ratio=0.5)
    assert sum(counts) == 6 and counts[2] == 0
    # the balanced layer keeps more than the skewed one; every MoE layer keeps at least one
    assert counts[0] > counts[1] >= 1
    assert group_counts(freqs, merge_ratio=1.0) == [4, 4, 0, 4]
    assert group_counts(freqs, merge_ratio=0.01) == [1, 1, 0, 1]
    assert group_counts(freqs, experts_per_layer=3) == [3, 3, 0, 3]
    assert group_counts(freqs, merge_ratio=0.25, min_groups=2) == [2, 2, 0, 2]
    with pytest.raises(ValueError):
        group_counts(freqs)


def test_group_experts_dominant_and_similarity():
    from edgemoe_export.merge import group_experts

    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 3))
    # experts 3, 4, 5 route like 2, 0, 1 (plus noise); 0, 1, 2 are the most used
    logits = np.concatenate([base, base[:, [2, 0, 1]] + 0.05 * rng.normal(size=(200, 3))], axis=1)
    freq = np.array([50, 40, 30, 5, 4, 3.0])
    assert group_experts(freq, logits, 3) == [0, 1, 2, 2, 0, 1]
    assert group_experts(freq, logits, 6) == list(range(6))
    assert group_experts(freq, logits, 1) == [0] * 6
    # group ids follow the dominant experts' ids, not their frequency order
    freq2 = np.array([1, 2, 3, 60, 50, 40.0])
    assert group_experts(freq2, logits, 3) == [1, 2, 0, 0, 1, 2]


def test_merge_layer_identity_and_weighted_average():
    from edgemoe_export.merge import align_to, merge_layer

    rng = np.random.default_rng(0)
    spec = _spec()
    experts = _random_experts(rng, spec)
    logits = rng.normal(size=(100, spec.n_experts))
    freq = np.array([9, 8, 7, 6, 5, 4.0])
    for method in ("mcsmoe", "average", "prune"):
        merged, emap = merge_layer(experts, 0, spec, freq, logits, spec.n_experts, method)
        assert emap == list(range(spec.n_experts))
        assert merged.keys() == experts.keys()
        for k in experts:
            np.testing.assert_array_equal(merged[k], experts[k])
    merged, emap = merge_layer(experts, 0, spec, freq, logits, 5, "mcsmoe")
    assert len(set(emap)) == 5 and emap[5] >= 0
    g = emap[5]
    d = emap.index(g)  # the dominant member (lowest id in the group)
    ref = tuple(experts[expert_tensor_name(0, d, m)] for m in ("gate", "up", "down"))
    mem = align_to(ref, tuple(experts[expert_tensor_name(0, 5, m)] for m in ("gate", "up", "down")))
    want = (freq[d] * ref[0] + freq[5] * mem[0]) / (freq[d] + freq[5])
    np.testing.assert_allclose(merged[expert_tensor_name(0, g, "gate")], want, rtol=1e-5, atol=1e-6)
    avg, emap2 = merge_layer(experts, 0, spec, freq, logits, 5, "average")
    assert emap2 == emap
    want = (experts[expert_tensor_name(0, d, "down")] + experts[expert_tensor_name(0, 5, "down")]) / 2
    np.testing.assert_allclose(avg[expert_tensor_name(0, g, "down")], want, rtol=1e-6)
    _, pmap = merge_layer(experts, 0, spec, freq, logits, 3, "prune")
    assert pmap == [0, 1, 2, -1, -1, -1]
    with pytest.raises(ValueError):
        merge_layer(experts, 0, spec, freq, logits, 1, "prune")  # fewer than top_k routable experts


def test_regmean_merge_is_the_blockwise_least_squares_fit():
    from edgemoe_export.calibrate import gram_blocks
    from edgemoe_export.merge import _regmean, merge_layer, permute_expert

    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(12, 16)) for _ in range(3)]
    grams = [gram_blocks(rng.normal(size=(40, 16)) * rng.uniform(0.2, 3, 16), 8) for _ in range(2)] + [None]
    prior = sum(ws) / 3
    w = _regmean(ws, grams, prior, ridge=0.1)
    g64 = [g.astype(np.float64) for g in grams[:2]]  # calibration stores float32 blocks; the solve is in float64
    for b in range(2):  # the gradient of sum_i ||(W - W_i) X_i^T||^2 + lam ||W - prior||^2 vanishes per block
        sl = slice(8 * b, 8 * b + 8)
        G = g64[0][b] + g64[1][b]
        lam = 0.1 * np.trace(G) / 8
        grad = sum((w[:, sl] - ws[i][:, sl]) @ g64[i][b] for i in range(2)) + lam * (w[:, sl] - prior[:, sl])
        assert np.abs(grad).max() < 1e-9 * np.abs(lam * prior).max()
    # a group of an expert and its permuted copy merges back to the expert, whatever the Grams
    spec = _spec(E=2, H=16, I=8)
    experts = _random_experts(rng, spec)
    copy = permute_expert(tuple(experts[expert_tensor_name(0, 0, m)] for m in ("gate", "up", "down")),
                          rng.permutation(8))
    for m, arr in zip(("gate", "up", "down"), copy):
        experts[expert_tensor_name(0, 1, m)] = arr
    gin = {e: gram_blocks(rng.normal(size=(30, 16)), 8) for e in range(2)}
    gmid = {e: gram_blocks(rng.normal(size=(30, 8)), 4) for e in range(2)}
    merged, emap = merge_layer(experts, 0, spec, np.array([3.0, 1.0]), rng.normal(size=(20, 2)), 1, "regmean",
                               gram_in=gin, gram_mid=gmid)
    assert emap == [0, 0]
    for m in ("gate", "up", "down"):
        np.testing.assert_allclose(merged[expert_tensor_name(0, 0, m)], experts[expert_tensor_name(0, 0, m)],
                                   atol=1e-5)


def test_permuted_gram_blocks_are_exact_where_known_and_psd():
    from edgemoe_export.calibrate import gram_blocks
    from edgemoe_export.merge import permute_gram_blocks

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    perm = rng.permutation(16)
    got = permute_gram_blocks(gram_blocks(x, 4), perm)
    full = gram_blocks(x[:, perm], 4)
    for b in range(4):
        np.testing.assert_allclose(np.diag(got[b]), np.diag(full[b]))
        assert np.linalg.eigvalsh(got[b]).min() > -1e-8
    np.testing.assert_array_equal(permute_gram_blocks(gram_blocks(x, 4), np.arange(16)), gram_blocks(x, 4))


def test_low_rank_helpers():
    from edgemoe_export.merge import low_rank_approx, low_rank_plus_residual, rtn_quantize

    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 64)).astype(np.float32)
    np.testing.assert_allclose(low_rank_approx(w, 48), w, atol=1e-4)
    err = lambda a: float(np.linalg.norm(a - w))
    assert err(low_rank_approx(w, 8)) > err(low_rank_approx(w, 32))
    assert err(low_rank_plus_residual(w, 8, lambda r: rtn_quantize(r, 4, 32))) < err(low_rank_approx(w, 8))


# --- through the exporter and the runtime --------------------------------------------------------------------


def _ids(n=40, seed=0):
    return np.random.default_rng(seed).integers(3, 320, n)


def test_merge_ratio_one_is_the_identity(tiny_dir, tiny_emoe, calib_file, tmp_path):
    from edgemoe_export.merge_stage import export_merged

    out = export_merged(tiny_dir("qwen2moe"), tmp_path / "m.emoe", merge_ratio=1.0, calib_path=calib_file,
                        calib_tokens=512, seq_len=64, bits=32, show_progress=False)
    with edgemoe.load(out, engine="numpy") as m, edgemoe.load(tiny_emoe("qwen2moe", 32), engine="numpy") as ref:
        assert m.spec.expert_map == [list(range(6))] * 2
        np.testing.assert_array_equal(m.logits(_ids()), ref.logits(_ids()))


def _duplicate_groups(src, dst):
    """Rewrite a merged container with every member's weights duplicated into its own slot and no map."""
    c = open_container(src)
    spec = ArchSpec.from_json(c.spec.to_json())
    maps, spec.expert_map = spec.expert_map, []
    with ContainerWriter(dst, spec, c.metadata) as w:
        for name, t in c.tensors.items():
            if t.kind != "expert":
                w.add_tensor(name, c.array(name), t.dtype, kind=t.kind)
        for layer, emap in enumerate(maps):
            for e, g in enumerate(emap):
                for mat in ("gate", "up", "down"):
                    src_name = expert_tensor_name(layer, g, mat)
                    w.add_tensor(expert_tensor_name(layer, e, mat), c.array(src_name), c.tensors[src_name].dtype,
                                 kind="expert")
    c.close()
    return dst


@pytest.mark.parametrize("family", ["olmoe", "qwen3moe"])
def test_group_dispatch_equals_duplicated_experts(family, tiny_dir, calib_file, tmp_path):
    from edgemoe_export.merge_stage import export_merged

    merged = export_merged(tiny_dir(family), tmp_path / "m.emoe", merge_ratio=0.5, method="mcsmoe",
                           calib_path=calib_file, calib_tokens=512, seq_len=64, bits=32, show_progress=False)
    dup = _duplicate_groups(merged, tmp_path / "dup.emoe")
    with edgemoe.load(merged, engine="numpy") as a, edgemoe.load(dup, engine="numpy") as b:
        assert any(len(set(m)) < len(m) for m in a.spec.expert_map)  # some group really has several members
        assert b.spec.layer_expert_map(0) is None
        assert a.expert_bytes < b.expert_bytes
        seen = []
        la = a._engine.logits(_ids(), on_route=lambda layer, ids, w: seen.append((layer, ids)))
        lb = b.logits(_ids())
        # the ids include tokens whose top-k picked two members of one group (weights summed, one run)
        assert any((np.asarray(a.spec.expert_map[layer])[ids][:, 0] == np.asarray(a.spec.expert_map[layer])[ids][:, 1]
                    ).any() for layer, ids in seen)
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5 * np.abs(lb).max())


def test_prune_masks_experts_and_renormalizes(tiny_dir, calib_file, tmp_path):
    from edgemoe_export.merge_stage import export_merged

    out = export_merged(tiny_dir("olmoe"), tmp_path / "p.emoe", experts_per_layer=2, method="prune",
                        calib_path=calib_file, calib_tokens=512, seq_len=64, bits=32, show_progress=False)
    with edgemoe.load(out, engine="numpy") as m:
        assert m.spec.router_fn == "softmax" and not m.spec.norm_topk and m.spec.top_k == 2
        routes = []
        m._engine.logits(_ids(), on_route=lambda layer, ids, w: routes.append((layer, ids, w)))
        for layer, ids, w in routes:
            emap = np.asarray(m.spec.expert_map[layer])
            assert (emap >= 0).sum() == 2
            assert (emap[ids] >= 0).all()  # pruned experts are never selected
            # softmax over the two kept experts only: their weights sum to 1 (unmasked, they would sum to < 1)
            np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
        assert m.container.metadata["merge"]["method"] == "prune"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["mcsmoe", "average", "prune", "regmean", "reap"])
def test_export_merged_half_runs_on_every_family(family, method, tiny_dir, calib_file, tmp_path):
    from edgemoe_export.checkpoint import open_checkpoint
    from edgemoe_export.merge_stage import export_merged

    spec = open_checkpoint(tiny_dir(family)).spec
    out = export_merged(tiny_dir(family), tmp_path / "h.emoe", merge_ratio=0.5, method=method,
                        calib_path=calib_file, calib_tokens=512, seq_len=64, bits=16, show_progress=False)
    with edgemoe.load(out, engine="numpy") as m:
        counts = [m.spec.stored_experts(layer) for layer in range(spec.n_layers)]
        assert sum(counts) == round(0.5 * spec.n_experts * spec.n_layers)
        assert all(c >= (spec.top_k if method in ("prune", "reap") else 1) for c in counts)
        assert m.container.metadata["merge"]["group_counts"] == counts
        names = [n for n, t in m.container.tensors.items() if t.kind == "expert"]
        assert len(names) == 3 * sum(counts)
        logits = m.logits(_ids())
        assert logits.shape == (40, spec.vocab) and np.isfinite(logits).all()


def test_calibration_for_merging_uses_bounded_memory(tmp_path, calib_file):
    """The merge export holds O(1) layers of expert weights, not all of them (tracemalloc sees numpy buffers)."""
    import torch
    import transformers as tf
    from edgemoe_export.merge_stage import export_merged
    from tiny_models import _write_tokenizer

    n_layers, E, H, I = 8, 16, 32, 256
    cfg = tf.OlmoeConfig(vocab_size=320, hidden_size=H, num_hidden_layers=n_layers, intermediate_size=I,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=E, num_experts_per_tok=2,
                         max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)  # OLMoE's default ids (50279 ...) are outside this 320-token vocabulary
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    src = tmp_path / "deep"
    model.save_pretrained(src)
    _write_tokenizer(src, 320)
    del model
    layer_bytes = E * 3 * H * I * 4  # f32 experts of one layer
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        export_merged(src, tmp_path / "deep.emoe", merge_ratio=0.5, calib_path=calib_file, calib_tokens=256,
                      seq_len=64, bits=16, show_progress=False)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # the stream holds <= 2 layers at a layer boundary (the generator loads layer l+1 while l is referenced),
    # plus this layer's merged experts; keeping every layer would be 8 layers
    assert peak < 4 * layer_bytes, (peak, layer_bytes)
    with edgemoe.load(tmp_path / "deep.emoe", engine="numpy") as m:
        assert np.isfinite(m.logits(_ids(20))).all()


def test_export_merged_then_mwq(tiny_dir, calib_file, tmp_path):
    """Merge, then quantize: the stored experts become MWQ planes fitted on the groups' summed Grams."""
    from edgemoe_export.merge_stage import export_merged

    out = export_merged(tiny_dir("qwen3moe"), tmp_path / "q.emoe", merge_ratio=0.5, calib_path=calib_file,
                        calib_tokens=512, seq_len=64, bits=4, show_progress=False)
    with edgemoe.load(out, engine="numpy") as m:
        experts = [t for t in m.container.tensors.values() if t.kind == "expert"]
        assert experts and all(t.dtype == "mwq" and t.n_planes == 3 for t in experts)
        assert len(experts) == 3 * sum(m.spec.stored_experts(i) for i in range(m.spec.n_layers))
        assert np.isfinite(m.logits(_ids())).all()


def test_reap_saliency_is_router_weighted_output_norm_and_ranks_the_kept_experts(tiny_dir, calib_file, monkeypatch):
    """REAP: saliency_e = mean over the tokens routed to e of gate weight x ||f_e(x)||, recomputed here from the
    layer's MoE input (captured from the calibration pass) with the reference routing and each expert's FFN; `reap`
    keeps the most salient experts."""
    from edgemoe_export import calibrate as calmod
    from edgemoe_export.checkpoint import open_checkpoint
    from edgemoe_export.merge import merge_layer

    from edgemoe.reference import moe

    ck = open_checkpoint(tiny_dir("olmoe"))
    spec = ck.spec
    seqs = calmod.load_calibration_ids(ck.tokenizer_json, calib_file, 512, 64, spec.vocab)
    captured = {}

    def spy(spec_, layer, hn, router_x, w, names, on_route=None, on_expert=None):
        captured.setdefault(layer, (hn.copy(), router_x.copy(), w, names))
        return moe(spec_, layer, hn, router_x, w, names, on_route, on_expert)

    from edgemoe import reference

    monkeypatch.setattr(reference, "moe", spy)  # calibration runs the layer's FFN block through reference.moe
    cal = next(iter(calmod.calibrate(ck, seqs, collect_grams=False, show_progress=False, collect_saliency=True)))
    hn, router_x, w, names = captured[0]
    route = {}
    moe(spec, 0, hn, router_x, w, names, on_route=lambda _l, ids, wts: route.update(ids=ids, w=wts))
    want = np.zeros(spec.n_experts)
    for e in range(spec.n_experts):
        rows = np.nonzero((route["ids"] == e).any(axis=1))[0]
        gw = np.where(route["ids"][rows] == e, route["w"][rows], 0.0).sum(axis=1)
        y = ffn(spec, hn[rows], *(w(expert_tensor_name(0, e, m)) for m in ("gate", "up", "down")))
        want[e] = np.mean(gw * np.linalg.norm(y, axis=1)) if len(rows) else 0.0
    assert (want > 0).sum() >= spec.top_k
    np.testing.assert_allclose(cal.saliency, want, rtol=1e-4)
    n = spec.top_k
    _, emap = merge_layer(cal.experts, 0, spec, cal.freq, None, n, "reap", saliency=cal.saliency)
    kept = sorted(e for e in range(spec.n_experts) if emap[e] >= 0)
    assert kept == sorted(np.argsort(-want, kind="stable")[:n].tolist())
    with pytest.raises(ValueError, match="saliency"):
        merge_layer(cal.experts, 0, spec, cal.freq, None, n, "reap")
