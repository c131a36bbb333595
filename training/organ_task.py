"""The abdominal organ task on the TotalSegmentator test CTs (spleen, liver, stomach; 2D axial).

There is only one labelled CT (ct_a), so the split is by blocks of axial slices: a held-apart
validation block (never labelled, never seen unlabelled either), a gap on both sides of it (its
neighbours are near-copies at 3 mm), a seeded, stratified sample of the remaining slices as the
labelled set, and everything else of ct_a plus the whole of ct_b as the unlabelled pool.
The labels are TotalSegmentator's own outputs: a silver standard.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from sfpc.inference.preprocess import axis_weights, resampled_shape, to_orientation
from sfpc.training.config import TrainConfig
from sfpc.training.enhancement import tissue_map_for

# TotalSegmentator 'total' ids -> our classes.
LABEL_MAP = {1: 1, 5: 2, 6: 3}
CLASS_NAMES = ["background", "spleen", "liver", "stomach"]
VAL_BLOCK = (96, 106)  # axial slices of ct_a (RAS), half-open; all three organs present
# A 2.5D model's training slabs read context slices beyond their ends: make_organ_dataset widens
# the gap for it (context_gap), so that none of them is a validation slice.
GAP = 2
CT_WINDOW = [-250.0, 350.0]  # HU; soft-tissue window wide enough for gas in the stomach


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted indices -> half-open [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def context_gap(n_slices: int, native_mm: float, val_block: tuple[int, int], gap: int,
                context_slices: int = 0, slice_spacing: float | None = None,
                resampling: str = "area") -> int:
    """The smallest gap >= ``gap`` (slices of ct_a) that keeps every validation slice out of
    the inputs of a 2.5D model's training slabs: each slab is cropped from the volume resampled
    to ``slice_spacing`` mm (None: ct_a's own ``native_mm``) with ``context_slices`` model slices
    of context on each side (training/data.py load_volume), and each model slice mixes the
    native slices its resampling weights reach. ``gap`` itself for a plain 2D model."""
    k = int(context_slices)
    if k <= 0:
        return int(gap)
    n_model = resampled_shape((n_slices,), (native_mm,),
                              (native_mm if slice_spacing is None else slice_spacing,))[0]
    reached = axis_weights(n_slices, n_model, resampling) > 0
    scale = n_model / n_slices
    lo, hi = val_block

    def leaks(g: int) -> bool:
        # The slabs nearest the block read furthest into it: the one starting at hi + g and
        # the one ending at lo - g (load_volume's rounding of slab ends to model rows).
        after, before = hi + g, lo - g
        if after < n_slices:
            first = max(0, min(int(round(after * scale)), n_model - 1) - k)
            if np.flatnonzero(reached[first])[0] < hi:
                return True
        if before > 0:
            start = min(int(round((before - 1) * scale)), n_model - 1)
            stop = min(max(int(round(before * scale)), start + 1), n_model)
            last = min(n_model, stop + k) - 1
            if np.flatnonzero(reached[last])[-1] >= lo:
                return True
        return False

    g = int(gap)
    while leaks(g) and (hi + g < n_slices or lo - g > 0):
        g += 1
    return g


def make_organ_dataset(
    data_dir: str | Path,
    out_json: str | Path,
    labelled_fraction: float = 0.1,
    seed: int = 0,
    val_block: tuple[int, int] = VAL_BLOCK,
    gap: int = GAP,
    use_ct_b: bool = True,
    selection: str = "random",
    organ_share: float | None = None,
    context_slices: int = 0,
    slice_spacing: float | None = None,
    resampling: str = "area",
) -> dict:
    """Write the dataset JSON (layout "json") and return a description of the split.

    ``context_slices``, ``slice_spacing`` and ``resampling``: the model's (a 2.5D one reads
    neighbours beyond its slabs); the gap is widened as :func:`context_gap` says, so the split
    of a plain 2D model is the one ``gap`` gives.
    """
    data = Path(data_dir).resolve()
    image, label = data / "ct_a_image.nii.gz", data / "ct_a_label.nii.gz"
    for p in (image, label):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: point --data at shared/data/organs")
    lab_img = nib.load(str(label))
    lab, ras_affine, _ = to_orientation(np.asarray(lab_img.dataobj), lab_img.affine, "RAS")
    n = lab.shape[2]
    organ = np.isin(lab, list(LABEL_MAP)).any(axis=(0, 1))
    lo, hi = val_block
    gap = context_gap(n, float(np.linalg.norm(ras_affine[:3, 2])), (lo, hi), gap,
                      context_slices, slice_spacing, resampling)
    excluded = set(range(max(0, lo - gap), min(n, hi + gap)))
    pool = [z for z in range(n) if z not in excluded]
    if selection not in ("random", "even"):
        raise ValueError(f"selection must be 'random' or 'even', not {selection!r}")
    rng = np.random.default_rng(seed)
    strata = ([z for z in pool if organ[z]], [z for z in pool if not organ[z]])
    budget = int(round(labelled_fraction * len(pool)))
    if organ_share is None:
        # Stratified by organ presence so that 10% of slices keeps 10% of the organ slices.
        counts = [int(round(labelled_fraction * len(s))) for s in strata]
    else:
        # An annotator's budget spent mostly where the organs are (sparse annotation).
        k_organ = min(len(strata[0]), int(round(organ_share * budget)))
        counts = [k_organ, min(len(strata[1]), budget - k_organ)]
    labelled: list[int] = []
    for stratum, k in zip(strata, counts, strict=True):
        if not k:
            continue
        if selection == "even":
            # Every n-th slice across the stratum, as annotators label sparse volumes.
            picks = np.unique(np.round(np.linspace(0, len(stratum) - 1, k)).astype(int))
            labelled += [int(stratum[i]) for i in picks]
        else:
            labelled += [int(z) for z in rng.choice(stratum, size=k, replace=False)]
    unlabelled = [z for z in pool if z not in set(labelled)]
    label_map = {str(k): v for k, v in LABEL_MAP.items()}
    entries = [{"id": f"ct_a_val_{lo}_{hi}", "image": str(image), "label": str(label),
                "slices": [lo, hi], "role": "val", "label_map": label_map}]
    # Every tissue of the raw label that enhances, for the contrast augmentation (if configured).
    tissues = {str(k): v for k, v in tissue_map_for().items()}
    for a, b in _runs(labelled):
        entries.append({"id": f"ct_a_lab_{a}_{b}", "image": str(image), "label": str(label),
                        "slices": [a, b], "role": "labelled", "label_map": label_map,
                        "tissue_map": tissues})
    for a, b in _runs(unlabelled):
        entries.append({"id": f"ct_a_unl_{a}_{b}", "image": str(image), "slices": [a, b],
                        "role": "unlabelled"})
    if use_ct_b:
        entries.append({"id": "ct_b", "image": str(data / "ct_b_image_unlabelled.nii.gz"),
                        "role": "unlabelled"})
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The dataset.json form (labels + cases) so that `sfpc plan` reads the class names.
    labels = {str(i): name for i, name in enumerate(CLASS_NAMES)}
    out.write_text(json.dumps({"labels": labels, "cases": entries}, indent=1) + "\n")
    return {"labelled_slices": sorted(labelled), "labelled_organ_slices":
            sorted(z for z in labelled if organ[z]), "val_block": [lo, hi], "gap": gap,
            "n_unlabelled_ct_a_slices": len(unlabelled), "ct_b": use_ct_b,
            "labelled_fraction": labelled_fraction, "selection": selection,
            "organ_share": organ_share, "n_usable_slices": len(pool), "n_slices": n,
            "seed": seed, "json": str(out)}


def train_overrides() -> dict:
    """The TrainConfig fields of the organ task (2D axial, 3 mm in-plane, CT window)."""
    return {
        "layout": "json", "spatial_dims": 2, "plane": "axial", "patch_size": [128, 128],
        "spacing": [3.0, 3.0, None], "input_mode": "spacing",
        "normalisation": {"kind": "ct_window", "window": CT_WINDOW},
        "class_names": CLASS_NAMES, "labelled_fraction": None, "val_fraction": None,
        # No flips: left-right mirroring would swap liver and spleen sides.
        "augment": {"flip": False, "rotation": 15.0, "scale": [0.85, 1.15]},
        "task": "abdominal CT: spleen, liver, stomach",
    }


def context_split_args(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of :func:`make_organ_dataset` that a training config's fields (the
    organ task's :func:`train_overrides` with the config file over them) fix: a 2.5D model's
    context slices, slice spacing and resampling."""
    k = int(fields.get("context_slices") or 0)
    if not k:
        return {"context_slices": 0}
    spacing = fields.get("spacing")
    values = list(spacing) if isinstance(spacing, (list, tuple)) else [spacing]
    slice_mm = values[0] if len(values) == 1 else values[2] if len(values) == 3 else None
    return {"context_slices": k, "slice_spacing": None if slice_mm is None else float(slice_mm),
            "resampling": fields.get("resampling", TrainConfig.resampling)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sfpc organ-split", description=__doc__)
    p.add_argument("--data", required=True, help="folder with ct_a_image/ct_a_label/ct_b_*")
    p.add_argument("--out", required=True, help="dataset JSON to write")
    p.add_argument("--labelled-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-slices", type=int, default=0,
                   help="the 2.5D model's --context-slices: the gap around the validation block "
                        "widens so that its training slabs' neighbours stay out of the block")
    p.add_argument("--slice-spacing", type=float, default=None,
                   help="with --context-slices: the model's slice spacing in mm (the slice "
                        "value of its --spacing; default ct_a's own)")
    a = p.parse_args(argv)
    print(json.dumps(make_organ_dataset(a.data, a.out, a.labelled_fraction, a.seed,
                                        context_slices=a.context_slices,
                                        slice_spacing=a.slice_spacing), indent=2))
    return 0
