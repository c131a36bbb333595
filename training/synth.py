"""Seeded synthetic data sets that look enough like BraTS and ACDC to exercise the whole pipeline.

``brats``: 3D FLAIR-like head (skull-ish shell, CSF rim, grey/white texture, dark ventricles) with
an irregular hyperintense lesion and a brighter oedema-like halo; label 1 = whole tumour (core +
halo), as BraTS's "label > 0".
``acdc``: short-axis cine-like stacks with RV (crescent) = 1, myocardium (ring) = 2 and LV cavity
(disc) = 3, shrinking from base to apex.
Both get a multiplicative smooth bias field and Rician noise, are written as int16 NIfTI with a RAS
affine, and are fully determined by (seed, case index): any case can be regenerated on its own.

Usage: ``sfpc synth --kind brats --out data/synth --n 20 --unlabelled 40 --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

KINDS = ("brats", "acdc")
DEFAULT_SHAPE = {"brats": (96, 96, 96), "acdc": (128, 128, 8)}
DEFAULT_SPACING = {"brats": (1.0, 1.0, 1.0), "acdc": (1.5, 1.5, 8.0)}
LABEL_NAMES = {
    "brats": {"0": "background", "1": "whole tumour"},
    "acdc": {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"},
}
# What a trainer should use on these images (see sfpc/inference/preprocess.normalise).
SUGGESTED_NORMALISATION = {
    "brats": {"kind": "zscore", "foreground": "nonzero"},
    "acdc": {"kind": "minmax"},
}


def _smooth_field(
    rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float] | float
) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered noise with correlation length ``sigma`` voxels.

    Large sigmas are filtered on a coarser lattice and linearly upsampled: same look, a fraction
    of the cost.
    """
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (len(shape),))
    factor = np.maximum(1, np.floor(sigma / 3.0)).astype(int)
    low_shape = tuple(int(math.ceil(n / f)) + 1 for n, f in zip(shape, factor, strict=True))
    low = ndimage.gaussian_filter(
        rng.standard_normal(low_shape).astype(np.float32), sigma / factor, mode="wrap"
    )
    zoom = [n / m for n, m in zip(shape, low_shape, strict=True)]
    field = ndimage.zoom(low, zoom, order=1, grid_mode=True, mode="nearest")
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels (MR magnitude images)."""
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _centred_grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Open (broadcastable) grids of physical coordinates in mm, zero at the volume centre."""
    axes = [
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s)
        for n, s in zip(shape, spacing, strict=True)
    ]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))


def ras_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Diagonal RAS affine with the world origin at the volume centre."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True)]
    return affine


# ----------------------------------------------------------------------------------------------
# BraTS-like 3D
# ----------------------------------------------------------------------------------------------


