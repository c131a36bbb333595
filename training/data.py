"""Training data: splits by case, preprocessing into memory, 3D patch and 2D slice sampling with
augmentation, and the two-stream (labelled + unlabelled) batch loader.

Pipeline: ``discover_cases`` (training/layouts.py) -> ``make_split`` / ``load_or_make_split`` ->
``load_volumes`` (RAS, optional spacing, normalisation: sfpc/inference/preprocess.py, the same
code the server runs) -> ``PatchDataset3D`` or ``SliceDataset2D`` -> ``TwoStreamLoader``;
evaluation reads whole volumes with ``load_eval_cases``.

Randomness: samplers draw from an explicit ``numpy.random.Generator``. ``TwoStreamLoader`` seeds
one per batch from ``(seed, DDP rank, batch index)``, so its stream does not depend on the number
of workers and a resumed run continues it exactly; a sampler iterated on its own seeds from
``(seed, rank, worker id)``. Nothing here touches the global RNGs.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sfpc.inference.preprocess import (
    Geometry,
    prepare_image,
    prepare_label,
    resample_to_shape,
    spacing_from_affine,
)
from sfpc.io.files import write_atomic
from sfpc.training.enhancement import ContrastEnhance, group_tissues
from sfpc.training.layouts import (
    LAYOUTS,
    Case,
    LabelMap,
    detect_layout,
    discover_cases,
    parse_label_map,
)

__all__ = [
    "LAYOUTS",
    "Case",
    "IntensityAugment",
    "PatchDataset3D",
    "SliceDataset2D",
    "Split",
    "TwoStreamLoader",
    "Volume",
    "apply_label_map",
    "augment_2d",
    "detect_layout",
    "discover_cases",
    "load_eval_cases",
    "load_or_make_split",
    "load_volume",
    "load_volumes",
    "make_split",
    "make_split_params",
    "read_image",
    "read_label",
    "rotate_scale_2d",
    "stream_rng",
]

PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # axis of a RAS volume each plane is normal to

# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Cases for supervised training, the unlabelled pool, and validation."""

    labelled: list[Case]
    unlabelled: list[Case]
    val: list[Case]
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self, path: str | Path) -> None:
        data = {
            "params": self.params,
            "labelled": [c.to_dict() for c in self.labelled],
            "unlabelled": [c.to_dict() for c in self.unlabelled],
            "val": [c.to_dict() for c in self.val],
        }
        # Atomically: another DDP rank, or a resumed run, that finds the file must never read it
        # half-written (a truncated split.json failed a two-rank run).
        write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())

    @classmethod
    def from_json(cls, path: str | Path) -> Split:
        data = json.loads(Path(path).read_text())
        return cls(
            labelled=[Case.from_dict(c) for c in data["labelled"]],
            unlabelled=[Case.from_dict(c) for c in data["unlabelled"]],
            val=[Case.from_dict(c) for c in data["val"]],
            params=dict(data.get("params", {})),
        )


