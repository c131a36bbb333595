"""The controlled shifts of training/shifts.py on small synthetic volumes.

Oracles, not the code's own output: world coordinates computed with nibabel's ``apply_affine``
from the *original* affine (where a voxel's content came from) against the shifted affine
(where the shifted grid says it is); ``nibabel.affines.voxel_sizes``; images that are linear in
world coordinates, which linear interpolation and box averaging must reproduce exactly;
integrals preserved by averaging; areas of discs (a zoom by f scales an area by f^2); sample
statistics of the noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from nibabel.affines import apply_affine, voxel_sizes

from sfpc.training import shifts
from sfpc.training.organ_task import LABEL_MAP

# Two orientations of a 3 mm grid: RAS, and LPS-like (x and y flipped) with an odd origin.
RAS = np.array([[3.0, 0, 0, -40.0], [0, 3.0, 0, 12.0], [0, 0, 3.0, 90.0], [0, 0, 0, 1]])
LPS = np.array([[-3.0, 0, 0, 50.0], [0, -3.0, 0, 70.0], [0, 0, 3.0, -15.0], [0, 0, 0, 1]])
# Axial slices along the first voxel axis, running head to feet (slice-first storage).
SLICE_FIRST = np.array([[0, 0, 3.0, 5.0], [0, 3.0, 0, -8.0], [-3.0, 0, 0, 60.0], [0, 0, 0, 1]])


def world_grid(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World (x, y, z) of every voxel centre, shape (*shape, 3)."""
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return apply_affine(affine, idx.reshape(-1, 3)).reshape(*shape, 3)


