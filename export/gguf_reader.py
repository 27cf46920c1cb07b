"""A GGUF file as an export source: `edgemoe export model.gguf -o model.emoe`.

`open_gguf(path)` returns an object with the interface of `checkpoint.Checkpoint` (`.spec`, `.config`, `.family`,
`.tokenizer_json`, `.global_tensor_items()`, `.global_tensors()`, `.layer_dense(layer)`, `.layer_experts(layer)`),
so every consumer of a Hugging Face checkpoint (the container pipeline, the GGUF and ONNX writers, calibration)
reads a GGUF the same way. The header is parsed and checked against the file by `gguf_parse` (bounded counts
and lengths, known types, tensors tiling the data section); tensors are memory-mapped and dequantized to f32 one at
a time by gguf-py, and refused by name if they hold NaN or infinities.

llama.cpp architectures read: olmoe, qwen2moe, qwen3moe, llama *with experts* (Mixtral), smallthinker, granitemoe,
gpt-oss, gemma4 (its per-layer sizes and extra tensors: gguf_gemma4) -- the
table the writer uses (`llama_cpp_names.LLAMA_CPP_ARCH`), read backwards. Metadata is turned into a Hugging Face-style
config (`.config`) and the ArchSpec comes from the same `families.py` function that reads a real config.json, so
a GGUF and the checkpoint it was converted from give the same description.

Mixtral (`llama`): llama.cpp applies NORM (adjacent-pair) RoPE, so converters permute the rows of attn_q/attn_k
per head. The reader undoes that permutation and keeps `rope_kind = "neox"`. Both choices compute the same
function (a row permutation of W_q/W_k paired with the matching RoPE pairing), but only this one gives the same
ArchSpec and the same tensors as an HF-sourced Mixtral: every downstream writer assumes HF row order for Mixtral
(the GGUF writer permutes again when it writes `llama`, the ONNX writer rotates halves), so keeping the rows
permuted with rope_kind "norm" would make a GGUF -> container -> GGUF round trip permute twice.

Refused before anything is written, each by name: a damaged header (see gguf_parse), a metadata value of the wrong
type or out of range (block_count at most the tensor count, finite positive epsilon and RoPE base, top-k within the
experts, ...), a tokenizer that does not load or round-trip, an architecture not in the table (or `llama` without
experts),
a tensor type gguf-py cannot dequantize (or an integer type), a tensor the architecture does not have, a missing
tensor, and any tensor whose shape disagrees with what the metadata implies.

Experts are read from the stacked `blk.N.ffn_{gate,up,down}_exps` tensors, or from the per-expert
`blk.N.ffn_{gate,up,down}.E.weight` tensors of Mixtral GGUFs converted before llama.cpp stacked them.

Dequantized types: F32, F16, BF16 and every type `gguf.quants.dequantize` implements (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q2_K..Q6_K, IQ*, TQ*, MXFP4, ...).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from edgemoe.arch import EXPERT_MATRICES, GLOBAL_TENSORS, ArchSpec, dense_tensor_names, expert_tensor_name
from edgemoe.errors import FormatError, UnsupportedModelError

from . import gguf_gemma4
from .checkpoint import expected_shapes, expert_shape
from .families import FAMILIES, MAX_DIM, MAX_LAYERS, MAX_POSITION, MAX_VOCAB, Family
from .gguf_parse import ARRAY, FLOAT_TYPES, INT_TYPES, STRING, parse_gguf
from .llama_cpp_names import GPT_OSS_SWIGLU, LLAMA_CPP_ARCH, SMALLTHINKER_SWA_PERIOD, SPLIT_REGEX_PRE, gguf_tensor_name
from .tokenizer_check import check_tokenizer

# llama.cpp architecture -> edgemoe family (the writer's table read backwards)
GGUF_ARCH_TO_FAMILY = {arch: family for family, arch in LLAMA_CPP_ARCH.items()}
# edgemoe family -> HF model_type (the key of families.FAMILIES)
_MODEL_TYPE = {fam.name: model_type for model_type, fam in FAMILIES.items()}
NORM_ROPE_ARCHS = ("llama", "granitemoe")  # llama.cpp rotates adjacent pairs: converters permute the q/k rows

_MISSING = object()

# tokenizer.ggml.pre -> (pre_tokenizer, normalizer) of a byte-level BPE tokenizer.json
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PRE_REGEX = {pre: regex for regex, pre in SPLIT_REGEX_PRE.items()}


def _pre_tokenizer(pre: str) -> tuple[dict, dict | None] | None:
    if pre in ("gpt-2", "gpt2"):
        return dict(_BYTE_LEVEL), None
    if pre in _PRE_REGEX:
        seq = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _PRE_REGEX[pre]}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]}
        return seq, ({"type": "NFC"} if pre == "qwen2" else None)  # Qwen2's tokenizer.json normalizes to NFC
    return None


def _f32_value(v) -> float:
    """A GGUF float32 value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06), so a
    config read back from GGUF equals the one written."""
    return float(str(np.float32(v)))


def _dequantizable_types() -> set:
    """Every GGMLQuantizationType this reader turns into f32: F32, F16, BF16 and what gguf.quants dequantizes."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    return {Q.F32, Q.F16, Q.BF16, *getattr(gguf.quants, "_type_traits", {})}


