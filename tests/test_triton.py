"""Triton model repository, and a real tritonserver serving it to TritonBackend.

The generated config.pbtxt files are checked against the ONNX graphs read with the `onnx`
package (an oracle independent of the ONNX Runtime reader the writer uses). The server tests run
the tritonserver of the nvidia-pytriton wheel (scripts/setup_triton_env.sh) on a copy of the
repository switched to the Python backend, and require TritonBackend's outputs over gRPC and HTTP
to equal OnnxRuntimeBackend's on the same batches.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from sfpc.inference.backends import BackendError, BackendUnavailable, OnnxRuntimeBackend
from sfpc.inference.backends.triton_backend import TritonBackend
from sfpc.model.triton_python_backend import (
    PYTHON_MODEL_SOURCE,
    THREADS_PARAMETER,
    TritonInstall,
    TritonServer,
    TritonUnavailable,
    find_triton_install,
    python_backend_repository,
)
from sfpc.model.triton_repo import (
    METADATA_PARAMETER,
    model_config_text,
    read_graph_io,
    trtexec_command,
    write_triton_repository,
)
from tests.support.models import export_fixture_model, pre_temperature_export
from tests.support.triton import missing_triton_message, require_module, running_in_ci, triton_venv

onnx = require_module("onnx")
require_module("torch")
text_format = require_module("google.protobuf.text_format")
model_config_pb2 = require_module("tritonclient.grpc.model_config_pb2")

MAX_BATCH = 4
MODEL = "sfpc_fixture"
OLD_MODEL = "sfpc_old"  # exported before the uncertainty graph took a temperature input


# --- the repository writer ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_3d_and_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    return export_fixture_model(tmp_path_factory.mktemp("export3d"))


@pytest.fixture(scope="module")
def export_3d(export_3d_and_net) -> Path:
    return export_3d_and_net[0]


@pytest.fixture(scope="module")
def export_3d_old(export_3d_and_net, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pre_temperature_export(*export_3d_and_net, tmp_path_factory.mktemp("export3d_old"))


@pytest.fixture(scope="module")
def export_2d_fixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_fixture_model(
        tmp_path_factory.mktemp("export2d"),
        spatial_dims=2,
        in_channels=2,
        num_classes=4,
        patch_size=(16, 16),
        dynamic_spatial=False,
    )[0]


def _parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _external_locations(path: Path) -> set[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {entry.value for tensor in graph.initializer for entry in tensor.external_data
            if entry.key == "location"}


def _onnx_io(path: Path) -> dict[str, list[tuple[str, int, list[int]]]]:
    """(name, Triton data type enum, dims minus batch; -1 dynamic) for inputs and outputs."""
    graph = onnx.load(str(path)).graph
    to_triton = {onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32}

    def convert(values):
        result = []
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            assert dims[0] == -1, f"{value.name}: batch axis must be dynamic"
            result.append((value.name, to_triton[tensor.elem_type], dims[1:]))
        return result

    initializers = {init.name for init in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    return {"input": convert(inputs), "output": convert(graph.output)}


def _config_io(config) -> dict[str, list[tuple[str, int, list[int]]]]:
    return {
        "input": [(t.name, t.data_type, list(t.dims)) for t in config.input],
        "output": [(t.name, t.data_type, list(t.dims)) for t in config.output],
    }


@pytest.mark.parametrize("which", ["3d_dynamic", "2d_fixed"])
def test_configs_parse_and_match_the_onnx_graphs(which, export_3d, export_2d_fixed, tmp_path):
    export_dir = export_3d if which == "3d_dynamic" else export_2d_fixed
    written = write_triton_repository(
        export_dir,
        tmp_path,
        "seg",
        max_batch_size=6,
        instance_count=2,
        preferred_batch_sizes=[2, 4],
    )
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "seg/config.pbtxt",
        "seg/1/model.onnx",
        "seg/1/weights.bin",
        "seg/sfpc_model.json",
        "seg_uncertainty/config.pbtxt",
        "seg_uncertainty/1/model.onnx",
        "seg_uncertainty/1/weights.bin",
        "seg_uncertainty/sfpc_model.json",
    }
    metadata = json.loads((export_dir / "sfpc_model.json").read_text())
    assert metadata["weights"]["file"] == "weights.bin"
    for name, graph in (("seg", "seg.onnx"), ("seg_uncertainty", "seg_uncertainty.onnx")):
        config = _parse(tmp_path / name / "config.pbtxt")
        assert config.name == name
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 6
        assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
        assert config.dynamic_batching.max_queue_delay_microseconds == 1000
        assert [(g.count, g.kind) for g in config.instance_group] == [
            (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
        ]
        assert not config.HasField("optimization")
        model_file = tmp_path / name / "1" / "model.onnx"
        assert model_file.read_bytes() == (export_dir / graph).read_bytes()
        # The graph's external data resolves next to model.onnx, as Triton loads it.
        weights = model_file.with_name("weights.bin")
        assert weights.read_bytes() == (export_dir / "weights.bin").read_bytes()
        assert _external_locations(model_file) == {"weights.bin"}
        assert _config_io(config) == _onnx_io(model_file)
        embedded = json.loads(config.parameters[METADATA_PARAMETER].string_value)
        assert embedded == json.loads((tmp_path / name / "sfpc_model.json").read_text())
        assert embedded["graphs"] == metadata["graphs"]
    seg = _parse(tmp_path / "seg" / "config.pbtxt")
    spatial = [-1] * 3 if which == "3d_dynamic" else [16, 16]
    k, c = metadata["num_classes"], metadata["in_channels"]
    fp32 = model_config_pb2.TYPE_FP32
    assert _config_io(seg)["output"] == [("logits", fp32, [k, *spatial])]
    # The uncertainty model takes the temperature per image: dims [1] after the batch axis.
    uncertainty = _config_io(_parse(tmp_path / "seg_uncertainty" / "config.pbtxt"))
    assert uncertainty["input"] == [("image", fp32, [c, *spatial]), ("temperature", fp32, [1])]


def test_tensorrt_accelerator_block(export_2d_fixed, tmp_path) -> None:
    write_triton_repository(
        export_2d_fixed,
        tmp_path,
        "seg",
        max_batch_size=8,
        instance_kind="KIND_GPU",
        tensorrt_fp16=True,
        trt_engine_cache_dir="/cache/trt",
        preferred_batch_sizes=[4],
    )
    config = _parse(tmp_path / "seg" / "config.pbtxt")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {
        "precision_mode": "FP16",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": "/cache/trt",
        # Fixed 2-channel 16x16 patches; batch 1..max with the largest preferred size as optimum.
        "trt_profile_min_shapes": "image:1x2x16x16",
        "trt_profile_opt_shapes": "image:4x2x16x16",
        "trt_profile_max_shapes": "image:8x2x16x16",
    }
    # Every dynamic input needs a profile: the temperature [B, 1] shares the batch range.
    config = _parse(tmp_path / "seg_uncertainty" / "config.pbtxt")
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    profile = {k: v for k, v in accelerator.parameters.items() if k.startswith("trt_profile")}
    assert profile == {
        "trt_profile_min_shapes": "image:1x2x16x16,temperature:1x1",
        "trt_profile_opt_shapes": "image:4x2x16x16,temperature:4x1",
        "trt_profile_max_shapes": "image:8x2x16x16,temperature:8x1",
    }


def test_tensorrt_needs_gpu_instances(export_3d, tmp_path) -> None:
    with pytest.raises(ValueError, match="KIND_GPU"):
        write_triton_repository(export_3d, tmp_path, "seg", tensorrt=True)


def test_checksum_is_verified_before_copying(export_3d, tmp_path) -> None:
    broken = tmp_path / "export"
    broken.mkdir()
    for item in export_3d.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "seg.onnx").write_bytes((broken / "seg.onnx").read_bytes()[:-1])
    with pytest.raises(BackendError, match="checksum mismatch"):
        write_triton_repository(broken, tmp_path / "repo", "seg")
    assert not (tmp_path / "repo" / "seg").exists()
    (broken / "seg.onnx").write_bytes((export_3d / "seg.onnx").read_bytes())
    (broken / "weights.bin").write_bytes((export_3d / "weights.bin").read_bytes() + b"\0")
    with pytest.raises(BackendError, match="checksum mismatch for .*weights.bin"):
        write_triton_repository(broken, tmp_path / "repo", "seg")
    assert not (tmp_path / "repo" / "seg").exists()


def test_inline_export_writes_no_weights_file(export_3d, tmp_path) -> None:
    from sfpc.model.shared_weights import convert_export

    inline = tmp_path / "export"
    inline.mkdir()
    for item in export_3d.iterdir():
        (inline / item.name).write_bytes(item.read_bytes())
    convert_export(inline, inline=True)
    written = write_triton_repository(inline, tmp_path / "repo", "seg")
    assert not any(p.name == "weights.bin" for p in written)
    assert not list((tmp_path / "repo").rglob("weights.bin"))
    for name in ("seg", "seg_uncertainty"):
        assert _external_locations(tmp_path / "repo" / name / "1" / "model.onnx") == set()


def test_tensorrt_plan_config_and_trtexec_command(export_3d) -> None:
    inputs, outputs = read_graph_io(export_3d / "seg.onnx")
    command = trtexec_command(
        "seg.onnx",
        "model.plan",
        inputs[0],
        max_batch_size=8,
        opt_batch_size=4,
        spatial_shape=(64, 64, 32),
    )
    assert command == [
        "trtexec",
        "--onnx=seg.onnx",
        "--saveEngine=model.plan",
        "--minShapes=image:1x1x64x64x32",
        "--optShapes=image:4x1x64x64x32",
        "--maxShapes=image:8x1x64x64x32",
        "--fp16",
    ]
    with pytest.raises(ValueError, match="spatial_shape"):
        trtexec_command("seg.onnx", "model.plan", inputs[0])
    u_inputs, _ = read_graph_io(export_3d / "seg_uncertainty.onnx")
    command = trtexec_command(
        "seg_uncertainty.onnx",
        "model.plan",
        u_inputs[0],
        max_batch_size=8,
        spatial_shape=(64, 64, 32),
        fp16=False,
        extra_inputs=u_inputs[1:],
    )
    assert command[3:] == [
        "--minShapes=image:1x1x64x64x32,temperature:1x1",
        "--optShapes=image:8x1x64x64x32,temperature:8x1",
        "--maxShapes=image:8x1x64x64x32,temperature:8x1",
    ]
    text = model_config_text(
        "seg_plan", inputs, outputs, platform="tensorrt_plan", instance_kind="KIND_GPU"
    )
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8


def test_python_backend_copy_changes_only_the_execution(export_2d_fixed, tmp_path) -> None:
    """The repository the pip-installed tritonserver serves: against the production configs
    as protobuf parses them, only platform -> backend "python", CPU instances, no accelerator
    and the served ONNX Runtime's thread count differ; model.py is the shipped source."""
    production, served = tmp_path / "production", tmp_path / "served"
    write_triton_repository(export_2d_fixed, production, MODEL, max_batch_size=MAX_BATCH,
                            instance_kind="KIND_GPU", tensorrt=True)
    names = python_backend_repository(production, served, intra_op_threads=3)
    assert names == [MODEL, MODEL + "_uncertainty"]
    for name in names:
        before = _parse(production / name / "config.pbtxt")
        after = _parse(served / name / "config.pbtxt")
        assert before.platform == "onnxruntime_onnx" and before.HasField("optimization")
        assert after.backend == "python" and not after.platform
        assert not after.HasField("optimization")
        cpu = model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert [g.kind for g in after.instance_group] == [cpu]
        assert after.parameters[THREADS_PARAMETER].string_value == "3"
        assert after.parameters[METADATA_PARAMETER] == before.parameters[METADATA_PARAMETER]
        for field in ("name", "max_batch_size", "input", "output", "dynamic_batching"):
            assert getattr(after, field) == getattr(before, field), field
        assert (served / name / "1" / "model.py").read_bytes() == \
            PYTHON_MODEL_SOURCE.read_bytes()
        for file in ("model.onnx", "weights.bin"):  # the graph and its external data
            assert (served / name / "1" / file).read_bytes() == \
                (production / name / "1" / file).read_bytes()
    with pytest.raises(ValueError, match="intra_op_threads"):
        python_backend_repository(production, tmp_path / "bad", intra_op_threads=0)


