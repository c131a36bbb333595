"""DICOM uploads. Oracles: SimpleITK's ImageSeriesReader (voxels and geometry of a series),
pydicom's own pixel decoding (transfer syntaxes, rescale), hand-worked geometry; real data from
../shared/data/dicom and pydicom's test files."""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.uid import generate_uid

from sfpc.io import UploadError, decode_upload
from tests.support.io import (
    edited_series,
    require,
    series_datasets,
    series_files,
    sitk_reference,
    to_bytes,
    world,
)
from tests.support.paths import TRANSFER_SYNTAXES

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _expect(status: int, code: str, files: list, **kwargs: object) -> UploadError:
    with pytest.raises(UploadError) as info:
        decode_upload(files, **kwargs)
    assert (info.value.status, info.value.code) == (status, code), info.value
    return info.value


def _write(files: list[tuple[str, bytes]], folder: Path) -> list[Path]:
    paths = []
    for name, data in files:
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def _assert_matches_sitk(volume, paths: list[Path]) -> None:
    array, affine = sitk_reference(paths)
    assert volume.array.shape == array.shape
    # Same voxel -> world mapping (corners and centre within 1e-3 mm) and the same voxels.
    np.testing.assert_allclose(world(volume.affine, array.shape), world(affine, array.shape),
                               atol=1e-3)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_allclose(volume.array, array, rtol=1e-6, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The real oblique, gapped series
# ----------------------------------------------------------------------------------------------


@pytest.mark.data
def test_real_series_matches_simpleitk(tmp_path: Path) -> None:
    paths = series_files()
    volume = decode_upload([(p.name, p) for p in paths])
    # SimpleITK reads pydicom's rewrite of the files: the same data elements, without the
    # 2.5 MB of bytes trailing brain_001.dcm's data set, which GDCM takes ~10 s to skip.
    _assert_matches_sitk(volume, _write(edited_series(), tmp_path))
    assert volume.array.dtype == np.float32
    # Column-major like NIfTI: frames are copied in as they are, masks written out without a
    # transposing copy.
    assert volume.array.flags.f_contiguous
    assert volume.source == "dicom"
    info = volume.series
    assert info is not None
    assert info.n_instances == info.n_frames == 20
    assert info.modality == "MR" and info.geometry == "patient"
    assert info.rule == "the only image series in the upload"
    assert info.transfer_syntaxes == ("Explicit VR Little Endian",)
    # 5 mm slices acquired every 7 mm: the spacing comes from positions, not SliceThickness.
    assert float(pydicom.dcmread(paths[0]).SliceThickness) == 5.0
    assert info.slice_spacing == pytest.approx(7.0, abs=0.01)
    # The header copies and frame map follow the sorted slices.
    assert len(volume.dicom_datasets) == 20
    assert "PixelData" not in volume.dicom_datasets[0]
    for k, ref in enumerate(volume.source_frames):
        assert ref.dataset_index == k and ref.frame_number is None
        assert ref.sop_instance_uid == volume.dicom_datasets[k].SOPInstanceUID
    report = json.loads(json.dumps(volume.describe()))
    assert report["series"]["n_frames"] == 20 and report["shape"] == [256, 256, 20]


@pytest.mark.data
def test_shuffled_names_and_order_give_the_same_volume() -> None:
    paths = series_files()
    reference = decode_upload([(p.name, p) for p in paths])
    files = [(p.name, p.read_bytes()) for p in paths]
    names = [f"IM{n:04d}" for n in range(len(files))]
    rng = random.Random(7)
    rng.shuffle(names)
    rng.shuffle(files)
    volume = decode_upload([(new, data) for new, (_, data) in zip(names, files, strict=True)])
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.affine, reference.affine)
    assert [r.sop_instance_uid for r in volume.source_frames] == [
        r.sop_instance_uid for r in reference.source_frames]


