"""training/layouts.py and training/data.py: discovery, splits, loading, sampling, batches."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from sfpc.inference.preprocess import normalise, resample_to_shape, spacing_from_affine
from sfpc.training.data import (
    Case,
    IntensityAugment,
    PatchDataset3D,
    SliceDataset2D,
    Split,
    TwoStreamLoader,
    Volume,
    apply_label_map,
    augment_2d,
    discover_cases,
    load_eval_cases,
    load_or_make_split,
    load_volume,
    load_volumes,
    make_split,
    rotate_scale_2d,
)
from sfpc.training.layouts import detect_layout

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RAS = np.diag([1.0, 1.0, 1.0, 1.0])
LPS = np.diag([-1.5, -1.5, 2.0, 1.0])


def save(path: Path, array: np.ndarray, affine: np.ndarray = RAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def tiny(shape: tuple[int, ...] = (6, 5, 4), value: int = 1) -> np.ndarray:
    return np.full(shape, value, dtype=np.int16)


# ---------------------------------------------------------------- discovery


def test_folder_layout(tmp_path: Path) -> None:
    save(tmp_path / "a_image.nii.gz", tiny())
    save(tmp_path / "a_label.nii.gz", tiny(value=0).astype(np.uint8))
    save(tmp_path / "b_image.nii", tiny())  # no label: unlabelled pool
    save(tmp_path / "c_image_unlabelled.nii.gz", tiny())
    (tmp_path / "notes.txt").write_text("ignored")
    assert detect_layout(tmp_path) == "folder"
    cases = discover_cases(tmp_path)
    assert [c.id for c in cases] == ["a", "b", "c"]
    assert cases[0].label == (tmp_path / "a_label.nii.gz").resolve()
    assert cases[1].label is None and cases[2].label is None
    assert cases[0].image == ((tmp_path / "a_image.nii.gz").resolve(),)


def test_msd_and_nnunet_layouts(tmp_path: Path) -> None:
    msd = tmp_path / "Task09_Spleen"
    save(msd / "imagesTr" / "spleen_2.nii.gz", tiny())
    save(msd / "labelsTr" / "spleen_2.nii.gz", tiny(value=0))
    save(msd / "imagesTr" / "spleen_3.nii.gz", tiny())  # image without label
    save(msd / "imagesTs" / "spleen_7.nii.gz", tiny())
    (msd / "imagesTr" / "._spleen_2.nii.gz").write_bytes(b"macOS junk")
    cases = discover_cases(msd)
    assert [(c.id, c.label is not None) for c in cases] == [
        ("spleen_2", True),
        ("spleen_3", False),
        ("spleen_7", False),
    ]

    nn = tmp_path / "Dataset001"
    for channel in ("0000", "0001"):
        save(nn / "imagesTr" / f"case_01_{channel}.nii.gz", tiny())
    save(nn / "labelsTr" / "case_01.nii.gz", tiny(value=0))
    (case,) = discover_cases(nn, layout="msd")
    assert case.id == "case_01" and len(case.image) == 2
    assert [p.name for p in case.image] == ["case_01_0000.nii.gz", "case_01_0001.nii.gz"]
    assert case.label is not None and case.label.name == "case_01.nii.gz"


def test_json_layouts(tmp_path: Path) -> None:
    save(tmp_path / "img" / "ct.nii.gz", tiny())
    save(tmp_path / "img" / "ct_seg.nii.gz", tiny(value=0))
    save(tmp_path / "img" / "other.nii.gz", tiny())
    entries = [
        {"image": "img/ct.nii.gz", "label": "img/ct_seg.nii.gz", "slices": [1, 3],
         "role": "labelled"},
        {"image": "img/ct.nii.gz", "label": "img/ct_seg.nii.gz", "slices": [3, 4],
         "role": "val"},
        {"image": "img/ct.nii.gz", "slices": [0, 1], "role": "unlabelled"},
        {"id": "o", "image": "img/other.nii.gz", "label": None, "label_map": {"1": 1, "5": 2}},
    ]
    listing = tmp_path / "cases.json"
    listing.write_text(json.dumps(entries))
    cases = {c.id: c for c in discover_cases(listing)}
    assert set(cases) == {"ct[1:3]", "ct[3:4]", "ct[0:1]", "o"}
    assert cases["ct[1:3]"].slices == (1, 3) and cases["ct[1:3]"].role == "labelled"
    assert cases["ct[3:4]"].label == (tmp_path / "img" / "ct_seg.nii.gz").resolve()
    assert cases["ct[0:1]"].label is None
    assert cases["o"].label_map == {1: 1, 5: 2}

    # MSD's own dataset.json: "training" pairs and bare "test" paths.
    msd = {"training": [{"image": "./img/ct.nii.gz", "label": "./img/ct_seg.nii.gz"}],
           "test": ["./img/other.nii.gz"]}
    (tmp_path / "dataset.json").write_text(json.dumps(msd))
    cases = discover_cases(tmp_path / "dataset.json")
    assert [(c.id, c.label is not None) for c in cases] == [("ct", True), ("other", False)]


def test_csv_layout(tmp_path: Path) -> None:
    save(tmp_path / "x.nii.gz", tiny())
    save(tmp_path / "x_lab.nii.gz", tiny(value=0))
    save(tmp_path / "y.nii.gz", tiny())
    listing = tmp_path / "list.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "slices", "role"])
        writer.writerow(["x.nii.gz", "x_lab.nii.gz", "1:4", "labelled"])
        writer.writerow(["y.nii.gz", "", "", ""])
    cases = discover_cases(listing)
    assert [c.id for c in cases] == ["x[1:4]", "y"]
    assert cases[0].slices == (1, 4) and cases[0].role == "labelled"
    assert cases[1].label is None and cases[1].role is None


def test_brats2020_layout(tmp_path: Path) -> None:
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    for n in ("001", "002"):
        d = root / f"BraTS20_Training_{n}"
        for modality in ("flair", "t1", "t1ce", "t2"):
            save(d / f"BraTS20_Training_{n}_{modality}.nii.gz", tiny())
    save(root / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz", tiny(value=4))
    # The real data set names case 355's mask differently; it is still found.
    save(root / "BraTS20_Training_002" / "W39_1998.09.19_Segm.nii", tiny(value=2))
    for modality in ("flair", "t1", "t1ce", "t2"):
        save(root / "BraTS20_Validation_001" / f"BraTS20_Validation_001_{modality}.nii.gz", tiny())
    (root / "name_mapping.csv").write_text("a,b\n")
    assert detect_layout(root) == "brats"
    cases = discover_cases(root)
    assert [c.id for c in cases] == [
        "BraTS20_Training_001",
        "BraTS20_Training_002",
        "BraTS20_Validation_001",
    ]
    assert cases[0].image[0].name == "BraTS20_Training_001_flair.nii.gz"
    assert cases[0].label_map == "binary"
    assert cases[1].label is not None and cases[1].label.name == "W39_1998.09.19_Segm.nii"
    assert cases[2].label is None
    multi = discover_cases(root, modalities=("flair", "t1ce"), layout="brats")
    assert [p.name for p in multi[0].image] == [
        "BraTS20_Training_001_flair.nii.gz",
        "BraTS20_Training_001_t1ce.nii.gz",
    ]
    # Whole tumour = label > 0 on loading.
    volume = load_volume(cases[0], None)
    assert set(np.unique(volume.label)) == {1}


def test_acdc_layout(tmp_path: Path) -> None:
    p1 = tmp_path / "training" / "patient001"
    save(p1 / "patient001_4d.nii.gz", np.zeros((6, 5, 4, 3), dtype=np.int16))
    for frame in ("01", "12"):
        save(p1 / f"patient001_frame{frame}.nii.gz", tiny())
        save(p1 / f"patient001_frame{frame}_gt.nii.gz", tiny(value=3).astype(np.uint8))
    p2 = tmp_path / "training" / "patient002"
    save(p2 / "patient002_frame01.nii.gz", tiny())
    save(p2 / "patient002_frame01_gt.nii.gz", tiny(value=1).astype(np.uint8))
    save(p2 / "patient002_frame09.nii.gz", tiny())
    (p1 / "Info.cfg").write_text("ED: 1\nES: 12\n")
    cases = discover_cases(tmp_path / "training")
    assert [(c.id, c.group, c.label is not None) for c in cases] == [
        ("patient001_frame01", "patient001", True),
        ("patient001_frame12", "patient001", True),
        ("patient002_frame01", "patient002", True),
        ("patient002_frame09", "patient002", False),
    ]


def test_discovery_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        discover_cases(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot tell the layout"):
        discover_cases(tmp_path)
    save(tmp_path / "a_image.nii.gz", tiny())
    with pytest.raises(ValueError, match="unknown layout"):
        discover_cases(tmp_path, layout="dicom")
    with pytest.raises(ValueError, match="no cases found"):
        discover_cases(tmp_path, layout="acdc")


def test_label_map_by_hand() -> None:
    label = np.array([0, 1, 2, 5, 6, 7, 5], dtype=np.uint8)
    np.testing.assert_array_equal(
        apply_label_map(label, {1: 1, 5: 2, 6: 3}), [0, 1, 0, 2, 3, 0, 2]
    )
    np.testing.assert_array_equal(apply_label_map(label, "binary"), [0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(apply_label_map(label, None), label)
    with pytest.raises(ValueError):
        apply_label_map(label, "multiclass")


def test_discovery_label_map_override(tmp_path: Path) -> None:
    save(tmp_path / "a_image.nii.gz", tiny())
    save(tmp_path / "a_label.nii.gz", np.arange(6 * 5 * 4).reshape(6, 5, 4).astype(np.int16) % 8)
    (case,) = discover_cases(tmp_path, label_map={1: 1, 5: 2, 6: 3})
    volume = load_volume(case, None)
    raw = np.asarray(nib.load(tmp_path / "a_label.nii.gz").dataobj)
    expected = np.select([raw == 1, raw == 5, raw == 6], [1, 2, 3], 0)
    np.testing.assert_array_equal(volume.label, expected)


# ---------------------------------------------------------------- splits


def cases_for_split(n: int, unlabelled: int = 0) -> list[Case]:
    cases = [Case(id=f"c{i:02d}", image=(Path(f"/d/c{i:02d}.nii.gz"),), label=Path(f"/d/l{i}"))
             for i in range(n)]
    cases += [Case(id=f"u{i:02d}", image=(Path(f"/d/u{i:02d}.nii.gz"),)) for i in range(unlabelled)]
    return cases


def ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


def test_split_is_seeded_by_case_and_nested() -> None:
    cases = cases_for_split(20, unlabelled=5)
    a = make_split(cases, labelled_fraction=0.1, val_fraction=0.2, seed=3)
    b = make_split(list(reversed(cases)), labelled_fraction=0.1, val_fraction=0.2, seed=3)
    assert (ids(a.labelled), ids(a.unlabelled), ids(a.val)) == (
        ids(b.labelled), ids(b.unlabelled), ids(b.val))
    assert len(a.val) == 4 and len(a.labelled) == 2  # 10% of the 16 training cases, rounded
    assert len(a.unlabelled) == 14 + 5
    assert {f"u{i:02d}" for i in range(5)} <= set(ids(a.unlabelled))
    parts = [set(ids(a.labelled)), set(ids(a.unlabelled)), set(ids(a.val))]
    assert sum(len(p) for p in parts) == len(cases) and set().union(*parts) == set(ids(cases))
    c = make_split(cases, labelled_fraction=0.1, val_fraction=0.2, seed=4)
    assert ids(c.val) != ids(a.val)
    # More labels with the same seed: same validation set, labelled set grows.
    d = make_split(cases, labelled_fraction=0.25, val_fraction=0.2, seed=3)
    assert ids(d.val) == ids(a.val) and set(ids(a.labelled)) < set(ids(d.labelled))


def test_split_keeps_groups_together() -> None:
    cases = [
        Case(id=f"patient{p:03d}_frame{f:02d}", image=(Path(f"/d/{p}_{f}"),), label=Path("/l"),
             group=f"patient{p:03d}")
        for p in range(10)
        for f in (1, 12)
    ]
    for seed in range(5):
        split = make_split(cases, labelled_count=3, val_count=2, seed=seed)
        groups = [{c.group for c in part} for part in (split.labelled, split.unlabelled, split.val)]
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2])
        assert not (groups[1] & groups[2])
        assert (len(groups[0]), len(groups[2])) == (3, 2)
        assert len(split.labelled) == 6 and len(split.val) == 4


def test_split_roles_counts_and_errors() -> None:
    pinned = [
        Case(id="ct[69:80]", image=(Path("/ct"),), label=Path("/lab"), slices=(69, 80),
             role="labelled"),
        Case(id="ct[80:100]", image=(Path("/ct"),), label=Path("/lab"), slices=(80, 100),
             role="unlabelled"),
        Case(id="ct[100:112]", image=(Path("/ct"),), label=Path("/lab"), slices=(100, 112),
             role="val"),
    ]
    split = make_split(pinned + [Case(id="ct_b", image=(Path("/b"),))], seed=0)
    assert ids(split.labelled) == ["ct[69:80]"]
    assert ids(split.unlabelled) == ["ct[80:100]", "ct_b"]
    assert ids(split.val) == ["ct[100:112]"]
    with pytest.raises(ValueError, match="not both"):
        make_split(pinned, labelled_fraction=0.5, labelled_count=1)
    with pytest.raises(ValueError, match="only"):
        make_split(cases_for_split(3), labelled_count=2, val_count=2)
    with pytest.raises(ValueError, match="role"):
        Case(id="x", image=(Path("/x"),), role="val")  # validation needs a label


def test_split_json_round_trip_and_reuse(tmp_path: Path) -> None:
    cases = cases_for_split(10)
    cases[0].slices, cases[0].label_map = (2, 5), {1: 1, 5: 2}
    path = tmp_path / "splits" / "split.json"
    split = load_or_make_split(path, cases, labelled_count=3, val_count=2, seed=7)
    assert path.exists()
    loaded = Split.from_json(path)
    for part in ("labelled", "unlabelled", "val"):
        assert [c.to_dict() for c in getattr(loaded, part)] == [
            c.to_dict() for c in getattr(split, part)]
    # A rerun reads the saved split, even if discovery now finds other cases.
    again = load_or_make_split(path, cases_for_split(12), labelled_count=3, val_count=2, seed=7)
    assert ids(again.labelled) == ids(split.labelled) and ids(again.val) == ids(split.val)
    with pytest.raises(ValueError, match="made with"):
        load_or_make_split(path, cases, labelled_count=4, val_count=2, seed=7)


_REWRITER = """
import sys
from pathlib import Path
from sfpc.training.data import Split
split, path = Split.from_json(sys.argv[1]), Path(sys.argv[1])
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    split.to_json(path)
"""


def test_a_split_being_rewritten_is_never_read_half_written(tmp_path: Path) -> None:
    # What a second DDP rank does: it finds split.json while rank 0 is writing it. It must read
    # either nothing or the whole split, never a truncated file.
    split = make_split(cases_for_split(300), labelled_count=20, val_count=10, seed=3)
    path = tmp_path / "split.json"
    split.to_json(path)
    writer = subprocess.Popen([sys.executable, "-c", _REWRITER, str(path), "1000"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        reads = 0
        while writer.poll() is None:
            assert ids(Split.from_json(path).val) == ids(split.val)
            reads += 1
        assert writer.returncode == 0
        assert reads > 20
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]  # no temporary file left


# ---------------------------------------------------------------- loading


def test_load_volume_reorients_normalises_and_crops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(1, 1000, size=(12, 10, 8)).astype(np.int16)
    data[:2] = 0
    label = (data > 500).astype(np.uint8) * 5
    img_path = save(tmp_path / "a_image.nii.gz", data, LPS)
    save(tmp_path / "a_label.nii.gz", label, LPS)
    case = Case(id="a", image=(img_path,), label=tmp_path / "a_label.nii.gz", label_map={5: 1})
    spec = {"kind": "zscore", "foreground": "nonzero"}
    volume = load_volume(case, spec)

    canonical = nib.as_closest_canonical(nib.load(img_path))
    expected = normalise(np.asarray(canonical.dataobj), spec)
    assert volume.image.shape == (1, 12, 10, 8) and volume.image.dtype == np.float32
    np.testing.assert_allclose(volume.image[0], expected, atol=1e-6)
    canonical_label = np.asarray(nib.as_closest_canonical(nib.load(tmp_path / "a_label.nii.gz"))
                                 .dataobj)
    np.testing.assert_array_equal(volume.label, canonical_label // 5)
    assert volume.label.dtype == np.int16
    np.testing.assert_allclose(volume.affine, canonical.affine)
    assert volume.spacing == pytest.approx((1.5, 1.5, 2.0))

    # A slab: same voxels as the whole volume's slices, statistics of the whole volume, and an
    # affine whose origin is the world position of the slab's first slice.
    slab = load_volume(Case(id="s", image=(img_path,), label=case.label, slices=(3, 6)), spec)
    np.testing.assert_allclose(slab.image, volume.image[..., 3:6])
    np.testing.assert_allclose(slab.affine[:3, 3], (canonical.affine @ [0, 0, 3, 1])[:3])
    assert slab.slices == (3, 6) and slab.cropped and slab.to_dict()["slices"] is None
    # Evaluation keeps the whole volume as context and says which slab to score.
    slab_case = Case(id="s", image=(img_path,), label=case.label, slices=(3, 6))
    (whole,) = load_eval_cases([slab_case], spec)
    assert whole.image.shape == volume.image.shape and not whole.cropped
    assert whole.to_dict()["slices"] == (3, 6)

    # Resampling to 3 mm in-plane only.
    coarse = load_volume(case, spec, target_spacing=3.0, resample_axes=(0, 1))
    assert coarse.image.shape == (1, 6, 5, 8) and coarse.label.shape == (6, 5, 8)
    assert coarse.spacing == pytest.approx((3.0, 3.0, 2.0))
    np.testing.assert_allclose(spacing_from_affine(coarse.affine), coarse.spacing)


def test_load_multichannel_and_eval_cases(tmp_path: Path) -> None:
    four_d = np.stack([np.full((5, 4, 3), 1.0), np.arange(60).reshape(5, 4, 3)], axis=-1)
    save(tmp_path / "m_image.nii.gz", four_d.astype(np.float32))
    save(tmp_path / "m_label.nii.gz", np.ones((5, 4, 3), dtype=np.uint8))
    save(tmp_path / "n_image.nii.gz", np.ones((5, 4, 3), dtype=np.float32))
    cases = discover_cases(tmp_path)
    volume = load_volume(cases[0], {"kind": "minmax"})
    assert volume.image.shape == (2, 5, 4, 3)
    assert (volume.image[0] == 0).all()  # constant channel -> 0
    np.testing.assert_allclose(volume.image[1], np.arange(60).reshape(5, 4, 3) / 59, atol=1e-6)
    (evaluated,) = load_eval_cases(cases[:1], {"kind": "minmax"})
    assert evaluated.label is not None and evaluated.id == "m"
    assert evaluated.to_dict()["slices"] is None
    with pytest.raises(ValueError, match="need labels"):
        load_eval_cases(cases, {"kind": "minmax"})
    (unlabelled,) = load_volumes(cases[:1], {"kind": "minmax"}, with_labels=False)
    assert unlabelled.label is None


def test_label_shape_mismatch_is_reported(tmp_path: Path) -> None:
    save(tmp_path / "a_image.nii.gz", tiny())
    save(tmp_path / "a_label.nii.gz", tiny((6, 5, 3)))
    with pytest.raises(ValueError, match="label shape"):
        load_volume(discover_cases(tmp_path)[0], None)


# ---------------------------------------------------------------- sampling and augmentation


def blob_volume(shape: tuple[int, int, int], seed: int, threshold: float = 0.6) -> Volume:
    """A smooth positive image and the label made from its own threshold."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(shape), 2.0).astype(np.float32)
    image = (image - image.min()) / (image.max() - image.min()) + 0.01
    label = (image > threshold).astype(np.int16)
    return Volume(id=f"v{seed}", image=image[None], label=label, spacing=(1.0, 1.0, 1.0),
                  affine=np.eye(4), geometry=None)  # type: ignore[arg-type]


