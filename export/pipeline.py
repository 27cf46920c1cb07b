"""`edgemoe export`: one pipeline for every checkpoint, streamed layer by layer.

    read -> calibrate -> [merge] -> quantize -> [predictor] -> write

Each stage is a function from plain data to plain data, and every option combination runs through the same ones:
- read (`sources.open_source`): a Hugging Face directory or a GGUF file, both as the Checkpoint interface;
- `make_plan`: the options checked and resolved once (storage of every part, which calibration text, merge counts);
- `calibration_ids`: the calibration text tokenized (the checkpoint's calib.txt, else the shipped multi-domain
  default `assets/calib/calib-default.txt`; `--calib none` skips calibration: weight-only fitting);
- `expert_layers`: per MoE layer, `calibrate.calibrate` (the reference forward pass, one layer at a time, with the
  Gram blocks of each expert's routed inputs), then `merge_stage.merge_stage` when merging, then
  `predictor.fit_layer` (the pre-attention predictor, fitted on the same pass) -> an `ExpertLayer`;
- `quantize_layer`: an ExpertLayer's stored experts encoded (f32 / f16, or MWQ planes fitted on their Grams);
- `write_container`: the dense part first (the one dense encoder, `encode_dense`), then each layer's experts and
  its predictor as they arrive. Only one layer's weights are in memory at a time.

Predictor default: fitted whenever calibration runs (MWQ `--bits 2..8`, merging) and the router reads the
post-attention state (not SmallThinker, whose router already reads the layer input); `--no-predictor` skips it,
`--predictor` fits it also for a float export (which then runs the calibration pass for it).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.arch import EXPERT_MATRICES, expert_tensor_name
from edgemoe.container import ContainerWriter
from edgemoe.errors import EdgeMoEError
from edgemoe.quant import Q8_0_BLOCK, quantize_q8_0

from .merge import DEFAULT_METHOD as DEFAULT_MERGE_METHOD
from .merge_stage import ExpertLayer, merge_stage
from .mwq import NESTINGS, check_bits, choose_group_size, quantize_matrix
from .progress import progress
from .sources import open_source
from .summary import ExportRecorder, stage

FLOAT_BITS = (32, 16)
MWQ_BITS = tuple(range(8, 1, -1))  # 8..2: total bits of the nested planes
SUPPORTED_BITS = FLOAT_BITS + MWQ_BITS
DEFAULT_CALIB_TOKENS = 16384
CALIB_SEQ_LEN = 256
CALIB_FILE = "calib.txt"  # a checkpoint directory may ship its own calibration text under this name
CALIB_NONE = "none"  # --calib none: no calibration (weight-only MWQ fitting, no predictor, no merging)
DEFAULT_CALIB = Path(__file__).parent / "assets" / "calib" / "calib-default.txt"
MERGE_METHODS = ("mcsmoe", "average", "prune", "reap")
MERGE_EXPERIMENTAL = ("regmean",)  # studied in bench/merge_study.py, not offered on the command line


def min_calib_tokens(group_size: int) -> int:
    """Below this many routed calibration tokens an expert's planes are fitted to the weight-only error.

    A Gram block of `group_size` channels built from n tokens has rank <= n: with n < group_size the weighted fit
    is blind in group_size - n directions, and near n = group_size the sample covariance is still mostly noise (the
    weighted fit then chases that noise). Twice the group size gives a full-rank, roughly conditioned estimate.
    """
    return 2 * group_size


@dataclass
class MergePlan:
    method: str = DEFAULT_MERGE_METHOD
    merge_ratio: float | None = None
    experts_per_layer: int | None = None
    low_rank: int | None = None
    counts: list[int] | None = None  # stored experts per layer, decided before the first layer is merged


@dataclass
class Plan:
    bits: int
    dense_bits: int
    base_bits: int | None = None
    group_size: int | None = None
    nesting: str | None = None
    calib: Path | None = None  # the text calibration runs on; None: no calibration pass
    calib_source: str = CALIB_NONE  # "checkpoint" (its calib.txt) | "default" (shipped) | "file" (--calib) | "none"
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    seq_len: int = CALIB_SEQ_LEN
    merge: MergePlan | None = None
    predictor: bool = False
    dense_f16_fallback: list[str] = field(default_factory=list)  # matrices Q8_0 cannot store (in % 32 != 0)
    calib_tokens_used: int = 0

    @property
    def mwq(self) -> bool:
        return self.bits in MWQ_BITS

    @property
    def weighted(self) -> bool:
        """MWQ planes fitted to calibration inputs (else to the weight-only error)."""
        return self.mwq and self.nesting == "mwq" and self.calib is not None


# --- plan ----------------------------------------------------------------------------------------------------------
def check_options(bits, dense_bits, base_bits, nesting, calib_tokens, merge: MergePlan | None,
                  seq_len: int = CALIB_SEQ_LEN) -> None:
    if bits not in SUPPORTED_BITS:
        raise EdgeMoEError(f"--bits {bits} is not available; supported: 32, 16 (floats) or 8..2 (MWQ bit planes)")
    if dense_bits not in (None, 32, 16, 8):
        raise EdgeMoEError(f"--dense-bits {dense_bits}: expected 8, 16 or 32")
    if bits in MWQ_BITS:
        check_bits(base_bits, bits)
        if nesting not in NESTINGS:
            raise EdgeMoEError(f"--nesting {nesting!r}: expected one of {', '.join(NESTINGS)}")
    if calib_tokens < seq_len:
        raise EdgeMoEError(f"--calib-tokens {calib_tokens}: need at least {seq_len} (one calibration sequence)")
    if merge is None:
        return
    if merge.method not in MERGE_METHODS + MERGE_EXPERIMENTAL:
        raise EdgeMoEError(f"--merge-method {merge.method!r}: expected one of {', '.join(MERGE_METHODS)}")
    if (merge.merge_ratio is None) == (merge.experts_per_layer is None):
        raise EdgeMoEError("give exactly one of --merge-ratio and --experts-per-layer")
    if merge.merge_ratio is not None and not 0.0 < merge.merge_ratio <= 1.0:
        raise EdgeMoEError(f"--merge-ratio {merge.merge_ratio}: expected a fraction in (0, 1]")
    if merge.experts_per_layer is not None and merge.experts_per_layer < 1:
        raise EdgeMoEError(f"--experts-per-layer {merge.experts_per_layer}: expected at least 1")
    if merge.low_rank is not None and merge.low_rank < 1:
        raise EdgeMoEError(f"--low-rank {merge.low_rank}: expected a rank >= 1")


def resolve_calib(src: Path, calib: str | Path | None) -> tuple[Path | None, str]:
    """--calib FILE | none | (not given: the checkpoint's calib.txt, else the shipped default) -> (path, source)."""
    if calib is not None and str(calib) == CALIB_NONE:
        return None, CALIB_NONE
    if calib is not None:
        p = Path(calib)
        if not p.is_file():
            raise EdgeMoEError(f"--calib {calib}: no such file; give a UTF-8 text like the model's training data, "
                               f"or --calib none for weight-only fitting")
        return p, "file"
    own = (src if src.is_dir() else src.parent) / CALIB_FILE
    if own.is_file():
        return own, "checkpoint"
    if not DEFAULT_CALIB.is_file():
        raise EdgeMoEError(f"{DEFAULT_CALIB}: the exporter's default calibration text is missing (a broken "
                           f"install); pass --calib FILE or --calib none")
    return DEFAULT_CALIB, "default"


def make_plan(ckpt, src: Path, bits: int, dense_bits: int | None = None, base_bits: int = 2,
              group_size: int | None = None, nesting: str = "mwq", calib: str | Path | None = None,
              calib_tokens: int = DEFAULT_CALIB_TOKENS, merge: MergePlan | None = None,
              predictor: bool | None = None, seq_len: int = CALIB_SEQ_LEN) -> Plan:
    """Decide every part's storage and which stages run. predictor None = fitted when calibration runs anyway."""
    spec = ckpt.spec
    plan = Plan(bits, dense_bits or (bits if bits in FLOAT_BITS else 8), calib_tokens=calib_tokens,
                seq_len=min(seq_len, spec.max_position), merge=merge)
    if plan.mwq:
        plan.base_bits, plan.nesting = base_bits, nesting
        plan.group_size = choose_group_size([spec.hidden, spec.expert_ffn], group_size)
    calib_path, source = resolve_calib(src, calib)
    has_moe = any(spec.is_moe_layer(i) for i in range(spec.n_layers))
    can_predict = has_moe and spec.router_input != "layer_input"
    if predictor and not can_predict:
        raise EdgeMoEError(f"--predictor: {spec.family}'s router already reads the layer input before attention; the "
                           "engine prefetches with it directly and needs no fitted predictor")
    wanted = {"--merge-ratio/--experts-per-layer (routing statistics)": merge is not None,
              "--predictor": bool(predictor)}
    if calib_path is None:
        needing = [k for k, v in wanted.items() if v]
        if needing:
            raise EdgeMoEError(f"--calib none: {needing[0]} needs calibration text; drop --calib none or pass "
                               f"--calib FILE")
        return plan
    runs = (plan.mwq and nesting == "mwq") or merge is not None or bool(predictor)
    if not runs:
        return plan  # float export, msb nesting: nothing uses calibration
    if ckpt.tokenizer_json is None:
        raise EdgeMoEError(f"{src}: no tokenizer.json (or GGUF tokenizer), which calibration on text needs; pass "
                           f"--calib none for weight-only fitting")
    plan.calib, plan.calib_source = calib_path, source
    plan.predictor = can_predict if predictor is None else predictor
    return plan


# --- calibrate -> [merge] -> [predictor]: one ExpertLayer per MoE layer ----------------------------------------------
def calibration_ids(ckpt, plan: Plan) -> list[np.ndarray] | None:
    from .calibrate import load_calibration_ids

    if plan.calib is None:
        return None
    seqs = load_calibration_ids(ckpt.tokenizer_json, plan.calib, plan.calib_tokens, plan.seq_len, ckpt.spec.vocab)
    plan.calib_tokens_used = int(sum(len(s) for s in seqs))
    return seqs


def merge_counts(ckpt, plan: Plan, seqs, show_progress: bool) -> list[int] | None:
    """Stored experts per layer. The adaptive rule (--merge-ratio) needs every layer's selection frequencies before
    the first layer is merged, while calibration yields one layer at a time: a cheap routing-only first pass
    (no Gram blocks; it keeps E counts per layer) gets them, so no layer's weights are buffered."""
    from .calibrate import calibrate
    from .merge import group_counts

    m, spec = plan.merge, ckpt.spec
    if m is None:
        return None
    min_groups = spec.top_k if m.method in ("prune", "reap") else 1
    if m.experts_per_layer is not None:
        sizes = [np.zeros(spec.n_experts) if spec.is_moe_layer(i) else None for i in range(spec.n_layers)]
        return group_counts(sizes, experts_per_layer=m.experts_per_layer, min_groups=min_groups)
    freqs = [None if cal.freq is None else cal.freq.copy()
             for cal in calibrate(ckpt, seqs, collect_grams=False, show_progress=show_progress)]
    return group_counts(freqs, merge_ratio=m.merge_ratio, min_groups=min_groups)


def expert_layers(ckpt, plan: Plan, seqs, rec: ExportRecorder, show_progress: bool) -> Iterator[ExpertLayer]:
    """Yield each MoE layer's stored experts with what the later stages need (Grams, routed tokens, predictor)."""
    spec = ckpt.spec
    from .calibrate import calibrate, layer_experts

    if seqs is None:  # no calibration: the experts as read
        for layer in range(spec.n_layers):
            if spec.is_moe_layer(layer):
                yield ExpertLayer(layer, layer_experts(ckpt, layer))
        return
    from .predictor import fit_layer

    collect = plan.weighted or (plan.merge is not None and plan.merge.method == "regmean")
    overlap = FitOverlap(plan)
    overlap.start()
    try:
        stream = calibrate(ckpt, seqs, group_size=plan.group_size or 128, collect_grams=collect,
                           show_progress=show_progress,
                           collect_saliency=plan.merge is not None and plan.merge.method == "reap",
                           on_expert_done=overlap.submit if overlap.active else None)
        for cal in rec.clock.iterate(stream, "calibrate"):
            if cal.freq is None:
                continue
            if plan.merge is not None:
                with rec.clock.stage("merge"):
                    m = plan.merge
                    el = merge_stage(cal, spec, plan.merge.counts[cal.layer], m.method, m.low_rank)
            else:
                el = ExpertLayer(cal.layer, cal.experts, None, cal.gram_in, cal.gram_mid, cal.expert_tokens,
                                 pending=overlap.take())
            rec.note_routing(cal.layer, el.tokens, plan.calib_tokens_used)
            if plan.predictor:
                with rec.clock.stage("predictor"):
                    el.predictor, el.predictor_report = fit_layer(cal, spec)
            # the stream (and this loop) keep `cal` alive while the next layer is calibrated: drop its big parts
            cal.experts, cal.gram_in, cal.gram_mid, cal.hidden_out = {}, {}, {}, None
            cal.pre_attn_input = cal.router_logits = None
            yield el
    finally:
        overlap.close()


class FitOverlap:
    """Fit each expert's MWQ planes while the rest of its layer is still being calibrated (the default export:
    calibration-weighted MWQ, no merge).

    Calibration's products are many medium-sized BLAS calls and NumPy passes; on the shared 2-core machine a
    2-thread BLAS spent half its CPU time spinning (one layer: 47.5 CPU s on 2 threads vs 27.8 on one, and 1.5x the
    wall time). So calibration runs on one BLAS thread, and the other core fits the experts whose forward pass is
    done (`calibrate`'s on_expert_done), one matrix per C call on one thread, two workers (the C fit releases the
    GIL). An expert's planes depend only on its weights and Gram blocks, so they are the same as fitted afterwards.
    Memory: a layer's encoded planes (~0.23 GB at OLMoE's shape at 4 bits) wait for the writer; each fitted expert's
    weights are dropped (the calibration pass reads the layer's weights through a view of the same dict).
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.active = plan.weighted and plan.merge is None
        self.pool = None
        self.jobs: dict[int, object] = {}
        self.limit = None

    def start(self) -> None:
        if self.active:
            from concurrent.futures import ThreadPoolExecutor

            from .blas import one_blas_thread
            from .mwq_native import default_threads

            self.pool = ThreadPoolExecutor(default_threads(), thread_name_prefix="mwq-overlap")
            self.limit = one_blas_thread()
            self.limit.__enter__()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)  # an interrupted export waits for <= 2 matrices
        if self.limit is not None:
            self.limit.__exit__(None, None, None)

    def submit(self, cal, e: int) -> None:
        self.jobs[e] = self.pool.submit(self._fit, cal.experts, cal.layer, e, cal.gram_in.get(e), cal.gram_mid.get(e),
                                        int(cal.expert_tokens[e]))

    def _fit(self, experts: dict, layer: int, e: int, gram_in, gram_mid, tokens: int) -> list[Encoded]:
        out = encode_expert(experts, layer, e, gram_in, gram_mid, tokens, self.plan, 1)
        for m in EXPERT_MATRICES:  # fitted: its f16 weights (12 MB at OLMoE's shape) are not needed any more
            experts.pop(expert_tensor_name(layer, e, m), None)
        return out

    def take(self) -> dict | None:
        jobs, self.jobs = self.jobs, {}
        return jobs if self.active else None


# --- quantize ------------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One stored expert matrix: `planes` (MWQ) or `data` with `dtype`."""
    name: str
    shape: tuple[int, int]
    data: np.ndarray | None = None
    dtype: str | None = None
    planes: list[np.ndarray] | None = None
    quant: dict | None = None


def quantize_layer(el: ExpertLayer, plan: Plan) -> Iterator[Encoded]:
    """Encode every stored expert matrix of a layer, one at a time (the caller writes each as it comes): floats, or
    MWQ planes fitted on the matrix's Gram blocks when the expert (group) saw at least `min_calib_tokens` routed
    calibration tokens (else the weight-only error)."""
    if not plan.mwq:
        np_dtype, dtype = (np.float32, "f32") if plan.bits == 32 else (np.float16, "f16")
        for g in range(el.n_stored):
            for m in EXPERT_MATRICES:
                name = expert_tensor_name(el.layer, g, m)
                arr = el.experts[name]
                yield Encoded(name, arr.shape, arr.astype(np_dtype), dtype)
        return
    for g in range(el.n_stored):
        if el.pending and g in el.pending:  # fitted while the layer was calibrated (FitOverlap)
            yield from el.pending.pop(g).result()
            continue
        tokens = int(el.tokens[g]) if el.tokens is not None else None
        yield from encode_expert(el.experts, el.layer, g, el.gram_in.get(g), el.gram_mid.get(g), tokens, plan)


def encode_expert(experts: dict, layer: int, g: int, gram_in, gram_mid, tokens: int | None, plan: Plan,
                  threads: int | None = None) -> list[Encoded]:
    """Stored expert g's three matrices as MWQ planes: fitted on its Gram blocks when it saw at least
    `min_calib_tokens` routed calibration tokens, else to the weight-only error."""
    weighted = plan.weighted and tokens is not None and tokens >= min_calib_tokens(plan.group_size)
    out = []
    for m in EXPERT_MATRICES:
        name = expert_tensor_name(layer, g, m)
        gram = (gram_mid if m == "down" else gram_in) if weighted else None
        qm = quantize_matrix(experts[name], gram, plan.base_bits, plan.bits, plan.group_size, plan.nesting,
                             threads=threads)
        out.append(Encoded(name, qm.shape, planes=qm.planes, quant=qm.quant_params()))
    return out


# --- write ---------------------------------------------------------------------------------------------------------
def encode_dense(name: str, arr: np.ndarray, plan: Plan) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """Storage for one dense tensor: 1-D tensors (norms, biases) and every bias stay f32; matrices follow
    --dense-bits."""
    width = plan.dense_bits
    if arr.ndim == 1 or name.endswith(".bias") or width == 32:
        return arr.astype(np.float32), "f32", arr.shape
    if width == 8:
        if arr.shape[-1] % Q8_0_BLOCK == 0:
            return _q8_0_by_rows(arr), "q8_0", arr.shape
        plan.dense_f16_fallback.append(name)
    return arr.astype(np.float16), "f16", arr.shape


Q8_0_CHUNK = 1 << 22  # weights quantized at once: quantize_q8_0's float32 temporaries stay ~100 MB


def _q8_0_by_rows(arr: np.ndarray) -> np.ndarray:
    """quantize_q8_0 over blocks of rows (blocks of 32 are independent, so the bytes are the same): on the whole
    50304 x 2048 embedding its temporaries peaked at 2.2 GB."""
    rows = arr.reshape(-1, arr.shape[-1])
    step = max(1, Q8_0_CHUNK // rows.shape[1])
    return np.concatenate([quantize_q8_0(rows[i : i + step]) for i in range(0, rows.shape[0], step)])


def write_dense(w: ContainerWriter, ckpt, plan: Plan, show_progress: bool) -> None:
    if ckpt.tokenizer_json is not None:
        w.add_tensor("tokenizer.json", np.frombuffer(ckpt.tokenizer_json, np.uint8), "bytes", kind="blob")
    for name, arr in ckpt.global_tensor_items():  # one at a time: embedding and lm_head are 0.4 GB each in f32
        with stage(w, "quantize"):  # the writes inside are charged to "write"
            w.add_tensor(name, *encode_dense(name, arr, plan))
        del arr
    for layer in progress(range(ckpt.spec.n_layers), "dense layers (read, quantize, write)", show_progress):
        for name, arr in ckpt.layer_dense(layer).items():
            with stage(w, "quantize"):
                w.add_tensor(name, *encode_dense(name, arr, plan))


def write_encoded(w: ContainerWriter, encoded: Iterable[Encoded]) -> None:
    for t in encoded:
        if t.planes is not None:
            w.add_planes(t.name, t.planes, t.shape, kind="expert", quant=t.quant)
        else:
            w.add_tensor(t.name, t.data, t.dtype, kind="expert")


LayerEncoder = Callable[[ContainerWriter, ExpertLayer], None]  # writes one layer's stored experts (bench hook)


def write_container(ckpt, out: Path, layers: Iterable[ExpertLayer], metadata: dict, plan: Plan,
                    rec: ExportRecorder | None = None, show_progress: bool = False,
                    encode_layer: LayerEncoder | None = None) -> dict:
    """Dense part first (one layer at a time from the checkpoint), then each layer's stored experts and its
    predictor (`blk.L.ffn_gate_inp_pre.weight`, f32 [E, H]) as `layers` yields them. A merged layer's e -> g map is
    recorded in the written ArchSpec. Returns what the layers reported (for the metadata)."""
    spec = ckpt.spec
    out_spec = copy.deepcopy(spec)
    merged = plan.merge is not None
    if merged:
        out_spec.expert_map = [[] for _ in range(spec.n_layers)]
    rec = rec or ExportRecorder(ckpt)
    min_tokens = min_calib_tokens(plan.group_size) if plan.weighted else 0
    report = {"weight_only": [], "tokens": {}, "predictor": [], "fit_s": 0.0}
    n_moe = sum(1 for i in range(spec.n_layers) if spec.is_moe_layer(i))
    with rec.writer(out, out_spec, metadata) as w:
        write_dense(w, ckpt, plan, show_progress)
        for el in progress(layers, f"expert layers of {n_moe} ({stages_of(plan)})", show_progress):
            if merged:
                out_spec.expert_map[el.layer] = el.expert_map
            t0 = time.perf_counter()
            if encode_layer is not None:
                encode_layer(w, el)
            else:
                write_encoded(w, rec.clock.iterate(quantize_layer(el, plan), "quantize"))
            dt = time.perf_counter() - t0
            report["fit_s"] += dt
            if plan.weighted:
                for g in range(el.n_stored):
                    prefix, seen = f"blk.{el.layer}.expert.{g}", int(el.tokens[g]) if el.tokens is not None else 0
                    report["tokens"][prefix] = seen
                    if seen < min_tokens:
                        report["weight_only"].append(prefix)
            if el.predictor is not None:
                from .predictor import predictor_name

                w.add_tensor(predictor_name(el.layer), np.ascontiguousarray(el.predictor, np.float32), "f32")
                report["predictor"].append(el.predictor_report)
            if show_progress:
                print(f"  layer {el.layer}: {el.n_stored} experts encoded in {dt:.1f} s", file=sys.stderr)
            el.experts.clear()  # `el` stays referenced while the next layer is calibrated
            el.gram_in, el.gram_mid = {}, {}
        missing = [i for i in range(spec.n_layers) if merged and spec.is_moe_layer(i) and not out_spec.expert_map[i]]
        if missing:  # raised inside the writer: the partial file is removed
            raise EdgeMoEError(f"{out}: no experts were written for layers {missing}")
        w.metadata.update(_report_metadata(plan, report))
        if plan.dense_f16_fallback:
            w.metadata["dense_f16_fallback"] = plan.dense_f16_fallback
        summary = rec.summary(w)
        summary["calibration"] = calibration_summary(plan)
        w.metadata["export_summary"] = summary
    return report


def stages_of(plan: Plan) -> str:
    names = ["read"] + (["calibrate"] if plan.calib else []) + (["merge"] if plan.merge else [])
    names += ["quantize"] + (["predictor"] if plan.predictor else []) + ["write"]
    return ", ".join(names)


def calibration_summary(plan: Plan) -> dict:
    """What calibration ran on, for the summary table and `edgemoe info`."""
    if plan.calib is None:
        why = "weight-only MWQ fitting" if plan.mwq and plan.nesting == "mwq" else "not needed"
        return {"source": CALIB_NONE, "text": None, "tokens": 0, "note": why}
    return {"source": plan.calib_source, "text": plan.calib.name, "tokens": plan.calib_tokens_used,
            "note": {"checkpoint": "the checkpoint's calib.txt", "default": "the exporter's shipped multi-domain text",
                     "file": "--calib"}[plan.calib_source]}


def _report_metadata(plan: Plan, report: dict) -> dict:
    meta: dict = {"calib_source": plan.calib.name if plan.calib else CALIB_NONE,
                  "calibration": calibration_summary(plan)}
    if plan.mwq and plan.nesting == "mwq":
        meta["mwq_fit"] = "calibration-weighted" if plan.weighted else "weight-only (no calibration)"
    if plan.weighted:
        meta.update(calib_tokens=plan.calib_tokens_used, mwq_min_tokens=min_calib_tokens(plan.group_size),
                    mwq_weight_only_experts=report["weight_only"], expert_calib_tokens=report["tokens"])
    if report["predictor"]:
        from .predictor import PREDICTOR_KIND, PREDICTOR_NAME

        meta["predictor"] = {"kind": PREDICTOR_KIND, "tensor": PREDICTOR_NAME,
                             "layers": [r["layer"] for r in report["predictor"]], "report": report["predictor"]}
    return meta


# --- the export ----------------------------------------------------------------------------------------------------
def export(src: str | Path, out: str | Path, bits: int = 32, dense_bits: int | None = None,
           show_progress: bool = True, base_bits: int = 2, group_size: int | None = None, nesting: str = "mwq",
           calib: str | Path | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS,
           merge_ratio: float | None = None, experts_per_layer: int | None = None, merge_method: str | None = None,
           low_rank: int | None = None, predictor: bool | None = None, seq_len: int = CALIB_SEQ_LEN) -> Path:
    """Convert a MoE checkpoint (Hugging Face directory or .gguf) into an .emoe container.

    bits: 32 / 16 store the experts as floats; 8..2 store them as MWQ bit planes (a `base_bits` base plane plus
    bits - base_bits binary residual planes). calib: FILE, "none" (weight-only fitting), or None = `src`/calib.txt
    when it exists, else the shipped default text. merge_ratio / experts_per_layer: merge the experts
    (`merge_method` reap | mcsmoe | average | prune; None = `merge.DEFAULT_METHOD`, reap) before quantizing. predictor: None = fitted when calibration runs.
    dense_bits: storage of the dense matrices (default: = bits for float exports, 8 = Q8_0 for MWQ experts).
    group_size: None = 128, or the largest power of two below it that divides the expert input dimensions.
    """
    merge = None
    if merge_ratio is not None or experts_per_layer is not None:
        merge = MergePlan(merge_method or DEFAULT_MERGE_METHOD, merge_ratio, experts_per_layer, low_rank)
    elif low_rank is not None:
        raise EdgeMoEError("--low-rank approximates merged experts: give --merge-ratio or --experts-per-layer too")
    check_options(bits, dense_bits, base_bits, nesting, calib_tokens, merge, seq_len)
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise EdgeMoEError(f"{out}: is a directory; give the output file name, e.g. {out / 'model.emoe'}")
    if not out.parent.exists():
        raise EdgeMoEError(f"{out.parent}: output directory does not exist")
    ckpt = open_source(src)
    if merge is not None and ckpt.spec.n_group > 1:  # the arch reader refuses an expert_map with groups: say so now
        raise EdgeMoEError(f"{src}: merging experts of a model with group-limited routing (n_group = "
                           f"{ckpt.spec.n_group}) is not supported: merged groups would change which experts each "
                           "routing group holds")
    if merge is not None and ckpt.spec.expert_bias:  # the bias rows are per stored expert: they would need merging too
        raise EdgeMoEError(f"{src}: merging experts that carry biases ({ckpt.spec.family}: expert_bias) is not "
                           "supported yet; export without --merge-ratio / --experts-per-layer")
    plan = make_plan(ckpt, src, bits, dense_bits, base_bits, group_size, nesting, calib, calib_tokens, merge,
                     predictor, seq_len)
    rec = ExportRecorder(ckpt)  # stage times and part sizes: metadata["export_summary"]
    source = rec.source(ckpt)  # tensor reads charged to the "read" stage
    with rec.clock.stage("calibrate"):
        seqs = calibration_ids(source, plan)
        if merge is not None:
            merge.counts = merge_counts(source, plan, seqs, show_progress)
    metadata = {
        "source": str(src.resolve().name),
        "source_model_type": ckpt.config.get("model_type"),
        "bits": bits,
        "dense_bits": plan.dense_bits,
        "expert_dtype": "mwq" if plan.mwq else ("f32" if bits == 32 else "f16"),
        **getattr(ckpt, "chat_metadata", {}),  # chat_template (+ its special-token strings), when the source has one
    }
    if plan.mwq:
        metadata.update(base_bits=plan.base_bits, group_size=plan.group_size, nesting=plan.nesting,
                        mwq_planes=bits - plan.base_bits + 1)
    if merge is not None:
        metadata["merge"] = {
            "method": merge.method, "merge_ratio": merge.merge_ratio, "experts_per_layer": merge.experts_per_layer,
            "low_rank": merge.low_rank, "group_counts": merge.counts, "calib_file": plan.calib.name,
            "calib_tokens": plan.calib_tokens_used,
            "counts_pass": "routing-only first pass" if merge.merge_ratio is not None else "fixed"}
    layers = expert_layers(source, plan, seqs, rec, show_progress)
    report = write_container(source, out, layers, metadata, plan, rec, show_progress)
    if show_progress:
        print(f"expert encoding took {report['fit_s']:.1f} s in all", file=sys.stderr)
        if plan.weighted:
            print(f"MWQ: {len(report['weight_only'])} of {len(report['tokens'])} experts saw fewer than "
                  f"{min_calib_tokens(plan.group_size)} calibration tokens and were fitted to the weight-only error",
                  file=sys.stderr)
    return out
