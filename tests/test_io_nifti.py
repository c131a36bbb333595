"""NIfTI uploads: nibabel is the oracle for shape, affine and voxel values (real data from
../shared/data and nibabel's own test files: NIfTI-2, big-endian, 4D, NaN, CIFTI)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sfpc.io import Limits, UploadError, Volume, decode_upload
from tests.support.io import require
from tests.support.paths import DATA

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
SHARED_NIFTI = sorted(p.relative_to(DATA).as_posix()
                      for p in DATA.glob("*/*.nii.gz")) if DATA.exists() else []


def encode_nifti(array: np.ndarray, volume: Volume) -> bytes:
    """``array`` (spatial or channel-first) written by nibabel with the upload's header, as an
    output on the upload's grid would be: gzipped NIfTI bytes."""
    data = array if array.ndim == 3 else np.moveaxis(array, 0, -1)
    header = volume.nifti_header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(None, None)
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    return gzip.compress(image_class(data, None, header=header).to_bytes())


def _nib_bytes(img: nib.Nifti1Image, compress: bool = True) -> bytes:
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1) if compress else raw


def _expect(status: int, code: str, files: list, **kwargs: object) -> UploadError:
    with pytest.raises(UploadError) as info:
        decode_upload(files, **kwargs)
    assert (info.value.status, info.value.code) == (status, code), info.value
    return info.value


@pytest.mark.data
@pytest.mark.parametrize("relative", SHARED_NIFTI or ["(missing)"])
def test_shared_data_round_trips(relative: str) -> None:
    path = require(DATA / relative)
    ref = nib.load(path)
    volume = decode_upload([(path.name, path)])
    assert volume.source == "nifti"
    assert volume.array.shape == ref.shape
    np.testing.assert_allclose(volume.affine, ref.affine, atol=1e-6)
    expected = np.asanyarray(ref.dataobj)
    assert volume.array.dtype == expected.dtype.newbyteorder("=")
    np.testing.assert_array_equal(volume.array, expected)
    # An output written with the upload's header reads back on the same grid, same codes.
    back = nib.Nifti1Image.from_bytes(gzip.decompress(encode_nifti(volume.array, volume)))
    assert back.shape == ref.shape
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-5)
    for code in ("sform_code", "qform_code"):
        assert int(back.header[code]) == int(ref.header[code])
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), expected)


def test_nifti2_channels_and_volume_limit() -> None:
    path = NIBABEL_DATA / "example_nifti2.nii.gz"
    ref = nib.load(path)
    assert isinstance(ref, nib.Nifti2Image) and ref.shape[3] == 2
    volume = decode_upload([("x.nii.gz", path)], max_channels=2)
    assert volume.array.shape == (2, *ref.shape[:3])
    data = np.asanyarray(ref.dataobj)
    for c in range(2):
        np.testing.assert_array_equal(volume.array[c], data[..., c])
    np.testing.assert_allclose(volume.affine, ref.affine)
    out = encode_nifti(volume.array, volume)
    back = nib.Nifti2Image.from_bytes(gzip.decompress(out))
    assert back.shape == ref.shape
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    err = _expect(422, "too_many_volumes", [("x.nii.gz", path)])
    assert "2 volumes" in str(err)


@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii"])
def test_big_endian(name: str) -> None:
    path = NIBABEL_DATA / name
    ref = nib.load(path)
    assert ref.header.endianness == ">"
    volume = decode_upload([(name, path)])
    assert volume.array.dtype.isnative
    np.testing.assert_array_equal(volume.array, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(volume.affine, ref.affine)


def test_real_nan_is_422() -> None:
    err = _expect(422, "non_finite_values",
                  [("r.nii", NIBABEL_DATA / "resampled_anat_moved.nii")])
    assert "153 NaN" in str(err)


def test_inf_is_422() -> None:
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.inf
    _expect(422, "non_finite_values", [("i.nii.gz", _nib_bytes(nib.Nifti1Image(data, np.eye(4))))])


def test_cifti_is_415() -> None:
    _expect(415, "cifti", [("c.nii", NIBABEL_DATA / "row_major.dconn.nii")])


def test_time_series_is_422_and_singleton_time_is_dropped() -> None:
    _expect(422, "too_many_volumes", [("f.nii", NIBABEL_DATA / "functional.nii")])
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5, 1)
    volume = decode_upload([("t.nii.gz", _nib_bytes(nib.Nifti1Image(data, np.eye(4))))])
    np.testing.assert_array_equal(volume.array, data[..., 0])


def test_vector_dimension_as_channels() -> None:
    data = np.arange(3 * 4 * 5 * 3, dtype=np.float32).reshape(3, 4, 5, 1, 3)
    upload = [("v.nii.gz", _nib_bytes(nib.Nifti1Image(data, np.eye(4))))]
    volume = decode_upload(upload, max_channels=3)
    np.testing.assert_array_equal(volume.array, np.moveaxis(data[:, :, :, 0], -1, 0))


