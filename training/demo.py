"""`sfpc demo`: synthetic ACDC-like data -> a short SFPC training -> evaluation -> ONNX export.

A few minutes on a laptop CPU; it shows every stage working, not a useful model."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sfpc demo", description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--cases", type=int, default=24)
    a = p.parse_args(argv)
    out = Path(a.out)

    from sfpc.model.export import export_checkpoint
    from sfpc.training import evaluate_cli, synth
    from sfpc.training.config import TrainConfig
    from sfpc.training.trainer import train

    data = out / "data"
    if not (data / "dataset.json").exists():
        synth.generate("acdc", data, n_cases=a.cases, seed=0)
    cfg = TrainConfig(data=str(data), layout="folder", spatial_dims=2, patch_size=[96, 96],
                      input_mode="resize", normalisation={"kind": "minmax"},
                      class_names=["background", "RV", "Myo", "LV"], labelled_fraction=0.2,
                      val_fraction=0.2, iterations=a.iterations,
                      lr_step=max(1, a.iterations * 2500 // 6000),
                      val_every=max(1, a.iterations // 3),
                      out=str(out / "run"), name="sfpc-demo-acdc", task="synthetic ACDC-like")
    result = train(cfg)
    evaluate_cli.main(["--checkpoint", str(out / "run" / "best.pt"), "--out", str(out / "eval")])
    meta = export_checkpoint(out / "run" / "best.pt", out / "export")
    print(json.dumps({"best_val_dice": result["best_dice"], "export": str(out / "export"),
                      "graphs": sorted(meta.graphs)}, indent=2))
    return 0