@pytest.mark.data
def test_instance_numbers_do_not_decide_the_order(tmp_path: Path) -> None:
    def scramble(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        ds.InstanceNumber = (i * 7) % 20 + 1
        return ds

    files = edited_series(scramble)
    volume = decode_upload(files)
    _assert_matches_sitk(volume, _write(files, tmp_path))


@pytest.mark.data
def test_rescale_matches_simpleitk(tmp_path: Path) -> None:
    def rescale(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        ds.RescaleSlope, ds.RescaleIntercept = "2.5", "-100"
        return ds

    files = edited_series(rescale)
    volume = decode_upload(files)
    _assert_matches_sitk(volume, _write(files, tmp_path))


@pytest.mark.data
def test_per_slice_rescale_is_applied_per_slice() -> None:
    def rescale(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        ds.RescaleSlope, ds.RescaleIntercept = f"{1 + 0.25 * i}", f"{-10 * i}"
        return ds

    files = edited_series(rescale)
    volume = decode_upload(files)
    by_uid = {ds.SOPInstanceUID: (i, ds) for i, ds in
              enumerate(pydicom.dcmread(io.BytesIO(data)) for _, data in files)}
    for k, ref in enumerate(volume.source_frames):
        i, ds = by_uid[ref.sop_instance_uid]
        expected = ds.pixel_array.astype(np.float64) * (1 + 0.25 * i) - 10 * i
        np.testing.assert_allclose(volume.array[:, :, k], expected.T.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Series grouping and selection
# ----------------------------------------------------------------------------------------------


@pytest.mark.data
def test_missing_uids_still_group_by_geometry() -> None:
    extra = []

    def strip(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        del ds.SeriesInstanceUID
        if i < 3:  # three files of another (sagittal) stack, also without a series UID
            other = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
            other.SOPInstanceUID = generate_uid()
            other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
            other.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            extra.append((f"sag{i}.dcm", to_bytes(other)))
        if i == 4:
            ds.SeriesInstanceUID = ""  # empty counts as missing
        return ds

    files = edited_series(strip)
    reference = decode_upload([(p.name, p) for p in series_files()])
    volume = decode_upload(files + extra)
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine)
    assert volume.series is not None and volume.series.series_instance_uid is None
    assert "most slices (20)" in volume.series.rule
    (other,) = volume.series.others
    assert other.n_instances == 3 and other.series_instance_uid is None


def _two_series(split: int, number_a: int, number_b: int) -> tuple[list, str, str]:
    uid_a, uid_b = generate_uid(), generate_uid()

    def assign(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        first = i < split
        ds.SeriesInstanceUID = uid_a if first else uid_b
        ds.SeriesNumber = number_a if first else number_b
        return ds

    return edited_series(assign), uid_a, uid_b


@pytest.mark.data
def test_series_selection_rule_and_explicit_choice() -> None:
    reference = decode_upload([(p.name, p) for p in series_files()])
    files, uid_a, uid_b = _two_series(12, 4, 3)
    volume = decode_upload(files)
    assert volume.series.series_instance_uid == uid_a
    assert volume.series.rule.startswith("most slices (12) among 2 image series")
    np.testing.assert_array_equal(volume.array, reference.array[:, :, :12])
    (other,) = volume.series.others
    assert (other.series_instance_uid, other.n_instances, other.eligible) == (uid_b, 8, True)

    chosen = decode_upload(files, series_uid=uid_b)
    assert chosen.series.series_instance_uid == uid_b
    assert "requested" in chosen.series.rule
    np.testing.assert_array_equal(chosen.array, reference.array[:, :, 12:])
    # Hand-worked grid of the chosen part: origin at its first slice, the slice axis along
    # the normal with the spacing of its own positions, both flipped from LPS to RAS.
    first, last = (pydicom.dcmread(series_files()[i]) for i in (12, 19))
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    start, stop = (np.asarray(d.ImagePositionPatient, dtype=float) for d in (first, last))
    flip = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(chosen.affine[:3, 3], flip * start)
    np.testing.assert_allclose(chosen.affine[:3, 2], flip * normal * ((stop - start) @ normal) / 7)
    np.testing.assert_allclose(chosen.affine[:3, :2], reference.affine[:3, :2])

    err = _expect(422, "series_not_found", files, series_uid="1.2.3.4")
    assert uid_a in str(err) and uid_b in str(err)


@pytest.mark.data
def test_ties_go_to_the_lowest_series_number() -> None:
    files, uid_a, uid_b = _two_series(10, 9, 2)
    assert decode_upload(files).series.series_instance_uid == uid_b
    files, uid_a, uid_b = _two_series(10, 2, 9)
    assert decode_upload(files).series.series_instance_uid == uid_a


@pytest.mark.data
def test_derived_objects_are_not_chosen() -> None:
    rtstruct = PYDICOM_FILES / "rtstruct.dcm"
    seg = PYDICOM_FILES / "liver_1frame.dcm"
    files = [(p.name, p) for p in series_files()] + [("rs.dcm", rtstruct), ("seg.dcm", seg)]
    volume = decode_upload(files)
    assert volume.array.shape == (256, 256, 20)
    reasons = {o.modality: o for o in volume.series.others}
    assert not reasons["RTSTRUCT"].eligible and not reasons["SEG"].eligible
    err = _expect(415, "not_an_image", [("rs.dcm", rtstruct)])
    assert "RTSTRUCT" in str(err)


# ----------------------------------------------------------------------------------------------
# Geometry that cannot make a volume
# ----------------------------------------------------------------------------------------------


@pytest.mark.data
def test_missing_slice_is_422() -> None:
    files = edited_series(lambda i, ds: None if i == 9 else ds)
    err = _expect(422, "non_uniform_spacing", files)
    assert "missing" in str(err)


@pytest.mark.data
def test_two_volumes_in_one_series_is_422() -> None:
    extra = []

    def echo(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        if i % 2 == 0:
            copy = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
            copy.SOPInstanceUID = generate_uid()
            copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
            extra.append((f"echo2_{i}.dcm", to_bytes(copy)))
        return ds

    files = edited_series(echo)
    _expect(422, "duplicate_positions", files + extra)


@pytest.mark.data
def test_gantry_tilt_is_422() -> None:
    def tilt(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + 1.2 * i, y, z]
        return ds

    err = _expect(422, "sheared_series", edited_series(tilt))
    assert "tilt" in str(err)


@pytest.mark.data
def test_repeated_file_is_skipped() -> None:
    paths = series_files()
    volume = decode_upload([(p.name, p) for p in paths] + [("again.dcm", paths[3])])
    assert volume.array.shape[2] == 20
    assert any("same SOPInstanceUID" in w for w in volume.warnings)


# ----------------------------------------------------------------------------------------------
# Enhanced multi-frame
# ----------------------------------------------------------------------------------------------


def _multiframe(datasets: list[pydicom.Dataset]) -> pydicom.Dataset:
    legacy = pytest.importorskip("highdicom.legacy")
    hd = pytest.importorskip("highdicom")
    datasets = list(datasets)
    random.Random(3).shuffle(datasets)
    # Frames in a scrambled order (no dimension index: highdicom keeps the order given), so
    # the decoder must sort them by PlanePositionSequence.
    return legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, include_dimension_index=False,
    )


@pytest.mark.data
def test_multiframe_geometry_matches_the_single_frame_series(tmp_path: Path) -> None:
    multiframe = _multiframe(series_datasets())
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                 for f in multiframe.PerFrameFunctionalGroupsSequence]
    assert positions != sorted(positions)
    volume = decode_upload([("enhanced.dcm", to_bytes(multiframe))])
    _assert_matches_sitk(volume, _write(edited_series(), tmp_path))
    assert len(volume.dicom_datasets) == 1
    frames = pydicom.dcmread(io.BytesIO(to_bytes(multiframe))).pixel_array
    for k, ref in enumerate(volume.source_frames):
        np.testing.assert_array_equal(volume.array[:, :, k], frames[ref.frame_number - 1].T)


@pytest.mark.data
def test_multiframe_per_frame_rescale() -> None:
    multiframe = _multiframe(series_datasets())
    shared = multiframe.SharedFunctionalGroupsSequence[0]
    del shared.PixelValueTransformationSequence
    for i, item in enumerate(multiframe.PerFrameFunctionalGroupsSequence):
        transform = pydicom.Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = f"{0.5 + i}", f"{3 * i}"
        transform.RescaleType = "US"
        item.PixelValueTransformationSequence = [transform]
    data = to_bytes(multiframe)
    volume = decode_upload([("enhanced.dcm", data)])
    raw = pydicom.dcmread(io.BytesIO(data)).pixel_array.astype(np.float64)
    for k, ref in enumerate(volume.source_frames):
        i = ref.frame_number - 1
        expected = (raw[i] * (0.5 + i) + 3 * i).astype(np.float32)
        np.testing.assert_allclose(volume.array[:, :, k], expected.T)


# ----------------------------------------------------------------------------------------------
# Transfer syntaxes and pydicom's test files
# ----------------------------------------------------------------------------------------------


def _pydicom_oracle(ds: pydicom.Dataset) -> np.ndarray:
    pixels = ds.pixel_array.astype(np.float64)
    if pixels.ndim == 2:
        pixels = pixels[None]
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (pixels * slope + intercept).astype(np.float32).transpose(2, 1, 0)


@pytest.mark.parametrize("name", sorted(p.name for p in TRANSFER_SYNTAXES.glob("*.dcm"))
                         if TRANSFER_SYNTAXES.exists() else ["(missing)"])
@pytest.mark.data
def test_transfer_syntaxes_decode_like_pydicom(name: str) -> None:
    path = require(TRANSFER_SYNTAXES / name)
    ds = pydicom.dcmread(path)
    volume = decode_upload([(name, path)])
    if ds.get("NumberOfFrames", 1) in (None, "", 1) or int(ds.NumberOfFrames) == 1:
        assert volume.array.shape == (ds.Columns, ds.Rows, 1)
    np.testing.assert_array_equal(volume.array, _pydicom_oracle(ds))
    assert volume.series.transfer_syntaxes == (ds.file_meta.TransferSyntaxUID.name,)


def test_undecodable_transfer_syntax_is_415() -> None:
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small_RLE.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists
    err = _expect(415, "unsupported_transfer_syntax", [("v.dcm", to_bytes(ds))])
    assert "MPEG2" in str(err)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    err = _expect(415, "unsupported_transfer_syntax", [("v.dcm", to_bytes(ds))])
    assert "1.2.3.4.5" in str(err)


@pytest.mark.data
def test_truncated_and_garbage_files_are_400() -> None:
    _expect(400, "bad_pixel_data", [("t.dcm", PYDICOM_FILES / "MR_truncated.dcm")])
    data = series_files()[5].read_bytes()
    _expect(400, "bad_pixel_data", [("cut.dcm", data[: len(data) - 5000])])
    garbage = bytes(128) + b"DICM" + bytes(random.Random(1).randrange(256) for _ in range(400))
    _expect(400, "bad_dicom", [("g.dcm", garbage)])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pydicom_test_files_give_a_volume_or_a_clear_4xx() -> None:
    files = sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file())
    assert len(files) > 50
    outcomes = {}
    for path in files:
        try:
            volume = decode_upload([(path.name, path)])
        except UploadError as exc:
            assert exc.status in (400, 413, 415, 422)
            assert str(exc)
            outcomes[path.name] = exc.code
        else:
            assert volume.array.ndim == 3 and np.isfinite(volume.array).all()
            outcomes[path.name] = "ok"
    assert outcomes["CT_small.dcm"] == "ok"
    assert outcomes["MR_small_bigendian.dcm"] == "ok"
    assert outcomes["zipMR.gz"] == "ok"  # a gzipped DICOM file
    assert outcomes["MR_truncated.dcm"] == "bad_pixel_data"
    assert outcomes["rtstruct.dcm"] == "not_an_image"
    assert outcomes["SC_rgb.dcm" if "SC_rgb.dcm" in outcomes else "SC_rgb_rle.dcm"] == \
        "colour_image"
    assert outcomes["DICOMDIR"] == "no_image_series"
    ct = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    np.testing.assert_array_equal(decode_upload([("ct", PYDICOM_FILES / "CT_small.dcm")]).array,
                                  _pydicom_oracle(ct))


def test_dicomdir_tree_picks_the_largest_series() -> None:
    root = PYDICOM_FILES / "dicomdirtests"
    files = [(str(p.relative_to(root)), p) for p in sorted((root / "98892001").rglob("*"))
             if p.is_file()] + [("DICOMDIR", root / "DICOMDIR")]
    volume = decode_upload(files)
    assert volume.array.shape == (16, 16, 5)
    assert len(volume.series.others) == 2
    assert any("DICOMDIR" in w for w in volume.warnings)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupted_uploads_never_raise_anything_but_upload_error() -> None:
    # Seeded byte flips, overwrites and truncations of small real files (native, RLE and JPEG
    # 2000 DICOM, a zipped series, NIfTI): the decoders and the native codec plugins underneath
    # must only ever answer with a Volume or an UploadError.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N").iterdir()):
            archive.writestr(path.name, path.read_bytes())
    sources = [(PYDICOM_FILES / name).read_bytes()
               for name in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm")]
    sources += [buffer.getvalue(), (NIBABEL_DATA / "anatomical.nii").read_bytes()]
    rng = random.Random(11)
    for _ in range(300):
        data = bytearray(rng.choice(sources))
        mode = rng.random()
        if mode < 0.4:
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif mode < 0.7:
            data = data[: rng.randrange(len(data))]
        else:
            start = rng.randrange(min(len(data), 2000))
            data[start:start + 8] = bytes(rng.randrange(256) for _ in range(8))
        try:
            decode_upload([("upload", bytes(data))])
        except UploadError as exc:
            assert exc.status in (400, 413, 415, 422)
