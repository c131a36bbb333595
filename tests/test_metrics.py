"""Metrics against MONAI (the oracle for Dice, HD95 and ASD with spacing) and hand-worked cases
(empty-case policy, boundary band, boundary Dice, summaries)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from sfpc.training import metrics as M

torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")

# MONAI 1.6 warns about its own deprecated internal argument on every surface-distance call.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def blob(shape: tuple[int, ...], seed: int, sigma: float = 2.5, fraction: float = 0.3):
    """Smoothed noise thresholded at a quantile: irregular, multi-component, touching borders."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    smooth = ndimage.gaussian_filter(noise, sigma)
    return smooth > np.quantile(smooth, 1 - fraction)


def monai_reference(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> dict:
    p = torch.from_numpy(pred.astype(np.float32))[None, None]
    g = torch.from_numpy(gt.astype(np.float32))[None, None]
    return {
        "dice": float(monai_metrics.compute_dice(p, g, include_background=True)[0, 0]),
        "hd95": float(
            monai_metrics.compute_hausdorff_distance(
                p, g, include_background=True, percentile=95, spacing=spacing
            )[0, 0]
        ),
        "asd": float(
            monai_metrics.compute_average_surface_distance(
                p, g, include_background=True, symmetric=True, spacing=spacing
            )[0, 0]
        ),
    }


def onehot(labels: np.ndarray, num_classes: int):
    stacked = np.stack([labels == c for c in range(num_classes)])[None]
    return torch.from_numpy(stacked.astype(np.float32))


def padded_box(pred: np.ndarray, gt: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(pred | gt)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, pred.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


CASES = [
    ((64, 48), (0.7, 1.9), 0),
    ((57, 70), (2.5, 0.6), 1),
    ((40, 32, 24), (0.8, 1.1, 3.0), 2),
    ((33, 41, 19), (0.57, 0.57, 5.0), 3),
]


@pytest.mark.parametrize(("shape", "spacing", "seed"), CASES)
def test_agrees_with_monai_on_blobs_with_anisotropic_spacing(shape, spacing, seed):
    gt = blob(shape, seed)
    pred = blob(shape, seed + 100, fraction=0.25) | ndimage.binary_dilation(gt, iterations=1)
    ref = monai_reference(pred, gt, spacing)
    assert M.dice(pred, gt) == pytest.approx(ref["dice"], abs=1e-6)
    assert M.hd95(pred, gt, spacing) == pytest.approx(ref["hd95"], rel=1e-5)
    assert M.asd(pred, gt, spacing) == pytest.approx(ref["asd"], rel=1e-5)
    both = M.binary_metrics(pred, gt, spacing)
    assert both["hd95"] == pytest.approx(ref["hd95"], rel=1e-5)
    assert both["asd"] == pytest.approx(ref["asd"], rel=1e-5)
    assert both["dice"] == pytest.approx(ref["dice"], abs=1e-6)


def test_case_metrics_per_class_and_mean_agree_with_monai():
    shape, spacing = (36, 30, 20), (0.9, 0.9, 2.7)
    rng_fields = [ndimage.gaussian_filter(np.random.default_rng(s).standard_normal(shape), 2.0)
                  for s in (10, 11)]
    # Four-class label maps from the argmax of smoothed noise: classes touch each other.
    gt = np.digitize(rng_fields[0], np.quantile(rng_fields[0], [0.4, 0.6, 0.8])).astype(np.uint8)
    pred = np.digitize(rng_fields[0] + 0.3 * rng_fields[1],
                       np.quantile(rng_fields[0], [0.4, 0.6, 0.8])).astype(np.int64)
    out = M.case_metrics(pred, gt, 4, spacing, class_names=["background", "a", "b", "c"])
    assert list(out) == ["a", "b", "c", "mean"]

    p, g = onehot(pred, 4), onehot(gt, 4)
    dice = monai_metrics.compute_dice(p, g, include_background=False)[0].numpy()
    hd = monai_metrics.compute_hausdorff_distance(p, g, percentile=95, spacing=spacing)[0].numpy()
    sd = monai_metrics.compute_average_surface_distance(p, g, symmetric=True, spacing=spacing)
    sd = sd[0].numpy()
    for i, name in enumerate(["a", "b", "c"]):
        assert out[name]["dice"] == pytest.approx(dice[i], abs=1e-6)
        assert out[name]["hd95"] == pytest.approx(hd[i], rel=1e-5)
        assert out[name]["asd"] == pytest.approx(sd[i], rel=1e-5)
    assert out["mean"]["dice"] == pytest.approx(dice.mean(), abs=1e-6)
    assert out["mean"]["hd95"] == pytest.approx(hd.mean(), rel=1e-5)
    assert out["mean"]["asd"] == pytest.approx(sd.mean(), rel=1e-5)
    assert out["mean"]["boundary_dice"] == pytest.approx(
        np.mean([out[n]["boundary_dice"] for n in "abc"])
    )


def test_hand_worked_point_distances():
    # One voxel each, 3 voxels apart along an axis spaced 2 mm: every surface distance is 6 mm.
    gt = np.zeros((5, 9), bool)
    pred = np.zeros((5, 9), bool)
    gt[2, 2] = True
    pred[2, 5] = True
    assert M.hd95(pred, gt, (1.0, 2.0)) == pytest.approx(6.0)
    assert M.asd(pred, gt, (1.0, 2.0)) == pytest.approx(6.0)
    assert M.dice(pred, gt) == 0.0


def test_hand_worked_square_inside_square():
    # gt: 5x5 square, pred: its 3x3 centre. Edges: gt ring of 16, pred ring of 8 (the centre voxel
    # of the 3x3 is interior). pred->gt: every pred edge voxel is 1 voxel from the ring = 1 mm
    # (isotropic 1 mm). gt->pred: the 4 corners are at sqrt(2), the 12 others at 1.
    gt = np.zeros((9, 9), bool)
    gt[2:7, 2:7] = True
    pred = np.zeros((9, 9), bool)
    pred[3:6, 3:6] = True
    d_pg, d_gp = M.surface_distances(pred, gt, 1.0)
    assert np.sort(d_pg).tolist() == pytest.approx([1.0] * 8)
    assert np.sort(d_gp).tolist() == pytest.approx([1.0] * 12 + [math.sqrt(2)] * 4)
    assert M.asd(pred, gt, 1.0) == pytest.approx((8 + 12 + 4 * math.sqrt(2)) / 24)
    # 95th percentile of [1]*12 + [sqrt2]*4 by linear interpolation: position 0.95 * 15 = 14.25,
    # between two sqrt(2) values.
    assert M.hd95(pred, gt, 1.0) == pytest.approx(math.sqrt(2))
    assert M.dice(pred, gt) == pytest.approx(2 * 9 / (9 + 25))


SHAPE_3D, SPACING_3D = (10, 20, 5), (1.0, 0.5, 2.0)
DIAG_3D = math.sqrt(10**2 + 10**2 + 10**2)  # sqrt((10*1)^2 + (20*0.5)^2 + (5*2)^2)


def test_image_diagonal():
    assert M.image_diagonal_mm(SHAPE_3D, SPACING_3D) == pytest.approx(DIAG_3D)
    assert M.image_diagonal_mm((3, 4), 1.0) == pytest.approx(5.0)


@pytest.mark.parametrize("empty", ["pred", "gt"])
def test_empty_one_side_is_counted_as_worst(empty):
    full = np.zeros(SHAPE_3D, bool)
    full[2:5, 3:9, 1:3] = True
    nothing = np.zeros(SHAPE_3D, bool)
    pred, gt = (nothing, full) if empty == "pred" else (full, nothing)
    assert M.dice(pred, gt) == 0.0
    assert M.boundary_dice(pred, gt) == 0.0
    assert M.hd95(pred, gt, SPACING_3D) == pytest.approx(DIAG_3D)
    assert M.asd(pred, gt, SPACING_3D) == pytest.approx(DIAG_3D)
    assert M.binary_metrics(pred, gt, SPACING_3D) == pytest.approx(
        {"dice": 0.0, "hd95": DIAG_3D, "asd": DIAG_3D, "boundary_dice": 0.0}
    )


def test_both_empty_is_perfect():
    nothing = np.zeros(SHAPE_3D, bool)
    assert M.dice(nothing, nothing) == 1.0
    assert M.boundary_dice(nothing, nothing) == 1.0
    assert M.hd95(nothing, nothing, SPACING_3D) == 0.0
    assert M.asd(nothing, nothing, SPACING_3D) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        M.surface_distances(nothing, nothing, SPACING_3D)


def test_case_metrics_counts_absent_classes():
    gt = np.zeros(SHAPE_3D, np.uint8)
    pred = np.zeros(SHAPE_3D, np.uint8)
    gt[1:4, 1:4, 1:3] = 1
    pred[1:4, 1:4, 1:3] = 1
    pred[6:8, 10:12, 2:4] = 3  # class 3 predicted where there is none; class 2 absent in both
    out = M.case_metrics(pred, gt, 4, SPACING_3D)
    assert list(out) == ["class_1", "class_2", "class_3", "mean"]
    assert out["class_1"] == pytest.approx({"dice": 1, "hd95": 0, "asd": 0, "boundary_dice": 1})
    assert out["class_2"] == pytest.approx({"dice": 1, "hd95": 0, "asd": 0, "boundary_dice": 1})
    assert out["class_3"] == pytest.approx(
        {"dice": 0, "hd95": DIAG_3D, "asd": DIAG_3D, "boundary_dice": 0}
    )
    assert out["mean"] == pytest.approx(
        {"dice": 2 / 3, "hd95": DIAG_3D / 3, "asd": DIAG_3D / 3, "boundary_dice": 2 / 3}
    )


def test_case_metrics_accepts_channel_first_and_whole_float_labels():
    gt = np.zeros((1, 12, 12), np.float32)
    gt[0, 3:8, 3:8] = 1
    pred = gt.copy()
    pred[0, 3:8, 4:9] = 1
    pred[0, 3:8, 3] = 0
    out = M.case_metrics(pred, gt, 2, (1.0, 1.0), class_names=["lesion"])
    assert out["lesion"]["dice"] == pytest.approx(2 * 20 / 50)


def test_case_metrics_rejects_bad_input():
    lab = np.zeros((8, 8), np.int64)
    with pytest.raises(ValueError, match="outside"):
        M.case_metrics(lab + 3, lab, 3, 1.0)
    with pytest.raises(ValueError, match="non-integer"):
        M.case_metrics(lab + 0.5, lab, 3, 1.0)
    with pytest.raises(ValueError, match="class_names"):
        M.case_metrics(lab, lab, 3, 1.0, class_names=["a"])
    with pytest.raises(ValueError, match="shape"):
        M.case_metrics(lab[:4], lab, 3, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(lab > 0, lab > 0, (1.0, 2.0, 3.0))


def square_10x10() -> np.ndarray:
    g = np.zeros((10, 10), bool)
    g[2:6, 2:6] = True
    return g


def test_boundary_band_hand_worked_2d():
    # band=1 around the 4x4 square: the 6x6 block rows/cols 1..6, minus the 2x2 interior whose
    # 3x3 neighbourhoods lie inside the square.
    expected = np.zeros((10, 10), bool)
    expected[1:7, 1:7] = True
    expected[3:5, 3:5] = False
    np.testing.assert_array_equal(M.boundary_band(square_10x10(), 1), expected)
    # band=2: every square voxel is within 2 of the background; outside, rows/cols 0..7.
    expected2 = np.zeros((10, 10), bool)
    expected2[0:8, 0:8] = True
    np.testing.assert_array_equal(M.boundary_band(square_10x10(), 2), expected2)


def test_boundary_band_ignores_field_of_view_edge():
    # A strip covering rows 0..3 touches three image borders; only the row 3 | row 4 interface is
    # a boundary, so band=1 is rows 3 and 4.
    g = np.zeros((10, 10), bool)
    g[0:4, :] = True
    expected = np.zeros((10, 10), bool)
    expected[3:5, :] = True
    np.testing.assert_array_equal(M.boundary_band(g, 1), expected)


def test_boundary_band_hand_worked_3d():
    g = np.zeros((9, 9, 9), bool)
    g[2:7, 2:7, 2:7] = True  # 5^3 cube
    band = M.boundary_band(g, 1)
    # Outside part: the 7^3 shell around it (343 - 125); inside part: the cube minus its 3^3 core.
    assert band.sum() == (343 - 125) + (125 - 27)
    assert not band[3:6, 3:6, 3:6].any()
    assert band[1, 1, 1] and not band[0, 4, 4]


def test_boundary_dice_hand_worked():
    gt = square_10x10()
    # pred = gt shifted one column right. Band (band=1) holds the 12-voxel ring of gt and the 20
    # voxels around it. pred in band: 8 ring voxels + 4 in column 6 = 12; gt in band: 12; both: 8.
    pred = np.zeros_like(gt)
    pred[2:6, 3:7] = True
    assert M.boundary_dice(pred, gt, band=1) == pytest.approx(2 * 8 / (12 + 12))
    # Adding the diagonal corner voxel (6, 6): in the chessboard band, so pred-in-band is 13.
    pred = gt.copy()
    pred[6, 6] = True
    assert M.boundary_dice(pred, gt, band=1) == pytest.approx(2 * 12 / (13 + 12))
    # A false positive far from the boundary (outside the band) does not count.
    pred = gt.copy()
    pred[9, 9] = True
    assert M.boundary_dice(pred, gt, band=1) == 1.0
    assert M.dice(pred, gt) < 1.0


def test_boundary_dice_equals_full_computation_on_uncropped_volume():
    # The implementation crops to the union box; the definition is the uncropped band.
    gt = blob((40, 40, 16), 5)
    pred = blob((40, 40, 16), 6) | gt
    band = M.boundary_band(gt, 3)
    expected = 2 * (pred & gt & band).sum() / ((pred & band).sum() + (gt & band).sum())
    assert M.boundary_dice(pred, gt, band=3) == pytest.approx(expected)


masks_2d = arrays(
    bool, st.tuples(st.integers(2, 9), st.integers(2, 9)), elements=st.booleans()
)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_metric_properties(data):
    a = data.draw(masks_2d)
    b = data.draw(arrays(bool, a.shape, elements=st.booleans()))
    spacing = (data.draw(st.floats(0.3, 3.0)), data.draw(st.floats(0.3, 3.0)))
    d = M.dice(a, b)
    assert 0.0 <= d <= 1.0
    assert d == M.dice(b, a)
    assert M.dice(a, a) == 1.0
    assert 0.0 <= M.boundary_dice(a, b, band=1) <= 1.0
    assert M.boundary_dice(a, a, band=2) == 1.0
    diag = M.image_diagonal_mm(a.shape, spacing)
    hd, sd = M.hd95(a, b, spacing), M.asd(a, b, spacing)
    assert hd == pytest.approx(M.hd95(b, a, spacing))
    assert sd == pytest.approx(M.asd(b, a, spacing))
    # A real distance never exceeds the penalty given to an empty mask.
    assert 0.0 <= hd <= diag + 1e-9
    assert 0.0 <= sd <= diag + 1e-9
    assert M.hd95(a, a, spacing) == 0.0
    assert M.asd(a, a, spacing) == 0.0


def test_summarise_and_csv(tmp_path):
    rows = [
        {"case": "a", "liver": {"dice": 0.5, "hd95": 4.0}, "mean": {"dice": 0.5, "hd95": 4.0}},
        {"case": "b", "liver": {"dice": 1.0, "hd95": 0.0}, "mean": {"dice": 1.0, "hd95": 0.0}},
    ]
    summary = M.summarise(rows)
    assert summary["liver"]["dice"] == {"mean": 0.75, "std": 0.25, "n": 2.0}
    assert summary["mean"]["hd95"] == {"mean": 2.0, "std": 2.0, "n": 2.0}
    assert "case" not in summary
    json.dumps(summary)

    path = tmp_path / "sub" / "cases.csv"
    M.write_case_csv(rows, path)
    with path.open() as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == ["case", "liver_dice", "liver_hd95", "mean_dice", "mean_hd95"]
    assert read[1] == {"case": "b", "liver_dice": "1.0", "liver_hd95": "0.0",
                       "mean_dice": "1.0", "mean_hd95": "0.0"}


def test_large_ct_volume_is_fast_and_matches_monai_on_the_crop():
    # Liver-sized ellipsoids in a 512x512x100 CT grid: the crop keeps it well under a second.
    shape, spacing = (512, 512, 100), (0.7, 0.7, 2.5)
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gt = ((x - 250) / 125.0) ** 2 + ((y - 240) / 100.0) ** 2 + ((z - 50) / 40.0) ** 2 <= 1
    pred = ((x - 256) / 120.0) ** 2 + ((y - 245) / 104.0) ** 2 + ((z - 52) / 38.0) ** 2 <= 1
    start = time.perf_counter()
    out = M.binary_metrics(pred, gt, spacing)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"binary_metrics took {elapsed:.2f} s on a liver-sized class"

    # MONAI's metrics are translation invariant, so the oracle runs on a crop with a margin.
    box = (slice(120, 380), slice(130, 355), slice(5, 95))
    ref = monai_reference(pred[box], gt[box], spacing)
    assert out["dice"] == pytest.approx(ref["dice"], abs=1e-6)
    assert out["hd95"] == pytest.approx(ref["hd95"], rel=1e-5)
    assert out["asd"] == pytest.approx(ref["asd"], rel=1e-5)


def test_metrics_import_without_torch():
    code = (
        "import sys; import sfpc.training.metrics; "
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.data
def test_real_lesion_mask_agrees_with_monai():
    nib = pytest.importorskip("nibabel")
    path = DATA / "lesions" / "lung1_label.nii.gz"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    img = nib.load(path)
    gt = np.asarray(img.dataobj) > 0
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])  # 0.57 x 0.57 x 5 mm
    # A plausible imperfect prediction: dilated in-plane and shifted one slice.
    pred = np.roll(ndimage.binary_dilation(gt, np.ones((3, 3, 1), bool)), 1, axis=2)
    box = padded_box(pred, gt, margin=3)
    ref = monai_reference(pred[box], gt[box], spacing)
    out = M.binary_metrics(pred, gt, spacing)
    assert out["dice"] == pytest.approx(ref["dice"], abs=1e-6)
    assert out["hd95"] == pytest.approx(ref["hd95"], rel=1e-5)
    assert out["asd"] == pytest.approx(ref["asd"], rel=1e-5)


@pytest.mark.data
def test_real_organ_label_map_agrees_with_monai():
    nib = pytest.importorskip("nibabel")
    path = DATA / "organs" / "ct_a_label.nii.gz"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    img = nib.load(path)
    labels = np.asarray(img.dataobj)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    # The organ benchmark classes: spleen 1, liver 5, stomach 6 -> 1, 2, 3.
    gt = np.zeros(labels.shape, np.uint8)
    for new, old in enumerate((1, 5, 6), start=1):
        gt[labels == old] = new
    # An imperfect prediction: shifted two voxels and with the stomach partly eroded.
    pred = np.roll(gt, 2, axis=0)
    stomach = pred == 3
    pred[stomach & ~ndimage.binary_erosion(stomach, iterations=2)] = 0
    out = M.case_metrics(pred, gt, 4, spacing, class_names=["spleen", "liver", "stomach"])
    p, g = onehot(pred, 4), onehot(gt, 4)
    dice = monai_metrics.compute_dice(p, g, include_background=False)[0].numpy()
    hd = monai_metrics.compute_hausdorff_distance(p, g, percentile=95, spacing=spacing)[0].numpy()
    sd = monai_metrics.compute_average_surface_distance(p, g, symmetric=True, spacing=spacing)
    for i, name in enumerate(["spleen", "liver", "stomach"]):
        assert out[name]["dice"] == pytest.approx(dice[i], abs=1e-6)
        assert out[name]["hd95"] == pytest.approx(hd[i], rel=1e-5)
        assert out[name]["asd"] == pytest.approx(float(sd[0, i]), rel=1e-5)
