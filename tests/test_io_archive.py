"""Zip handling of uploads: hostile archives are refused with a clear 4xx, benign clutter
(DICOMDIR, macOS forks, readme files) is skipped, a clean archive decodes like loose files."""

from __future__ import annotations

import io
import tarfile
import zipfile

import nibabel as nib
import numpy as np
import pytest

from sfpc.io import Limits, UploadError, decode_upload
from tests.support.io import edited_series, require, series_files


def _nifti() -> bytes:
    return nib.Nifti1Image(np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4)).to_bytes()


def _zip(members: list[tuple[str | zipfile.ZipInfo, bytes]],
         method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def _expect(status: int, code: str, files: list, **kwargs: object) -> UploadError:
    with pytest.raises(UploadError) as info:
        decode_upload(files, **kwargs)
    assert (info.value.status, info.value.code) == (status, code), info.value
    return info.value


@pytest.mark.parametrize("name", ["../../etc/evil.nii", "/abs/evil.nii", "a/../../evil.nii",
                                  "C:/windows/evil.nii", "..\\evil.nii"])
def test_path_traversal_is_refused(name: str) -> None:
    err = _expect(400, "zip_path_traversal", [("up.zip", _zip([(name, _nifti())]))])
    assert "outside" in str(err)


def test_symlink_is_refused() -> None:
    link = zipfile.ZipInfo("scan.nii")
    link.create_system = 3
    link.external_attr = (0o120777 << 16)
    _expect(400, "zip_symlink", [("up.zip", _zip([(link, b"/etc/passwd")]))])


def test_zip_bomb_is_refused() -> None:
    bomb = _zip([("zeros.nii", bytes(50 << 20))])
    assert len(bomb) < 100_000  # ~1000-fold
    err = _expect(413, "zip_bomb", [("bomb.zip", bomb)])
    assert "zip bomb" in str(err)


def test_uncompressed_total_over_limit() -> None:
    archive = _zip([("a.nii", _nifti())], method=zipfile.ZIP_STORED)
    _expect(413, "too_large_decompressed", [("up.zip", archive)],
            limits=Limits(max_decompressed_bytes=len(_nifti()) - 1))


def test_lying_size_header_is_caught() -> None:
    # The central directory claims 10 bytes; the stream inflates to far more (CRC/size mismatch).
    raw = bytearray(_zip([("a.nii", _nifti())]))
    size = len(_nifti()).to_bytes(4, "little")
    fake = (10).to_bytes(4, "little")
    assert raw.count(size) == 2  # local header and central directory
    raw = raw.replace(size, fake)
    with pytest.raises(UploadError) as info:
        decode_upload([("up.zip", bytes(raw))])
    assert info.value.status == 400


def test_too_many_members() -> None:
    archive = _zip([(f"f{i}.txt", b"x") for i in range(6)])
    _expect(413, "too_many_files", [("up.zip", archive)], limits=Limits(max_files=5))


def test_nested_archives_are_refused() -> None:
    inner = _zip([("a.nii", _nifti())])
    _expect(400, "nested_archive", [("up.zip", _zip([("inner.zip", inner)]))])
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        info = tarfile.TarInfo("a.nii")
        info.size = len(_nifti())
        archive.addfile(info, io.BytesIO(_nifti()))
    _expect(400, "nested_archive", [("up.zip", _zip([("inner.tar", tar.getvalue())]))])
    _expect(415, "unsupported_archive", [("up.tar", tar.getvalue())])


def test_encrypted_member_is_415() -> None:
    # zipfile cannot encrypt: set the "encrypted" flag bit in both headers by hand.
    raw = bytearray(_zip([("a.nii", _nifti())]))
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    raw[local + 6] |= 0x1
    raw[central + 8] |= 0x1
    _expect(415, "zip_encrypted", [("up.zip", bytes(raw))])


def test_corrupt_zip_is_400() -> None:
    archive = _zip([("a.nii", _nifti())])
    _expect(400, "bad_zip", [("up.zip", archive[: len(archive) // 2])])


def test_zip_with_clutter_decodes_the_image() -> None:
    archive = _zip([
        ("study/", b""),
        ("study/readme.txt", b"scanned on a Tuesday"),
        ("__MACOSX/study/._a.nii", b"\x00\x05\x16\x07"),
        ("study/.DS_Store", b"\x00\x00\x00\x01Bud1"),
        ("study/a.nii", _nifti()),
    ])
    volume = decode_upload([("up.zip", archive)])
    np.testing.assert_array_equal(volume.array, np.arange(64).reshape(4, 4, 4))
    assert any("readme.txt" in w for w in volume.warnings)


def test_nothing_usable_is_415() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    err = _expect(415, "unsupported_format", [("x.png", png), ("notes.txt", b"hello")])
    assert "PNG" in str(err) and "notes.txt" in str(err)
    _expect(400, "empty_upload", [])


@pytest.mark.data
def test_zipped_dicom_series_with_dicomdir_matches_loose_files() -> None:
    require(series_files()[0])
    loose = decode_upload([(p.name, p) for p in series_files()])
    members = [(f"DICOM/{i:08d}", data) for i, (_, data) in enumerate(edited_series())]
    members.append(("DICOMDIR", b"not parsed: the index only lists the files above"))
    volume = decode_upload([("series.zip", _zip(members[::-1]))])
    np.testing.assert_array_equal(volume.array, loose.array)
    np.testing.assert_allclose(volume.affine, loose.affine)
    assert any("DICOMDIR" in w for w in volume.warnings)
