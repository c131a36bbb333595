"""Temperature scaling and the per-case quality threshold, fitted on validation data; numpy only.

- :func:`fit_temperature` minimises the mean negative log-likelihood of softmax(z / T) over
  validation voxels by golden-section search on log T. The NLL is convex in 1/T (a log-sum-exp
  of functions linear in 1/T, minus a linear term), hence unimodal in log T, so the search finds
  the global minimum inside its bracket.
- :func:`choose_quality_threshold` picks the boundary-uncertainty threshold above which a case
  is flagged for review (see its docstring for the rule, which is also written into the model
  metadata so that the model card states it).
- :func:`write_calibration` stores both in an export's ``sfpc_model.json`` without touching its
  graphs (their sha256 stay valid).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfpc.inference.contract import ModelMetadata

GOLDEN = (math.sqrt(5) - 1) / 2
DEFAULT_T_BOUNDS = (0.05, 20.0)
QUALITY_MEASURE = "boundary_uncertainty"
DEFAULT_DICE_TARGET = 0.8
DEFAULT_FLAG_QUANTILE = 0.9
_CHUNK = 1 << 20


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T); logits (N, K), labels (N,)."""
    z = np.asarray(logits)
    y = np.asarray(labels).astype(np.int64, copy=False)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"logits must be (N, K) and labels (N,), got {z.shape} and {y.shape}")
    if z.shape[0] == 0:
        raise ValueError("no voxels")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    total = 0.0
    for start in range(0, z.shape[0], _CHUNK):  # float64 temporaries of one chunk only
        s = z[start:start + _CHUNK].astype(np.float64) / temperature
        top = s.max(axis=1, keepdims=True)
        lse = np.log(np.exp(s - top).sum(axis=1)) + top[:, 0]
        total += float(np.sum(lse - s[np.arange(s.shape[0]), y[start:start + _CHUNK]]))
    return total / z.shape[0]


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = DEFAULT_T_BOUNDS,
                    tol: float = 1e-4) -> dict[str, float]:
    """The T minimising :func:`nll` in ``bounds``, by golden-section search on log T.

    Returns {"temperature", "nll_before" (T = 1), "nll_after", "iterations"}. ``tol`` is the
    final bracket width in log T (1e-4: T to 0.01 %).
    """
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    if not lo < 0 < hi:
        raise ValueError(f"bounds {bounds} must bracket T = 1")

    def f(log_t: float) -> float:
        return nll(logits, labels, math.exp(log_t))

    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    iterations = 0
    while b - a > tol:
        iterations += 1
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
    log_t = (a + b) / 2
    return {"temperature": math.exp(log_t), "nll_before": f(0.0), "nll_after": f(log_t),
            "iterations": iterations}


def sample_voxels(n: int, budget: int, rng: np.random.Generator) -> np.ndarray | None:
    """Indices of a uniform sample of ``budget`` out of ``n`` voxels, sorted; None = take all."""
    if n <= budget:
        return None
    return np.sort(rng.choice(n, size=budget, replace=False))


def choose_quality_threshold(
    uncertainty: Sequence[float | None],
    dice: Sequence[float],
    dice_target: float = DEFAULT_DICE_TARGET,
    flag_quantile: float = DEFAULT_FLAG_QUANTILE,
    band: int = 10,
) -> dict[str, Any]:
    """The boundary-uncertainty threshold t of the review flag ("flag when u > t").

    Rule: a validation case is "poor" when its mean foreground Dice is below ``dice_target``.
    When the validation set holds poor and good cases, t maximises Youden's J = sensitivity +
    specificity - 1 for finding the poor ones, among the midpoints between consecutive distinct
    uncertainties (and just below the smallest, which flags every case); ties in J go to the
    larger t (fewer flags). Otherwise Dice cannot guide the choice, and t is the
    ``flag_quantile`` quantile of the validation uncertainties (the most uncertain
    1 - flag_quantile of cases get flagged). Cases without a boundary (no foreground predicted,
    u None) do not take part. ``band`` (voxels) is only stated in the rule text.
    """
    pairs = [(float(u), float(d)) for u, d in zip(uncertainty, dice, strict=True)
             if u is not None and math.isfinite(float(u))]
    if not pairs:
        raise ValueError("no validation case has a boundary uncertainty (no foreground was "
                         "predicted anywhere): cannot choose a threshold")
    u = np.array([p[0] for p in pairs])
    poor = np.array([p[1] < dice_target for p in pairs])
    info: dict[str, Any] = {"measure": QUALITY_MEASURE, "map": "entropy",
                            "band_width_voxels": int(band), "dice_target": float(dice_target),
                            "cases": int(u.size), "poor_cases": int(poor.sum())}
    if poor.any() and not poor.all():
        levels = np.unique(u)
        candidates = np.r_[levels[0] - max(1e-6, abs(levels[0]) * 1e-6),
                           (levels[:-1] + levels[1:]) / 2]
        best_j, best_t = -np.inf, float(candidates[0])
        for t in candidates:
            flagged = u > t
            j = flagged[poor].mean() + (~flagged[~poor]).mean() - 1
            if j >= best_j:  # >=: a later (larger) t wins ties
                best_j, best_t = j, float(t)
        flagged = u > best_t
        info.update({
            "threshold": best_t,
            "rule": (f"flag a case for review when its boundary uncertainty (mean normalised "
                     f"predictive entropy in the {band}-voxel band around the predicted "
                     f"boundary) exceeds the threshold; threshold maximises Youden's J for "
                     f"finding validation cases with mean foreground Dice < {dice_target:g}"),
            "youden_j": float(best_j),
            "sensitivity": float(flagged[poor].mean()),
            "specificity": float((~flagged[~poor]).mean()),
        })
    else:
        t = float(np.quantile(u, flag_quantile))
        info.update({
            "threshold": t,
            "rule": (f"flag a case for review when its boundary uncertainty (mean normalised "
                     f"predictive entropy in the {band}-voxel band around the predicted "
                     f"boundary) exceeds the threshold; the validation cases were all "
                     f"{'below' if poor.all() else 'at or above'} Dice {dice_target:g}, so the "
                     f"threshold is the {flag_quantile:g} quantile of their uncertainties"),
            "flag_quantile": float(flag_quantile),
        })
    info["flagged_cases"] = int(np.count_nonzero(u > info["threshold"]))
    return info


def write_calibration(export_dir: str | Path, temperature: float,
                      quality: Mapping[str, Any] | None,
                      report: Mapping[str, Any] | None = None) -> ModelMetadata:
    """Set ``temperature`` and ``quality`` (and ``metrics["calibration"]`` = ``report``) in the
    export's metadata file; the ONNX graphs and their recorded sha256 are left as they are."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    meta = ModelMetadata.load(export_dir)
    meta.temperature = float(temperature)
    meta.quality = dict(quality or {})
    if report is not None:
        meta.metrics = {**(meta.metrics or {}), "calibration": dict(report)}
    meta.save(export_dir)
    return meta
