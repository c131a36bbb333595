"""The per-case review flag: a case whose boundary uncertainty exceeds the threshold chosen by
`sfpc calibrate` (kept in the export's ``quality`` metadata) is recommended for review."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sfpc.inference.contract import ModelMetadata


def quality_flag(boundary_uncertainty: float | None,
                 quality: Mapping[str, Any]) -> dict[str, Any]:
    """The per-case flag of a model's ``quality`` metadata: {"review_recommended",
    "boundary_uncertainty", "threshold"} (review_recommended None when there is no boundary)."""
    t = float(quality["threshold"])
    out: dict[str, Any] = {"review_recommended": None, "boundary_uncertainty": None,
                           "threshold": t}
    if boundary_uncertainty is None or not math.isfinite(float(boundary_uncertainty)):
        out["reason"] = "no foreground predicted: there is no boundary to measure"
        return out
    u = float(boundary_uncertainty)
    out.update(review_recommended=bool(u > t), boundary_uncertainty=u)
    return out


def review_flag(metadata: ModelMetadata, statistics: Mapping[str, Any],
             uncertainty: bool, flip: bool = False) -> dict[str, Any] | None:
    """The per-case review flag of a model calibrated by `sfpc calibrate` (metadata.quality):
    its measure is the case's boundary uncertainty, which only uncertainty mode computes."""
    if not metadata.quality or not uncertainty:
        return None
    measure = f"boundary_mean_{metadata.quality.get('map', 'entropy')}"
    flag = quality_flag(statistics["case"].get(measure), metadata.quality)
    if flip and flag["review_recommended"] is not None:
        # Two averaged passes change the boundary uncertainty's scale: a threshold chosen on
        # single-pass maps does not apply, so the measure is reported without a verdict.
        flag["review_recommended"] = None
        flag["reason"] = ("the review threshold was chosen on single-pass uncertainty; it is not "
                          "applied to flip=true")
    return flag
