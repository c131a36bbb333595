"""sfpc/inference/preprocess.py against nibabel, SimpleITK, MONAI and hand-worked values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sfpc.inference.preprocess import (
    Geometry,
    from_orientation,
    normalise,
    prepare_image,
    prepare_label,
    resample_affine,
    resample_to_shape,
    resample_to_spacing,
    resampled_shape,
    restore,
    spacing_from_affine,
    to_orientation,
    validate_normalisation,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# An oblique-free LPS-like affine with permuted axes: voxel axis 0 runs to -y (posterior),
# axis 1 to +z, axis 2 to -x (left); 1.5, 3 and 2 mm voxels.
PERMUTED_AFFINE = np.array(
    [[0, 0, -2.0, 10], [-1.5, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]], dtype=np.float64
)
LPS_AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])
LPS_AFFINE[:3, 3] = [50.0, 60.0, -20.0]


def test_preprocess_does_not_import_torch() -> None:
    code = "import sys, sfpc.inference.preprocess; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- normalisation


def test_ct_window_hand_worked() -> None:
    hu = np.array([-2000, -1000, -160, 0, 240, 3000], dtype=np.int32)
    out = normalise(hu, {"kind": "ct_window", "window": [-160, 240]})
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0, 0.4, 1, 1], atol=1e-7)


def test_ct_window_matches_monai() -> None:
    from monai.transforms import ScaleIntensityRange

    rng = np.random.default_rng(0)
    hu = rng.integers(-1200, 1500, size=(1, 9, 8, 7)).astype(np.float32)
    ours = normalise(hu, {"kind": "ct_window", "window": [-175, 250]})
    ref = ScaleIntensityRange(-175, 250, 0.0, 1.0, clip=True)(hu)
    np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-6)


def test_zscore_nonzero_hand_worked() -> None:
    # foreground 2, 4, 6: mean 4, population std sqrt(8/3)
    x = np.array([0, 2, 0, 4, 6, 0], dtype=np.float32)
    out = normalise(x, {"kind": "zscore", "foreground": "nonzero"})
    s = np.sqrt(8 / 3)
    np.testing.assert_allclose(out, [0, -2 / s, 0, 0, 2 / s, 0], atol=1e-6)
    assert out[0] == 0 and out[2] == 0 and out[5] == 0  # background stays exactly 0


def test_zscore_all_and_monai_nonzero() -> None:
    from monai.transforms import NormalizeIntensity

    x = np.array([0, 2, 0, 4, 6, 0], dtype=np.float32)
    out = normalise(x, {"kind": "zscore", "foreground": "all"})
    mean, std = 2.0, np.sqrt(((x - 2) ** 2).mean())
    np.testing.assert_allclose(out, (x - mean) / std, atol=1e-6)

    rng = np.random.default_rng(1)
    vol = rng.normal(300, 50, size=(2, 10, 9, 8)).astype(np.float32)
    vol[:, :3] = 0
    ours = normalise(vol, {"kind": "zscore", "foreground": "nonzero"}, channel_axis=0)
    ref = NormalizeIntensity(nonzero=True, channel_wise=True)(vol)
    np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-5)


def test_minmax_and_percentiles() -> None:
    from monai.transforms import ScaleIntensityRangePercentiles

    x = np.array([10, 20, 30, 50], dtype=np.float32)
    np.testing.assert_allclose(normalise(x, {"kind": "minmax"}), [0, 0.25, 0.5, 1.0])

    rng = np.random.default_rng(2)
    vol = rng.gamma(2.0, 100.0, size=(1, 12, 11, 10)).astype(np.float32)
    ours = normalise(vol, {"kind": "minmax", "percentiles": [0.5, 99.5]}, channel_axis=0)
    ref = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(vol)
    np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-5)
    assert ours.min() == 0 and ours.max() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "zscore", "foreground": "nonzero"},
        {"kind": "zscore", "foreground": "all"},
        {"kind": "minmax"},
        {"kind": "minmax", "percentiles": [1, 99]},
    ],
)
def test_constant_images_give_zeros_not_nan(spec: dict) -> None:
    for value in (0.0, 7.0):
        out = normalise(np.full((4, 4, 4), value, dtype=np.float32), spec)
        assert np.isfinite(out).all() and (out == 0).all()


def test_non_finite_voxels_are_neutralised() -> None:
    x = np.array([np.nan, 1.0, 3.0, np.inf], dtype=np.float32)
    out = normalise(x, {"kind": "zscore", "foreground": "nonzero"})
    np.testing.assert_allclose(out, [0, -1, 1, 0])


def test_bad_specs_raise() -> None:
    with pytest.raises(ValueError, match="unknown normalisation kind 'histogram'"):
        normalise(np.zeros(3), {"kind": "histogram"})
    with pytest.raises(ValueError, match="hi > lo"):
        validate_normalisation({"kind": "ct_window", "window": [100, 100]})
    with pytest.raises(ValueError, match="foreground"):
        validate_normalisation({"kind": "zscore", "foreground": "brain"})
    with pytest.raises(ValueError):
        validate_normalisation({"window": [0, 1]})


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("affine", [PERMUTED_AFFINE, LPS_AFFINE])
def test_to_ras_matches_nibabel_canonical(affine: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    data = rng.random((5, 6, 7)).astype(np.float32)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    out, out_affine, transform = to_orientation(data, affine, "RAS")
    np.testing.assert_array_equal(out, np.asarray(canonical.dataobj))
    np.testing.assert_allclose(out_affine, canonical.affine)
    assert nib.aff2axcodes(out_affine) == ("R", "A", "S")
    # Round trip restores the exact array and shape.
    back = from_orientation(out, transform)
    assert back.shape == data.shape
    np.testing.assert_array_equal(back, data)


def test_to_ras_matches_simpleitk(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    data = rng.random((5, 6, 7)).astype(np.float32)
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, PERMUTED_AFFINE), path)
    # SimpleITK's DICOMOrient("RAS") yields the same voxel order; its arrays are (z, y, x).
    oriented = sitk.DICOMOrient(sitk.ReadImage(str(path)), "RAS")
    ref = sitk.GetArrayFromImage(oriented).transpose(2, 1, 0)
    out, out_affine, _ = to_orientation(data, PERMUTED_AFFINE, "RAS")
    np.testing.assert_array_equal(out, ref)
    # ITK origin is in LPS world coordinates.
    lps_origin = np.asarray(oriented.GetOrigin())
    np.testing.assert_allclose(out_affine[:3, 3], lps_origin * [-1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(spacing_from_affine(out_affine), oriented.GetSpacing(), atol=1e-6)


def test_orientation_channel_first_and_trailing_channels() -> None:
    rng = np.random.default_rng(5)
    cf = rng.random((2, 5, 6, 7)).astype(np.float32)
    out_cf, _, t = to_orientation(cf, PERMUTED_AFFINE, channel_first=True)
    for c in range(2):
        single, _, _ = to_orientation(cf[c], PERMUTED_AFFINE)
        np.testing.assert_array_equal(out_cf[c], single)
    np.testing.assert_array_equal(from_orientation(out_cf, t, channel_first=True), cf)
    # A 4D NIfTI keeps channels last; those axes ride along untouched.
    last = np.moveaxis(cf, 0, -1)
    out_last, _, _ = to_orientation(last, PERMUTED_AFFINE)
    np.testing.assert_array_equal(np.moveaxis(out_last, -1, 0), out_cf)


def test_spacing_from_affine_oblique() -> None:
    theta = np.deg2rad(30)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 1.2, 5.0])
    assert spacing_from_affine(affine) == pytest.approx((0.7, 1.2, 5.0))


# ---------------------------------------------------------------- resampling


def test_resample_keeps_extent_and_linear_ramp() -> None:
    shape, spacing, target = (20, 9, 6), (1.0, 2.0, 5.0), (0.7, 3.0, 2.0)
    i = np.arange(shape[0], dtype=np.float32)[:, None, None]
    ramp = np.broadcast_to(i * spacing[0], shape).astype(np.float32)  # value = x position in mm
    out = resample_to_spacing(ramp, spacing, target, order=1)
    new_shape = resampled_shape(shape, spacing, target)
    assert out.shape == new_shape == (29, 6, 15)
    extent, new_extent = np.multiply(shape, spacing), np.multiply(new_shape, target)
    assert np.all(np.abs(extent - new_extent) <= np.asarray(target) / 2 + 1e-9)
    # Voxel edges aligned: new voxel k centre is at old index (k + 0.5) * s - 0.5, s = old / new.
    s = shape[0] / new_shape[0]
    expected = ((np.arange(new_shape[0]) + 0.5) * s - 0.5) * spacing[0]
    interior = slice(2, -2)  # the outermost voxels clamp at the edge
    np.testing.assert_allclose(out[interior, 3, 7], expected[interior], atol=1e-4)


def test_resample_matches_simpleitk() -> None:
    rng = np.random.default_rng(6)
    data = ndsmooth(rng.random((16, 14, 10)).astype(np.float32))
    affine = np.diag([1.2, 0.9, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    target = (0.8, 1.5, 2.0)
    out = resample_to_spacing(data, spacing_from_affine(affine), target, order=1)
    out_affine = resample_affine(affine, data.shape, out.shape)

    # Same grid in SimpleITK (diagonal RAS affine -> LPS origin flips x, y), linear interpolation.
    img = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    img.SetSpacing(spacing_from_affine(affine))
    img.SetOrigin(tuple(affine[:3, 3] * [-1, -1, 1]))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    ref_img = sitk.Resample(
        img,
        [int(v) for v in out.shape],
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(out_affine[:3, 3] * [-1, -1, 1]),
        spacing_from_affine(out_affine),
        img.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )
    ref = sitk.GetArrayFromImage(ref_img).transpose(2, 1, 0)
    inner = (slice(2, -2),) * 3  # ITK pads outside the image, we clamp: compare the interior
    np.testing.assert_allclose(out[inner], ref[inner], atol=1e-5)


def ndsmooth(x: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, 1.5)


def test_resample_in_plane_only_and_none_axes() -> None:
    data = np.zeros((10, 10, 4), dtype=np.float32)
    out = resample_to_spacing(data, (1.5, 1.5, 10.0), (1.0, 1.0, 1.0), order=1, axes=(0, 1))
    assert out.shape == (15, 15, 4)
    out = resample_to_spacing(data, (1.5, 1.5, 10.0), (None, 3.0, None), order=1)
    assert out.shape == (10, 5, 4)
    cf = np.zeros((2, 10, 10, 4), dtype=np.float32)
    assert resample_to_spacing(cf, (1.5, 1.5, 10.0), 3.0, order=1).shape == (2, 5, 5, 13)


def test_label_round_trip_is_exact() -> None:
    rng = np.random.default_rng(7)
    label = rng.integers(0, 4, size=(7, 9, 5)).astype(np.uint8)
    up = resample_to_spacing(label, (1.0, 1.0, 2.0), (0.5, 0.5, 1.0), order=0)
    assert up.shape == (14, 18, 10) and up.dtype == np.uint8
    assert set(np.unique(up)) <= set(np.unique(label))
    back = resample_to_shape(up, label.shape, order=0)
    np.testing.assert_array_equal(back, label)


def test_resample_to_shape_restores_odd_shapes() -> None:
    rng = np.random.default_rng(8)
    image = rng.random((1, 37, 41, 13)).astype(np.float32)
    down = resample_to_spacing(image, (0.7, 0.7, 2.5), (1.3, 1.3, 2.5), order=1)
    back = resample_to_shape(down, image.shape[1:], order=1)
    assert back.shape == image.shape


# ---------------------------------------------------------------- full pipeline


def test_prepare_and_restore_round_trip() -> None:
    rng = np.random.default_rng(9)
    image = rng.normal(100, 20, size=(1, 12, 10, 8)).astype(np.float32)
    label = np.zeros((12, 10, 8), dtype=np.uint8)
    label[3:9, 2:7, 2:6] = 2
    model_img, geo = prepare_image(image, LPS_AFFINE, {"kind": "zscore", "foreground": "all"})
    assert model_img.dtype == np.float32 and model_img.shape == (1, 12, 10, 8)
    np.testing.assert_allclose(model_img.mean(), 0, atol=1e-5)
    assert nib.aff2axcodes(np.asarray(geo.affine)) == ("R", "A", "S")
    model_label = prepare_label(label, geo)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(label, LPS_AFFINE))
    np.testing.assert_array_equal(model_label, np.asarray(canonical.dataobj))
    np.testing.assert_array_equal(restore(model_label, geo), label)

    # With resampling: back on the input grid with the input's exact shape, and JSON-able.
    model_img, geo = prepare_image(image, LPS_AFFINE, None, target_spacing=(1.6, 1.6, None))
    assert geo.model_shape == (6, 5, 8)
    np.testing.assert_allclose(spacing_from_affine(np.asarray(geo.affine)), (1.6, 1.6, 2.5))
    probs = np.stack([model_img[0], -model_img[0]])
    assert restore(probs, geo, order=1).shape == (2, 12, 10, 8)
    assert Geometry.from_dict(geo.to_dict()) == geo
    up = prepare_label(label, geo)
    assert up.shape == geo.model_shape
    assert restore(up, geo).shape == label.shape


@pytest.mark.data
def test_real_lps_ct_matches_nibabel_canonical() -> None:
    path = DATA / "organs" / "mr_d_image.nii.gz"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    out, out_affine, transform = to_orientation(data, img.affine)
    canonical = nib.as_closest_canonical(img)
    np.testing.assert_array_equal(out, np.asarray(canonical.dataobj))
    np.testing.assert_allclose(out_affine, canonical.affine)
    np.testing.assert_array_equal(from_orientation(out, transform), data)


# -- "area" resampling (anti-aliased downsampling) --------------------------------------------


def _brute_area(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Oracle for shrinking every axis: repeat each voxel n_out times along each axis (so both
    grids' edges fall on the fine grid), then average blocks of n_in: exactly the overlap-
    weighted mean of the input voxels each output voxel covers."""
    fine = values.astype(np.float64)
    for axis, n_out in enumerate(shape):
        fine = np.repeat(fine, n_out, axis=axis)
    blocks = []
    for n_in, n_out in zip(values.shape, shape, strict=True):
        blocks += [n_out, n_in]
    return fine.reshape(blocks).mean(axis=tuple(range(1, 2 * len(shape), 2)))


