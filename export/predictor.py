"""The pre-attention expert predictor: fitted on calibration data, stored in the container for prefetching.

At run time edgemoe predicts layer l's experts *before* layer l's attention, so their weights can be read while
attention computes. The prediction is a router applied to attn_norm(layer input) instead of ffn_norm(h) (h = input +
attention output, what the true router sees). The layer's own router is a good start (the residual stream changes
little across one attention block); this module fits a correction by ridge least squares toward the true logits:

    W_pre = argmin_W  ||X W^T - Z||^2 + lam * T * ||W - W_r||^2      X = attn_norm(x) [T, H], Z = W_r ffn_norm(h) [T, E]

(closed form; the ridge pulls toward the router, so a layer with little data keeps the router). It is stored as
`blk.{l}.ffn_gate_inp_pre.weight` (f32 [E, H], a dense tensor) and used by the C engine when present.
SmallThinker needs none: its router already reads the layer input before attention.

`edgemoe export` fits it inside its pipeline (`fit_layer`, on the calibration pass it runs anyway; see
pipeline.py). For a container exported without it:

    python -m edgemoe_export.predictor CHECKPOINT_DIR MODEL.emoe OUT.emoe --calib TEXT [--tokens 16384]

`fit_predictors` reports recall@(k+delta) (the share of the true top-k found in the predicted top-(k+delta)) of the
plain router and of the fitted predictor on held-out calibration tokens, per layer, so the choice is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgemoe.arch import ArchSpec
from edgemoe.container import EXPERT_ALIGN, ContainerWriter, open_container
from edgemoe.errors import EdgeMoEError

PREDICTOR_NAME = "blk.{layer}.ffn_gate_inp_pre.weight"
PREDICTOR_KIND = "ridge_least_squares"


def predictor_name(layer: int) -> str:
    return PREDICTOR_NAME.format(layer=layer)


def fit_layer_predictor(pre_attn_input: np.ndarray, router_logits: np.ndarray, router: np.ndarray,
                        ridge: float = 0.1) -> np.ndarray:
    """Ridge least squares of the true router logits on the pre-attention input, pulled toward the router.

    pre_attn_input [T, H], router_logits [T, E], router [E, H] -> W_pre [E, H] float32."""
    X = np.asarray(pre_attn_input, dtype=np.float64)
    Z = np.asarray(router_logits, dtype=np.float64)
    Wr = np.asarray(router, dtype=np.float64)
    T, H = X.shape
    if Z.shape[0] != T or Wr.shape[1] != H or Z.shape[1] != Wr.shape[0]:
        raise ValueError(f"shapes: X {X.shape}, Z {Z.shape}, router {Wr.shape}")
    scale = float(np.mean(np.sum(X * X, axis=1))) / H if T else 1.0  # mean diagonal of X^T X / T
    lam = ridge * T * max(scale, 1e-12)
    A = X.T @ X + lam * np.eye(H)
    B = X.T @ Z + lam * Wr.T
    return np.linalg.solve(A, B).T.astype(np.float32)


def recall_at(pred_logits: np.ndarray, true_logits: np.ndarray, top_k: int, delta: int = 0) -> float:
    """Share of the true top-k experts found in the predicted top-(k + delta), over all tokens."""
    kk = min(top_k + delta, pred_logits.shape[1])
    true = np.argsort(-true_logits, axis=1, kind="stable")[:, :top_k]
    pred = np.argsort(-pred_logits, axis=1, kind="stable")[:, :kk]
    hits = sum(len(set(t) & set(p)) for t, p in zip(true.tolist(), pred.tolist()))
    return hits / max(1, true.size)


def fit_layer(cal, spec: ArchSpec, ridge: float = 0.1, holdout: float = 0.2, delta: int = 1
              ) -> tuple[np.ndarray, dict]:
    """One calibrated MoE layer (`calibrate.LayerCalibration`) -> (W_pre [E, H] fitted on every sampled token, a
    report row with the recall of the plain router and of a fit on the other tokens, on held-out tokens)."""
    from edgemoe.arch import dense_tensor_names

    router = cal.dense[dense_tensor_names(spec, cal.layer)["router"]]
    X, Z = cal.pre_attn_input, cal.router_logits
    # held out: the last sequences (calibration samples are in token order), not random tokens of the same
    # sequences, which share context with the training rows and flatter an overfitted fit
    n_test = max(1, int(len(X) * holdout))
    train, test = np.arange(len(X) - n_test), np.arange(len(X) - n_test, len(X))
    W = fit_layer_predictor(X[train], Z[train], router, ridge)
    row = {"layer": cal.layer, "train_tokens": len(train), "test_tokens": int(n_test)}
    for name, w in (("router", router), ("fitted", W)):
        p = X[test] @ np.asarray(w, dtype=np.float32).T
        row[f"{name}_recall_k"] = round(recall_at(p, Z[test], spec.top_k, 0), 4)
        row[f"{name}_recall_k+{delta}"] = round(recall_at(p, Z[test], spec.top_k, delta), 4)
    return fit_layer_predictor(X, Z, router, ridge), row  # final fit on every token


def fit_predictors(src, calib, tokens: int = 16384, ridge: float = 0.1, holdout: float = 0.2, delta: int = 1,
                   show_progress: bool = True, seqs: list[np.ndarray] | None = None
                   ) -> tuple[dict[int, np.ndarray], list[dict]]:
    """Stream calibration text through the checkpoint (export/calibrate.py) and fit one predictor per MoE layer.

    seqs: token id sequences to use instead of tokenizing `calib` (a checkpoint without a tokenizer).
    Returns ({layer: W_pre}, per-layer report rows with recall of the plain router and of W_pre on held-out tokens).
    """
    from .calibrate import calibrate, load_calibration_ids
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(src) if not hasattr(src, "layer_dense") else src
    spec: ArchSpec = ckpt.spec
    if spec.router_input == "layer_input":
        raise EdgeMoEError(f"{spec.family}: the router already reads the layer input before attention; the engine "
                           "prefetches with it directly and needs no fitted predictor")
    if seqs is None:
        seqs = load_calibration_ids(ckpt.tokenizer_json, calib, tokens, min(256, spec.max_position), spec.vocab)
    preds: dict[int, np.ndarray] = {}
    report = []
    for cal in calibrate(ckpt, seqs, collect_grams=False, show_progress=show_progress):
        if cal.router_logits is None:
            continue
        preds[cal.layer], row = fit_layer(cal, spec, ridge, holdout, delta)
        report.append(row)
    return preds, report


def add_predictors(container_path, out_path, predictors: dict[int, np.ndarray], report: list[dict] | None = None
                   ) -> Path:
    """Rewrite a container with `blk.{l}.ffn_gate_inp_pre.weight` (f32) inserted after the dense tensors (before the
    first expert, so the dense part stays one contiguous range). Every other tensor is copied byte for byte."""
    src = open_container(container_path, verify=True)
    try:
        spec = src.spec
        for layer, w in predictors.items():
            if w.shape != (spec.n_experts, spec.hidden):
                raise EdgeMoEError(f"predictor of layer {layer}: shape {w.shape}, expected "
                                   f"{(spec.n_experts, spec.hidden)}")
        meta = dict(src.metadata)
        meta["predictor"] = {"kind": PREDICTOR_KIND, "tensor": PREDICTOR_NAME, "layers": sorted(predictors)}
        if report:
            meta["predictor"]["report"] = report
        order = sorted(src.tensors.values(), key=lambda t: t.offset)
        with ContainerWriter(out_path, spec, meta) as w:
            inserted = False

            def insert():  # every given predictor (an existing one of the same layer is skipped below)
                for layer in sorted(predictors):
                    w.add_tensor(predictor_name(layer), np.ascontiguousarray(predictors[layer], dtype=np.float32),
                                 "f32")

            for t in order:
                if t.name.endswith(".ffn_gate_inp_pre.weight") and t.name in {predictor_name(l) for l in predictors}:
                    continue  # replaced
                if t.kind == "expert" and not inserted:
                    insert()
                    inserted = True
                if t.planes:
                    w.add_planes(t.name, src.planes(t.name), t.shape, kind=t.kind, quant=t.quant)
                else:
                    w.add_tensor(t.name, src.raw(t.name), t.dtype, shape=t.shape, kind=t.kind)
            if not inserted:
                insert()
        assert EXPERT_ALIGN  # experts keep their alignment: add_tensor/add_planes align every expert region
        return Path(out_path)
    finally:
        src.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="Hugging Face checkpoint directory (the source of the container)")
    p.add_argument("container", help="the .emoe exported from it")
    p.add_argument("out", help="output .emoe with the predictors added")
    p.add_argument("--calib", required=True, help="UTF-8 calibration text")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--ridge", type=float, default=0.1,
                   help="pull toward the router, relative to the inputs' scale (0.1: best held-out recall measured on "
                        "an OLMoE-shaped model, 0.01-10 within a few points)")
    p.add_argument("--delta", type=int, default=1, help="report recall of the true top-k in the predicted top-(k+delta)")
    args = p.parse_args(argv)
    preds, report = fit_predictors(args.src, args.calib, args.tokens, args.ridge, delta=args.delta)
    for row in report:
        print(json.dumps(row))
    add_predictors(args.container, args.out, preds, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
