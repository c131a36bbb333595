"""Look at a data set before training on it, and configure ``sfpc train`` from what is there.

nnU-Net's idea, on this project's trainer: ``fingerprint_dataset`` reads every case once (chunks
of slices through nibabel's array proxies, so memory stays bounded whatever the volume) and keeps
per-case statistics: spacing and shape on the RAS grid, intensity range and samples, the share of
non-zero voxels, a uniform sample of the intensities under the labels, and per class its voxel
count and a per-slice profile along each axis (where it is, how many slices show it).
``make_plan`` turns the fingerprint into TrainConfig values, each with the reason it was chosen,
with nnU-Net's rules as the anchor; values a user gave are kept and the rest is planned around
them. ``sfpc plan --data DIR`` writes ``plan.json``; ``sfpc train`` plans unless ``--no-plan``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from sfpc.training.config import PLANES, TrainConfig
from sfpc.training.layouts import Case, discover_cases, parse_label_map

AXIS_NAMES = ("x (left-right)", "y (back-front)", "z (feet-head)")
PLANE_OF_AXIS = {v: k for k, v in PLANES.items()}
FOREGROUND_SAMPLES = 10_000  # per case, as nnU-Net's fingerprint
IMAGE_SAMPLES = 20_000  # per case and channel, systematic
CHUNK_VOXELS = 1 << 24  # voxels per read (x channels): ~64 MB of float32
ANISOTROPY_2D = 3.0  # nnU-Net's threshold for a low-resolution axis
MIN_3D_SLICES = 16  # a 5-stage UNet pools 4 times: a thinner labelled volume cannot fill a patch
# One 4 + 4 batch of 128^2 slices: about 1-2 s per SFPC step on one CPU core (docs/benchmarks.md);
# the CPU budget of a step is that much work (voxels x kernel size / 9).
CPU_STEP_BUDGET = 8 * 128 * 128
GPU_MEMORY_SHARE = 0.5  # of the device's memory for activations; the rest: weights, workspaces
PAPER_ITERATIONS = 6000
CPU_ITERATIONS = 1500  # the default organ model's schedule, converged on a CPU in ~45 min
# The narrowest CT window the plan uses: a radiologist's soft-tissue window (W 400 HU).
CT_MIN_WINDOW = 400.0
INTENSITY_AUGMENT = {"brightness": 0.1, "contrast": [0.8, 1.25], "gamma": [0.8, 1.25], "p": 0.3}


# ----------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------


class _Reservoir:
    """A uniform sample without replacement of at most ``k`` rows of a stream: every row gets a
    random key and the ``k`` smallest keys are kept, chunk by chunk (memory O(k + chunk))."""

    def __init__(self, k: int, width: int, rng: np.random.Generator) -> None:
        self.k, self.rng = k, rng
        self.values = np.zeros((0, width), dtype=np.float32)
        self.keys = np.zeros(0, dtype=np.float32)

    def add(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        keys = self.rng.random(len(rows), dtype=np.float32)
        values = np.concatenate([self.values, rows.astype(np.float32, copy=False)])
        keys = np.concatenate([self.keys, keys])
        if len(keys) > self.k:
            keep = np.argpartition(keys, self.k)[: self.k]
            values, keys = values[keep], keys[keep]
        self.values, self.keys = values, keys


def _ras_axes(affine: np.ndarray) -> tuple[list[int], list[bool]]:
    """For each voxel axis: the RAS axis it runs along (closest, for oblique images) and whether
    it runs backwards."""
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    return [int(a) for a in ornt[:, 0]], [bool(f < 0) for f in ornt[:, 1]]


def _read(proxy: Any, index: tuple[slice, ...]) -> np.ndarray:
    data = np.asarray(proxy[index])
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _spatial_shape(img: Any) -> tuple[int, ...]:
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise ValueError(f"{img.get_filename()}: expected a 3D or 4D image, got shape {shape}")
    return shape


def _apply_label_map(label: np.ndarray, label_map: Any) -> np.ndarray:
    label_map = parse_label_map(label_map)
    if label_map is None:
        return label
    if label_map == "binary":
        return (label > 0).astype(np.int64)
    out = np.zeros(label.shape, dtype=np.int64)
    for src, dst in label_map.items():
        out[label == src] = dst
    return out


def guess_modality(stats: Mapping[str, float]) -> tuple[str, str]:
    """CT when the intensities look like Hounsfield units: at least 1 % of the voxels at or below
    -500 (air and lung are about -1000 HU; MR magnitudes are never that negative) and a range
    inside what scanners store (-4000 to 5000, metal clipped)."""
    p01, lo, hi = stats["p01"], stats["min"], stats["max"]
    if p01 <= -500 and lo >= -4000 and hi <= 5000:
        return "CT", f"1 % of voxels at or below {p01:.0f} (air in HU), range [{lo:.0f}, {hi:.0f}]"
    return "MR", (f"no air in HU (1st percentile {p01:.0f}, range [{lo:.0f}, {hi:.0f}]): "
                  "MR or another modality without an absolute scale")


def fingerprint_case(case: Case, rng: np.random.Generator,
                     foreground_samples: int = FOREGROUND_SAMPLES,
                     image_samples: int = IMAGE_SAMPLES) -> tuple[dict[str, Any], np.ndarray]:
    """Statistics of one case, read in chunks of slices; returns them and a uniform sample of the
    intensities under its labels (rows: voxels, columns: channels)."""
    images = [nib.load(str(p), keep_file_open=True) for p in case.image]
    shapes = [_spatial_shape(img) for img in images]
    shape = shapes[0][:3]
    if any(s[:3] != shape for s in shapes):
        raise ValueError(f"case {case.id}: channel files have different shapes {shapes}")
    channels = sum(1 if len(s) == 3 else s[3] for s in shapes)
    affine = np.asarray(images[0].affine)
    voxel = [float(v) for v in nib.affines.voxel_sizes(affine)]
    ras_axis, flips = _ras_axes(affine)
    label_img = None
    if case.label is not None:
        label_img = nib.load(str(case.label), keep_file_open=True)
        if _spatial_shape(label_img)[:3] != shape:
            raise ValueError(f"case {case.id}: label shape {label_img.shape} differs from the "
                             f"image's {shape}")
    # The region: the whole volume, or the case's slab of axial (RAS z) slices.
    bounds = [(0, n) for n in shape]
    if case.slices is not None:
        axis = ras_axis.index(2)
        n = shape[axis]
        start, stop = case.slices[0], min(case.slices[1], n)
        if start >= n:
            raise ValueError(f"case {case.id}: slices {list(case.slices)} outside its {n} "
                             "axial slices")
        bounds[axis] = (n - stop, n - start) if flips[axis] else (start, stop)
    extent = [b - a for a, b in bounds]
    total = int(np.prod(extent))
    stride = max(1, total // image_samples)
    z0, z1 = bounds[2]
    per_chunk = max(1, CHUNK_VOXELS // max(1, extent[0] * extent[1] * channels))
    lo = np.full(channels, np.inf)
    hi = np.full(channels, -np.inf)
    nonzero = np.zeros(channels, dtype=np.int64)
    nonfinite = np.zeros(channels, dtype=np.int64)
    samples: list[np.ndarray] = []
    seen = 0
    fg = _Reservoir(foreground_samples, channels, rng)
    profiles: dict[int, list[np.ndarray]] = {}  # class -> voxels per slice along each voxel axis
    for c0 in range(z0, z1, per_chunk):
        index = (slice(*bounds[0]), slice(*bounds[1]), slice(c0, min(c0 + per_chunk, z1)))
        parts = []
        for img in images:
            data = _read(img.dataobj, index).astype(np.float32, copy=False)
            parts.append(data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0))
        chunk = np.concatenate(parts, axis=0)  # (C, x, y, z)
        flat = chunk.reshape(channels, -1)
        finite = np.isfinite(flat)
        nonfinite += (~finite).sum(axis=1)
        if not finite.all():
            flat = np.where(finite, flat, 0.0)
        lo = np.minimum(lo, flat.min(axis=1))
        hi = np.maximum(hi, flat.max(axis=1))
        nonzero += (flat != 0).sum(axis=1)
        first = (-seen) % stride  # systematic sample continued across chunks
        samples.append(flat[:, first::stride])
        seen += flat.shape[1]
        if label_img is None:
            continue
        raw = _read(label_img.dataobj, index)
        if np.issubdtype(raw.dtype, np.floating):
            raw = np.rint(raw)
        lab = _apply_label_map(raw.astype(np.int64), case.label_map)
        if lab.min() < 0:
            raise ValueError(f"case {case.id}: negative label values in {case.label}")
        mask = lab.reshape(-1) > 0
        fg.add(flat[:, mask].T)
        _add_profiles(profiles, lab, [b[0] for b in bounds[:2]] + [c0], shape)
    image_sample = np.concatenate(samples, axis=1)
    intensity = []
    for c in range(channels):
        values = image_sample[c]
        pct = np.percentile(values, [0.5, 1, 50, 99, 99.5]) if values.size else [0.0] * 5
        stats = {"min": float(lo[c]), "max": float(hi[c]), "p00_5": float(pct[0]),
                 "p01": float(pct[1]), "p50": float(pct[2]), "p99": float(pct[3]),
                 "p99_5": float(pct[4]), "mean": float(values.mean()) if values.size else 0.0,
                 "std": float(values.std()) if values.size else 0.0,
                 "nonzero_fraction": float(nonzero[c] / max(total, 1)),
                 "nonfinite_voxels": int(nonfinite[c])}
        stats["modality"], stats["modality_why"] = guess_modality(stats)
        intensity.append(stats)
    # Everything from here on is on the RAS grid.
    spacing_ras, shape_ras, region_ras = [0.0] * 3, [0] * 3, [0] * 3
    for a in range(3):
        spacing_ras[ras_axis[a]] = voxel[a]
        shape_ras[ras_axis[a]] = shape[a]
        region_ras[ras_axis[a]] = extent[a]
    voxel_ml = float(np.prod(voxel)) / 1000.0
    classes: dict[str, Any] = {}
    for cls, per_axis in sorted(profiles.items()):
        ras: list[np.ndarray] = [np.zeros(0)] * 3
        for a in range(3):
            counts = per_axis[a][bounds[a][0]:bounds[a][1]]
            ras[ras_axis[a]] = counts[::-1] if flips[a] else counts
        n = int(ras[0].sum())
        where = [np.flatnonzero(r) for r in ras]
        # Where the class sits along x, as a share of the image width (0.5: centred): in RAS the
        # region starts at the same x as the full image (slabs only cut z).
        centre_x = float((np.arange(len(ras[0])) + 0.5) @ ras[0] / max(n, 1) / len(ras[0]))
        classes[str(cls)] = {
            "voxels": n, "volume_ml": round(n * voxel_ml, 3),
            "slices": [int(len(w)) for w in where],
            "extent": [[int(w[0]), int(w[-1]) + 1] if len(w) else None for w in where],
            "centre_x": round(centre_x, 4),
        }
    any_fg = [np.zeros(region_ras[r], dtype=bool) for r in range(3)]
    for cls in profiles:
        for a in range(3):
            counts = profiles[cls][a][bounds[a][0]:bounds[a][1]]
            any_fg[ras_axis[a]] |= (counts[::-1] if flips[a] else counts) > 0
    record = {
        "id": case.id, "image": [str(p) for p in case.image],
        "label": None if case.label is None else str(case.label), "role": case.role,
        "group": case.split_group, "slices": None if case.slices is None else list(case.slices),
        "orientation": "".join(nib.aff2axcodes(affine)), "channels": channels,
        "spacing": [round(s, 5) for s in spacing_ras], "shape": shape_ras, "region": region_ras,
        "intensity": intensity, "labelled": case.label is not None,
        "classes": classes, "foreground_voxels": int(sum(c["voxels"] for c in classes.values())),
        "foreground_slices": [int(f.sum()) for f in any_fg],
        "voxel_ml": voxel_ml,
    }
    for img in [*images, label_img]:
        if img is not None:
            img.uncache()
    return record, fg.values


def _add_profiles(profiles: dict[int, list[np.ndarray]], lab: np.ndarray,
                  offset: Sequence[int], shape: Sequence[int]) -> None:
    """Add the chunk's voxels per class and slice along each voxel axis (one bincount per axis
    over class x position; class ids compacted when they are large)."""
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if not ids.size:
        return
    if ids[-1] < 4096:
        index, table = lab, np.arange(int(ids[-1]) + 1)
    else:
        table, index = np.unique(lab, return_inverse=True)
        index = index.reshape(lab.shape)
    n_ids = len(table)
    for a in range(3):
        n = lab.shape[a]
        pos = np.arange(n).reshape([-1 if i == a else 1 for i in range(3)])
        counts = np.bincount((index * n + pos).reshape(-1), minlength=n_ids * n).reshape(n_ids, n)
        for i in np.flatnonzero(counts.sum(axis=1)):
            cls = int(table[i])
            if cls == 0:
                continue
            if cls not in profiles:
                profiles[cls] = [np.zeros(s, dtype=np.int64) for s in shape]
            profiles[cls][a][offset[a]:offset[a] + n] += counts[i]


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max()),
            "p10": float(np.percentile(arr, 10)), "p90": float(np.percentile(arr, 90))}


def _class_names_from(source: Path) -> list[str] | None:
    """Class names from an MSD/nnU-Net dataset.json ("labels": {"0": "background", ...} or
    nnU-Net v2's {"background": 0, ...})."""
    path = source / "dataset.json" if source.is_dir() else source
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        if all(str(k).isdigit() for k in labels):
            by_id = {int(k): str(v) for k, v in labels.items()}
        else:
            by_id = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError):
        return None
    if sorted(by_id) != list(range(len(by_id))):
        return None
    return [by_id[i] for i in range(len(by_id))]


