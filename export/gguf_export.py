"""`edgemoe export --gguf`: a Hugging Face MoE checkpoint -> a GGUF file that llama.cpp loads.

Written with gguf-py's `GGUFWriter` (never `convert_hf_to_gguf.py`, which rejects locally trained tokenizers), and
streamed: tensor infos are planned from the architecture description, then the checkpoint is read one layer at a
time, each layer's experts stacked into `blk.N.ffn_{gate,up,down}_exps` ([E, out, in] in NumPy order, which ggml
reads as {in, out, E}).

llama.cpp architectures: olmoe, qwen2moe, qwen3moe, llama (Mixtral; Q/K rows permuted to llama.cpp's adjacent-pair
RoPE), smallthinker, granitemoe (Granite-MoE and its shared variant; Q/K permuted as for llama), glm4moe,
ernie4_5-moe, gpt-oss, lfm2moe (LFM2-MoE: conv layers marked by a KV head count of 0). Whatever llama.cpp's graph
for the architecture cannot express (GQA in `olmoe`, top-k renormalization it does not do, dense layers, SmallThinker
layouts other than the one it hard-codes) is refused with an `EdgeMoEError` rather than written as a file that loads
and computes something else.

Types: F32, F16 (1-D tensors and routers stay F32), Q8_0 and Q4_0 (gguf-py's quantizer, for matrices whose rows are a
multiple of 32 values; other matrices are stored F16 and listed in a warning; Q4_0 keeps `output.weight` at Q8_0
as llama.cpp's own quantizer keeps the output head at higher precision), Q4_K_M (an F16 GGUF re-quantized by
llama.cpp's `llama_model_quantize`, which needs llama-cpp-python).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.arch import EXPERT_MATRICES, GLOBAL_TENSORS, ArchSpec, dense_tensor_names, expert_tensor_name
from edgemoe.errors import EdgeMoEError

from . import gguf_gemma4, gguf_qwen35
from .checkpoint import Checkpoint, expected_shapes, expert_shape, open_checkpoint
from .llama_cpp_names import (
    GPT_OSS_SWIGLU,
    LLAMA_CPP_ARCH,
    SMALLTHINKER_SWA_PERIOD,
    SMALLTHINKER_SWA_WINDOW,
    SPLIT_REGEX_PRE,
    gguf_tensor_name,
)
from .progress import progress

# Q4_0_Q8_0: per-tensor types, experts Q4_0 and every other matrix Q8_0 (MWQ experts + Q8_0 dense, llama.cpp side)
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q4_0_Q8_0")

@dataclass
class _Planned:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # logical NumPy shape
    qtype: object  # gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------------------------
# checks: what llama.cpp's graph for each architecture can express


def _check_glm4moe(spec: ArchSpec, where: str) -> None:
    """llama.cpp's glm4moe: sigmoid router with exp_probs_b, no group limit, leading dense layers, shared experts a
    whole multiple of the expert width."""
    if spec.router_fn != "sigmoid" or not spec.score_bias or spec.activation != "swiglu":
        raise EdgeMoEError(f"{where}: llama.cpp's glm4moe expects SwiGLU experts and a sigmoid router with a "
                           "selection bias")
    if spec.n_group > 1:
        raise EdgeMoEError(f"{where}: group-limited routing (n_group = {spec.n_group}, topk_group = "
                           f"{spec.topk_group}) is not implemented by llama.cpp's glm4moe graph")
    if spec.dense_layers != list(range(len(spec.dense_layers))):
        raise EdgeMoEError(f"{where}: llama.cpp's glm4moe needs the dense layers first (0..k-1), got "
                           f"{spec.dense_layers}")
    if spec.shared_ffn % spec.expert_ffn:
        raise EdgeMoEError(f"{where}: llama.cpp's glm4moe sizes the shared expert as a whole number of experts "
                           f"(shared_ffn = {spec.shared_ffn}, expert_ffn = {spec.expert_ffn})")


def _ernie_moe_layout(spec: ArchSpec) -> tuple[int, int] | None:
    """(leading dense blocks, MoE layer step) for llama.cpp's ernie4_5-moe (layer i is MoE when i >= lead and
    (i + 1) % step == 0); None if the spec's MoE layers cannot be written that way."""
    moe = [i for i in range(spec.n_layers) if spec.is_moe_layer(i)]
    if not moe:
        return None
    # The pinned llama.cpp's loader wants MoE tensors in every layer from the lead on, whatever the step: so step 1
    # (ERNIE-4.5-21B-A3B's layout), i.e. dense layers first, then MoE layers to the end.
    return (moe[0], 1) if moe == list(range(moe[0], spec.n_layers)) else None


def _check_ernie45moe(spec: ArchSpec, where: str) -> None:
    """llama.cpp's ernie4_5-moe: softmax router with exp_probs_b, renormalized, unscaled, no groups, NORM RoPE over
    whole heads, MoE layers from a start index at a fixed step up to the last layer."""
    if (spec.router_fn != "softmax" or not spec.score_bias or not spec.norm_topk or spec.routed_scaling != 1.0
            or spec.n_group > 1 or spec.activation != "swiglu"):
        raise EdgeMoEError(f"{where}: llama.cpp's ernie4_5-moe expects SwiGLU experts, a softmax router with a "
                           "selection bias, renormalized and unscaled weights, and no expert groups")
    if spec.rope_kind != "norm" or spec.rope_dim != spec.head_dim or spec.qk_norm != "none":
        raise EdgeMoEError(f"{where}: llama.cpp's ernie4_5-moe rotates adjacent pairs over whole heads, without "
                           "QK-norm")
    if _ernie_moe_layout(spec) is None:
        raise EdgeMoEError(f"{where}: the pinned llama.cpp's ernie4_5-moe loader needs every layer after the leading "
                           f"dense ones to be MoE (moe_layer_interval 1); dense layers {spec.dense_layers} of "
                           f"{spec.n_layers} do not follow that rule")