def make_split(
    cases: Sequence[Case],
    labelled_fraction: float | None = None,
    labelled_count: int | None = None,
    val_fraction: float | None = None,
    val_count: int | None = None,
    seed: int = 0,
) -> Split:
    """Split cases (never slices) into labelled / unlabelled / validation parts.

    Cases with a ``role`` go where their role says. The others are drawn by ``group`` (a patient
    whose two frames are two cases stays on one side): one seeded permutation of the groups that
    have labels gives the validation groups first, then the labelled ones; the remaining labelled
    groups join the unlabelled pool with their labels unused, as do cases without a label. Counts
    are in groups; fractions round to the nearest count (at least 1 when the fraction is > 0);
    ``labelled_fraction`` is a fraction of the training (non-validation) groups; with neither
    labelled option every training group is labelled. The same seed gives nested labelled sets
    as the fraction grows, and the same validation set whatever the labelled fraction.
    """
    if labelled_fraction is not None and labelled_count is not None:
        raise ValueError("give labelled_fraction or labelled_count, not both")
    if val_fraction is not None and val_count is not None:
        raise ValueError("give val_fraction or val_count, not both")
    for name, value in (("labelled_fraction", labelled_fraction), ("val_fraction", val_fraction)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")

    labelled: list[Case] = [c for c in cases if c.role == "labelled"]
    unlabelled: list[Case] = [c for c in cases if c.role == "unlabelled"]
    val: list[Case] = [c for c in cases if c.role == "val"]
    free = [c for c in cases if c.role is None]

    groups: dict[str, list[Case]] = {}
    for case in free:
        groups.setdefault(case.split_group, []).append(case)
    with_labels = sorted(g for g, members in groups.items() if any(c.label for c in members))
    without = sorted(g for g in groups if g not in set(with_labels))

    n = len(with_labels)
    n_val = _count(val_count, val_fraction, n, "val")
    n_train = n - n_val
    n_lab = _count(labelled_count, labelled_fraction, n_train, "labelled")
    if labelled_count is None and labelled_fraction is None:
        n_lab = n_train
    if n_val + n_lab > n:
        raise ValueError(
            f"asked for {n_val} validation and {n_lab} labelled groups but only {n} have labels"
        )
    order = [with_labels[i] for i in np.random.default_rng(seed).permutation(n)]
    for rank, group in enumerate(order):
        members = groups[group]
        if rank < n_val:
            # Unlabelled frames of a validation patient are left out rather than trained on.
            val += [c for c in members if c.label is not None]
        elif rank < n_val + n_lab:
            labelled += [c for c in members if c.label is not None]
            unlabelled += [c for c in members if c.label is None]
        else:
            unlabelled += members
    for group in without:
        unlabelled += groups[group]

    params = make_split_params(labelled_fraction, labelled_count, val_fraction, val_count, seed)

    def by_id(items: list[Case]) -> list[Case]:
        return sorted(items, key=lambda c: c.id)

    return Split(by_id(labelled), by_id(unlabelled), by_id(val), params)


def _count(count: int | None, fraction: float | None, total: int, name: str) -> int:
    if count is not None:
        if not 0 <= count <= total:
            raise ValueError(f"{name}_count={count} but only {total} groups are available")
        return int(count)
    if fraction is None or fraction == 0:
        return 0
    return min(total, max(1, int(round(fraction * total))))


def load_or_make_split(path: str | Path, cases: Sequence[Case], **params: Any) -> Split:
    """Reuse the split saved at ``path``; otherwise make one with ``make_split`` and save it.

    A saved split made with different parameters is refused rather than silently reused.
    """
    path = Path(path)
    if path.exists():
        split = Split.from_json(path)
        wanted = make_split_params(**params)
        if split.params and split.params != wanted:
            raise ValueError(
                f"{path} was made with {split.params}, not {wanted}; "
                "delete it or choose another path"
            )
        return split
    split = make_split(cases, **params)
    split.to_json(path)
    return split


def make_split_params(
    labelled_fraction: float | None = None,
    labelled_count: int | None = None,
    val_fraction: float | None = None,
    val_count: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The parameter record ``make_split`` stores with a split."""
    return {
        "labelled_fraction": labelled_fraction,
        "labelled_count": labelled_count,
        "val_fraction": val_fraction,
        "val_count": val_count,
        "seed": seed,
    }


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """A preprocessed case in memory, on the model grid (RAS, resampled, normalised).

    ``slices`` is the case's slab in model-grid axial indices (None: the whole volume). When
    ``cropped`` the arrays hold only that slab (training) and the ``context`` slices before and
    after it (a 2.5D model's neighbours, never drawn or scored themselves); otherwise they hold
    the whole volume and only the slab is to be scored (evaluation keeps the context around the
    slab).
    """

    id: str
    image: np.ndarray  # (C, X, Y, Z) float32
    label: np.ndarray | None  # (X, Y, Z) int16, remapped
    spacing: tuple[float, ...]  # mm, of the model grid
    affine: np.ndarray  # 4x4, of the arrays as held (after any crop)
    geometry: Geometry  # of the whole volume, to map predictions back to the input file
    slices: tuple[int, int] | None = None
    cropped: bool = False
    # Tissue groups of the raw label (k -> tissue_names[k - 1], 0 = none), for the contrast
    # enhancement augmentation; None when the case has no tissue_map.
    tissue: np.ndarray | None = None
    tissue_names: tuple[str, ...] = ()
    context: tuple[int, int] = (0, 0)

    @property
    def own_slices(self) -> tuple[int, int]:
        """The axial rows of the arrays as held that belong to the case (all but ``context``)."""
        return self.context[0], self.image.shape[3] - self.context[1]

    def to_dict(self) -> dict[str, Any]:
        """The case dict of training/evaluate.py: ``slices`` set only when still to be applied
        (relative to the arrays as held)."""
        slices = self.slices
        if self.cropped:
            slices = self.own_slices if any(self.context) else None
        return {
            "id": self.id,
            "image": self.image,
            "label": self.label,
            "spacing": self.spacing,
            "affine": self.affine,
            "slices": slices,
        }


def apply_label_map(label: np.ndarray, label_map: LabelMap) -> np.ndarray:
    """Remap label ids: None keeps them, "binary" gives label > 0, {src: dst} sends others to 0."""
    label_map = parse_label_map(label_map)
    if label_map is None:
        return label.astype(np.int16, copy=False)
    if label_map == "binary":
        return (label > 0).astype(np.int16)
    out = np.zeros(label.shape, dtype=np.int16)
    for src, dst in label_map.items():
        out[label == src] = dst
    return out


def read_image(paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """Read channel files into one ``(C, X, Y, Z)`` float32 array; affine of the first file.

    A 4D file contributes its last axis as channels (MSD convention).
    """
    channels: list[np.ndarray] = []
    affine = None
    for path in paths:
        img = nib.load(str(path))
        data = _squeeze_trailing(np.asarray(img.get_fdata(dtype=np.float32)))
        if data.ndim == 3:
            data = data[None]
        elif data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
        else:
            raise ValueError(f"{path}: expected a 3D or 4D image, got shape {data.shape}")
        if channels and data.shape[1:] != channels[0].shape[1:]:
            raise ValueError(f"{path}: shape {data.shape[1:]} differs from the first channel")
        channels.append(data)
        affine = img.affine if affine is None else affine
    return np.concatenate(channels, axis=0), np.asarray(affine)


def read_label(path: str | Path) -> np.ndarray:
    data = _squeeze_trailing(np.asarray(nib.load(str(path)).dataobj))
    if np.issubdtype(data.dtype, np.floating):
        data = np.rint(data)
    return data.astype(np.int32, copy=False)


def _squeeze_trailing(data: np.ndarray) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def load_volume(
    case: Case,
    normalisation: Mapping[str, Any] | None,
    target_spacing: Sequence[float | None] | float | None = None,
    resample_axes: Sequence[int] | None = None,
    with_label: bool = True,
    crop_to_slices: bool = True,
    resampling: str = "linear",
    margin: int = 0,
) -> Volume:
    """Read, reorient to RAS, resample, normalise (whole volume) and crop a case's slab.

    The slab of ``case.slices`` is given in RAS voxel indices before resampling and is mapped to
    the resampled grid; normalisation statistics come from the whole volume, as at serving time.
    With ``crop_to_slices=False`` the whole volume is kept and ``Volume.slices`` says what to score.
    ``resampling``: "linear" or "area", as the export's metadata will tell the engine.
    ``margin``: axial slices kept on each side of a cropped slab (where the volume has them), the
    neighbours a 2.5D model with that many ``context_slices`` sees beside the slab's own.
    """
    raw, affine = read_image(case.image)
    tissue, tissue_names = None, ()
    image, geometry = prepare_image(raw, affine, normalisation, target_spacing, resample_axes,
                                    resampling=resampling)
    label = None
    if with_label and case.label is not None:
        raw_label = read_label(case.label)
        if raw_label.shape != raw.shape[1:]:
            raise ValueError(
                f"case {case.id}: label shape {raw_label.shape} != image shape {raw.shape[1:]}"
            )
        label = prepare_label(apply_label_map(raw_label, case.label_map), geometry)
        if case.tissue_map:
            tissue, tissue_names = group_tissues(raw_label, case.tissue_map)
            tissue = prepare_label(tissue, geometry)
    model_affine = np.asarray(geometry.affine)
    slab = None
    if case.slices is not None:
        scale = geometry.model_shape[2] / geometry.oriented_shape[2]
        start = min(int(round(case.slices[0] * scale)), geometry.model_shape[2] - 1)
        stop = min(max(int(round(case.slices[1] * scale)), start + 1), geometry.model_shape[2])
        slab = (start, stop)
    cropped = slab is not None and crop_to_slices
    context = (0, 0)
    if cropped:
        start, stop = slab
        lo, hi = max(0, start - int(margin)), min(geometry.model_shape[2], stop + int(margin))
        context = (start - lo, hi - stop)
        image = np.ascontiguousarray(image[..., lo:hi])
        label = None if label is None else np.ascontiguousarray(label[..., lo:hi])
        tissue = None if tissue is None else np.ascontiguousarray(tissue[..., lo:hi])
        model_affine = model_affine.copy()
        model_affine[:3, 3] += model_affine[:3, 2] * lo
    return Volume(
        id=case.id,
        image=image,
        label=label,
        spacing=spacing_from_affine(model_affine),
        affine=model_affine,
        geometry=geometry,
        slices=slab,
        cropped=cropped,
        tissue=tissue,
        tissue_names=tissue_names,
        context=context,
    )


def load_volumes(
    cases: Sequence[Case],
    normalisation: Mapping[str, Any] | None,
    target_spacing: Sequence[float | None] | float | None = None,
    resample_axes: Sequence[int] | None = None,
    with_labels: bool = True,
    crop_to_slices: bool = True,
    resampling: str = "linear",
    margin: int = 0,
) -> list[Volume]:
    """:func:`load_volume` for each case (``with_labels=False`` for the unlabelled pool)."""
    return [
        load_volume(c, normalisation, target_spacing, resample_axes, with_labels, crop_to_slices,
                    resampling, margin)
        for c in cases
    ]


def load_eval_cases(
    cases: Sequence[Case],
    normalisation: Mapping[str, Any] | None,
    target_spacing: Sequence[float | None] | float | None = None,
    resample_axes: Sequence[int] | None = None,
    crop_to_slices: bool = False,
    resampling: str = "linear",
    margin: int = 0,
) -> list[Volume]:
    """Whole preprocessed volumes with labels, for sliding-window / slice-by-slice evaluation.

    A case with a slab keeps the whole volume as context (with ``crop_to_slices``, ``margin``
    slices of it on each side) and carries the slab to score in ``Volume.slices``
    (``Volume.to_dict()`` is the dict training/evaluate.py expects).
    """
    missing = [c.id for c in cases if c.label is None]
    if missing:
        raise ValueError(f"evaluation cases need labels; none for {missing[:5]}")
    return load_volumes(
        cases, normalisation, target_spacing, resample_axes, True, crop_to_slices, resampling,
        margin
    )


# ----------------------------------------------------------------------------------------------
# Augmentation helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntensityAugment:
    """Brightness / contrast / gamma jitter, each applied with probability ``p``; optionally the
    image-quality transforms nnU-Net adds, each with its own probability (off by default, and
    then no random number is drawn for them, so runs without them reproduce bit for bit).

    Brightness adds ``U(-brightness, brightness)`` image standard deviations; contrast scales
    about the mean; gamma acts on the image rescaled to [0, 1] and maps back to its range.
    ``noise`` > 0: white Gaussian noise of sd ``U(0, noise)`` image standard deviations (a
    thinner or lower-dose scan), with probability ``p_noise``. ``blur`` (lo, hi) > 0: a Gaussian
    blur of sigma ``U(lo, hi)`` voxels on the spatial axes (a softer reconstruction kernel),
    with probability ``p_blur``. ``lowres`` (lo, hi) < 1: the image resampled to ``U(lo, hi)``
    of its size (nearest) and back (linear), a coarser acquisition, with probability
    ``p_lowres``. Noise, blur and low resolution come first, as a scanner produces them; the
    jitter after.
    """

    brightness: float = 0.1
    contrast: tuple[float, float] = (0.75, 1.25)
    gamma: tuple[float, float] = (0.7, 1.5)
    p: float = 0.5
    noise: float = 0.0
    p_noise: float = 0.1
    blur: tuple[float, float] = (0.0, 0.0)
    p_blur: float = 0.2
    lowres: tuple[float, float] = (1.0, 1.0)
    p_lowres: float = 0.25

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = image.astype(np.float32, copy=True)
        spatial = tuple(range(1, out.ndim)) if out.ndim > 2 else tuple(range(out.ndim))
        if self.lowres[0] < 1.0 and rng.random() < self.p_lowres:
            out = simulate_low_resolution(out, float(rng.uniform(*self.lowres)), spatial)
        if self.blur[1] > 0 and rng.random() < self.p_blur:
            sigma = [0.0] * out.ndim
            for axis in spatial:
                sigma[axis] = float(rng.uniform(*self.blur))
            out = ndimage.gaussian_filter(out, sigma, mode="nearest")
        if self.noise > 0 and rng.random() < self.p_noise:
            sd = float(rng.uniform(0.0, self.noise)) * float(out.std() or 1.0)
            out += rng.normal(0.0, sd, size=out.shape).astype(np.float32)
        if self.brightness > 0 and rng.random() < self.p:
            out += np.float32(rng.uniform(-self.brightness, self.brightness) * (out.std() or 1.0))
        if rng.random() < self.p:
            mean = out.mean()
            out = (out - mean) * np.float32(rng.uniform(*self.contrast)) + mean
        if rng.random() < self.p:
            lo, hi = out.min(), out.max()
            if hi > lo:
                unit = (out - lo) / (hi - lo)
                out = unit ** np.float32(rng.uniform(*self.gamma)) * (hi - lo) + lo
        return out.astype(np.float32, copy=False)


def simulate_low_resolution(image: np.ndarray, factor: float,
                            axes: Sequence[int]) -> np.ndarray:
    """``image`` seen at ``factor`` (< 1) of its resolution on ``axes``: sampled down to that
    many voxels (nearest, as nnU-Net's SimulateLowResolution) and interpolated back (linear) to
    the same shape, so the patch geometry and the labels are untouched."""
    shape = list(image.shape)
    small = [max(1, int(round(n * factor))) if a in axes else n for a, n in enumerate(shape)]
    down = ndimage.zoom(image, [s / n for s, n in zip(small, shape, strict=True)], order=0,
                        mode="nearest", grid_mode=True)
    back = ndimage.zoom(down, [n / s for s, n in zip(down.shape, shape, strict=True)], order=1,
                        mode="nearest", grid_mode=True)
    if back.shape != image.shape:  # zoom rounds its output shape
        raise RuntimeError(f"low-resolution round trip gave {back.shape}, not {image.shape}")
    return back.astype(np.float32, copy=False)


def rotate_scale_2d(
    array: np.ndarray, angle_deg: float, scale: float = 1.0, order: int = 1
) -> np.ndarray:
    """Rotate (``scipy.ndimage.rotate`` sign, ``reshape=False``) and zoom about the centre.

    ``array`` is ``(H, W)`` or channel-first ``(C, H, W)``; ``scale`` > 1 enlarges the content.
    Outside the source the result is 0.
    """
    theta = np.deg2rad(angle_deg)
    c, s = np.cos(theta), np.sin(theta)
    matrix = np.array([[c, s], [-s, c]]) / scale
    shape = np.asarray(array.shape[-2:], dtype=np.float64)
    centre = (shape - 1) / 2.0
    offset = centre - matrix @ centre

    def one(plane: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(plane, matrix, offset=offset, order=order, mode="constant")

    if array.ndim == 2:
        return one(array)
    return np.stack([one(p) for p in array])


def _place(n: int, p: int, rng: np.random.Generator, centre: int | None) -> int:
    """Start index of a length-``p`` window in a length-``n`` axis (``n >= p``)."""
    if centre is None:
        return int(rng.integers(0, n - p + 1))
    return int(np.clip(centre - p // 2, 0, n - p))


def _crop_or_pad(
    image: np.ndarray,
    label: np.ndarray | None,
    size: Sequence[int],
    rng: np.random.Generator,
    centre: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Window of ``size`` over the spatial axes: random (or around ``centre``) where the volume is
    larger, zero padding split evenly where it is smaller."""
    spatial = image.shape[1:]
    region, pads = [], []
    for axis, (n, p) in enumerate(zip(spatial, size, strict=True)):
        if n >= p:
            start = _place(n, p, rng, None if centre is None else int(centre[axis]))
            region.append(slice(start, start + p))
            pads.append((0, 0))
        else:
            region.append(slice(0, n))
            before = (p - n) // 2
            pads.append((before, p - n - before))
    image = image[(slice(None), *region)]
    label = None if label is None else label[tuple(region)]
    if any(pad != (0, 0) for pad in pads):
        image = np.pad(image, [(0, 0), *pads])
        label = None if label is None else np.pad(label, pads)
    return image, label


def stream_rng(seed: int, rank: int | None = None) -> np.random.Generator:
    """The generator of this (seed, DDP rank, DataLoader worker) stream."""
    info = get_worker_info()
    worker = 0 if info is None else info.id
    return np.random.default_rng(np.random.SeedSequence([int(seed), _rank(rank), worker]))


def _rank(rank: int | None) -> int:
    if rank is not None:
        return int(rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class _SampleStream(IterableDataset, abc.ABC):
    """Shared machinery: ``sample(rng)`` draws one example; iterating yields tensors forever."""

    labelled: bool
    spatial_shape: tuple[int, ...]
    seed: int
    rank: int | None

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """One ``(image (C, *spatial) float32, label (*spatial) or None)`` example."""

    def __iter__(self) -> Iterator[Any]:
        rng = stream_rng(self.seed, self.rank)
        while True:
            image, label = self.sample(rng)
            if self.labelled:
                yield torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))
            else:
                yield torch.from_numpy(image)


def _check_volumes(volumes: Sequence[Volume], labelled: bool, kind: str) -> list[Volume]:
    volumes = list(volumes)
    if not volumes:
        raise ValueError(f"{kind} needs at least one volume")
    if labelled and any(v.label is None for v in volumes):
        missing = [v.id for v in volumes if v.label is None]
        raise ValueError(f"{kind}(labelled=True) got volumes without labels: {missing[:5]}")
    channels = {v.image.shape[0] for v in volumes}
    if len(channels) != 1:
        raise ValueError(f"{kind}: volumes have different channel counts {sorted(channels)}")
    return volumes


# ----------------------------------------------------------------------------------------------
# 3D patches
# ----------------------------------------------------------------------------------------------


class PatchDataset3D(_SampleStream):
    """Random 3D patches with flips and 90-degree axial rotations.

    For labelled volumes, ``foreground_fraction`` of the patches are centred on a foreground voxel
    (first a present class, uniformly, then one of its voxels), the rest are placed uniformly.
    Volumes smaller than the patch are zero padded. Yields ``(x (C, *patch) float32,
    y (*patch) int64)``, or ``x`` alone when ``labelled`` is False.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        patch_size: Sequence[int] = (112, 112, 112),
        labelled: bool = True,
        foreground_fraction: float = 0.33,
        flip: bool = True,
        rotate90: bool = True,
        intensity: IntensityAugment | None = None,
        seed: int = 0,
        rank: int | None = None,
        max_foreground_points: int = 20000,
    ) -> None:
        self.volumes = _check_volumes(volumes, labelled, "PatchDataset3D")
        self.spatial_shape = tuple(int(p) for p in patch_size)
        if len(self.spatial_shape) != 3:
            raise ValueError(f"patch_size needs 3 entries, got {patch_size}")
        self.labelled = labelled
        self.foreground_fraction = float(foreground_fraction)
        self.flip = flip
        self.rotate90 = rotate90
        self.intensity = intensity
        self.seed = seed
        self.rank = rank
        # Foreground voxel indices per class, subsampled (fixed seed) to bound the memory.
        self._foreground: list[list[np.ndarray]] = []
        subsample = np.random.default_rng(0)
        for volume in self.volumes if labelled else []:
            per_class = []
            for cls in np.unique(volume.label):
                if cls == 0:
                    continue
                idx = np.flatnonzero(volume.label == cls)
                if idx.size > max_foreground_points:
                    idx = np.sort(subsample.choice(idx, max_foreground_points, replace=False))
                per_class.append(idx)
            self._foreground.append(per_class)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        index = int(rng.integers(len(self.volumes)))
        volume = self.volumes[index]
        centre = None
        if self.labelled and self._foreground[index] and rng.random() < self.foreground_fraction:
            classes = self._foreground[index]
            voxels = classes[int(rng.integers(len(classes)))]
            flat = int(voxels[int(rng.integers(voxels.size))])
            centre = np.unravel_index(flat, volume.label.shape)
        label = volume.label if self.labelled else None
        image, label = _crop_or_pad(volume.image, label, self.spatial_shape, rng, centre)
        image, label = self._augment(image, label, rng)
        return np.ascontiguousarray(image, dtype=np.float32), (
            None if label is None else np.ascontiguousarray(label)
        )

    def _augment(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if self.flip:
            for axis in range(3):
                if rng.random() < 0.5:
                    image = np.flip(image, axis=axis + 1)
                    label = None if label is None else np.flip(label, axis=axis)
        if self.rotate90:
            square = self.spatial_shape[0] == self.spatial_shape[1]
            # A quarter turn of a non-square patch would change its shape: half turns only.
            k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
            image = np.rot90(image, k, axes=(1, 2))
            label = None if label is None else np.rot90(label, k, axes=(0, 1))
        if self.intensity is not None:
            image = self.intensity(image, rng)
        return image, label


# ----------------------------------------------------------------------------------------------
# 2D slices
# ----------------------------------------------------------------------------------------------


class SliceDataset2D(_SampleStream):
    """2D slices of the volumes along ``plane`` (axial by default) with augmentation.

    Geometry: with ``size`` (paper default 256x256) each slice is resized to it (bilinear image,
    nearest label, the same :func:`~sfpc.inference.preprocess.resample_to_shape` used at inference);
    with ``size=None`` and ``patch_size`` the slice (already at the target spacing) is randomly
    cropped / zero padded to the patch. Augmentation: random flips (each in-plane axis, p=0.5),
    optional quarter turns, rotation by ``U(-rotation, rotation)`` degrees, optional zoom
    ``U(*scale)``, optional intensity jitter. Labelled slices without foreground are drawn with
    relative weight ``empty_slice_prob`` (1 = uniform over slices, 0 = never). A labelled slice
    larger than the patch is cropped around one of its foreground pixels with probability
    ``foreground_fraction`` (else uniformly), so small structures are not cropped away.
    With ``context_slices`` k (2.5D) each slice comes with its k neighbours on both sides as
    channels, slice-major (the C channels of slice s-k first, ..., of s+k last), the volume's
    edge slice repeated past its ends as the engine does; the stack is taken before any
    augmentation, so every channel gets the same crop, rotation, zoom, deformation and flips,
    and the intensity jitter is drawn once for the stack. The label is the centre slice's.
    Yields ``(x (C * (2k + 1), H, W) float32, y (H, W) int64)`` or ``x`` alone when
    ``labelled`` is False.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        size: Sequence[int] | None = (256, 256),
        patch_size: Sequence[int] | None = None,
        plane: str = "axial",
        labelled: bool = True,
        flip: bool = True,
        rotate90: bool = False,
        rotation: float = 20.0,
        scale: tuple[float, float] | None = None,
        intensity: IntensityAugment | None = None,
        empty_slice_prob: float = 1.0,
        seed: int = 0,
        rank: int | None = None,
        foreground_fraction: float = 0.0,
        enhance: ContrastEnhance | None = None,
        fov_cut: Mapping[str, float] | None = None,
        elastic: Mapping[str, Any] | None = None,
        context_slices: int = 0,
    ) -> None:
        self.volumes = _check_volumes(volumes, labelled, "SliceDataset2D")
        if int(context_slices) < 0:
            raise ValueError(f"context_slices must be >= 0, got {context_slices}")
        self.context_slices = int(context_slices)
        self.enhance = enhance
        self.elastic = None if not elastic else (
            float(elastic.get("p", 0.2)), tuple(float(v) for v in elastic.get("alpha", (0, 200))),
            tuple(float(v) for v in elastic.get("sigma", (9, 13))))
        self.fov_cut = None if not fov_cut else (float(fov_cut.get("p", 0.2)),
                                                 float(fov_cut.get("max", 0.35)))
        self.foreground_fraction = float(foreground_fraction)
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {tuple(PLANES)}, got {plane!r}")
        if (size is None) == (patch_size is None):
            raise ValueError("give exactly one of size (resize) and patch_size (crop/pad)")
        self.axis = PLANES[plane]
        self.resize = size is not None
        self.spatial_shape = tuple(int(v) for v in (size if size is not None else patch_size))
        if len(self.spatial_shape) != 2:
            raise ValueError(f"2D size needs 2 entries, got {self.spatial_shape}")
        self.labelled = labelled
        self.flip, self.rotate90 = flip, rotate90
        self.rotation = float(rotation)
        self.scale = scale
        self.intensity = intensity
        self.seed = seed
        self.rank = rank

        entries, weights = [], []
        for v_index, volume in enumerate(self.volumes):
            n = volume.image.shape[self.axis + 1]
            first, last = 0, n
            if any(volume.context):
                # The neighbours kept around a slab lie along the axial axis; slices along
                # another would cut through them and train on labels outside the slab.
                if self.axis != 2:
                    raise ValueError(f"volume {volume.id} holds context slices around its slab "
                                     "along the axial axis; draw axial slices from it")
                first, last = volume.own_slices
            if labelled:
                other = tuple(a for a in range(3) if a != self.axis)
                has_fg = (volume.label > 0).any(axis=other)
            else:
                has_fg = np.ones(n, dtype=bool)
            for s in range(first, last):
                entries.append((v_index, s))
                weights.append(1.0 if has_fg[s] else float(empty_slice_prob))
        total = float(np.sum(weights))
        if total <= 0:
            raise ValueError("no slice can be drawn: all are empty and empty_slice_prob is 0")
        self._entries = entries
        self._cumulative = np.cumsum(weights) / total

    def __len__(self) -> int:
        return len(self._entries)

    def neighbours(self, index: int) -> list[int]:
        """The slices (of the volume as held) stacked for slice ``index`` of the dataset: s-k to
        s+k, clamped to the volume."""
        v_index, s = self._entries[index]
        n = self.volumes[v_index].image.shape[self.axis + 1]
        k = self.context_slices
        return [min(max(z, 0), n - 1) for z in range(s - k, s + k + 1)]

    def slice(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Slice ``index`` of the dataset, before augmentation (``(C * (2k + 1), H, W)``,
        ``(H, W)``)."""
        v_index, s = self._entries[index]
        volume = self.volumes[v_index]
        if self.context_slices:
            # (S, C, H, W) -> (S * C, H, W): slice-major, as the engine stacks them.
            stack = np.take(volume.image, self.neighbours(index), axis=self.axis + 1)
            stack = np.moveaxis(stack, self.axis + 1, 0)
            image = stack.reshape(-1, *stack.shape[2:])
        else:
            image = np.take(volume.image, s, axis=self.axis + 1)
        label = None
        if self.labelled:
            label = np.take(volume.label, s, axis=self.axis)
        return image, label

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        pick = min(int(np.searchsorted(self._cumulative, rng.random(), side="right")),
                   len(self._entries) - 1)
        image, label = self.slice(pick)
        # Neither option draws a random number when off: older runs' streams stay as they were.
        if self.enhance is not None:
            v_index, s = self._entries[pick]
            volume = self.volumes[v_index]
            if volume.tissue is not None:
                image = self._enhance(image, volume, s, pick, rng)
        if self.fov_cut is not None and rng.random() < self.fov_cut[0]:
            image, label = cut_field_of_view(image, label, rng, self.fov_cut[1])
        if self.resize:
            image = resample_to_shape(image, self.spatial_shape, 1)
            label = None if label is None else resample_to_shape(label, self.spatial_shape, 0)
        else:
            centre = None
            # No draw at fraction 0: the stream of a run without the option stays as it was.
            if label is not None and self.foreground_fraction > 0 and (
                    rng.random() < self.foreground_fraction):
                points = np.argwhere(label > 0)
                if len(points):
                    centre = points[int(rng.integers(len(points)))]
            image, label = _crop_or_pad(image, label, self.spatial_shape, rng, centre)
        if self.elastic is not None and rng.random() < self.elastic[0]:
            p, alpha, sigma = self.elastic
            image, label = elastic_deform_2d(image, label, rng, float(rng.uniform(*alpha)),
                                             float(rng.uniform(*sigma)))
        image, label = augment_2d(
            image,
            label,
            rng,
            flip=self.flip,
            rotate90=self.rotate90,
            rotation=self.rotation,
            scale=self.scale,
            intensity=self.intensity,
        )
        return image, label

    def _enhance(self, image: np.ndarray, volume: Volume, s: int, index: int,
                 rng: np.random.Generator) -> np.ndarray:
        assert self.enhance is not None and volume.tissue is not None
        if not self.context_slices:
            tissue = np.take(volume.tissue, s, axis=self.axis)
            return self.enhance(image, tissue, volume.tissue_names, rng)
        # One contrast phase for the whole stack: every slice enhanced with its own tissues by
        # generators seeded alike, so that they draw the same strength and HU per tissue.
        seed = int(rng.integers(2**63))
        channels = volume.image.shape[0]
        out = np.empty_like(image)
        for j, z in enumerate(self.neighbours(index)):
            tissue = np.take(volume.tissue, z, axis=self.axis)
            part = slice(j * channels, (j + 1) * channels)
            out[part] = self.enhance(image[part], tissue, volume.tissue_names,
                                     np.random.default_rng(seed))
        return out


def elastic_deform_2d(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
                      alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Elastic deformation (Simard et al. 2003, as batchgenerators / nnU-Net apply it): a
    displacement field of uniform noise in [-1, 1] per axis, smoothed by a Gaussian of ``sigma``
    voxels and scaled by ``alpha``; the image sampled linearly, the label by nearest neighbour,
    0 outside (the engine's padding)."""
    shape = image.shape[-2:]
    grid = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    coords = []
    for axis in range(2):
        noise = rng.uniform(-1.0, 1.0, size=shape)
        coords.append(grid[axis] + alpha * ndimage.gaussian_filter(noise, sigma, mode="constant"))
    image = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="constant", cval=0.0)
                      for c in image]).astype(np.float32)
    if label is not None:
        label = ndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0)
    return image, label