@pytest.mark.parametrize("layout", ["C", "F", "reversed view"])
def test_area_resampling_is_the_overlap_weighted_mean(layout):
    from sfpc.inference.preprocess import resample_area

    rng = np.random.default_rng(21)
    values = rng.integers(-1000, 1500, size=(23, 17, 11)).astype(np.int16)
    arr = {"C": values, "F": np.asfortranarray(values),
           "reversed view": np.asfortranarray(values[::-1, :, ::-1])[::-1, :, ::-1]}[layout]
    assert np.array_equal(arr, values)
    for shape in [(7, 5, 3), (23, 4, 11), (6, 17, 2), (2, 3, 1)]:  # (2, 3, 1): long runs
        out = resample_area(arr[None], shape)
        assert out.dtype == np.float32 and out.shape == (1, *shape)
        np.testing.assert_allclose(out[0], _brute_area(values, shape), rtol=0, atol=0.02)
    # A constant stays constant; the sum scales with the voxel volume (mass is conserved).
    const = resample_area(np.full((1, 30, 20, 9), 40, np.int16), (7, 6, 4))
    np.testing.assert_allclose(const, 40.0, rtol=0, atol=1e-4)


def test_area_resampling_grows_axes_as_scipy_linear_zoom():
    """Where an axis grows, "area" interpolates as the linear path does (scipy's zoom, order 1,
    grid_mode, edges clamped), also when another axis shrinks."""
    from scipy import ndimage

    from sfpc.inference.preprocess import axis_weights, resample_area

    rng = np.random.default_rng(5)
    values = rng.normal(size=(12, 9, 8)).astype(np.float32)
    out = resample_area(values[None], (31, 20, 13))
    ref = ndimage.zoom(values, (31 / 12, 20 / 9, 13 / 8), order=1, mode="nearest",
                       grid_mode=True)
    np.testing.assert_allclose(out[0], ref, rtol=0, atol=1e-5)
    mixed = resample_area(values[None], (30, 3, 8))
    w = axis_weights(12, 30, "linear")
    expected = np.einsum("ai,ijk->ajk", w, _brute_area(values, (12, 3, 8)))
    np.testing.assert_allclose(mixed[0], expected, rtol=0, atol=1e-5)