def _check_lfm2moe(spec: ArchSpec, where: str) -> None:
    """llama.cpp's lfm2moe: conv layers of at least 2 taps, GQA attention with per-head QK-norm and q/o projections
    hidden x hidden, dense layers first, a sigmoid router with exp_probs_b, renormalized and unscaled weights."""
    if not spec.conv_layers or spec.conv_kernel < 2:
        raise EdgeMoEError(f"{where}: llama.cpp's lfm2moe needs conv layers of at least 2 taps (conv_kernel = "
                           f"{spec.conv_kernel})")
    if spec.n_heads * spec.head_dim != spec.hidden:
        raise EdgeMoEError(f"{where}: llama.cpp's lfm2moe sizes attn_q and attn_output as n_embd x n_embd, so it "
                           f"needs num_attention_heads * head_dim == hidden_size ({spec.n_heads}*{spec.head_dim} != "
                           f"{spec.hidden})")
    if spec.dense_layers != list(range(len(spec.dense_layers))):
        raise EdgeMoEError(f"{where}: llama.cpp's lfm2moe needs the dense layers first (0..k-1), got "
                           f"{spec.dense_layers}")
    if (spec.router_fn != "sigmoid" or not spec.score_bias or not spec.norm_topk or spec.routed_scaling != 1.0
            or spec.n_group > 1 or spec.qk_norm != "head" or spec.activation != "swiglu"):
        raise EdgeMoEError(f"{where}: llama.cpp's lfm2moe expects SwiGLU experts, a sigmoid router with a "
                           "selection bias, renormalized weights without routed scaling, and per-head QK-norm")
def _check_deepseek2(spec: ArchSpec, where: str) -> None:
    """llama.cpp's deepseek2 (MLA): adjacent-pair RoPE, dense layers first, shared experts a whole number of experts,
    softmax routing (V2) or sigmoid with a selection bias (V3), groups scored by their two best (V3), one RMSNorm eps
    for every norm, no YaRN (its softmax mscale and log multiplier are not written yet)."""
    if not spec.kv_lora_rank or spec.rope_kind != "norm" or spec.activation != "swiglu":
        raise EdgeMoEError(f"{where}: llama.cpp's deepseek2 expects Multi-head Latent Attention with RoPE over "
                           "adjacent pairs (rope_interleave) and SwiGLU experts")
    if spec.router_fn == "sigmoid" and not spec.score_bias or spec.router_fn == "softmax" and spec.score_bias:
        raise EdgeMoEError(f"{where}: llama.cpp's deepseek2 expects a softmax router (V2) or a sigmoid router with a "
                           "selection bias (V3)")
    if spec.n_group > 1 and spec.group_score != "top2_sum":
        raise EdgeMoEError(f"{where}: DeepSeek-V2's group-limited greedy routing (groups scored by their best expert) "
                           "is not what llama.cpp's deepseek2 computes (the sum of a group's two best); export to the "
                           "edgemoe container, which runs it")
    if spec.dense_layers != list(range(len(spec.dense_layers))) or spec.shared_ffn % spec.expert_ffn:
        raise EdgeMoEError(f"{where}: llama.cpp's deepseek2 needs the dense layers first (got {spec.dense_layers}) and "
                           f"a shared expert of whole experts (shared_ffn = {spec.shared_ffn}, expert_ffn = "
                           f"{spec.expert_ffn})")
    if spec.rope_scaling == "none" and spec.attn_scale:
        raise EdgeMoEError(f"{where}: a softmax scale other than 1/sqrt(head_dim) without YaRN is not expressible in "
                           "llama.cpp's deepseek2")
    if spec.rope_scaling == "yarn" and (spec.rope_attn_factor != 1.0 or not spec.yarn_truncate):
        raise EdgeMoEError(f"{where}: llama.cpp's deepseek2 YaRN needs mscale == mscale_all_dim (cos/sin unscaled; "
                           f"this model scales them by {spec.rope_attn_factor:g}) and a truncated correction range")
    if spec.mla_norm_eps != spec.norm_eps:
        raise EdgeMoEError(f"{where}: llama.cpp's deepseek2 uses rms_norm_eps = {spec.norm_eps:g} for the q_a / kv_a "
                           f"norms too, the model {spec.mla_norm_eps:g}: its logits would differ")


