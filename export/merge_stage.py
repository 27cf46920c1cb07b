"""The merge stage of the export pipeline: one calibrated layer -> its merged experts (`merge_stage`).

`merge_stage(cal, spec, n_groups, ...)` is the per-layer step `pipeline.expert_layers` calls on each
`LayerCalibration`: it returns an `ExpertLayer` holding the stored (merged) experts, the layer's e -> g map, and per
stored expert the Gram blocks of the union of its members' inputs (so the MWQ quantizer fits the merged expert's
scales on every token it will now serve). Group counts come first (`pipeline.merge_counts`: the adaptive global
rule needs every layer's selection frequencies, from a routing-only first pass). The statistics are those of the
original (unmerged) model, as in MC-SMoE.

`export_merged` and `write_merged_container` are the pipeline's export and writer under their former names (used by
the tests and bench/merge_study.py); there is one export pipeline, `pipeline.export`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.arch import ArchSpec
from edgemoe.container import ContainerWriter
from edgemoe.errors import EdgeMoEError

from .calibrate import LayerCalibration
from .merge import merge_layer, permute_gram_blocks


@dataclass
class ExpertLayer:
    """One MoE layer's stored experts and what the quantizer and writer need: plain data between the stages."""
    layer: int
    experts: dict  # container name of stored expert g -> f32 [out, in]
    expert_map: list | None = None  # e -> g (-1 = pruned); None: not merged (g = e)
    gram_in: dict = field(default_factory=dict)  # g -> [H/gs, gs, gs]: Gram blocks of the inputs (members summed)
    gram_mid: dict = field(default_factory=dict)  # g -> [I/gs, gs, gs]: the activations' Grams, aligned
    tokens: np.ndarray | None = None  # [G] routed (token, slot) pairs per stored expert (members summed)
    predictor: np.ndarray | None = None  # f32 [E, H]: the fitted pre-attention router (predictor.py)
    predictor_report: dict | None = None
    pending: dict | None = None  # g -> Future of its encoded matrices: fitted while the layer was calibrated

    @property
    def n_stored(self) -> int:
        if self.expert_map is not None:
            return max(self.expert_map) + 1
        # the routed-token counts, when calibrated: FitOverlap drops an expert's weights once its planes are fitted
        return len(self.tokens) if self.tokens is not None else len(self.experts) // 3


MergedLayer = ExpertLayer  # the former name (bench/merge_study.py)


def merge_stage(cal: LayerCalibration, spec: ArchSpec, n_groups: int, method: str = "mcsmoe",
                low_rank: int | None = None, align: bool = True) -> ExpertLayer:
    """Merge one calibrated MoE layer into `n_groups` stored experts (see `merge.merge_layer`)."""
    if cal.freq is None:
        raise EdgeMoEError(f"layer {cal.layer} is not an MoE layer; nothing to merge")
    merged, emap, perms = merge_layer(cal.experts, cal.layer, spec, cal.freq, cal.router_logits, n_groups, method,
                                      low_rank=low_rank, return_perms=True, align=align,
                                      gram_in=cal.gram_in, gram_mid=cal.gram_mid, saliency=cal.saliency)
    out = ExpertLayer(cal.layer, merged, emap)
    G = out.n_stored
    tokens = cal.expert_tokens if cal.expert_tokens is not None else cal.freq
    out.tokens = np.zeros(G, dtype=np.int64)
    for e, g in enumerate(emap):
        if g < 0:
            continue
        out.tokens[g] += int(tokens[e])
        if e in cal.gram_in:
            out.gram_in[g] = out.gram_in[g] + cal.gram_in[e] if g in out.gram_in else cal.gram_in[e].astype(np.float64)
        if e in cal.gram_mid:
            gm = cal.gram_mid[e] if perms[e] is None else permute_gram_blocks(cal.gram_mid[e], perms[e])
            out.gram_mid[g] = out.gram_mid[g] + gm if g in out.gram_mid else gm.astype(np.float64)  # sums in f64
    return out


ExpertEncoder = Callable[[ContainerWriter, ExpertLayer], None]


def mwq_encoder(total_bits: int, base_bits: int = 2, group_size: int = 128, nesting: str = "mwq") -> ExpertEncoder:
    """Write a layer's stored experts as MWQ planes, as the pipeline does (`pipeline.quantize_layer`)."""
    from .mwq import check_bits
    from .pipeline import Plan, quantize_layer, write_encoded

    check_bits(base_bits, total_bits)
    plan = Plan(total_bits, 8, base_bits, group_size, nesting, calib=Path("calib"), calib_source="file")

    def encode(w: ContainerWriter, m: ExpertLayer) -> None:
        write_encoded(w, quantize_layer(m, plan))

    return encode


def export_merged(src, out, merge_ratio: float | None = None, experts_per_layer: int | None = None,
                  method: str | None = None, calib_path=None, calib_tokens: int = 16384, bits: int = 16,
                  dense_bits: int | None = None, low_rank: int | None = None, seq_len: int = 256,
                  group_size: int | None = None, base_bits: int = 2, show_progress: bool = True,
                  predictor: bool | None = None) -> Path:
    """`pipeline.export` with merging (exactly one of `merge_ratio` and `experts_per_layer`; method None: the
    export's default, `merge.DEFAULT_METHOD`)."""
    from .pipeline import export

    if merge_ratio is None and experts_per_layer is None:
        raise EdgeMoEError("give exactly one of --merge-ratio and --experts-per-layer")
    return export(src, out, bits=bits, dense_bits=dense_bits, show_progress=show_progress, base_bits=base_bits,
                  group_size=group_size, calib=calib_path, calib_tokens=calib_tokens, merge_ratio=merge_ratio,
                  experts_per_layer=experts_per_layer, merge_method=method, low_rank=low_rank, predictor=predictor,
                  seq_len=seq_len)


def write_merged_container(ckpt, out, layers: Iterable[ExpertLayer], metadata: dict, bits: int = 16,
                           dense_bits: int | None = None, expert_encoder: ExpertEncoder | None = None,
                           show_progress: bool = False, rec=None) -> Path:
    """The pipeline's writer (`pipeline.write_container`) for already merged layers (bench/merge_study.py)."""
    from .pipeline import MergePlan, Plan, write_container

    plan = Plan(bits, dense_bits or (bits if bits in (16, 32) else 8), merge=MergePlan())
    if bits not in (16, 32) and expert_encoder is None:
        raise EdgeMoEError(f"bits {bits}: pass an expert_encoder (mwq_encoder) for MWQ experts")
    write_container(ckpt, Path(out), layers, metadata, plan, rec, show_progress, encode_layer=expert_encoder)
    return Path(out)
