"""Malformed uploads thrown at a live gateway (hypothesis), and schemathesis on its OpenAPI schema.

The property: whatever arrives, the answer is a success or a 4xx with the JSON error body (never
a 5xx, never a dropped connection), and the server still answers /healthz afterwards. A success
on a NIfTI upload returns a mask with the upload's spatial shape.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.support.models import tiny_models
from tests.support.paths import DICOM_SERIES
from tests.support.server import GatewayServer

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
# Real gateway processes (uvicorn via `sfpc serve`): not in `make test-fast`.
pytestmark = pytest.mark.integration
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

# SFPC_FUZZ_EXAMPLES raises the count for a longer hunt than the suite's bounded run.
EXAMPLES = int(os.environ.get("SFPC_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tiny_models(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("fuzz")
    env = {"SFPC_DATA_DIR": str(root / "data"), "SFPC_MAX_UPLOAD_BYTES": str(4 << 20),
           "SFPC_MAX_VOXELS": str(1 << 20), "SFPC_JOB_MAX_QUEUED": "1000"}
    with GatewayServer([models["tiny3d"], models["tiny2d"]], root / "gateway.log",
                       env=env) as srv:
        yield srv


def send(server: GatewayServer, files, params=None):
    response = httpx.post(f"{server.url}/v1/segment", files=files, params=params, timeout=60)
    if response.status_code != 200:
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:400])
        error = response.json()["error"]
        assert error["code"] and error["message"]
    return response


def _valid_nifti(shape=(6, 5, 4), dtype=np.int16, nifti2: bool = False) -> bytes:
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    data = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    return cls(data, np.diag([1.5, 1.5, 2.0, 1.0])).to_bytes()


def _series_bytes() -> list[bytes]:
    if not DICOM_SERIES.is_dir():
        from pydicom.data import get_testdata_file

        return [Path(get_testdata_file("CT_small.dcm")).read_bytes()]
    return [p.read_bytes() for p in sorted(DICOM_SERIES.glob("*.dcm"))[:3]]


SERIES = _series_bytes()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


SENT: dict[str, int] = {}
ZIPPED_SERIES = _zip([(f"s/{i}.dcm", d) for i, d in enumerate(SERIES)])
filenames = st.sampled_from(["image.nii.gz", "image.nii", "scan.dcm", "series.zip", "x",
                             "../../etc/passwd", "a" * 300, "名前.nii.gz", ""])


@FUZZ
@given(data=st.binary(max_size=4096), name=filenames)
def test_random_bytes(server, data, name):
    send(server, [("file", (name, data))])


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000), compress=st.booleans(),
       nifti2=st.booleans())
def test_truncated_nifti(server, cut, compress, nifti2):
    raw = _valid_nifti(nifti2=nifti2)
    data = gzip.compress(raw) if compress else raw
    send(server, [("file", ("t.nii.gz" if compress else "t.nii", data[:cut % len(data)]))])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1,
                      max_size=8), nifti2=st.booleans())
def test_corrupted_nifti_header(server, flips, nifti2):
    raw = bytearray(_valid_nifti(nifti2=nifti2))
    for offset, value in flips:
        raw[offset] = value
    send(server, [("file", ("c.nii", bytes(raw)))])


shapes = st.lists(st.integers(1, 7), min_size=1, max_size=5).map(tuple)
dtypes = st.sampled_from([np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32,
                          np.float64])


@FUZZ
@given(data=st.data(), shape=shapes, dtype=dtypes, nifti2=st.booleans(),
       model=st.sampled_from([None, "tiny3d", "tiny2d"]),
       zooms=st.lists(st.floats(0.05, 8.0), min_size=3, max_size=3),
       srow=st.none() | st.sampled_from([0.0, float("nan"), float("inf"), 1e30, -2.0]))
def test_arbitrary_dims_dtypes_values_and_zooms(server, data, shape, dtype, nifti2, model,
                                                zooms, srow):
    elements = None
    if np.dtype(dtype).kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=32)
    array = data.draw(hnp.arrays(dtype, shape, elements=elements))
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    payload = bytearray(cls(array, np.diag([*zooms, 1.0])).to_bytes())
    if srow is not None:
        # A broken sform written into the header itself (nibabel would not write one): the
        # first entry of srow_x, at byte 280 (NIfTI-1, float32) or 400 (NIfTI-2, float64).
        if nifti2:
            struct.pack_into("<d", payload, 400, srow)
        else:
            struct.pack_into("<f", payload, 280, srow)
    SENT["arbitrary"] = SENT.get("arbitrary", 0) + 1
    response = send(server, [("file", ("v.nii", bytes(payload)))],
                    {"model": model} if model else None)
    if response.status_code == 200:
        raw = gzip.decompress(response.content)
        mask = (nib.Nifti2Image if raw[4:7] == b"n+2" else nib.Nifti1Image).from_bytes(raw)
        # The mask lies on the upload's grid: a 2D image comes back as one slice.
        assert mask.shape == (array.shape + (1, 1))[:3]


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                      max_size=6),
       cut=st.none() | st.integers(0, 10**6))
def test_corrupted_zip(server, flips, cut):
    data = bytearray(ZIPPED_SERIES)
    for offset, value in flips:
        data[offset % len(data)] = value
    if cut is not None:
        data = data[:cut % len(data)]
    send(server, [("file", ("series.zip", bytes(data)))])


member_names = st.sampled_from(["../evil.dcm", "/abs/path.dcm", "ok/1.dcm", "a/../../b.dcm",
                                "DICOMDIR", "nested.zip", "dir/", "x" * 200 + ".dcm"])


@FUZZ
@given(members=st.lists(st.tuples(member_names, st.sampled_from(["dicom", "nested", "junk",
                                                                   "empty"])),
                        min_size=1, max_size=5))
def test_hostile_zip_members(server, members):
    content = {"dicom": SERIES[0], "nested": ZIPPED_SERIES, "junk": b"junk" * 50, "empty": b""}
    send(server, [("file", ("z.zip", _zip([(n, content[k]) for n, k in members])))])


@settings(FUZZ, max_examples=max(8, EXAMPLES // 4))
@given(parts=st.lists(st.sampled_from(["nifti", "dicom", "zip", "junk"]), min_size=2,
                      max_size=5))
def test_mixed_multi_file_uploads(server, parts):
    content = {"nifti": gzip.compress(_valid_nifti()), "dicom": SERIES[0], "zip": ZIPPED_SERIES,
               "junk": struct.pack("<8d", *range(8))}
    send(server, [("file", (f"part{i}", content[p])) for i, p in enumerate(parts)])


def test_server_survived_the_fuzzing(server):
    assert server.alive()
    assert SENT.get("arbitrary", 0) >= 10
    text = httpx.get(f"{server.url}/metrics").text
    assert 'status="500"' not in text


# ----------------------------------------------------------------------------------------------
# schemathesis: every operation of the live server's OpenAPI schema, bounded
# ----------------------------------------------------------------------------------------------

schemathesis = pytest.importorskip("schemathesis")


def test_openapi_operations_never_5xx(server):
    """Every operation of the live schema, valid and invalid requests alike (schemathesis'
    positive and negative generation), a bounded number of examples each. Driven through
    ``as_strategy``: the pytest plugin's lazy fixture loader does not support pytest 9."""
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/segment" for op in operations)
    seen: list[tuple[str, str, int]] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=6, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                response = case.call(timeout=60)
                seen.append((case.method, case.path, response.status_code))
                assert response.status_code < 500, (case.method, case.formatted_path,
                                                     response.status_code, response.text[:400])
                if response.status_code >= 400:
                    headers = {k.lower(): v for k, v in response.headers.items()}
                    content_type = headers.get("content-type", [""])
                    content_type = content_type[0] if isinstance(content_type, list) else \
                        content_type
                    assert content_type.startswith("application/json"), content_type
                    assert response.json()["error"]["code"]

            try:
                call()
            except hypothesis.errors.Unsatisfiable:
                # Nothing can be invalid about an operation without parameters or body.
                assert mode == GenerationMode.NEGATIVE, operation.label
    assert len(seen) >= len(operations)
    assert server.alive()
