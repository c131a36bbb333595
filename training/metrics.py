"""Segmentation metrics: Dice, HD95, ASD and boundary Dice, with the project's empty-case policy.

numpy + scipy only (no torch), so that the serving gateway and the uncertainty evaluation can
import it. Surfaces and distances follow MONAI exactly (``get_mask_edges`` erosion edges,
``compute_hausdorff_distance(percentile=95)``, ``compute_average_surface_distance(symmetric=True)``)
so numbers are comparable with published MONAI-based results; the policy for empty masks is the
one fixed in METHOD.md (counted, never skipped), which is where this module departs from MONAI's
NaN/inf.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from sfpc.inference.uncertainty import boundary_band

Spacing = float | Sequence[float]

METRIC_NAMES = ("dice", "hd95", "asd", "boundary_dice")
MEAN_KEY = "mean"


def _as_mask(a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a)
    return arr if arr.dtype == bool else arr.astype(bool)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_mask(pred), _as_mask(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    if p.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {p.ndim}D")
    return p, g


def _spacing_array(spacing: Spacing, ndim: int) -> np.ndarray:
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.shape != (ndim,) or not np.all(sp > 0):
        raise ValueError(f"spacing must be positive, one value or {ndim} values, got {spacing!r}")
    return sp


def image_diagonal_mm(shape: Sequence[int], spacing: Spacing) -> float:
    """Length in mm of the image diagonal: the distance given to a case with one empty mask."""
    sp = _spacing_array(spacing, len(shape))
    return float(math.sqrt(float(np.sum((np.asarray(shape, dtype=np.float64) * sp) ** 2))))


def _union_box(p: np.ndarray, g: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of p | g grown by `margin` and clipped to the image; None when both are empty.

    Every metric here is unchanged by cropping to this box with a 1-voxel margin: edges and
    distances live inside it, and the margin keeps the background that erosions must see.
    """
    union = p | g
    box = []
    for ax in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != ax)
        idx = np.flatnonzero(union.any(axis=other))
        if idx.size == 0:
            return None
        lo, hi = int(idx[0]) - margin, int(idx[-1]) + 1 + margin
        box.append(slice(max(lo, 0), min(hi, union.shape[ax])))
    return tuple(box)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice 2|P&G| / (|P| + |G|) of two boolean masks; 1.0 when both are empty."""
    p, g = _as_mask(pred), _as_mask(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    denom = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if denom == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / denom


def _edges(mask: np.ndarray) -> np.ndarray:
    # MONAI's edge: a voxel of the mask with a face neighbour outside it; border_value=0 makes the
    # image border an edge too, as in MONAI.
    return mask ^ ndimage.binary_erosion(mask)


def _nearest_distances(src: np.ndarray, dst: np.ndarray, sp: np.ndarray) -> np.ndarray:
    # Exact Euclidean nearest-edge distances. A KD-tree over the edge voxels costs O(E log E) for
    # E surface voxels, where a distance transform costs O(N) over the whole box: on a liver-sized
    # CT crop (4.5 M voxels, 86 k edge voxels) that is 0.3 s against 0.9 s for both directions,
    # with the same values (MONAI's CPU path uses the KD-tree too).
    tree = cKDTree(np.argwhere(dst) * sp, leafsize=32)
    return tree.query(np.argwhere(src) * sp, k=1)[0]


def _cropped_surface_distances(
    p: np.ndarray, g: np.ndarray, sp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    ep, eg = _edges(p), _edges(g)
    return _nearest_distances(ep, eg, sp), _nearest_distances(eg, ep, sp)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Spacing
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each pred edge voxel to the nearest gt edge voxel, and from each gt
    edge voxel to the nearest pred edge voxel (MONAI's erosion edges). Both masks must be
    non-empty: the empty cases are the metrics' policy, not a distance."""
    p, g = _check_pair(pred, gt)
    sp = _spacing_array(spacing, p.ndim)
    if not p.any() or not g.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _union_box(p, g)
    assert box is not None
    return _cropped_surface_distances(p[box], g[box], sp)


def _hd95_asd(d_pg: np.ndarray, d_gp: np.ndarray) -> tuple[float, float]:
    # MONAI takes the percentile of each directed set and then the larger one, not the
    # percentile of the pooled distances; ASD is the mean of the pooled distances.
    hd = max(float(np.percentile(d_pg, 95)), float(np.percentile(d_gp, 95)))
    return hd, float(np.concatenate([d_pg, d_gp]).mean())


def _cropped_boundary_dice(p: np.ndarray, g: np.ndarray, band: int) -> float:
    # Band voxels outside the union box hold neither mask, so they add nothing to the counts.
    b = boundary_band(g, band)
    if not b.any():
        # gt fills the whole image: there is no boundary to restrict to.
        return dice(p, g)
    return dice(p & b, g & b)


