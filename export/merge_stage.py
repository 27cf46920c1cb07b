"""The merge stage of the exporter: calibration stream -> merged experts -> container, one layer at a time.

`merge_stage(cal, spec, n_groups, ...)` is the per-layer step a pipeline calls on each `LayerCalibration`: it
returns the stored (merged) experts, the layer's e -> g map, and per stored expert the Gram blocks of the union of
its members' inputs (so the MWQ quantizer can fit the merged expert's scales on every token it will now serve).

`export_merged(...)` is a complete export with merging (f16/f32 experts, or any expert encoder passed in).

Group counts and the two calibration passes: the adaptive global rule (`merge_ratio`) needs every layer's
selection frequencies before the first layer is merged, and the calibration stream yields one layer at a time. We
run a cheap routing-only first pass (`collect_grams=False`; it keeps only E counts per layer) to get all
frequencies, then the real pass that merges and writes each layer as it arrives. Buffering the first pass's layers
instead would hold every layer's weights at once, which is exactly what the stream exists to avoid. With
`experts_per_layer` the counts are known up front and a single pass is run. Both passes see the same tokens, so the
frequencies are identical; the statistics are those of the original (unmerged) model, as in MC-SMoE.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.arch import ArchSpec, expert_tensor_name
from edgemoe.container import ContainerWriter
from edgemoe.errors import EdgeMoEError
from edgemoe.quant import Q8_0_BLOCK, quantize_q8_0

from .calibrate import LayerCalibration, calibrate, load_calibration_ids
from .checkpoint import open_checkpoint
from .merge import EXPERIMENTAL_METHODS, METHODS, group_counts, merge_layer, permute_gram_blocks
from .progress import progress
from .summary import ExportRecorder, stage


@dataclass
class MergedLayer:
    layer: int
    experts: dict  # container name of stored expert g -> f32 [out, in]
    expert_map: list  # e -> g (-1 = pruned)
    gram_in: dict = field(default_factory=dict)  # g -> [H/gs, gs, gs]: sum of the members' input Gram blocks
    gram_mid: dict = field(default_factory=dict)  # g -> [I/gs, gs, gs]: members' activation Grams, aligned
    tokens: np.ndarray | None = None  # [G] routed (token, slot) pairs per stored expert (members summed)

    @property
    def n_stored(self) -> int:
        return max(self.expert_map) + 1


def merge_stage(cal: LayerCalibration, spec: ArchSpec, n_groups: int, method: str = "mcsmoe",
                low_rank: int | None = None, align: bool = True) -> MergedLayer:
    """Merge one calibrated MoE layer into `n_groups` stored experts (see `merge.merge_layer`)."""
    if cal.freq is None:
        raise EdgeMoEError(f"layer {cal.layer} is not an MoE layer; nothing to merge")
    merged, emap, perms = merge_layer(cal.experts, cal.layer, spec, cal.freq, cal.router_logits, n_groups, method,
                                      low_rank=low_rank, return_perms=True, align=align,
                                      gram_in=cal.gram_in, gram_mid=cal.gram_mid)
    out = MergedLayer(cal.layer, merged, emap)
    G = out.n_stored
    tokens = cal.expert_tokens if cal.expert_tokens is not None else cal.freq
    out.tokens = np.zeros(G, dtype=np.int64)
    for e, g in enumerate(emap):
        if g < 0:
            continue
        out.tokens[g] += int(tokens[e])
        if e in cal.gram_in:
            out.gram_in[g] = out.gram_in[g] + cal.gram_in[e] if g in out.gram_in else cal.gram_in[e].copy()
        if e in cal.gram_mid:
            gm = cal.gram_mid[e] if perms[e] is None else permute_gram_blocks(cal.gram_mid[e], perms[e])
            out.gram_mid[g] = out.gram_mid[g] + gm if g in out.gram_mid else gm.copy()
    return out


def _encode_dense(arr: np.ndarray, bits: int, dense_bits: int | None) -> tuple:
    """Storage of one dense tensor, as the plain export does: 1-D stays f32; matrices f32, f16 or Q8_0."""
    width = dense_bits or bits
    if arr.ndim == 1 or width == 32:
        return arr.astype(np.float32), "f32", arr.shape
    if width == 8 and arr.shape[-1] % Q8_0_BLOCK == 0:
        return quantize_q8_0(arr), "q8_0", arr.shape
    return arr.astype(np.float16), "f16", arr.shape


ExpertEncoder = Callable[[ContainerWriter, MergedLayer], None]


def f16_f32_encoder(bits: int) -> ExpertEncoder:
    """Write every stored expert matrix as f16 or f32 (kind="expert", 4 KiB aligned), in g order."""
    dtype, name = (np.float32, "f32") if bits == 32 else (np.float16, "f16")

    def encode(w: ContainerWriter, m: MergedLayer) -> None:
        for g in range(m.n_stored):
            for mat in ("gate", "up", "down"):
                t = expert_tensor_name(m.layer, g, mat)
                with stage(w, "quantize"):
                    w.add_tensor(t, m.experts[t].astype(dtype), name, kind="expert")

    return encode


def mwq_encoder(total_bits: int, base_bits: int = 2, group_size: int = 128, nesting: str = "mwq") -> ExpertEncoder:
    """Write every stored expert matrix as MWQ bit planes (container v2), fitted on the group's summed Grams.

    A group that saw fewer than 2 * group_size routed calibration tokens is fitted to the weight-only error (the
    same rule as the plain MWQ export: a Gram block of fewer tokens is rank-deficient and mostly noise).
    """
    from .mwq import check_bits, quantize_matrix

    check_bits(base_bits, total_bits)
    min_tokens = 2 * group_size

    def encode(w: ContainerWriter, m: MergedLayer) -> None:
        for g in range(m.n_stored):
            weighted = nesting == "mwq" and m.tokens is not None and int(m.tokens[g]) >= min_tokens
            for mat in ("gate", "up", "down"):
                t = expert_tensor_name(m.layer, g, mat)
                gram = (m.gram_mid if mat == "down" else m.gram_in).get(g) if weighted else None
                with stage(w, "quantize"):
                    qm = quantize_matrix(m.experts[t], gram, base_bits, total_bits, group_size, nesting)
                w.add_planes(t, qm.planes, qm.shape, kind="expert",
                             quant={"base_bits": base_bits, "group_size": group_size, "nesting": nesting,
                                    "weighted": qm.weighted})

    return encode


def routing_frequencies(ckpt, seqs, show_progress: bool = False) -> list:
    """The cheap first pass: per layer, expert selection counts (None for a dense layer). Holds E floats a layer."""
    freqs = []
    for cal in calibrate(ckpt, seqs, collect_grams=False, show_progress=show_progress):
        freqs.append(None if cal.freq is None else cal.freq.copy())
        del cal
    return freqs


def export_merged(src, out, merge_ratio: float | None = None, experts_per_layer: int | None = None,
                  method: str = "mcsmoe", calib_path=None, calib_tokens: int = 16384, bits: int = 16,
                  dense_bits: int | None = None, low_rank: int | None = None, seq_len: int = 256,
                  group_size: int | None = None, base_bits: int = 2, expert_encoder: ExpertEncoder | None = None,
                  show_progress: bool = True) -> Path:
    """Export `src` (a Hugging Face MoE checkpoint) to a container whose experts are merged.

    Exactly one of `merge_ratio` (fraction of all experts kept, adaptive per layer) and `experts_per_layer`.
    The container's ArchSpec carries `expert_map` (per layer e -> g); metadata["merge"] records how.
    bits: 32/16 store the merged experts as floats; 8..2 as MWQ planes (`base_bits` base plane + residual planes)
    fitted on each group's summed Gram blocks (merge, then quantize). `expert_encoder` replaces the expert writer
    (it then receives the per-group Gram blocks). `calib_path` defaults to `src`/calib.txt when that exists.
    """
    if method not in METHODS + EXPERIMENTAL_METHODS:
        raise EdgeMoEError(f"--merge-method {method!r}: expected one of {', '.join(METHODS + EXPERIMENTAL_METHODS)}")
    if (merge_ratio is None) == (experts_per_layer is None):
        raise EdgeMoEError("give exactly one of --merge-ratio and --experts-per-layer")
    if merge_ratio is not None and not 0.0 < merge_ratio <= 1.0:
        raise EdgeMoEError(f"--merge-ratio {merge_ratio}: expected a fraction in (0, 1]")
    if experts_per_layer is not None and experts_per_layer < 1:
        raise EdgeMoEError(f"--experts-per-layer {experts_per_layer}: expected at least 1")
    if bits not in (16, 32, *range(2, 9)) and expert_encoder is None:
        raise EdgeMoEError(f"--bits {bits}: expected 32 or 16 (floats) or 8..2 (MWQ planes)")
    if low_rank is not None and low_rank < 1:
        raise EdgeMoEError(f"--low-rank {low_rank}: expected a rank >= 1")
    out = Path(out)
    if out.is_dir():
        raise EdgeMoEError(f"{out}: is a directory; give the output file name, e.g. {out / 'model.emoe'}")
    if not out.parent.exists():
        raise EdgeMoEError(f"{out.parent}: output directory does not exist")
    ckpt = open_checkpoint(src)
    spec = ckpt.spec
    if spec.expert_bias:  # the bias rows are per stored expert and would have to be merged with the matrices
        raise EdgeMoEError(f"{src}: merging experts that carry biases ({spec.family}: expert_bias) is not supported "
                           "yet; export without --merge-ratio / --experts-per-layer")
    rec = ExportRecorder(ckpt)  # stage times and part sizes: metadata["export_summary"]
    source = rec.source(ckpt)  # tensor reads charged to the "read" stage
    if calib_path is None and (Path(src) / "calib.txt").exists():
        calib_path = Path(src) / "calib.txt"  # a checkpoint may ship its calibration text, as for plain export
    mwq_bits = bits not in (16, 32)
    if mwq_bits and expert_encoder is None:
        from .mwq import choose_group_size

        group_size = choose_group_size([spec.hidden, spec.expert_ffn], group_size)
        expert_encoder = mwq_encoder(bits, base_bits, group_size)
    with rec.clock.stage("calibrate"):
        seqs = load_calibration_ids(ckpt.tokenizer_json, calib_path, calib_tokens, min(seq_len, spec.max_position),
                                    spec.vocab)
    min_groups = spec.top_k if method == "prune" else 1
    if experts_per_layer is not None:
        sizes = [np.zeros(spec.n_experts) if spec.is_moe_layer(i) else None for i in range(spec.n_layers)]
        counts = group_counts(sizes, experts_per_layer=experts_per_layer, min_groups=min_groups)
    else:
        with rec.clock.stage("calibrate"):
            freqs = routing_frequencies(source, seqs, show_progress)
        counts = group_counts(freqs, merge_ratio=merge_ratio, min_groups=min_groups)

    metadata = {
        "source": str(Path(src).resolve().name),
        "source_model_type": ckpt.config.get("model_type"),
        "bits": bits,
        "dense_bits": dense_bits or (bits if bits in (16, 32) else 8),
        "expert_dtype": "f32" if bits == 32 else "f16" if bits == 16 else "mwq",
        **getattr(ckpt, "chat_metadata", {}),  # chat_template (+ its special-token strings), when the source has one
        "merge": {
            "method": method, "merge_ratio": merge_ratio, "experts_per_layer": experts_per_layer,
            "low_rank": low_rank, "group_counts": counts, "calib_file": None if calib_path is None else
            Path(calib_path).name, "calib_tokens": int(sum(len(s) for s in seqs)),
            "counts_pass": "routing-only first pass" if merge_ratio is not None else "fixed",
        },
    }
    if mwq_bits:
        metadata.update(base_bits=base_bits, group_size=group_size, nesting="mwq", mwq_planes=bits - base_bits + 1)
    collect = expert_encoder is not None or method == "regmean"  # regmean fits on the members' Gram blocks
    n_tokens = int(sum(len(s) for s in seqs))

    def merged_layers():
        stream = calibrate(source, seqs, group_size=group_size or 128, collect_grams=collect,
                           show_progress=show_progress)
        for cal in rec.clock.iterate(stream, "calibrate"):
            if cal.freq is None:
                continue
            with rec.clock.stage("merge"):
                merged = merge_stage(cal, spec, counts[cal.layer], method, low_rank)
            rec.note_routing(cal.layer, merged.tokens, n_tokens)
            yield merged

    return write_merged_container(source, out, merged_layers(), metadata, bits, dense_bits, expert_encoder,
                                  show_progress, rec)


def write_merged_container(ckpt, out, layers: Iterable[MergedLayer], metadata: dict, bits: int = 16,
                           dense_bits: int | None = None, expert_encoder: ExpertEncoder | None = None,
                           show_progress: bool = False, rec: ExportRecorder | None = None) -> Path:
    """Dense part first (from the checkpoint, one layer at a time), then each merged layer's stored experts as
    `layers` yields them. The ArchSpec's `expert_map` is filled in as layers arrive and serialized at close."""
    spec = ckpt.spec
    out_spec = copy.deepcopy(spec)
    out_spec.expert_map = [[] for _ in range(spec.n_layers)]
    encode = expert_encoder or f16_f32_encoder(bits)
    dense_width = bits if bits in (16, 32) else 8  # MWQ experts: Q8_0 dense by default, as the plain export
    rec = rec or ExportRecorder(ckpt)
    with rec.writer(out, out_spec, metadata) as w:
        if ckpt.tokenizer_json is not None:
            w.add_tensor("tokenizer.json", np.frombuffer(ckpt.tokenizer_json, np.uint8), "bytes", kind="blob")
        for name, arr in ckpt.global_tensors().items():
            with stage(w, "quantize"):  # the writes inside are charged to "write"
                w.add_tensor(name, *_encode_dense(arr, dense_width, dense_bits))
        for layer in progress(range(spec.n_layers), "dense layers (read, quantize, write)", show_progress):
            for name, arr in ckpt.layer_dense(layer).items():
                with stage(w, "quantize"):
                    w.add_tensor(name, *_encode_dense(arr, dense_width, dense_bits))
        n_moe = sum(1 for i in range(spec.n_layers) if spec.is_moe_layer(i))
        for merged in progress(layers, f"merged layers of {n_moe} (calibrate, merge, quantize, write)",
                               show_progress):
            out_spec.expert_map[merged.layer] = merged.expert_map
            encode(w, merged)
            del merged
        missing = [i for i in range(spec.n_layers) if spec.is_moe_layer(i) and not out_spec.expert_map[i]]
        if missing:  # raised inside the writer: the partial file is removed
            raise EdgeMoEError(f"{out}: no merged experts were written for layers {missing}")
        w.metadata["export_summary"] = rec.summary(w)
    return Path(out)
