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
from collections.abc import Mapping, Sequence
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
    """ArchSpec and TENSOR_TABLE are made on first use (PEP 562), so `import edgemoe` (and `edgemoe --help`) works
    before the C core is found; using them without the core raises its one clear error."""
    if name == "TENSOR_TABLE":
        return tensor_table()
    if name != "ArchSpec":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _make_lock:
        if "ArchSpec" not in globals():
            globals()["ArchSpec"] = _make_arch_spec()
    return globals()["ArchSpec"]


# Container tensor names (GGUF-like, so llama.cpp users recognize them): the one tensor table is the C core's
# (native/src/tensor_table.c), which it exports (emoe_tensor_table_json); the exporter, the NumPy reference and the
# checks read it through the views below, made on first use (like ArchSpec). docs/FORMAT.md "Tensor names" is
# generated from it too (python -m edgemoe.arch_doc). TENSOR_TABLE (tensor_table()) has one row per tensor:
# (role, container name pattern, scope, rows, cols, condition, need) with
#   scope: "global" | "layer" ({layer}) | "expert" ({layer}, {expert});
#   rows/cols: a shape term of _dim() (rows None: a 1-D tensor of cols);
#   condition: "KIND" or "KIND:option": the layers that have it (a layer kind of _layer_has: all | moe | dense | attn
#     | attn_v | linear | conv), and an arch option that must be set (_option_set; "!option": must not be set);
#   need: "required" | "unless_tied" | "optional" | "if_routed".


@functools.cache
def tensor_schema() -> dict:
    """The C core's tensor table as it exports it (emoe_tensor_table_json): {"dims", "layer_kinds", "needs": [{name,
    doc}], "tensors": [{role, pattern, scope, rows, cols, layers, option, negated, need, doc}]}."""
    from . import _native as N  # NativeLibraryNotFound is an EdgeMoEError naming how to build the core

    return N.tensor_table()


@functools.cache
def tensor_table() -> tuple[tuple, ...]:
    """TENSOR_TABLE: the core's rows as (role, pattern, scope, rows, cols, condition, need), in its order."""
    rows = []
    for t in tensor_schema()["tensors"]:
        condition = t["layers"] + (f":{'!' if t['negated'] else ''}{t['option']}" if t["option"] else "")
        rows.append((t["role"], t["pattern"], t["scope"], t["rows"], t["cols"], condition, t["need"]))
    return tuple(rows)


class _TableView:
    """A view of the tensor table made on first use, so `import edgemoe` needs no C core."""

    def __init__(self, make):
        self._make = make

    def __getattr__(self, name):  # the made object's methods (keys, items, index, ...)
        if name.startswith("_"):  # not while copying or unpickling an instance without _make
            raise AttributeError(name)
        return getattr(self._make(), name)

    def __getitem__(self, key):
        return self._make()[key]

    def __iter__(self):
        return iter(self._make())

    def __len__(self):
        return len(self._make())

    def __contains__(self, item):
        return item in self._make()

    def __eq__(self, other):
        return self._make() == (other._make() if isinstance(other, _TableView) else other)

    def __hash__(self):
        return hash(self._make())

    def __repr__(self):
        return repr(self._make())


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
    _, _, _, rows, cols, _, _ = next(row for row in tensor_table() if row[0] == role)
    return (_dim(spec, cols, layer),) if rows is None else (_dim(spec, rows, layer), _dim(spec, cols, layer))


def _layer_has(spec: ArchSpec, kind: str, layer: int) -> bool:
    """Whether the layer is of a table layer kind (C: tensor_table.c tt_present)."""
    moe = spec.is_moe_layer(layer)
    mixer = spec.layer_kind(layer)
    attn = mixer == "attention"
    return {"all": True, "moe": moe, "dense": not moe or spec.dense_beside_moe, "attn": attn,
            "linear": mixer == "linear", "conv": mixer == "conv",
            "attn_v": attn and not (spec.global_k_eq_v and spec.is_global_layer(layer))}[kind]


def _option_set(spec: ArchSpec, option: str) -> bool:
    """C's test of a row's option (tt_present): its value is not zero (false, 0; an enum: not its first value)."""
    value = getattr(spec, option)
    return value != type(spec)._ENUMS[option][0] if isinstance(value, str) else bool(value)


def _present(spec: ArchSpec, condition: str, layer: int) -> bool:
    kind, _, option = condition.partition(":")
    if not _layer_has(spec, kind, layer):
        return False
    return not option or _option_set(spec, option.lstrip("!")) != option.startswith("!")


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

    table = tensor_table()
    for row in table:
        if row[2] == "global":
            add(row)
    for layer in range(spec.n_layers):
        for row in table:
            if row[2] == "layer" and _present(spec, row[5], layer):
                add(row, layer)
        if not spec.is_moe_layer(layer):
            continue
        emap = spec.layer_expert_map(layer)
        for e in range(spec.stored_experts(layer)):
            for row in table:
                if row[2] == "expert":
                    add(row, layer, e, emap is None or e in emap)
    return out


def dense_tensor_names(spec: ArchSpec, layer: int) -> dict[str, str]:
    """Role -> container name for the dense (always resident) tensors one layer must have."""
    return {role: pattern.format(layer=layer) for role, pattern, scope, _, _, cond, need in tensor_table()
            if scope == "layer" and need == "required" and _present(spec, cond, layer)}


@functools.cache
def _expert_patterns() -> dict[str, str]:
    return {row[0]: row[1] for row in tensor_table() if row[2] == "expert"}


class _LazySequence(_TableView, Sequence):
    pass


class _LazyMapping(_TableView, Mapping):
    pass


EXPERT_MATRICES = _LazySequence(lambda: tuple(_expert_patterns()))  # gate/up: [expert_ffn, hidden]; down


def expert_tensor_name(layer: int, expert: int, matrix: str) -> str:
    return _expert_patterns()[matrix].format(layer=layer, expert=expert)


def kv_values_per_token(spec: ArchSpec) -> int:
    """Values the KV cache holds per token (all layers): MLA's latent + RoPE key, or plain K and V."""
    per_layer = spec.kv_lora_rank + spec.rope_dim if spec.kv_lora_rank else 2 * spec.n_kv_heads * spec.head_dim
    return spec.n_layers * per_layer


@functools.cache
def _global_tensors() -> dict[str, str]:
    return {role: pattern for role, pattern, scope, *_ in tensor_table() if scope == "global"}


GLOBAL_TENSORS = _LazyMapping(_global_tensors)  # role -> name of the model-wide tensors (embed, final_norm, lm_head)