def test_3d_augmentation_keeps_image_and_label_aligned() -> None:
    volumes = [blob_volume((30, 30, 14), 1), blob_volume((26, 30, 20), 2)]
    ds = PatchDataset3D(volumes, patch_size=(16, 16, 16), foreground_fraction=0.5)
    rng = np.random.default_rng(0)
    padded = 0
    for _ in range(40):
        x, y = ds.sample(rng)
        assert x.shape == (1, 16, 16, 16) and x.dtype == np.float32 and y.shape == (16, 16, 16)
        np.testing.assert_array_equal(x[0] > 0.6, y > 0)
        padded += int((x[0] == 0).any())  # the 14-voxel axis is zero padded
    assert padded > 0


def test_3d_patches_match_a_flip_rot90_of_the_volume() -> None:
    # Every patch must be a flipped/rotated copy of a window of the volume: search the 32
    # flip/rotation combinations for the one that contains it (independent of the sampler).
    volume = blob_volume((20, 20, 20), 3)
    ds = PatchDataset3D([volume], patch_size=(8, 8, 8))
    windows = np.lib.stride_tricks.sliding_window_view(volume.image[0], (8, 8, 8))
    rng = np.random.default_rng(5)
    for _ in range(3):
        x, _ = ds.sample(rng)
        found = False
        for k in range(4):
            for flips in np.ndindex(2, 2, 2):
                undone = np.rot90(x[0], -k, axes=(0, 1))  # undo the quarter turn, then the flips
                for axis, f in enumerate(flips):
                    if f:
                        undone = np.flip(undone, axis)
                found |= bool((windows == undone).all(axis=(3, 4, 5)).any())
        assert found