def _check_supported(spec: ArchSpec, arch: str) -> None:
    fam = spec.family
    where = f"GGUF export ({fam} -> llama.cpp '{arch}')"
    if arch == "lfm2moe":
        return _check_lfm2moe(spec, where)
    if arch == "deepseek2":
        return _check_deepseek2(spec, where)
    if arch == "glm4moe":
        return _check_glm4moe(spec, where)
    if arch == "ernie4_5-moe":
        return _check_ernie45moe(spec, where)
    if arch == gguf_qwen35.ARCH:
        return gguf_qwen35.check(spec, where)
    if spec.linear_attn_layers or spec.attn_gate:
        raise EdgeMoEError(f"{where}: linear-attention layers and gated attention are not supported by llama.cpp's "
                           f"'{arch}'")
    if arch == "gemma4":
        return gguf_gemma4.check(spec, where)
    if spec.score_bias or spec.n_group > 1 or spec.routed_scaling != 1.0:
        raise EdgeMoEError(f"{where}: DeepSeek-V3-style routing is not supported by llama.cpp's '{arch}'")
    if spec.rope_dim != spec.head_dim:
        raise EdgeMoEError(f"{where}: partial RoPE (rope_dim={spec.rope_dim} < head_dim={spec.head_dim}) is not "
                           "supported")
    if arch == "gpt-oss":
        _check_gpt_oss(spec, where)
        return
    if spec.attn_sinks or spec.o_bias or spec.router_bias or spec.expert_bias or spec.rope_scaling != "none":
        raise EdgeMoEError(f"{where}: attention sinks, o/router/expert biases and YaRN are gpt-oss options that "
                           f"llama.cpp's '{arch}' does not have")
    if arch != "smallthinker" and (spec.nope_layers or spec.swa_layers):
        raise EdgeMoEError(f"{where}: NoPE or sliding-window layers are not supported by llama.cpp's '{arch}'")
    if arch in ("olmoe", "qwen3moe", "llama", "smallthinker", "granitemoe") and spec.dense_layers:
        raise EdgeMoEError(f"{where}: dense (non-MoE) layers {spec.dense_layers} are not supported by llama.cpp's "
                           f"'{arch}' graph, which makes every layer an MoE layer")
    if arch == "olmoe":
        if spec.n_kv_heads != spec.n_heads:
            raise EdgeMoEError(
                f"{where}: llama.cpp's olmoe cannot run grouped-query attention: its attn_k_norm is n_embd wide, "
                f"so num_key_value_heads ({spec.n_kv_heads}) must equal num_attention_heads ({spec.n_heads}). "
                "Export this model to the edgemoe container instead, which supports it."
            )
        if spec.n_heads * spec.head_dim != spec.hidden:
            raise EdgeMoEError(f"{where}: llama.cpp's olmoe needs num_attention_heads * head_dim == hidden_size "
                               f"({spec.n_heads}*{spec.head_dim} != {spec.hidden})")
        if spec.norm_topk:
            raise EdgeMoEError(f"{where}: norm_topk_prob=true is not supported: llama.cpp's olmoe does not "
                               "renormalize the top-k weights")
    if arch == "qwen2moe":
        if spec.norm_topk:
            raise EdgeMoEError(f"{where}: norm_topk_prob=true is not supported: llama.cpp's qwen2moe does not "
                               "renormalize the top-k weights")
        if spec.dense_layers:
            raise EdgeMoEError(f"{where}: dense layers (decoder_sparse_step > 1 or mlp_only_layers) "
                               f"{spec.dense_layers} are not supported by llama.cpp's qwen2moe")
        if spec.n_heads * spec.head_dim != spec.hidden:
            raise EdgeMoEError(f"{where}: llama.cpp's qwen2moe sizes attn_q as n_embd x n_embd, so it needs "
                               f"num_attention_heads * head_dim == hidden_size ({spec.n_heads}*{spec.head_dim} != "
                               f"{spec.hidden})")
        if not spec.shared_ffn or not spec.shared_gate:
            raise EdgeMoEError(f"{where}: llama.cpp's qwen2moe expects a gated shared expert "
                               "(shared_expert_intermediate_size > 0)")
    if arch == "qwen3moe" and not spec.norm_topk:
        raise EdgeMoEError(f"{where}: norm_topk_prob=false is not supported: llama.cpp's qwen3moe always "
                           "renormalizes the top-k weights")
    if arch in ("llama", "smallthinker", "granitemoe") and not spec.norm_topk:
        raise EdgeMoEError(f"{where}: llama.cpp's '{arch}' always renormalizes the top-k weights")
    if arch != "smallthinker" and (spec.activation != "swiglu" or spec.router_input != "ffn_norm"
                                   or spec.router_fn != "softmax"):
        raise EdgeMoEError(f"{where}: llama.cpp's '{arch}' uses SwiGLU experts and a softmax router on the "
                           "normed FFN input")
    if arch not in ("qwen2moe", "granitemoe") and spec.shared_ffn:
        raise EdgeMoEError(f"{where}: shared experts are not supported by llama.cpp's '{arch}'")
    if arch == "granitemoe" and (spec.shared_gate or spec.qkv_bias or spec.qk_norm != "none"):
        raise EdgeMoEError(f"{where}: llama.cpp's granitemoe has no shared-expert gate, QKV bias or QK-norm")
    scaled = (spec.embed_scale, spec.attn_scale, spec.residual_scale, spec.logit_divisor) != (1.0, 0.0, 1.0, 1.0)
    if arch != "granitemoe" and scaled:
        raise EdgeMoEError(f"{where}: embedding / attention / residual / logit scalings are not supported by "
                           f"llama.cpp's '{arch}'")
    if arch == "smallthinker":
        if spec.activation != "reglu" or spec.router_input != "layer_input":
            raise EdgeMoEError(f"{where}: llama.cpp's smallthinker uses ReGLU experts routed on the layer input")
        if spec.qkv_bias or spec.qk_norm != "none":
            raise EdgeMoEError(f"{where}: QKV bias / QK-norm are not supported by llama.cpp's smallthinker")
        _smallthinker_swa(spec, where)