def binary_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Spacing, band: int = 10
) -> dict[str, float]:
    """All four metrics of one foreground mask pair (dice, hd95, asd, boundary_dice), computed on
    the union bounding box, with METHOD.md's empty-case policy: both empty -> Dice 1, distances 0;
    exactly one empty -> Dice 0, distances = the image diagonal in mm."""
    p, g = _check_pair(pred, gt)
    sp = _spacing_array(spacing, p.ndim)
    box = _union_box(p, g)
    if box is None:
        return {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "boundary_dice": 1.0}
    p, g = p[box], g[box]
    if not p.any() or not g.any():
        diag = image_diagonal_mm(pred.shape, sp)
        return {"dice": 0.0, "hd95": diag, "asd": diag, "boundary_dice": 0.0}
    hd, mean_dist = _hd95_asd(*_cropped_surface_distances(p, g, sp))
    return {
        "dice": dice(p, g),
        "hd95": hd,
        "asd": mean_dist,
        "boundary_dice": _cropped_boundary_dice(p, g, band),
    }


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI: the larger of the two directed
    95th percentiles). Both empty -> 0; exactly one empty -> the image diagonal in mm."""
    p, g = _check_pair(pred, gt)
    sp = _spacing_array(spacing, p.ndim)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return image_diagonal_mm(p.shape, sp)
    return _hd95_asd(*surface_distances(p, g, sp))[0]


def asd(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> float:
    """Average symmetric surface distance in mm (mean over both directed distance sets, as MONAI
    with symmetric=True). Both empty -> 0; exactly one empty -> the image diagonal in mm."""
    p, g = _check_pair(pred, gt)
    sp = _spacing_array(spacing, p.ndim)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return image_diagonal_mm(p.shape, sp)
    return _hd95_asd(*surface_distances(p, g, sp))[1]


def boundary_dice(pred: np.ndarray, gt: np.ndarray, band: int = 10) -> float:
    """Dice restricted to `boundary_band(gt, band)`. Both empty -> 1; exactly one empty -> 0."""
    p, g = _check_pair(pred, gt)
    box = _union_box(p, g)
    if box is None:
        return 1.0
    p, g = p[box], g[box]
    if not p.any() or not g.any():
        return 0.0
    return _cropped_boundary_dice(p, g, band)


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [f"class_{c}" for c in range(1, num_classes)]
    names = list(class_names)
    if len(names) == num_classes:  # background name included first
        names = names[1:]
    if len(names) != num_classes - 1:
        raise ValueError(
            f"class_names needs {num_classes - 1} foreground names "
            f"(or {num_classes} with background), got {len(class_names)}"
        )
    if MEAN_KEY in names or len(set(names)) != len(names):
        raise ValueError(f"class names must be unique and not {MEAN_KEY!r}: {names}")
    return names


def _spatial_labels(labels: np.ndarray, ndim: int | None, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    # A channel-first map (1, *spatial) is squeezed; with one spacing value for all axes only a
    # 4D array can be told apart from a 3D volume.
    if arr.shape[:1] == (1,) and (arr.ndim == 4 or (ndim is not None and arr.ndim == ndim + 1)):
        arr = arr[0]
    if arr.ndim not in (2, 3) or (ndim is not None and arr.ndim != ndim):
        raise ValueError(
            f"{name} must be (X, Y[, Z]) or (1, X, Y[, Z]), got shape {np.shape(labels)}"
        )
    if np.issubdtype(arr.dtype, np.floating):
        # Resampled or loaded label maps often arrive as float; whole values are still labels.
        whole = np.rint(arr)
        if not np.array_equal(whole, arr):
            raise ValueError(f"{name} holds non-integer values: pass a label map, not scores")
        arr = whole.astype(np.int32)
    elif not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        raise ValueError(f"{name} must hold integer labels, got {arr.dtype}")
    return arr


def case_metrics(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    num_classes: int,
    spacing: Spacing,
    class_names: Sequence[str] | None = None,
    band: int = 10,
) -> dict[str, dict[str, float]]:
    """Per-foreground-class metrics of one case, plus their mean over classes under "mean".

    Label maps are integer arrays (X, Y[, Z]) or (1, X, Y[, Z]); `spacing` is one value or one
    per spatial axis. `class_names` lists the foreground names (or all names, background first).
    Returns {class_name: {"dice", "hd95", "asd", "boundary_dice"}, ..., "mean": {...}}.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must count background and >= 1 class, got {num_classes}")
    n_sp = np.atleast_1d(np.asarray(spacing)).size
    ndim = n_sp if n_sp > 1 else None
    pred = _spatial_labels(pred_labels, ndim, "pred_labels")
    gt = _spatial_labels(gt_labels, ndim, "gt_labels")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt label maps differ in shape: {pred.shape} vs {gt.shape}")
    for arr, name in ((pred, "pred_labels"), (gt, "gt_labels")):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} holds labels in [{lo}, {hi}], outside [0, {num_classes - 1}]")
    names = _class_names(num_classes, class_names)
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(names, start=1):
        out[name] = binary_metrics(pred == c, gt == c, spacing, band)
    out[MEAN_KEY] = {m: float(np.mean([out[n][m] for n in names])) for m in METRIC_NAMES}
    return out


def summarise(cases: Sequence[Mapping[str, object]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and (population, ddof=0) std over cases, per class and metric, for a JSON summary.

    Each case is a `case_metrics` result, possibly with extra scalar fields (e.g. "case": id),
    which are ignored. Returns {class: {metric: {"mean", "std", "n"}}}.
    """
    if not cases:
        raise ValueError("summarise needs at least one case")
    values: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        for cls, metrics in case.items():
            if not isinstance(metrics, Mapping):
                continue
            per_cls = values.setdefault(cls, {})
            for metric, v in metrics.items():
                per_cls.setdefault(metric, []).append(float(v))
    return {
        cls: {
            metric: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": float(len(v))}
            for metric, v in per_cls.items()
        }
        for cls, per_cls in values.items()
    }


def _flatten_row(row: Mapping[str, object]) -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            for sub, v in value.items():
                flat[f"{key}_{sub}"] = v
        else:
            flat[key] = value
    return flat


def write_case_csv(rows: Sequence[Mapping[str, object]], path: str | Path) -> None:
    """Write one CSV line per case. Nested {class: {metric: v}} values become "class_metric"
    columns, so a row can be {"case": case_id, **case_metrics(...)}. Columns follow first use."""
    flat = [_flatten_row(r) for r in rows]
    columns: dict[str, None] = {}
    for r in flat:
        columns.update(dict.fromkeys(r))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(flat)
