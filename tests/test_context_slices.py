"""2.5D models (``context_slices`` k: the k neighbouring slices on each side as channels), from
the contract through training, export and the engine.

Oracles are written out here, not taken from the code under test: the dataset's channels are the
volume's slices z-k..z+k indexed by hand (the edge slice repeated past the ends); the engine's
probabilities are the exported ONNX graph run by hand on stacks built with numpy from the
model-grid volume (one window per slice, so no blending is involved), softmaxed here; the mask of
``Engine.segment`` is the argmax of those probabilities resampled by scipy to the input grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest
from scipy import ndimage

from sfpc.errors import BackendError, InputError
from sfpc.inference.backends import OnnxRuntimeBackend
from sfpc.inference.contract import METADATA_FILE, ModelMetadata, load_metadata, metadata_problems
from sfpc.inference.engine import Engine
from sfpc.inference.preprocess import resample_to_shape
from sfpc.training.config import ConfigError, TrainConfig, check_values, resolve
from sfpc.training.data import Case, SliceDataset2D, Volume, load_volume
from tests.support.models import train_tiny_net

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATCH = [32, 32]
K = 1


def _meta(**changes) -> ModelMetadata:
    fields = dict(name="ctx", spatial_dims=2, in_channels=3, num_classes=3,
                  class_names=["background", "a", "b"], patch_size=PATCH,
                  spacing=[1.5, 1.5, 3.0], context_slices=K)
    fields.update(changes)
    return ModelMetadata(**fields)


# ----------------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------------


def test_contract_accepts_a_fixed_slice_spacing():
    assert metadata_problems(_meta()) == []
    assert metadata_problems(_meta(spacing=3.0)) == []  # one value: every axis
    meta = _meta(in_channels=6)  # two image channels, three slices
    assert metadata_problems(meta) == []
    assert (meta.slice_stack, meta.image_channels) == (3, 2)
    # Sagittal slices of an LPS model are normal to its first axis.
    assert metadata_problems(_meta(plane="sagittal", orientation="LPS",
                                   spacing=[3.0, None, None])) == []


@pytest.mark.parametrize("changes, words", [
    ({"context_slices": -1}, "context_slices -1"),
    ({"context_slices": 1.5}, "context_slices 1.5"),
    ({"context_slices": True}, "context_slices True"),
    ({"spatial_dims": 3, "patch_size": [32, 32, 32]}, "is for 2D models"),
    ({"input_mode": "resize"}, "input_mode 'resize'"),
    ({"spacing": None}, "needs the model grid's slice spacing"),
    ({"spacing": [1.5, 1.5]}, "needs the model grid's slice spacing"),
    ({"spacing": [1.5, 1.5, None]}, "needs the model grid's slice spacing"),
    ({"plane": "coronal", "spacing": [1.5, None, 1.5]}, "axis 1"),
    ({"in_channels": 4}, "not a multiple of the 3 slices"),
])
def test_contract_problems(changes, words):
    problems = metadata_problems(_meta(**changes))
    assert any(words in p for p in problems), problems


def test_metadata_without_the_field_loads_as_plain_2d(tmp_path):
    meta = _meta(context_slices=0, in_channels=1, spacing=[1.5, 1.5])
    meta.graphs = {"seg": {"file": "seg.onnx", "sha256": "0" * 64}}
    raw = meta.to_dict()
    del raw["context_slices"]
    (tmp_path / METADATA_FILE).write_text(json.dumps(raw))
    loaded = load_metadata(tmp_path)
    assert loaded.context_slices == 0 and loaded.image_channels == 1
    raw["context_slices"] = 1  # and a 2.5D one without a slice spacing is refused on loading
    (tmp_path / METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(BackendError, match="slice spacing"):
        load_metadata(tmp_path)


# ----------------------------------------------------------------------------------------------
# The training config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, words", [
    ({"context_slices": -1}, "must be >= 0"),
    ({"context_slices": "1"}, "whole number"),
    ({"context_slices": 1, "spatial_dims": 3}, "for 2D models"),
    ({"context_slices": 1, "input_mode": "resize"}, "--input-mode spacing"),
    ({"context_slices": 1, "spatial_dims": 2, "spacing": [0.8, 0.8]}, "--spacing 3,3,3"),
    ({"context_slices": 1, "spatial_dims": 2, "spacing": None}, "slice spacing"),
    ({"context_slices": 1, "plane": "sagittal", "spacing": [None, 1.0, 1.0]}, "RAS axis 0"),
])
def test_config_checks_name_the_flag(values, words):
    with pytest.raises(ConfigError, match=words) as caught:
        check_values(values)
    assert caught.value.flag == "--context-slices"


def test_config_keeps_the_slice_spacing_of_a_25d_model():
    check_values({"context_slices": 1, "spatial_dims": 2, "spacing": [3.0, 3.0, 3.0]})
    check_values({"context_slices": 1})  # the plan may still choose the rest
    base = dict(spatial_dims=2, patch_size=[32, 32], input_mode="spacing")
    assert resolve(TrainConfig(**base, spacing=[3.0, 3.0, 2.0],
                               context_slices=1)).spacing == [3.0, 3.0, 2.0]
    assert resolve(TrainConfig(**base, spacing=[3.0], context_slices=1)).spacing == [3.0] * 3
    # Without context the slices keep their thickness, as before.
    assert resolve(TrainConfig(**base, spacing=[3.0, 3.0, 2.0])).spacing == [3.0, 3.0, None]
    with pytest.raises(ConfigError, match="--context-slices"):
        resolve(TrainConfig(**base, spacing=[3.0, 3.0], context_slices=1))
    with pytest.raises(ConfigError, match="--context-slices"):
        resolve(TrainConfig(**{**base, "input_mode": "resize"}, context_slices=1))


# ----------------------------------------------------------------------------------------------
# The slice dataset
# ----------------------------------------------------------------------------------------------


def _volume(image: np.ndarray, label: np.ndarray, context=(0, 0)) -> Volume:
    return Volume("v", image, label, (1.0, 1.0, 1.0), np.eye(4), None,  # type: ignore[arg-type]
                  cropped=any(context), context=context)


def _still(volumes, **kw) -> SliceDataset2D:
    """A dataset whose sample is the stack itself: the patch is the whole slice (the crop draws
    offset 0), no flips, rotation, zoom or intensity jitter."""
    return SliceDataset2D(volumes, size=None, patch_size=(6, 5), flip=False, rotation=0.0,
                          scale=None, intensity=None, **kw)


def test_dataset_stacks_the_neighbours_by_hand():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 6, 5, 7)).astype(np.float32)  # two image channels, 7 slices
    label = rng.integers(0, 3, size=(6, 5, 7)).astype(np.int16)
    ds = _still([_volume(image, label)], context_slices=2)
    assert len(ds) == 7
    for z in range(7):
        picks = [min(max(z + d, 0), 6) for d in (-2, -1, 0, 1, 2)]
        # Slice-major: both channels of slice z-2, then both of z-1, ...
        by_hand = np.stack([image[c, :, :, p] for p in picks for c in range(2)])
        got, got_label = ds.slice(z)
        np.testing.assert_array_equal(got, by_hand)
        np.testing.assert_array_equal(got_label, label[:, :, z])
        sampled, sampled_label = ds.sample(np.random.default_rng(z))
        index = int(np.flatnonzero([np.array_equal(sampled_label, label[:, :, s])
                                    for s in range(7)])[0])
        picks = [min(max(index + d, 0), 6) for d in (-2, -1, 0, 1, 2)]
        np.testing.assert_array_equal(
            sampled, np.stack([image[c, :, :, p] for p in picks for c in range(2)]))
    # The ends repeat the edge slice.
    first, _ = ds.slice(0)
    np.testing.assert_array_equal(first[0:2], image[:, :, :, 0])
    np.testing.assert_array_equal(first[2:4], image[:, :, :, 0])
    last, _ = ds.slice(6)
    np.testing.assert_array_equal(last[6:8], image[:, :, :, 6])
    np.testing.assert_array_equal(last[8:10], image[:, :, :, 6])


def test_every_slice_of_a_stack_gets_the_same_geometric_augmentation():
    # A volume constant along z: whatever the draw, the three slices of a stack must come out
    # equal if they were transformed alike.
    rng = np.random.default_rng(1)
    plane = ndimage.gaussian_filter(rng.normal(size=(24, 20)), 2).astype(np.float32)
    image = np.repeat(plane[None, :, :, None], 5, axis=3)
    label = np.repeat((plane > 0).astype(np.int16)[:, :, None], 5, axis=2)
    ds = SliceDataset2D([_volume(image, label)], size=None, patch_size=(16, 16), flip=True,
                        rotate90=True, rotation=30.0, scale=(0.8, 1.2),
                        fov_cut={"p": 0.5, "max": 0.3},
                        elastic={"p": 0.5, "alpha": [0, 50], "sigma": [3, 4]}, context_slices=1)
    for seed in range(6):
        x, y = ds.sample(np.random.default_rng(seed))
        assert x.shape == (3, 16, 16) and y.shape == (16, 16)
        np.testing.assert_array_equal(x[0], x[1])
        np.testing.assert_array_equal(x[2], x[1])


def test_cropped_slab_keeps_its_neighbours_and_draws_only_its_own_slices(tmp_path):
    # Slice z of the file holds the value z everywhere.
    data = np.broadcast_to(np.arange(10, dtype=np.float32), (8, 6, 10)).copy()
    path = tmp_path / "a_image.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    nib.save(nib.Nifti1Image(np.ones((8, 6, 10), np.int16), np.eye(4)),
             tmp_path / "a_label.nii.gz")

    def load(slices, margin):
        case = Case("a", (path,), tmp_path / "a_label.nii.gz", slices=slices)
        return load_volume(case, None, margin=margin)

    inner = load((3, 5), 1)
    assert inner.context == (1, 1) and inner.image.shape[3] == 4
    assert inner.to_dict()["slices"] == (1, 3)  # what evaluation scores
    ds = _still([inner], context_slices=1)
    stacks = sorted(tuple(float(ds.slice(i)[0][j, 0, 0]) for j in range(3))
                    for i in range(len(ds)))
    assert stacks == [(2.0, 3.0, 4.0), (3.0, 4.0, 5.0)]
    edge = load((0, 2), 1)  # at the volume's start: no slice before it, the edge repeats
    assert edge.context == (0, 1)
    ds = _still([edge], context_slices=1)
    stacks = sorted(tuple(float(ds.slice(i)[0][j, 0, 0]) for j in range(3))
                    for i in range(len(ds)))
    assert stacks == [(0.0, 0.0, 1.0), (0.0, 1.0, 2.0)]
    assert load((3, 5), 0).context == (0, 0)


# ----------------------------------------------------------------------------------------------
# The engine against the graph run by hand
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from sfpc.model.export import export_model

    net = train_tiny_net(2, 3, PATCH, in_channels=2 * K + 1, channels=(8, 16, 32, 64, 128),
                         steps=3, seed=5)
    folder = tmp_path_factory.mktemp("ctx_export")
    export_model(net, _meta(normalisation={"kind": "zscore", "foreground": "all"},
                            inference={"overlap": 0.5, "mode": "gaussian",
                                       "sigma_scale": 0.125, "sw_batch_size": 4}), folder)
    backend = OnnxRuntimeBackend(folder, providers=["CPUExecutionProvider"], intra_op_threads=1,
                                 inter_op_threads=1)
    yield folder, ModelMetadata.load(folder), backend
    backend.close()


# 48 x 48 x 10 voxels of 1 x 1 x 2 mm: the model grid (1.5 x 1.5 x 3 mm) is 32 x 32 x 7, one
# window a slice, and its slices are resampled (10 -> 7).
SHAPE, AFFINE = (48, 48, 10), np.diag([1.0, 1.0, 2.0, 1.0])


def _image(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.normal(size=shape), 3) * 300).astype(np.float32)


def _session(folder: Path, name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])


def _stacks(model_image: np.ndarray) -> np.ndarray:
    """(Z, 2k + 1, X, Y): slice z with its neighbours, the edge slice repeated."""
    vol = model_image[0]
    n = vol.shape[2]
    return np.stack([np.stack([vol[:, :, min(max(z + d, 0), n - 1)] for d in range(-K, K + 1)])
                     for z in range(n)]).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_engine_feeds_the_neighbours_as_the_graph_expects(exported):
    folder, meta, backend = exported
    engine = Engine(backend, meta)
    model_image, geometry = engine.preprocess(_image(), AFFINE)
    assert model_image.shape == (1, 32, 32, 7)  # the slice axis resampled to 3 mm
    stacks = _stacks(model_image)
    seg = _session(folder, "seg.onnx")
    by_hand = _softmax(seg.run(None, {"image": stacks})[0])  # (Z, K, X, Y)
    expected = np.moveaxis(by_hand, 0, -1)
    np.testing.assert_allclose(engine.infer_model_grid(model_image)["probs"], expected,
                               atol=1e-5)
    # One slice per slab: each slab reads its neighbours beyond its ends.
    sliced = Engine(backend, meta, slab_bytes=1, sw_batch_size=2)
    np.testing.assert_allclose(sliced.infer_model_grid(model_image)["probs"], expected,
                               atol=1e-5)
    # Flip TTA: the stack mirrored along the slice's first axis, the output mirrored back.
    mirrored = _softmax(seg.run(None, {"image": np.ascontiguousarray(stacks[:, :, ::-1])})[0])
    flipped = np.moveaxis(0.5 * (by_hand + mirrored[:, :, ::-1]), 0, -1)
    np.testing.assert_allclose(engine.infer_model_grid(model_image, flip=True)["probs"],
                               flipped, atol=1e-5)
    # Uncertainty mode: the uncertainty graph on the same stacks.
    unc = _session(folder, "seg_uncertainty.onnx")
    probs, entropy = unc.run(None, {"image": stacks,
                                    "temperature": np.ones((len(stacks), 1), np.float32)})
    got = engine.infer_model_grid(model_image, uncertainty=True)
    np.testing.assert_allclose(got["mean_probs"], np.moveaxis(probs, 0, -1), atol=1e-5)
    np.testing.assert_allclose(got["mean_entropy"], np.moveaxis(entropy, 0, -1), atol=1e-5)


def test_engine_checks_image_channels_not_network_channels(exported):
    _, meta, backend = exported
    engine = Engine(backend, meta)
    engine.preprocess(_image()[None], AFFINE)  # one image channel, as the model was trained on
    with pytest.raises(InputError, match="model expects 1;"):
        engine.preprocess(np.stack([_image()] * 3), AFFINE)


@pytest.mark.parametrize("slab_bytes", [1 << 30, 1])
@pytest.mark.parametrize("slices, thickness, model_slices", [(10, 2.0, 7), (5, 4.5, 8)])
def test_segment_restores_the_resampled_slices(exported, slab_bytes, slices, thickness,
                                               model_slices):
    # The mask is the argmax of the model-grid probabilities resampled linearly to the input
    # grid (scipy's zoom, voxel edges aligned), whether the slabs come whole or one by one, and
    # whether the input's slices are finer or coarser than the model's 3 mm.
    _, meta, backend = exported
    engine = Engine(backend, meta, slab_bytes=slab_bytes)
    shape, affine = (48, 48, slices), np.diag([1.0, 1.0, thickness, 1.0])
    image = _image(1, shape)
    model_image, _ = engine.preprocess(image, affine)
    probs = engine.infer_model_grid(model_image)["probs"]
    expected = np.argmax(resample_to_shape(probs, shape, 1), axis=0)
    result = engine.segment(image, affine)
    assert result.mask.shape == shape
    assert result.geometry["model_shape"] == [32, 32, model_slices]
    assert np.mean(result.mask != expected) < 1e-3
    # The entropy map: H(mean probabilities) / ln K on the model grid, restored the same way.
    mean = engine.infer_model_grid(model_image, uncertainty=True)["mean_probs"]
    entropy = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(axis=0) / np.log(3)
    maps = engine.segment(image, affine, uncertainty=True)
    assert maps.entropy is not None and maps.entropy.shape == shape
    np.testing.assert_allclose(maps.entropy, resample_to_shape(entropy, shape, 1), atol=1e-4)
    assert engine.segment(image, affine, uncertainty=True, flip=True).mask.shape == shape


# ----------------------------------------------------------------------------------------------
# Train, export, serve
# ----------------------------------------------------------------------------------------------


def test_train_export_and_segment_end_to_end(tmp_path):
    from sfpc.model.export import export_checkpoint
    from sfpc.training import synth
    from sfpc.training.trainer import train

    data = tmp_path / "acdc"
    synth.generate("acdc", data, n_cases=6, seed=0)
    cfg = TrainConfig(data=str(data), spatial_dims=2, patch_size=[32, 32], input_mode="spacing",
                      spacing=[6.0, 6.0, 4.0], context_slices=1,
                      normalisation={"kind": "minmax"}, labelled_count=2, val_count=2,
                      iterations=2, val_every=2, channels=[8, 16, 32, 64, 128],
                      batch_labelled=2, batch_unlabelled=2, out=str(tmp_path / "run"),
                      progress=False, seed=0, threads=1)
    result = train(cfg)
    assert result["validated"] and result["history"]
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ck["metadata"]["context_slices"] == 1
    assert ck["metadata"]["in_channels"] == 3 == ck["net_config"]["in_channels"]
    assert ck["metadata"]["spacing"] == [6.0, 6.0, 4.0]
    export = tmp_path / "export"
    export_checkpoint(tmp_path / "run" / "last.pt", export)
    meta = ModelMetadata.load(export)
    assert (meta.context_slices, meta.in_channels, meta.image_channels) == (1, 3, 1)
    img = nib.load(str(data / "acdc_000_image.nii.gz"))
    image = np.asarray(img.dataobj)
    backend = OnnxRuntimeBackend(export, providers=["CPUExecutionProvider"], intra_op_threads=1,
                                 inter_op_threads=1)
    try:
        result = Engine(backend, meta).segment(image, img.affine, uncertainty=True)
    finally:
        backend.close()
    assert result.mask.shape == image.shape and result.mask.dtype == np.uint8
    assert int(result.mask.max()) < 4