def _check_gpt_oss(spec: ArchSpec, where: str) -> None:
    """What llama.cpp's gpt-oss graph hard-codes: sliding window on even layers, SwiGLU alpha 1.702 / limit 7,
    YaRN with a truncated correction range, every bias and the sinks, softmax over the top-k logits."""
    even = [i for i in range(spec.n_layers) if i % 2 == 0]
    if sorted(spec.swa_layers) != even or not spec.sliding_window:
        raise EdgeMoEError(f"{where}: llama.cpp's gpt-oss uses sliding-window attention on the even layers {even}; "
                           f"this model has it on {sorted(spec.swa_layers)} (window {spec.sliding_window})")
    if (spec.swiglu_alpha, spec.swiglu_limit) != GPT_OSS_SWIGLU:
        raise EdgeMoEError(f"{where}: llama.cpp's gpt-oss hard-codes swiglu alpha, limit = {GPT_OSS_SWIGLU}; this "
                           f"model has {spec.swiglu_alpha}, {spec.swiglu_limit}")
    if spec.rope_scaling == "yarn" and not spec.yarn_truncate:  # the published gpt-oss configs: warn, do not refuse
        warnings.warn(f"{where}: llama.cpp always rounds YaRN's correction range (truncate=true) while this model's "
                      "rope_parameters.truncate is false: llama.cpp will compute slightly different RoPE frequencies "
                      "than transformers and edgemoe (2e-3 relative logits on the tiny test model)", stacklevel=3)
    if spec.rope_dim != spec.head_dim or not (spec.attn_sinks and spec.qkv_bias and spec.o_bias and spec.router_bias
                                               and spec.expert_bias and spec.norm_topk):
        raise EdgeMoEError(f"{where}: llama.cpp's gpt-oss needs full RoPE, sinks, every bias and top-k softmax")


def _smallthinker_swa(spec: ArchSpec, where: str) -> bool:
    """True when the model uses llama.cpp's hybrid layout (SWA + NoPE), False for RoPE + full attention throughout;
    raises for any other layout, which llama.cpp's smallthinker cannot express."""
    swa = sorted(spec.swa_layers) if spec.sliding_window else []
    nope = sorted(spec.nope_layers)
    if not swa and not nope:
        return False
    p = SMALLTHINKER_SWA_PERIOD
    want_swa = [i for i in range(spec.n_layers) if i % p != 0]
    want_nope = [i for i in range(spec.n_layers) if i % p == 0]
    if swa != want_swa or nope != want_nope or spec.sliding_window != SMALLTHINKER_SWA_WINDOW:
        raise EdgeMoEError(
            f"{where}: llama.cpp's smallthinker hard-codes its hybrid attention layout: sliding-window attention "
            f"with a window of {SMALLTHINKER_SWA_WINDOW} on layers i % {p} != 0 and full attention without RoPE "
            f"on layers i % {p} == 0 (or RoPE and full attention everywhere). This model has sliding-window "
            f"layers {swa} (window {spec.sliding_window}) and NoPE layers {nope}; export it to the edgemoe "
            "container instead."
        )
    return True


# ---------------------------------------------------------------------------------------------------------------
# tokenizer metadata


def _pre_tokenizer_name(tok: dict) -> str:
    pt = tok.get("pre_tokenizer") or {}
    norm = tok.get("normalizer")
    if norm is not None and norm.get("type") not in ("NFC",):
        raise EdgeMoEError(f"tokenizer.json: normalizer {norm.get('type')!r} is not supported for GGUF; "
                           "use tokenizer='none'")
    if pt.get("type") == "ByteLevel":
        if pt.get("add_prefix_space"):
            raise EdgeMoEError("tokenizer.json: ByteLevel(add_prefix_space=true) has no llama.cpp equivalent; "
                               "use tokenizer='none'")
        if pt.get("use_regex", True):
            return "gpt-2"
    if pt.get("type") == "Sequence":
        items = pt.get("pretokenizers") or []
        if (len(items) == 2 and items[0].get("type") == "Split" and items[1].get("type") == "ByteLevel"
                and not items[1].get("use_regex", True) and not items[1].get("add_prefix_space")):
            regex = (items[0].get("pattern") or {}).get("Regex")
            if regex in SPLIT_REGEX_PRE:
                return SPLIT_REGEX_PRE[regex]
    raise EdgeMoEError(
        f"tokenizer.json: pre-tokenizer {json.dumps(pt)[:200]} is not one llama.cpp knows "
        "(supported: ByteLevel with the GPT-2 regex, Qwen2 and Llama-3 Split regexes); "
        "use tokenizer='none' to write the GGUF without a tokenizer"
    )


