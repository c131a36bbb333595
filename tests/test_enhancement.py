"""Simulated contrast enhancement and field-of-view cuts (training augmentation, robustness shift).

Oracles: the HU table worked by hand (a voxel deep inside a tissue gets exactly its added HU when
nothing is smoothed; a smoothed map keeps its integral away from the borders), the CT window's
arithmetic (HU / window width), raw labels read back with nibabel and grouped with ``np.isin``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sfpc.training import shifts
from sfpc.training.config import ConfigError, check_values
from sfpc.training.data import SliceDataset2D, cut_field_of_view, elastic_deform_2d, load_volume
from sfpc.training.enhancement import (
    PORTAL_VENOUS_HU,
    TOTALSEG_TISSUES,
    ContrastEnhance,
    enhancement_hu,
    tissue_map_for,
)
from sfpc.training.layouts import Case, discover_cases


def test_enhancement_is_the_table_value_on_each_tissue_without_smoothing() -> None:
    tissue = np.zeros((6, 5), dtype=np.int16)
    tissue[1:3, 1:3] = 1
    tissue[4, :] = 2
    delta = enhancement_hu(tissue, ["liver", "artery"], {"liver": 60.0, "artery": 175.0},
                           sigma=0.0)
    assert np.all(delta[tissue == 1] == 60.0)
    assert np.all(delta[tissue == 2] == 175.0)
    assert np.all(delta[tissue == 0] == 0.0)


def test_smoothing_keeps_the_added_hu_integral_away_from_the_borders() -> None:
    tissue = np.zeros((40, 40), dtype=np.int16)
    tissue[15:25, 15:25] = 1
    delta = enhancement_hu(tissue, ["spleen"], {"spleen": 75.0}, sigma=0.7)
    assert delta.sum() == pytest.approx(75.0 * 100, rel=1e-4)
    assert delta[20, 20] == pytest.approx(75.0, abs=1e-3)  # deep inside: untouched by the blur
    assert 0 < delta[14, 20] < 75.0  # partial volume just outside the label


def test_contrast_enhance_adds_hu_over_the_window_width_and_spares_clipped_voxels() -> None:
    image = np.full((1, 8, 8), 0.5, dtype=np.float32)
    image[0, 0, :] = 0.0  # gas, clipped at the window's lower end
    image[0, 1, :] = 1.0  # bone, clipped at the upper end
    tissue = np.ones((8, 8), dtype=np.int16)  # all "liver"
    aug = ContrastEnhance(p=1.0, ranges={"liver": (60.0, 60.0)}, window=(-250.0, 350.0),
                          sigma=0.0)
    rng = np.random.default_rng(3)
    strength = np.random.default_rng(3)
    strength.random()  # the p draw
    s = strength.uniform(0.0, 1.0)
    out = aug(image, tissue, ["liver"], rng)
    assert np.allclose(out[0, 2:], 0.5 + s * 60.0 / 600.0, atol=1e-6)
    assert np.all(out[0, 0] == 0.0) and np.all(out[0, 1] == 1.0)


def test_contrast_enhance_with_p_zero_returns_the_image() -> None:
    image = np.random.default_rng(0).random((1, 5, 5)).astype(np.float32)
    out = ContrastEnhance(p=0.0)(image, np.ones((5, 5), np.int16), ["liver"],
                                 np.random.default_rng(0))
    assert np.array_equal(out, image)


def test_tissue_map_covers_every_group_once() -> None:
    m = tissue_map_for()
    ids = [i for group in TOTALSEG_TISSUES.values() for i in group]
    assert len(ids) == len(set(ids)) == len(m)
    assert m[5] == "liver" and m[1] == "spleen" and m[52] == "artery"
    assert set(PORTAL_VENOUS_HU) == set(TOTALSEG_TISSUES)


def test_cut_field_of_view_blanks_one_side_of_image_and_label() -> None:
    image = np.ones((1, 40, 30), dtype=np.float32)
    label = np.ones((40, 30), dtype=np.int16)
    for seed in range(20):
        img, lab = cut_field_of_view(image, label, np.random.default_rng(seed), 0.35)
        cut = img[0] == 0
        assert np.array_equal(cut, lab == 0)
        rows, cols = cut.all(axis=1), cut.all(axis=0)
        assert rows.any() or cols.any()  # whole rows or whole columns, not a patch
        band = rows.sum() / 40 if rows.any() else cols.sum() / 30
        assert 0.03 <= band <= 0.36
        idx = np.flatnonzero(rows if rows.any() else cols)
        n = 40 if rows.any() else 30
        assert idx[0] == 0 or idx[-1] == n - 1  # at an edge
    assert image.min() == 1.0 and label.min() == 1  # the inputs untouched


def _write_case(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    raw = np.zeros((12, 10, 4), dtype=np.int16)
    raw[2:6, 2:6, :] = 5  # liver
    raw[7:9, 3:5, :] = 52  # aorta
    raw[1, 8, :] = 999  # a structure outside every group
    hu = np.where(raw > 0, 40, -100).astype(np.int16)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    img_path, lab_path = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(img_path))
    nib.save(nib.Nifti1Image(raw, affine), str(lab_path))
    return img_path, lab_path, raw


def test_load_volume_groups_the_raw_label_into_tissues(tmp_path: Path) -> None:
    img_path, lab_path, _ = _write_case(tmp_path)
    case = Case(id="c", image=img_path, label=lab_path, label_map={5: 2},
                tissue_map=tissue_map_for())
    vol = load_volume(case, {"kind": "ct_window", "window": [-250.0, 350.0]})
    raw = np.asarray(nib.load(str(lab_path)).dataobj)
    assert vol.tissue is not None
    for name in ("liver", "artery"):
        k = vol.tissue_names.index(name) + 1
        assert np.array_equal(vol.tissue == k, np.isin(raw, TOTALSEG_TISSUES[name]))
    assert vol.tissue[1, 8, 0] == 0
    assert np.array_equal(vol.label == 2, raw == 5)


def test_case_tissue_map_round_trips_and_needs_a_label(tmp_path: Path) -> None:
    img_path, lab_path, _ = _write_case(tmp_path)
    case = Case(id="c", image=img_path, label=lab_path, tissue_map={"5": "liver"})
    entry = case.to_dict()
    assert entry["tissue_map"] == {"5": "liver"}
    (tmp_path / "d.json").write_text(json.dumps([entry]))
    (back,) = discover_cases(tmp_path / "d.json", "json")
    assert back.tissue_map == {5: "liver"}
    with pytest.raises(ValueError, match="tissue_map but no label"):
        Case(id="c", image=img_path, tissue_map={5: "liver"})


def test_slice_dataset_enhances_only_tissue_voxels(tmp_path: Path) -> None:
    img_path, lab_path, raw = _write_case(tmp_path)
    case = Case(id="c", image=img_path, label=lab_path, label_map={5: 1},
                tissue_map=tissue_map_for(["liver"]))
    vol = load_volume(case, {"kind": "ct_window", "window": [-250.0, 350.0]})
    ds = SliceDataset2D([vol], size=None, patch_size=(12, 10), flip=False, rotation=0.0,
                        enhance=ContrastEnhance(p=1.0, sigma=0.0))
    plain = SliceDataset2D([vol], size=None, patch_size=(12, 10), flip=False, rotation=0.0)
    img, _ = ds.sample(np.random.default_rng(1))
    ref, _ = plain.sample(np.random.default_rng(1))
    diff = (img - ref)[0] * 600.0
    liver = raw[..., 0] == 5
    lo, hi = PORTAL_VENOUS_HU["liver"]
    assert np.all(diff[~liver] == 0)
    assert np.ptp(diff[liver]) < 1e-3 and 0 <= diff[liver].mean() <= hi


def test_portal_venous_shift_adds_the_table_midpoints() -> None:
    raw = np.zeros((30, 30, 5), dtype=np.int16)
    raw[5:20, 5:20, :] = 5  # liver
    raw[21:30, 21:30, :] = 2  # kidney
    image = np.where(raw > 0, 50.0, -900.0).astype(np.float32)
    image[10, 10, :] = -600.0  # gas inside the liver label: below -250 HU, not enhanced
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    out, lab, aff = shifts.apply_shift("portal venous (simulated)", image, raw, affine)
    assert out[12, 12, 2] == pytest.approx(50.0 + np.mean(PORTAL_VENOUS_HU["liver"]), abs=0.01)
    assert out[25, 25, 2] == pytest.approx(50.0 + np.mean(PORTAL_VENOUS_HU["kidney"]), abs=0.01)
    assert out[10, 10, 2] == -600.0 and out[0, 0, 0] == -900.0
    assert np.array_equal(lab, raw) and np.array_equal(aff, affine)


@pytest.mark.parametrize("augment, match", [
    ({"enhance": {"p": 1.5}}, "probability"),
    ({"enhance": {"strength": 1}}, "enhance takes the keys"),
    ({"fov_cut": {"p": 0.2, "max": 1.5}}, "fov_cut.max"),
])
def test_config_rejects_bad_enhance_and_fov_cut(augment: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_values({"spatial_dims": 2, "augment": augment})


@pytest.mark.parametrize("seed", range(8))
def test_stomach_filling_replaces_only_the_lumen_with_a_plausible_content(seed: int) -> None:
    image = np.full((1, 20, 20), 0.45, dtype=np.float32)
    tissue = np.zeros((20, 20), dtype=np.int16)
    tissue[5:15, 4:16] = 1
    aug = ContrastEnhance(p=0.0, p_fill=1.0, window=(-250.0, 350.0))
    out = aug(image, tissue, ["stomach"], np.random.default_rng(seed))
    lumen = np.zeros((20, 20), dtype=bool)
    lumen[6:14, 5:15] = True  # the label eroded by one voxel (4-connected)
    assert np.array_equal(out[0, ~lumen], image[0, ~lumen])  # wall and outside untouched
    hu = out[0, lumen] * 600.0 - 250.0
    gas = hu <= -250.0 + 1e-3  # clipped at the window's lower end
    # Every lumen voxel is gas, water-like (0-25 HU +- noise) or positive contrast (150-350).
    assert np.all(gas | ((hu > -60) & (hu < 85)) | ((hu > 100) & (hu < 351)))
    if gas.any() and not gas.all():  # an air-fluid level: all gas lies anterior (higher y)
        ys = np.broadcast_to(np.arange(20), (20, 20))[lumen]
        assert ys[gas].min() > ys[~gas].max()


def test_elastic_deformation_with_zero_alpha_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((2, 30, 40)).astype(np.float32)
    label = (rng.random((30, 40)) > 0.5).astype(np.int16)
    out, lab = elastic_deform_2d(image, label, np.random.default_rng(1), 0.0, 10.0)
    np.testing.assert_allclose(out, image, atol=1e-6)
    assert np.array_equal(lab, label)


def test_elastic_deformation_is_smooth_and_keeps_labels_and_area() -> None:
    image = np.zeros((1, 80, 80), dtype=np.float32)
    label = np.zeros((80, 80), dtype=np.int16)
    yy, xx = np.mgrid[:80, :80]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 <= 15 ** 2
    label[disc], image[0, disc] = 2, 1.0
    areas = []
    for seed in range(10):
        out, lab = elastic_deform_2d(image, label, np.random.default_rng(seed), 200.0, 10.0)
        assert set(np.unique(lab)) <= {0, 2}
        areas.append((lab == 2).sum())
        # Image and label move together: the thresholded image is the label up to its edge.
        assert np.mean((lab == 2) != (out[0] > 0.5)) < 0.01
        assert (lab != label).any()  # it moved something
    # A smooth displacement of a few voxels changes the disc's area by little (oracle: pi r^2).
    assert abs(np.mean(areas) / (np.pi * 15 ** 2) - 1) < 0.15


def test_enhancement_refuses_a_window_that_is_not_scaled_to_unit_range() -> None:
    from sfpc.training.config import TrainConfig
    from sfpc.training.datamodule import _window

    scaled = TrainConfig(data="x", normalisation={"kind": "ct_window", "window": [-100, 300]})
    assert _window(scaled) == (-100.0, 300.0)
    zscored = TrainConfig(data="x", normalisation={"kind": "ct_window", "window": [-100, 300],
                                                   "mean": 50.0, "std": 40.0})
    with pytest.raises(ValueError, match="mean/std"):
        _window(zscored)
    with pytest.raises(ValueError, match="zscore"):
        _window(TrainConfig(data="x", normalisation={"kind": "zscore"}))