def test_foreground_fraction() -> None:
    image = np.ones((1, 40, 40, 40), dtype=np.float32)
    label = np.zeros((40, 40, 40), dtype=np.int16)
    label[35:38, 2:5, 30:33] = 1  # a small lesion in a corner
    volume = Volume("v", image, label, (1.0, 1.0, 1.0), np.eye(4), None)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    always = PatchDataset3D([volume], (12, 12, 12), foreground_fraction=1.0)
    assert all(always.sample(rng)[1].any() for _ in range(30))
    never = PatchDataset3D([volume], (12, 12, 12), foreground_fraction=0.0)
    assert sum(never.sample(rng)[1].any() for _ in range(30)) < 10


def test_rotate_scale_2d_against_scipy_and_by_hand() -> None:
    rng = np.random.default_rng(2)
    image = ndimage.gaussian_filter(rng.random((24, 30)), 2)
    for angle in (-20.0, 7.5, 90.0):
        ref = ndimage.rotate(image, angle, reshape=False, order=1, mode="constant")
        np.testing.assert_allclose(rotate_scale_2d(image, angle), ref, atol=1e-12)
    # Zoom x2 about the centre of a ramp f(i) = i: output pixel i samples c + (i - c) / 2.
    ramp = np.tile(np.arange(21, dtype=np.float64)[:, None], (1, 9))
    zoomed = rotate_scale_2d(ramp, 0.0, 2.0)
    np.testing.assert_allclose(zoomed[:, 4], 10 + (np.arange(21) - 10) / 2)
    stacked = rotate_scale_2d(np.stack([image, 2 * image]), 10.0, 1.1)
    np.testing.assert_allclose(stacked[1], 2 * stacked[0], atol=1e-12)


