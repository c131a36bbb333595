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
from sfpc.training.data import Case, SliceDataset2D, Volume, load_eval_cases, load_volume
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
def ctx_net():
    # Trained on labels drawn from its first channel (train_tiny_net): slice z - k decides, so a
    # caller stacking the wrong neighbours changes its output.
    return train_tiny_net(2, 3, PATCH, in_channels=2 * K + 1, channels=(8, 16, 32, 64, 128),
                          steps=3, seed=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ctx_net):
    from sfpc.model.export import export_model

    folder = tmp_path_factory.mktemp("ctx_export")
    export_model(ctx_net, _meta(normalisation={"kind": "zscore", "foreground": "all"},
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


# The acdc synth's 8 slices of 8 mm on a 4 mm model grid: 16 model slices.
TRAIN_FIELDS = dict(spatial_dims=2, patch_size=[32, 32], input_mode="spacing",
                    spacing=[6.0, 6.0, 4.0], normalisation={"kind": "minmax"}, labelled_count=2,
                    val_count=2, iterations=2, val_every=2, channels=[8, 16, 32, 64, 128],
                    batch_labelled=2, batch_unlabelled=2, progress=False, seed=0, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2.5D run of `sfpc train` (k = 1) on synthetic cases: (data folder, run folder, the
    trainer's result)."""
    from sfpc.training import synth
    from sfpc.training.trainer import train

    root = tmp_path_factory.mktemp("ctx_train")
    data = root / "acdc"
    synth.generate("acdc", data, n_cases=6, seed=0)
    cfg = TrainConfig(data=str(data), context_slices=1, out=str(root / "run"), **TRAIN_FIELDS)
    return data, root / "run", train(cfg)


def test_train_export_and_segment_end_to_end(tmp_path, trained):
    from sfpc.model.export import export_checkpoint

    data, run, result = trained
    assert result["validated"] and result["history"]
    ck = torch.load(run / "last.pt", weights_only=False)
    assert ck["metadata"]["context_slices"] == 1
    assert ck["metadata"]["in_channels"] == 3 == ck["net_config"]["in_channels"]
    assert ck["metadata"]["spacing"] == [6.0, 6.0, 4.0]
    export = tmp_path / "export"
    export_checkpoint(run / "last.pt", export)
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


# ----------------------------------------------------------------------------------------------
# Callers that load cases or run windows their own way
# ----------------------------------------------------------------------------------------------


def test_evaluate_cli_gives_a_slab_its_real_neighbours(tmp_path, trained, monkeypatch):
    # `sfpc evaluate` on slabs of whole cases: what the network gets is the slab's rows of the
    # whole resampled volume with one real neighbour beyond each end, and it scores what
    # evaluating the whole volume on those rows scores.
    from sfpc.training import evaluate, evaluate_cli
    from sfpc.training.layouts import discover_cases

    data, run, _ = trained
    dataset = tmp_path / "slabs.json"
    dataset.write_text(json.dumps([
        {"id": f"slab{i}", "image": str(data / f"acdc_00{i}_image.nii.gz"),
         "label": str(data / f"acdc_00{i}_label.nii.gz"), "slices": [3, 5]} for i in (0, 1)]))
    seen = []
    real = evaluate.evaluate_cases

    def spy(net, cases, **kw):
        seen.append((net, list(cases), kw, real(net, cases, **kw)))
        return seen[-1][3]

    monkeypatch.setattr(evaluate, "evaluate_cases", spy)
    assert evaluate_cli.main(["--checkpoint", str(run / "last.pt"), "--data", str(dataset),
                              "--layout", "json", "--out", str(tmp_path / "eval")]) == 0
    [(net, cases, kw, result)] = seen
    cfg = TrainConfig(**torch.load(run / "last.pt", weights_only=False)["config"])
    whole = [v.to_dict() for v in load_eval_cases(
        discover_cases(dataset, "json"), cfg.normalisation, cfg.spacing, None,
        crop_to_slices=False, resampling=cfg.resampling)]
    for case, volume in zip(cases, whole, strict=True):
        start, stop = volume["slices"]  # native slices 3:5 of 8 are model rows 6:10 of 16
        assert (start, stop) == (6, 10)
        assert case["slices"] == (1, 1 + stop - start)
        np.testing.assert_array_equal(case["image"], volume["image"][..., start - 1:stop + 1])
    kw.pop("out_dir")
    on_whole = real(net, whole, **kw)
    for mine, theirs in zip(result["cases"], on_whole["cases"], strict=True):
        assert set(mine) == set(theirs) and len(mine) > 2
        for name in set(mine) - {"case"}:  # per class and mean: {metric: value}
            assert mine[name] == pytest.approx(theirs[name], abs=1e-6), name


def test_segment_with_predictor_stacks_the_neighbours(exported):
    from sfpc.inference.direct import segment_with_predictor
    from sfpc.inference.preprocess import restore

    folder, meta, backend = exported
    image = _image(2)
    mask, maps = segment_with_predictor(lambda windows: backend.infer(windows), meta, image,
                                        AFFINE)
    model_image, geometry = Engine(backend, meta).preprocess(image, AFFINE)
    logits = _session(folder, "seg.onnx").run(None, {"image": _stacks(model_image)})[0]
    np.testing.assert_allclose(maps["logits"], np.moveaxis(logits, 0, -1), atol=1e-4)
    labels = np.moveaxis(np.argmax(logits, axis=1), 0, -1).astype(np.uint8)
    assert mask.shape == SHAPE
    assert np.mean(mask != restore(labels, geometry, order=0)) < 1e-3


def test_compare_methods_stacks_the_neighbours_its_metadata_gives(exported, ctx_net):
    from sfpc.training.uncertainty_compare import compare_methods

    _, meta, _ = exported
    image = _image(3, (32, 32, 7))[None] / 300  # on the model grid: one window a slice
    with torch.no_grad():
        by_hand = ctx_net(torch.from_numpy(_stacks(image))).argmax(1).numpy()
        # The oracle tells stacks apart: the centre slice alone, repeated, predicts otherwise.
        centre = np.repeat(np.moveaxis(image[0], -1, 0)[:, None], 2 * K + 1, axis=1)
        assert (ctx_net(torch.from_numpy(centre)).argmax(1).numpy() != by_hand).any()
    label = np.moveaxis(by_hand, 0, -1)
    volume = {"id": "v", "image": image.astype(np.float32), "label": label,
              "spacing": (1.5, 1.5, 3.0), "slices": None}
    res = compare_methods(ctx_net, [volume], class_names=meta.class_names, metadata=meta,
                          methods=["softmax", "flpm"], m=2, warmup=False)
    assert res["settings"]["context_slices"] == K
    for method in ("softmax", "flpm"):
        dice = res["methods"][method]["cases"][0]["dice"]
        assert dice["mean"] == pytest.approx(1.0, abs=1e-3), (method, dice)
    with pytest.raises(ValueError, match="pass metadata="):
        compare_methods(ctx_net, [volume], class_names=meta.class_names, patch_size=PATCH,
                        methods=["softmax"], warmup=False)


def test_fine_tuning_from_a_25d_export_builds_its_network(tmp_path, trained):
    from sfpc.model.export import export_checkpoint
    from sfpc.training.plan import plan_from_init
    from sfpc.training.trainer import Trainer

    data, run, _ = trained
    export = tmp_path / "export"
    export_checkpoint(run / "last.pt", export)
    fields, _ = plan_from_init(str(export))
    assert fields["context_slices"] == 1 and fields["spacing"] == [6.0, 6.0, 4.0]
    base = {k: v for k, v in TRAIN_FIELDS.items() if k not in fields}
    cfg = resolve(TrainConfig(data=str(data), out=str(tmp_path / "tune"), init=str(export),
                              **base, **fields))
    trainer = Trainer(cfg)
    assert trainer.net.cfg.in_channels == 3
    assert "checked against ONNX Runtime" in trainer.init_notes[0]
    assert trainer.meta.context_slices == 1 and trainer.meta.spacing == [6.0, 6.0, 4.0]


def test_init_refuses_the_weights_of_another_stack(trained, exported):
    from sfpc.model.networks import NetConfig, SFPCNet
    from sfpc.training.init_model import load_initial_weights

    _, run, _ = trained
    ck = torch.load(run / "last.pt", weights_only=False)
    net = SFPCNet(NetConfig.from_dict({**ck["net_config"], "in_channels": 1}))
    with pytest.raises(ValueError, match="--context-slices 1"):
        load_initial_weights(net, run / "last.pt", [], context_slices=0)
    folder, _, _ = exported
    with pytest.raises(ValueError, match="--context-slices 1"):
        load_initial_weights(net, folder, [torch.zeros(2, 1, *PATCH)], context_slices=0)


def test_a_multi_volume_upload_is_refused_at_decoding(exported, tmp_path, monkeypatch):
    # The network takes three channels, the image one: three volumes are refused by the
    # decoder, as for any one-channel model, with its 4xx JSON.
    import gzip
    import os

    from fastapi.testclient import TestClient

    from sfpc.server.app import create_app
    from sfpc.server.settings import Settings

    for key in list(os.environ):
        if key.startswith("SFPC_"):
            monkeypatch.delenv(key)
    folder, _, _ = exported
    volumes = np.stack([_image(i) for i in range(2 * K + 1)], axis=-1)
    upload = gzip.compress(nib.Nifti1Image(volumes, AFFINE).to_bytes())
    settings = Settings(model_dirs=[folder], data_dir=tmp_path / "jobs",
                        onnx_providers="CPUExecutionProvider", onnx_intra_op_threads=1)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/segment", files={"file": ("v.nii.gz", upload)})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "too_many_volumes"
    assert "with 3 volumes" in error["message"] and "takes one channel" in error["message"]


def test_model_card_says_how_a_25d_model_treats_slices(exported):
    import dataclasses

    from sfpc.training.default_model import model_card

    _, meta, _ = exported
    names = [*meta.class_names[1:], "mean"]
    validation = {"case": "ct_a", "metrics": {n: {"dice": 0.9, "hd95": 3.0, "asd": 1.0,
                                                 "boundary_dice": 0.8} for n in names}}
    card = model_card(meta, validation, "make default-model")
    assert "slices keep their own spacing" not in card
    assert "resamples to 1.5 x 1.5 x 3.0 mm" in card
    assert "the 1 neighbouring slice on either side" in card and "lie 3.0 mm apart" in card
    assert "each seen with its 1 neighbouring slice on either side" in card
    plain = model_card(dataclasses.replace(meta, context_slices=0, in_channels=1,
                                           spacing=[1.5, 1.5, None]),
                       validation, "make default-model")
    assert "resamples in-plane to 1.5 x 1.5 mm" in plain
    assert "slices keep their own spacing" in plain and "neighbouring" not in plain


# ----------------------------------------------------------------------------------------------
# The organ task's split
# ----------------------------------------------------------------------------------------------

ORGAN_VAL = (10, 14)


def _organ_ct(folder: Path, n: int = 30) -> Path:
    """A ct_a of n 3 mm slices whose images are 1000 in the validation block and 0 elsewhere,
    liver labelled on every slice: any training input that reads the block holds a 1000."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.zeros((8, 8, n), np.float32)
    image[..., ORGAN_VAL[0]:ORGAN_VAL[1]] = 1000.0
    label = np.zeros((8, 8, n), np.int16)
    label[2:6, 2:6, :] = 5
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), folder / "ct_a_image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "ct_a_label.nii.gz")
    return folder


def _training_inputs_read_the_block(dataset: Path, k: int, slice_mm: float) -> bool:
    from sfpc.training.layouts import discover_cases

    cases = [c for c in discover_cases(dataset, "json") if c.role != "val"]
    assert cases
    return any(load_volume(c, None, [3.0, 3.0, slice_mm], None, with_label=False,
                           resampling="area", margin=k).image.max() > 0 for c in cases)


@pytest.mark.parametrize("k, slice_mm", [(1, 3.0), (2, 3.0), (3, 3.0), (5, 3.0), (1, 6.0),
                                         (2, 1.5)])
def test_organ_split_keeps_the_block_out_of_training_neighbours(tmp_path, k, slice_mm):
    from sfpc.training.organ_task import GAP, make_organ_dataset

    data = _organ_ct(tmp_path / "organs")
    common = dict(labelled_fraction=0.5, val_block=ORGAN_VAL, use_ct_b=False)
    plain = make_organ_dataset(data, tmp_path / "plain.json", **common)
    split = make_organ_dataset(data, tmp_path / "ctx.json", **common, context_slices=k,
                               slice_spacing=slice_mm)
    assert not _training_inputs_read_the_block(tmp_path / "ctx.json", k, slice_mm)
    if slice_mm == 3.0:  # ct_a's own slices: the gap is max(GAP, k)
        assert split["gap"] == max(GAP, k)
    if split["gap"] == GAP:  # the split of a plain 2D model, slice for slice
        assert {**split, "json": None} == {**plain, "json": None}
    else:  # and that split would have let the block in
        assert _training_inputs_read_the_block(tmp_path / "plain.json", k, slice_mm)


def test_default_model_build_splits_for_its_config_context(tmp_path, monkeypatch):
    from sfpc.training import default_model, organ_task

    class Stop(Exception):
        pass

    seen: dict = {}

    def split(data_dir, out_json, **kw):
        seen.clear()
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(organ_task, "make_organ_dataset", split)
    config = tmp_path / "ctx.yaml"
    config.write_text("context_slices: 2\nspacing: [3.0, 3.0, 6.0]\nsplit: {seed: 4}\n")
    with pytest.raises(Stop):
        default_model.build(tmp_path, config, work=tmp_path / "work")
    assert seen == {"seed": 4, "context_slices": 2, "slice_spacing": 6.0, "resampling": "area"}
    # The shipped config: a plain 2D model, split with the organ task's own gap.
    with pytest.raises(Stop):
        default_model.build(tmp_path, work=tmp_path / "work")
    assert seen["context_slices"] == 0 and "gap" not in seen and "slice_spacing" not in seen