def _tokenizer_fields(tokenizer_json: bytes, n_vocab: int) -> dict:
    """tokenizer.json (byte-level BPE) -> the gpt2-model GGUF tokenizer fields."""
    import gguf

    try:
        tok = json.loads(tokenizer_json)
    except ValueError as e:
        raise EdgeMoEError(f"tokenizer.json: not valid JSON ({e})") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise EdgeMoEError(
            f"tokenizer.json: model type {model.get('type')!r}{' with byte_fallback' if model.get('byte_fallback') else ''}"
            " is not supported for GGUF export (only byte-level BPE); use tokenizer='none'"
        )
    pre = _pre_tokenizer_name(tok)
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types: dict[int, int] = {i: int(gguf.TokenType.NORMAL) for i in by_id}
    for added in tok.get("added_tokens") or []:
        i = int(added["id"])
        by_id[i] = added["content"]
        types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    top = max(by_id) + 1 if by_id else 0
    if top > n_vocab:
        raise EdgeMoEError(f"tokenizer.json has token id {top - 1}, but the model's vocabulary has {n_vocab} rows")
    tokens, token_types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
        else:  # embedding rows without a token (vocabularies padded to a round size)
            tokens.append(f"[PAD{i}]")
            token_types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise EdgeMoEError("tokenizer.json: BPE model has no merges; llama.cpp cannot load a gpt2 tokenizer without")
    return {"pre": pre, "tokens": tokens, "types": token_types, "merges": merges}


# ---------------------------------------------------------------------------------------------------------------
# tensor plan


