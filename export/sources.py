"""Export sources: what `edgemoe export SRC` (and the GGUF / ONNX writers) can read.

- `open_source(path)`: a Hugging Face checkpoint directory (`checkpoint.open_checkpoint`) or a `.gguf` file
  (`gguf_reader.open_gguf`). Both return the same Checkpoint interface.
- `ContainerSource` / `open_container_source(path)`: an `.emoe` container read back as a source for the GGUF and
  ONNX writers: tensors dequantized to f32 (f16, q8_0 and MWQ planes), and a merged model (`spec.expert_map`)
  *expanded* to one expert per routed slot, because llama.cpp and onnxruntime have no e -> g map (see
  `expand_merged` below for why that is the same function, and why pruned experts are refused).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from edgemoe.arch import EXPERT_MATRICES, GLOBAL_TENSORS, ArchSpec, dense_tensor_names, expert_tensor_name
from edgemoe.errors import EdgeMoEError, FormatError

from .checkpoint import open_checkpoint


def open_source(path: str | Path):
    """A checkpoint directory -> `open_checkpoint(path)`; a `.gguf` file -> `open_gguf(path)`."""
    p = Path(path)
    if p.is_dir():
        return open_checkpoint(p)
    if p.suffix.lower() == ".gguf":
        from .gguf_reader import open_gguf

        return open_gguf(p)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    raise FormatError(f"{p}: expected a Hugging Face model directory (config.json + *.safetensors) or a .gguf file")


class WeightSource:
    """Named f32 weights (container names) + an ArchSpec, read like a Checkpoint by the GGUF and ONNX writers.

    expand_merged=True (what llama.cpp and onnxruntime need): the spec handed out has no expert_map and
    `layer_experts` yields `n_experts` experts, routed slot e holding a copy of its stored expert g = map[e].
    This computes the same function as edgemoe's merged forward: with top-k weights w_e, edgemoe runs each selected
    group once with the summed weight sum_{e in top-k, map[e]=g} w_e, i.e. sum_e w_e f_{map[e]}(x) -- exactly what
    running every selected slot's own copy gives (only the summation order differs). Routing is unchanged: the
    router rows are untouched, so the same slots are selected with the same probabilities.

    A pruned slot (map[e] = -1) is masked out of routing (its logit is -inf before the softmax and the top-k).
    llama.cpp's routers for these architectures have no bias, so a slot's logit is r . x, an odd function of the
    normed input: whatever row r is written, r . (-x) = -(r . x), so no row is very negative for every input, and
    a finite logit always enters the softmax denominator (and wins the top-k when the others are lower). A zero
    row gives logit 0, which is selected whenever the kept experts' logits are negative; duplicating a kept expert
    into the slot changes which slots win. No GGUF computes the pruned model for all inputs, so pruned maps are
    refused unless `allow_pruned=True` (the ONNX writer masks logits exactly): the map's -1 entries are then kept
    in `self.pruned[layer]` and the slots get zero experts, for the writer to mask.
    """

    def __init__(self, spec: ArchSpec, get, tokenizer_json: bytes | None = None, path: str | Path = "weights",
                 expand_merged: bool = True, allow_pruned: bool = False, config: dict | None = None):
        self.path = Path(path)
        self._get_fn = get
        self.source_spec = spec
        self.expand_merged = expand_merged
        self.pruned: dict[int, list[int]] = {}
        self._maps: dict[int, list[int]] = {}
        if expand_merged:
            for layer in range(spec.n_layers):
                m = spec.layer_expert_map(layer)
                if m is None:
                    continue
                if len(m) != spec.n_experts:
                    raise FormatError(f"{self.path}: expert_map of layer {layer} has {len(m)} entries for "
                                      f"{spec.n_experts} experts")
                pruned = [e for e, g in enumerate(m) if g < 0]
                if pruned and not allow_pruned:
                    raise EdgeMoEError(
                        f"{self.path}: layer {layer} prunes experts {pruned} (expert_map -1). llama.cpp's router has "
                        "no way to exclude an expert from routing (a bias-free router row cannot give a very "
                        "negative logit for every input, and any finite logit still enters the softmax and the "
                        "top-k), so no GGUF computes this model. Merge instead of pruning (method mcsmoe or "
                        "average), or run the edgemoe container or the ONNX export, which masks pruned experts."
                    )
                self._maps[layer] = list(m)
                if pruned:
                    self.pruned[layer] = pruned
            self.spec: ArchSpec = dataclasses.replace(spec, expert_map=[])
        else:
            self.spec = spec
        self.family = None
        self.config = dict(config or {"model_type": spec.family})
        self.tokenizer_json = tokenizer_json
        self.chat_metadata: dict = {}  # chat_template + chat_template_tokens, when the source has them

    def _get(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self._get_fn(name), dtype=np.float32)

    def global_tensor_items(self):
        yield GLOBAL_TENSORS["embed"], self._get(GLOBAL_TENSORS["embed"])
        yield GLOBAL_TENSORS["final_norm"], self._get(GLOBAL_TENSORS["final_norm"])
        if not self.spec.tie_embeddings:
            yield GLOBAL_TENSORS["lm_head"], self._get(GLOBAL_TENSORS["lm_head"])

    def global_tensors(self) -> dict[str, np.ndarray]:
        return dict(self.global_tensor_items())

    def layer_dense(self, layer: int) -> dict[str, np.ndarray]:
        return {name: self._get(name) for name in dense_tensor_names(self.spec, layer).values()}

    def layer_experts(self, layer: int):
        """Yield (name, f32 [out, in]) for every routed slot (expanded) or every stored expert (not expanded)."""
        s = self.spec
        m = self._maps.get(layer)
        if m is None:
            n = s.n_experts if self.expand_merged else self.source_spec.stored_experts(layer)
            for e in range(n):
                for matrix in EXPERT_MATRICES:
                    yield expert_tensor_name(layer, e, matrix), self._get(expert_tensor_name(layer, e, matrix))
            return
        cache: dict[int, dict[str, np.ndarray]] = {}
        for e, g in enumerate(m):
            if g >= 0 and g not in cache:
                cache[g] = {mx: self._get(expert_tensor_name(layer, g, mx)) for mx in EXPERT_MATRICES}
            for matrix in EXPERT_MATRICES:
                if g < 0:  # pruned: a zero expert; the writer masks the slot out of routing
                    shape = (s.hidden, s.expert_ffn) if matrix == "down" else (s.expert_ffn, s.hidden)
                    arr = np.zeros(shape, np.float32)
                else:
                    arr = cache[g][matrix]
                yield expert_tensor_name(layer, e, matrix), arr

    def close(self) -> None:
        pass


class ContainerSource(WeightSource):
    """An `.emoe` container as a source: tensors dequantized to f32 (f16, q8_0, MWQ planes: all stored planes)."""

    def __init__(self, path: str | Path, expand_merged: bool = True, allow_pruned: bool = False):
        from edgemoe.container import open_container

        self._c = open_container(path, verify=True)
        tok = self._c.tensors.get("tokenizer.json")
        config = {"model_type": self._c.spec.family,
                  **{k: v for k, v in self._c.metadata.items() if isinstance(v, (int, float, str, bool))}}
        super().__init__(self._c.spec, self._read, self._c.blob("tokenizer.json") if tok is not None else None,
                         path, expand_merged, allow_pruned, config)
        self.chat_metadata = {k: self._c.metadata[k] for k in ("chat_template", "chat_template_tokens")
                              if k in self._c.metadata}

    def _read(self, name: str) -> np.ndarray:
        from edgemoe.mwq import dequantize
        from edgemoe.quant import to_f32

        t = self._c.tensors.get(name)
        if t is None:
            raise FormatError(f"{self.path}: container has no tensor '{name}'")
        if t.dtype == "mwq":
            q = t.quant
            out, in_ = t.shape
            arr = dequantize(self._c.planes(name), t.n_planes, out, in_, q["base_bits"], q["group_size"])
        else:
            arr = to_f32(self._c.array(name), t.dtype, t.shape)
        return np.asarray(arr, dtype=np.float32).reshape(t.shape)

    def close(self) -> None:
        self._c.close()


def open_container_source(path: str | Path, expand_merged: bool = True, allow_pruned: bool = False) -> ContainerSource:
    return ContainerSource(path, expand_merged, allow_pruned)
