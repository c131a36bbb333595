"""ONNX Runtime backend, shared backend contract and Triton client errors (no server needed).

Oracles: the exported graphs are compared with the PyTorch network they came from, and the
uncertainty outputs with the mean softmax and the natural-log entropy computed here by hand from
the network's M perturbed logit maps divided by the temperature.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sfpc.inference.backends import (
    Backend,
    BackendError,
    BackendUnavailable,
    OnnxRuntimeBackend,
    make_backend,
)
from sfpc.inference.backends.onnxruntime_backend import resolve_providers
from tests.support.models import export_fixture_model, pre_temperature_export
from tests.support.triton import free_port

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def export_3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    return export_fixture_model(tmp_path_factory.mktemp("export3d"))


@pytest.fixture(scope="module")
def export_2d_fixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    return export_fixture_model(
        tmp_path_factory.mktemp("export2d"),
        spatial_dims=2,
        in_channels=2,
        num_classes=4,
        patch_size=(16, 16),
        dynamic_spatial=False,
    )


@pytest.fixture(scope="module")
def backend_3d(export_3d: tuple[Path, object]) -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend(export_3d[0], intra_op_threads=1, inter_op_threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def export_3d_old(export_3d, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pre_temperature_export(*export_3d, tmp_path_factory.mktemp("export3d_old"))


def _sample_probs(net, batch: np.ndarray, m: int, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits_m / T) of the network's M perturbed predictions: (M, B, K, *sp)."""
    with torch.no_grad():
        logits = net.perturbed_logits(net.seg_features(torch.from_numpy(batch)), m).double()
    z = logits.numpy() / temperature
    e = np.exp(z - z.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def _hand_uncertainty(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over samples of p and of H(p) = -sum_k p_k ln p_k, for probs (M, B, K, *sp)."""
    entropy = -np.sum(probs * np.log(np.clip(probs, 1e-12, None)), axis=2, keepdims=True)
    return probs.mean(axis=0), entropy.mean(axis=0)


def test_plain_inference_matches_torch(backend_3d, export_3d) -> None:
    _, net = export_3d
    batch = np.random.default_rng(0).normal(size=(3, 1, 8, 12, 6)).astype(np.float32)
    logits = backend_3d.infer(batch)["logits"]
    with torch.no_grad():
        expected = net(torch.from_numpy(batch)).numpy()
    assert logits.dtype == np.float32 and logits.shape == (3, 3, 8, 12, 6)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.8])
def test_uncertainty_matches_hand_computation(backend_3d, export_3d, temperature) -> None:
    _, net = export_3d
    meta = backend_3d.metadata
    batch = np.random.default_rng(1).normal(size=(2, 1, 6, 8, 10)).astype(np.float32)
    out = backend_3d.infer(batch, uncertainty=True, temperature=temperature)
    samples = _sample_probs(net, batch, meta.perturbation["M"], temperature)
    mean_probs, mean_entropy = _hand_uncertainty(samples)
    assert set(out) == {"mean_probs", "mean_entropy"}
    np.testing.assert_allclose(out["mean_probs"], mean_probs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["mean_entropy"], mean_entropy, rtol=1e-4, atol=1e-5)
    # The perturbation must be real: samples differ, so mutual information is positive somewhere.
    assert np.ptp(samples, axis=0).max() > 1e-4
    np.testing.assert_allclose(out["mean_probs"].sum(axis=1), 1.0, atol=1e-5)
    predictive = -np.sum(out["mean_probs"] * np.log(out["mean_probs"]), axis=1, keepdims=True)
    # Jensen: the entropy of the mean is at least the mean entropy (mutual information >= 0).
    assert np.all(predictive - out["mean_entropy"] >= -1e-5)
    assert np.all(out["mean_entropy"] <= np.log(3) + 1e-6)


def test_batch_results_do_not_depend_on_batch_composition(backend_3d) -> None:
    batch = np.random.default_rng(2).normal(size=(4, 1, 8, 8, 8)).astype(np.float32)
    together = backend_3d.infer(batch, uncertainty=True, temperature=1.4)
    for i in range(4):
        alone = backend_3d.infer(batch[i : i + 1], uncertainty=True, temperature=1.4)
        for name, value in alone.items():
            np.testing.assert_allclose(together[name][i : i + 1], value, rtol=1e-5, atol=1e-6)


def test_float64_input_is_cast(backend_3d) -> None:
    batch = np.random.default_rng(3).normal(size=(1, 1, 8, 8, 8))
    out = backend_3d.infer(batch)["logits"]
    ref = backend_3d.infer(batch.astype(np.float32))["logits"]
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize(
    ("shape", "needle"),
    [
        ((1, 2, 8, 8, 8), "channels"),
        ((1, 8, 8, 8), "expects"),
        ((0, 1, 8, 8, 8), "empty"),
    ],
)
def test_bad_batches_are_explained(backend_3d, shape, needle) -> None:
    with pytest.raises(BackendError, match=needle):
        backend_3d.infer(np.zeros(shape, np.float32))


def test_fixed_patch_model_rejects_other_sizes(export_2d_fixed) -> None:
    backend = OnnxRuntimeBackend(export_2d_fixed[0])
    assert backend.infer(np.zeros((2, 2, 16, 16), np.float32))["logits"].shape == (2, 4, 16, 16)
    batch = np.random.default_rng(4).normal(size=(3, 2, 16, 16)).astype(np.float32)
    out = backend.infer(batch, uncertainty=True, temperature=2.0)
    expected, _ = _hand_uncertainty(_sample_probs(export_2d_fixed[1], batch, 4, 2.0))
    np.testing.assert_allclose(out["mean_probs"], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(BackendError, match="patch size"):
        backend.infer(np.zeros((1, 2, 16, 32), np.float32))


def test_describe_reports_threads_and_providers(backend_3d) -> None:
    info = backend_3d.describe()
    assert info["backend"] == "onnxruntime"
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["intra_op_threads"] == 1 and info["inter_op_threads"] == 1
    assert info["uncertainty"] is True and info["ready"] is True
    assert info["temperature_input"] is True
    json.dumps(info)
    # Off unless asked for: it held 330 MiB more at the engine's batches (issue 13).
    assert info["memory_pattern"] is False
    for session in backend_3d._sessions.values():
        assert session.get_session_options().enable_mem_pattern is False


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), "warm"])
def test_bad_temperature_is_refused(backend_3d, temperature) -> None:
    with pytest.raises(BackendError, match="temperature"):
        backend_3d.infer(np.zeros((1, 1, 8, 8, 8), np.float32), uncertainty=True,
                         temperature=temperature)


def test_export_without_temperature_input_serves_temperature_one(
    export_3d_old, backend_3d
) -> None:
    """Graphs exported before the temperature input still load; T = 1 is all they can serve."""
    old = OnnxRuntimeBackend(export_3d_old, intra_op_threads=1, inter_op_threads=1)
    assert old.takes_temperature is False and old.describe()["temperature_input"] is False
    batch = np.random.default_rng(6).normal(size=(2, 1, 8, 8, 8)).astype(np.float32)
    served = old.infer(batch, uncertainty=True)
    assert served.keys() == {"mean_probs", "mean_entropy"}
    expected = backend_3d.infer(batch, uncertainty=True, temperature=1.0)
    for name, value in expected.items():
        np.testing.assert_allclose(served[name], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(BackendError, match="no 'temperature' input.*not 1.5.*re-export"):
        old.infer(batch, uncertainty=True, temperature=1.5)
    # Plain mode returns logits, whose temperature the caller applies: nothing to refuse.
    assert old.infer(batch, temperature=1.5)["logits"].shape == (2, 3, 8, 8, 8)
    old.close()


def test_checksum_mismatch_is_refused(export_3d, tmp_path) -> None:
    source = export_3d[0]
    for item in source.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    graph = tmp_path / "seg_uncertainty.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(BackendError, match="checksum mismatch .*seg_uncertainty.onnx"):
        OnnxRuntimeBackend(tmp_path)


def test_shared_weights_file_is_verified(export_3d, tmp_path) -> None:
    """The graphs' shared weights file is checked like the graphs: one changed byte, or no
    file, and the backend refuses to start, naming the file."""
    source = export_3d[0]
    meta = json.loads((source / "sfpc_model.json").read_text())
    assert meta["weights"]["file"] == "weights.bin"
    for item in source.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    OnnxRuntimeBackend(tmp_path).close()  # the copy itself is fine
    weights = tmp_path / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(BackendError, match="checksum mismatch for .*weights.bin.*re-copy"):
        OnnxRuntimeBackend(tmp_path)
    weights.unlink()
    with pytest.raises(BackendError, match="weights file .*weights.bin .*missing"):
        OnnxRuntimeBackend(tmp_path)
    unrecorded = dict(meta, weights={"file": "weights.bin"})
    (tmp_path / "sfpc_model.json").write_text(json.dumps(unrecorded))
    weights.write_bytes((source / "weights.bin").read_bytes())
    with pytest.raises(BackendError, match="records no sha256 for weights.bin"):
        OnnxRuntimeBackend(tmp_path)


def test_inline_export_still_loads(export_3d, backend_3d, tmp_path) -> None:
    """Exports whose graphs carry their own weights (older ones, --inline-weights) load as
    before and compute the same outputs."""
    from sfpc.model.shared_weights import convert_export

    for item in export_3d[0].iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    convert_export(tmp_path, inline=True)
    meta = json.loads((tmp_path / "sfpc_model.json").read_text())
    assert meta["weights"] == {} and not (tmp_path / "weights.bin").exists()
    del meta["weights"]  # metadata written before the field existed
    (tmp_path / "sfpc_model.json").write_text(json.dumps(meta))
    inline = OnnxRuntimeBackend(tmp_path, intra_op_threads=1, inter_op_threads=1)
    batch = np.random.default_rng(9).normal(size=(2, 1, 8, 8, 8)).astype(np.float32)
    for uncertainty in (False, True):
        served = inline.infer(batch, uncertainty=uncertainty, temperature=1.2)
        for name, value in backend_3d.infer(batch, uncertainty=uncertainty,
                                            temperature=1.2).items():
            np.testing.assert_array_equal(served[name], value)
    inline.close()


def test_missing_metadata_names_the_exporter(tmp_path) -> None:
    with pytest.raises(BackendError, match="sfpc_model.json not found"):
        OnnxRuntimeBackend(tmp_path)


def test_missing_graph_file(export_3d, tmp_path) -> None:
    (tmp_path / "sfpc_model.json").write_bytes((export_3d[0] / "sfpc_model.json").read_bytes())
    with pytest.raises(BackendError, match="seg.onnx .*missing"):
        OnnxRuntimeBackend(tmp_path)


def test_closed_backend_is_unavailable(export_3d) -> None:
    backend = OnnxRuntimeBackend(export_3d[0])
    backend.close()
    assert backend.ready() is False
    with pytest.raises(BackendUnavailable, match="closed"):
        backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))


def test_auto_providers_prefer_tensorrt_then_cuda() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert resolve_providers("auto", available) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert resolve_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    explicit = [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert resolve_providers(explicit, available) == explicit


def test_unavailable_provider_is_an_error(export_3d) -> None:
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider is not available"):
        OnnxRuntimeBackend(export_3d[0], providers=["CUDAExecutionProvider"])


def test_factory_builds_protocol_conforming_backends(export_3d) -> None:
    backend = make_backend("onnxruntime", export_dir=export_3d[0])
    assert isinstance(backend, Backend)
    backend.close()
    with pytest.raises(BackendError, match="unknown backend kind"):
        make_backend("tensorflow")


def test_backends_import_without_torch_or_tritonclient() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import sfpc.inference.backends, sfpc.model.triton_repo\n"
        "assert 'tritonclient' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_backend_with_no_server_is_unavailable(protocol) -> None:
    pytest.importorskip("tritonclient.grpc")
    url = f"127.0.0.1:{free_port()}"
    backend = make_backend("triton", url=url, protocol=protocol, model_name="seg", timeout_s=5)
    assert isinstance(backend, Backend)
    assert backend.ready() is False
    assert backend.describe()["ready"] is False
    with pytest.raises(BackendUnavailable) as caught:
        backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))
    message = str(caught.value)
    assert url in message and "'seg'" in message and "tritonserver is running" in message
    backend.close()


def test_tensorrt_gets_an_engine_cache_and_fp16(tmp_path) -> None:
    from sfpc.inference.backends.onnxruntime_backend import gpu_provider_options

    chosen = resolve_providers("auto", ["CPUExecutionProvider", "CUDAExecutionProvider",
                                        "TensorrtExecutionProvider"])
    cache = tmp_path / "trt"
    configured = gpu_provider_options(chosen, trt_cache_dir=str(cache), trt_fp16=True)
    assert configured[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    name, options = configured[0]
    assert name == "TensorrtExecutionProvider" and cache.is_dir()
    # ONNX Runtime's documented option names (TensorRT execution provider).
    assert options == {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                       "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True}
    # Nothing changes on a CPU-only build or without options.
    assert gpu_provider_options(["CPUExecutionProvider"], trt_cache_dir=str(cache)) == [
        "CPUExecutionProvider"]
    assert gpu_provider_options(chosen) == chosen


def test_cpu_and_gpu_builds_side_by_side_are_refused() -> None:
    import importlib.metadata as md

    from sfpc.inference.backends.onnxruntime_backend import check_single_build

    def both(name: str) -> str:
        return {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}[name]

    def cpu_only(name: str) -> str:
        if name != "onnxruntime":
            raise md.PackageNotFoundError(name)
        return "1.32.0"

    with pytest.raises(BackendUnavailable, match="onnxruntime 1.32.0 and onnxruntime-gpu"):
        check_single_build(both)
    check_single_build(cpu_only)
    check_single_build()  # this environment: one build
