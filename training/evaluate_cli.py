"""`sfpc evaluate`: score a checkpoint on labelled cases; CSV per case and a JSON summary."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from sfpc.model.export import load_checkpoint
from sfpc.training.config import TrainConfig
from sfpc.training.data import discover_cases, load_eval_cases
from sfpc.training.datamodule import _label_map, context_margin, resample_axes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sfpc evaluate",
        description="Evaluate a checkpoint: Dice, HD95 and ASD (mm, using the voxel spacing) and "
                    "boundary Dice (10-voxel band) per class and mean. Without --data, scores the "
                    "validation part of the split the checkpoint was trained with.")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt from `sfpc train`")
    p.add_argument("--data", help="labelled cases to score (any layout `sfpc train` reads)")
    p.add_argument("--layout", default="auto")
    p.add_argument("--out", required=True, help="folder for cases.csv and summary.json")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap")
    a = p.parse_args(argv)

    from sfpc.training.evaluate import evaluate_cases

    ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**ck["config"])
    net, meta = load_checkpoint(a.checkpoint)
    if a.data:
        cases = [c for c in discover_cases(a.data, a.layout, label_map=_label_map(cfg))
                 if c.label is not None]
    else:
        from sfpc.training.data import Split

        split_path = Path(cfg.split_file) if cfg.split_file else Path(cfg.out) / "split.json"
        cases = Split.from_json(split_path).val
    if not cases:
        p.error("no labelled case to evaluate")
    # A 2.5D model's slab keeps its real neighbours beyond its ends, as in validation during
    # training: cropped bare, its end slices would see themselves repeated instead.
    vols = load_eval_cases(cases, cfg.normalisation, cfg.spacing, resample_axes(cfg),
                           crop_to_slices=cfg.spatial_dims == 2, resampling=meta.resampling,
                           margin=context_margin(cfg))
    res = evaluate_cases(net, [v.to_dict() for v in vols], num_classes=meta.num_classes,
                         spatial_dims=meta.spatial_dims, patch_size=meta.patch_size,
                         plane_axis=meta.plane_axis, input_mode=meta.input_mode,
                         overlap=a.overlap if a.overlap is not None else
                         meta.inference.get("overlap", 0.5),
                         class_names=meta.class_names, out_dir=a.out,
                         context_slices=meta.context_slices)
    s = res["summary"]
    rows = [f"{'class':<14}{'Dice':>8}{'HD95 mm':>10}{'ASD mm':>9}{'bDice':>8}"]
    for cls, m in s.items():
        rows.append(f"{cls:<14}{m['dice']['mean']:>8.4f}{m['hd95']['mean']:>10.2f}"
                    f"{m['asd']['mean']:>9.2f}{m['boundary_dice']['mean']:>8.4f}")
    print("\n".join(rows))
    print(json.dumps({"cases": len(res["cases"]), "out": a.out}))
    return 0