def brats_case(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE["brats"],
    spacing: Sequence[float] = DEFAULT_SPACING["brats"],
) -> tuple[np.ndarray, np.ndarray]:
    """One FLAIR-like head with a lesion: ``(image int16, label uint8)``, both ``shape``."""
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    x, y, z = _centred_grid(shape, spacing)
    extent = np.asarray(shape) * np.asarray(spacing) / 2.0
    sig = [8.0 / s for s in spacing]  # 8 mm correlation length, in voxels

    # Head: a slightly deformed ellipsoid, longer front-to-back, a little off-centre.
    radii = extent * rng.uniform([0.74, 0.84, 0.74], [0.84, 0.94, 0.84])
    centre = rng.uniform(-0.04, 0.04, 3) * extent
    r = np.sqrt(
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    )
    r = r * (1.0 + 0.025 * _smooth_field(rng, shape, [3 * s for s in sig]))
    head = r < 1.0
    brain = r < 0.86
    shell = head & (r >= 0.9)

    # Tissue: grey matter brighter than white matter in FLAIR, plus fine texture and ventricles.
    white = brain & (r + 0.08 * _smooth_field(rng, shape, sig) < 0.62)
    tissue = np.where(white, 0.82, 1.0).astype(np.float32)
    tissue += 0.06 * _smooth_field(rng, shape, [s / 2 for s in sig])
    tissue += 0.03 * _smooth_field(rng, shape, [s / 6 for s in sig])
    vent_scale = rng.uniform(0.8, 1.2)
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        d = np.sqrt(
            ((x - centre[0] - side * 0.12 * radii[0]) / (0.07 * radii[0] * vent_scale)) ** 2
            + ((y - centre[1] - 0.05 * radii[1]) / (0.32 * radii[1] * vent_scale)) ** 2
            + ((z - centre[2] - 0.08 * radii[2]) / (0.14 * radii[2] * vent_scale)) ** 2
        )
        ventricles |= d < 1.0
    tissue[ventricles] = 0.25
    image = np.where(brain, tissue, 0.0).astype(np.float32)
    image = np.where(shell, 0.55 + 0.1 * _smooth_field(rng, shape, sig), image)

    # The lesion stays in parenchyma: ventricles keep their CSF signal and are never labelled.
    parenchyma = brain & ~ventricles
    label, gain = _brats_lesion(rng, shape, x, y, z, centre, radii, parenchyma, sig)
    image = np.where(parenchyma, image * gain, image)

    bias = np.exp(rng.uniform(0.12, 0.25) * _smooth_field(rng, shape, [6 * s for s in sig]))
    scale = rng.uniform(300.0, 600.0)
    image = _rician(rng, image * bias * scale, sigma=0.03 * scale)
    image[~head] = 0.0  # skull-stripped-style background: exactly zero, as BraTS ships it
    return np.clip(np.rint(image), 0, 32767).astype(np.int16), label