def test_2d_augmentation_keeps_image_and_label_aligned() -> None:
    rng = np.random.default_rng(3)
    image = np.zeros((1, 64, 64), dtype=np.float32)
    image[0, 10:40, 20:50] = 1.0
    image[0, 45:60, 5:25] = 2.0
    label = (image[0] > 0.5).astype(np.int16)
    for _ in range(20):
        x, y = augment_2d(image, label, rng, rotation=20.0, scale=(0.85, 1.15), rotate90=True)
        agree = (x[0] > 0.5) == (y > 0)
        # Linear and nearest interpolation may differ only on the label's edge.
        edge = ndimage.binary_dilation(y > 0) ^ ndimage.binary_erosion(y > 0)
        assert agree[~edge].all()
        assert agree.mean() > 0.97
    # Exact without interpolation (flips and quarter turns only).
    for _ in range(10):
        x, y = augment_2d(image, label, rng, rotation=0.0, rotate90=True)
        np.testing.assert_array_equal(x[0] > 0.5, y > 0)


def test_slice_dataset_resize_and_empty_slices() -> None:
    image = np.random.default_rng(4).random((1, 40, 30, 6)).astype(np.float32)
    label = np.zeros((40, 30, 6), dtype=np.int16)
    label[10:20, 5:15, 2] = 3
    volume = Volume("v", image, label, (1.0, 1.0, 5.0), np.eye(4), None)  # type: ignore[arg-type]
    plain = SliceDataset2D([volume], size=(64, 64), flip=False, rotation=0.0)
    x, y = plain.sample(np.random.default_rng(0))
    # Without augmentation a sample is exactly the inference-time resize of a slice.
    matches = [
        np.allclose(x, resample_to_shape(image[..., s], (64, 64), 1)) for s in range(6)
    ]
    assert sum(matches) == 1
    s = matches.index(True)
    np.testing.assert_array_equal(y, resample_to_shape(label[..., s], (64, 64), 0))

    only_fg = SliceDataset2D([volume], size=(32, 32), empty_slice_prob=0.0, rotation=0.0)
    rng = np.random.default_rng(1)
    assert all(only_fg.sample(rng)[1].any() for _ in range(20))
    coronal = SliceDataset2D([volume], size=None, patch_size=(24, 24), plane="coronal")
    assert len(coronal) == 30
    x, y = coronal.sample(rng)
    assert x.shape == (1, 24, 24) and y.shape == (24, 24)
    with pytest.raises(ValueError, match="exactly one"):
        SliceDataset2D([volume], size=(32, 32), patch_size=(32, 32))


