"""The data set fingerprint and the plan (sfpc.training.plan): synthetic NIfTI data sets with
known spacing, orientation, anisotropy, modality and labels, checked against values worked out by
hand or computed directly with numpy/nibabel on the whole arrays."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sfpc.inference.preprocess import normalise, to_orientation
from sfpc.training import plan as planmod
from sfpc.training.config import ConfigError, resolve_spacing
from sfpc.training.organ_task import make_organ_dataset
from sfpc.training.plan import fingerprint_dataset, make_plan
from tests.support.paths import ORGANS

GPU = {"kind": "cuda", "name": "test GPU", "memory_bytes": 80 * 2**30}
CPU = {"kind": "cpu", "name": "cpu"}


def save(path: Path, data: np.ndarray, spacing: tuple[float, float, float],
         affine: np.ndarray | None = None) -> None:
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    nib.Nifti1Image(data, affine).to_filename(str(path))


def ct_case(rng: np.random.Generator, shape: tuple[int, int, int], side: float = 0.5
            ) -> tuple[np.ndarray, np.ndarray]:
    """Air (-1000 HU) around a soft-tissue body (~40 HU) with one organ (~60 HU) whose centre
    sits at ``side`` of the width."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    image = np.full(shape, -1000, dtype=np.int16)
    body = ((x - shape[0] / 2) / (0.45 * shape[0])) ** 2 + (
        (y - shape[1] / 2) / (0.4 * shape[1])) ** 2 < 1
    image[body] = rng.normal(40, 10, int(body.sum())).astype(np.int16)
    organ = ((x - side * shape[0]) ** 2 + (y - shape[1] / 2) ** 2 < (shape[0] / 8) ** 2) & (
        z > 1) & (z < shape[2] - 1)
    image[organ] = rng.normal(60, 15, int(organ.sum())).astype(np.int16)
    return image, organ.astype(np.uint8)


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory) -> Path:
    """Three labelled anisotropic CT cases (0.8 x 0.8 x 4 mm) and one without a label."""
    out = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(64, 60, 12), (64, 64, 10), (60, 64, 14)]):
        image, label = ct_case(rng, shape)
        save(out / f"c{i}_image.nii.gz", image, (0.8, 0.8, 4.0))
        save(out / f"c{i}_label.nii.gz", label, (0.8, 0.8, 4.0))
    image, _ = ct_case(rng, (64, 64, 12))
    save(out / "u0_image.nii.gz", image, (0.8, 0.8, 4.0))
    return out


def test_ct_anisotropic_fingerprint_and_plan(ct_folder: Path) -> None:
    fp = fingerprint_dataset(ct_folder)
    assert (fp["n_cases"], fp["n_labelled"], fp["n_unlabelled"]) == (4, 3, 1)
    assert fp["spacing"]["median"] == pytest.approx([0.8, 0.8, 4.0])
    assert fp["anisotropy"] == {"ratio": pytest.approx(5.0), "coarse_axis": 2}
    assert fp["region"]["median"] == [64.0, 64.0, 12.0]
    assert fp["modality"][0]["guess"] == "CT"
    # Fewer labelled voxels than the sample size: the sample is all of them, so its
    # percentiles are those of every labelled voxel.
    values = []
    voxels = 0
    for i in range(3):
        image = np.asarray(nib.load(str(ct_folder / f"c{i}_image.nii.gz")).dataobj)
        label = np.asarray(nib.load(str(ct_folder / f"c{i}_label.nii.gz")).dataobj)
        values.append(image[label > 0].astype(np.float64))
        voxels += int((label > 0).sum())
    values = np.concatenate(values)
    assert voxels < 3 * planmod.FOREGROUND_SAMPLES
    fg = fp["foreground_intensity"][0]
    assert fg["samples"] == voxels
    assert fg["p00_5"] == pytest.approx(np.percentile(values, 0.5), abs=1e-3)
    assert fg["p99_5"] == pytest.approx(np.percentile(values, 99.5), abs=1e-3)
    assert fg["mean"] == pytest.approx(values.mean(), rel=1e-5)
    assert fp["classes"]["1"]["voxels_total"] == voxels
    assert fp["classes"]["1"]["volume_ml_median"] == pytest.approx(
        np.median([np.asarray(nib.load(str(ct_folder / f"c{i}_label.nii.gz")).dataobj).sum()
                   for i in range(3)]) * 0.8 * 0.8 * 4 / 1000, abs=1e-3)  # ml, 3 decimals

    plan = make_plan(fp, {}, GPU)
    v = plan.values
    assert v["spatial_dims"] == 2 and v["plane"] == "axial"  # anisotropy 5 >= 3, even on a GPU
    assert "anisotrop" in plan.why["spatial_dims"]
    assert v["spacing"] == [0.8, 0.8, None]
    assert v["patch_size"] == [64, 64]  # the median 64 x 64 slice, a multiple of 16
    assert v["normalisation"]["kind"] == "ct_window"
    # The organ's percentiles span ~80 HU: widened to a 400 HU window around its median.
    p_lo, med, p_hi = np.percentile(values, [0.5, 50, 99.5])
    assert p_hi - p_lo < 400
    assert v["normalisation"]["window"] == pytest.approx(
        [min(p_lo, med - 200), max(p_hi, med + 200)], abs=0.1)
    assert "soft-tissue window" in plan.why["normalisation"]
    assert v["normalisation"]["mean"] == pytest.approx(values.mean(), abs=0.01)
    assert v["normalisation"]["std"] == pytest.approx(values.std(), abs=0.01)
    assert v["method"] == "sfpc"  # one case without a label
    assert v["val_count"] == 1 and v["labelled_fraction"] is None
    assert v["augment"]["flip"] is True  # one central class
    assert v["iterations"] == 6000 and v["lr_step"] == 2500
    assert set(plan.why) == set(plan.values) and all(plan.why.values())


