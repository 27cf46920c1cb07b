"""Helpers for the ONNX and GGUF-reader tests: an onnxruntime generation loop, reference weights, merged containers,
GGUF rewriting (for bad-input files) and routing-gap-aware id sequences."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# onnxruntime


def ort_session(model_path: Path, exact_int4: bool = False):
    """exact_int4: onnxruntime fuses DequantizeLinear(int4, blocked) + MatMul into MatMulNBits with
    accuracy_level 4 (int8 activations) by default on the CPU EP; level 0 keeps fp32 activations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if exact_int4:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def empty_past(sess, batch: int = 1) -> dict:
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, n_kv, _, hd = i.shape
            past[i.name] = np.zeros((batch, n_kv, 0, hd), np.float32)
    return past


def ort_step(sess, ids, attention_mask, position_ids, past) -> tuple[np.ndarray, dict]:
    feed = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64),
            "position_ids": np.asarray(position_ids, np.int64), **past}
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feed)))
    present = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
    return out["logits"], present


def ort_greedy(sess, prompt, steps: int) -> tuple[list[int], np.ndarray]:
    """Prefill `prompt`, then `steps` greedy decode steps through the KV cache (batch 1).
    Returns (all ids: prompt + generated, logits [len(prompt) + steps, V] of every fed position)."""
    ids = [int(i) for i in prompt]
    logits, past = ort_step(sess, [ids], np.ones((1, len(ids))), [np.arange(len(ids))], empty_past(sess))
    rows = [logits[0]]
    for _ in range(steps):
        nxt = int(rows[-1][-1].argmax())
        ids.append(nxt)
        logits, past = ort_step(sess, [[nxt]], np.ones((1, len(ids))), [[len(ids) - 1]], past)
        rows.append(logits[0])
    return ids, np.concatenate(rows)


def ort_logits(model_path: Path, ids, exact_int4: bool = False) -> np.ndarray:
    sess = ort_session(model_path, exact_int4)
    ids = [int(i) for i in ids]
    return ort_step(sess, [ids], np.ones((1, len(ids))), [np.arange(len(ids))], empty_past(sess))[0][0]


def kl_div(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(p) || softmax(q)) in nats."""
    def logsm(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logsm(p_logits), logsm(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


# ---------------------------------------------------------------------------------------------------------------
# reference weights and routing gaps


def source_weights(src) -> tuple:
    """(spec, container name -> f32) of any Checkpoint-like source or HF directory."""
    from edgemoe_export.sources import open_source

    ck = open_source(src) if not hasattr(src, "layer_experts") else src
    w = dict(ck.global_tensors())
    for layer in range(ck.spec.n_layers):
        w.update(ck.layer_dense(layer))
        if ck.spec.is_moe_layer(layer):
            w.update(dict(ck.layer_experts(layer)))
    return ck.spec, w


def well_conditioned_ids(spec, weights: dict, min_gap: float, length: int = 16, tries: int = 300,
                         vocab_hi: int = 312) -> list[int]:
    """The first of a fixed series of random id sequences whose top-k routing has no near-tie (every k-th vs
    (k+1)-th router logit gap >= min_gap at every position and layer, by the NumPy reference on `weights`)."""
    import edgemoe.reference as ref

    smallest = [np.inf]
    orig_route = ref.route

    def recording_route(spec_, logits, *bias):
        srt = -np.sort(-logits, axis=-1)
        if srt.shape[-1] > spec_.top_k:
            smallest[0] = min(smallest[0], float((srt[:, spec_.top_k - 1] - srt[:, spec_.top_k]).min()))
        return orig_route(spec_, logits, *bias)

    ref.route = recording_route
    try:
        for seed in range(tries):
            ids = [int(i) for i in np.random.default_rng(2000 + seed).integers(3, vocab_hi, size=length)]
            smallest[0] = np.inf
            ref.reference_logits(spec, weights.__getitem__, ids)
            if smallest[0] >= min_gap:
                return ids
    finally:
        ref.route = orig_route
    raise AssertionError(f"no id sequence of {length} without a routing near-tie (< {min_gap}) in {tries} tries")


# ---------------------------------------------------------------------------------------------------------------
# merged containers built by hand


def write_merged_container(src_dir: Path, out: Path, maps: list[list[int]], bits: int = 32) -> Path:
    """A container of `src_dir`'s model with `maps[layer]` (e -> g, -1 pruned): group g stores the plain average of
    its members' expert matrices (the `average` merge; MC-SMoE's alignment is irrelevant to the format)."""
    import dataclasses

    from edgemoe_export import open_checkpoint

    from edgemoe.arch import EXPERT_MATRICES, expert_tensor_name
    from edgemoe.container import ContainerWriter

    ck = open_checkpoint(src_dir)
    spec = dataclasses.replace(ck.spec, expert_map=[list(m) for m in maps])
    np_dtype, dtype = (np.float32, "f32") if bits == 32 else (np.float16, "f16")
    with ContainerWriter(out, spec, {"source": src_dir.name, "merge": {"method": "average (test)"}}) as w:
        if ck.tokenizer_json is not None:
            w.add_tensor("tokenizer.json", np.frombuffer(ck.tokenizer_json, np.uint8), "bytes", kind="blob")
        for name, arr in ck.global_tensors().items():
            w.add_tensor(name, arr.astype(np.float32), "f32")
        for layer in range(spec.n_layers):
            for name, arr in ck.layer_dense(layer).items():
                w.add_tensor(name, arr.astype(np.float32), "f32")
        for layer in range(spec.n_layers):
            experts = dict(ck.layer_experts(layer))
            m = maps[layer]
            for g in range(max(m) + 1):
                members = [e for e, gg in enumerate(m) if gg == g]
                for mx in EXPERT_MATRICES:
                    avg = np.mean([experts[expert_tensor_name(layer, e, mx)] for e in members], axis=0)
                    w.add_tensor(expert_tensor_name(layer, g, mx), avg.astype(np_dtype), dtype, kind="expert")
    return out


# ---------------------------------------------------------------------------------------------------------------
# GGUF rewriting (bad-input files, other tensor types)


def rewrite_gguf(src: Path, dst: Path, arch: str | None = None, kv: dict | None = None, drop=(), tensor_fn=None) -> Path:
    """Copy a GGUF, optionally renaming the architecture (and its key prefix), overriding / dropping keys, and
    transforming tensors: tensor_fn(name, f32 array) -> None (drop) | (name, array, raw_dtype or None)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    old_arch = r.fields["general.architecture"].contents()
    arch = arch or old_arch
    w = gguf.GGUFWriter(str(dst), arch)
    kv = dict(kv or {})
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        new_key = arch + key[len(old_arch):] if key.startswith(old_arch + ".") else key
        if key in kv or new_key in kv:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(new_key, f.contents(), vtype, sub_type=sub)
    for key, (val, vtype) in kv.items():
        w.add_key_value(key, val, vtype)
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        arr = arr.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if tensor_fn is None:
            res = (t.name, arr, None)
        else:
            res = tensor_fn(t.name, arr)
            if res is None:
                continue
        name, data, raw = res
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, raw), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
