"""Open a Hugging Face MoE checkpoint directory lazily: config -> ArchSpec, tensors one layer at a time.

Tensors are memory-mapped (see safetensors_lazy); only what a caller asks for is materialized, so exporting a
checkpoint larger than RAM works layer by layer. Every tensor handed out is checked against the shape the
config implies, so a checkpoint that disagrees with its config is reported by name instead of failing later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemoe.arch import (
    EXPERT_MATRICES,
    GLOBAL_TENSORS,
    ArchSpec,
    dense_tensor_names,
    expert_tensor_name,
    tensor_shape,
    tensor_table,
)
from edgemoe.errors import FormatError, UnsupportedModelError

from .families import Family, dense_hf_names, family_for, text_part
from .json_input import read_json
from .mxfp4 import dequantize_mxfp4
from .safetensors_lazy import FLOAT_DTYPES, SafetensorsSet
from .tokenizer_check import check_tokenizer


def expected_shapes(spec: ArchSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """Role -> logical shape [out, in] (or [n]) of each dense tensor of one layer (the tensor table's)."""
    return {role: tensor_shape(spec, role, layer) for role, _, scope, *_ in tensor_table() if scope == "layer"}


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
        self.config, prefix = text_part(read_json(cfg_path), str(cfg_path))
        self.path = path
        self.family: Family = family_for(self.config, str(cfg_path))
        try:
            self.spec: ArchSpec = self.family.spec(self.config)
        except (FormatError, UnsupportedModelError) as e:  # the family's reader names the field, this the file
            raise type(e)(f"{cfg_path}: {e} (model_type {self.config['model_type']})") from None
        self.tensors = SafetensorsSet(path)
        if prefix is None and self.config.get("text_config") is not None and self.family.fold == "gemma4":
            prefix = "model.language_model."  # gemma4's reader takes its text config itself (_gemma4_text)
        if prefix is not None:
            self._text_part(prefix)
        self._check_tensors(cfg_path)
        tok = path / "tokenizer.json"
        self.tokenizer_json: bytes | None = None
        if tok.exists():
            self.tokenizer_json = check_tokenizer(tok.read_bytes() if not tok.is_dir() else b"", self.spec.vocab,
                                                  str(tok))
        self.chat_metadata: dict = read_chat_template(path)

    def _text_part(self, prefix: str) -> None:
        """A multimodal checkpoint (Qwen3.5, Gemma-4): its text model ({prefix}*) is read under the text-only names;
        the vision / audio towers are not read."""
        if not self.tensors.read_under(prefix, "model."):
            raise FormatError(f"{self.path}: this multimodal {self.config.get('model_type')} checkpoint has no text "
                              f"model tensors ({prefix}*; a vision or audio tower only?): edgemoe runs the text model")

    # --- which tensor is where -----------------------------------------------------------------------------
    def _dense_plan(self, layer: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Container name -> (HF name, expected shape) for one layer's attention, norms, router and shared expert."""
        hf = dense_hf_names(self.family, self.spec, layer)
        if "router" in hf and hf["router"] not in self.tensors:
            hf["router"] = f"model.layers.{layer}.{self.family.router_fused}"  # transformers 5 fused layout
        alt = f"model.layers.{layer}.{self.family.moe_prefix}.gate.{self.family.score_bias}"
        if "score_bias" in hf and hf["score_bias"] not in self.tensors and alt in self.tensors:
            hf["score_bias"] = alt  # transformers 5's own layout keeps ERNIE's selection bias under the gate

        shapes = expected_shapes(self.spec, layer)
        if self._interleaved_bias():  # gate_b / up_b are both read from gate_up_proj_bias [E, 2F] (see layer_dense)
            shapes["gate_b"] = shapes["up_b"] = (self.spec.n_experts, 2 * self.spec.expert_ffn)
        if self.spec.layer_kind(layer) == "conv":  # LFM2's taps are an nn.Conv1d weight [H, 1, K] (see layer_dense)
            h, k = shapes["conv_w"]
            shapes["conv_w"] = (h, 1, k)
        fused_shared = self._shared_fused(layer)
        s = self.spec
        if s.attn_gate:  # q_proj holds [q | gate] per head: read once, split by layer_dense
            shapes["wq"] = (2 * s.n_heads * s.head_dim, s.hidden)
        if self.family.fused_qkvz:  # Qwen3-Next: read whole, split by layer_dense
            qkvz = 2 * s.linear_k_heads * s.linear_k_dim + 2 * s.linear_v_heads * s.linear_v_dim
            shapes["la_qkv"] = shapes["la_z"] = (qkvz, s.hidden)
            shapes["la_b"] = shapes["la_a"] = (2 * s.linear_v_heads, s.hidden)
        return {name: (hf[role], shapes[role]) for role, name in dense_tensor_names(self.spec, layer).items()
                if not (fused_shared and role in ("sh_gate", "sh_up", "sh_down")) and role != "attn_gate"}

    def _shared_fused(self, layer: int) -> dict[str, tuple[int, ...]] | None:
        """HF name -> shape of a shared MLP stored fused (Granite: input_linear = gate rows then up rows [2S, H],
        output_linear = down [H, S]), or None."""
        s = self.spec
        if not (self.family.shared_fused and s.shared_ffn and s.is_moe_layer(layer)):
            return None
        p = f"model.layers.{layer}.{self.family.shared_fused}."
        return {p + "input_linear.weight": (2 * s.shared_ffn, s.hidden),
                p + "output_linear.weight": (s.hidden, s.shared_ffn)}

    def _interleaved_bias(self) -> bool:
        return self.family.fused == "gpt_oss" and self.spec.expert_bias

    def _mxfp4(self, layer: int) -> bool:
        """gpt-oss's published experts: MXFP4 *_blocks / *_scales instead of float gate_up_proj / down_proj."""
        return f"model.layers.{layer}.mlp.experts.gate_up_proj_blocks" in self.tensors

    def _mxfp4_plan(self, layer: int) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of gpt-oss's MXFP4 expert tensors: blocks [E, out, in/32, 16] and scales [E, out, in/32]
        (U8), for gate_up (rows interleaved gate, up) and down."""
        s = self.spec
        p = f"model.layers.{layer}.mlp.experts."
        plan = {}
        for leaf, rows, cols in (("gate_up_proj", 2 * s.expert_ffn, s.hidden), ("down_proj", s.hidden, s.expert_ffn)):
            if cols % 32:
                raise FormatError(f"{self.path}: MXFP4 tensor '{p}{leaf}_blocks' needs a multiple of 32 inputs, the "
                                  f"config implies {cols}")
            plan[p + leaf + "_blocks"] = (s.n_experts, rows, cols // 32, 16)
            plan[p + leaf + "_scales"] = (s.n_experts, rows, cols // 32)
        return plan

    def _fused_experts(self, layer: int) -> tuple[str, str] | None:
        """(gate_up, down) HF names when the layer's experts are stacked (transformers 5 in-memory layout, or a
        family stored fused: Granite's input_linear / output_linear)."""
        for gu, down in (("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), *self.family.fused_experts):
            if f"model.layers.{layer}.{gu}" in self.tensors:
                return f"model.layers.{layer}.{gu}", f"model.layers.{layer}.{down}"
        return None

    def _expert_plan(self, layer: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """HF name -> expected shape of every tensor holding one MoE layer's experts."""
        s = self.spec
        fused = self._fused_experts(layer)
        if self.family.fused == "gpt_oss":  # x @ W layout: gate_up [E, H, 2F] (columns interleaved), down [E, F, H]
            if self._mxfp4(layer):
                return self._mxfp4_plan(layer)
            p = f"model.layers.{layer}.mlp.experts."
            return {p + "gate_up_proj": (s.n_experts, s.hidden, 2 * s.expert_ffn),
                    p + "down_proj": (s.n_experts, s.expert_ffn, s.hidden)}
        if fused:
            return {fused[0]: (s.n_experts, 2 * s.expert_ffn, s.hidden), fused[1]: (s.n_experts, s.hidden, s.expert_ffn)}
        if not all(self.family.expert_names):  # a family stored only fused (Granite): name what is missing
            return {f"model.layers.{layer}.{self.family.fused_experts[0][0]}": (s.n_experts, 2 * s.expert_ffn, s.hidden)}
        prefix = f"model.layers.{layer}.{self.family.moe_prefix}.experts"
        return {f"{prefix}.{e}.{leaf}.weight": expert_shape(s, matrix)
                for e in range(s.n_experts) for matrix, leaf in zip(EXPERT_MATRICES, self.family.expert_names)}

    def _fold_plan(self, layer: int) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of the scales folded into the router and the experts (Gemma-4), or {}."""
        if self.family.fold != "gemma4":
            return {}
        p = f"model.layers.{layer}.router."
        return {p + "scale": (self.spec.hidden,), p + "per_expert_scale": (self.spec.n_experts,)}

    def _check_tensors(self, cfg_path: Path) -> None:
        """Every tensor the config implies is present, floating point and of the implied shape -- from the headers,
        before anything is read or written."""
        s = self.spec
        n_tensors = len(self.tensors.names())
        if s.n_layers > n_tensors:
            raise FormatError(f"{cfg_path}: num_hidden_layers = {s.n_layers}, but the checkpoint holds only {n_tensors} "
                              "tensors")
        want = {"model.embed_tokens.weight": (s.vocab, s.hidden), self.family.final_norm: (s.hidden,)}
        if not s.tie_embeddings:
            want["lm_head.weight"] = (s.vocab, s.hidden)
        for layer in range(s.n_layers):
            want.update(self._dense_plan(layer).values())
            want.update(self._shared_fused(layer) or {})
            if s.is_moe_layer(layer):
                want.update(self._expert_plan(layer))
                want.update(self._fold_plan(layer))
        for hf_name, shape in want.items():
            self._check_header(hf_name, shape, ("U8",) if hf_name.endswith(("_blocks", "_scales")) else FLOAT_DTYPES)

    def _check_header(self, hf_name: str, shape: tuple[int, ...], dtypes: tuple[str, ...] = FLOAT_DTYPES) -> None:
        if hf_name not in self.tensors:
            raise FormatError(f"{self.path}: checkpoint is missing tensor '{self.tensors.real_name(hf_name)}'")
        where = self.tensors.file_of(hf_name)
        dtype = self.tensors.dtype(hf_name)
        if dtype not in dtypes:
            what = "MXFP4 blocks and scales must be U8" if dtypes == ("U8",) else \
                f"weights must be floating point ({', '.join(FLOAT_DTYPES)})"
            raise FormatError(f"{where}: tensor '{self.tensors.real_name(hf_name)}' is stored as {dtype}; {what}")
        got = self.tensors.shape(hf_name)
        if got != shape and not (len(shape) == 1 and int(np.prod(got)) == shape[0]):  # e.g. [1, H] -> [H]
            raise FormatError(f"{where}: tensor '{self.tensors.real_name(hf_name)}' has shape {list(got)}, but "
                              f"config.json implies {list(shape)}")

    # --- tensor access with shape checks -----------------------------------------------------------------
    def _get(self, hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        self._check_header(hf_name, shape)
        return self.tensors.get(hf_name).reshape(shape)

    def global_tensor_items(self):
        """Yield (container name, f32 array) for embeddings, final norm and lm_head, one at a time."""
        s = self.spec
        yield GLOBAL_TENSORS["embed"], self._get("model.embed_tokens.weight", (s.vocab, s.hidden))
        yield GLOBAL_TENSORS["final_norm"], self._norm(self._get(self.family.final_norm, (s.hidden,)))
        if not s.tie_embeddings:
            yield GLOBAL_TENSORS["lm_head"], self._get("lm_head.weight", (s.vocab, s.hidden))

    def _norm(self, w: np.ndarray) -> np.ndarray:
        """An RMSNorm weight as the forward pass multiplies by it (Family.norm_offset: stored as w - 1)."""
        return (w + np.float32(1)).astype(np.float32) if self.family.norm_offset else w

    def global_tensors(self) -> dict[str, np.ndarray]:
        """Container name -> f32 array for embeddings, final norm and lm_head."""
        return dict(self.global_tensor_items())

    def layer_dense(self, layer: int) -> dict[str, np.ndarray]:
        """Container name -> f32 array for one layer's attention, norms, router and shared expert."""
        out = {name: self._get(hf, shape) for name, (hf, shape) in self._dense_plan(layer).items()}
        if self.spec.layer_kind(layer) == "conv":  # [H, 1, K] -> [H, K]
            conv_w = dense_tensor_names(self.spec, layer)["conv_w"]
            out[conv_w] = out[conv_w].reshape(expected_shapes(self.spec, layer)["conv_w"])
        fused = self._shared_fused(layer)
        if fused:  # Granite: one [2S, H] input matrix, gate rows first
            (gu_name, gu_shape), (down_name, down_shape) = fused.items()
            ours, S = dense_tensor_names(self.spec, layer), self.spec.shared_ffn
            gu = self._get(gu_name, gu_shape)
            out[ours["sh_gate"]], out[ours["sh_up"]] = np.ascontiguousarray(gu[:S]), np.ascontiguousarray(gu[S:])
            out[ours["sh_down"]] = self._get(down_name, down_shape)
        ours = dense_tensor_names(self.spec, layer)
        for role in ("attn_norm", "ffn_norm", "q_norm", "k_norm"):
            if role in ours:
                out[ours[role]] = self._norm(out[ours[role]])
        if self.family.fused_qkvz and "la_qkv" in ours:
            self._split_qkvz(out, ours)
        if "attn_gate" in ours:  # Qwen3.5 / Next q_proj rows per head: head_dim query rows, then head_dim gate rows
            s = self.spec
            qg = out[ours["wq"]].reshape(s.n_heads, 2, s.head_dim, s.hidden)
            out[ours["wq"]] = np.ascontiguousarray(qg[:, 0].reshape(-1, s.hidden))
            out[ours["attn_gate"]] = np.ascontiguousarray(qg[:, 1].reshape(-1, s.hidden))
        if self._fold_plan(layer):  # Gemma-4: router rows x scale / sqrt(hidden), as its forward scales its input
            ours = dense_tensor_names(self.spec, layer)
            (scale_name, shape), _ = self._fold_plan(layer).items()
            col = self._get(scale_name, shape) * np.float32(self.spec.hidden ** -0.5)
            out[ours["router"]] = (out[ours["router"]] * col[None, :]).astype(np.float32)
        if self._interleaved_bias():  # gpt-oss: gate_up_proj_bias [E, 2F], gate / up interleaved
            for role, start in (("gate_b", 0), ("up_b", 1)):
                out[ours[role]] = np.ascontiguousarray(out[ours[role]][:, start::2])
        return out

    def _split_qkvz(self, out: dict, ours: dict) -> None:
        """Qwen3-Next: in_proj_qkvz rows per key head [q dk | k dk | v r*dv | z r*dv] and in_proj_ba per key head
        [b r | a r] (r = value heads per key head) -> la_qkv = [all q | all k | all v], la_z, la_b, la_a."""
        s = self.spec
        K, dk, dv, r, H = s.linear_k_heads, s.linear_k_dim, s.linear_v_dim, s.linear_v_heads // s.linear_k_heads, \
            s.hidden
        w = out[ours["la_qkv"]].reshape(K, 2 * dk + 2 * r * dv, H)
        parts = np.split(w, [dk, 2 * dk, 2 * dk + r * dv], axis=1)
        out[ours["la_qkv"]] = np.ascontiguousarray(np.concatenate([p.reshape(-1, H) for p in parts[:3]]))
        out[ours["la_z"]] = np.ascontiguousarray(parts[3].reshape(-1, H))
        ba = out[ours["la_b"]].reshape(K, 2 * r, H)
        out[ours["la_b"]] = np.ascontiguousarray(ba[:, :r].reshape(-1, H))
        out[ours["la_a"]] = np.ascontiguousarray(ba[:, r:].reshape(-1, H))

    def layer_experts(self, layer: int):
        """Yield (container name, f32 [out, in]) for every expert matrix of one MoE layer, expert by expert."""
        s = self.spec
        if self.family.fused == "gpt_oss" and self._mxfp4(layer):
            yield from self._gpt_oss_mxfp4_experts(layer)
            return
        fused = self._fused_experts(layer)
        if fused and self.family.fused == "gpt_oss":  # [E, H, 2F] (x @ W), gate / up interleaved; down [E, F, H]
            plan = self._expert_plan(layer)
            gu, down = (self._get(n, plan[n]) for n in fused)
            for e in range(s.n_experts):
                yield expert_tensor_name(layer, e, "gate"), np.ascontiguousarray(gu[e][:, 0::2].T)
                yield expert_tensor_name(layer, e, "up"), np.ascontiguousarray(gu[e][:, 1::2].T)
                yield expert_tensor_name(layer, e, "down"), np.ascontiguousarray(down[e].T)
            return
        if fused:  # gate rows first, then up
            plan = self._expert_plan(layer)
            for n in fused:
                self._check_header(n, plan[n])
            # one expert's slice at a time: the stacked [E, 2F, H] tensor in float32 was 1.6 GB at Qwen3-30B-A3B's shape
            gu_down = [(n, plan[n][1:]) for n in fused]
            fold = self._fold_plan(layer)  # Gemma-4: per_expert_scale scales each expert's output: fold it into down
            pes = self._get(*list(fold.items())[1]) if fold else None
            for e in range(s.n_experts):
                gu, down = (self.tensors.get(n, e).reshape(shape) for n, shape in gu_down)
                yield expert_tensor_name(layer, e, "gate"), np.ascontiguousarray(gu[: s.expert_ffn])
                yield expert_tensor_name(layer, e, "up"), np.ascontiguousarray(gu[s.expert_ffn :])
                d = down if pes is None else (down * pes[e]).astype(np.float32)
                yield expert_tensor_name(layer, e, "down"), np.ascontiguousarray(d)
            return
        if not all(self.family.expert_names):  # a family stored only fused (Granite): name what is missing
            raise FormatError(f"{self.path}: checkpoint is missing tensor "
                              f"'model.layers.{layer}.{self.family.fused_experts[0][0]}'")
        prefix = f"model.layers.{layer}.{self.family.moe_prefix}.experts"
        for e in range(s.n_experts):
            for matrix, hf_leaf in zip(EXPERT_MATRICES, self.family.expert_names):
                name = f"{prefix}.{e}.{hf_leaf}.weight"
                yield expert_tensor_name(layer, e, matrix), self._get(name, expert_shape(s, matrix))


    def _gpt_oss_mxfp4_experts(self, layer: int):
        """The published gpt-oss experts: MXFP4 [out, in] (gate_up rows interleaved gate, up), dequantized to f32
        one expert at a time."""
        s = self.spec
        plan = self._mxfp4_plan(layer)
        for name, shape in plan.items():
            self._check_header(name, shape, ("U8",))
        p = f"model.layers.{layer}.mlp.experts."
        mats = {leaf: tuple(self.tensors.get_u8(p + leaf + part) for part in ("_blocks", "_scales"))
                for leaf in ("gate_up_proj", "down_proj")}
        for e in range(s.n_experts):
            gu = dequantize_mxfp4(mats["gate_up_proj"][0][e], mats["gate_up_proj"][1][e])  # [2F, H]
            yield expert_tensor_name(layer, e, "gate"), np.ascontiguousarray(gu[0::2])
            yield expert_tensor_name(layer, e, "up"), np.ascontiguousarray(gu[1::2])
            yield expert_tensor_name(layer, e, "down"), dequantize_mxfp4(mats["down_proj"][0][e],
                                                                         mats["down_proj"][1][e])

    def file_of(self, name: str) -> Path:
        return self.inner.file_of(self._real(name))

    def dtype(self, name: str) -> str:
        return self.inner.dtype(self._real(name))


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
        cfg = read_json(cfg_path)
    jinja = path / "chat_template.jinja"
    template = _read_text(jinja) if jinja.exists() else cfg.get("chat_template")
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


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None


def open_checkpoint(path: str | Path) -> Checkpoint:
    return Checkpoint(path)