def test_ct_window_rules(ct_folder: Path) -> None:
    """nnU-Net's rule (the labelled voxels' percentiles) behind --ct-window-rule foreground;
    a window already wider than 400 HU is left as the percentiles give it."""
    fp = fingerprint_dataset(ct_folder)
    fg = fp["foreground_intensity"][0]
    plan = make_plan(fp, {"ct_window_rule": "foreground"}, GPU)
    assert plan.values["normalisation"]["window"] == pytest.approx(
        [fg["p00_5"], fg["p99_5"]], abs=0.1)
    assert "as nnU-Net" in plan.why["normalisation"]
    wide = json.loads(json.dumps(fp))
    wide["foreground_intensity"][0].update(p00_5=-900.0, median=-500.0, p99_5=100.0)
    plan = make_plan(wide, {}, GPU)
    assert plan.values["normalisation"]["window"] == [-900.0, 100.0]


def test_organ_split_names_its_classes(tmp_path: Path) -> None:
    """`sfpc organ-split`'s dataset JSON carries the label names the plan reads."""
    if not (ORGANS / "ct_a_label.nii.gz").is_file():
        pytest.skip("../shared/data/organs is not beside the project")
    make_organ_dataset(ORGANS, tmp_path / "dataset.json", 0.1, 1337, selection="even")
    assert planmod._class_names_from(tmp_path / "dataset.json") == [
        "background", "spleen", "liver", "stomach"]


def test_given_values_win_and_the_rest_follows(ct_folder: Path) -> None:
    fp = fingerprint_dataset(ct_folder)
    plan = make_plan(fp, {"spatial_dims": 3, "iterations": 900, "spacing": [1.0, 1.0, 4.0]},
                     GPU)
    assert plan.values["spatial_dims"] == 3 and plan.why["spatial_dims"].startswith("given")
    assert plan.values["lr_step"] == 375  # 2500/6000 of the given 900
    assert len(plan.values["patch_size"]) == 3
    # 64 x 64 x 12 voxels at 0.8 x 0.8 x 4 mm are 51.2 x 51.2 x 12 at 1 x 1 x 4 mm
    assert plan.values["patch_size"] == [64, 64, 32]  # z: 12 slices, padded to 2 x 16
    assert plan.values["augment"].keys() <= {"flip", "rotate90", "intensity"}
    # a two-value spacing is a 2D model's in-plane spacing
    plan = make_plan(fp, {"spacing": [0.5, 0.5]}, GPU)
    assert plan.values["spatial_dims"] == 2