def _permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp NORM (adjacent pairs) row order, per head (Mixtral's q/k)."""
    out_dim = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, 2, out_dim // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _storage_type(name: str, shape: tuple[int, ...], gguf_type: str, fallbacks: list[str]):
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or name.endswith(("ffn_gate_inp.weight", ".bias", "ssm_conv1d.weight")):  # norms, biases, routers, conv taps: exact
        return Q.F32
    if name.endswith("shortconv.conv.weight"):  # llama.cpp's ssm_conv reads its taps as F32 only (asserts otherwise)
        return Q.F32
    if gguf_type == "F32":
        return Q.F32
    if gguf_type in ("F16", "Q4_K_M"):  # Q4_K_M: written F16, then re-quantized by llama.cpp
        return Q.F16
    q8 = gguf_type == "Q8_0" or name == GLOBAL_TENSORS["lm_head"] or (gguf_type == "Q4_0_Q8_0" and "_exps." not in name)
    want = Q.Q8_0 if q8 else Q.Q4_0
    if shape[-1] % 32:
        fallbacks.append(f"{name} {list(shape)}")
        return Q.F16
    return want


def _plan(spec: ArchSpec, arch: str, gguf_type: str, write_output: bool) -> tuple[list[_Planned], list[str]]:
    fallbacks: list[str] = []
    plan: list[_Planned] = []

    def add(name, shape):
        plan.append(_Planned(name, tuple(shape), _storage_type(name, tuple(shape), gguf_type, fallbacks)))

    add(GLOBAL_TENSORS["embed"], (spec.vocab, spec.hidden))
    add(gguf_tensor_name(arch, GLOBAL_TENSORS["final_norm"]), (spec.hidden,))
    if write_output:
        add(GLOBAL_TENSORS["lm_head"], (spec.vocab, spec.hidden))
    for name, arr in gguf_gemma4.global_tensors(spec) if arch == "gemma4" else ():
        add(name, arr.shape)
    for layer in range(spec.n_layers):
        shapes = expected_shapes(spec, layer)
        if arch == gguf_qwen35.ARCH:
            for name, shape in gguf_qwen35.layer_tensors(spec, layer, dense_tensor_names(spec, layer), None):
                add(name, shape)
        for role, name in dense_tensor_names(spec, layer).items() if arch != gguf_qwen35.ARCH else ():
            if role == "wkv_b":  # llama.cpp: per head W_kb^T [kv_lora_rank, nope] and W_vb [v_head_dim, kv_lora_rank]
                nh, kl = spec.n_heads, spec.kv_lora_rank
                add(f"blk.{layer}.attn_k_b.weight", (nh, kl, spec.qk_nope_dim))
                add(f"blk.{layer}.attn_v_b.weight", (nh, spec.v_head_dim, kl))
                continue
            add(gguf_tensor_name(arch, name), shapes[role])
        for name, arr in gguf_gemma4.layer_tensors(spec, layer) if arch == "gemma4" else ():
            add(name, arr.shape)
        if spec.is_moe_layer(layer) and arch == "gemma4":
            stacks = {m: np.empty((spec.n_experts, *expert_shape(spec, m)), np.float32) for m in EXPERT_MATRICES}
            for name, arr in gguf_gemma4.expert_stacks(stacks, layer):
                add(name, arr.shape)
        elif spec.is_moe_layer(layer):
            for m in EXPERT_MATRICES:
                add(f"blk.{layer}.ffn_{m}_exps.weight", (spec.n_experts, *expert_shape(spec, m)))
    return plan, fallbacks


def _tensor_stream(ckpt: Checkpoint, arch: str, write_output: bool, show_progress: bool):
    """Yield (GGUF name, f32 array) in plan order, one layer in memory at a time."""
    spec = ckpt.spec
    glob = ckpt.global_tensors()
    yield GLOBAL_TENSORS["embed"], glob[GLOBAL_TENSORS["embed"]]
    yield gguf_tensor_name(arch, GLOBAL_TENSORS["final_norm"]), glob[GLOBAL_TENSORS["final_norm"]]
    if write_output:
        yield GLOBAL_TENSORS["lm_head"], glob.get(GLOBAL_TENSORS["lm_head"], glob[GLOBAL_TENSORS["embed"]])
    del glob
    yield from gguf_gemma4.global_tensors(spec) if arch == "gemma4" else ()
    for layer in progress(range(spec.n_layers), "GGUF layers", show_progress):
        names = dense_tensor_names(spec, layer)
        dense = ckpt.layer_dense(layer)
        if arch == gguf_qwen35.ARCH:
            yield from gguf_qwen35.layer_tensors(spec, layer, names, dense)
            names = {}
        for role, name in names.items():
            arr = dense[name]
            if arch in ("llama", "granitemoe") and role in ("wq", "wk"):  # both rotate adjacent pairs
                arr = _permute_rope_rows(arr, spec.n_heads if role == "wq" else spec.n_kv_heads)
            if role == "wkv_b":  # split per head into its key rows (transposed) and its value rows
                kv = arr.reshape(spec.n_heads, spec.qk_nope_dim + spec.v_head_dim, spec.kv_lora_rank)
                yield f"blk.{layer}.attn_k_b.weight", np.ascontiguousarray(kv[:, : spec.qk_nope_dim].swapaxes(1, 2))
                yield f"blk.{layer}.attn_v_b.weight", np.ascontiguousarray(kv[:, spec.qk_nope_dim:])
                continue
            yield gguf_tensor_name(arch, name), arr
        del dense
        yield from gguf_gemma4.layer_tensors(spec, layer) if arch == "gemma4" else ()
        if spec.is_moe_layer(layer):
            stacks = {m: np.empty((spec.n_experts, *expert_shape(spec, m)), np.float32) for m in EXPERT_MATRICES}
            where = {expert_tensor_name(layer, e, m): (e, m) for e in range(spec.n_experts) for m in EXPERT_MATRICES}
            for name, arr in ckpt.layer_experts(layer):
                e, m = where[name]
                stacks[m][e] = arr
            if arch == "gemma4":
                yield from gguf_gemma4.expert_stacks(stacks, layer)
            else:
                for m in EXPERT_MATRICES:
                    yield f"blk.{layer}.ffn_{m}_exps.weight", stacks[m]
            del stacks


def _encode(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf
    from gguf import GGMLQuantizationType as Q

    if qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


# ---------------------------------------------------------------------------------------------------------------
# writer


def _write_metadata(w, spec: ArchSpec, arch: str, ckpt: Checkpoint, gguf_type: str, tok: dict | None) -> None:
    import gguf

    w.add_name(Path(ckpt.path).resolve().name)
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.max_position)
    w.add_embedding_length(spec.hidden)
    w.add_head_count(spec.n_heads)
    if arch not in ("gemma4", "deepseek2"):  # gemma4: per-layer-kind sizes (gguf_gemma4.metadata); deepseek2: below
        # lfm2moe tells conv layers by a KV head count of 0
        w.add_head_count_kv([0 if i in spec.conv_layers else spec.n_kv_heads for i in range(spec.n_layers)]
                            if arch == "lfm2moe" else spec.n_kv_heads)
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if arch != "gemma4":
        w.add_rope_dimension_count(spec.rope_dim)
        w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(spec.vocab)
    w.add_expert_count(spec.n_experts)
    w.add_expert_used_count(spec.top_k)
    # llama.cpp's olmoe and llama take the expert width from feed_forward_length; the others from
    # expert_feed_forward_length. Writing both is what the upstream converters do.
    dense_width = arch in ("qwen2moe", "glm4moe", "ernie4_5-moe", "lfm2moe", "deepseek2")  # feed_forward_length = the dense MLP's width
    if arch != "gemma4":
        w.add_feed_forward_length(spec.expert_ffn if not dense_width else (spec.dense_ffn or spec.expert_ffn))
    w.add_expert_feed_forward_length(spec.expert_ffn)
    if arch == "qwen2moe" or (arch == "granitemoe" and spec.shared_ffn):
        w.add_expert_shared_feed_forward_length(spec.shared_ffn)
    if arch == "granitemoe":  # llama.cpp's names for Granite's multipliers; attention.scale 0 = 1/sqrt(head_dim)
        w.add_embedding_scale(spec.embed_scale)
        w.add_residual_scale(spec.residual_scale)
        w.add_attention_scale(spec.attn_scale)
        w.add_logit_scale(spec.logit_divisor)
    if arch == "glm4moe":
        w.add_expert_shared_count(spec.shared_ffn // spec.expert_ffn)
        w.add_leading_dense_block_count(len(spec.dense_layers))
        w.add_expert_weights_scale(spec.routed_scaling)
        w.add_expert_weights_norm(spec.norm_topk)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_nextn_predict_layers(0)  # the MTP layers are not exported
    if arch == "deepseek2":  # MLA as llama.cpp runs it: MQA over the latent (one KV head of kv_lora_rank + rope)
        w.add_head_count_kv(1)
        w.add_key_length(spec.kv_lora_rank + spec.rope_dim)
        w.add_value_length(spec.kv_lora_rank)
        w.add_key_length_mla(spec.head_dim)
        w.add_value_length_mla(spec.v_head_dim)
        w.add_q_lora_rank(spec.q_lora_rank)
        w.add_kv_lora_rank(spec.kv_lora_rank)
        w.add_leading_dense_block_count(len(spec.dense_layers))
        w.add_expert_shared_count(spec.shared_ffn // spec.expert_ffn)
        w.add_expert_weights_scale(spec.routed_scaling)
        w.add_expert_weights_norm(spec.norm_topk)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX if spec.router_fn == "softmax"
                                 else gguf.ExpertGatingFuncType.SIGMOID)
        if spec.rope_scaling == "yarn":  # the softmax mscale^2 as llama.cpp derives it: 1 + log_mul * ln(factor)
            mscale = math.sqrt((spec.attn_scale or spec.head_dim ** -0.5) * math.sqrt(spec.head_dim))
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(spec.rope_factor)
            w.add_rope_scaling_orig_ctx_len(spec.yarn_orig_ctx)
            w.add_rope_scaling_yarn_beta_fast(spec.yarn_beta_fast)
            w.add_rope_scaling_yarn_beta_slow(spec.yarn_beta_slow)
            w.add_rope_scaling_yarn_log_mul((mscale - 1.0) / math.log(spec.rope_factor) if spec.rope_factor > 1 else 0.0)
        if spec.n_group > 1:
            w.add_expert_group_count(spec.n_group)
            w.add_expert_group_used_count(spec.topk_group)
    if arch == "ernie4_5-moe":
        lead, step = _ernie_moe_layout(spec)
        w.add_leading_dense_block_count(lead)
        w.add_interleave_moe_layer_step(step)
        w.add_expert_shared_feed_forward_length(spec.shared_ffn)
    if arch == "gpt-oss":
        w.add_sliding_window(spec.sliding_window)
        if spec.rope_scaling == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(spec.rope_factor)
            w.add_rope_scaling_orig_ctx_len(spec.yarn_orig_ctx)
            w.add_rope_scaling_yarn_beta_fast(spec.yarn_beta_fast)
            w.add_rope_scaling_yarn_beta_slow(spec.yarn_beta_slow)
    if arch == gguf_qwen35.ARCH:
        gguf_qwen35.write_metadata(w, spec)
    if arch == "lfm2moe":
        w.add_shortconv_l_cache(spec.conv_kernel)
        w.add_leading_dense_block_count(len(spec.dense_layers))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if arch == "gemma4":
        gguf_gemma4.metadata(w, spec)
    if arch == "smallthinker":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX if spec.router_fn == "softmax"
                                 else gguf.ExpertGatingFuncType.SIGMOID)
        if _smallthinker_swa(spec, "GGUF export"):
            w.add_sliding_window(spec.sliding_window)
    ftype = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_0_Q8_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_K_M": gguf.LlamaFileType.MOSTLY_F16}[gguf_type]
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tok is None:
        w.add_tokenizer_model("none")
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        w.add_add_bos_token(False)
    if spec.bos_token_id is not None and 0 <= spec.bos_token_id < spec.vocab:
        w.add_bos_token_id(spec.bos_token_id)
    if spec.eos_token_id is not None and 0 <= spec.eos_token_id < spec.vocab:
        w.add_eos_token_id(spec.eos_token_id)
    pad = ckpt.config.get("pad_token_id")
    if isinstance(pad, int) and 0 <= pad < spec.vocab:
        w.add_pad_token_id(pad)
    template = getattr(ckpt, "chat_metadata", {}).get("chat_template")
    if template:  # llama.cpp (and edgemoe reading this GGUF back) format chats with it
        w.add_chat_template(template)


def _write_gguf(ckpt: Checkpoint, path: Path, gguf_type: str, tokenizer: str, show_progress: bool) -> list[str]:
    import gguf

    spec = ckpt.spec
    arch = LLAMA_CPP_ARCH[spec.family]
    tok = None
    if tokenizer == "auto" and ckpt.tokenizer_json is not None:
        tok = _tokenizer_fields(ckpt.tokenizer_json, spec.vocab)
    # llama.cpp falls back to token_embd for a missing output.weight in smallthinker; the other graphs are
    # given the (tied) head explicitly.
    write_output = not (spec.tie_embeddings and arch == "smallthinker")
    plan, fallbacks = _plan(spec, arch, gguf_type, write_output)
    w = gguf.GGUFWriter(path, arch)
    try:
        _write_metadata(w, spec, arch, ckpt, gguf_type, tok)
        for p in plan:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype), raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        it = iter(plan)
        for name, arr in _tensor_stream(ckpt, arch, write_output, show_progress):
            p = next(it)
            if p.name != name or tuple(arr.shape) != p.shape:
                raise EdgeMoEError(f"internal: GGUF plan expected {p.name} {list(p.shape)}, got {name} "
                                   f"{list(arr.shape)}")
            w.write_tensor_data(_encode(arr, p.qtype))
        if next(it, None) is not None:
            raise EdgeMoEError("internal: GGUF plan has tensors the checkpoint did not produce")
    finally:
        w.close()
    return fallbacks


