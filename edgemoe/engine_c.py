"""The C engine: the native forward pass (KV cache, threads, SIMD kernels) behind the same verbs as NumpyEngine."""

from __future__ import annotations

import numpy as np

from . import _native as N
from .arch import ArchSpec, model_tensors


def model_tensor_names(spec: ArchSpec) -> list[str]:
    """Every tensor name the forward pass reads (arch.py's table), lm_head included even when tied."""
    return [name for name, _, _ in model_tensors(spec)]


class CEngine:
    """The native engine over borrowed tensors.

    tensors: name -> numpy array (possibly an np.memmap / mmap view): f32/f16 with the logical shape, or for "q8_0"
    the raw uint8 blocks (rows*cols/32*34 bytes). The arrays are borrowed, not copied (except 1-D f16 tensors, which
    the core wants in f32, and misaligned views), and kept referenced here so they outlive the C model.
    Expert matrices of dtype "mwq" (bit planes, docs/FORMAT.md): either the list of the K plane arrays, or the raw
    uint8 span of the planes with quant[name] = {"base_bits", "group_size", "n_planes", "plane_offsets" (bytes from
    the span's start)} (what edgemoe.load passes for a container).

    kv_f16: f16 KV cache (half the memory; logits move by ~5e-4 relative). q8_f32_act: Q8_0 and MWQ matmuls keep f32
    activations (exact against the dequantized weights, slower) instead of quantizing them to int8 per block of 32
    (the default: ~0.2-0.5% error per dot product, like llama.cpp). isa: force the kernels.
    precision: MWQ experts run at this many planes (None = all stored). planes: a reader (name, k) -> the first k
    plane views that checks each plane's checksum on first read (Container.planes); when given, the planes a
    precision uses are read through it (so a corrupt plane is reported before the C core touches it).
    """

    supports_mwq = True

    def __init__(self, spec: ArchSpec, tensors: dict[str, np.ndarray], dtypes: dict[str, str], threads: int = 1,
                 max_ctx: int = 4096, kv_f16: bool = False, isa: int | str | None = None, q8_f32_act: bool = False,
                 precision: int | None = None, planes=None, quant: dict[str, dict] | None = None):
        self.spec = spec
        self.max_ctx = int(max_ctx)
        self.plan = None  # a budget's plan (open_streaming)
        # the core reads the same JSON a container stores (one parser, one set of rules; no mirrored struct)
        self._h = N.ModelHandle(spec.dumps(), self.max_ctx, kv_f16, max(1, int(threads)))
        self._seq_ids: list[list[int]] = [[]]  # per sequence: the tokens whose keys/values its KV cache holds
        self._arrays: list[np.ndarray] = []
        self._plane_reader, self._quant = planes, dict(quant or {})
        self._mwq: dict[str, int] = {}  # MWQ tensor -> planes stored
        self._checked: dict[str, int] = {}  # MWQ tensor -> planes read through the checksum-checking reader
        for name in model_tensor_names(spec):
            if name in tensors:
                dtype = dtypes.get(name, _dtype_of(tensors[name]))
                if dtype == "mwq":
                    self._set_mwq(name, tensors[name])
                else:
                    self._set(name, tensors[name], dtype)
        self.set_precision(precision)
        self._h.ready()  # names the first missing tensor
        if isa is not None:
            self.set_isa(isa)
        self._h.set_q8_f32_act(q8_f32_act)

    def _set_mwq(self, name: str, value) -> None:
        rows, cols = self._h.expected_shape(name)
        q = self._quant.get(name, {})
        if "base_bits" not in q or "group_size" not in q:
            raise N.NativeError(f"tensor '{name}': MWQ planes need quant parameters base_bits and group_size",
                                N.ERR_ARG)
        b1, g = int(q["base_bits"]), int(q["group_size"])
        if isinstance(value, (list, tuple)):
            arrs = [np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in value]
            base, offs = N.plane_offsets(arrs)
            self._arrays.extend(arrs)
        else:
            base = np.asarray(value)
            if base.dtype != np.uint8 or not base.flags.c_contiguous or "plane_offsets" not in q:
                raise N.NativeError(f"tensor '{name}': MWQ data must be the list of planes, or the uint8 span with "
                                    f"quant['plane_offsets']", N.ERR_ARG)
            offs = np.asarray(q["plane_offsets"], dtype=np.int64)
            end = max(int(o) + N.mwq_plane_bytes(i, b1, g, rows, cols) for i, o in enumerate(offs, start=1))
            if offs.min() < 0 or end > base.nbytes:
                raise N.NativeError(f"tensor '{name}': MWQ planes end at byte {end}, the span has {base.nbytes}",
                                    N.ERR_ARG)
            self._arrays.append(base)
            arrs = None
        if arrs is not None:
            for i, a in enumerate(arrs, start=1):
                if a.nbytes != N.mwq_plane_bytes(i, b1, g, rows, cols):
                    raise N.NativeError(f"tensor '{name}': MWQ plane {i} has {a.nbytes} bytes, expected "
                                        f"{N.mwq_plane_bytes(i, b1, g, rows, cols)} for [{rows}, {cols}]", N.ERR_ARG)
        self._h.set_expert_mwq(name, base, offs, len(offs), b1, g, rows, cols)
        self._mwq[name] = len(offs)

    def set_precision(self, k: int | None) -> None:
        """Run every MWQ expert at k planes (None = all stored). The planes this needs are read (checksums checked)
        through the plane reader first, when the engine has one."""
        if k is not None and (int(k) != k or not 1 <= int(k) <= N.MWQ_MAX_PLANES):
            raise N.NativeError(f"precision {k!r}: expected a number of planes 1..{N.MWQ_MAX_PLANES}", N.ERR_ARG)
        if self._plane_reader is not None:
            for name, stored in self._mwq.items():
                need = min(stored, int(k)) if k is not None else stored
                if self._checked.get(name, 0) < need:
                    self._plane_reader(name, need)  # raises FormatError naming the tensor and the plane
                    self._checked[name] = need
        self._h.set_precision(0 if k is None else int(k))
        self._reset_all()  # keys/values computed at another precision would not match a fresh run

    @property
    def precision(self) -> int | None:
        k = self._h.precision
        return k or None

    def _set(self, name: str, arr: np.ndarray, dtype: str) -> None:
        rows, cols = self._h.expected_shape(name)
        if dtype not in N.DTYPES:
            raise N.NativeError(f"tensor '{name}': dtype {dtype!r} is not supported by the C engine "
                                f"(expected one of {sorted(N.DTYPES)})", N.ERR_ARG)
        arr = np.asarray(arr)
        if dtype == "q8_0":
            need = rows * N.row_bytes(N.Q8_0, cols)
            if arr.dtype != np.uint8 or arr.nbytes != need:
                raise N.NativeError(f"tensor '{name}': q8_0 data must be {need} raw bytes (uint8) for [{rows}, {cols}],"
                                    f" got {arr.dtype} with {arr.nbytes} bytes", N.ERR_ARG)
        else:
            want = np.float32 if dtype == "f32" else np.float16
            if arr.dtype != want:
                raise N.NativeError(f"tensor '{name}': declared {dtype} but the array is {arr.dtype}", N.ERR_ARG)
            if arr.size != rows * cols:
                raise N.NativeError(f"tensor '{name}': shape {arr.shape}, expected [{rows}, {cols}]", N.ERR_ARG)
            if arr.ndim == 1 and dtype == "f16":  # norms and biases: the core reads them as f32
                arr, dtype = arr.astype(np.float32), "f32"
        if not arr.flags.c_contiguous or arr.ctypes.data % arr.itemsize:
            arr = np.ascontiguousarray(arr).copy()
        self._arrays.append(arr)
        self._h.set_tensor(name, N.DTYPES[dtype], arr, rows, cols)

    # ---- the verbs (seq: which of the n_seq sequences; 0 = the default one) ---------------------------------------
    def logits(self, ids) -> np.ndarray:
        """float32 [len(ids), vocab] for a fresh sequence (all positions)."""
        tok = _tokens(ids)
        out = np.empty((tok.size, self.spec.vocab), dtype=np.float32)
        self.reset()
        self._forward(tok, out, True)
        return out

    def prefill(self, ids, seq: int = 0) -> np.ndarray:
        """Start a fresh sequence with `ids`; returns the last position's logits [vocab]."""
        self.reset(seq)
        return self.extend(ids, seq)

    def extend(self, ids, seq: int = 0) -> np.ndarray:
        """Append `ids` to the sequence; returns the last position's logits [vocab]."""
        tok = _tokens(ids)
        out = np.empty(self.spec.vocab, dtype=np.float32)
        self._forward(tok, out, False, seq)
        return out

    def _forward(self, tok: np.ndarray, out: np.ndarray, all_logits: bool, seq: int = 0) -> None:
        self._check_seq(seq)
        try:
            self._h.forward_seq(seq, tok, out, all_logits)
        finally:  # on an error the core keeps the blocks it completed: n_past says how many
            ids = self._seq_ids[seq]  # in place: a decode step must not copy the whole history
            ids.extend(tok.tolist())
            del ids[self._h.seq_n_past(seq):]

    def decode(self, token: int, seq: int = 0) -> np.ndarray:
        """Append one token; returns its logits [vocab]."""
        return self.extend([token], seq)

    def decode_batch(self, tokens, seqs) -> np.ndarray:
        """Append tokens[i] to sequence seqs[i] (distinct sequences), all as one block: each expert the tokens route
        to is loaded and run once for all of them. Returns float32 logits [len(tokens), vocab], row i bit-identical
        to decode(tokens[i], seqs[i]). On an error no sequence advances."""
        tok, sq = _tokens(tokens), np.ascontiguousarray(np.asarray(seqs, dtype=np.int32).reshape(-1))
        out = np.empty((tok.size, self.spec.vocab), dtype=np.float32)
        self._h.forward_batch(tok, sq, out)
        for t, s in zip(tok.tolist(), sq.tolist()):
            self._seq_ids[s].append(t)
        return out

    def reset(self, seq: int = 0) -> None:
        """Clear the sequence's KV cache."""
        self._check_seq(seq)
        self._h.reset_seq(seq)
        self._seq_ids[seq] = []

    def truncate(self, n_keep: int, seq: int = 0) -> None:
        """Keep the first n_keep positions of the sequence's KV cache (0 <= n_keep <= n_past); extend() continues
        there."""
        self._check_seq(seq)
        self._h.truncate_seq(seq, n_keep)
        del self._seq_ids[seq][n_keep:]

    @property
    def cached_ids(self) -> list[int]:
        """The token ids whose keys and values sequence 0's KV cache holds, in order (a copy)."""
        return list(self._seq_ids[0])

    def seq_cached_ids(self, seq: int) -> list[int]:
        """cached_ids of sequence seq."""
        self._check_seq(seq)
        return list(self._seq_ids[seq])

    @property
    def n_past(self) -> int:
        return self._h.n_past

    def seq_n_past(self, seq: int) -> int:
        return self._h.seq_n_past(seq)

    def set_n_seq(self, n_seq: int) -> None:
        """Hold n_seq sequences (the KV cache is reallocated and every sequence emptied). Under a memory budget at most
        the n_seq it was opened with (the KV cache the budget counted); beyond: BudgetError."""
        self._h.set_n_seq(n_seq)
        self._seq_ids = [[] for _ in range(self._h.n_seq)]

    @property
    def n_seq(self) -> int:
        return self._h.n_seq

    def _reset_all(self) -> None:
        for seq in range(len(self._seq_ids)):
            self.reset(seq)

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < len(self._seq_ids):  # the core checks too; this keeps _seq_ids from being indexed wrongly
            raise N.NativeError(f"sequence {seq} is outside 0..{len(self._seq_ids) - 1} (the engine holds "
                                f"{len(self._seq_ids)}; set_n_seq changes that)", N.ERR_ARG)

    def set_isa(self, isa: int | str) -> None:
        """Force the kernels: an N.ISA_* value or a name ("scalar", "avx2", "neon", "neon_dotprod", "auto")."""
        if isinstance(isa, str):
            names = {N.isa_name(i): i for i in range(N.ISA_COUNT)} | {"auto": N.ISA_AUTO}
            if isa not in names:
                raise N.NativeError(f"unknown instruction set {isa!r}; expected one of {sorted(names)}", N.ERR_ISA)
            isa = names[isa]
        self._h.set_isa(int(isa))
        self._reset_all()  # other kernels round differently: a kept prefix would not match a fresh run

    @property
    def isa(self) -> str:
        return N.isa_name(self._h.isa)

    # ---- a hard memory budget ------------------------------------------------------------------------------------
    @classmethod
    def open_streaming(cls, path, spec: ArchSpec, memory_budget: int | None, mode: str = "exact", threads: int = 1,
                       max_ctx: int = 4096, kv_f16: bool = False, precision: int | None = None, prefetch: int = 1,
                       prefetch_extra: int = 1, io_threads: int = 2, direct: bool = True, drop_cache: bool = True,
                       verify: str = "first", isa: int | str | None = None, q8_f32_act: bool = False,
                       n_seq: int = 1, evict: str = "auto", prefetch_min_confidence: float | None = None) -> CEngine:
        """The model under a memory budget (bytes; None = no limit, every expert cached after its first use): the C
        core opens the container itself, reads the dense weights into anonymous memory and streams the experts through
        its byte-budgeted cache (native/src/stream_load.c, stream_forward.c). Raises N.BudgetError, stating the
        minimum, below it.

        mode: "exact" (output identical to the all-resident model), "adaptive" (MWQ: compute an expert at its resident
        planes rather than wait for a refinement plane), "ondemand" (baseline: LRU, no prefetch, no overlap).
        prefetch: 0 none, 1 before each layer's attention, 2 also the next layer. direct (default): O_DIRECT reads
        where the file system allows them; drop_cache (default): buffered reads (direct=False, or the file system
        refused O_DIRECT) drop their pages after use; stats() says which ran (direct, drop_cache, read_note).
        verify: CRC-32 of expert reads
        ("first" read of each piece, "always", "never"). n_seq: sequences whose KV cache the budget holds (the most
        set_n_seq / decode_batch can use). evict ("auto", "lru", "cyclic", "freq") and prefetch_min_confidence
        (0..1, default 0.5) override the cache policy, for experiments. The plan the budget was checked against
        (emoe_stream_plan: minimum_bytes and its parts) is `engine.plan`."""
        opts = N.stream_options(memory_budget, mode, prefetch, prefetch_extra, precision, io_threads, direct,
                                drop_cache, verify, n_seq, evict, prefetch_min_confidence)
        h, plan = N.open_streaming(path, int(max_ctx), kv_f16, max(1, int(threads)), opts)
        self = cls._over_handle(h, spec, max_ctx, isa, q8_f32_act)
        self.plan = plan
        return self

    @staticmethod
    def stream_plan(path, max_ctx: int = 4096, kv_f16: bool = False, threads: int = 1, **stream_options) -> dict:
        """The memory a model under a budget holds, as numbers, without loading it (emoe_container_stream_load with
        no model): minimum_bytes, dense_bytes, kv_bytes, scratch_bytes, min_cache_bytes, full_cache_bytes,
        expert_bytes. stream_options: as open_streaming's (memory_budget as budget_bytes: BudgetError below the
        minimum)."""
        opts = N.stream_options(**stream_options)
        return N.open_streaming(path, int(max_ctx), kv_f16, max(1, int(threads)), opts, plan_only=True)[1]

    @classmethod
    def from_container(cls, path, spec: ArchSpec, threads: int = 1, max_ctx: int = 4096, kv_f16: bool = False,
                       precision: int | None = None, verify: bool = True, planes=None,
                       mwq_planes: dict[str, int] | None = None, isa: int | str | None = None,
                       q8_f32_act: bool = False) -> CEngine:
        """The whole model resident: the C core opens the container and registers every tensor the model reads
        (f32/f16/q8_0 and MWQ planes) from its mapping; nothing is copied but 1-D f16 tensors. verify: every
        checksum is checked at open. Without it, pass planes (a (name, k) reader that checks each plane's checksum
        on first read, Container.planes) and mwq_planes (MWQ tensor -> planes stored): the planes a precision uses
        are then checked before the C core reads them."""
        h = N.open_resident(path, int(max_ctx), kv_f16, max(1, int(threads)), verify)
        self = cls._over_handle(h, spec, max_ctx, isa, q8_f32_act)
        self._plane_reader, self._mwq = planes, dict(mwq_planes or {})
        self.set_precision(precision)
        return self

    @classmethod
    def _over_handle(cls, h: N.ModelHandle, spec: ArchSpec, max_ctx: int, isa, q8_f32_act: bool) -> CEngine:
        self = cls.__new__(cls)
        self.spec, self.max_ctx, self._h, self.plan = spec, int(max_ctx), h, None
        self._arrays, self._plane_reader, self._quant, self._mwq, self._checked = [], None, {}, {}, {}
        self._seq_ids = [[] for _ in range(h.n_seq)]
        try:
            if isa is not None:
                self.set_isa(isa)
            h.set_q8_f32_act(q8_f32_act)
        except BaseException:
            h.close()
            raise
        return self

    @property
    def streaming(self) -> bool:
        return self._h.stats()["mode"] >= 0

    def stats(self) -> dict:
        """The C core's statistics (emoe_stats): budget parts, cache hits/misses per plane level, bytes read, stall
        time, prefetch counts. mode = -1 for an engine without a budget."""
        return self._h.stats()

    def reset_stats(self) -> None:
        self._h.reset_stats()

    def drop_cache(self) -> None:
        """Empty the expert cache (a cold start for measurements)."""
        self._h.drop_cache()

    def close(self) -> None:
        self._h.close()
        self._arrays.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tokens(ids) -> np.ndarray:
    tok = np.asarray(ids, dtype=np.int64).reshape(-1)
    if tok.size and (tok.min() < 0 or tok.max() > np.iinfo(np.int32).max):
        bad = tok[(tok < 0) | (tok > np.iinfo(np.int32).max)][0]
        raise N.NativeError(f"token id {bad} is outside the vocabulary", N.ERR_ARG)
    return np.ascontiguousarray(tok.astype(np.int32))


def _dtype_of(arr) -> str:
    if isinstance(arr, (list, tuple)):
        return "mwq"
    return {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint8): "q8_0"}.get(arr.dtype, "?")
