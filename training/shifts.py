"""Controlled shifts of a labelled CT, for robustness benchmarks (benchmarks/robustness.py).

Each shift takes ``(image, label, affine)`` - HU voxels (any integer or float dtype), integer
labels on the same grid, and the 4x4 voxel-to-world (RAS+ mm) affine - and returns a new
``(image, label, affine)`` triple with a float32 image, the label's own dtype and a float64
affine. Shifts that resample keep the geometry consistent: the returned affine maps every
shifted voxel to the world position of the anatomy it was sampled from, so world coordinates
(and a held-out block of slices, :func:`map_slab`) carry over. The one deliberate exception is
:func:`scale_anatomy`, whose purpose is to change the anatomy's size in mm.

All shifts are synthetic: they model what a second scanner, protocol or patient would change
(resolution, slice thickness, noise, contrast phase, field of view, body size) on one patient's
CT, and do not replace a second labelled patient. Torch-free (numpy, scipy, nibabel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import io_orientation
from scipy import ndimage

from sfpc.training.enhancement import (
    PORTAL_VENOUS_HU,
    enhancement_hu,
    group_tissues,
    tissue_map_for,
)
from sfpc.training.organ_task import CLASS_NAMES, CT_WINDOW, LABEL_MAP

Volume = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(image float32, label, affine float64)."""

# TotalSegmentator 'total' ids of the organ task's classes, by class name (ct_a's raw labels).
TOTALSEG_IDS: dict[str, int] = {CLASS_NAMES[dst]: src for src, dst in LABEL_MAP.items()}
AIR_HU = -1000.0
SIDES = {"right": (0, 1), "left": (0, -1), "anterior": (1, 1), "posterior": (1, -1)}
"""Patient side -> (world axis, direction along it) in RAS+ (+x towards the patient's right)."""


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------