def _quantize_with_llama_cpp(src: Path, dst: Path, gguf_type: str) -> None:
    try:
        import ctypes

        import llama_cpp
    except ImportError:
        raise EdgeMoEError(f"GGUF type {gguf_type} needs llama.cpp's quantizer: pip install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[gguf_type]
    params.nthread = max(1, os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise EdgeMoEError(f"llama.cpp's llama_model_quantize failed ({rc}) writing {gguf_type}")


def export_gguf(src, out_path, gguf_type: str = "F32", show_progress: bool = True, *,
                tokenizer: str = "auto") -> Path:
    """Write a llama.cpp GGUF of a Hugging Face MoE checkpoint (a directory or an opened `Checkpoint`).

    tokenizer: "auto" embeds tokenizer.json as a gpt2 (byte-level BPE) vocabulary when there is one;
    "none" writes `tokenizer.ggml.model = "none"` (llama.cpp then evaluates token ids only).
    """
    gguf_type = str(gguf_type).upper()
    if gguf_type not in GGUF_TYPES:
        raise EdgeMoEError(f"GGUF type {gguf_type!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    if tokenizer not in ("auto", "none"):
        raise EdgeMoEError(f"tokenizer={tokenizer!r}: expected 'auto' or 'none'")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise EdgeMoEError("GGUF export needs gguf-py: pip install gguf") from None
    out = Path(out_path)
    if out.is_dir():
        raise EdgeMoEError(f"{out}: is a directory; give the output file name, e.g. {out / 'model.gguf'}")
    if not out.parent.exists():
        raise EdgeMoEError(f"{out.parent}: output directory does not exist")
    # any Checkpoint-like source (Checkpoint, GGUF reader, an expanded container from export_gguf_from_container)
    ckpt = src if isinstance(src, Checkpoint) or hasattr(src, "layer_experts") else open_checkpoint(src)
    spec = ckpt.spec
    if spec.expert_map:
        raise EdgeMoEError("GGUF export: this source has merged experts (expert_map); write it with "
                           "export_gguf_from_container / export_gguf_merged, which expand the map for llama.cpp")
    if spec.family == "qwen3next":
        raise EdgeMoEError("GGUF export: llama.cpp's 'qwen3next' reads Qwen3-Next's fused DeltaNet projections in its "
                           "own layout, which this exporter does not write yet; export to the edgemoe container")
    if spec.family not in LLAMA_CPP_ARCH:
        raise EdgeMoEError(f"GGUF export: family {spec.family!r} has no llama.cpp architecture")
    _check_supported(spec, LLAMA_CPP_ARCH[spec.family])

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp_f16 = out.with_name(f".{out.name}.{os.getpid()}.f16.tmp")
    try:
        if gguf_type == "Q4_K_M":
            _write_gguf(ckpt, tmp_f16, gguf_type, tokenizer, show_progress)
            _quantize_with_llama_cpp(tmp_f16, tmp, gguf_type)
            fallbacks: list[str] = []
        else:
            fallbacks = _write_gguf(ckpt, tmp, gguf_type, tokenizer, show_progress)
        os.replace(tmp, out)
    finally:
        for t in (tmp, tmp_f16):
            if t.exists():
                t.unlink()
    if fallbacks:
        warnings.warn(
            f"{out.name}: {len(fallbacks)} matrices have rows that are not a multiple of 32 values and were stored "
            f"as F16 instead of {gguf_type}: {', '.join(fallbacks[:8])}{' ...' if len(fallbacks) > 8 else ''}",
            stacklevel=2,
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# merged models (MC-SMoE expert_map): llama.cpp has no e -> g map


def export_gguf_merged(spec: ArchSpec, weights, out_path, gguf_type: str = "F32", show_progress: bool = True, *,
                       tokenizer_json: bytes | None = None, tokenizer: str = "auto", name: str = "merged") -> Path:
    """Write a GGUF of a merged model given as (spec with `expert_map`, weights: container name -> f32 array or a
    callable name -> array), with every group's expert tensors duplicated into each member's slot.

    That is the same function: edgemoe sums the top-k weights of the members of a group and runs the group once
    (sum_{e in top-k, map[e]=g} w_e) f_g(x); llama.cpp runs each selected slot's copy with its own weight,
    sum_{e in top-k} w_e f_{map[e]}(x) -- equal term by term; the router rows and so the routing are unchanged.
    Cost: the GGUF stores n_experts expert copies per layer instead of the merged model's stored experts, i.e. it
    is as large as the unmerged model (the merged container is smaller by (E - G) / E of the expert bytes).
    Pruned experts (-1) are refused: see `sources.WeightSource` for why no router row can mask them.
    """
    from .sources import WeightSource

    get = weights if callable(weights) else weights.__getitem__
    src = WeightSource(spec, get, tokenizer_json, Path(str(name)), expand_merged=True, allow_pruned=False)
    return export_gguf(src, out_path, gguf_type, show_progress, tokenizer=tokenizer)


def export_gguf_from_container(container_path, out_path, gguf_type: str = "F32", show_progress: bool = True, *,
                               tokenizer: str = "auto") -> Path:
    """Write a llama.cpp GGUF from an edgemoe container (`.emoe`): f16 / q8_0 / MWQ tensors are dequantized to f32
    first (then stored as `gguf_type`), and a merged model's expert_map is expanded by duplicating each group's
    experts into its members' slots (same function; see `export_gguf_merged`). Pruned experts are refused."""
    from .sources import ContainerSource

    src = ContainerSource(container_path, expand_merged=True, allow_pruned=False)
    try:
        return export_gguf(src, out_path, gguf_type, show_progress, tokenizer=tokenizer)
    finally:
        src.close()