def test_2d_image_is_a_single_slice_unless_min_spatial() -> None:
    data = np.arange(12, dtype=np.uint8).reshape(3, 4)
    upload = [("s.nii", _nib_bytes(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), False))]
    volume = decode_upload(upload)
    assert volume.array.shape == (3, 4, 1)
    np.testing.assert_array_equal(volume.array[..., 0], data)
    assert volume.spacing == pytest.approx((2.0, 3.0, 4.0))
    err = _expect(422, "too_few_voxels", upload, limits=Limits(min_spatial=2))
    assert "2D" in str(err)


def test_any_orientation_is_kept() -> None:
    # An oblique LPI affine: the volume keeps the voxel order and nibabel's affine exactly.
    rotation = np.array([[0.0, -1.0, 0.0], [0.8, 0.0, 0.6], [0.6, 0.0, -0.8]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 1.2, 3.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    data = np.random.default_rng(0).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    volume = decode_upload([("o.nii.gz", _nib_bytes(nib.Nifti1Image(data, affine)))])
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, data)


def test_scaled_data_is_applied() -> None:
    data = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], dtype=np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.5, -10.0)
    raw = bytearray(img.to_bytes())
    volume = decode_upload([("s.nii", bytes(raw))])
    # Hand-worked: stored value v maps to 2.5 * v - 10.
    np.testing.assert_allclose(volume.array, 2.5 * data - 10.0)


@pytest.mark.parametrize(
    ("linear", "code"),
    [
        (np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "non_orthonormal_affine"),
        (np.diag([1.0, 0.0, 1.0]), "singular_affine"),
    ],
)
def test_bad_affines_are_422(linear: np.ndarray, code: str) -> None:
    affine = np.eye(4)
    affine[:3, :3] = linear
    # Through the sform only: nibabel cannot even store a singular matrix as a qform.
    img = nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), None)
    img.header.set_sform(affine, code=2)
    _expect(422, code, [("a.nii", _nib_bytes(img, False))])


def test_unsupported_voxel_types_are_415() -> None:
    rgb = np.zeros((2, 2, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    _expect(415, "unsupported_dtype", [("rgb.nii", _nib_bytes(nib.Nifti1Image(rgb, np.eye(4))))])
    cplx = np.zeros((2, 2, 2), np.complex64)
    _expect(415, "unsupported_dtype", [("c.nii", _nib_bytes(nib.Nifti1Image(cplx, np.eye(4))))])


def test_truncated_files_are_400() -> None:
    raw = nib.Nifti1Image(np.ones((8, 8, 8), np.int16), np.eye(4)).to_bytes()
    _expect(400, "truncated_nifti", [("t.nii", raw[:-100])])
    _expect(400, "truncated_gzip", [("t.nii.gz", gzip.compress(raw)[:-40])])
    # An unknown datatype code (header offset 70) in an otherwise valid header.
    bad_type = raw[:70] + np.int16(999).tobytes() + raw[72:]
    _expect(400, "bad_nifti", [("h.nii", bad_type)])
    # Not even the magic: nothing in the upload is recognisable.
    _expect(415, "unsupported_format", [("h.nii", raw[:200] + b"\x00" * 148 + raw[348:])])


def test_gzip_members_and_large_streams_inflate_exactly() -> None:
    """The gzip reader (fed in pieces, ISA-L) against Python's gzip module: a file of several
    MB in one member, and two members with zero padding between them (as `cat a.gz b.gz` and
    some PACS exports write), both give the bytes gzip.decompress gives."""
    from sfpc.io.archive import gunzip

    rng = np.random.default_rng(3)
    data = rng.integers(-1024, 2000, size=(96, 96, 160), dtype=np.int16)
    raw = nib.Nifti1Image(data, np.eye(4)).to_bytes()
    packed = gzip.compress(raw, compresslevel=1)
    assert len(packed) > 2 << 20  # several input pieces of 1 MiB
    assert gunzip("big.nii.gz", packed, Limits()) == gzip.decompress(packed) == raw
    two = gzip.compress(raw[:1000]) + b"\x00" * 7 + gzip.compress(raw[1000:])
    assert gunzip("two.nii.gz", two, Limits()) == raw
    np.testing.assert_array_equal(decode_upload([("two.nii.gz", two)]).array, data)


def test_content_not_name_decides() -> None:
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    gz = _nib_bytes(nib.Nifti1Image(data, np.eye(4)))
    for name in ("scan.dcm", "scan.nii", "upload"):
        np.testing.assert_array_equal(decode_upload([(name, gz)]).array, data)


def test_limits() -> None:
    gz = _nib_bytes(nib.Nifti1Image(np.zeros((40, 40, 40), np.float32), np.eye(4)))
    _expect(413, "too_many_voxels", [("v.nii.gz", gz)], limits=Limits(max_voxels=40**3 - 1))
    _expect(413, "upload_too_large", [("v.nii.gz", gz)], limits=Limits(max_upload_bytes=100))
    # A gzip bomb stops inflating at the limit.
    _expect(413, "too_large_decompressed", [("v.nii.gz", gz)],
            limits=Limits(max_decompressed_bytes=100_000))


def test_several_images_are_refused() -> None:
    gz = _nib_bytes(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)))
    _expect(400, "multiple_nifti", [("a.nii.gz", gz), ("b.nii.gz", gz)])


def test_header_image_pair_is_415() -> None:
    header = (NIBABEL_DATA / "nifti1.hdr").read_bytes()
    _expect(415, "nifti_pair", [("n.hdr", header)])
