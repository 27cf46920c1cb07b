"""`edgemoe bench --vs-onnx model.onnx`: the same pp / tg measurements through onnxruntime.

The graph is edgemoe's ONNX export (export/onnx_export.py): onnxruntime-genai's decoder layout, i.e. inputs
input_ids / attention_mask / position_ids and past_key_values.{i}.key|value [batch, n_kv_heads, past, head_dim],
outputs logits and present.{i}.key|value. A prompt is one run with an empty past; generation feeds each step's
`present` back as the next step's `past`, as any plain onnxruntime loop does (no IOBinding: the KV copies are part
of what a user of the plain API pays). Threads: SessionOptions.intra_op_num_threads, one inter-op thread
(sequential execution), so `--threads N` means N compute threads for every engine in the table.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import EdgeMoEError

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


class OnnxRunner:
    """Drives an ONNX decoder with a KV cache through onnxruntime's CPU execution provider."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, n_threads: int, spec=None):
        """spec: the edgemoe model's ArchSpec, to refuse an ONNX file of another model (vocab, layers, KV heads)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise EdgeMoEError("--vs-onnx needs onnxruntime: pip install onnxruntime "
                               "(or pip install 'edgemoe[export]')") from None
        path = Path(onnx_path)
        if not path.is_file():
            raise EdgeMoEError(f"{path}: no such ONNX file (edgemoe export --onnx DIR writes DIR/model.onnx)")
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(n_threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own exception types for bad files
            raise EdgeMoEError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from None
        inputs = {i.name: i for i in self.sess.get_inputs()}
        outputs = [o.name for o in self.sess.get_outputs()]
        need = {"input_ids", "attention_mask", "position_ids"}
        if not need <= set(inputs) or "logits" not in outputs:
            raise EdgeMoEError(f"{path}: not a decoder graph with a KV cache (needs inputs {sorted(need)} and "
                               f"past_key_values.*, output logits; got inputs {sorted(inputs)[:6]})")
        self.past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        if not self.past_names:
            raise EdgeMoEError(f"{path}: no past_key_values.* inputs; the bench needs a graph with a KV cache")
        self.empty_past = {}
        for n in self.past_names:
            shape = inputs[n].shape  # [batch, n_kv_heads, past, head_dim]
            if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
                raise EdgeMoEError(f"{path}: input {n} has shape {shape}; expected [batch, n_kv_heads, past, head_dim]")
            self.empty_past[n] = np.zeros((1, shape[1], 0, shape[3]), np.float32)
        if spec is not None:
            vocab = self.sess.get_outputs()[outputs.index("logits")].shape[-1]
            got = (vocab if isinstance(vocab, int) else spec.vocab, len(self.past_names) // 2,
                   self.empty_past[self.past_names[0]].shape[1], self.empty_past[self.past_names[0]].shape[3])
            want = (spec.vocab, spec.n_layers, spec.n_kv_heads, spec.head_dim)
            if got != want:
                raise EdgeMoEError(f"{path}: not the same model as the one benchmarked: (vocab, layers, kv heads, "
                                   f"head dim) = {got}, expected {want}")
        self.output_names = outputs
        self.logits_index = outputs.index("logits")

    def _run(self, ids: list[int], start: int, past: dict) -> tuple[np.ndarray, dict]:
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, start + n), np.int64),
                "position_ids": np.arange(start, start + n, dtype=np.int64)[None], **past}
        out = self.sess.run(self.output_names, feed)
        present = {PAST_PREFIX + name[len(PRESENT_PREFIX):]: v for name, v in zip(self.output_names, out)
                   if name.startswith(PRESENT_PREFIX)}
        return out[self.logits_index][0, -1], present

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), vocab] of a fresh sequence (for agreement checks)."""
        ids = [int(i) for i in ids]
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
                "position_ids": np.arange(len(ids), dtype=np.int64)[None], **self.empty_past}
        return self.sess.run(["logits"], feed)[0][0]

    def prompt(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self._run(ids, 0, self.empty_past)
        return time.perf_counter() - t0

    def generate(self, first: int, n: int) -> float:
        logits, past = self._run([first], 0, self.empty_past)
        pos = 1
        t0 = time.perf_counter()
        for _ in range(n):
            logits, past = self._run([int(np.argmax(logits))], pos, past)
            pos += 1
        return time.perf_counter() - t0