def test_python_backend_model_loads_the_graph_with_its_weights(
        export_3d, tmp_path, monkeypatch) -> None:
    """The served model.py, run here with a stand-in for Triton's utilities module: it loads
    model.onnx by path from the version folder, where weights.bin resolves, and computes what
    the gateway's ONNX Runtime backend computes from the export."""
    import importlib.util
    import sys
    import types

    from google.protobuf import json_format

    production, served = tmp_path / "production", tmp_path / "served"
    write_triton_repository(export_3d, production, MODEL, max_batch_size=MAX_BATCH)
    python_backend_repository(production, served)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                        types.ModuleType("triton_python_backend_utils"))
    reference = OnnxRuntimeBackend(export_3d, intra_op_threads=1)
    batch = np.random.default_rng(3).normal(size=(2, 1, 8, 8, 8)).astype(np.float32)
    for name, uncertainty in ((MODEL, False), (MODEL + "_uncertainty", True)):
        spec = importlib.util.spec_from_file_location(f"served_{name}",
                                                      served / name / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = json_format.MessageToDict(_parse(served / name / "config.pbtxt"),
                                           preserving_proto_field_name=True)
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(config),
                          "model_repository": str(served / name), "model_version": "1"})
        feeds = {"image": batch, "temperature": np.full((2, 1), 1.5, np.float32)}
        outputs = model.session.run(model.output_names,
                                    {k: feeds[k] for k in model.input_names})
        expected = reference.infer(batch, uncertainty=uncertainty, temperature=1.5)
        assert list(expected) == model.output_names
        for value, want in zip(outputs, expected.values(), strict=True):
            np.testing.assert_array_equal(value, want)
    reference.close()