def blob_label(shape: tuple[int, ...], centre: tuple[float, ...], radius: float,
               value: int = 1) -> np.ndarray:
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    inside = ((idx - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2
    return np.where(inside, value, 0).astype(np.uint8)


def centroid_world(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return apply_affine(affine, np.argwhere(label > 0).mean(axis=0))


# ----------------------------------------------------------------------------------------------
# In-plane resolution
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [RAS, LPS], ids=["RAS", "LPS"])
@pytest.mark.parametrize("target", [0.7, 1.0, 1.5, 3.0])
def test_resolution_voxel_sizes_and_label_centroid(affine: np.ndarray, target: float) -> None:
    shape = (20, 16, 5)
    label = blob_label(shape, (8.3, 9.1, 2), 4.5, value=5)
    image = np.zeros(shape, np.int16)
    img, lab, aff = shifts.resample_inplane(image, label, affine, target)
    np.testing.assert_allclose(voxel_sizes(aff), [target, target, 3.0], atol=1e-9)
    assert lab.dtype == label.dtype and img.dtype == np.float32
    assert set(np.unique(lab)) == {0, 5}
    assert lab.shape == img.shape and lab.shape[2] == 5
    # Field of view: extent kept to within one new voxel, same world centre of the grid.
    for axis in (0, 1):
        assert abs(lab.shape[axis] * target - shape[axis] * 3.0) <= target / 2 + 1e-9
    centre_old = apply_affine(affine, (np.asarray(shape) - 1) / 2)
    centre_new = apply_affine(aff, (np.asarray(lab.shape) - 1) / 2)
    np.testing.assert_allclose(centre_new, centre_old, atol=1e-9)
    # The organ stays where it was in world mm: within half an original voxel.
    shift_mm = np.abs(centroid_world(lab, aff) - centroid_world(label, affine))
    assert shift_mm.max() <= 1.5, shift_mm


@pytest.mark.parametrize("affine", [RAS, LPS, SLICE_FIRST], ids=["RAS", "LPS", "slice-first"])
def test_resolution_reproduces_a_world_linear_image(affine: np.ndarray) -> None:
    """An image linear in world x, y is reproduced exactly by linear interpolation wherever the
    new voxel lies between old centres: the new affine says where each sample was taken."""
    shape = (14, 12, 9) if affine is not SLICE_FIRST else (4, 12, 14)
    world = world_grid(affine, shape)
    image = (2.0 * world[..., 0] - 1.5 * world[..., 1] + 0.5 * world[..., 2]).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    img, _, aff = shifts.resample_inplane(image, label, affine, 1.0)
    axial = shifts.axial_axis(aff)
    assert img.shape[axial] == shape[axial]
    expected_world = world_grid(aff, img.shape)
    expected = 2.0 * expected_world[..., 0] - 1.5 * expected_world[..., 1] \
        + 0.5 * expected_world[..., 2]
    # Inside the hull of the old voxel centres (the edges are clamped, by design).
    old_index = apply_affine(np.linalg.inv(affine), expected_world.reshape(-1, 3))
    inside = np.all((old_index >= -1e-6) & (old_index <= np.asarray(shape) - 1 + 1e-6), axis=1)
    inside = inside.reshape(img.shape)
    assert inside.mean() > 0.7
    np.testing.assert_allclose(img[inside], expected[inside], atol=1e-3)


def test_resolution_3mm_on_3mm_is_the_identity() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(-1000, 1000, (10, 9, 4)).astype(np.int16)
    label = rng.integers(0, 7, (10, 9, 4)).astype(np.uint8)
    img, lab, aff = shifts.resample_inplane(image, label, LPS, 3.0)
    np.testing.assert_array_equal(img, image.astype(np.float32))
    np.testing.assert_array_equal(lab, label)
    np.testing.assert_allclose(aff, LPS)


# ----------------------------------------------------------------------------------------------
# Slice thickness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [RAS, SLICE_FIRST], ids=["RAS", "slice-first"])
def test_thickness_is_the_mean_of_the_slices_over_each_slab_in_world_z(
        affine: np.ndarray) -> None:
    """Each old slice stands for its HU over its 3 mm in z; a 5 mm slice at the world z the new
    affine gives it is the mean of that staircase over z -/+ 2.5 mm (integrated numerically)."""
    axial = shifts.axial_axis(affine)
    shape = (6, 5, 20) if axial == 2 else (20, 5, 6)
    profile = np.random.default_rng(7).normal(0, 200, 20)  # HU per old slice
    along = [1, 1, 1]
    along[axial] = 20
    image = np.broadcast_to(profile.reshape(along), shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    img, _, aff = shifts.resample_thickness(image, label, affine, 5.0)
    assert shifts.axial_axis(aff) == axial
    np.testing.assert_allclose(voxel_sizes(aff)[axial], 5.0)
    assert img.shape[axial] == int(20 * 3 // 5)
    for j in range(img.shape[axial]):
        new_index = np.zeros(3)
        new_index[axial] = j
        zc = apply_affine(aff, new_index)[2]
        zs = zc - 2.5 + (np.arange(100000) + 0.5) * 5.0 / 100000  # midpoint rule
        picks = np.floor(_old_slice_coord(affine, axial, zs) + 0.5).astype(int)
        assert picks.min() >= 0 and picks.max() <= 19  # the slab lies inside the stack
        got = np.take(img, j, axis=axial)
        np.testing.assert_allclose(got, profile[picks].mean(), atol=0.05)


def _old_slice_coord(affine: np.ndarray, axial: int, z: np.ndarray) -> np.ndarray:
    """Voxel coordinate along the axial axis of world points at height z (x = y = 0)."""
    points = np.zeros((len(z), 3))
    points[:, 2] = z
    return apply_affine(np.linalg.inv(affine), points)[:, axial]


def test_thickness_keeps_the_integral_along_z() -> None:
    """Slabs tiling the stack exactly (18 x 3 mm = 9 x 6 mm): the box average keeps the sum
    times the slice thickness, whatever the profile."""
    rng = np.random.default_rng(2)
    image = rng.normal(0, 100, (4, 3, 18)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    img, _, _ = shifts.resample_thickness(image, label, RAS, 6.0)
    np.testing.assert_allclose(img.sum(axis=2) * 6.0, image.sum(axis=2) * 3.0, rtol=1e-4,
                               atol=1e-2)


def test_thickness_labels_come_from_the_nearest_old_slice_in_world_z() -> None:
    shape = (3, 3, 17)
    label = np.broadcast_to(np.arange(17, dtype=np.uint8), shape).copy()  # label = slice index
    img, lab, aff = shifts.resample_thickness(np.zeros(shape), label, RAS, 5.0)
    old_z = world_grid(RAS, shape)[0, 0, :, 2]
    new_z = world_grid(aff, lab.shape)[0, 0, :, 2]
    distance = np.abs(new_z[:, None] - old_z[None, :])
    # The old slice a label came from is a nearest one (a tie may go either way).
    np.testing.assert_allclose(distance[np.arange(len(new_z)), lab[0, 0]], distance.min(axis=1))
    # Slabs stay inside the scanned range.
    assert new_z[0] - 2.5 >= old_z[0] - 1.5 - 1e-9
    assert new_z[-1] + 2.5 <= old_z[-1] + 1.5 + 1e-9


def test_thickness_refuses_thinner_slices() -> None:
    with pytest.raises(ValueError, match="thinner"):
        shifts.resample_thickness(np.zeros((2, 2, 4)), np.zeros((2, 2, 4), np.uint8), RAS, 2.0)


# ----------------------------------------------------------------------------------------------
# Noise and contrast
# ----------------------------------------------------------------------------------------------


def test_noise_has_the_given_sd_and_is_seeded() -> None:
    image = np.full((64, 64, 16), 40, np.int16)
    label = np.ones(image.shape, np.uint8)
    img, lab, aff = shifts.add_noise(image, label, RAS, 30.0, seed=3)
    diff = img - 40.0
    assert abs(diff.std() - 30.0) < 0.3  # 65536 samples: sd of the sd ~ 0.08
    assert abs(diff.mean()) < 0.4
    np.testing.assert_array_equal(lab, label)
    np.testing.assert_array_equal(aff, RAS)
    again, _, _ = shifts.add_noise(image, label, RAS, 30.0, seed=3)
    other, _, _ = shifts.add_noise(image, label, RAS, 30.0, seed=4)
    np.testing.assert_array_equal(img, again)
    assert not np.array_equal(img, other)


def test_contrast_changes_only_the_given_labels_by_exactly_the_offset() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(-1000, 1500, (12, 10, 6)).astype(np.int16)
    label = rng.choice(np.array([0, 1, 5, 6], np.uint8), size=image.shape)
    img, lab, _ = shifts.contrast_offset(image, label, RAS, {5: 40.0, 1: 60.0})
    delta = img - image.astype(np.float32)
    np.testing.assert_array_equal(delta[label == 5], 40.0)
    np.testing.assert_array_equal(delta[label == 1], 60.0)
    np.testing.assert_array_equal(delta[(label != 5) & (label != 1)], 0.0)
    np.testing.assert_array_equal(lab, label)


# ----------------------------------------------------------------------------------------------
# Field-of-view crop
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [RAS, LPS, SLICE_FIRST], ids=["RAS", "LPS", "slice-first"])
@pytest.mark.parametrize("side", ["left", "right", "anterior", "posterior"])
def test_crop_keeps_world_positions_and_cuts_the_named_side(affine: np.ndarray,
                                                            side: str) -> None:
    shape = (20, 16, 12)
    # Each voxel's value is its flat index: where it came from, whatever the crop did.
    image = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    label = (image % 7).astype(np.uint8)
    img, lab, aff = shifts.crop_fov(image, label, affine, 0.25, side)
    origin = np.stack(np.unravel_index(img.astype(np.int64).ravel(), shape), axis=1)
    new = np.argwhere(np.ones(img.shape, bool))
    np.testing.assert_allclose(apply_affine(aff, new), apply_affine(affine, origin), atol=1e-9)
    np.testing.assert_array_equal(lab.ravel(), label[tuple(origin.T)])
    # RAS+: the patient's left is -x, posterior -y. The removed voxels are the quarter of the
    # in-plane extent furthest towards that side.
    axis, direction = {"left": (0, -1), "right": (0, 1), "posterior": (1, -1),
                       "anterior": (1, 1)}[side]
    kept = apply_affine(aff, new)[:, axis] * direction
    everything = world_grid(affine, shape).reshape(-1, 3)[:, axis] * direction
    assert kept.max() < everything.max()
    n_along = len(np.unique(everything.round(6)))
    assert len(np.unique(kept.round(6))) == n_along - round(0.25 * n_along)
    assert kept.min() == pytest.approx(everything.min())


# ----------------------------------------------------------------------------------------------
# Body-size scale
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_scale_grows_a_disc_by_the_square_of_the_factor(factor: float) -> None:
    shape = (81, 81, 3)
    label = np.zeros(shape, np.uint8)
    yy, xx = np.meshgrid(np.arange(81), np.arange(81), indexing="ij")
    label[((yy - 40) ** 2 + (xx - 40) ** 2) <= 20 ** 2] = 1
    image = np.where(label > 0, 60.0, -100.0).astype(np.float32)
    img, lab, aff = shifts.scale_anatomy(image, label, RAS, factor)
    assert img.shape == shape and lab.shape == shape
    np.testing.assert_array_equal(aff, RAS)
    ratio = np.count_nonzero(lab[..., 1]) / np.count_nonzero(label[..., 1])
    assert ratio == pytest.approx(factor ** 2, rel=0.04)
    np.testing.assert_allclose(np.argwhere(lab > 0).mean(axis=0), [40, 40, 1], atol=0.1)
    # Slices are not mixed.
    np.testing.assert_array_equal(lab[..., 0], lab[..., 2])


def test_scale_fills_with_air_from_outside() -> None:
    image = np.zeros((30, 30, 2), np.float32)
    label = np.ones(image.shape, np.uint8)
    img, lab, _ = shifts.scale_anatomy(image, label, RAS, 0.8)
    assert img[0, 0, 0] == shifts.AIR_HU and lab[0, 0, 0] == 0
    assert img[15, 15, 0] == 0 and lab[15, 15, 0] == 1


# ----------------------------------------------------------------------------------------------
# Block mapping and the registry
# ----------------------------------------------------------------------------------------------


def test_map_slab_identity_and_a_flipped_copy() -> None:
    shape = (4, 4, 30)
    assert shifts.map_slab((12, 18), RAS, shape, RAS, shape) == (12, 18)
    # The same grid stored feet-first: RAS slice indices are those of the RAS copy.
    flipped = RAS.copy()
    flipped[:3, 2] *= -1
    flipped[:3, 3] = apply_affine(RAS, (0, 0, 29))
    assert shifts.map_slab((12, 18), RAS, shape, flipped, shape) == (12, 18)


def test_map_slab_by_world_z_for_thicker_slices() -> None:
    shape = (3, 3, 30)
    label = np.zeros(shape, np.uint8)
    _, lab, aff = shifts.resample_thickness(np.zeros(shape), label, RAS, 6.0)
    start, stop = shifts.map_slab((10, 20), RAS, shape, aff, lab.shape)
    old_z = world_grid(RAS, shape)[0, 0, :, 2]
    new_z = world_grid(aff, lab.shape)[0, 0, :, 2]
    low, high = old_z[10] - 1.5, old_z[19] + 1.5
    expected = np.flatnonzero((new_z >= low) & (new_z < high))
    assert (start, stop) == (expected[0], expected[-1] + 1)
    assert stop - start == 5  # 30 mm of slab centres 6 mm apart


def test_totalsegmentator_ids_follow_the_organ_task() -> None:
    assert shifts.TOTALSEG_IDS == {"spleen": 1, "liver": 5, "stomach": 6}
    assert set(shifts.TOTALSEG_IDS.values()) == set(LABEL_MAP)


@pytest.mark.parametrize("name", list(shifts.SHIFTS))
def test_every_registered_shift_applies(name: str) -> None:
    shape = (24, 20, 15)
    rng = np.random.default_rng(0)
    image = rng.integers(-200, 200, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[4:10, 5:12, 3:12] = 1
    label[12:20, 5:15, 3:12] = 5
    label[8:14, 12:18, 5:10] = 6
    img, lab, aff = shifts.apply_shift(name, image, label, RAS, seed=1)
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    assert img.shape == lab.shape and aff.shape == (4, 4)
    assert np.isfinite(img).all()
    start, stop = shifts.map_slab((6, 9), RAS, shape, aff, img.shape)
    assert 0 <= start < stop <= img.shape[2]
    if shifts.SHIFTS[name].kind == "none":
        np.testing.assert_array_equal(img, image)


def test_unknown_shift_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown shift"):
        shifts.apply_shift("blur", np.zeros((2, 2, 2)), np.zeros((2, 2, 2), np.uint8), RAS)


def test_calibration_shifts_differ_from_the_benchmark_shifts() -> None:
    # The review threshold is fitted on CALIBRATION_SHIFTS and tested on SHIFTS: apart from the
    # identity, no setting may be shared.
    bench = {(s.kind, repr(sorted(s.params.items()))) for s in shifts.SHIFTS.values()
             if s.kind != "none"}
    for s in shifts.CALIBRATION_SHIFTS.values():
        assert (s.kind, repr(sorted(s.params.items()))) not in bench, s.name
    assert not set(shifts.SHIFTS) & set(shifts.CALIBRATION_SHIFTS)


def test_write_shifted_cases_gives_readable_cases_on_the_mapped_block(tmp_path) -> None:
    import nibabel as nib

    from sfpc.training.layouts import discover_cases
    image = np.arange(20 * 18 * 30, dtype=np.float32).reshape(20, 18, 30)
    label = blob_label((20, 18, 30), (10, 9, 15), 5, value=5)
    names = ["cal none", "cal thickness 7mm", "cal crop 20% right"]
    entries = shifts.write_shifted_cases(image, label, RAS, (12, 18), names, tmp_path,
                                         LABEL_MAP)
    assert [e["id"] for e in entries] == names
    assert entries[0]["slices"] == [12, 18]
    (tmp_path / "cases.json").write_text(__import__("json").dumps(entries))
    cases = {c.id: c for c in discover_cases(tmp_path / "cases.json", "json")}
    for entry in entries:
        case = cases[entry["id"]]
        img = nib.load(str(case.image[0]))
        lab = np.asarray(nib.load(str(case.label)).dataobj)
        assert img.shape == lab.shape
        z_lo, z_hi = entry["slices"]
        # The block's world z range holds the mapped slices (nibabel, not the code's map).
        zs = apply_affine(img.affine, np.array([[0, 0, z_lo], [0, 0, z_hi - 1]]))[:, 2]
        assert RAS[2, 3] + 3.0 * 12 - 1.5 <= zs[0] and zs[1] < RAS[2, 3] + 3.0 * 18 - 1.5
        assert case.label_map == LABEL_MAP