def _check(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> Volume:
    img = np.asarray(image)
    lab = np.asarray(label)
    aff = np.asarray(affine, dtype=np.float64)
    if img.ndim != 3 or img.shape != lab.shape:
        raise ValueError(f"image {img.shape} and label {lab.shape} must be the same 3D shape")
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {aff.shape}")
    return img, lab, aff


def voxel_axis(affine: np.ndarray, world_axis: int) -> tuple[int, int]:
    """The voxel axis closest to RAS world axis ``world_axis`` (0 = x, 1 = y, 2 = z) and the
    direction (+1 / -1) in which increasing that voxel index moves along the world axis."""
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    for axis, (world, sign) in enumerate(ornt):
        if int(world) == world_axis:
            return axis, int(sign)
    raise ValueError(f"affine has no voxel axis along world axis {world_axis}")


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis that runs head-feet: its index numbers the axial slices."""
    return voxel_axis(affine, 2)[0]


def inplane_axes(affine: np.ndarray) -> tuple[int, int]:
    """The two voxel axes of the axial plane."""
    z = axial_axis(affine)
    a, b = (ax for ax in range(3) if ax != z)
    return a, b


def spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes in mm (the column norms of the affine's 3x3 part)."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _axis_grid(n: int, step: float, m: int) -> tuple[float, float]:
    """Scale and offset mapping a new index j on an axis of m samples, ``step`` old voxels
    apart, to the old voxel coordinate: x = scale * j + offset, both grids centred on the same
    point so that the field of view stays where it was."""
    return step, (n - 1) / 2.0 - step * (m - 1) / 2.0


def _resample(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
              steps: Mapping[int, float], sizes: Mapping[int, int]) -> Volume:
    """Resample along the axes in ``steps`` (old voxels per new voxel) to ``sizes`` samples:
    image linear, labels nearest; the affine composed with the same index map."""
    scale = np.ones(3)
    offset = np.zeros(3)
    shape = list(image.shape)
    for axis, step in steps.items():
        scale[axis], offset[axis] = _axis_grid(image.shape[axis], step, sizes[axis])
        shape[axis] = sizes[axis]
    # mode="nearest": the outermost new centres sit up to half an old voxel beyond the old
    # centres (same field of view), where the edge value is the honest guess.
    out_image = ndimage.affine_transform(image.astype(np.float32, copy=False), scale, offset,
                                         output_shape=tuple(shape), output=np.float32,
                                         order=1, mode="nearest")
    out_label = ndimage.affine_transform(label, scale, offset, output_shape=tuple(shape),
                                         order=0, mode="nearest")
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = offset
    return out_image, out_label, affine @ index_map


# ----------------------------------------------------------------------------------------------
# The shifts
# ----------------------------------------------------------------------------------------------


def resample_inplane(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                     spacing_mm: float) -> Volume:
    """Resample the axial plane to ``spacing_mm`` x ``spacing_mm`` (slices untouched): image
    linear, labels nearest, field of view kept (grids centred on the same point; each axis gets
    round(extent / spacing) voxels).

    This models an upload at another in-plane resolution. From ct_a's 3 mm voxels every
    finer target is an *upsampling*: the result has the voxel size of a 0.7 mm scan but only the
    detail of the 3 mm one (smooth, no new anatomy, no thin-voxel noise), and its labels are
    blocky 3 mm labels cut finer. What it tests is the engine's resampling path and a different
    input grid, not a real high-resolution scanner. Coarser targets are not anti-aliased.
    """
    img, lab, aff = _check(image, label, affine)
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
    zooms = spacing(aff)
    steps: dict[int, float] = {}
    sizes: dict[int, int] = {}
    for axis in inplane_axes(aff):
        n = img.shape[axis]
        sizes[axis] = max(1, int(round(n * zooms[axis] / spacing_mm)))
        steps[axis] = spacing_mm / zooms[axis]
    return _resample(img, lab, aff, steps, sizes)


def resample_thickness(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                       thickness_mm: float) -> Volume:
    """Thicker axial slices: contiguous slabs of ``thickness_mm`` (spacing = thickness), each
    the average of the old slices weighted by how much of each it overlaps (the partial-volume
    averaging of a thick reconstruction, assuming the old slices are contiguous); labels of the
    old slice nearest to each slab's centre. floor(extent / thickness) slabs, centred on the old
    stack, so every slab lies inside the scanned range.
    """
    img, lab, aff = _check(image, label, affine)
    axis = axial_axis(aff)
    old = float(spacing(aff)[axis])
    if thickness_mm < old:
        raise ValueError(f"thickness_mm {thickness_mm} is thinner than the slices ({old:g} mm): "
                         "use it to thicken, not to thin")
    n = img.shape[axis]
    m = int(np.floor(n * old / thickness_mm + 1e-9))
    if m < 1:
        raise ValueError(f"{n} slices of {old:g} mm hold no {thickness_mm:g} mm slab")
    step = thickness_mm / old
    scale, offset = _axis_grid(n, step, m)
    centres = scale * np.arange(m) + offset
    # Old slice i spans [i - 0.5, i + 0.5] in voxel units; slab j spans centre_j -/+ step / 2.
    lo = np.maximum(np.arange(n)[None, :] - 0.5, centres[:, None] - step / 2)
    hi = np.minimum(np.arange(n)[None, :] + 0.5, centres[:, None] + step / 2)
    weights = np.clip(hi - lo, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    moved = np.moveaxis(img.astype(np.float32, copy=False), axis, 0)
    averaged = np.tensordot(weights.astype(np.float32), moved, axes=(1, 0))
    out_image = np.ascontiguousarray(np.moveaxis(averaged, 0, axis), dtype=np.float32)
    nearest = np.clip(np.floor(centres + 0.5).astype(int), 0, n - 1)
    out_label = np.take(lab, nearest, axis=axis)
    index_map = np.eye(4)
    index_map[axis, axis] = scale
    index_map[axis, 3] = offset
    return out_image, out_label, aff @ index_map


def add_noise(image: np.ndarray, label: np.ndarray, affine: np.ndarray, sigma_hu: float,
              seed: int = 0) -> Volume:
    """Add white Gaussian noise of standard deviation ``sigma_hu`` HU (seeded). Real CT noise
    is spatially correlated and grows with depth; white noise is the simple, reproducible
    stand-in (a low-dose or thin-slice scan)."""
    img, lab, aff = _check(image, label, affine)
    if sigma_hu < 0:
        raise ValueError(f"sigma_hu must be >= 0, got {sigma_hu}")
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, sigma_hu, size=img.shape).astype(np.float32)
    return img.astype(np.float32) + noise, lab.copy(), aff.copy()


def contrast_offset(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                    offsets: Mapping[int, float]) -> Volume:
    """Add ``offsets[label_id]`` HU to every voxel with that label id, nothing elsewhere: a
    crude contrast phase (organs enhance, the rest does not). The step sits exactly on the
    reference boundary, which a real enhancement would not (vessels, partial volume, a
    reference label that is itself a model output): it if anything helps a model find that
    boundary, so the shift tests the organs' intensities, not their edges."""
    img, lab, aff = _check(image, label, affine)
    out = img.astype(np.float32)
    for label_id, offset in offsets.items():
        out[lab == int(label_id)] += np.float32(offset)
    return out, lab.copy(), aff.copy()


def simulate_enhancement(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                         strength: float = 1.0) -> Volume:
    """Every tissue group of ``sfpc.training.enhancement.TOTALSEG_TISSUES`` brightened by
    ``strength`` times the midpoint of its :data:`PORTAL_VENOUS_HU` range, smoothed over a
    voxel, on voxels above the organ task's CT window (gas inside the bowel does not enhance,
    as the training augmentation spares clipped voxels). ``label`` must hold ct_a's raw
    TotalSegmentator ids."""
    img, lab, aff = _check(image, label, affine)
    tissue, names = group_tissues(lab, tissue_map_for())
    added = {n: strength * 0.5 * (lo + hi) for n, (lo, hi) in PORTAL_VENOUS_HU.items()}
    delta = enhancement_hu(tissue, names, added)
    out = img.astype(np.float32)
    out = np.where(out > CT_WINDOW[0], out + delta, out).astype(np.float32)
    return out, lab.copy(), aff.copy()


def crop_fov(image: np.ndarray, label: np.ndarray, affine: np.ndarray, fraction: float,
             side: str) -> Volume:
    """Cut ``fraction`` of the in-plane extent off the patient's ``side`` ("left", "right",
    "anterior", "posterior": RAS directions, whatever the array's orientation), as a smaller
    field of view or a reconstruction centred elsewhere would. The affine's origin moves so
    that every kept voxel keeps its world position."""
    img, lab, aff = _check(image, label, affine)
    if side not in SIDES:
        raise ValueError(f"side must be one of {sorted(SIDES)}, got {side!r}")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    world, direction = SIDES[side]
    axis, sign = voxel_axis(aff, world)
    n = img.shape[axis]
    cut = int(round(fraction * n))
    # The side lies at high indices when the voxel axis runs towards it.
    start, stop = (0, n - cut) if sign == direction else (cut, n)
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    shift = np.eye(4)
    shift[axis, 3] = start
    return (img[tuple(index)].astype(np.float32), lab[tuple(index)].copy(), aff @ shift)


def scale_anatomy(image: np.ndarray, label: np.ndarray, affine: np.ndarray, factor: float,
                  fill_hu: float = AIR_HU) -> Volume:
    """Zoom the anatomy in the axial plane by ``factor`` about the array's in-plane centre,
    keeping the array size, the voxel spacing and the affine: organs become ``factor`` times
    larger in mm (a bigger or smaller patient; it is the one shift that changes world sizes on
    purpose). Image linear, labels nearest; what enters the field of view from outside is air
    (``fill_hu``) and background, and what a factor > 1 pushes out is lost."""
    img, lab, aff = _check(image, label, affine)
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    scale = np.ones(3)
    offset = np.zeros(3)
    for axis in inplane_axes(aff):
        centre = (img.shape[axis] - 1) / 2.0
        # Output voxel j shows the input at centre + (j - centre) / factor.
        scale[axis] = 1.0 / factor
        offset[axis] = centre - centre / factor
    out_image = ndimage.affine_transform(img.astype(np.float32, copy=False), scale, offset,
                                         output=np.float32, order=1, mode="constant",
                                         cval=fill_hu)
    out_label = ndimage.affine_transform(lab, scale, offset, order=0, mode="constant", cval=0)
    return out_image, out_label, aff.copy()


# ----------------------------------------------------------------------------------------------
# Mapping a block of slices
# ----------------------------------------------------------------------------------------------


def _ras_slice_z(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """World z (mm) of the centre of each axial slice, in RAS slice order, and the slice step."""
    aff = np.asarray(affine, dtype=np.float64)
    axis, sign = voxel_axis(aff, 2)
    n = shape[axis]
    voxels = np.tile((np.asarray(shape[:3], dtype=np.float64) - 1) / 2.0, (n, 1))
    # RAS slice k is voxel index k along an axis that runs up, n - 1 - k along one that runs down.
    voxels[:, axis] = np.arange(n) if sign > 0 else np.arange(n)[::-1]
    z = voxels @ aff[2, :3] + aff[2, 3]
    return z, abs(float(aff[2, axis]))


def map_slab(block: tuple[int, int], affine: np.ndarray, shape: tuple[int, ...],
             new_affine: np.ndarray, new_shape: tuple[int, ...]) -> tuple[int, int]:
    """A block [start, stop) of RAS axial slices of one volume, as the RAS axial slices
    [start', stop') of another grid of the same anatomy whose slice centres lie in the block's
    world z range (its first slice's lower edge to its last slice's upper edge)."""
    start, stop = block
    z, step = _ras_slice_z(affine, shape)
    if not 0 <= start < stop <= len(z):
        raise ValueError(f"block {block} is outside the {len(z)} slices")
    low, high = z[start] - step / 2, z[stop - 1] + step / 2
    new_z, _ = _ras_slice_z(new_affine, new_shape)
    tol = 1e-6
    inside = np.flatnonzero((new_z >= low - tol) & (new_z < high - tol))
    if inside.size == 0:
        raise ValueError(f"no slice of the new grid lies in z [{low:.1f}, {high:.1f}) mm")
    return int(inside[0]), int(inside[-1]) + 1


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shift:
    """A named shift setting: ``kind`` picks the function, ``params`` its arguments."""

    name: str
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


def _registry(*shifts: Shift) -> dict[str, Shift]:
    return {s.name: s for s in shifts}


SHIFTS: dict[str, Shift] = _registry(
    Shift("none", "none", {}, "ct_a as it is (the model card's validation)"),
    Shift("resolution 0.7mm", "resolution", {"spacing_mm": 0.7},
          "in-plane 3 -> 0.7 mm (upsampled: a 0.7 mm grid with 3 mm detail)"),
    Shift("resolution 1.0mm", "resolution", {"spacing_mm": 1.0}, "in-plane 3 -> 1.0 mm"),
    Shift("resolution 1.5mm", "resolution", {"spacing_mm": 1.5}, "in-plane 3 -> 1.5 mm"),
    Shift("resolution 3mm", "resolution", {"spacing_mm": 3.0},
          "in-plane 3 -> 3 mm: the resampling path on ct_a's own grid (a control)"),
    Shift("thickness 5mm", "thickness", {"thickness_mm": 5.0},
          "5 mm slices averaged from the 3 mm ones"),
    Shift("thickness 9mm", "thickness", {"thickness_mm": 9.0},
          "9 mm slices averaged from the 3 mm ones"),
    Shift("noise 30HU", "noise", {"sigma_hu": 30.0}, "white Gaussian noise, sd 30 HU"),
    # A thin-voxel scan is noisier per voxel than a 3 mm one (noise sd grows roughly as
    # 1/sqrt(voxel volume)): the grid and its noise together, as a 0.7-1 mm scanner delivers.
    Shift("0.7mm + noise 40HU", "fine-noisy", {"spacing_mm": 0.7, "sigma_hu": 40.0},
          "in-plane 3 -> 0.7 mm, then white noise of sd 40 HU on the fine grid"),
    Shift("1.0mm + noise 30HU", "fine-noisy", {"spacing_mm": 1.0, "sigma_hu": 30.0},
          "in-plane 3 -> 1.0 mm, then white noise of sd 30 HU on the fine grid"),
    Shift("noise 60HU", "noise", {"sigma_hu": 60.0}, "white Gaussian noise, sd 60 HU"),
    Shift("contrast +40/+60HU", "contrast", {"organs": {"liver": 40.0, "spleen": 60.0}},
          "portal-venous-like: liver +40 HU, spleen +60 HU"),
    # The training augmentation's own table (training/enhancement.py) at its midpoints: a model
    # trained with augment.enhance has seen this simulation, so its row is optimistic.
    Shift("portal venous (simulated)", "enhance", {"strength": 1.0},
          "every enhancing tissue of the raw label brightened by the midpoint of its "
          "portal-venous range (liver +60, spleen +75, kidneys +130, aorta +175 HU)"),
    Shift("crop 25% left", "crop", {"fraction": 0.25, "side": "left"},
          "the patient's left quarter of the field of view cut off (spleen side)"),
    Shift("crop 25% anterior", "crop", {"fraction": 0.25, "side": "anterior"},
          "the anterior quarter of the field of view cut off"),
    Shift("scale 0.8", "scale", {"factor": 0.8}, "anatomy 0.8x in plane (a smaller patient)"),
    Shift("scale 1.2", "scale", {"factor": 1.2}, "anatomy 1.2x in plane (a larger patient)"),
)


# Shifts for fitting the review flag's threshold (sfpc build-default-model): the same kinds as
# SHIFTS with other settings, so that the benchmark's flag column is scored on shifts the
# threshold was not fitted on.
CALIBRATION_SHIFTS: dict[str, Shift] = _registry(
    Shift("cal none", "none", {}, "the held-apart block as it is"),
    Shift("cal noise 20HU", "noise", {"sigma_hu": 20.0}),
    Shift("cal noise 45HU", "noise", {"sigma_hu": 45.0}),
    Shift("cal noise 80HU", "noise", {"sigma_hu": 80.0}),
    Shift("cal 0.8mm + noise 50HU", "fine-noisy", {"spacing_mm": 0.8, "sigma_hu": 50.0}),
    Shift("cal resolution 2mm", "resolution", {"spacing_mm": 2.0}),
    Shift("cal thickness 7mm", "thickness", {"thickness_mm": 7.0}),
    Shift("cal portal venous 0.5", "enhance", {"strength": 0.5}),
    Shift("cal contrast +80/+30HU", "contrast", {"organs": {"liver": 80.0, "spleen": 30.0}}),
    Shift("cal crop 15% anterior", "crop", {"fraction": 0.15, "side": "anterior"}),
    Shift("cal crop 20% right", "crop", {"fraction": 0.2, "side": "right"}),
    Shift("cal crop 30% posterior", "crop", {"fraction": 0.3, "side": "posterior"}),
    Shift("cal crop 35% left", "crop", {"fraction": 0.35, "side": "left"}),
    Shift("cal scale 0.7", "scale", {"factor": 0.7}),
    Shift("cal scale 0.9", "scale", {"factor": 0.9}),
    Shift("cal scale 1.1", "scale", {"factor": 1.1}),
    Shift("cal scale 1.35", "scale", {"factor": 1.35}),
)


def shift_named(name: str) -> Shift:
    """The registered shift ``name``, from :data:`SHIFTS` or :data:`CALIBRATION_SHIFTS`."""
    shift = SHIFTS.get(name) or CALIBRATION_SHIFTS.get(name)
    if shift is None:
        known = ", ".join([*SHIFTS, *CALIBRATION_SHIFTS])
        raise KeyError(f"unknown shift {name!r}; known: {known}")
    return shift


def apply_shift(name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, *,
                seed: int = 0, organ_ids: Mapping[str, int] | None = None) -> Volume:
    """Apply the registered shift ``name`` (a key of :data:`SHIFTS` or
    :data:`CALIBRATION_SHIFTS`). ``seed`` drives the noise; ``organ_ids`` maps the contrast
    shift's organ names to the label's ids (default :data:`TOTALSEG_IDS`, ct_a's raw
    TotalSegmentator labels)."""
    shift = shift_named(name)
    p = dict(shift.params)
    if shift.kind == "none":
        img, lab, aff = _check(image, label, affine)
        return img.astype(np.float32), lab.copy(), aff.copy()
    if shift.kind == "resolution":
        return resample_inplane(image, label, affine, float(p["spacing_mm"]))
    if shift.kind == "thickness":
        return resample_thickness(image, label, affine, float(p["thickness_mm"]))
    if shift.kind == "noise":
        return add_noise(image, label, affine, float(p["sigma_hu"]), seed=seed)
    if shift.kind == "fine-noisy":
        fine = resample_inplane(image, label, affine, float(p["spacing_mm"]))
        return add_noise(*fine, float(p["sigma_hu"]), seed=seed)
    if shift.kind == "contrast":
        ids = TOTALSEG_IDS if organ_ids is None else organ_ids
        return contrast_offset(image, label, affine,
                               {ids[organ]: float(v) for organ, v in p["organs"].items()})
    if shift.kind == "enhance":
        return simulate_enhancement(image, label, affine, float(p["strength"]))
    if shift.kind == "crop":
        return crop_fov(image, label, affine, float(p["fraction"]), str(p["side"]))
    if shift.kind == "scale":
        return scale_anatomy(image, label, affine, float(p["factor"]))
    raise ValueError(f"shift {name!r} has unknown kind {shift.kind!r}")


def write_case(name: str, volume: Volume, block: tuple[int, int], folder: str | Path,
               label_map: Mapping[int, int]) -> dict[str, Any]:
    """One shifted volume written to ``folder`` as NIfTI, and its dataset entry (layout "json",
    role "val") restricted to ``block``, the slices of the shifted grid to score. Uncompressed:
    gzip of a 0.7 mm volume would dominate the run."""
    import nibabel as nib

    img, lab, aff = volume
    out = Path(folder).resolve()  # the dataset JSON may live elsewhere: absolute paths
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "".join(c if c.isalnum() else "_" for c in name)
    image_path, label_path = Path(f"{stem}_image.nii"), Path(f"{stem}_label.nii")
    nib.save(nib.Nifti1Image(img, aff), str(image_path))
    nib.save(nib.Nifti1Image(lab.astype(np.int16), aff), str(label_path))
    return {"id": name, "image": str(image_path), "label": str(label_path),
            "slices": list(block), "role": "val",
            "label_map": {str(k): int(v) for k, v in label_map.items()}}


def write_shifted_cases(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                        block: tuple[int, int], names: Sequence[str], folder: str | Path,
                        label_map: Mapping[int, int], seed: int = 0) -> list[dict[str, Any]]:
    """Each shift of ``names`` applied to the volume and written by :func:`write_case`, the
    block mapped into the shifted grid: cases for ``sfpc calibrate`` or the evaluator."""
    entries = []
    for name in names:
        shifted = apply_shift(name, image, label, affine, seed=seed)
        slab = map_slab(block, affine, image.shape, shifted[2], shifted[0].shape)
        entries.append(write_case(name, shifted, slab, folder, label_map))
    return entries