def cut_field_of_view(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
                      max_fraction: float = 0.35) -> tuple[np.ndarray, np.ndarray | None]:
    """A scan whose field of view ends inside the body: ``U(0.05, max_fraction)`` of the slice cut
    off one random side, the image there set to 0 (what the engine pads outside an image with)
    and the label to background (the engine cannot label voxels the scan does not have)."""
    axis = int(rng.integers(2))
    n = image.shape[axis + 1]
    k = max(1, int(round(float(rng.uniform(0.05, max_fraction)) * n)))
    band = slice(0, k) if rng.random() < 0.5 else slice(n - k, n)
    image = image.copy()
    index = [slice(None)] * 2
    index[axis] = band
    image[(slice(None), *index)] = 0.0
    if label is not None:
        label = label.copy()
        label[tuple(index)] = 0
    return image, label


def augment_2d(
    image: np.ndarray,
    label: np.ndarray | None,
    rng: np.random.Generator,
    flip: bool = True,
    rotate90: bool = False,
    rotation: float = 20.0,
    scale: tuple[float, float] | None = None,
    intensity: IntensityAugment | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply the same random geometric transform to a ``(C, H, W)`` image and its ``(H, W)``
    label (linear / nearest), then optional intensity jitter to the image."""
    if rotate90 and image.shape[-1] == image.shape[-2]:
        k = int(rng.integers(4))
        image = np.rot90(image, k, axes=(1, 2))
        label = None if label is None else np.rot90(label, k)
    angle = rng.uniform(-rotation, rotation) if rotation > 0 else 0.0
    zoom = rng.uniform(*scale) if scale is not None else 1.0
    if angle != 0.0 or zoom != 1.0:
        image = rotate_scale_2d(np.ascontiguousarray(image), angle, zoom, order=1)
        if label is not None:
            label = rotate_scale_2d(np.ascontiguousarray(label), angle, zoom, order=0)
    if flip:
        for axis in (0, 1):
            if rng.random() < 0.5:
                image = np.flip(image, axis=axis + 1)
                label = None if label is None else np.flip(label, axis=axis)
    if intensity is not None:
        image = intensity(image, rng)
    image = np.ascontiguousarray(image, dtype=np.float32)
    return image, None if label is None else np.ascontiguousarray(label)


# ----------------------------------------------------------------------------------------------
# Two-stream batches
# ----------------------------------------------------------------------------------------------


class _TwoStreamBatches(IterableDataset):
    """Batch ``b`` is drawn from its own generator, seeded by ``(seed, rank, b)``: the stream is
    the same whatever the worker count, and resuming at batch ``b`` costs nothing."""

    def __init__(
        self,
        labelled: _SampleStream,
        unlabelled: _SampleStream | None,
        n_labelled: int,
        n_unlabelled: int,
        seed: int,
        rank: int,
    ) -> None:
        self.labelled, self.unlabelled = labelled, unlabelled
        self.n_labelled, self.n_unlabelled = n_labelled, n_unlabelled
        self.seed, self.rank = seed, rank
        self.start = 0

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, int(index)]))
        xs, ys = zip(*(self.labelled.sample(rng) for _ in range(self.n_labelled)), strict=True)
        x_l = torch.from_numpy(np.stack(xs))
        y_l = torch.from_numpy(np.stack(ys).astype(np.int64))
        if self.unlabelled is not None and self.n_unlabelled > 0:
            x_u = torch.from_numpy(
                np.stack([self.unlabelled.sample(rng)[0] for _ in range(self.n_unlabelled)])
            )
        else:
            x_u = x_l.new_zeros((0, *x_l.shape[1:]))
        return x_l, y_l, x_u

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # DataLoader takes one item from each worker in turn, so worker w of n makes batches
        # start + w, start + w + n, ... and the loader's output is batch start, start + 1, ...
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start + worker
        while True:
            yield self.batch(index)
            index += n_workers


class TwoStreamLoader:
    """Endless ``(x_l, y_l, x_u)`` batches: ``n_labelled`` labelled and ``n_unlabelled``
    unlabelled samples, ``x`` ``(N, C, *spatial)`` float32 and ``y`` ``(N, *spatial)`` int64.

    Deterministic: batch ``b`` depends only on (seed, rank, b), whatever ``num_workers`` is;
    every ``iter()`` starts again at batch 0, or at the batch set by :meth:`skip_to` (resuming a
    run). ``rank`` (default: the torch.distributed rank, or 0) offsets the seed so DDP processes
    see different batches. Without an unlabelled dataset (or ``n_unlabelled=0``), ``x_u`` has 0
    rows.
    """

    def __init__(
        self,
        labelled_ds: _SampleStream,
        unlabelled_ds: _SampleStream | None,
        n_labelled: int = 4,
        n_unlabelled: int = 4,
        seed: int = 0,
        num_workers: int = 0,
        rank: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        if not labelled_ds.labelled:
            raise ValueError("the labelled stream must be built with labelled=True")
        if n_labelled < 1 or n_unlabelled < 0:
            raise ValueError("need n_labelled >= 1 and n_unlabelled >= 0")
        if unlabelled_ds is not None and unlabelled_ds.spatial_shape != labelled_ds.spatial_shape:
            raise ValueError(
                f"labelled samples are {labelled_ds.spatial_shape} but unlabelled ones are "
                f"{unlabelled_ds.spatial_shape}"
            )
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self._batches = _TwoStreamBatches(
            labelled_ds, unlabelled_ds, n_labelled, n_unlabelled, seed, _rank(rank)
        )

    def skip_to(self, index: int) -> None:
        """Make the next ``iter()`` start at batch ``index`` (e.g. the iteration resumed at)."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        self._batches.start = int(index)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``index`` of the stream, computed directly."""
        return self._batches.batch(index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.num_workers == 0:
            return iter(self._batches)
        loader = DataLoader(
            self._batches,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=2,
        )
        return iter(loader)