def _brats_lesion(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    centre: np.ndarray,
    radii: np.ndarray,
    brain: np.ndarray,
    sig: list[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular lesion: union of random ellipsoidal blobs, deformed by smooth noise.

    Sizes are relative to the head, so small test volumes get proportionally small lesions.
    Returns the whole-tumour label and the multiplicative intensity gain (fuzzy core and a
    brighter halo). Retries until the lesion is a reasonable size and inside the brain.
    """
    min_voxels = max(50, int(0.002 * np.prod(shape)))
    deform = _smooth_field(rng, shape, sig)
    head_radius = float(np.mean(radii))
    for _ in range(50):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        lesion_centre = centre + direction * rng.uniform(0.1, 0.5) * radii
        field = np.full(shape, -np.inf, dtype=np.float32)
        for _blob in range(rng.integers(2, 5)):
            offset = rng.normal(0.0, 0.15 * head_radius, 3)
            blob_radii = rng.uniform(0.12, 0.35, 3) * head_radius
            d = np.sqrt(
                ((x - lesion_centre[0] - offset[0]) / blob_radii[0]) ** 2
                + ((y - lesion_centre[1] - offset[1]) / blob_radii[1]) ** 2
                + ((z - lesion_centre[2] - offset[2]) / blob_radii[2]) ** 2
            )
            field = np.maximum(field, 1.0 - d)
        field = field + 0.25 * deform
        halo = rng.uniform(0.3, 0.6)  # how far (in blob-radius units) the oedema reaches
        label = (field > -halo) & brain
        if min_voxels <= label.sum() <= 0.25 * brain.sum():
            break
    else:  # pragma: no cover - the ranges above make this practically unreachable
        raise RuntimeError("could not place a lesion; is the volume too small?")
    width = 0.06  # edge fuzziness, in field units
    core_gain, halo_gain = rng.uniform(0.35, 0.7), rng.uniform(0.8, 1.2)
    core_texture = 1.0 + 0.15 * _smooth_field(rng, shape, [s / 3 for s in sig])
    gain = (
        1.0
        + halo_gain * _sigmoid((field + halo) / width)
        - (halo_gain - core_gain * core_texture) * _sigmoid(field / width)
    )
    return label.astype(np.uint8), gain.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# ACDC-like 2D stacks
# ----------------------------------------------------------------------------------------------


def acdc_case(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE["acdc"],
    spacing: Sequence[float] = DEFAULT_SPACING["acdc"],
) -> tuple[np.ndarray, np.ndarray]:
    """One short-axis stack, base (slice 0) to apex: ``(image int16, label uint8)``."""
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    nx, ny, nz = shape
    xs, ys = _centred_grid((nx, ny), spacing[:2])
    half = np.array([nx * spacing[0], ny * spacing[1]]) / 2.0

    # Case-level anatomy and contrast.
    body_r = half * np.array([rng.uniform(0.8, 0.95), rng.uniform(0.6, 0.75)])
    heart = np.array([rng.uniform(-0.15, 0.1), rng.uniform(-0.1, 0.15)]) * half
    r_lv0 = rng.uniform(14.0, 25.0)  # end-diastolic to end-systolic cavity radii, mm
    wall0 = rng.uniform(6.0, 11.0)
    r_rv0 = rng.uniform(1.0, 1.2) * (r_lv0 + wall0)
    rv_angle = np.deg2rad(rng.uniform(150.0, 210.0))  # RV sits to the image's -x side of the LV
    contrast = {
        "blood": rng.uniform(0.85, 1.0),
        "myo": rng.uniform(0.22, 0.35),
        "body": rng.uniform(0.35, 0.5),
        "fat": rng.uniform(0.7, 0.85),
        "lung": rng.uniform(0.03, 0.08),
    }
    n_papillary = int(rng.integers(1, 3))
    papillary_angles = rng.uniform(0, 2 * np.pi, n_papillary)

    image = np.zeros(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    texture_sigma = [6.0 / s for s in spacing[:2]]
    apex_rv = nz - int(rng.integers(1, 3))  # the RV ends a slice or two before the apex
    for k in range(nz):
        t = k / max(nz - 1, 1)
        shrink = 1.0 - 0.55 * t**1.5
        c = heart + rng.normal(0.0, 1.5, 2)
        r_lv = r_lv0 * shrink * rng.uniform(0.95, 1.05)
        wall = wall0 * (1.0 - 0.2 * t)
        dx, dy = xs - c[0], ys - c[1]
        rho = np.sqrt(dx**2 + dy**2)
        phi = np.arctan2(dy, dx)
        # Irregular contours: low-order angular harmonics.
        wobble = 1.0 + sum(
            rng.uniform(0.0, 0.06) * np.cos(m * phi - rng.uniform(0, 2 * np.pi)) for m in (2, 3)
        )
        lv = rho < r_lv * wobble
        myo = ~lv & (rho < (r_lv + wall) * wobble)
        rv = np.zeros_like(lv)
        if k < apex_rv:
            # A disc shifted towards the RV side, flattened along the shift, minus the LV and
            # its wall: a crescent hugging the septum.
            direction = np.array([np.cos(rv_angle), np.sin(rv_angle)])
            rc = c + (r_lv + wall) * rng.uniform(0.45, 0.65) * direction
            r_rv = r_rv0 * (1.0 - 0.6 * t) * rng.uniform(0.93, 1.07)
            u = (xs - rc[0]) * direction[0] + (ys - rc[1]) * direction[1]
            v = -(xs - rc[0]) * direction[1] + (ys - rc[1]) * direction[0]
            rv = (np.sqrt((u / 0.85) ** 2 + v**2) < r_rv) & ~lv & ~myo
        # Body, subcutaneous fat rim and lungs beside the heart.
        q = np.sqrt((xs / body_r[0]) ** 2 + (ys / body_r[1]) ** 2)
        body = q < 1.0
        fat = body & (q > 0.9)
        lungs = np.zeros_like(body)
        for side in (-1.0, 1.0):
            lc = np.array([side * 0.45 * body_r[0], 0.05 * body_r[1]])
            lung_rx, lung_ry = 0.33 * body_r[0], 0.6 * body_r[1]
            lungs |= ((xs - lc[0]) / lung_rx) ** 2 + ((ys - lc[1]) / lung_ry) ** 2 < 1.0
        lungs &= ~(rho < (r_lv + wall) * 1.6) & ~fat
        gain = rng.uniform(0.95, 1.05)
        sl = np.where(body, contrast["body"], 0.0).astype(np.float32)
        sl += 0.05 * _smooth_field(rng, (nx, ny), texture_sigma) * body
        sl[fat] = contrast["fat"]
        sl[lungs] = contrast["lung"]
        sl[rv] = contrast["blood"] * 0.95
        sl[lv] = contrast["blood"]
        sl[myo] = contrast["myo"]
        for a in papillary_angles:  # dark papillary muscles in the cavity, labelled LV as in ACDC
            pc = c + 0.6 * r_lv * np.array([np.cos(a), np.sin(a)])
            papillary = np.sqrt((xs - pc[0]) ** 2 + (ys - pc[1]) ** 2) < 0.15 * r_lv
            sl[papillary & lv] = contrast["myo"]
        image[..., k] = ndimage.gaussian_filter(sl * gain, 0.7)  # partial-volume edges
        label[..., k][rv] = 1
        label[..., k][myo] = 2
        label[..., k][lv] = 3

    bias = np.exp(rng.uniform(0.1, 0.2) * _smooth_field(rng, shape, [40.0 / s for s in spacing]))
    scale = rng.uniform(200.0, 800.0)
    image = _rician(rng, image * bias * scale, sigma=rng.uniform(0.015, 0.03) * scale)
    return np.clip(np.rint(image), 0, 32767).astype(np.int16), label


# ----------------------------------------------------------------------------------------------
# Writing data sets
# ----------------------------------------------------------------------------------------------


def generate(
    kind: str,
    out_dir: str | Path,
    n_cases: int,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    n_unlabelled: int = 0,
) -> list[dict[str, Any]]:
    """Write ``n_cases`` labelled and ``n_unlabelled`` unlabelled cases plus ``dataset.json``.

    Files are ``<out>/<id>_image.nii.gz`` and, for labelled cases, ``<out>/<id>_label.nii.gz``
    (the folder layout of training/data.py). Case ``i`` depends only on ``(seed, i)``.
    Returns one ``{"id", "image", "label"}`` dict per case (absolute paths; label None when
    unlabelled); ``dataset.json`` lists the same with paths relative to ``out_dir``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {KINDS}")
    if n_cases < 0 or n_unlabelled < 0:
        raise ValueError("case counts must be non-negative")
    shape = tuple(int(n) for n in (shape or DEFAULT_SHAPE[kind]))
    spacing = tuple(float(s) for s in (spacing or DEFAULT_SPACING[kind]))
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError(f"shape and spacing need 3 entries, got {shape} and {spacing}")
    make = brats_case if kind == "brats" else acdc_case
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = ras_affine(shape, spacing)

    cases: list[dict[str, Any]] = []
    for index in range(n_cases + n_unlabelled):
        case_id = f"{kind}_{index:03d}"
        image, label = make(np.random.default_rng([seed, index]), shape, spacing)
        image_path = out / f"{case_id}_image.nii.gz"
        _save(image, affine, image_path)
        label_path = None
        if index < n_cases:
            label_path = out / f"{case_id}_label.nii.gz"
            _save(label, affine, label_path)
        cases.append({"id": case_id, "image": str(image_path), "label": _str(label_path)})

    manifest = {
        "name": f"synthetic-{kind}",
        "kind": kind,
        "seed": seed,
        "shape": list(shape),
        "spacing": list(spacing),
        "labels": LABEL_NAMES[kind],
        "normalisation": SUGGESTED_NORMALISATION[kind],
        "cases": [
            {
                "id": c["id"],
                "image": Path(c["image"]).name,
                "label": Path(c["label"]).name if c["label"] else None,
            }
            for c in cases
        ],
    }
    (out / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return cases


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``sfpc synth`` entry point."""
    parser = argparse.ArgumentParser(
        prog="sfpc synth", description="Write a seeded synthetic BraTS-like or ACDC-like data set."
    )
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=20, help="labelled cases (default 20)")
    parser.add_argument("--unlabelled", type=int, default=0, help="extra cases without labels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"))
    args = parser.parse_args(argv)
    cases = generate(
        args.kind, args.out, args.n, args.seed, args.shape, args.spacing, args.unlabelled
    )
    n_lab = sum(c["label"] is not None for c in cases)
    print(f"wrote {len(cases)} {args.kind} cases ({n_lab} labelled) to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