def fingerprint_dataset(source: str | Path, layout: str = "auto", label_map: Any = None,
                        seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Read every case once and summarise the data set (see the module docstring)."""
    t0 = time.perf_counter()
    cases = discover_cases(source, layout, label_map=label_map)
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    fg_samples: list[np.ndarray] = []
    for i, case in enumerate(cases):
        if progress:
            print(f"  reading {i + 1}/{len(cases)}: {case.id}", file=sys.stderr, flush=True)
        record, fg = fingerprint_case(case, rng)
        records.append(record)
        if len(fg):
            fg_samples.append(fg)
    return summarise(records, fg_samples, str(source), layout,
                     _class_names_from(Path(source)), time.perf_counter() - t0)


def summarise(records: list[dict[str, Any]], fg_samples: list[np.ndarray], source: str,
              layout: str, class_names: list[str] | None, seconds: float) -> dict[str, Any]:
    """The data set's fingerprint from its cases' records."""
    labelled = [r for r in records if r["labelled"]]
    basis = labelled or records  # the task is defined by the labelled cases
    channels = sorted({r["channels"] for r in records})
    if len(channels) != 1:
        raise ValueError(f"cases have different channel counts {channels}: every case needs the "
                         "same image channels")
    n_channels = channels[0]
    spacing = {"median": [], "min": [], "max": [], "p10": [], "p90": []}
    for axis in range(3):
        s = _stats([r["spacing"][axis] for r in basis])
        for k in spacing:
            spacing[k].append(round(s[k], 5))
    median = spacing["median"]
    coarse = int(np.argmax(median))
    fine = float(min(median))
    anisotropy = float(median[coarse] / fine) if fine > 0 else 1.0
    region = {k: [float(_stats([r["region"][a] for r in basis])[k]) for a in range(3)]
              for k in ("median", "min", "max")}
    shape = {k: [float(_stats([r["shape"][a] for r in basis])[k]) for a in range(3)]
             for k in ("median", "min", "max")}
    # Modality, per channel: the labelled cases' guesses.
    modality = []
    for c in range(n_channels):
        guesses = [r["intensity"][c]["modality"] for r in basis]
        kinds = sorted(set(guesses))
        modality.append({"guess": kinds[0] if len(kinds) == 1 else "mixed",
                         "cases": {k: guesses.count(k) for k in kinds},
                         "why": basis[0]["intensity"][c]["modality_why"] if len(kinds) == 1
                         else "cases disagree: " + ", ".join(
                             f"{r['id']} {r['intensity'][c]['modality']}" for r in basis)})
    pooled = (np.concatenate(fg_samples, axis=0) if fg_samples
              else np.zeros((0, n_channels), dtype=np.float32))
    foreground = []
    for c in range(n_channels):
        v = pooled[:, c].astype(np.float64)
        if v.size:
            p = np.percentile(v, [0.5, 50, 99.5])
            foreground.append({"samples": int(v.size), "p00_5": float(p[0]),
                               "median": float(p[1]), "p99_5": float(p[2]),
                               "mean": float(v.mean()), "std": float(v.std())})
        else:
            foreground.append({"samples": 0})
    # Classes over the labelled cases.
    ids = sorted({int(k) for r in labelled for k in r["classes"]})
    classes: dict[str, Any] = {}
    label_files = len({r["label"] for r in labelled})
    total_region = sum(int(np.prod(r["region"])) for r in labelled)
    for cls in ids:
        present = [r for r in labelled if str(cls) in r["classes"]]
        vox = [r["classes"][str(cls)]["voxels"] for r in present]
        ml = [r["classes"][str(cls)]["volume_ml"] for r in present]
        centres = [r["classes"][str(cls)]["centre_x"] for r in present]
        slice_share = [sum(r["classes"][str(cls)]["slices"][a] for r in present)
                       / max(1, sum(r["region"][a] for r in labelled)) for a in range(3)]
        classes[str(cls)] = {
            "cases": len(present), "label_files": len({r["label"] for r in present}),
            "voxels_total": int(sum(vox)), "voxels_median": float(np.median(vox)),
            "volume_ml_median": float(np.median(ml)),
            "share_of_labelled_voxels": float(sum(vox) / max(total_region, 1)),
            "slice_share": [round(s, 4) for s in slice_share],
            "centre_x_median": float(np.median(centres)),
            "centre_x_range": [float(min(centres)), float(max(centres))],
        }
    fg_slices = [sum(r["foreground_slices"][a] for r in labelled)
                 / max(1, sum(r["region"][a] for r in labelled)) for a in range(3)]
    roles = {role: sum(1 for r in records if r["role"] == role)
             for role in ("labelled", "unlabelled", "val")}
    free_groups = sorted({r["group"] for r in records if r["role"] is None and r["labelled"]})
    return {
        "source": source, "layout": layout, "seconds": round(seconds, 2),
        "n_cases": len(records), "n_labelled": len(labelled),
        "n_unlabelled": len(records) - len(labelled),
        "n_label_files": label_files, "roles": roles, "labelled_groups": len(free_groups),
        "channels": n_channels,
        "spacing": spacing, "anisotropy": {"ratio": round(anisotropy, 3), "coarse_axis": coarse},
        "shape": shape, "region": region,
        "modality": modality, "foreground_intensity": foreground,
        "nonzero_fraction_median": [float(np.median([r["intensity"][c]["nonzero_fraction"]
                                                     for r in basis]))
                                    for c in range(n_channels)],
        "classes": classes, "foreground_slice_share": [round(f, 4) for f in fg_slices],
        "class_names": class_names,
        "cases": records,
    }


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


def describe_device(preference: str = "auto") -> dict[str, Any]:
    """What the plan fits: a CUDA device's memory, or the CPU (time, not memory, binds there)."""
    try:
        import torch
    except ImportError:  # `sfpc plan` on an install without torch plans for a CPU
        return {"kind": "cpu", "name": "cpu", "threads": os.cpu_count() or 1}
    if preference in ("auto", "cuda") or preference.startswith("cuda:"):
        if torch.cuda.is_available():
            index = int(preference.split(":")[1]) if ":" in preference else 0
            props = torch.cuda.get_device_properties(index)
            return {"kind": "cuda", "name": props.name, "memory_bytes": int(props.total_memory)}
    return {"kind": "cpu", "name": "cpu", "threads": torch.get_num_threads()}


def activation_bytes(spatial_dims: int, patch: Sequence[int], channels: Sequence[int],
                     batch: int, method: str, m: int = 4) -> float:
    """Estimated memory a training step keeps for the backward pass: per stage, the conv and
    norm outputs of the encoder block (4 maps of C channels) and of each decoder block (up,
    concatenation, conv and norm outputs: about 7 maps), SFPC's M perturbed feature maps, float32,
    plus half again for the allocator. An estimate, on the safe side."""
    voxels = float(np.prod(patch))
    decoders = 2 if method in ("sfpc", "seg+rec", "seg+rec+flpm", "mcnet") else 1
    floats = 0.0
    for level, c in enumerate(channels):
        at = voxels / 2 ** (spatial_dims * level)
        floats += 4 * c * at
        if level < len(channels) - 1:
            floats += 7 * c * at * decoders
    floats += 2 * m * channels[0] * voxels
    return floats * 4 * batch * 1.5


@dataclass
class Plan:
    """TrainConfig values with the reason for each, the notes a user should read, the device."""

    values: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    given: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)

    def set(self, name: str, value: Any, why: str) -> Any:
        """Plan ``name`` unless the user gave it; return the value in force."""
        if name in self.given:
            self.values[name] = self.given[name]
            self.why[name] = "given (flag or --config)"
            return self.given[name]
        self.values[name] = value
        self.why[name] = why
        return value

    def get(self, name: str) -> Any:
        if name in self.given:
            return self.given[name]
        if name in self.values:
            return self.values[name]
        return getattr(TrainConfig(), name)

    def config_fields(self) -> dict[str, Any]:
        """The fields to build a TrainConfig from: the planned ones, then the given ones."""
        return {**self.values, **self.given}

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device,
                "config": {k: {"value": self.values[k], "why": self.why[k]} for k in self.values},
                "given": self.given, "notes": self.notes}


