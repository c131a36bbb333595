"""The inference engine against independent oracles.

- Model-grid probabilities: MONAI's ``sliding_window_inference`` / ``SliceInferer`` driving the
  PyTorch network the ONNX graphs were exported from; the 2D "resize" recipe against
  ``torch.nn.functional.interpolate`` (bilinear, align_corners=False) around the network.
- Uncertainty maps: H(p_bar)/ln K and (H(p_bar) - mean_m H(p_m))/ln K written out by hand from
  ``SFPCNet.sample_probs`` on a single-window volume.
- Geometry: nibabel's ``as_closest_canonical`` copy of each input must give the same mask, and
  the bounded-memory restore must equal ``preprocess.restore`` of the whole model grid.
- Statistics: ``training.metrics.boundary_band`` on the whole mask, volumes from the affine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform
from scipy import ndimage

from sfpc.errors import InputError
from sfpc.inference.backends import OnnxRuntimeBackend
from sfpc.inference.contract import ModelMetadata
from sfpc.inference.engine import Engine, flip_unavailable, resample_linear
from sfpc.inference.preprocess import resample_to_shape, restore
from sfpc.inference.uncertainty import (
    cropped_boundary_band,
    mutual_information,
    predictive_entropy,
    region_statistics,
    sample_moments,
)
from sfpc.io.artefacts import MAP_MAX_ERROR
from sfpc.training.metrics import boundary_band
from tests.support.models import train_tiny_net

torch = pytest.importorskip("torch")
monai_inferers = pytest.importorskip("monai.inferers")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ATOL = 1e-4  # ONNX Runtime vs PyTorch float32 kernels, then blending and resampling
PATCH_3D = [32, 32, 32]  # five UNet levels: the bottleneck of a 32^3 window is 2^3
PATCH_2D = [32, 32]


# ----------------------------------------------------------------------------------------------
# Fixtures: small SFPC nets, trained a few steps so BatchNorm and FLPM buffers are not at init
# ----------------------------------------------------------------------------------------------


def _trained_net(spatial_dims: int, in_channels: int, num_classes: int, patch: list[int],
                 seed: int):
    # Trained a few steps (tests.support.models) so BatchNorm and FLPM buffers are not at init.
    net = train_tiny_net(spatial_dims, num_classes, patch, in_channels=in_channels,
                         channels=(8, 16, 32, 64, 128), steps=4, seed=seed)
    assert float(net.flpm().running_dsigma.abs().sum()) > 0
    return net


def _export(tmp: Path, spatial_dims: int, in_channels: int, num_classes: int, patch: list[int],
            spacing, seed: int):
    from sfpc.model.export import export_model

    net = _trained_net(spatial_dims, in_channels, num_classes, patch, seed)
    meta = ModelMetadata(
        name=f"engine{spatial_dims}d", spatial_dims=spatial_dims, in_channels=in_channels,
        num_classes=num_classes, class_names=["background"] + [f"c{i}" for i in
                                                               range(1, num_classes)],
        patch_size=patch, spacing=spacing, normalisation={"kind": "zscore", "foreground": "all"},
    )
    export_model(net, meta, tmp)
    backend = OnnxRuntimeBackend(tmp, providers=["CPUExecutionProvider"], intra_op_threads=1,
                                 inter_op_threads=1)
    return net, ModelMetadata.load(tmp), backend


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_3d(tmp_path_factory):
    net, meta, backend = _export(tmp_path_factory.mktemp("engine3d"), 3, 1, 3, PATCH_3D,
                                 [1.5, 1.5, 1.5], seed=0)
    yield net, meta, backend
    backend.close()


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory):
    net, meta, backend = _export(tmp_path_factory.mktemp("engine2d"), 2, 2, 4, PATCH_2D,
                                 [1.2, 1.2], seed=1)
    yield net, meta, backend
    backend.close()


def _meta(meta: ModelMetadata, **changes) -> ModelMetadata:
    copy = ModelMetadata.from_dict(meta.to_dict())
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


def _volume(shape, channels: int | None, seed: int) -> np.ndarray:
    """Smooth blobs plus noise: structure at several scales so predicted masks are not uniform."""
    rng = np.random.default_rng(seed)
    n = channels or 1
    vol = np.stack([
        ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * 400 + rng.normal(size=shape) * 20
        for _ in range(n)
    ]).astype(np.float32)
    return vol if channels else vol[0]


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = math.cos(ax), math.sin(ax), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


def _affine(linear, origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = origin
    return a


AFFINES = {
    "ras": _affine(np.diag([1.2, 1.0, 2.0])),
    "lps": _affine(np.diag([-0.9, -0.9, 2.5])),
    "oblique": _affine(_rotation(0.2, 0.35) @ np.diag([1.1, 0.8, 2.2])),
    "permuted": _affine(np.array([[0.0, 1.3, 0.0], [0.0, 0.0, -0.7], [2.0, 0.0, 0.0]])),
    "anisotropic": _affine(np.diag([0.5, -0.5, 4.0])),
}


# ----------------------------------------------------------------------------------------------
# Import hygiene and the pure uncertainty functions
# ----------------------------------------------------------------------------------------------


def test_engine_imports_without_torch():
    code = ("import sys, sfpc.inference.engine, sfpc.inference.uncertainty; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_uncertainty_functions_hand_worked():
    ln2, ln3 = math.log(2), math.log(3)
    # Two confident samples that disagree: p_bar uniform, all of its entropy is disagreement.
    samples = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)[:, :, None]  # (M, K, 1)
    mean_p, mean_h = sample_moments(samples)
    np.testing.assert_allclose(mean_p[:, 0], [0.5, 0.5])
    np.testing.assert_allclose(mean_h, 0.0, atol=1e-6)
    np.testing.assert_allclose(predictive_entropy(mean_p), 1.0, atol=1e-6)
    np.testing.assert_allclose(mutual_information(mean_p, mean_h), 1.0, atol=1e-6)
    np.testing.assert_allclose(predictive_entropy(mean_p, normalise=False), ln2, atol=1e-6)
    # Identical samples: no disagreement, entropy = -sum p ln p / ln 3.
    p = [0.7, 0.2, 0.1]
    h = -sum(v * math.log(v) for v in p)
    same = np.tile(np.array(p, dtype=np.float32)[None, :, None], (3, 1, 1))
    mean_p, mean_h = sample_moments(same)
    np.testing.assert_allclose(predictive_entropy(mean_p), h / ln3, atol=1e-6)
    np.testing.assert_allclose(mutual_information(mean_p, mean_h), 0.0, atol=1e-6)
    # Two samples [0.9, 0.1] and [0.5, 0.5]: MI = H([0.7, 0.3]) - (H([.9, .1]) + ln 2) / 2.
    two = np.array([[0.9, 0.1], [0.5, 0.5]], dtype=np.float32)[:, :, None]
    mean_p, mean_h = sample_moments(two)

    def hb(q):
        return -(q * math.log(q) + (1 - q) * math.log(1 - q))

    expected = (hb(0.7) - (hb(0.9) + ln2) / 2) / ln2
    np.testing.assert_allclose(mutual_information(mean_p, mean_h), expected, atol=1e-6)
    # A mean entropy a hair above H(p_bar) (float rounding) is clipped to 0, never negative.
    mi = mutual_information(np.array([[0.5], [0.5]]), np.array([[ln2 + 1e-7]]))
    assert mi.min() == 0.0


def test_region_statistics_match_full_band_and_counts():
    rng = np.random.default_rng(3)
    labels = np.zeros((40, 36, 30), dtype=np.uint8)
    labels[5:15, 8:20, 4:12] = 1  # interior box
    zz, yy, xx = np.mgrid[:40, :36, :30]
    labels[(zz - 30) ** 2 + (yy - 30) ** 2 + (xx - 25) ** 2 < 64] = 2  # touches the edges
    labels[0:3, 0:4, 26:30] = 3  # corner
    maps = {"entropy": rng.random(labels.shape, dtype=np.float32),
            "mutual_information": rng.random(labels.shape, dtype=np.float32) * 0.1}
    stats = region_statistics(labels, maps, ["bg", "a", "b", "c", "absent"], 0.002, band=10)
    union = np.zeros(labels.shape, dtype=bool)
    for k, name in enumerate(["bg", "a", "b", "c", "absent"]):
        entry = stats["classes"][name]
        inside = labels == k
        assert entry["voxels"] == int(inside.sum())
        assert entry["volume_ml"] == pytest.approx(inside.sum() * 0.002)
        if not inside.any():
            assert entry["mean_entropy"] is None and entry["boundary_mean_entropy"] is None
            continue
        assert entry["mean_entropy"] == pytest.approx(float(maps["entropy"][inside].mean()))
        if k == 0:
            continue
        band = boundary_band(inside, 10)
        union |= band
        assert entry["boundary_voxels"] == int(band.sum())
        for name_map, values in maps.items():
            assert entry[f"boundary_mean_{name_map}"] == pytest.approx(
                float(values[band].mean()), rel=1e-6)
    case = stats["case"]
    assert case["boundary_voxels"] == int(union.sum())
    assert case["boundary_mean_entropy"] == pytest.approx(float(maps["entropy"][union].mean()))
    assert case["mean_mutual_information"] == pytest.approx(
        float(maps["mutual_information"].mean()), rel=1e-6)


@pytest.mark.parametrize("band", [1, 3, 10])
def test_cropped_band_equals_whole_array_band(band):
    mask = np.zeros((50, 23, 31), dtype=bool)
    mask[20:26, 0:5, 10:30] = True
    mask[44:50, 11:13, 2:4] = True
    box, cropped = cropped_boundary_band(mask, band)
    full = np.zeros_like(mask)
    full[box] = cropped
    np.testing.assert_array_equal(full, boundary_band(mask, band))


def test_resample_linear_blocks_equal_resample_to_shape():
    rng = np.random.default_rng(4)
    arr = rng.random((3, 13, 9, 7), dtype=np.float32)
    for shape in [(20, 5, 11), (13, 18, 7), (6, 9, 3)]:
        whole = resample_to_shape(arr, shape, 1)
        for axis in range(3):
            blocks = [resample_linear(arr, shape, axis=axis, start=s, stop=min(s + 4, shape[axis]))
                      for s in range(0, shape[axis], 4)]
            np.testing.assert_allclose(np.concatenate(blocks, axis=axis + 1), whole, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# Model-grid numerics against MONAI with the PyTorch network
# ----------------------------------------------------------------------------------------------


def _torch_plain(net, temperature: float = 1.0):
    def run(x):
        return torch.softmax(net(x) / temperature, dim=1)
    return run


def _torch_moments(net, m: int, temperature: float = 1.0):
    """Mean softmax and mean natural-log entropy of the M perturbed predictions, by hand; the
    calibration temperature divides every perturbed logit map, as in plain mode."""
    def run(x):
        p = torch.softmax(net.perturbed_logits(net.seg_features(x), m) / temperature, dim=2)
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=2, keepdim=True)
        return {"mean_probs": p.mean(dim=0), "mean_entropy": h.mean(dim=0)}
    return run


def test_3d_model_grid_matches_monai(model_3d):
    net, meta, backend = model_3d
    engine = Engine(backend, _meta(meta, temperature=1.7), sw_batch_size=3)
    image = _volume((60, 50, 34), None, seed=5)
    affine = _affine(np.diag([1.5, 1.5, 0.75]))  # model grid 60 x 50 x 17: z padded to 32
    model_image, geometry = engine.preprocess(image, affine)
    assert geometry.model_shape == (60, 50, 17)
    x = torch.from_numpy(model_image)[None]
    settings = {"roi_size": PATCH_3D, "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian",
                "sigma_scale": 0.125, "padding_mode": "constant"}
    with torch.no_grad():
        ref = monai_inferers.sliding_window_inference(
            x, predictor=_torch_plain(net, 1.7), **settings)[0].numpy()
        ref_u = monai_inferers.sliding_window_inference(
            x, predictor=_torch_moments(net, meta.perturbation["M"], 1.7), **settings)
    out = engine.infer_model_grid(model_image)
    assert list(out) == ["probs"] and out["probs"].shape == (3, 60, 50, 17)
    np.testing.assert_allclose(out["probs"], ref, atol=ATOL)
    out_u = engine.infer_model_grid(model_image, uncertainty=True)
    for key in ("mean_probs", "mean_entropy"):
        np.testing.assert_allclose(out_u[key], ref_u[key][0].numpy(), atol=ATOL)


@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_2d_slicewise_model_grid_matches_monai(model_2d, plane):
    net, meta, backend = model_2d
    # A tiny slab budget: the volume runs in many slabs, which must not change a single value.
    engine = Engine(backend, _meta(meta, plane=plane), sw_batch_size=5, slab_bytes=40_000)
    image = _volume((40, 27, 9), 2, seed=6)
    model_image, _ = engine.preprocess(image, np.diag([1.2, 1.2, 3.0, 1.0]))
    axis = {"axial": 2, "coronal": 1}[plane]
    x = torch.from_numpy(model_image)[None]
    common = {"roi_size": PATCH_2D, "sw_batch_size": 7, "overlap": 0.5, "mode": "gaussian",
              "sigma_scale": 0.125, "spatial_dim": axis}
    with torch.no_grad():
        ref = monai_inferers.SliceInferer(**common)(x, _torch_plain(net))[0].numpy()
        ref_u = monai_inferers.SliceInferer(**common)(x, _torch_moments(net, 4))
    out = engine.infer_model_grid(model_image)
    np.testing.assert_allclose(out["probs"], ref, atol=ATOL)
    out_u = engine.infer_model_grid(model_image, uncertainty=True)
    for key in ("mean_probs", "mean_entropy"):
        np.testing.assert_allclose(out_u[key], ref_u[key][0].numpy(), atol=ATOL)


def test_2d_resize_mode_matches_torch_interpolate(model_2d):
    net, meta, backend = model_2d
    engine = Engine(backend, _meta(meta, input_mode="resize", spacing=None), slab_bytes=60_000)
    image = _volume((45, 27, 6), 2, seed=7)  # one axis shrinks to 32, the other grows
    model_image, geometry = engine.preprocess(image, np.eye(4))
    assert geometry.model_shape == (45, 27, 6)
    slices = torch.from_numpy(np.moveaxis(model_image, 3, 0).copy())  # (S, C, X, Y)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(slices, size=PATCH_2D, mode="bilinear",
                                                align_corners=False)
        probs = torch.softmax(net(small), dim=1)
        back = torch.nn.functional.interpolate(probs, size=(45, 27), mode="bilinear",
                                               align_corners=False)
    ref = np.moveaxis(back.numpy(), 0, 3)  # (K, X, Y, S)
    out = engine.infer_model_grid(model_image)
    np.testing.assert_allclose(out["probs"], ref, atol=ATOL)
    result = engine.segment(image, np.eye(4))
    assert result.n_windows == 6  # one window per slice after resizing


@pytest.mark.parametrize("input_mode", ["spacing", "resize"])
def test_2d_model_grid_equals_training_evaluation(model_2d, input_mode):
    """Serving and the trainer's validation must see the same probabilities."""
    from sfpc.training.evaluate import predict_probs, torch_predictor

    net, meta, backend = model_2d
    engine = Engine(backend, _meta(meta, input_mode=input_mode), slab_bytes=50_000)
    model_image, _ = engine.preprocess(_volume((45, 27, 6), 2, seed=14), np.eye(4))
    ref = predict_probs(torch_predictor(net, torch.device("cpu")), model_image, spatial_dims=2,
                        patch_size=PATCH_2D, plane_axis=2, input_mode=input_mode)
    np.testing.assert_allclose(engine.infer_model_grid(model_image)["probs"],
                               next(iter(ref.values())), atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Uncertainty maps by hand on single-window volumes
# ----------------------------------------------------------------------------------------------


def _hand_maps(samples: np.ndarray, class_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised H(p_bar) and MI from M sample maps along axis 0, written out longhand."""
    k = samples.shape[class_axis]
    p_bar = samples.mean(axis=0)
    h_bar = -np.sum(p_bar * np.log(np.clip(p_bar, 1e-12, None)), axis=class_axis - 1)
    h_each = -np.sum(samples * np.log(np.clip(samples, 1e-12, None)), axis=class_axis)
    return h_bar / math.log(k), np.maximum(h_bar - h_each.mean(axis=0), 0) / math.log(k)


def test_3d_uncertainty_maps_equal_hand_computation(model_3d):
    net, meta, backend = model_3d
    engine = Engine(backend, _meta(meta, spacing=None))
    image = _volume(tuple(PATCH_3D), None, seed=8)
    result = engine.segment(image, np.diag([1.5, 1.5, 1.5, 1.0]), uncertainty=True)
    assert result.n_windows == 1
    x = (image - image.mean()) / image.std()  # zscore over all voxels, by hand
    with torch.no_grad():
        samples = net.sample_probs(torch.from_numpy(x)[None, None], 4)[:, 0].numpy()
    entropy, mi = _hand_maps(samples, class_axis=1)  # samples (M, K, X, Y, Z)
    np.testing.assert_allclose(result.entropy, entropy, atol=ATOL)
    np.testing.assert_allclose(result.mutual_information, mi, atol=ATOL)
    assert float(mi.max()) > 1e-3  # the perturbations really disagree somewhere
    p_bar = np.sort(samples.mean(axis=0), axis=0)
    clear = p_bar[-1] - p_bar[-2] > 1e-3
    np.testing.assert_array_equal(result.mask[clear],
                                  samples.mean(axis=0).argmax(axis=0)[clear])


def test_flip_averages_the_mirrored_pass_sample_by_sample(model_3d):
    net, meta, backend = model_3d
    engine = Engine(backend, _meta(meta, spacing=None))
    image = _volume(tuple(PATCH_3D), None, seed=8)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    plain = engine.segment(image, affine, uncertainty=True)
    result = engine.segment(image, affine, uncertainty=True, flip=True)
    assert result.n_windows == 2 * plain.n_windows == 2 and result.model["flip"] is True
    x = torch.from_numpy((image - image.mean()) / image.std())[None, None]
    with torch.no_grad():  # the 4 samples of the image and the 4 of its mirror, mirrored back
        direct = net.sample_probs(x, 4)[:, 0]
        mirrored = torch.flip(net.sample_probs(torch.flip(x, [2]), 4)[:, 0], [2])
    samples = torch.cat([direct, mirrored]).numpy()  # (8, K, X, Y, Z)
    entropy, mi = _hand_maps(samples, class_axis=1)
    np.testing.assert_allclose(result.entropy, entropy, atol=ATOL)
    np.testing.assert_allclose(result.mutual_information, mi, atol=ATOL)
    assert np.abs(result.entropy - plain.entropy).max() > 1e-3  # the mirror really counts
    # plain mode: the mean of the two passes' softmax
    probs = engine.infer_model_grid(x.numpy()[0], flip=True)["probs"]
    with torch.no_grad():
        both = (torch.softmax(net(x), 1) + torch.flip(torch.softmax(net(torch.flip(x, [2])), 1),
                                                       [2])) / 2
    np.testing.assert_allclose(probs, both[0].numpy(), atol=ATOL)


def test_flip_is_refused_for_a_model_trained_without_flips(model_3d):
    _, meta, backend = model_3d
    no_flips = _meta(meta, training={"augment": {"flip": False}})
    assert flip_unavailable(no_flips) and flip_unavailable(meta) is None
    engine = Engine(backend, no_flips)
    with pytest.raises(InputError, match="trained without flips"):
        engine.segment(_volume((32, 32, 32), None, seed=1), np.eye(4), flip=True)
    engine.segment(_volume((32, 32, 32), None, seed=1), np.eye(4))  # plain requests still run


def test_2d_uncertainty_maps_equal_hand_computation(model_2d):
    net, meta, backend = model_2d
    engine = Engine(backend, _meta(meta, spacing=None))
    image = _volume((32, 32, 5), 2, seed=9)
    result = engine.segment(image, np.diag([1.0, 1.0, 5.0, 1.0]), uncertainty=True)
    assert result.n_windows == 5
    x = (image - image.mean(axis=(1, 2, 3), keepdims=True)) / image.std(axis=(1, 2, 3),
                                                                        keepdims=True)
    slices = torch.from_numpy(np.moveaxis(x, 3, 0).copy())  # (S, C, X, Y)
    with torch.no_grad():
        samples = net.sample_probs(slices, 4).numpy()  # (M, S, K, X, Y)
    entropy, mi = _hand_maps(samples, class_axis=2)  # (S, X, Y)
    np.testing.assert_allclose(result.entropy, np.moveaxis(entropy, 0, 2), atol=ATOL)
    np.testing.assert_allclose(result.mutual_information, np.moveaxis(mi, 0, 2), atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Geometry: shapes, canonical copies, the bounded-memory restore
# ----------------------------------------------------------------------------------------------


def _canonical(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = image if image.ndim == 3 else np.moveaxis(image, 0, -1)
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    out = np.asarray(canon.dataobj)
    return (out if image.ndim == 3 else np.moveaxis(out, -1, 0)), canon.affine


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("dims", [3, 2])
def test_geometry_matches_canonical_copy(model_3d, model_2d, name, dims):
    _, meta, backend = model_3d if dims == 3 else model_2d
    engine = Engine(backend, meta)
    affine = AFFINES[name]
    image = _volume((31, 26, 15), None if dims == 3 else 2, seed=10)
    result = engine.segment(image, affine, uncertainty=True)
    spatial = image.shape[-3:]
    assert result.mask.shape == spatial and result.mask.dtype == np.uint8
    assert result.entropy.shape == spatial and result.mutual_information.shape == spatial
    np.testing.assert_array_equal(result.affine, affine)
    assert len(np.unique(result.mask)) >= 2  # a uniform mask would make the comparison vacuous

    canon_image, canon_affine = _canonical(image, affine)
    canon = engine.segment(canon_image, canon_affine, uncertainty=True)
    back = ornt_transform(io_orientation(canon_affine), io_orientation(affine))
    np.testing.assert_array_equal(apply_orientation(canon.mask, back), result.mask)
    np.testing.assert_allclose(apply_orientation(canon.entropy, back), result.entropy, atol=1e-6)

    assert 0.0 <= result.entropy.min() and result.entropy.max() <= 1.0
    assert result.mutual_information.min() >= 0.0
    assert (result.mutual_information <= result.entropy + 1e-6).all()


@pytest.mark.parametrize("in_shape,out_shape,axis,rows", [
    ((40, 37, 9), (120, 111, 9), 2, (0, 9)),      # 2D slab: in-plane upsampled
    ((40, 37, 9), (17, 100, 9), 0, (3, 15)),      # down- and upsampled, a block of rows
    ((20, 21, 22), (31, 15, 50), 1, (2, 9)),      # 3D, every axis resampled
    ((30, 30, 5), (30, 30, 5), 2, (1, 3)),        # nothing resampled
])
def test_restore_labels_equals_argmax_of_restored_probabilities(in_shape, out_shape, axis, rows):
    """The mask restore interpolates only where the neighbouring model voxels disagree; the
    oracle interpolates every class everywhere (resample_linear, itself checked against
    preprocess.resample_to_shape) and takes the argmax."""
    from scipy import ndimage

    from sfpc.inference.engine import restore_labels

    rng = np.random.default_rng(sum(in_shape))
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=in_shape), 2) * 20
                       for _ in range(4)])
    probs = np.exp(logits - logits.max(axis=0))
    probs = (probs / probs.sum(axis=0)).astype(np.float32)
    oracle = resample_linear(probs, out_shape, axis=axis, start=rows[0], stop=rows[1])
    top2 = np.sort(oracle, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-5
    got = restore_labels(probs, out_shape, axis=axis, start=rows[0], stop=rows[1])
    assert got.dtype == np.uint8 and got.shape == oracle.shape[1:]
    assert 0 < (got != got.flat[0]).mean()  # several labels, so boundaries to interpolate
    np.testing.assert_array_equal(got[clear], oracle.argmax(axis=0)[clear])


@pytest.mark.parametrize("dims", [3, 2])
def test_streamed_restore_equals_whole_grid_restore(model_3d, model_2d, dims):
    _, meta, backend = model_3d if dims == 3 else model_2d
    affine = AFFINES["oblique"]
    image = _volume((33, 28, 14), None if dims == 3 else 2, seed=11)
    streamed = Engine(backend, meta, slab_bytes=1).segment(image, affine)  # one row per slab
    whole_engine = Engine(backend, meta, slab_bytes=1 << 40)
    model_image, geometry = whole_engine.preprocess(image, affine)
    probs = whole_engine.infer_model_grid(model_image)["probs"]
    restored = restore(probs, geometry, order=1)  # the preprocessing module's own inverse
    top2 = np.sort(restored, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(streamed.mask[clear], restored.argmax(axis=0)[clear])


@pytest.mark.parametrize("dims", [3, 2])
def test_streamed_maps_are_the_model_grid_maps_restored(model_3d, model_2d, dims):
    """Uncertainty maps: computed from the model-grid moments, restored linearly by
    ``preprocess.restore`` (the oracle), held as uint16 levels within MAP_MAX_ERROR; a
    Fortran-ordered upload (as NIfTI gives) gets Fortran-ordered outputs."""
    _, meta, backend = model_3d if dims == 3 else model_2d
    affine = AFFINES["oblique"]
    image = np.asfortranarray(_volume((33, 28, 14), None, seed=11)) if dims == 3 else \
        _volume((33, 28, 14), 2, seed=11)
    streamed = Engine(backend, meta, slab_bytes=1).segment(image, affine, uncertainty=True)
    whole_engine = Engine(backend, meta, slab_bytes=1 << 40)
    model_image, geometry = whole_engine.preprocess(image, affine)
    moments = whole_engine.infer_model_grid(model_image, uncertainty=True)
    p_bar, mean_h = moments["mean_probs"], moments["mean_entropy"][0]
    h_bar = -np.sum(p_bar * np.log(np.clip(p_bar, 1e-12, None)), axis=0)
    k = p_bar.shape[0]
    expected = {"entropy": h_bar / math.log(k),
                "mutual_information": np.maximum(h_bar - mean_h, 0) / math.log(k)}
    assert streamed.entropy_levels.dtype == np.uint16
    for name, levels in streamed.map_levels().items():
        oracle = restore(expected[name].astype(np.float32), geometry, order=1)
        np.testing.assert_allclose(levels / 65535.0, oracle, rtol=0, atol=MAP_MAX_ERROR + 2e-6)
    if dims == 3:
        assert streamed.mask.flags.f_contiguous and streamed.entropy_levels.flags.f_contiguous


@pytest.mark.parametrize(("slices", "batch", "expected"),
                         [(20, 16, 2), (400, 16, 48), (400, 4, 48), (7, 4, 1), (130, 4, 16),
                          (1, 16, 1)])
def test_slabs_beside_the_network_are_small_and_whole_batches_when_they_can(
        model_2d, slices, batch, expected):
    """At least PIPELINE_SLABS slabs: of whole batches when a slab holds one, else partial
    (a 20-slice series in batches of 16: slabs of 2 slices, not 16 and 4); never more than the
    memory budget's slab."""
    from sfpc.inference.engine import PIPELINE_SLABS

    _, meta, backend = model_2d
    engine = Engine(backend, meta, sw_batch_size=batch)
    shape = [64, 64, 64]
    shape[engine.plane_axis] = slices
    assert engine._pipelined({"slab_slices": 1000}, shape)["slab_slices"] == expected
    assert -(-slices // expected) >= min(slices, PIPELINE_SLABS)
    assert engine._pipelined({"slab_slices": 2}, shape)["slab_slices"] == min(2, expected)
    assert engine._pipelined({"slab_slices": None}, shape) == {"slab_slices": None}


@pytest.mark.parametrize("dims", [3, 2, "2-ct-window", "2-partial-batches"])
def test_restoring_beside_the_network_changes_nothing(model_3d, model_2d, dims):
    """The restore running while the backend computes the next slab (the default) gives the
    arrays of the serial loop bit for bit, and its stage timings still split the wall clock.
    "2-ct-window": a per-voxel normalisation, so the model image is also prepared slab by slab
    behind the network. "2-partial-batches": batches of 16 windows, slabs of 5 slices beside
    the network against whole batches in the serial loop."""
    _, meta, backend = model_3d if dims == 3 else model_2d
    if dims == "2-ct-window":
        meta = _meta(meta, normalisation={"kind": "ct_window", "window": [-300.0, 300.0]})
    image = _volume((33, 28, 40), None if dims == 3 else 2, seed=17)
    affine = AFFINES["lps"]
    results = {}
    batch = 16 if dims == "2-partial-batches" else 4
    for concurrent in (True, False):
        engine = Engine(backend, meta, sw_batch_size=batch,
                        slab_bytes=1 << 20 if batch == 16 else 1 << 16,
                        concurrent_restore=concurrent)
        results[concurrent] = engine.segment(image, affine, uncertainty=True)
    overlapped, serial = results[True], results[False]
    np.testing.assert_array_equal(overlapped.mask, serial.mask)
    for name, levels in serial.map_levels().items():
        np.testing.assert_array_equal(overlapped.map_levels()[name], levels)
    assert overlapped.statistics == serial.statistics
    # The volumes are counted slab by slab as the mask is written: the oracle counts the mask.
    counts = np.bincount(overlapped.mask.ravel(), minlength=meta.num_classes)
    assert [overlapped.statistics["classes"][name]["voxels"] for name in meta.class_names] \
        == counts.tolist()
    assert overlapped.statistics["case"]["voxels"] == overlapped.mask.size
    t = overlapped.timings
    assert t["postprocess_concurrent"] >= 0.0
    assert ("preprocess_concurrent" in t) == (dims == "2-ct-window")
    assert t["preprocess"] + t["inference"] + t["postprocess"] <= t["total"] + 1e-6


def test_an_error_in_the_backend_thread_reaches_the_caller(model_2d):
    """A cancellation raised by the progress callback, which runs in the worker thread, stops
    the request with that exception, as it did when the network ran in the caller's thread."""
    _, meta, backend = model_2d

    class Stop(Exception):
        pass

    def progress(done: int, total: int) -> None:
        if done >= 8:
            raise Stop(f"cancelled at {done} of {total}")

    engine = Engine(backend, meta, sw_batch_size=4, slab_bytes=1 << 16, progress=progress)
    with pytest.raises(Stop, match="cancelled at"):
        engine.segment(_volume((30, 41, 24), 2, seed=3), AFFINES["ras"])


@pytest.mark.parametrize("order", ["C", "F"])
def test_assign_tiled_equals_numpy_assignment(order):
    """Tiled writes into reoriented views of either memory order equal numpy's assignment."""
    from sfpc.inference.engine import assign_tiled

    rng = np.random.default_rng(8)
    src = rng.integers(0, 255, size=(37, 21, 50), dtype=np.uint8)
    for view in (lambda a: a[::-1, :, ::-1], lambda a: a[:, ::-1], lambda a: a):
        out = np.zeros((37, 21, 50), np.uint8, order=order)
        expected = out.copy(order=order)
        view(expected)[...] = src
        assign_tiled(view(out), src, tile=8)
        np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="cannot assign"):
        assign_tiled(np.zeros((3, 4)), np.zeros((4, 3)))


def test_only_the_maps_asked_for_are_restored(model_3d):
    """``maps=`` restores the named maps alone, each equal to the full run's, with the same
    mask and the same model-grid statistics; unknown names are refused."""
    _, meta, backend = model_3d
    engine = Engine(backend, meta)
    image, affine = _volume((30, 26, 12), None, seed=5), AFFINES["anisotropic"]
    full = engine.segment(image, affine, uncertainty=True)
    for wanted in ({"entropy"}, {"mutual_information"}, set()):
        part = engine.segment(image, affine, uncertainty=True, maps=wanted)
        assert set(part.map_levels()) == wanted
        for name in wanted:
            np.testing.assert_array_equal(part.map_levels()[name], full.map_levels()[name])
        np.testing.assert_array_equal(part.mask, full.mask)
        assert part.statistics == full.statistics
    with pytest.raises(ValueError, match="unknown uncertainty maps"):
        engine.segment(image, affine, uncertainty=True, maps={"variance"})


def test_statistics_and_report(model_3d):
    """Volumes are counted on the input grid's mask; the map statistics are taken on the model
    grid (labels, maps and the 10-voxel band there), checked against the model-grid moments
    worked into maps by hand."""
    _, meta, backend = model_3d
    engine = Engine(backend, meta)
    affine = AFFINES["anisotropic"]
    image = _volume((40, 36, 12), None, seed=12)
    result = engine.segment(image, affine, uncertainty=True)
    voxel_ml = 0.5 * 0.5 * 4.0 / 1000
    stats = result.statistics
    assert stats["voxel_volume_ml"] == pytest.approx(voxel_ml)
    assert stats["map_statistics_grid"] == "model"
    assert sum(c["voxels"] for c in stats["classes"].values()) == result.mask.size
    model_image, geometry = engine.preprocess(image, affine)
    assert tuple(geometry.model_shape) != tuple(result.mask.shape)  # really resampled
    moments = engine.infer_model_grid(model_image, uncertainty=True)
    p_bar, mean_h = moments["mean_probs"], moments["mean_entropy"][0]
    k_classes = p_bar.shape[0]
    h_bar = -np.sum(p_bar * np.log(np.clip(p_bar, 1e-12, None)), axis=0)
    maps = {"entropy": h_bar / math.log(k_classes),
            "mutual_information": np.maximum(h_bar - mean_h, 0) / math.log(k_classes)}
    labels = p_bar.argmax(axis=0)
    union = np.zeros(labels.shape, dtype=bool)
    for k, name in enumerate(result.class_names):
        entry = stats["classes"][name]
        inside_input = result.mask == k
        assert entry["voxels"] == int(inside_input.sum())
        assert entry["volume_ml"] == pytest.approx(inside_input.sum() * voxel_ml)
        inside = labels == k
        if inside.any():
            assert entry["mean_entropy"] == pytest.approx(float(maps["entropy"][inside].mean()),
                                                          rel=1e-4, abs=1e-6)
        if k and inside.any():
            band = boundary_band(inside, 10)
            union |= band
            assert entry["boundary_voxels"] == int(band.sum())
            assert entry["boundary_mean_mutual_information"] == pytest.approx(
                float(maps["mutual_information"][band].mean()), rel=1e-4, abs=1e-6)
    assert stats["case"]["boundary_mean_entropy"] == pytest.approx(
        float(maps["entropy"][union].mean()), rel=1e-4)
    report = result.to_report()
    text = json.dumps(report)  # JSON-able, no arrays
    assert "mask" not in report and report["n_windows"] == result.n_windows
    assert set(report["timings"]) >= {"preprocess", "inference", "postprocess"}
    assert report["shape"] == [40, 36, 12] and "NaN" not in text


def test_plain_mode_has_no_maps_and_reports_progress(model_2d):
    _, meta, backend = model_2d
    calls: list[tuple[int, int]] = []
    engine = Engine(backend, meta, sw_batch_size=4, progress=lambda d, t: calls.append((d, t)))
    result = engine.segment(_volume((30, 41, 7), 2, seed=13).astype(np.int16), AFFINES["lps"])
    assert result.entropy is None and result.mutual_information is None
    assert "boundary_mean_entropy" not in result.statistics["case"]
    assert calls and calls[-1] == (result.n_windows, result.n_windows)
    assert all(b[0] > a[0] for a, b in zip(calls, calls[1:], strict=False))
    assert all(size <= 4 for size in np.diff([0] + [d for d, _ in calls]))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _with(value, index=(3, 4, 5)):
    image = np.zeros((10, 10, 10), dtype=np.float32)
    image[index] = value
    return image


BAD_INPUTS = {
    "nan": (_with(np.nan), np.eye(4), "NaN"),
    "inf": (_with(-np.inf), np.eye(4), "Inf"),
    "channels": (np.zeros((3, 10, 10, 10), np.float32), np.eye(4), "channels"),
    "channel_last": (np.zeros((10, 10, 10, 2), np.float32), np.eye(4), "channel-last"),
    "2d_array": (np.zeros((10, 10), np.float32), np.eye(4), "dimensions"),
    "one_voxel": (np.zeros((1, 1, 1), np.float32), np.eye(4), "2 voxels"),
    "flat_axis": (np.zeros((10, 1, 10), np.float32), np.eye(4), "axis 1"),
    "singular": (np.zeros((10, 10, 10), np.float32), np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
    "dependent": (np.zeros((10, 10, 10), np.float32),
                  _affine(np.array([[1.0, 1.0, 0], [0, 0, 0], [0, 0, 1.0]])), "singular"),
    "sheared": (np.zeros((10, 10, 10), np.float32),
                _affine(np.array([[1.0, 0.3, 0], [0, 1.0, 0], [0, 0, 1.0]])), "orthogonal"),
    "affine_shape": (np.zeros((10, 10, 10), np.float32), np.eye(3), "4x4"),
    "affine_nan": (np.zeros((10, 10, 10), np.float32), np.diag([1.0, np.nan, 1, 1]), "NaN"),
    "last_row": (np.zeros((10, 10, 10), np.float32),
                 np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]), "last row"),
    "complex": (np.zeros((10, 10, 10), np.complex64), np.eye(4), "dtype"),
}


@pytest.mark.parametrize("layout", ["C", "F", "view"])
def test_every_non_finite_voxel_is_counted_in_any_layout(monkeypatch, layout):
    """The check runs in chunks (of the first spatial axis, or the last of a column-major
    image): with chunks of a few voxels, every NaN and Inf is still found and counted."""
    from sfpc.inference import engine as engine_module

    monkeypatch.setattr(engine_module, "_FINITE_CHECK_VOXELS", 7)
    image = np.zeros((1, 6, 5, 4), np.float32)
    image[0, 0, 0, 0] = image[0, 5, 4, 3] = image[0, 2, 3, 1] = np.nan
    image[0, 5, 0, 3] = np.inf
    arr = {"C": image, "F": np.asfortranarray(image),
           "view": np.asfortranarray(image[:, ::-1])[:, ::-1]}[layout]
    with pytest.raises(InputError, match="3 NaN values and 1 Inf value"):
        engine_module._check_finite(arr)
    engine_module._check_finite(np.zeros_like(arr))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_input_error(model_3d, model_2d, case):
    image, affine, words = BAD_INPUTS[case]
    # The 2D model has two channels, so "channel_last" (C = 2 last) is judged by it.
    _, meta, backend = model_2d if case == "channel_last" else model_3d
    engine = Engine(backend, meta)
    with pytest.raises(InputError, match=words):
        engine.segment(image, affine)
    assert issubclass(InputError, ValueError)


def test_uncertainty_request_without_graph_is_an_input_error(model_3d):
    _, meta, backend = model_3d
    engine = Engine(backend, _meta(meta, graphs={"seg": meta.graphs["seg"]}))
    with pytest.raises(InputError, match="uncertainty graph"):
        engine.segment(_volume((12, 12, 12), None, 0), np.eye(4), uncertainty=True)


def test_unservable_metadata_is_rejected(model_3d):
    _, meta, backend = model_3d
    with pytest.raises(ValueError, match="class_names"):
        Engine(backend, _meta(meta, class_names=["only one"]))
    with pytest.raises(ValueError, match="orientation"):
        Engine(backend, _meta(meta, orientation="RAA"))


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.skipif(not (DATA / "organs" / "mr_d_image.nii.gz").exists(),
                    reason=f"real data folder {DATA} is absent")
def test_real_lps_mr_volume(model_3d):
    _, meta, backend = model_3d
    # 3 mm model spacing keeps the real 117 x 91 x 20 grid (35 windows) so the test stays fast.
    engine = Engine(backend, _meta(meta, spacing=[3.0, 3.0, 3.0]))
    img = nib.load(DATA / "organs" / "mr_d_image.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    data = np.asarray(img.dataobj)  # int16, as stored
    result = engine.segment(data, img.affine, uncertainty=True)
    assert result.mask.shape == img.shape
    canon = nib.as_closest_canonical(img)
    canon_result = engine.segment(np.asarray(canon.dataobj), canon.affine, uncertainty=True)
    back = ornt_transform(io_orientation(canon.affine), io_orientation(img.affine))
    np.testing.assert_array_equal(apply_orientation(canon_result.mask, back), result.mask)
    total_ml = sum(c["volume_ml"] for c in result.statistics["classes"].values())
    assert total_ml == pytest.approx(np.prod(img.shape) * 27 / 1000)