def test_intensity_augment() -> None:
    rng = np.random.default_rng(5)
    image = rng.random((1, 16, 16)).astype(np.float32) + 1.0
    aug = IntensityAugment(brightness=0.0, contrast=(1.0, 1.0), gamma=(2.0, 2.0), p=1.0)
    out = aug(image, rng)
    lo, hi = image.min(), image.max()
    np.testing.assert_allclose(out, ((image - lo) / (hi - lo)) ** 2 * (hi - lo) + lo, atol=1e-5)
    shifted = IntensityAugment(brightness=0.5, contrast=(1.0, 1.0), gamma=(1.0, 1.0), p=1.0)(
        image, rng)
    diff = shifted - image
    assert np.allclose(diff, diff.flat[0], atol=1e-5) and diff.flat[0] != 0


def test_image_quality_augmentations() -> None:
    """nnU-Net's noise, blur and low-resolution transforms, each alone (p = 1, jitter off)."""
    from scipy import ndimage

    from sfpc.training.data import simulate_low_resolution

    rng = np.random.default_rng(7)
    image = rng.normal(0.0, 1.0, size=(1, 32, 32)).astype(np.float32)
    off = {"brightness": 0.0, "p": 0.0}
    # Blur with a fixed sigma: the channel is filtered on its two spatial axes only.
    blurred = IntensityAugment(**off, blur=(1.5, 1.5), p_blur=1.0)(image, rng)
    np.testing.assert_allclose(blurred[0], ndimage.gaussian_filter(image[0], 1.5, mode="nearest"),
                               atol=1e-6)
    # Noise: zero-mean, its sd a fraction U(0, 0.3) of the image's.
    sds = []
    for _ in range(200):
        noisy = IntensityAugment(**off, noise=0.3, p_noise=1.0)(image, rng)
        sds.append(float((noisy - image).std()))
    assert 0.0 <= min(sds) and max(sds) <= 0.3 * float(image.std()) * 1.1
    assert np.mean(sds) == pytest.approx(0.15 * float(image.std()), rel=0.15)
    # Low resolution at 0.5: of a 2x2-block-constant image the nearest sampling keeps one value
    # per block (the coarse image is the blocks' values), which comes back interpolated
    # linearly; a one-voxel checkerboard (above the coarse grid's Nyquist) does not survive.
    coarse = rng.normal(size=(16, 16)).astype(np.float32)
    blocks = np.kron(coarse, np.ones((2, 2), np.float32))[None]
    np.testing.assert_allclose(simulate_low_resolution(blocks, 0.5, (1, 2))[0],
                               ndimage.zoom(coarse, 2, order=1, mode="nearest", grid_mode=True),
                               atol=1e-5)
    checker = (np.indices((32, 32)).sum(axis=0) % 2).astype(np.float32)[None]
    round_trip = simulate_low_resolution(checker, 0.5, (1, 2))
    assert round_trip.shape == checker.shape and float(round_trip.std()) < 0.1
    low = IntensityAugment(**off, lowres=(0.5, 0.5), p_lowres=1.0)(checker, rng)
    np.testing.assert_allclose(low, round_trip, atol=1e-6)
    # Off by default: the default augment leaves those three transforms out entirely.
    default = IntensityAugment()
    assert default.noise == 0 and default.blur == (0.0, 0.0) and default.lowres == (1.0, 1.0)


