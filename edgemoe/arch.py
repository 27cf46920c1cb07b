"""The architecture description: every supported MoE family is one of these, read by one forward pass.

A new family is a new description (written by a checkpoint reader), never a new forward pass. The fields are
exactly the knobs the forward pass turns; `to_json`/`from_json` is how the container carries it and `dumps` how the C
core receives it (emoe_model_new_json): the core parses and validates that JSON itself (native/src/arch.c), and
`from_json` asks it first, so both sides read one description the same way. Rules: docs/FORMAT.md "The arch object".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

ROPE_KINDS = ("neox", "norm")  # neox: rotate halves (GPT-NeoX/HF); norm: rotate adjacent pairs (GPT-J/Meta llama)
QK_NORM_KINDS = ("none", "head", "full")  # head: RMSNorm over each head (Qwen3); full: over the whole projection (OLMoE)
ROUTER_FNS = ("softmax", "sigmoid")
ROUTER_INPUTS = ("ffn_norm", "layer_input")  # layer_input: SmallThinker's router on the layer input, before attention
ACTIVATIONS = ("swiglu", "reglu")


@dataclass
class ArchSpec:
    """Normalized description of a decoder-only MoE transformer."""

    family: str  # olmoe | qwen2moe | qwen3moe | mixtral | smallthinker (informational; behaviour is in the fields)
    n_layers: int
    hidden: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    expert_ffn: int  # intermediate width of one routed expert
    norm_eps: float = 1e-6
    rope_kind: str = "neox"
    rope_theta: float = 10000.0
    rope_dim: int = 0  # rotated dims per head; 0 = head_dim
    qkv_bias: bool = False
    qk_norm: str = "none"
    router_fn: str = "softmax"
    norm_topk: bool = False  # renormalize the selected top-k weights to sum to 1
    router_input: str = "ffn_norm"
    activation: str = "swiglu"
    shared_ffn: int = 0  # width of the always-on shared expert (0 = none)
    shared_gate: bool = False  # shared expert output scaled by sigmoid(w . x)
    dense_ffn: int = 0  # width of the plain MLP in layers listed in dense_layers
    dense_layers: list[int] = field(default_factory=list)  # layers with a dense MLP instead of experts
    nope_layers: list[int] = field(default_factory=list)  # layers that apply no RoPE (SmallThinker's hybrid)
    sliding_window: int = 0  # window size for layers in swa_layers (0 = none)
    swa_layers: list[int] = field(default_factory=list)
    tie_embeddings: bool = False
    # Merged experts (MC-SMoE): per layer, routed expert e -> stored expert g (-1 = pruned: masked out of routing).
    # Empty (or an empty list for a layer) = identity. Stored expert tensors are named by g.
    expert_map: list[list[int]] = field(default_factory=list)
    max_position: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("rope_kind", ROPE_KINDS),
            ("qk_norm", QK_NORM_KINDS),
            ("router_fn", ROUTER_FNS),
            ("router_input", ROUTER_INPUTS),
            ("activation", ACTIVATIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        if self.rope_dim == 0:
            self.rope_dim = self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

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


# Container tensor names (GGUF-like, so llama.cpp users recognize them). One table, read by the exporter, the
# NumPy reference and the C binding.
def dense_tensor_names(spec: ArchSpec, layer: int) -> dict[str, str]:
    """Role -> container name for the dense (always resident) tensors of one layer."""
    p = f"blk.{layer}."
    names = {
        "attn_norm": p + "attn_norm.weight",
        "wq": p + "attn_q.weight",
        "wk": p + "attn_k.weight",
        "wv": p + "attn_v.weight",
        "wo": p + "attn_output.weight",
        "ffn_norm": p + "ffn_norm.weight",
    }
    if spec.qkv_bias:
        names.update(bq=p + "attn_q.bias", bk=p + "attn_k.bias", bv=p + "attn_v.bias")
    if spec.qk_norm != "none":
        names.update(q_norm=p + "attn_q_norm.weight", k_norm=p + "attn_k_norm.weight")
    if spec.is_moe_layer(layer):
        names["router"] = p + "ffn_gate_inp.weight"
        if spec.shared_ffn:
            names.update(
                sh_gate=p + "ffn_gate_shexp.weight", sh_up=p + "ffn_up_shexp.weight", sh_down=p + "ffn_down_shexp.weight"
            )
            if spec.shared_gate:
                names["sh_gate_inp"] = p + "ffn_gate_inp_shexp.weight"
    else:
        names.update(mlp_gate=p + "ffn_gate.weight", mlp_up=p + "ffn_up.weight", mlp_down=p + "ffn_down.weight")
    return names


EXPERT_MATRICES = ("gate", "up", "down")  # gate/up: [expert_ffn, hidden]; down: [hidden, expert_ffn]


def expert_tensor_name(layer: int, expert: int, matrix: str) -> str:
    return f"blk.{layer}.expert.{expert}.ffn_{matrix}.weight"


GLOBAL_TENSORS = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
