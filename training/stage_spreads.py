"""`sfpc stage-spreads`: measure FLPM's spreads (dMu, dSigma) at decoder depths other than the
trained one, on the checkpoint's own unlabelled training batches, for an export with
``--uncertainty-method flpm_stages`` (issue 18: FLPM at more than one decoder depth).

Training keeps running spreads only where FLPM acts (depth 0, before the classifier). Deeper
stages get theirs here, the way FLPM measures them in training: the standard deviation over an
unlabelled batch of the per-image channel means and stds, averaged over batches.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def measure(checkpoint: str | Path, depths: Sequence[int], batches: int = 32,
            data: str | None = None) -> dict[str, Any]:
    """{"depths": {d: {"dmu": [...], "dsigma": [...]}}, ...} of ``checkpoint``."""
    from sfpc.model.export import load_checkpoint
    from sfpc.model.uncertainty_heads import spreads_to_json, stage_spreads
    from sfpc.training.config import TrainConfig
    from sfpc.training.datamodule import build_data

    net, _ = load_checkpoint(checkpoint)
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    fields = dict(ck["config"])
    if data:
        fields["data"] = data
    cfg = TrainConfig(**fields)
    loader = build_data(cfg).loader
    images = (loader.batch(i) for i in range(batches))
    spreads = stage_spreads(net, (xu if xu.shape[0] >= 2 else xl for xl, _, xu in images),
                            [int(d) for d in depths])
    return {"checkpoint": str(checkpoint), "batches": batches,
            "depths": spreads_to_json(spreads)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sfpc stage-spreads", description=__doc__.split("\n\n")[0],
        epilog="then: sfpc export --checkpoint CK --out DIR --uncertainty-method flpm_stages "
               "--stage-spreads spreads.json")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--depths", default="1", help="decoder depths, e.g. 1,2 (0 is the trained "
                                                 "FLPM and needs no measuring)")
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--data", help="the training data, if it moved since training")
    p.add_argument("--out", required=True, help="JSON for `sfpc export --stage-spreads`")
    a = p.parse_args(argv)
    depths = [int(d) for d in a.depths.split(",") if d.strip() and int(d) != 0]
    result = measure(a.checkpoint, depths, a.batches, a.data)
    Path(a.out).write_text(json.dumps(result) + "\n")
    print(json.dumps({d: {"dmu_mean": sum(v["dmu"]) / len(v["dmu"]),
                          "dsigma_mean": sum(v["dsigma"]) / len(v["dsigma"])}
                      for d, v in result["depths"].items()}))
    return 0
