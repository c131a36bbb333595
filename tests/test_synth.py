"""training/synth.py: files, determinism, anatomy of the labels, and discovery of the output."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sfpc.training.data import discover_cases
from sfpc.training.synth import acdc_case, brats_case, generate, main


def read(path: str | Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_brats_generate_files_and_manifest(tmp_path: Path) -> None:
    cases = generate("brats", tmp_path, n_cases=2, seed=3, shape=(48, 48, 40), n_unlabelled=1)
    assert [c["id"] for c in cases] == ["brats_000", "brats_001", "brats_002"]
    assert cases[2]["label"] is None and not (tmp_path / "brats_002_label.nii.gz").exists()
    img = nib.load(cases[0]["image"])
    assert img.shape == (48, 48, 40) and img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["kind"] == "brats" and manifest["seed"] == 3
    assert [c["label"] for c in manifest["cases"]] == [
        "brats_000_label.nii.gz", "brats_001_label.nii.gz", None]
    # The output reads back through both the folder and the JSON layouts.
    for source in (tmp_path, tmp_path / "dataset.json"):
        found = discover_cases(source)
        assert [(c.id, c.label is not None) for c in found] == [
            ("brats_000", True), ("brats_001", True), ("brats_002", False)]


def test_brats_lesion_is_a_bright_region_inside_the_head() -> None:
    for index in range(3):
        image, label = brats_case(np.random.default_rng([0, index]), (64, 64, 64))
        assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
        # The dark CSF rim can round to 0 inside the head: fill it to get the head mask.
        head = ndimage.binary_fill_holes(image > 0)
        assert label.sum() >= 0.002 * label.size
        # Every lesion voxel is inside the head, eroded so the skull shell stays outside too.
        assert not (label > 0)[~ndimage.binary_erosion(head, iterations=2)].any()
        # Hyperintense: the lesion is brighter than the rest of the head, the halo (outer
        # layer of the label) brighter than the tissue just outside it.
        tissue = (image > 0) & (label == 0)
        assert np.median(image[label > 0]) > 1.3 * np.median(image[tissue])
        outside = ndimage.binary_dilation(label > 0, iterations=3) & tissue
        rim = (label > 0) & ~ndimage.binary_erosion(label > 0, iterations=2)
        assert image[rim].mean() > image[outside].mean()
        assert (image[~head] == 0).all()  # skull-stripped-style background


def test_acdc_anatomy() -> None:
    image, label = acdc_case(np.random.default_rng([1, 0]))
    assert image.shape == label.shape == (128, 128, 8)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    lv_area = [(label[..., k] == 3).sum() for k in range(8)]
    assert all(a > 0 for a in lv_area) and lv_area[0] > lv_area[-1]  # base to apex shrink
    for k in range(8):
        lv, myo, rv = label[..., k] == 3, label[..., k] == 2, label[..., k] == 1
        # The myocardium encloses the cavity: LV grown by a pixel stays inside LV + Myo.
        assert not (ndimage.binary_dilation(lv) & ~(lv | myo)).any()
        # The RV never touches the LV cavity directly.
        assert not (ndimage.binary_dilation(rv) & lv).any()
    assert (label[..., 0] == 1).any()  # the RV is present at the base
    # Bright blood, dark muscle (cine SSFP contrast).
    assert np.median(image[label == 3]) > 1.5 * np.median(image[label == 2])
    assert np.median(image[label == 1]) > 1.5 * np.median(image[label == 2])


def test_acdc_generate_and_variation(tmp_path: Path) -> None:
    cases = generate("acdc", tmp_path, n_cases=3, seed=0)
    img = nib.load(cases[0]["image"])
    np.testing.assert_allclose(img.header.get_zooms(), (1.5, 1.5, 8.0))
    areas = [(read(c["label"]) == 3).sum() for c in cases]
    assert len(set(areas)) == 3  # cases differ
    found = discover_cases(tmp_path)
    assert all(c.label is not None for c in found)


def test_generation_is_seeded(tmp_path: Path) -> None:
    a = generate("brats", tmp_path / "a", 2, seed=9, shape=(32, 32, 32))
    b = generate("brats", tmp_path / "b", 2, seed=9, shape=(32, 32, 32))
    c = generate("brats", tmp_path / "c", 2, seed=10, shape=(32, 32, 32))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(read(x["image"]), read(y["image"]))
        np.testing.assert_array_equal(read(x["label"]), read(y["label"]))
    assert not np.array_equal(read(a[0]["image"]), read(c[0]["image"]))
    # Case i depends only on (seed, i): a bigger set starts with the same cases.
    more = generate("brats", tmp_path / "d", 3, seed=9, shape=(32, 32, 32))
    np.testing.assert_array_equal(read(more[1]["image"]), read(a[1]["image"]))


def test_main_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    code = main(["--kind", "acdc", "--out", str(out), "--n", "2", "--unlabelled", "2", "--seed",
                 "4", "--shape", "64", "64", "4"])
    assert code == 0
    assert "wrote 4 acdc cases (2 labelled)" in capsys.readouterr().out
    assert len(list(out.glob("*_image.nii.gz"))) == 4 and len(list(out.glob("*_label.nii.gz"))) == 2
    assert read(out / "acdc_000_image.nii.gz").shape == (64, 64, 4)
    with pytest.raises(SystemExit):
        main(["--kind", "kidney", "--out", str(out)])
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        generate("kidney", out, 1)


def test_default_brats_case_is_fast() -> None:
    # 20 default-size (96^3) cases must take well under a minute: allow 2 s each.
    start = time.perf_counter()
    image, label = brats_case(np.random.default_rng(0))
    assert image.shape == label.shape == (96, 96, 96)
    assert time.perf_counter() - start < 2.0