class GGUFCheckpoint:
    """A GGUF file read like a Hugging Face checkpoint (see the module docstring)."""

    def __init__(self, path: str | Path):
        try:
            import gguf  # noqa: F401 - gguf-py dequantizes the tensors
        except ImportError:
            raise FormatError("reading GGUF needs gguf-py: pip install gguf") from None
        path = Path(path)
        if not path.exists():
            raise FormatError(f"{path}: no such file")
        if path.is_dir():
            raise FormatError(f"{path}: is a directory, expected a .gguf file")
        try:
            self._reader = parse_gguf(path)
        except OSError as e:
            raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
        self.path = path
        self._fields = self._reader.fields
        self._tensors = {t.name: t for t in self._reader.tensors}
        n_split = self._kv_int("split.count", 1, lo=0, hi=MAX_LAYERS)
        if n_split > 1:
            raise UnsupportedModelError(f"{path}: one part of a split GGUF ({n_split} files); merge them first "
                                        "(llama-gguf-split --merge)")
        arch = self._kv("general.architecture", None)
        if not isinstance(arch, str) or arch not in GGUF_ARCH_TO_FAMILY:
            raise UnsupportedModelError(
                f"{path}: GGUF architecture {arch!r} is not supported; edgemoe reads the MoE architectures "
                f"{', '.join(sorted(GGUF_ARCH_TO_FAMILY))} (llama only with experts, i.e. Mixtral)"
            )
        if arch in ("glm4moe", "ernie4_5-moe", "qwen35moe"):  # written by edgemoe, not read back yet: no reader for their keys
            raise UnsupportedModelError(f"{path}: reading llama.cpp '{arch}' GGUF files is not supported yet; export "
                                        "the model from its Hugging Face checkpoint instead")
        self.arch = arch
        family_name = GGUF_ARCH_TO_FAMILY[arch]
        self.family: Family = FAMILIES[_MODEL_TYPE[family_name]]
        self._check_types()
        self.config = self._config()
        self.family = FAMILIES[self.config["model_type"]]  # deepseek2: V2 or V3, told by the gating function
        try:
            spec = self.family.spec(self.config)
        except (FormatError, UnsupportedModelError) as e:
            raise type(e)(f"{path}: GGUF metadata does not describe a valid {arch} model ({e})") from None
        rope_dim = spec.head_dim if arch == "gemma4" else \
            self._kv_int(f"{arch}.rope.dimension_count", spec.head_dim, hi=spec.head_dim)
        if rope_dim % 2:
            raise FormatError(f"{path}: {arch}.rope.dimension_count = {rope_dim}: RoPE rotates pairs, expected an "
                              "even number")
        if rope_dim != spec.head_dim:
            if arch in NORM_ROPE_ARCHS:
                raise UnsupportedModelError(f"{path}: partial RoPE ({rope_dim} of {spec.head_dim} dims) with "
                                            "llama's row permutation is not supported")
            spec.rope_dim = rope_dim
        self.spec: ArchSpec = spec
        self._expected = self._expected_shapes()
        self._check_tensors()
        self.tokenizer_json: bytes | None = self._tokenizer_json()
        self.chat_metadata: dict = self._chat_metadata()

    # --- metadata ------------------------------------------------------------------------------------------
    def _kv(self, key: str, default=_MISSING):
        if key not in self._fields:
            if default is _MISSING:
                raise FormatError(f"{self.path}: GGUF metadata key '{key}' is missing")
            return default
        return self._fields[key]

    def _kv_int(self, key: str, default=_MISSING, lo: int = 1, hi: int = MAX_DIM) -> int:
        """An integer key (or a uniform per-layer array of them) in lo..hi."""
        v = self._kv(key, default)
        if key in self._fields:
            ty = self._reader.types[key]
            if ty[-1] not in INT_TYPES:
                raise FormatError(f"{self.path}: GGUF metadata '{key}' has type {ty}, expected an integer")
            if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv): only uniform ones are supported
                if len(set(v)) != 1:
                    raise UnsupportedModelError(f"{self.path}: '{key}' differs between layers ({v[:8]}...); "
                                                "per-layer shapes are not supported")
                v = v[0]
        if not lo <= v <= hi:
            raise FormatError(f"{self.path}: GGUF metadata '{key}' = {v}: expected {lo}..{hi}")
        return v

    def _kv_layers(self, key: str, heads: int) -> list[int]:
        """A per-layer head count array whose entries are 0 (a layer without attention) or one count in 1..heads."""
        v = self._kv(key)
        if self._reader.types[key][-1] not in INT_TYPES or not isinstance(v, list):
            raise FormatError(f"{self.path}: GGUF metadata '{key}' must be a per-layer array of integers")
        if len(set(v) - {0}) != 1 or not 1 <= max(v) <= heads:
            raise UnsupportedModelError(f"{self.path}: '{key}' = {v[:8]}...: expected 0 (conv layers) or one head "
                                        f"count in 1..{heads}")
        return [int(k) for k in v]

    def _kv_float(self, key: str, default=_MISSING, hi: float = math.inf) -> float:
        """A finite float key with 0 < value < hi, as the shortest decimal that rounds to its float32."""
        v = self._kv(key, default)
        if key in self._fields and self._reader.types[key][0] not in FLOAT_TYPES:
            raise FormatError(f"{self.path}: GGUF metadata '{key}' has type {self._reader.types[key]}, expected a float")
        if not math.isfinite(v) or not 0 < v < hi:
            raise FormatError(f"{self.path}: GGUF metadata '{key}' = {v}: expected a finite number above 0"
                              f"{f' and below {hi}' if math.isfinite(hi) else ''}")
        return _f32_value(v)

    def _kv_strings(self, key: str, default=_MISSING) -> list[str]:
        v = self._kv(key, default)
        if key in self._fields and self._reader.types[key] != (ARRAY, STRING):
            raise FormatError(f"{self.path}: GGUF metadata '{key}' must be an array of strings")
        return v

    def _config(self) -> dict:
        """GGUF metadata -> a Hugging Face-style config.json dict for this family."""
        a = self.arch
        p = a + "."
        # every layer has tensors: a block_count above the tensor count is a damaged header (and would be looped over)
        n_layers = self._kv_int(p + "block_count", hi=min(MAX_LAYERS, len(self._tensors)))
        hidden = self._kv_int(p + "embedding_length")
        heads = self._kv_int(p + "attention.head_count")
        # lfm2moe: a per-layer array, 0 on conv layers (the others' conv-free layers all have the same count);
        # gemma4: per-layer KV heads (gguf_gemma4.hf_config reads the list)
        kv_layers = self._kv_layers(p + "attention.head_count_kv", heads) if a == "lfm2moe" else None
        kv_heads = (1 if a == "gemma4" else max(kv_layers) if kv_layers
                    else self._kv_int(p + "attention.head_count_kv", heads, hi=heads))
        head_dim = self._kv_int(p + "attention.key_length", max(1, hidden // heads))
        v_len = self._kv_int(p + "attention.value_length", head_dim)
        if v_len != head_dim and a != "deepseek2":  # deepseek2: MLA's latent lengths, see _deepseek2
            raise UnsupportedModelError(f"{self.path}: key_length {head_dim} != value_length {v_len} is not supported")
        n_experts = self._kv_int(p + "expert_count", 0, lo=0)
        if n_experts == 0:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture '{a}' without experts ({p}expert_count missing or 0) is a dense "
                "model; edgemoe reads Mixture-of-Experts models only"
            )
        top_k = self._kv_int(p + "expert_used_count", hi=n_experts)
        if a not in ("lfm2moe", "deepseek2") and self._kv_int(p + "leading_dense_block_count", 0, lo=0):
            raise UnsupportedModelError(f"{self.path}: leading dense blocks are not supported for '{a}'")
        scaling = self._kv(p + "rope.scaling.type", "none")
        if scaling not in ("none", None, "") and not (a in ("gpt-oss", "deepseek2") and scaling == "yarn"):
            raise UnsupportedModelError(f"{self.path}: RoPE scaling type {scaling!r} is not supported yet")
        theta = self._kv_float(p + "rope.freq_base", 10000.0)
        eps = self._kv_float(p + "attention.layer_norm_rms_epsilon", hi=1.0)
        ffn = self._kv_int(p + "feed_forward_length", 0, lo=int(p + "feed_forward_length" in self._fields))
        ffn_exp = self._kv_int(p + "expert_feed_forward_length", 0, lo=int(p + "expert_feed_forward_length" in
                                                                                 self._fields))
        # llama.cpp's olmoe and llama size experts by feed_forward_length; the others by expert_feed_forward_length
        expert_ffn = ffn if a in ("olmoe", "llama") else (ffn_exp or ffn)
        if not expert_ffn:
            raise FormatError(f"{self.path}: GGUF metadata gives no expert width ({p}feed_forward_length)")
        emb = self._tensors.get(GLOBAL_TENSORS["embed"])
        if emb is None:
            raise FormatError(f"{self.path}: GGUF has no tensor '{GLOBAL_TENSORS['embed']}'")
        vocab = int(emb.shape[-1]) if len(emb.shape) == 2 else 0
        meta_vocab = self._kv_int(p + "vocab_size", vocab, lo=0, hi=MAX_VOCAB)
        if meta_vocab != vocab:
            raise FormatError(f"{self.path}: metadata {p}vocab_size = {meta_vocab}, but tensor 'token_embd.weight' "
                              f"has {vocab} rows")
        tie = GLOBAL_TENSORS["lm_head"] not in self._tensors
        cfg = {
            "model_type": _MODEL_TYPE[GGUF_ARCH_TO_FAMILY[a]],
            "num_hidden_layers": n_layers, "hidden_size": hidden, "vocab_size": vocab,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "rms_norm_eps": eps, "rope_theta": theta,
            "max_position_embeddings": self._kv_int(p + "context_length", 4096, hi=MAX_POSITION),
            "tie_word_embeddings": tie,
        }
        for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
            v = self._kv_int(f"tokenizer.ggml.{key}", None, lo=0, hi=vocab - 1) if f"tokenizer.ggml.{key}" in \
                self._fields else None
            if v is not None:
                cfg[hf] = v
        if a == "olmoe":
            cfg.update(intermediate_size=expert_ffn, num_experts=n_experts, num_experts_per_tok=top_k,
                       norm_topk_prob=False)  # llama.cpp's olmoe graph does not renormalize
        elif a == "qwen2moe":
            sh = self._kv_int(p + "expert_shared_feed_forward_length", 0, lo=0)
            if not sh and "blk.0.ffn_up_shexp.weight" in self._tensors:
                sh = int(self._tensors["blk.0.ffn_up_shexp.weight"].shape[-1])
            cfg.update(intermediate_size=ffn or expert_ffn, moe_intermediate_size=expert_ffn,
                       shared_expert_intermediate_size=sh, num_experts=n_experts, num_experts_per_tok=top_k,
                       decoder_sparse_step=1, norm_topk_prob=False,
                       qkv_bias="blk.0.attn_q.bias" in self._tensors)
        elif a == "qwen3moe":
            cfg.update(intermediate_size=ffn or expert_ffn, moe_intermediate_size=expert_ffn, num_experts=n_experts,
                       num_experts_per_tok=top_k, decoder_sparse_step=1, norm_topk_prob=True)
        elif a == "llama":
            cfg.update(intermediate_size=expert_ffn, num_local_experts=n_experts, num_experts_per_tok=top_k)
        elif a == "granitemoe":  # llama.cpp's names for Granite's multipliers; attention.scale 0 = 1/sqrt(head_dim)
            att = _f32_value(self._kv(p + "attention.scale", 0.0))
            cfg.update(intermediate_size=expert_ffn, num_local_experts=n_experts, num_experts_per_tok=top_k,
                       shared_intermediate_size=self._kv_int(p + "expert_shared_feed_forward_length", 0, lo=0),
                       embedding_multiplier=_f32_value(self._kv(p + "embedding_scale", 1.0)),
                       residual_multiplier=_f32_value(self._kv(p + "residual_scale", 1.0)),
                       attention_multiplier=att or float(1.0 / np.sqrt(np.float32(head_dim))),
                       logits_scaling=_f32_value(self._kv(p + "logit_scale", 1.0)))
        elif a == "gpt-oss":  # what llama.cpp's graph hard-codes: see llama_cpp_names
            window = self._kv_int(p + "attention.sliding_window", hi=MAX_POSITION)
            cfg.update(intermediate_size=expert_ffn, num_local_experts=n_experts, num_experts_per_tok=top_k,
                       sliding_window=window, swiglu_alpha=GPT_OSS_SWIGLU[0], swiglu_limit=GPT_OSS_SWIGLU[1],
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
                       attention_bias="blk.0.attn_q.bias" in self._tensors)
            rope = {"rope_type": "default", "rope_theta": theta}
            if scaling == "yarn":
                rope.update(rope_type="yarn", factor=self._kv_float(p + "rope.scaling.factor"),
                            original_max_position_embeddings=self._kv_int(
                                p + "rope.scaling.original_context_length", hi=MAX_POSITION),
                            beta_fast=self._kv_float(p + "rope.scaling.yarn_beta_fast", 32.0),
                            beta_slow=self._kv_float(p + "rope.scaling.yarn_beta_slow", 1.0), truncate=True)
            cfg["rope_parameters"] = rope
        elif a == "lfm2moe":  # what llama.cpp's graph does: sigmoid + exp_probs_b, renormalized, unscaled
            import gguf

            if self._kv_int(p + "expert_gating_func", lo=0) != int(gguf.ExpertGatingFuncType.SIGMOID):
                raise UnsupportedModelError(f"{self.path}: lfm2moe with a non-sigmoid expert_gating_func is not "
                                            "supported")
            cfg.update(intermediate_size=ffn or expert_ffn, moe_intermediate_size=expert_ffn, num_experts=n_experts,
                       num_experts_per_tok=top_k, norm_eps=eps, use_expert_bias=True, norm_topk_prob=True,
                       num_dense_layers=self._kv_int(p + "leading_dense_block_count", 0, lo=0, hi=n_layers),
                       conv_L_cache=self._kv_int(p + "shortconv.l_cache", lo=2, hi=64),
                       layer_types=["conv" if k == 0 else "full_attention" for k in kv_layers])
        elif a == "gemma4":
            cfg = gguf_gemma4.hf_config(self, {**cfg, "num_experts": n_experts, "top_k": top_k})
            del cfg["top_k"]
        elif a == "deepseek2":
            cfg.update(self._deepseek2(n_layers, heads, n_experts, top_k, expert_ffn, ffn, theta, scaling))
        elif a == "smallthinker":
            import gguf

            gating = self._kv_int(p + "expert_gating_func", int(gguf.ExpertGatingFuncType.SOFTMAX), lo=0)
            if gating not in (int(gguf.ExpertGatingFuncType.SOFTMAX), int(gguf.ExpertGatingFuncType.SIGMOID)):
                raise UnsupportedModelError(f"{self.path}: smallthinker expert_gating_func {gating} is not supported")
            hybrid = self._kv(p + "attention.sliding_window", None) is not None
            period = SMALLTHINKER_SWA_PERIOD
            cfg.update(
                moe_num_primary_experts=n_experts, moe_num_active_primary_experts=top_k, moe_ffn_hidden_size=expert_ffn,
                moe_primary_router_apply_softmax=gating == int(gguf.ExpertGatingFuncType.SOFTMAX),
                # llama.cpp's smallthinker hard-codes its hybrid layout when the key is present (see gguf_export)
                rope_layout=[int(i % period != 0) if hybrid else 1 for i in range(n_layers)],
                sliding_window_layout=[int(i % period != 0) if hybrid else 0 for i in range(n_layers)],
                sliding_window_size=4096,
            )
        return cfg

    def _deepseek2(self, n_layers: int, heads: int, n_experts: int, top_k: int, expert_ffn: int, ffn: int, theta: float,
                   scaling: str) -> dict:
        """llama.cpp's deepseek2 metadata -> a deepseek_v2 (softmax gating) or deepseek_v3 (sigmoid gating + the
        exp_probs_b selection bias) config, MLA from the *_mla lengths (files without them: the legacy layout, the
        key and value lengths are the heads'), the softmax mscale from yarn_log_multiplier (= 0.1 mscale_all_dim)."""
        import gguf

        p = self.arch + "."
        rope = self._kv_int(p + "rope.dimension_count")
        mla = p + "attention.key_length_mla" in self._fields
        k_len = self._kv_int(p + ("attention.key_length_mla" if mla else "attention.key_length"), hi=4096)
        v_len = self._kv_int(p + ("attention.value_length_mla" if mla else "attention.value_length"), hi=4096)
        if k_len <= rope:
            raise FormatError(f"{self.path}: deepseek2 key length {k_len} must exceed rope.dimension_count {rope}")
        q_lora = self._kv_int(p + "attention.q_lora_rank", 0, lo=0)
        gating = self._kv_int(p + "expert_gating_func", int(gguf.ExpertGatingFuncType.SOFTMAX), lo=0)
        sigmoid = gating == int(gguf.ExpertGatingFuncType.SIGMOID)
        if gating not in (int(gguf.ExpertGatingFuncType.SOFTMAX), int(gguf.ExpertGatingFuncType.SIGMOID)):
            raise UnsupportedModelError(f"{self.path}: deepseek2 expert_gating_func {gating} is not supported")
        groups = self._kv_int(p + "expert_group_count", 1, lo=0)
        if groups > 1 and not sigmoid:  # llama.cpp scores groups V3's way; V2's reader would score them by their max
            raise UnsupportedModelError(f"{self.path}: softmax gating with {groups} expert groups (scored by their two "
                                        "best experts, as llama.cpp does) is not a DeepSeek-V2 routing edgemoe reads")
        lead = self._kv_int(p + "leading_dense_block_count", 0, lo=0, hi=n_layers)
        if sigmoid and f"blk.{lead}.exp_probs_b.bias" not in self._tensors:
            raise UnsupportedModelError(f"{self.path}: sigmoid gating without exp_probs_b (the selection bias) is not "
                                        "a DeepSeek-V3 model edgemoe reads")
        shared = self._kv_int(p + "expert_shared_count", 0, lo=0)
        cfg = {"model_type": "deepseek_v3" if sigmoid else "deepseek_v2", "num_key_value_heads": heads,
               "kv_lora_rank": self._kv_int(p + "attention.kv_lora_rank"), "q_lora_rank": q_lora or None,
               "qk_rope_head_dim": rope, "qk_nope_head_dim": k_len - rope, "v_head_dim": v_len,
               "n_routed_experts": n_experts, "num_experts_per_tok": top_k, "moe_intermediate_size": expert_ffn,
               "intermediate_size": ffn or expert_ffn, "n_shared_experts": shared, "first_k_dense_replace": lead,
               "routed_scaling_factor": self._kv_float(p + "expert_weights_scale", 1.0),
               "norm_topk_prob": bool(self._kv(p + "expert_weights_norm", False)), "head_dim": None}
        if sigmoid:
            cfg.update(n_group=max(groups, 1), topk_group=self._kv_int(p + "expert_group_used_count", 1)
                       if groups > 1 else 1)
        else:
            cfg["topk_method"] = "greedy"
        params = {"rope_type": "default", "rope_theta": theta}
        if scaling == "yarn":
            log_mul = float(self._kv(p + "rope.scaling.yarn_log_multiplier", 0.0))
            params.update(rope_type="yarn", factor=self._kv_float(p + "rope.scaling.factor"),
                          original_max_position_embeddings=self._kv_int(p + "rope.scaling.original_context_length",
                                                                         hi=MAX_POSITION),
                          beta_fast=self._kv_float(p + "rope.scaling.yarn_beta_fast", 32.0),
                          beta_slow=self._kv_float(p + "rope.scaling.yarn_beta_slow", 1.0), truncate=True)
            if log_mul:  # llama.cpp: mscale = 1 + log_mul ln(factor) for the scores, cos/sin unscaled
                params.update(mscale=log_mul / 0.1, mscale_all_dim=log_mul / 0.1)
        cfg.update(rope_parameters=params, rope_theta=None)
        return cfg

    # --- tensor checks -------------------------------------------------------------------------------------
    def _check_types(self) -> None:
        ok = _dequantizable_types()
        for t in self._reader.tensors:
            if t.tensor_type not in ok:
                raise UnsupportedModelError(
                    f"{self.path}: tensor '{t.name}' has type {t.tensor_type.name}, which edgemoe cannot read as "
                    f"weights (it reads F32, F16, BF16 and the types gguf-py dequantizes: Q8_0, Q4_0, Q4_K, ...)"
                )

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> logical NumPy shape the metadata implies (every tensor the file must hold)."""
        s = self.spec
        exp: dict[str, tuple[int, ...]] = {
            GLOBAL_TENSORS["embed"]: (s.vocab, s.hidden),
            gguf_tensor_name(self.arch, GLOBAL_TENSORS["final_norm"]): (s.hidden,),
        }
        if not s.tie_embeddings:
            exp[GLOBAL_TENSORS["lm_head"]] = (s.vocab, s.hidden)
        for layer in range(s.n_layers):
            shapes = expected_shapes(s, layer)
            for role, name in dense_tensor_names(s, layer).items():
                if role == "wkv_b" and self._split_kv_b(layer):  # llama.cpp's MLA layout (gguf_export writes it)
                    exp[f"blk.{layer}.attn_k_b.weight"] = (s.n_heads, s.kv_lora_rank, s.qk_nope_dim)
                    exp[f"blk.{layer}.attn_v_b.weight"] = (s.n_heads, s.v_head_dim, s.kv_lora_rank)
                    continue
                exp[gguf_tensor_name(self.arch, name)] = shapes[role]
            if s.is_moe_layer(layer) and self.arch == "gemma4":
                continue  # gguf_gemma4.expected_extra
            if s.is_moe_layer(layer):
                for m in EXPERT_MATRICES:
                    if self._legacy_experts(layer):  # blk.N.ffn_{gate,up,down}.E.weight, one tensor per expert
                        for e in range(s.n_experts):
                            exp[f"blk.{layer}.ffn_{m}.{e}.weight"] = expert_shape(s, m)
                    else:
                        exp[f"blk.{layer}.ffn_{m}_exps.weight"] = (s.n_experts, *expert_shape(s, m))
        if self.arch == "gemma4":
            exp.update(gguf_gemma4.expected_extra(s))
        return exp

    def _legacy_experts(self, layer: int) -> bool:
        """Mixtral GGUFs converted before llama.cpp stacked experts (early 2024) store one tensor per expert."""
        return (f"blk.{layer}.ffn_gate_exps.weight" not in self._tensors
                and f"blk.{layer}.ffn_gate.0.weight" in self._tensors)

    def _split_kv_b(self, layer: int) -> bool:
        return f"blk.{layer}.attn_k_b.weight" in self._tensors

    def _check_tensors(self) -> None:
        unknown = sorted(set(self._tensors) - set(self._expected))
        if unknown:
            raise UnsupportedModelError(
                f"{self.path}: tensor '{unknown[0]}'{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''} "
                f"is not part of a {self.arch} model as edgemoe reads it (layers per the metadata: "
                f"{self.spec.n_layers}); refusing rather than dropping weights"
            )
        missing = [n for n in self._expected if n not in self._tensors]
        if missing:
            raise FormatError(f"{self.path}: GGUF is missing tensor '{missing[0]}'"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        for name, want in self._expected.items():
            got = tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))
            if got != want and not (len(want) == 1 and int(np.prod(got)) == want[0] and max(got) == want[0]):
                raise FormatError(
                    f"{self.path}: tensor '{name}' has shape {list(got)} (NumPy order; ggml ne "
                    f"{list(reversed(got))}), but the GGUF metadata implies {list(want)}"
                )

    # --- tensor access -------------------------------------------------------------------------------------
    def _get_raw(self, name: str) -> np.ndarray:
        """A tensor dequantized to f32 before the shapes are known (gemma4's rope_freqs while reading metadata)."""
        import gguf

        t = self._tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    def _get(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:  # pragma: no cover - filtered by _check_types
            raise UnsupportedModelError(f"{self.path}: tensor '{name}': {e}") from None
        arr = np.ascontiguousarray(np.asarray(arr, dtype=np.float32).reshape(self._expected[name]))
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr.reshape(-1)))[0])
            raise FormatError(f"{self.path}: tensor '{name}' holds NaN or infinite values (first at flat index {bad}); "
                              "the file is damaged")
        return arr

    def _unpermute(self, arr: np.ndarray, n_head: int) -> np.ndarray:
        """llama.cpp NORM row order -> HF rotate-half order (inverse of gguf_export._permute_rope_rows)."""
        return np.ascontiguousarray(
            arr.reshape(n_head, arr.shape[0] // n_head // 2, 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)
        )

    def global_tensor_items(self):
        s = self.spec
        yield GLOBAL_TENSORS["embed"], self._get(GLOBAL_TENSORS["embed"])
        yield GLOBAL_TENSORS["final_norm"], self._get(gguf_tensor_name(self.arch, GLOBAL_TENSORS["final_norm"]))
        if not s.tie_embeddings:
            yield GLOBAL_TENSORS["lm_head"], self._get(GLOBAL_TENSORS["lm_head"])

    def global_tensors(self) -> dict[str, np.ndarray]:
        return dict(self.global_tensor_items())

    def layer_dense(self, layer: int) -> dict[str, np.ndarray]:
        s = self.spec
        out = {}
        for role, name in dense_tensor_names(s, layer).items():
            if role == "wkv_b" and self._split_kv_b(layer):  # per head: key rows (k_b transposed), then value rows
                k_b, v_b = self._get(f"blk.{layer}.attn_k_b.weight"), self._get(f"blk.{layer}.attn_v_b.weight")
                out[name] = np.ascontiguousarray(np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1).reshape(
                    s.n_heads * (s.qk_nope_dim + s.v_head_dim), s.kv_lora_rank))
                continue
            arr = self._get(gguf_tensor_name(self.arch, name))
            if self.arch in NORM_ROPE_ARCHS and role in ("wq", "wk", "bq", "bk"):
                arr = self._unpermute(arr, s.n_heads if role in ("wq", "bq") else s.n_kv_heads)
            out[name] = arr
        if self.arch == "gemma4":
            router = dense_tensor_names(s, layer)["router"]
            out[router] = gguf_gemma4.fold_router(out[router], self._get(f"blk.{layer}.ffn_gate_inp.scale"))
        return out

    def layer_experts(self, layer: int):
        """Yield (container name, f32 [out, in]) expert by expert; each stacked GGUF tensor is dequantized once."""
        s = self.spec
        if self._legacy_experts(layer):
            for e in range(s.n_experts):
                for m in EXPERT_MATRICES:
                    yield expert_tensor_name(layer, e, m), self._get(f"blk.{layer}.ffn_{m}.{e}.weight")
            return
        if self.arch == "gemma4":  # gate and up fused, gate rows first
            gu = self._get(f"blk.{layer}.ffn_gate_up_exps.weight")
            stacks = {"gate": gu[:, : s.expert_ffn], "up": gu[:, s.expert_ffn:],
                      "down": self._get(f"blk.{layer}.ffn_down_exps.weight")}
        else:
            stacks = {m: self._get(f"blk.{layer}.ffn_{m}_exps.weight") for m in EXPERT_MATRICES}
        for e in range(s.n_experts):
            for m in EXPERT_MATRICES:
                yield expert_tensor_name(layer, e, m), np.ascontiguousarray(stacks[m][e])

    def tensor_types(self) -> dict[str, str]:
        """GGUF tensor name -> ggml type name (F32, Q8_0, Q4_K, ...)."""
        return {n: t.tensor_type.name for n, t in self._tensors.items()}

    # --- tokenizer -----------------------------------------------------------------------------------------
    def _chat_metadata(self) -> dict:
        """tokenizer.chat_template (+ the special-token strings a template refers to) as container metadata, like
        checkpoint.read_chat_template; {} when the file has no template."""
        template = self._kv("tokenizer.chat_template", None)
        if not isinstance(template, str) or not template:
            return {}
        tokens = self._kv_strings("tokenizer.ggml.tokens", None) or []
        named = {}
        for key, name in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                          ("unknown_token_id", "unk_token"), ("padding_token_id", "pad_token")):
            k = f"tokenizer.ggml.{key}"
            i = self._kv_int(k, None, lo=0, hi=self.spec.vocab - 1) if k in self._fields else None
            if i is not None and i < len(tokens):
                named[name] = tokens[i]
        return {"chat_template": template, "chat_template_tokens": named}

    def _tokenizer_json(self) -> bytes | None:
        """Rebuild a Hugging Face tokenizer.json from a gpt2 (byte-level BPE) GGUF vocabulary; None otherwise."""
        model = self._kv("tokenizer.ggml.model", "none")
        if model in ("none", None, ""):
            return None
        if model != "gpt2":
            warnings.warn(f"{self.path.name}: tokenizer model {model!r} is not rebuilt (only gpt2 byte-level BPE "
                          "is); the container will have no tokenizer", stacklevel=3)
            return None
        pre_name = self._kv("tokenizer.ggml.pre", "gpt-2")
        if not isinstance(pre_name, str) or not isinstance(model, str):
            raise FormatError(f"{self.path}: tokenizer.ggml.model and tokenizer.ggml.pre must be strings")
        pre = _pre_tokenizer(pre_name)
        if pre is None:
            warnings.warn(f"{self.path.name}: pre-tokenizer {pre_name!r} is not one edgemoe can rebuild (gpt-2, "
                          f"{', '.join(sorted(_PRE_REGEX))}); the container will have no tokenizer", stacklevel=3)
            return None
        tokens = self._kv_strings("tokenizer.ggml.tokens")
        types = self._kv("tokenizer.ggml.token_type", [1] * len(tokens))
        if "tokenizer.ggml.token_type" in self._fields and self._reader.types["tokenizer.ggml.token_type"][-1] \
                not in INT_TYPES:
            raise FormatError(f"{self.path}: tokenizer.ggml.token_type must be an array of integers")
        merges = self._kv_strings("tokenizer.ggml.merges", [])
        no_space = next((i for i, m in enumerate(merges) if " " not in m), None)
        if no_space is not None:
            raise FormatError(f"{self.path}: tokenizer.ggml.merges[{no_space}] = {merges[no_space]!r:.40} is not two "
                              "pieces separated by a space")
        odd = next((i for i, t in enumerate(types) if not 0 <= t <= 6), None)  # llama_token_type: 0..6
        if odd is not None:
            raise FormatError(f"{self.path}: tokenizer.ggml.token_type[{odd}] = {types[odd]}: expected a llama.cpp token "
                              "type 0..6 (undefined, normal, unknown, control, user-defined, unused, byte)")
        if len(types) != len(tokens):
            raise FormatError(f"{self.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
                              "tokens")
        if len(tokens) > self.spec.vocab:
            raise FormatError(f"{self.path}: {len(tokens)} tokens, but token_embd.weight has {self.spec.vocab} rows")
        vocab: dict[str, int] = {}
        added = []
        for i, (tok, ty) in enumerate(zip(tokens, types)):
            if ty == 5:  # UNUSED: embedding rows without a token (padded vocabularies)
                continue
            if ty in (3, 4):  # CONTROL, USER_DEFINED: added tokens, matched before the BPE model
                added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": ty == 3})
            vocab.setdefault(tok, i)
        pre_tok, normalizer = pre
        doc = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tok, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": vocab, "merges": [m.split(" ", 1) for m in merges],
            },
        }
        return check_tokenizer(json.dumps(doc, ensure_ascii=False).encode("utf-8"), self.spec.vocab,
                               f"{self.path} (its tokenizer.ggml.* vocabulary)")


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a GGUF MoE model as an export source (see the module docstring for what is read and refused)."""
    return GGUFCheckpoint(path)