def test_mr_isotropic_plans_3d_on_a_gpu_and_2d_on_a_cpu(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(2):
        image = np.zeros((48, 48, 48), dtype=np.float32)
        image[8:40, 8:40, 8:40] = rng.uniform(100, 400, (32, 32, 32))  # zero background
        label = np.zeros((48, 48, 48), dtype=np.uint8)
        label[20:28, 20:28, 20:28] = 1
        save(tmp_path / f"m{i}_image.nii.gz", image, (1.0, 1.0, 1.0))
        save(tmp_path / f"m{i}_label.nii.gz", label, (1.0, 1.0, 1.0))
    fp = fingerprint_dataset(tmp_path)
    assert fp["modality"][0]["guess"] == "MR"
    nonzero = 32**3 / 48**3
    assert fp["nonzero_fraction_median"][0] == pytest.approx(nonzero)
    gpu = make_plan(fp, {}, GPU)
    assert gpu.values["spatial_dims"] == 3
    assert gpu.values["spacing"] == [1.0, 1.0, 1.0]
    assert gpu.values["patch_size"] == [48, 48, 48]
    assert gpu.values["normalisation"] == {"kind": "zscore", "foreground": "nonzero"}
    assert gpu.values["method"] == "supervised"  # every case has a label
    assert gpu.values["val_count"] == 0  # two labelled cases: both train
    cpu = make_plan(fp, {}, CPU)
    assert cpu.values["spatial_dims"] == 2 and "CPU" in cpu.why["spatial_dims"]
    assert cpu.values["iterations"] == planmod.CPU_ITERATIONS


def test_spacing_and_shape_come_out_in_ras_order(tmp_path: Path) -> None:
    """A volume stored with voxel axes (S, L, P): spacing 3, 0.7, 0.9 mm along them."""
    affine = np.array([[0, -0.7, 0, 0], [0, 0, -0.9, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    image = np.full((10, 40, 30), -1000, dtype=np.int16)
    image[:, 5:35, 5:25] = 50
    label = np.zeros((10, 40, 30), dtype=np.uint8)
    label[2:5, 10:20, 8:12] = 1
    save(tmp_path / "a_image.nii.gz", image, (1, 1, 1), affine)
    save(tmp_path / "a_label.nii.gz", label, (1, 1, 1), affine)
    fp = fingerprint_dataset(tmp_path)
    case = fp["cases"][0]
    assert case["spacing"] == pytest.approx([0.7, 0.9, 3.0])  # R, A, S
    assert case["shape"] == [40, 30, 10]
    ras, _, _ = to_orientation(label, affine, "RAS")
    cls = case["classes"]["1"]
    assert cls["voxels"] == int(ras.sum()) == 120
    assert cls["slices"] == [int(ras.any(axis=(1, 2)).sum()), int(ras.any(axis=(0, 2)).sum()),
                             int(ras.any(axis=(0, 1)).sum())]
    xs = np.nonzero(ras)[0]
    assert cls["centre_x"] == pytest.approx(((xs + 0.5).mean()) / ras.shape[0], abs=1e-4)
    assert cls["extent"][2] == [int(np.nonzero(ras.any(axis=(0, 1)))[0][0]),
                                int(np.nonzero(ras.any(axis=(0, 1)))[0][-1]) + 1]


def test_chunked_reading_gives_the_same_statistics(ct_folder: Path, monkeypatch) -> None:
    whole = fingerprint_dataset(ct_folder)
    monkeypatch.setattr(planmod, "CHUNK_VOXELS", 64 * 64 * 2)  # two slices per read
    chunked = fingerprint_dataset(ct_folder)
    for a, b in zip(whole["cases"], chunked["cases"], strict=True):
        assert a["classes"] == b["classes"]
        assert a["intensity"][0]["min"] == b["intensity"][0]["min"]
        assert a["intensity"][0]["max"] == b["intensity"][0]["max"]
        assert a["intensity"][0]["nonzero_fraction"] == b["intensity"][0]["nonzero_fraction"]
    assert whole["foreground_intensity"] == chunked["foreground_intensity"]


def test_slabs_of_one_labelled_volume_plan_2d_and_no_flips(tmp_path: Path) -> None:
    """An organ-split-like JSON: single labelled slices of one CT, classes on both sides."""
    rng = np.random.default_rng(2)
    shape = (64, 48, 40)
    image, left = ct_case(rng, shape, side=0.25)
    _, right = ct_case(rng, shape, side=0.75)
    label = (left + 2 * right).astype(np.uint8)
    save(tmp_path / "v_image.nii.gz", image, (2.0, 2.0, 2.0))
    save(tmp_path / "v_label.nii.gz", label, (2.0, 2.0, 2.0))
    entries = [{"id": f"lab{z}", "image": "v_image.nii.gz", "label": "v_label.nii.gz",
                "slices": [z, z + 1], "role": "labelled"} for z in (10, 20, 30)]
    entries += [{"id": "val", "image": "v_image.nii.gz", "label": "v_label.nii.gz",
                 "slices": [34, 38], "role": "val"},
                {"id": "unl", "image": "v_image.nii.gz", "slices": [0, 8], "role": "unlabelled"}]
    (tmp_path / "d.json").write_text(json.dumps(entries))
    fp = fingerprint_dataset(tmp_path / "d.json")
    lab = [c for c in fp["cases"] if c["id"] == "lab20"][0]
    assert lab["region"] == [64, 48, 1]
    assert lab["classes"]["1"]["voxels"] == int((label[..., 20] == 1).sum())
    assert fp["roles"] == {"labelled": 3, "unlabelled": 1, "val": 1}
    plan = make_plan(fp, {}, GPU)
    assert plan.values["spatial_dims"] == 2 and "thin slabs" in plan.why["spatial_dims"]
    assert plan.values["plane"] == "axial"
    assert plan.values["val_count"] is None and plan.values["val_fraction"] is None  # roles
    assert plan.values["augment"]["flip"] is False  # class 1 left, class 2 right
    assert "swap" in plan.why["augment"]


def test_small_structures_get_foreground_sampling(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for i in range(3):
        image = rng.normal(100, 20, (200, 200, 20)).astype(np.float32) + 300
        label = np.zeros((200, 200, 20), dtype=np.uint8)
        label[100:104, 50:54, 10:12] = 1  # 32 voxels: a nodule
        save(tmp_path / f"n{i}_image.nii.gz", image, (0.5, 0.5, 5.0))
        save(tmp_path / f"n{i}_label.nii.gz", label, (0.5, 0.5, 5.0))
    fp = fingerprint_dataset(tmp_path)
    plan = make_plan(fp, {}, CPU)
    # 200^2 does not fit the CPU budget: smaller patches, centred on the nodule half the time
    assert plan.values["patch_size"][0] < 200
    assert plan.values["foreground_fraction"] == 0.5
    # 2 of 20 slices show it: empty slices weighted so that half the draws show it
    assert plan.values["augment"]["empty_slice_prob"] == pytest.approx(0.1 / 0.9, abs=1e-3)
    assert plan.values["normalisation"] == {"kind": "zscore", "foreground": "all"}


def test_resolve_spacing_two_values_for_2d() -> None:
    assert resolve_spacing([0.8, 0.8], 2, "axial") == [0.8, 0.8, None]
    assert resolve_spacing([0.8, 0.9], 2, "coronal") == [0.8, None, 0.9]
    assert resolve_spacing([0.8, 0.9], 2, "sagittal") == [None, 0.8, 0.9]
    assert resolve_spacing([0.8, 0.8, None], 2, "axial") == [0.8, 0.8, None]  # the old form
    assert resolve_spacing([0.8, 0.8, 5.0], 2, "axial") == [0.8, 0.8, None]
    assert resolve_spacing([1.5], 3, "axial") == [1.5, 1.5, 1.5]
    assert resolve_spacing(None, 2, "axial") is None
    with pytest.raises(ConfigError, match="--spacing"):
        resolve_spacing([0.8, 0.8], 3, "axial")


def test_ct_window_with_mean_and_std_is_clip_then_zscore() -> None:
    x = np.array([-1000.0, -100.0, 0.0, 50.0, 400.0], dtype=np.float32)
    spec = {"kind": "ct_window", "window": [-200.0, 100.0], "mean": 20.0, "std": 40.0}
    expected = (np.array([-200.0, -100.0, 0.0, 50.0, 100.0]) - 20.0) / 40.0
    assert normalise(x, spec) == pytest.approx(expected)
    with pytest.raises(ValueError, match="mean"):
        normalise(x, {"kind": "ct_window", "window": [0, 1], "mean": 1.0})


def test_sfpc_plan_command_writes_every_value_with_its_reason(ct_folder: Path, tmp_path: Path,
                                                               capsys) -> None:
    from sfpc.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--data", str(ct_folder), "--plan-out", str(out), "--iterations",
                 "300", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "spatial_dims = 2" in text and "iterations = 300" in text
    saved = json.loads(out.read_text())
    config = saved["plan"]["config"]
    assert config["iterations"] == {"value": 300, "why": "given (flag or --config)"}
    assert all(entry["why"] for entry in config.values())
    assert saved["fingerprint"]["n_cases"] == 4
    assert len(saved["fingerprint"]["cases"]) == 4