# --- a real tritonserver ------------------------------------------------------------------------
# The tests below start tritonserver: marked integration, not in `make test-fast`.
@pytest.fixture(scope="module")
def triton_install() -> TritonInstall:
    try:
        return find_triton_install(triton_venv())
    except TritonUnavailable as exc:
        message = missing_triton_message(str(exc))
        if running_in_ci():
            pytest.fail(message + " -- CI must provide it", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def triton_repo(
    export_3d: Path, export_3d_old: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    production = tmp_path_factory.mktemp("production_repo")
    for export_dir, name in ((export_3d, MODEL), (export_3d_old, OLD_MODEL)):
        write_triton_repository(
            export_dir, production, name, max_batch_size=MAX_BATCH, preferred_batch_sizes=[2, 4]
        )
    test_repo = tmp_path_factory.mktemp("python_backend_repo")
    names = python_backend_repository(production, test_repo)
    assert names == [MODEL, MODEL + "_uncertainty", OLD_MODEL, OLD_MODEL + "_uncertainty"]
    return test_repo


@pytest.fixture(scope="module")
def triton_server(triton_install, triton_repo, tmp_path_factory) -> TritonServer:
    server = TritonServer(triton_install, triton_repo, tmp_path_factory.mktemp("tritonserver"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(export_3d: Path) -> OnnxRuntimeBackend:
    # One thread, like the served model.py: reductions split across threads round differently.
    backend = OnnxRuntimeBackend(export_3d, intra_op_threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module", params=["grpc", "http"])
def triton_backend(request, triton_server: TritonServer) -> TritonBackend:
    url = triton_server.grpc_url if request.param == "grpc" else triton_server.http_url
    backend = TritonBackend(url, request.param, MODEL, timeout_s=30)
    yield backend
    backend.close()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("uncertainty", "temperature"),
    [(False, 1.0), (True, 1.0), (True, 1.7)],
    ids=["plain", "uncertainty", "uncertainty-T1.7"],
)
@pytest.mark.parametrize("batch_size", [1, 3, 2 * MAX_BATCH + 1])
def test_triton_equals_onnxruntime(
    triton_backend, reference, exact, uncertainty, temperature, batch_size
) -> None:
    # Spatial sizes other than the export's patch: the axes are dynamic end to end.
    rng = np.random.default_rng(batch_size)
    batch = rng.normal(size=(batch_size, 1, 8, 12, 6)).astype(np.float32)
    served = triton_backend.infer(batch, uncertainty=uncertainty, temperature=temperature)
    expected = reference.infer(batch, uncertainty=uncertainty, temperature=temperature)
    assert served.keys() == expected.keys()
    for name, value in expected.items():
        assert served[name].dtype == np.float32
        assert_same(served[name], value, exact, name)


@pytest.fixture(scope="module")
def exact(triton_install) -> bool:
    """Bit-equality is expected when both venvs run the same ONNX Runtime build."""
    import onnxruntime

    return triton_install.onnxruntime_version == onnxruntime.__version__


def assert_same(actual: np.ndarray, desired: np.ndarray, exact: bool, name: str = "") -> None:
    if exact:
        np.testing.assert_array_equal(actual, desired, err_msg=name)
    else:
        # Different ONNX Runtime releases may round differently in the last bits; a transport
        # or batching fault would show as differences of order one.
        np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.integration
def test_temperature_reaches_the_served_graph(triton_backend, reference, exact) -> None:
    # Guards the comparison above against both sides ignoring the temperature.
    batch = np.random.default_rng(7).normal(size=(2, 1, 8, 8, 8)).astype(np.float32)
    at_1 = triton_backend.infer(batch, uncertainty=True)["mean_probs"]
    at_2 = triton_backend.infer(batch, uncertainty=True, temperature=2.0)["mean_probs"]
    assert np.abs(at_1 - at_2).max() > 1e-3


@pytest.mark.integration
def test_model_without_temperature_input(
    triton_backend, triton_server, export_3d_old, exact
) -> None:
    url = triton_server.grpc_url if triton_backend.protocol == "grpc" else triton_server.http_url
    old = TritonBackend(url, triton_backend.protocol, OLD_MODEL, timeout_s=30)
    reference = OnnxRuntimeBackend(export_3d_old, intra_op_threads=1)
    try:
        assert old.takes_temperature(OLD_MODEL + "_uncertainty") is False
        assert old.describe()["temperature_input"] is False
        batch = np.random.default_rng(8).normal(size=(3, 1, 8, 8, 8)).astype(np.float32)
        served = old.infer(batch, uncertainty=True)
        for name, value in reference.infer(batch, uncertainty=True).items():
            assert_same(served[name], value, exact, name)
        with pytest.raises(BackendError, match="no 'temperature' input.*re-export"):
            old.infer(batch, uncertainty=True, temperature=0.5)
    finally:
        old.close()
        reference.close()


@pytest.mark.integration
def test_health_and_description(triton_backend, export_3d) -> None:
    assert triton_backend.ready() is True
    assert triton_backend.uncertainty_ready() is True
    info = triton_backend.describe()
    assert info["max_batch_size"] == MAX_BATCH and info["uncertainty"] is True
    assert info["temperature_input"] is True
    metadata = json.loads((export_3d / "sfpc_model.json").read_text())
    assert triton_backend.export_metadata() == metadata


@pytest.mark.integration
def test_concurrent_requests_from_threads(triton_backend, reference, exact) -> None:
    batches = [
        np.random.default_rng(100 + i).normal(size=(2, 1, 8, 8, 8)).astype(np.float32)
        for i in range(6)
    ]
    results: dict[int, dict[str, np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = triton_backend.infer(batches[i], uncertainty=i % 2 == 1)
        except BaseException as exc:  # surfaced below, with the thread's own traceback
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    for i, batch in enumerate(batches):
        expected = reference.infer(batch, uncertainty=i % 2 == 1)
        for name, value in expected.items():
            assert_same(results[i][name], value, exact, name)


@pytest.mark.integration
def test_wrong_input_is_rejected_before_sending(triton_backend) -> None:
    with pytest.raises(BackendError, match=r"expects \[B, 1, any, any, any\]"):
        triton_backend.infer(np.zeros((1, 2, 8, 8, 8), np.float32))


@pytest.mark.integration
def test_unknown_model_is_unavailable(triton_server: TritonServer) -> None:
    backend = TritonBackend(triton_server.grpc_url, "grpc", "no_such_model")
    assert backend.ready() is False
    with pytest.raises(BackendUnavailable, match="'no_such_model' .*not loaded or not ready"):
        backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))
    backend.close()


@pytest.mark.integration
def test_stopped_server_is_unavailable(triton_install, triton_repo, tmp_path) -> None:
    server = TritonServer(triton_install, triton_repo, tmp_path)
    batch = np.zeros((1, 1, 8, 8, 8), np.float32)
    try:
        server.start()
        backends = [
            TritonBackend(server.grpc_url, "grpc", MODEL, timeout_s=5),
            TritonBackend(server.http_url, "http", MODEL, timeout_s=5),
        ]
        for backend in backends:
            assert backend.ready() and backend.infer(batch)["logits"].shape == (1, 3, 8, 8, 8)
    finally:
        server.stop()
    for backend in backends:
        assert backend.ready() is False
        with pytest.raises(BackendUnavailable) as caught:
            backend.infer(batch)
        message = str(caught.value)
        assert backend.url in message and f"'{MODEL}'" in message
        assert "cannot reach" in message and "tritonserver is running" in message
        backend.close()