def _round_up(n: float, multiple: int) -> int:
    return max(2 * multiple, int(math.ceil(n / multiple)) * multiple)


def _step_cost(spatial_dims: int, patch: Sequence[int], batch: int) -> float:
    return batch * float(np.prod(patch)) * (3.0 if spatial_dims == 3 else 1.0)


def _fit_patch(target: list[int], multiple: int, fits: Any) -> list[int]:
    """nnU-Net's way: start at the median image, shrink the longest axis until it fits."""
    patch = list(target)
    while not fits(patch) and max(patch) > 2 * multiple:
        axis = int(np.argmax(patch))
        patch[axis] -= multiple
    return patch


def make_plan(fp: Mapping[str, Any], given: Mapping[str, Any] | None = None,
              device: Mapping[str, Any] | None = None) -> Plan:
    """The configuration for the data set ``fp`` (a fingerprint) on ``device``; values in
    ``given`` (what a user typed) are kept and the others planned around them."""
    plan = Plan(given=dict(given or {}), device=dict(device or {"kind": "cpu"}))
    gpu = plan.device.get("kind") == "cuda"
    channels = list(plan.get("channels"))
    multiple = 2 ** (len(channels) - 1)
    spacing_med = list(fp["spacing"]["median"])
    coarse = int(fp["anisotropy"]["coarse_axis"])
    anisotropy = float(fp["anisotropy"]["ratio"])
    labelled_cases = [r for r in fp["cases"] if r["labelled"]]
    region_med = list(fp["region"]["median"])

    # -- split and method ---------------------------------------------------------------------
    groups = int(fp["labelled_groups"])
    roles = fp["roles"]
    plan.set("labelled_fraction", None,
             "every labelled training case is used with its label (labels are what is scarce; "
             "--labelled-fraction or --labelled-count hold some back, as the paper's protocol)")
    if groups == 0:
        plan.set("val_count", None, f"the cases' roles fix the split ({roles['val']} validation "
                                    f"cases)")
        plan.set("val_fraction", None, "the cases' roles fix the split")
    elif groups >= 10:
        plan.set("val_fraction", 0.2, f"{groups} labelled cases: a fifth is held out to choose "
                                      "best.pt, as nnU-Net's 5-fold split")
    elif groups >= 3:
        plan.set("val_count", 1, f"{groups} labelled cases: one is held out to choose best.pt, "
                                 "the others train")
        plan.set("val_fraction", None, "--val-count is used")
    else:
        plan.set("val_count", 0, f"only {groups} labelled case(s): every one is needed for "
                                 "training, so there is no validation and last.pt is the result")
        plan.set("val_fraction", None, "--val-count is used")
    lab_frac, lab_count = plan.get("labelled_fraction"), plan.get("labelled_count")
    holds_back = (lab_frac is not None and lab_frac < 1) or lab_count is not None
    has_unlabelled = fp["n_unlabelled"] > 0 or holds_back
    if has_unlabelled:
        plan.set("method", "sfpc", f"{fp['n_unlabelled']} images without labels: SFPC learns "
                                   "from them (the paper's method)")
    else:
        plan.set("method", "supervised", "no image without a label: nothing for a "
                                         "semi-supervised method to use")
    method = plan.get("method")

    # -- 2D or 3D, and the plane -------------------------------------------------------------
    thin_axis = int(np.argmin(region_med)) if labelled_cases else 2
    thin = labelled_cases and min(
        statistics.median(r["region"][a] for r in labelled_cases) for a in range(3)
    ) < MIN_3D_SLICES
    if anisotropy >= ANISOTROPY_2D:
        dims_why = (f"anisotropic voxels: {spacing_med[coarse]:.2g} mm along "
                    f"{AXIS_NAMES[coarse]} against {min(spacing_med):.2g} mm in-plane "
                    f"(ratio {anisotropy:.1f} >= {ANISOTROPY_2D:g}, nnU-Net's rule): 2D slices "
                    "see the full resolution")
        dims, plane = 2, PLANE_OF_AXIS[coarse]
        thin = False
    elif thin:
        dims_why = (f"the labelled cases are thin slabs (median {region_med[thin_axis]:.0f} "
                    f"slices along {AXIS_NAMES[thin_axis]}): a 3D patch needs at least "
                    f"{MIN_3D_SLICES}")
        dims, plane = 2, PLANE_OF_AXIS[thin_axis]
    elif not gpu:
        dims_why = ("near-isotropic data would take a 3D network (nnU-Net), but this is a CPU: a "
                    "3D step costs several times a 2D one, so 2D slices (--spatial-dims 3 to "
                    "insist)")
        dims, plane = 2, "axial"
    else:
        dims_why = (f"near-isotropic voxels (anisotropy {anisotropy:.1f} < {ANISOTROPY_2D:g}) and "
                    "volumes deep enough for 3D patches, on a GPU: a 3D network (nnU-Net's "
                    "3d_fullres)")
        dims, plane = 3, "axial"
    spacing_given = plan.given.get("spacing")
    if "spatial_dims" not in plan.given and spacing_given is not None and len(
            spacing_given) == 2:
        dims, dims_why = 2, "a two-value --spacing is a 2D model's in-plane spacing"
    dims = plan.set("spatial_dims", dims, dims_why)
    if dims == 2:
        plane_why = ("slices across the thin axis of the labelled slabs" if thin else
                     "slices across the low-resolution axis" if anisotropy >= ANISOTROPY_2D
                     else "axial slices, the usual reading plane")
        plane = plan.set("plane", plane, plane_why)
    plane_axis = PLANES[plane] if dims == 2 else None
    model_axes = [a for a in range(3) if a != plane_axis]

    # -- target spacing ------------------------------------------------------------------------
    if dims == 2:
        target: list[float | None] = [None, None, None]
        for a in model_axes:
            target[a] = spacing_med[a]
        in_plane = ", ".join(f"{spacing_med[a]:.3g}" for a in model_axes)
        why = (f"the median in-plane spacing of the labelled cases ({in_plane} mm); slices keep "
               "their thickness")
    else:
        target = list(spacing_med)
        why = "the median spacing of the labelled cases (nnU-Net)"
        if anisotropy >= ANISOTROPY_2D:
            # nnU-Net: the low-resolution axis takes its 10th percentile, finer than the median.
            target[coarse] = fp["spacing"]["p10"][coarse]
            why += f"; the coarse axis at its 10th percentile ({target[coarse]:.3g} mm)"
    spread = [fp["spacing"]["max"][a] / max(fp["spacing"]["min"][a], 1e-6) for a in model_axes]
    if max(spread) > 2:
        plan.notes.append(f"spacings vary more than 2x between cases ({fp['spacing']['min']} to "
                          f"{fp['spacing']['max']} mm); every case is resampled to the plan's "
                          "spacing")
    target = [None if t is None else round(float(t), 4) for t in target]
    if plan.given.get("input_mode") == "resize":
        target, why = None, "--input-mode resize scales each whole slice to the patch instead"
    target = plan.set("spacing", target, why)
    plan.set("input_mode", "spacing", "resample to a fixed spacing so that a millimetre is the "
                                      "same number of voxels in every case")

    # -- patch and batch -----------------------------------------------------------------------
    spacing_now = [None] * 3 if target is None else list(target)
    median_at_target = []
    for a in model_axes:
        t = spacing_now[a] if spacing_now[a] else spacing_med[a]
        median_at_target.append(region_med[a] * spacing_med[a] / t)
    want = [_round_up(n, multiple) for n in median_at_target]

    def budget_for(patch: Sequence[int], batch: int) -> bool:
        if gpu:
            need = activation_bytes(dims, patch, channels, batch, method, plan.get("m"))
            return need <= GPU_MEMORY_SHARE * plan.device["memory_bytes"]
        return _step_cost(dims, patch, batch) <= CPU_STEP_BUDGET

    per_side = 4
    unlabelled_batch = 0 if method == "supervised" else 1
    patch = want
    for per_side in (plan.given["batch_labelled"],) if "batch_labelled" in plan.given else (4, 2):
        total = per_side * (1 + unlabelled_batch)
        patch = _fit_patch(want, multiple, lambda p, n=total: budget_for(p, n))
        if budget_for(patch, total):
            break
    budget_words = (f"{GPU_MEMORY_SHARE:.0%} of the GPU's "
                    f"{plan.device.get('memory_bytes', 0) / 2**30:.0f} GiB for activations"
                    if gpu else "a CPU step of about the work of a 4 + 4 batch of 128^2 slices "
                                "(1-2 s per SFPC step on one core)")
    shrunk = patch != want
    patch = plan.set("patch_size", patch,
                     f"the median labelled image at the plan's spacing ("
                     f"{' x '.join(f'{n:.0f}' for n in median_at_target)} voxels) rounded up to "
                     f"multiples of {multiple}" + (f", shrunk to fit {budget_words}" if shrunk
                                                   else f"; fits {budget_words}"))
    plan.set("batch_labelled", per_side, "the paper's 4 + 4" if per_side == 4 else
             f"2 + 2: 4 + 4 does not fit {budget_words}")
    if method != "supervised":
        plan.set("batch_unlabelled", per_side, "as many unlabelled as labelled patches (the "
                                               "paper)")
    covers = all(p >= n for p, n in zip(patch, median_at_target, strict=True))

    # -- intensities ---------------------------------------------------------------------------
    modality = [m["guess"] for m in fp["modality"]]
    fg = fp["foreground_intensity"]
    nonzero = fp["nonzero_fraction_median"]
    if all(m == "CT" for m in modality) and all(f.get("samples") for f in fg) and len(fg) == 1:
        f0 = fg[0]
        lo, hi = float(f0["p00_5"]), float(f0["p99_5"])
        why = (f"CT ({fp['modality'][0]['why']}): clip to the 0.5-99.5 percentiles of the "
               f"labelled voxels ({lo:.0f} to {hi:.0f} HU, {f0['samples']} samples)")
        if plan.get("ct_window_rule") == "soft-tissue" and hi - lo < CT_MIN_WINDOW:
            # Measured on the organ task (docs/benchmarks.md): the organs' own percentiles
            # (-281..77 HU) clip everything brighter than the organs - vessels, kidneys, bone -
            # to one value, and the model loses the edges it must find (mean Dice 0.66 against
            # 0.82 with a [-250, 350] window, same grid and schedule).
            centre = float(f0["median"])
            lo = min(lo, centre - CT_MIN_WINDOW / 2)
            hi = max(hi, centre + CT_MIN_WINDOW / 2)
            why += (f", widened to a {CT_MIN_WINDOW:.0f} HU soft-tissue window around their "
                    f"median {centre:.0f} HU ({lo:.0f} to {hi:.0f} HU) so the tissue around "
                    "the structures keeps its contrast (--ct-window-rule foreground: "
                    "the percentiles alone)")
        else:
            why += ", as nnU-Net"
        norm = {"kind": "ct_window", "window": [round(lo, 1), round(hi, 1)],
                "mean": round(f0["mean"], 2), "std": round(max(f0["std"], 1e-3), 2)}
        why += "; then z-score with the labelled voxels' mean and std"
    else:
        which = "nonzero" if min(nonzero) < 0.75 else "all"
        kind = "mixed CT and MR" if "mixed" in modality else (
            "MR or another modality" if all(m == "MR" for m in modality) else "multi-channel")
        norm = {"kind": "zscore", "foreground": which}
        why = (f"{kind}: z-score each image " + (
            "over its non-zero voxels (a zero background fills "
            f"{1 - min(nonzero):.0%} of the images), as nnU-Net" if which == "nonzero" else
            f"over all its voxels (the background is not zero: {min(nonzero):.0%} of voxels "
            "non-zero), as nnU-Net"))
        if "mixed" in modality:
            why += "; a HU window would be meaningless for the MR cases"
            plan.notes.append("the labelled cases mix CT and MR in one channel ("
                              + fp["modality"][0]["why"] + "); one model for both is unusual: "
                              "consider one data set per modality")
    plan.set("normalisation", norm, why)

    # -- sampling and augmentation -------------------------------------------------------------
    classes = fp["classes"]
    if classes:
        smallest = min(classes.items(), key=lambda kv: kv[1]["voxels_median"])
        patch_vox = float(np.prod(patch))
        # voxels of the smallest class at the plan's grid, per 2D slice or 3D case
        scale = float(np.prod([spacing_med[a] / (spacing_now[a] or spacing_med[a])
                               for a in model_axes]))
        if dims == 2:
            per = smallest[1]["voxels_median"] * scale / max(
                1, np.median([r["classes"].get(smallest[0], {}).get("slices", [1, 1, 1])
                              [plane_axis] for r in labelled_cases
                              if smallest[0] in r["classes"]]))
        else:
            per = smallest[1]["voxels_median"] * scale
        share = per / patch_vox
        if covers:
            ff, ff_why = 0.33, ("nnU-Net's 33 % of patches forced onto foreground (the patch "
                                "holds the median image, so centring matters little)")
        elif share < 0.01:
            ff, ff_why = 0.5, (f"class {smallest[0]} fills {share:.2%} of a patch: half of the "
                               "labelled patches are centred on foreground, or most would "
                               "miss it")
        else:
            ff, ff_why = 0.33, "nnU-Net's 33 % of patches forced onto foreground"
        plan.set("foreground_fraction", ff, ff_why)
    aug: dict[str, Any] = {}
    augment_why = []
    sides = {k: c["centre_x_median"] - 0.5 for k, c in classes.items()}
    consistent = {k: s for k, s in sides.items() if abs(s) >= 0.1 and (
        np.sign(classes[k]["centre_x_range"][0] - 0.5) == np.sign(
            classes[k]["centre_x_range"][1] - 0.5))}
    left = [k for k, s in consistent.items() if s < 0]
    right = [k for k, s in consistent.items() if s > 0]
    lateral = bool(left and right) or any(classes[k]["label_files"] >= 5 for k in consistent)
    if lateral:
        aug["flip"] = False
        shown = sorted(consistent, key=int)
        augment_why.append(
            f"no mirroring: {len(shown)} class(es) sit on fixed sides of the body (" + ", ".join(
                f"{k} at {classes[k]['centre_x_median']:.2f} of the width" for k in shown[:6])
            + (", ..." if len(shown) > 6 else "") + "); a mirrored image would teach the model "
            "to swap them")
    else:
        aug["flip"] = True
        augment_why.append("mirroring on (no class sits on a fixed side)")
    if dims == 2:
        aug.update(rotation=15.0, scale=[0.85, 1.15])
        augment_why.append("rotation +-15 deg and scaling 0.85-1.15 (nnU-Net's spatial "
                           "augmentation, milder for small data)")
        share = fp["foreground_slice_share"][plane_axis] if classes else 1.0
        if 0 < share < 1 / 3:
            aug["empty_slice_prob"] = round(share / (1 - share), 4)
            augment_why.append(f"only {share:.0%} of the labelled slices show foreground: slices "
                               "without it are drawn less often, so that half of the draws "
                               "have foreground")
    else:
        aug["rotate90"] = not lateral
        augment_why.append("quarter turns in-plane " + ("off (they would move sides)"
                                                       if lateral else "on"))
    aug["intensity"] = dict(INTENSITY_AUGMENT)
    augment_why.append("brightness, contrast and gamma jitter on 30 % of patches (nnU-Net's "
                       "intensity augmentation)")
    plan.set("augment", aug, "; ".join(augment_why))

    # -- schedule ------------------------------------------------------------------------------
    if gpu:
        iters = plan.set("iterations", PAPER_ITERATIONS, "the paper's 6000 on a GPU")
    else:
        iters = plan.set("iterations", CPU_ITERATIONS,
                         "1500 on a CPU: the shipped organ model's schedule, which converged "
                         "(the paper's 6000 would take hours)")
    plan.set("lr_step", max(1, round(iters * 2500 / PAPER_ITERATIONS)),
             "the paper's step at 2500 of 6000 iterations, scaled to the run")
    plan.set("val_every", max(1, min(200, iters // 10)),
             "ten validations per run, at most every 200 iterations")
    if fp.get("class_names") and len(fp["class_names"]) >= 2:
        plan.set("class_names", fp["class_names"], "the data set's dataset.json labels")

    # -- what a user should know ---------------------------------------------------------------
    ids = [int(k) for k in classes]
    if ids and max(ids) > 20:
        plan.notes.append(f"labels go up to {max(ids)} ({len(ids)} classes present): the model "
                          f"gets {max(ids) + 1} outputs; --label-map keeps only the structures "
                          "you want")
    rare = [k for k, c in classes.items() if c["label_files"] == 1 < fp["n_label_files"]]
    if rare:
        plan.notes.append(f"{len(rare)} class(es) appear in one labelled image only ("
                          + ", ".join(rare[:10]) + (", ..." if len(rare) > 10 else "")
                          + "): a model learns little about them")
    if not labelled_cases:
        plan.notes.append("no case has a label: nothing to train on")
    if plan.given.get("spatial_dims") == 3 and not gpu:
        plan.notes.append("3D on a CPU: expect steps of many seconds")
    return plan


def plan_from_init(init: str) -> tuple[dict[str, Any], str]:
    """The fields a model to fine-tune fixes (its weights expect this grid and these
    intensities) and a description of it."""
    path = Path(init)
    if path.is_dir():
        from sfpc.inference.contract import ModelMetadata

        meta = ModelMetadata.load(path).to_dict()
    else:
        import torch

        meta = torch.load(path, map_location="cpu", weights_only=False).get("metadata") or {}
        if not meta:
            raise ValueError(f"{init}: no model metadata in this checkpoint")
    net = meta.get("net") or {}
    # A 2.5D model's weights take its neighbour slices as channels, at the slice spacing its
    # ``spacing`` fixes: both must come along, or the network built for fine-tuning would take
    # one slice. Metadata before the field: a plain 2D model.
    context = int(meta.get("context_slices") or 0)
    fields = {"spatial_dims": meta["spatial_dims"], "plane": meta["plane"],
              "spacing": meta["spacing"], "input_mode": meta["input_mode"],
              "context_slices": context,
              # Fine-tuning keeps the grid the model learnt on (metadata before the field:
              # linear).
              "resampling": meta.get("resampling", "linear"),
              "patch_size": list(meta["patch_size"]), "normalisation": meta["normalisation"],
              "class_names": list(meta["class_names"])}
    if net.get("channels"):
        fields["channels"] = list(net["channels"])
        if net.get("encoder_dropout"):
            fields["encoder_dropout"] = list(net["encoder_dropout"])
    return fields, f"{meta.get('name', 'model')} ({init})"


def apply_init(plan: Plan, init_fields: Mapping[str, Any], what: str) -> None:
    """Fine-tuning: the initial model's grid, intensities and network win over the data's plan
    (flags a user typed still win, with a warning when they contradict the weights)."""
    for name, value in init_fields.items():
        if name in plan.given:
            if plan.given[name] != value:
                plan.notes.append(f"--{name.replace('_', '-')} {plan.given[name]!r} differs from "
                                  f"the initial model's {value!r}: its weights expect the latter")
            continue
        plan.values[name] = value
        plan.why[name] = f"from the model being fine-tuned, {what}: its weights expect it"
    plan.set("lr", round(TrainConfig().lr / 10, 6),
             "fine-tuning: a tenth of the paper's rate, so that a few cases refine the model "
             "rather than overwrite it")


def write_plan(path: str | Path, fingerprint: Mapping[str, Any], plan: Plan) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"plan": plan.to_dict(), "fingerprint": fingerprint},
                                     indent=1, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def summary_lines(fp: Mapping[str, Any], plan: Plan) -> list[str]:
    """What `sfpc plan` and `sfpc train` print: the data in a few lines, then every planned
    value with its reason."""
    sp = fp["spacing"]["median"]
    lines = [
        f"data: {fp['n_cases']} cases ({fp['n_labelled']} labelled, {fp['n_unlabelled']} "
        f"without labels), read in {fp['seconds']:.1f} s",
        f"  spacing median {' x '.join(f'{s:.3g}' for s in sp)} mm (anisotropy "
        f"{fp['anisotropy']['ratio']:.1f}), labelled region median "
        f"{' x '.join(f'{n:.0f}' for n in fp['region']['median'])} voxels",
        "  modality: " + ", ".join(f"{m['guess']} ({m['cases']})" for m in fp["modality"]),
    ]
    if fp["classes"]:
        lines.append("  classes: " + ", ".join(
            f"{k}: {c['volume_ml_median']:.3g} ml in {c['cases']} case(s)"
            for k, c in list(fp["classes"].items())[:12])
            + (" ..." if len(fp["classes"]) > 12 else ""))
    lines.append(f"plan for {plan.device.get('kind', 'cpu')} ({plan.device.get('name', '')}):")
    for name, value in plan.values.items():
        lines.append(f"  {name} = {json.dumps(value)}")
        lines.append(f"      {plan.why[name]}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return lines


def plan_for(source: str, given: Mapping[str, Any], device_preference: str = "auto",
             progress: bool = True) -> tuple[dict[str, Any], Plan]:
    """Fingerprint ``source`` and plan around ``given``; with ``init`` in ``given`` the initial
    model's grid wins over the data's."""
    fp = fingerprint_dataset(source, given.get("layout", "auto"), given.get("label_map"),
                             progress=progress)
    device = describe_device(device_preference)
    plan = make_plan(fp, given, device)
    if given.get("init"):
        init_fields, what = plan_from_init(str(given["init"]))
        apply_init(plan, init_fields, what)
    return fp, plan


def main(argv: Sequence[str] | None = None) -> int:
    """`sfpc plan --data DIR [--out plan.json] [any sfpc train flag to fix]`."""
    from sfpc.training.config import add_config_arguments, checked_values

    p = argparse.ArgumentParser(
        prog="sfpc plan",
        usage="sfpc plan --data DATA [--plan-out plan.json] [any sfpc train option]",
        description="Read a data set once and write the training configuration sfpc train "
                    "would use (plan.json: the data's fingerprint, and every planned value with "
                    "the reason for it). Any sfpc train flag fixes that value.")
    p.add_argument("--plan-out", default="plan.json", help="where to write the plan "
                                                           "(default plan.json)")
    p.add_argument("--quiet", action="store_true", help="print only the plan file's path")
    add_config_arguments(p, planned=True)
    ns = p.parse_args(list(argv) if argv is not None else None)
    given = checked_values(p, ns)
    try:
        fp, plan = plan_for(given["data"], given, given.get("device", "auto"),
                            progress=not ns.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"sfpc plan: error: {e}", file=sys.stderr)
        return 2
    write_plan(ns.plan_out, fp, plan)
    if not ns.quiet:
        print("\n".join(summary_lines(fp, plan)))
    print(f"plan written to {ns.plan_out}")
    return 0