# ---------------------------------------------------------------- two-stream batches


def stream_datasets(seed: int = 0) -> tuple[PatchDataset3D, PatchDataset3D]:
    labelled = PatchDataset3D([blob_volume((20, 18, 16), 1), blob_volume((18, 20, 22), 2)],
                              patch_size=(12, 12, 12))
    unlabelled_volumes = [blob_volume((20, 20, 20), s) for s in (3, 4, 5)]
    for v in unlabelled_volumes:
        v.label = None
    return labelled, PatchDataset3D(unlabelled_volumes, (12, 12, 12), labelled=False)


def take(loader: TwoStreamLoader, n: int) -> list[tuple[torch.Tensor, ...]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_two_stream_shapes_dtypes_and_determinism() -> None:
    labelled, unlabelled = stream_datasets()
    loader = TwoStreamLoader(labelled, unlabelled, n_labelled=3, n_unlabelled=2, seed=11)
    batches = take(loader, 3)
    x_l, y_l, x_u = batches[0]
    assert x_l.shape == (3, 1, 12, 12, 12) and x_l.dtype == torch.float32
    assert y_l.shape == (3, 12, 12, 12) and y_l.dtype == torch.int64
    assert x_u.shape == (2, 1, 12, 12, 12) and x_u.dtype == torch.float32
    again = take(TwoStreamLoader(labelled, unlabelled, 3, 2, seed=11), 3)
    for a, b in zip(batches, again, strict=True):
        for ta, tb in zip(a, b, strict=True):
            assert torch.equal(ta, tb)
    other_seed = take(TwoStreamLoader(labelled, unlabelled, 3, 2, seed=12), 1)[0]
    other_rank = take(TwoStreamLoader(labelled, unlabelled, 3, 2, seed=11, rank=1), 1)[0]
    assert not torch.equal(other_seed[0], x_l) and not torch.equal(other_rank[0], x_l)
    assert not torch.equal(batches[0][0], batches[1][0])  # the stream moves on


def test_two_stream_workers_and_resume() -> None:
    labelled, unlabelled = stream_datasets()
    serial = take(TwoStreamLoader(labelled, unlabelled, 2, 2, seed=5), 4)
    # The stream is the same whatever the number of workers.
    for workers in (1, 2):
        parallel = take(TwoStreamLoader(labelled, unlabelled, 2, 2, seed=5, num_workers=workers), 4)
        for a, b in zip(serial, parallel, strict=True):
            assert all(torch.equal(ta, tb) for ta, tb in zip(a, b, strict=True))
    # Resuming at batch 2 continues the stream exactly, also through workers.
    for workers in (0, 2):
        loader = TwoStreamLoader(labelled, unlabelled, 2, 2, seed=5, num_workers=workers)
        loader.skip_to(2)
        resumed = take(loader, 2)
        for a, b in zip(serial[2:], resumed, strict=True):
            assert all(torch.equal(ta, tb) for ta, tb in zip(a, b, strict=True))
    direct = TwoStreamLoader(labelled, unlabelled, 2, 2, seed=5).batch(3)
    assert torch.equal(direct[0], serial[3][0])


def test_two_stream_without_unlabelled_and_shape_check() -> None:
    labelled, _ = stream_datasets()
    x_l, y_l, x_u = take(TwoStreamLoader(labelled, None, 2, 4), 1)[0]
    assert x_u.shape == (0, 1, 12, 12, 12)
    other = PatchDataset3D([blob_volume((20, 20, 20), 9)], (8, 8, 8), labelled=False)
    with pytest.raises(ValueError, match="unlabelled ones"):
        TwoStreamLoader(labelled, other)


def test_slice_streams_in_two_stream_loader() -> None:
    volume = blob_volume((40, 40, 5), 6)
    labelled = SliceDataset2D([volume], size=(32, 32), scale=(0.9, 1.1))
    unlabelled = SliceDataset2D([volume], size=(32, 32), labelled=False)
    x_l, y_l, x_u = take(TwoStreamLoader(labelled, unlabelled, 4, 4), 1)[0]
    assert x_l.shape == (4, 1, 32, 32) and y_l.shape == (4, 32, 32) and x_u.shape == (4, 1, 32, 32)
    assert y_l.dtype == torch.int64


# ---------------------------------------------------------------- real data


@pytest.mark.data
def test_real_organ_slab_split() -> None:
    organs = DATA / "organs"
    if not (organs / "ct_a_image.nii.gz").exists():
        pytest.skip(f"shared data not found at {organs}")
    entries = [
        {"image": "ct_a_image.nii.gz", "label": "ct_a_label.nii.gz", "slices": [85, 100],
         "role": "labelled", "label_map": {"1": 1, "5": 2, "6": 3}},
        {"image": "ct_a_image.nii.gz", "label": "ct_a_label.nii.gz", "slices": [100, 112],
         "role": "val", "label_map": {"1": 1, "5": 2, "6": 3}},
    ]
    cases = [Case.from_dict(e, organs) for e in entries]
    split = make_split(cases, seed=0)
    (volume,) = load_volumes(split.labelled, {"kind": "ct_window", "window": [-175, 250]})
    assert volume.image.shape == (1, 122, 101, 15)
    assert set(np.unique(volume.label)) == {0, 1, 2, 3}
    assert 0.0 <= volume.image.min() and volume.image.max() <= 1.0
    (val,) = load_eval_cases(split.val, {"kind": "ct_window", "window": [-175, 250]})
    assert val.image.shape == (1, 122, 101, 112) and val.to_dict()["slices"] == (100, 112)
    assert val.spacing == pytest.approx((3.0, 3.0, 3.0))


@pytest.mark.data
def test_real_lesion_folder() -> None:
    lesions = DATA / "lesions"
    if not lesions.exists():
        pytest.skip(f"shared data not found at {lesions}")
    cases = discover_cases(lesions)
    assert [c.id for c in cases] == ["brain1", "brain2", "breast1", "lung1"]
    assert all(c.label is not None for c in cases)
