"""The model's calibration temperature applies in every mode of the engine.

Oracle: the PyTorch network the graphs were exported from, its M perturbed logit maps divided by
T and put through a float64 softmax by hand (uncertainty mode), its clean logits likewise (plain
mode), on a volume of one window, where the Gaussian blend returns the window's prediction.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sfpc.inference.backends import BackendError, OnnxRuntimeBackend
from sfpc.inference.contract import ModelMetadata
from sfpc.inference.engine import Engine
from tests.support.models import export_fixture_model, pre_temperature_export

torch = pytest.importorskip("torch")

PATCH = (8, 8, 8)
ATOL = 1e-4  # ONNX Runtime vs PyTorch float32 kernels


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    export_dir, net = export_fixture_model(tmp_path_factory.mktemp("export"), patch_size=PATCH)
    old_dir = pre_temperature_export(export_dir, net, tmp_path_factory.mktemp("old"))
    backends = {
        "current": OnnxRuntimeBackend(export_dir, intra_op_threads=1, inter_op_threads=1),
        "old": OnnxRuntimeBackend(old_dir, intra_op_threads=1, inter_op_threads=1),
    }
    metadata = {"current": ModelMetadata.load(export_dir), "old": ModelMetadata.load(old_dir)}
    yield net, backends, metadata
    for backend in backends.values():
        backend.close()


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _by_hand(net, model_image: np.ndarray, m: int, temperature: float) -> dict[str, np.ndarray]:
    """Plain probabilities and the uncertainty graph's two moments of one window at T."""
    x = torch.from_numpy(np.ascontiguousarray(model_image, dtype=np.float32))[None]
    with torch.no_grad():
        clean = net(x)[0].double().numpy()  # (K, *sp)
        perturbed = net.perturbed_logits(net.seg_features(x), m)[:, 0].double().numpy()
    samples = _softmax(perturbed / temperature, axis=1)  # (M, K, *sp)
    entropy = -(samples * np.log(np.clip(samples, 1e-300, None))).sum(axis=1, keepdims=True)
    return {"probs": _softmax(clean / temperature, axis=0),
            "mean_probs": samples.mean(axis=0), "mean_entropy": entropy.mean(axis=0)}


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, size=PATCH).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_every_mode_applies_the_temperature(exported, temperature):
    net, backends, metadata = exported
    meta = dataclasses.replace(metadata["current"], temperature=temperature)
    engine = Engine(backends["current"], meta)
    model_image, _ = engine.preprocess(_volume(1), np.eye(4))
    expected = _by_hand(net, model_image, meta.perturbation["M"], temperature)
    plain = engine.infer_model_grid(model_image)
    np.testing.assert_allclose(plain["probs"], expected["probs"], atol=ATOL)
    maps = engine.infer_model_grid(model_image, uncertainty=True)
    for key in ("mean_probs", "mean_entropy"):
        np.testing.assert_allclose(maps[key], expected[key], atol=ATOL)
    if temperature != 1.0:  # the oracle really depends on T
        at_one = _by_hand(net, model_image, meta.perturbation["M"], 1.0)
        assert np.abs(at_one["mean_probs"] - expected["mean_probs"]).max() > 1e-3


def test_report_names_the_temperature_in_both_modes(exported):
    _, backends, metadata = exported
    engine = Engine(backends["current"], dataclasses.replace(metadata["current"],
                                                             temperature=1.7))
    for uncertainty in (False, True):
        result = engine.segment(_volume(2), np.eye(4), uncertainty=uncertainty)
        assert result.model["temperature"] == 1.7


def test_export_without_temperature_input(exported):
    """An uncertainty graph from before the temperature input serves T = 1 and refuses others."""
    _, backends, metadata = exported
    image = _volume(3)
    old = Engine(backends["old"], metadata["old"])
    current = Engine(backends["current"], metadata["current"])
    model_image, _ = old.preprocess(image, np.eye(4))
    got = old.infer_model_grid(model_image, uncertainty=True)
    want = current.infer_model_grid(model_image, uncertainty=True)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, atol=1e-6)
    calibrated = Engine(backends["old"], dataclasses.replace(metadata["old"], temperature=1.7))
    assert calibrated.segment(image, np.eye(4)).mask.shape == PATCH  # plain mode is unaffected
    with pytest.raises(BackendError, match="no 'temperature' input.*re-export"):
        calibrated.segment(image, np.eye(4), uncertainty=True)