def test_area_resampling_averages_noise_that_linear_passes_through():
    """The reason for the mode: white noise on a 4.3x finer grid reaches a 3 mm model grid with
    about 1/4.3 of its sd under area averaging (two shrinking axes: 1/sqrt(4.3^2)), while
    linear interpolation keeps most of it."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 40.0, size=(1, 430, 430, 4)).astype(np.float32)
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    area, geometry = prepare_image(noise, affine, None, [3.0, 3.0, None], resampling="area")
    linear, same = prepare_image(noise, affine, None, [3.0, 3.0, None], resampling="linear")
    assert geometry == same and area.shape == linear.shape == (1, 100, 100, 4)
    assert float(area.std()) == pytest.approx(40.0 / 4.3, rel=0.1)
    assert float(linear.std()) > 20.0
    with pytest.raises(ValueError, match="resampling"):
        prepare_image(noise, affine, None, [3.0, 3.0, None], resampling="cubic")


# ----------------------------------------------------------------------------------------------
# The model image prepared slab by slab (behind the network): the whole-image path is the oracle
# ----------------------------------------------------------------------------------------------

_CT_WINDOW = {"kind": "ct_window", "window": [-200.0, 300.0]}


@pytest.mark.parametrize("resampling", ["area", "linear"])
@pytest.mark.parametrize("layout", ["C", "F", "lps"])
def test_image_prepared_in_slabs_equals_the_whole_image(resampling, layout) -> None:
    from sfpc.inference.preprocess import prepare_image_in_slabs

    rng = np.random.default_rng(31)
    image = (rng.normal(size=(1, 47, 39, 13)) * 300).astype(np.int16)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    if layout == "F":
        image = np.asfortranarray(image)
    if layout == "lps":
        affine = np.diag([-0.8, -0.9, 2.5, 1.0])
    args = (image, affine, _CT_WINDOW, [2.0, 2.0, None], [0, 1])
    whole, geometry = prepare_image(*args, resampling=resampling)
    model, slab_geometry, fill = prepare_image_in_slabs(*args, resampling=resampling, axis=2)
    assert slab_geometry == geometry and model.shape == whole.shape
    for start, stop in [(0, 5), (5, 6), (6, 13)]:  # uneven slabs, one of a single slice
        fill(start, stop)
    np.testing.assert_allclose(model, whole, rtol=0, atol=1e-6)


def test_images_whose_slices_are_not_independent_are_prepared_whole() -> None:
    from sfpc.inference.preprocess import prepare_image_in_slabs

    image = np.zeros((1, 8, 8, 6), np.int16)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    zscore = {"kind": "zscore", "foreground": "all"}  # statistics of the whole image
    assert prepare_image_in_slabs(image, affine, zscore, [2.0, 2.0, None], [0, 1],
                                  axis=2) is None
    # The slice axis resampled (2.5D, 3D): a slice of the model grid mixes input slices.
    assert prepare_image_in_slabs(image, affine, _CT_WINDOW, [2.0, 2.0, 1.0], None,
                                  axis=2) is None
    assert prepare_image_in_slabs(image, affine, None, [2.0, 2.0, None], [0, 1],
                                  axis=2) is not None
