"""The direct Triton client example against a real tritonserver (the nvidia-pytriton build of
scripts/setup_triton_env.sh, Python backend running the exported ONNX graphs).

Oracle: ONNX Runtime running the same exported graphs in this process (OnnxRuntimeBackend), on
the same windows and through the same sliding window; and the export's own sfpc_model.json for
the metadata read back from Triton.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sfpc.model.triton_python_backend import (
    TritonServer,
    TritonUnavailable,
    find_triton_install,
    python_backend_repository,
)
from tests.support.models import export_fixture_model
from tests.support.triton import missing_triton_message, triton_venv

pytest.importorskip("torch")  # the fixture model is exported with torch
pytest.importorskip("tritonclient.grpc")
# A real tritonserver: not in `make test-fast`.
pytestmark = pytest.mark.integration

MODEL = "direct_fixture"
MAX_BATCH = 4


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return export_fixture_model(tmp_path_factory.mktemp("export"), patch_size=(16, 16, 16))[0]


@pytest.fixture(scope="module")
def triton(export_dir, tmp_path_factory):
    from sfpc.model.triton_repo import write_triton_repository

    try:
        install = find_triton_install(triton_venv())
    except TritonUnavailable as exc:
        pytest.skip(missing_triton_message(str(exc)))
    production = tmp_path_factory.mktemp("production")
    write_triton_repository(export_dir, production, MODEL, max_batch_size=MAX_BATCH)
    repo = tmp_path_factory.mktemp("repo")
    python_backend_repository(production, repo)
    server = TritonServer(install, repo, tmp_path_factory.mktemp("tritonserver"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(export_dir):
    from sfpc.inference.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(export_dir, intra_op_threads=1)
    yield backend
    backend.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_windows_through_triton_equal_onnxruntime(triton, reference, export_dir, protocol):
    from sfpc.clients.triton_direct import TritonDirect

    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    meta = json.loads((export_dir / "sfpc_model.json").read_text())
    rng = np.random.default_rng(7)
    windows = rng.normal(size=(2 * MAX_BATCH + 1, 1, 16, 16, 16)).astype(np.float32)
    with TritonDirect(url, MODEL, protocol=protocol, timeout_s=30) as direct:
        assert direct.metadata() == meta
        plain = direct.infer(windows)
        certain = direct.infer(windows, uncertainty=True)
    expected = reference.infer(windows)
    np.testing.assert_allclose(plain["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
    expected_u = reference.infer(windows, uncertainty=True,
                                 temperature=float(meta.get("temperature") or 1.0))
    assert set(certain) == set(expected_u)
    for name, values in expected_u.items():
        np.testing.assert_allclose(certain[name], values, rtol=1e-5, atol=1e-5, err_msg=name)


def test_segment_volume_matches_the_same_pipeline_on_onnxruntime(triton, reference, export_dir):
    from sfpc.clients.triton_direct import TritonDirect
    from sfpc.inference.direct import segment_volume

    rng = np.random.default_rng(3)
    image = rng.normal(size=(20, 18, 22)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])

    class Local:  # the example's pipeline with ONNX Runtime in place of Triton
        def metadata(self):
            return json.loads((export_dir / "sfpc_model.json").read_text())

        def predictor(self, uncertainty=False):
            return lambda windows: reference.infer(windows, uncertainty=uncertainty)

    expected_mask, expected_maps = segment_volume(Local(), image, affine)  # type: ignore[arg-type]
    with TritonDirect(triton.grpc_url, MODEL, timeout_s=30) as direct:
        mask, maps = segment_volume(direct, image, affine)
    assert mask.shape == image.shape and mask.dtype == np.uint8
    np.testing.assert_allclose(maps["logits"], expected_maps["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mask, expected_mask)
