"""The architecture description: every supported MoE family is one of these, read by one forward pass.

A new family is a new description (written by a checkpoint reader), never a new forward pass. The fields are
exactly the knobs the forward pass turns, and they are stated once: in the C core's table (native/src/arch_fields.h:
name, kind, range, default, doc), which the core exports (emoe_arch_schema_json) and `ArchSpec` is built from, on
first use. `to_json`/`from_json` is how the container carries it and `dumps` how the C core receives it
(emoe_model_new_json): the core parses and validates that JSON itself (native/src/arch.c), and `from_json` asks it
first, so both sides read one description the same way. Rules: docs/FORMAT.md "Architecture description", generated
from the same table (python -m edgemoe.arch_doc).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from typing import TYPE_CHECKING, ClassVar


@functools.cache
def schema() -> tuple[dict, ...]:
    """The C core's table of arch keys (emoe_arch_schema_json), in its order: one dict per key with name, kind
    (int | float | bool | enum | string | id | list | map), type (the Python type), required, default (JSON: null
    when required or none), lo/hi (int, id; float: lo exclusive unless zero_ok), names (enum), doc."""
    from . import _native as N  # NativeLibraryNotFound is an EdgeMoEError naming how to build the core

    return tuple(N.arch_schema())


def _python_default(entry: dict):
    """The schema's default as ArchSpec holds it (a float field's default is a float even when written "1")."""
    kind, value = entry["kind"], entry["default"]
    return float(value) if kind == "float" else bool(value) if kind == "bool" else value


class _ArchSpecBase:
    """ArchSpec's behaviour; its fields are the schema's (see ArchSpec's docstring)."""

    _ENUMS: ClassVar[dict[str, tuple[str, ...]]] = {}  # enum field -> allowed strings (set by _make_arch_spec)

    def __post_init__(self) -> None:
        # Enum values, then some of the relations C checks (arch.c check_relations): a spec built in Python fails at
        # once. Types and ranges are C's alone (from_json, ContainerWriter), so a test can still build a bad spec.
        for name, allowed in self._ENUMS.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        if self.n_group > 1 and (self.n_experts % self.n_group
                                 or self.top_k > self.topk_group * (self.n_experts // self.n_group)):
            raise ValueError(f"n_group={self.n_group} must divide n_experts={self.n_experts} and its topk_group="
                             f"{self.topk_group} groups must hold top_k={self.top_k} experts")
        if self.conv_layers and self.conv_kernel < 1:
            raise ValueError(f"conv_layers given but conv_kernel={self.conv_kernel} (expected >= 1)")
        if self.rope_dim == 0:
            self.rope_dim = self.head_dim
        if self.linear_attn_layers and not (min(self.linear_k_heads, self.linear_v_heads, self.linear_k_dim,
                                                    self.linear_v_dim, self.linear_conv) >= 1
                                                and self.linear_v_heads % self.linear_k_heads == 0):
            raise ValueError("linear_attn_layers need linear_k_heads, linear_v_heads (a multiple of linear_k_heads), "
                             "linear_k_dim, linear_v_dim and linear_conv >= 1")
        if self.global_kv_heads and self.n_heads % self.global_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of global_kv_heads={self.global_kv_heads}")
        if 2 * self.global_rope_angles > (self.global_head_dim or self.head_dim):
            raise ValueError(f"global_rope_angles={self.global_rope_angles} exceeds half the global head size")
        if self.global_head_dim not in (0, self.head_dim) and not self.global_rope_angles:
            raise ValueError("global_head_dim differs from head_dim: give global_rope_angles (its RoPE)")
        if self.q_lora_rank and not self.kv_lora_rank:
            raise ValueError(f"q_lora_rank={self.q_lora_rank} needs Multi-head Latent Attention (kv_lora_rank > 0)")
        if self.kv_lora_rank and (self.qk_nope_dim + self.rope_dim != self.head_dim or self.v_head_dim < 1):
            raise ValueError(f"MLA needs head_dim={self.head_dim} == qk_nope_dim={self.qk_nope_dim} + rope_dim="
                             f"{self.rope_dim} and v_head_dim >= 1 (got {self.v_head_dim})")

    def layer_kind(self, layer: int) -> str:
        """The layer's token mixer: "attention" (softmax attention, MLA included, with its KV cache), or the kind
        that replaces it: "linear" (Gated DeltaNet) or "conv" (LFM2's short convolution). C: emoe_arch_layer_kind."""
        if layer in self.linear_attn_layers:
            return "linear"
        return "conv" if layer in self.conv_layers else "attention"

    def is_attention_layer(self, layer: int) -> bool:
        """Whether the layer runs (softmax) attention, with its tensors and KV cache: no other layer kind."""
        return self.layer_kind(layer) == "attention"

    @property
    def has_layer_state(self) -> bool:
        """Whether some layer keeps a rolling or recurrent state (a conv or linear layer) rather than one KV cache
        entry per position: such a sequence can be cut back only to its full length or to nothing."""
        return any(self.layer_kind(layer) != "attention" for layer in range(self.n_layers))

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    def is_global_layer(self, layer: int) -> bool:
        """A full-attention layer (not sliding): Gemma-4 gives these their own head size, KV heads and RoPE."""
        return not (self.sliding_window and layer in self.swa_layers)

    def layer_head_dim(self, layer: int) -> int:
        return self.global_head_dim if self.global_head_dim and self.is_global_layer(layer) else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.global_kv_heads if self.global_kv_heads and self.is_global_layer(layer) else self.n_kv_heads

    def layer_expert_map(self, layer: int) -> list[int] | None:
        """e -> stored expert (or -1 when pruned) for a merged layer; None when experts are stored one to one."""
        if self.expert_map and layer < len(self.expert_map) and self.expert_map[layer]:
            return self.expert_map[layer]
        return None

    def stored_experts(self, layer: int) -> int:
        m = self.layer_expert_map(layer)
        return self.n_experts if m is None else max(m) + 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ArchSpec:
        """The Python view of an architecture description. The C core's reader (native/src/arch.c, the one every
        loader uses) validates it first: types, ranges, unknown and missing keys; what it refuses raises
        InvalidFileError with its message, so a description never means two things."""
        from . import _native as N  # NativeLibraryNotFound is an EdgeMoEError naming how to build the core
        from .errors import InvalidFileError

        try:
            text = json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidFileError(f"arch: not a JSON object of numbers, strings and lists ({e})") from None
        try:
            N.arch_check(text)
        except N.NativeError as e:
            raise InvalidFileError(str(e)) from None
        return cls(**data)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


if TYPE_CHECKING:  # the dataclass is made on first use (_make_arch_spec, module __getattr__) from the core's table
    ArchSpec = _ArchSpecBase

_SPEC_DOC = """Normalized description of a decoder-only MoE transformer.

The fields are the C core's table (native/src/arch_fields.h via emoe_arch_schema_json), in its order; each field's
schema entry (kind, range, doc) is its dataclasses metadata. docs/FORMAT.md "Architecture description" has the rules.

Fields:
"""


def _make_arch_spec() -> type:
    fields, lines = [], []
    for entry in schema():
        meta = {"schema": entry}
        if entry["required"]:
            f = dataclasses.field(metadata=meta)
        elif entry["kind"] in ("list", "map"):
            f = dataclasses.field(default_factory=list, metadata=meta)
        else:
            f = dataclasses.field(default=_python_default(entry), metadata=meta)
        fields.append((entry["name"], entry["type"], f))
        default = "required" if entry["required"] else f"= {_python_default(entry)!r}"
        lines.append(f"    {entry['name']} ({entry['type']}, {default}): {entry['doc']}")
    enums = {e["name"]: tuple(e["names"]) for e in schema() if e["kind"] == "enum"}
    return dataclasses.make_dataclass(
        "ArchSpec", fields, bases=(_ArchSpecBase,),
        namespace={"__module__": __name__, "__doc__": _SPEC_DOC + "\n".join(lines), "_ENUMS": enums})


_make_lock = threading.Lock()


def __getattr__(name: str):
    """ArchSpec is made on first use (PEP 562), so `import edgemoe` (and `edgemoe --help`) works before the C core
    is found; using ArchSpec without the core raises its one clear error."""
    if name != "ArchSpec":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _make_lock:
        if "ArchSpec" not in globals():
            globals()["ArchSpec"] = _make_arch_spec()
    return globals()["ArchSpec"]


# Container tensor names (GGUF-like, so llama.cpp users recognize them): the one tensor table, read by the exporter,
# the NumPy reference and the C binding. The C core states the same table (native/src/tensor_table.c) and
# tests/test_tensor_table.py keeps both identical (for every tiny family, merged experts and MWQ).
# (role, container name pattern, scope, rows, cols, condition, need) with
#   scope: "global" | "layer" ({layer}) | "expert" ({layer}, {expert});
#   rows/cols: a size of _dim() (rows None: a 1-D tensor of cols);
#   condition: "KIND" or "KIND:option": the layers that have it (all | moe | dense | attn | attn_v | linear | conv;
#     dense = with a dense MLP, also MoE layers under dense_beside_moe; attn_v = attention with its own values), and
#     an arch option that must be set (non-zero, not false, not "none"; "!option": must not be set);
#     need: "required" | "unless_tied" | "optional" | "if_routed".
TENSOR_TABLE = (
    ("embed", "token_embd.weight", "global", "vocab", "hidden", "all", "required"),
    ("final_norm", "output_norm.weight", "global", None, "hidden", "all", "required"),
    ("lm_head", "output.weight", "global", "vocab", "hidden", "all", "unless_tied"),
    ("attn_norm", "blk.{layer}.attn_norm.weight", "layer", None, "hidden", "all", "required"),
    ("wq", "blk.{layer}.attn_q.weight", "layer", "q", "hidden", "attn:!q_lora_rank", "required"),
    ("wk", "blk.{layer}.attn_k.weight", "layer", "kv", "hidden", "attn:!kv_lora_rank", "required"),
    ("wv", "blk.{layer}.attn_v.weight", "layer", "kv", "hidden", "attn_v:!kv_lora_rank", "required"),
    ("wo", "blk.{layer}.attn_output.weight", "layer", "hidden", "o", "attn", "required"),
    ("ffn_norm", "blk.{layer}.ffn_norm.weight", "layer", None, "hidden", "all", "required"),
    ("bq", "blk.{layer}.attn_q.bias", "layer", None, "q", "attn:qkv_bias", "required"),
    ("bk", "blk.{layer}.attn_k.bias", "layer", None, "kv", "attn:qkv_bias", "required"),
    ("bv", "blk.{layer}.attn_v.bias", "layer", None, "kv", "attn:qkv_bias", "required"),
    ("q_norm", "blk.{layer}.attn_q_norm.weight", "layer", None, "q_norm", "attn:qk_norm", "required"),
    ("k_norm", "blk.{layer}.attn_k_norm.weight", "layer", None, "k_norm", "attn:qk_norm", "required"),
    ("router", "blk.{layer}.ffn_gate_inp.weight", "layer", "experts", "hidden", "moe", "required"),
    ("predictor", "blk.{layer}.ffn_gate_inp_pre.weight", "layer", "experts", "hidden", "moe", "optional"),
    ("score_bias", "blk.{layer}.exp_probs_b.bias", "layer", None, "experts", "moe:score_bias", "required"),
    ("sh_gate", "blk.{layer}.ffn_gate_shexp.weight", "layer", "shared_ffn", "hidden", "moe:shared_ffn", "required"),
    ("sh_up", "blk.{layer}.ffn_up_shexp.weight", "layer", "shared_ffn", "hidden", "moe:shared_ffn", "required"),
    ("sh_down", "blk.{layer}.ffn_down_shexp.weight", "layer", "hidden", "shared_ffn", "moe:shared_ffn", "required"),
    ("sh_gate_inp", "blk.{layer}.ffn_gate_inp_shexp.weight", "layer", None, "hidden", "moe:shared_gate", "required"),
    ("mlp_gate", "blk.{layer}.ffn_gate.weight", "layer", "dense_ffn", "hidden", "dense", "required"),
    ("mlp_up", "blk.{layer}.ffn_up.weight", "layer", "dense_ffn", "hidden", "dense", "required"),
    ("mlp_down", "blk.{layer}.ffn_down.weight", "layer", "hidden", "dense_ffn", "dense", "required"),
    ("bo", "blk.{layer}.attn_output.bias", "layer", None, "hidden", "attn:o_bias", "required"),
    ("sinks", "blk.{layer}.attn_sinks.weight", "layer", None, "heads", "attn:attn_sinks", "required"),
    ("router_b", "blk.{layer}.ffn_gate_inp.bias", "layer", None, "experts", "moe:router_bias", "required"),
    # Gemma-4's norms and layer scale (post_norms, dense_beside_moe, layer_scale)
    ("post_attn_norm", "blk.{layer}.post_attention_norm.weight", "layer", None, "hidden", "all:post_norms", "required"),
    ("post_ffn_norm", "blk.{layer}.post_ffw_norm.weight", "layer", None, "hidden", "all:post_norms", "required"),
    ("mlp_post_norm", "blk.{layer}.post_ffw_norm_1.weight", "layer", None, "hidden", "moe:dense_beside_moe", "required"),
    ("moe_pre_norm", "blk.{layer}.pre_ffw_norm_2.weight", "layer", None, "hidden", "moe:dense_beside_moe", "required"),
    ("moe_post_norm", "blk.{layer}.post_ffw_norm_2.weight", "layer", None, "hidden", "moe:dense_beside_moe", "required"),
    ("layer_scale", "blk.{layer}.layer_output_scale.weight", "layer", None, "one", "all:layer_scale", "required"),
    # MLA (kv_lora_rank > 0): llama.cpp's deepseek2 names
    ("wq_a", "blk.{layer}.attn_q_a.weight", "layer", "q_lora", "hidden", "all:q_lora_rank", "required"),
    ("q_a_norm", "blk.{layer}.attn_q_a_norm.weight", "layer", None, "q_lora", "all:q_lora_rank", "required"),
    ("wq_b", "blk.{layer}.attn_q_b.weight", "layer", "q", "q_lora", "all:q_lora_rank", "required"),
    ("wkv_a", "blk.{layer}.attn_kv_a_mqa.weight", "layer", "kv_a", "hidden", "all:kv_lora_rank", "required"),
    ("kv_a_norm", "blk.{layer}.attn_kv_a_norm.weight", "layer", None, "kv_lora", "all:kv_lora_rank", "required"),
    ("wkv_b", "blk.{layer}.attn_kv_b.weight", "layer", "kv_b", "kv_lora", "all:kv_lora_rank", "required"),
    # expert biases: row g = stored expert g (kept f32 like every bias; resident, so streaming never reads them)
    ("gate_b", "blk.{layer}.ffn_gate_exps.bias", "layer", "experts", "expert_ffn", "moe:expert_bias", "required"),
    ("up_b", "blk.{layer}.ffn_up_exps.bias", "layer", "experts", "expert_ffn", "moe:expert_bias", "required"),
    ("down_b", "blk.{layer}.ffn_down_exps.bias", "layer", "experts", "hidden", "moe:expert_bias", "required"),
    # Qwen3.5 / Next: the attention output gate; Gated DeltaNet layers (la_conv: [conv channels, taps] flattened, f32)
    ("attn_gate", "blk.{layer}.attn_gate.weight", "layer", "q", "hidden", "attn:attn_gate", "required"),
    ("la_qkv", "blk.{layer}.ssm_in_qkv.weight", "layer", "la_conv_dim", "hidden", "linear", "required"),
    ("la_z", "blk.{layer}.ssm_in_z.weight", "layer", "la_v", "hidden", "linear", "required"),
    ("la_b", "blk.{layer}.ssm_in_b.weight", "layer", "la_heads", "hidden", "linear", "required"),
    ("la_a", "blk.{layer}.ssm_in_a.weight", "layer", "la_heads", "hidden", "linear", "required"),
    ("la_conv", "blk.{layer}.ssm_conv1d.weight", "layer", None, "la_conv_taps", "linear", "required"),
    ("la_dt", "blk.{layer}.ssm_dt.bias", "layer", None, "la_heads", "linear", "required"),
    ("la_a_log", "blk.{layer}.ssm_a_log.weight", "layer", None, "la_heads", "linear", "required"),
    ("la_norm", "blk.{layer}.ssm_norm.weight", "layer", None, "la_vdim", "linear", "required"),
    ("la_out", "blk.{layer}.ssm_out.weight", "layer", "hidden", "la_v", "linear", "required"),
    # LFM2 short convolution (conv_layers): in_proj rows B, C, x; the depthwise taps [hidden, conv_kernel]
    ("conv_in", "blk.{layer}.shortconv.in_proj.weight", "layer", "conv_in", "hidden", "conv", "required"),
    ("conv_w", "blk.{layer}.shortconv.conv.weight", "layer", "hidden", "conv_kernel", "conv", "required"),
    ("conv_out", "blk.{layer}.shortconv.out_proj.weight", "layer", "hidden", "hidden", "conv", "required"),
    ("gate", "blk.{layer}.expert.{expert}.ffn_gate.weight", "expert", "expert_ffn", "hidden", "moe", "if_routed"),
    ("up", "blk.{layer}.expert.{expert}.ffn_up.weight", "expert", "expert_ffn", "hidden", "moe", "if_routed"),
    ("down", "blk.{layer}.expert.{expert}.ffn_down.weight", "expert", "hidden", "expert_ffn", "moe", "if_routed"),
)


def _dim(spec: ArchSpec, term: str, layer: int = 0) -> int:
    hd, nkv = spec.layer_head_dim(layer), spec.layer_kv_heads(layer)
    q, kv = spec.n_heads * hd, nkv * hd
    full = spec.qk_norm == "full"
    return {"hidden": spec.hidden, "vocab": spec.vocab, "heads": spec.n_heads, "q": q, "kv": kv, "q_norm": q if full else hd,
            "k_norm": kv if full else hd, "experts": spec.n_experts, "expert_ffn": spec.expert_ffn,
            "shared_ffn": spec.shared_ffn, "dense_ffn": spec.dense_ffn, "one": 1,
            "la_conv_dim": 2 * spec.linear_k_heads * spec.linear_k_dim + spec.linear_v_heads * spec.linear_v_dim,
            "la_conv_taps": (2 * spec.linear_k_heads * spec.linear_k_dim + spec.linear_v_heads * spec.linear_v_dim)
            * spec.linear_conv, "la_v": spec.linear_v_heads * spec.linear_v_dim, "la_heads": spec.linear_v_heads,
            "la_vdim": spec.linear_v_dim, "conv_in": 3 * spec.hidden, "conv_kernel": spec.conv_kernel,
            "o": spec.n_heads * spec.v_head_dim if spec.kv_lora_rank else q, "q_lora": spec.q_lora_rank,
            "kv_lora": spec.kv_lora_rank, "kv_a": spec.kv_lora_rank + spec.rope_dim,
            "kv_b": spec.n_heads * (spec.qk_nope_dim + spec.v_head_dim)}[term]


def tensor_shape(spec: ArchSpec, role: str, layer: int = 0) -> tuple[int, ...]:
    """The shape the tensor table states for a role ([rows, cols], or [cols] for a 1-D tensor)."""
    _, _, _, rows, cols, _, _ = next(row for row in TENSOR_TABLE if row[0] == role)
    return (_dim(spec, cols, layer),) if rows is None else (_dim(spec, rows, layer), _dim(spec, cols, layer))


def _present(spec: ArchSpec, condition: str, layer: int) -> bool:
    kind, _, option = condition.partition(":")
    moe = spec.is_moe_layer(layer)
    mixer = spec.layer_kind(layer)
    attn = mixer == "attention"
    kinds = {"all": True, "moe": moe, "dense": not moe or spec.dense_beside_moe, "attn": attn,
             "linear": mixer == "linear", "conv": mixer == "conv",
             "attn_v": attn and not (spec.global_k_eq_v and spec.is_global_layer(layer))}
    if not kinds[kind]:
        return False
    unless = option.startswith("!")
    return not option or (getattr(spec, option.lstrip("!")) not in (0, False, "none")) != unless


def model_tensors(spec: ArchSpec) -> list[tuple[str, tuple[int, ...], bool]]:
    """Every tensor a model of this spec reads, in table order (globals, then per layer its tensors and its stored
    experts' matrices, expert-major): (name, shape, required). Optional ones (the fitted predictor; lm_head when
    tied; a merged layer's stored expert no routed expert maps to) are listed with required False."""
    out = []

    def add(row, layer=0, expert=0, required=True):
        _, pattern, _, rows, cols, _, need = row
        shape = (_dim(spec, cols, layer),) if rows is None else (_dim(spec, rows, layer), _dim(spec, cols, layer))
        req = {"required": True, "unless_tied": not spec.tie_embeddings, "optional": False, "if_routed": required}[need]
        out.append((pattern.format(layer=layer, expert=expert), shape, req))

    for row in TENSOR_TABLE:
        if row[2] == "global":
            add(row)
    for layer in range(spec.n_layers):
        for row in TENSOR_TABLE:
            if row[2] == "layer" and _present(spec, row[5], layer):
                add(row, layer)
        if not spec.is_moe_layer(layer):
            continue
        emap = spec.layer_expert_map(layer)
        for e in range(spec.stored_experts(layer)):
            for row in TENSOR_TABLE:
                if row[2] == "expert":
                    add(row, layer, e, emap is None or e in emap)
    return out


def dense_tensor_names(spec: ArchSpec, layer: int) -> dict[str, str]:
    """Role -> container name for the dense (always resident) tensors one layer must have."""
    return {role: pattern.format(layer=layer) for role, pattern, scope, _, _, cond, need in TENSOR_TABLE
            if scope == "layer" and need == "required" and _present(spec, cond, layer)}


EXPERT_MATRICES = tuple(row[0] for row in TENSOR_TABLE if row[2] == "expert")  # gate/up: [expert_ffn, hidden]; down
_EXPERT_PATTERN = {row[0]: row[1] for row in TENSOR_TABLE if row[2] == "expert"}


def expert_tensor_name(layer: int, expert: int, matrix: str) -> str:
    return _EXPERT_PATTERN[matrix].format(layer=layer, expert=expert)


def kv_values_per_token(spec: ArchSpec) -> int:
    """Values the KV cache holds per token (all layers): MLA's latent + RoPE key, or plain K and V."""
    per_layer = spec.kv_lora_rank + spec.rope_dim if spec.kv_lora_rank else 2 * spec.n_kv_heads * spec.head_dim
    return spec.n_layers * per_layer


GLOBAL_TENSORS = {role: pattern for role, pattern, scope, *_ in TENSOR_TABLE if scope == "global"}
