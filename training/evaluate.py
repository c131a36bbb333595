"""Evaluation of a torch model on whole volumes: 2D slice-wise or 3D sliding-window inference with
Gaussian weighting (the same numpy sliding window the server uses), then Dice, HD95, ASD and
boundary Dice per class and mean, written as a CSV per case and a JSON summary."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from sfpc.inference.engine import predict_model_grid
from sfpc.model.networks import SFPCNet
from sfpc.training.metrics import case_metrics, summarise, write_case_csv


def torch_predictor(net: SFPCNet, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a network as the numpy `predict(batch) -> probabilities` the sliding window calls."""

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        return torch.softmax(net(x), dim=1).float().cpu().numpy()

    return predict


def predict_probs(
    predict: Callable[[np.ndarray], np.ndarray | dict[str, np.ndarray]],
    image: np.ndarray,
    *,
    spatial_dims: int,
    patch_size: Sequence[int],
    plane_axis: int = 2,
    input_mode: str = "spacing",
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    context_slices: int = 0,
) -> dict[str, np.ndarray]:
    """Run `predict` over a channel-first preprocessed volume (C, X, Y, Z); returns dict of maps.

    The serving engine's own model-grid inference, so that validation scores exactly what the
    server will compute (sliding window for 3D, slice-wise and optional resize for 2D, with
    `context_slices` neighbours on each side of every slice as channels for 2.5D models).
    """
    return predict_model_grid(
        predict, image, spatial_dims=spatial_dims, patch_size=patch_size, plane_axis=plane_axis,
        input_mode=input_mode, overlap=overlap,
        sw_batch_size=sw_batch_size if spatial_dims == 3 else max(sw_batch_size, 16),
        context_slices=context_slices)


def evaluate_cases(
    net: SFPCNet,
    cases: Sequence[dict],
    *,
    num_classes: int,
    spatial_dims: int,
    patch_size: Sequence[int],
    plane_axis: int = 2,
    input_mode: str = "spacing",
    overlap: float = 0.5,
    class_names: Sequence[str] | None = None,
    device: torch.device | None = None,
    out_dir: str | Path | None = None,
    context_slices: int | None = None,
) -> dict:
    """Evaluate `net` on preprocessed cases (dicts with image, label, spacing, id).

    Returns {"cases": [...], "summary": {...}}; with out_dir, writes cases.csv and summary.json.
    `context_slices`: the neighbours on each side a 2.5D network takes with every slice (the
    contract's field); None reads it from the network's input channels and the image's.
    """
    device = device or next(net.parameters()).device
    was_training = net.training
    net.eval()
    predict = torch_predictor(net, device)
    rows = []
    try:
        for case in cases:
            k = context_slices
            if k is None:
                stack = net.cfg.in_channels // max(1, case["image"].shape[0])
                k = (stack - 1) // 2 if spatial_dims == 2 else 0
            probs = predict_probs(predict, case["image"], spatial_dims=spatial_dims,
                                  patch_size=patch_size, plane_axis=plane_axis,
                                  input_mode=input_mode, overlap=overlap, context_slices=k)
            pred = np.argmax(next(iter(probs.values())), axis=0)
            label = case["label"]
            if "slices" in case and case["slices"] is not None:
                # Cases restricted to a block of slices are scored on that block only.
                lo, hi = case["slices"]
                sl = [slice(None)] * 3
                sl[plane_axis] = slice(lo, hi)
                pred, label = pred[tuple(sl)], label[tuple(sl)]
            m = case_metrics(pred, label, num_classes, case["spacing"], class_names=class_names)
            rows.append({"case": case["id"], **m})
    finally:
        net.train(was_training)
    summary = summarise(rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_case_csv(rows, out / "cases.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"cases": rows, "summary": summary}
