"""Results out: routes, the STOW-RS body and response, and :func:`sfpc.io.dicom_net.send` to a
real DICOM node (dcmtk's ``storescp``) and to destinations that do not answer (the retries).

Oracles: pydicom's reading of what ``storescp`` wrote (same SOP instances, same pixels),
python-multipart's parsing of the request body, the PS3.18 statuses worked out by hand, a
refused TCP connection counted attempt by attempt.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from sfpc.io import dicom_net
from sfpc.io.dicom_net import Destination, Route, choose_route, multipart_related, send
from tests.support.io import fresh_uids, series_datasets, to_bytes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_first_matching_route_wins() -> None:
    routes = [Route(calling_ae="CT1", model="ct", destinations=["pacs", "ris"]),
              Route(calling_ae="CT1", destinations=["pacs"]),
              Route(model="mr", destinations=["mr-pacs"]),
              Route(model="*", destinations=["archive"])]
    assert choose_route(routes, "CT1", "ct") == ["pacs", "ris"]
    assert choose_route(routes, "CT1", "mr") == ["pacs"]
    assert choose_route(routes, "MR7", "mr") == ["mr-pacs"]
    assert choose_route(routes, None, "other") == ["archive"]
    assert choose_route(routes[:1], "MR7", "ct") == []
    with pytest.raises(ValueError, match="unknown destination"):
        dicom_net.check_routes(routes, {"pacs": Destination(kind="dicomweb", url="http://x")})


def test_destinations_say_what_they_lack() -> None:
    with pytest.raises(ValueError, match="url"):
        Destination(kind="dicomweb")
    with pytest.raises(ValueError, match="host, port and ae_title"):
        Destination(kind="dimse", host="pacs")


def test_stow_response_statuses() -> None:
    ok = ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.1")
    refused = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.3.2", 0x0122)
    assert dicom_net.store_response([ok], [])[0] == 200
    status, body = dicom_net.store_response([ok], [refused], "http://gw/dicomweb/studies/1")
    assert status == 202
    assert body["00081190"]["Value"] == ["http://gw/dicomweb/studies/1"]
    assert body["00081199"]["Value"][0]["00081155"]["Value"] == ["1.2.3.1"]
    assert body["00081198"]["Value"][0]["00081197"] == {"vr": "US", "Value": [290]}
    assert dicom_net.store_response([], [refused])[0] == 409


def test_multipart_related_body_parses_back() -> None:
    from python_multipart.multipart import MultipartParser, parse_options_header

    parts = [b"DICM-one", b"two\r\n--not-a-boundary\r\n", bytes(range(256))]
    body, content_type = multipart_related(parts)
    media, params = parse_options_header(content_type)
    assert media == b"multipart/related" and params[b"type"] == b"application/dicom"
    got: list[bytearray] = []
    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": lambda: got.append(bytearray()),
        "on_part_data": lambda data, start, end: got[-1].extend(data[start:end])})
    parser.write(body)
    parser.finalize()
    assert [bytes(g) for g in got] == parts


def test_unreachable_destination_is_tried_attempts_times_then_recorded() -> None:
    waits: list[float] = []
    data = to_bytes(fresh_uids(series_datasets()[:1])[0])
    for destination in (
            Destination(kind="dicomweb", url=f"http://127.0.0.1:{_free_port()}/dicom-web",
                        attempts=3, backoff_s=0.5, timeout_s=5),
            Destination(kind="dimse", host="127.0.0.1", port=_free_port(), ae_title="NOBODY",
                        attempts=3, backoff_s=0.5, timeout_s=5)):
        waits.clear()
        record = send("down", destination, [("a.dcm", data)], sleep=waits.append)
        assert record["status"] == "failed" and record["attempts"] == 3, record
        assert waits == [0.5, 1.0]  # backoff doubles between the tries
        assert record["instances"][0]["sop_instance_uid"] == pydicom.dcmread(
            io.BytesIO(data)).SOPInstanceUID


@pytest.mark.integration
def test_c_store_to_a_real_dicom_node(tmp_path: Path) -> None:
    binary = shutil.which("storescp")
    if binary is None:
        pytest.skip("dcmtk's storescp is not installed (apt-get install -y dcmtk)")
    datasets = fresh_uids(series_datasets()[:3])
    files = [(f"{i}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)]
    received = tmp_path / "received"
    received.mkdir()
    port = _free_port()
    node = subprocess.Popen([binary, "-aet", "NODE", "-od", str(received), "+xa", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        destination = Destination(kind="dimse", host="127.0.0.1", port=port, ae_title="NODE",
                                  calling_ae_title="SFPC")
        record = send("node", destination, files)
        assert record["status"] == "delivered" and record["attempts"] == 1, record
        assert record["target"] == f"NODE@127.0.0.1:{port}"
    finally:
        node.terminate()
        node.wait(10)
    stored = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in received.iterdir())}
    assert set(stored) == {ds.SOPInstanceUID for ds in datasets}
    for ds in datasets:
        np.testing.assert_array_equal(stored[ds.SOPInstanceUID].pixel_array, ds.pixel_array)
