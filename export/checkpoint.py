"""Open a Hugging Face MoE checkpoint directory lazily: config -> ArchSpec, tensors one layer at a time.

Tensors are memory-mapped (see safetensors_lazy); only what a caller asks for is materialized, so exporting a
checkpoint larger than RAM works layer by layer. Every tensor handed out is checked against the shape the
config implies, so a checkpoint that disagrees with its config is reported by name instead of failing later.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgemoe.arch import EXPERT_MATRICES, GLOBAL_TENSORS, ArchSpec, dense_tensor_names, expert_tensor_name
from edgemoe.errors import FormatError

from .families import Family, dense_hf_names, family_for
from .mxfp4 import dequantize_mxfp4
from .safetensors_lazy import SafetensorsSet


def expected_shapes(spec: ArchSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """Role -> logical shape [out, in] (or [n]) of each dense tensor of one layer."""
    H, hd, nh, nkv = spec.hidden, spec.head_dim, spec.n_heads, spec.n_kv_heads
    shapes = {
        "attn_norm": (H,), "ffn_norm": (H,), "wq": (nh * hd, H), "wk": (nkv * hd, H), "wv": (nkv * hd, H),
        "wo": (H, nh * hd), "bq": (nh * hd,), "bk": (nkv * hd,), "bv": (nkv * hd,),
        "q_norm": (hd,) if spec.qk_norm == "head" else (nh * hd,),
        "k_norm": (hd,) if spec.qk_norm == "head" else (nkv * hd,),
        "router": (spec.n_experts, H),
        "sh_gate": (spec.shared_ffn, H), "sh_up": (spec.shared_ffn, H), "sh_down": (H, spec.shared_ffn),
        "sh_gate_inp": (H,),
        "mlp_gate": (spec.dense_ffn, H), "mlp_up": (spec.dense_ffn, H), "mlp_down": (H, spec.dense_ffn),
        "bo": (H,), "sinks": (nh,), "router_b": (spec.n_experts,), "gate_b": (spec.n_experts, spec.expert_ffn),
        "up_b": (spec.n_experts, spec.expert_ffn), "down_b": (spec.n_experts, H),
    }
    return shapes


def expert_shape(spec: ArchSpec, matrix: str) -> tuple[int, int]:
    return (spec.hidden, spec.expert_ffn) if matrix == "down" else (spec.expert_ffn, spec.hidden)


class Checkpoint:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise FormatError(f"{path}: no such file or directory")
        if not path.is_dir():
            raise FormatError(f"{path}: expected a Hugging Face model directory (with config.json and *.safetensors)")
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise FormatError(f"{path}: no config.json; expected a Hugging Face model directory")
        try:
            self.config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
        self.path = path
        self.family: Family = family_for(self.config, str(cfg_path))
        try:
            self.spec: ArchSpec = self.family.spec(self.config)
        except KeyError as e:
            raise FormatError(f"{cfg_path}: missing key {e} for a {self.family.name} config") from None
        self.tensors = SafetensorsSet(path)
        tok = path / "tokenizer.json"
        self.tokenizer_json: bytes | None = tok.read_bytes() if tok.exists() else None
        self.chat_metadata: dict = read_chat_template(path)

    # --- tensor access with shape checks -----------------------------------------------------------------
    def _get(self, hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        if hf_name not in self.tensors:
            raise FormatError(f"{self.path}: checkpoint is missing tensor '{hf_name}'")
        arr = self.tensors.get(hf_name)
        if arr.shape != shape:
            if arr.size == int(np.prod(shape)) and len(shape) == 1:  # e.g. shared_expert_gate [1, H] -> [H]
                return arr.reshape(shape)
            raise FormatError(
                f"{self.tensors.file_of(hf_name)}: tensor '{hf_name}' has shape {list(arr.shape)}, "
                f"but config.json implies {list(shape)}"
            )
        return arr

    def global_tensor_items(self):
        """Yield (container name, f32 array) for embeddings, final norm and lm_head, one at a time."""
        s = self.spec
        yield GLOBAL_TENSORS["embed"], self._get("model.embed_tokens.weight", (s.vocab, s.hidden))
        yield GLOBAL_TENSORS["final_norm"], self._get("model.norm.weight", (s.hidden,))
        if not s.tie_embeddings:
            yield GLOBAL_TENSORS["lm_head"], self._get("lm_head.weight", (s.vocab, s.hidden))

    def global_tensors(self) -> dict[str, np.ndarray]:
        """Container name -> f32 array for embeddings, final norm and lm_head."""
        return dict(self.global_tensor_items())

    def layer_dense(self, layer: int) -> dict[str, np.ndarray]:
        """Container name -> f32 array for one layer's attention, norms, router and shared expert."""
        hf = dense_hf_names(self.family, self.spec, layer)
        ours = dense_tensor_names(self.spec, layer)
        shapes = expected_shapes(self.spec, layer)
        if "router" in hf and hf["router"] not in self.tensors:
            hf["router"] = f"model.layers.{layer}.mlp.gate.weight"  # transformers 5 fused layout (Mixtral too)
        out = {}
        for role in ours:
            if role in ("gate_b", "up_b") and self.family.fused == "gpt_oss":  # [E, 2F], gate / up interleaved
                gub = self._get(hf[role], (self.spec.n_experts, 2 * self.spec.expert_ffn))
                out[ours[role]] = np.ascontiguousarray(gub[:, 0::2] if role == "gate_b" else gub[:, 1::2])
            else:
                out[ours[role]] = self._get(hf[role], shapes[role])
        return out

    def layer_experts(self, layer: int):
        """Yield (container name, f32 [out, in]) for every expert matrix of one MoE layer, expert by expert."""
        s = self.spec
        fused_gu = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        if self.family.fused == "gpt_oss" and fused_gu + "_blocks" in self.tensors:
            yield from self._gpt_oss_mxfp4_experts(layer)
            return
        if self.family.fused == "gpt_oss":  # [E, H, 2F] (x @ W), gate / up interleaved; down [E, F, H]
            gu = self._get(fused_gu, (s.n_experts, s.hidden, 2 * s.expert_ffn))
            down = self._get(f"model.layers.{layer}.mlp.experts.down_proj", (s.n_experts, s.expert_ffn, s.hidden))
            for e in range(s.n_experts):
                yield expert_tensor_name(layer, e, "gate"), np.ascontiguousarray(gu[e][:, 0::2].T)
                yield expert_tensor_name(layer, e, "up"), np.ascontiguousarray(gu[e][:, 1::2].T)
                yield expert_tensor_name(layer, e, "down"), np.ascontiguousarray(down[e].T)
            return
        if fused_gu in self.tensors:  # transformers 5 in-memory layout: gate rows first, then up
            gu = self._get(fused_gu, (s.n_experts, 2 * s.expert_ffn, s.hidden))
            down = self._get(f"model.layers.{layer}.mlp.experts.down_proj", (s.n_experts, s.hidden, s.expert_ffn))
            for e in range(s.n_experts):
                yield expert_tensor_name(layer, e, "gate"), np.ascontiguousarray(gu[e, : s.expert_ffn])
                yield expert_tensor_name(layer, e, "up"), np.ascontiguousarray(gu[e, s.expert_ffn :])
                yield expert_tensor_name(layer, e, "down"), np.ascontiguousarray(down[e])
            return
        prefix = f"model.layers.{layer}.{self.family.moe_prefix}.experts"
        for e in range(s.n_experts):
            for matrix, hf_leaf in zip(EXPERT_MATRICES, self.family.expert_names):
                name = f"{prefix}.{e}.{hf_leaf}.weight"
                yield expert_tensor_name(layer, e, matrix), self._get(name, expert_shape(s, matrix))


    def _gpt_oss_mxfp4_experts(self, layer: int):
        """The published gpt-oss experts: MXFP4 [out, in] (gate_up rows interleaved gate, up), dequantized to f32
        one expert at a time."""
        s = self.spec
        p = f"model.layers.{layer}.mlp.experts."
        mats = {}
        for leaf, rows, cols in (("gate_up_proj", 2 * s.expert_ffn, s.hidden), ("down_proj", s.hidden, s.expert_ffn)):
            if cols % 32:
                raise FormatError(f"{self.path}: MXFP4 tensor '{p}{leaf}_blocks' needs a multiple of 32 inputs, the "
                                  f"config implies {cols}")
            blocks = self._get(p + leaf + "_blocks", (s.n_experts, rows, cols // 32, 16)).astype(np.uint8)
            scales = self._get(p + leaf + "_scales", (s.n_experts, rows, cols // 32)).astype(np.uint8)
            mats[leaf] = (blocks, scales)
        for e in range(s.n_experts):
            gu = dequantize_mxfp4(mats["gate_up_proj"][0][e], mats["gate_up_proj"][1][e])  # [2F, H]
            yield expert_tensor_name(layer, e, "gate"), np.ascontiguousarray(gu[0::2])
            yield expert_tensor_name(layer, e, "up"), np.ascontiguousarray(gu[1::2])
            yield expert_tensor_name(layer, e, "down"), dequantize_mxfp4(mats["down_proj"][0][e],
                                                                         mats["down_proj"][1][e])


# The special tokens transformers hands a chat template as variables (bos_token, eos_token, ...).
CHAT_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_chat_template(path: Path) -> dict:
    """A checkpoint's chat template as container metadata: {"chat_template": str, "chat_template_tokens":
    {"bos_token": "<s>", ...}}, or {} when it has none.

    The template comes from `chat_template.jinja` (newer checkpoints) or `tokenizer_config.json`'s
    "chat_template": a string, or a list of {"name", "template"} of which "default" is the one used.
    """
    cfg_path = path / "tokenizer_config.json"
    cfg: dict = {}
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{cfg_path}: expected a JSON object")
    jinja = path / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.exists() else cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise FormatError(f"{cfg_path}: chat_template lists templates {sorted(map(str, named))} but none named "
                              f"'default'")
        template = named["default"]
    if template is None:
        return {}
    if not isinstance(template, str):
        raise FormatError(f"{cfg_path}: chat_template must be a string or a list of {{name, template}}, got "
                          f"{type(template).__name__}")
    tokens = {}
    for key in CHAT_TEMPLATE_TOKENS:
        value = cfg.get(key)
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return {"chat_template": template, "chat_template_tokens": tokens}


def open_checkpoint(path: str | Path) -> Checkpoint:
    return Checkpoint(path)
