"""DICOM SEG and Parametric Map outputs. Oracles: highdicom's and pydicom's readers (references,
per-source-frame pixels, segment labels and codes) and David Clunie's dciodvfy (no "Error")."""

from __future__ import annotations

import io
import random
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from sfpc.io import UploadError, Volume, decode_upload
from sfpc.io.dicom_seg import write_parametric_map, write_seg
from tests.support.io import dciodvfy_errors, fresh_uids, require, series_datasets, to_bytes
from tests.support.paths import TRANSFER_SYNTAXES

pytestmark = pytest.mark.data
CLASSES = ["background", "Liver", "spleen", "kidney_left", "my custom structure"]


def _source_files() -> list[tuple[str, bytes]]:
    """The real series with valid UIDs (its own use an illegal root that dciodvfy flags in any
    object referencing them), shuffled so that upload order is not slice order."""
    files = [(f"f{i}.dcm", to_bytes(ds)) for i, ds in enumerate(fresh_uids(series_datasets()))]
    random.Random(5).shuffle(files)
    return files


def _mask(volume: Volume) -> np.ndarray:
    """A label map drawn from the image itself (so every slice differs), class 3 left empty."""
    image = volume.array
    mask = np.zeros(image.shape, np.uint8)
    mask[image > np.percentile(image, 80)] = 1
    mask[:60, :60, 3:9] = 2
    mask[200:, 200:, -1] = 4
    return mask


@pytest.fixture(scope="module")
def volume() -> Volume:
    return decode_upload(_source_files())


@pytest.fixture(scope="module")
def seg_bytes(volume: Volume) -> bytes:
    return write_seg(_mask(volume), volume, CLASSES, algorithm_name="SFPC-test",
                     algorithm_version="1.2.3")


def test_seg_references_the_source_series(volume: Volume, seg_bytes: bytes) -> None:
    ds = pydicom.dcmread(io.BytesIO(seg_bytes))
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == volume.series.study_instance_uid
    assert ds.FrameOfReferenceUID == volume.series.frame_of_reference_uid
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series.series_instance_uid
    referenced = {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in volume.dicom_datasets}
    # Every frame points back at one source image and sits where that image sits.
    positions = {d.SOPInstanceUID: [float(v) for v in d.ImagePositionPatient]
                 for d in volume.dicom_datasets}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID in referenced
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, positions[source.ReferencedSOPInstanceUID],
                                   atol=1e-4)


def test_seg_frames_line_up_with_the_source_frames(volume: Volume, seg_bytes: bytes) -> None:
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    mask = _mask(volume)
    uids = [ref.sop_instance_uid for ref in volume.source_frames]
    numbers = list(range(1, len(CLASSES)))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=False,
    )
    assert pixels.shape == (len(uids), *mask.shape[1::-1], len(numbers))
    for k in range(len(uids)):
        for s, number in enumerate(numbers):
            np.testing.assert_array_equal(pixels[k, :, :, s], (mask[:, :, k] == number).T)


def test_seg_segments_labels_and_codes(seg_bytes: bytes) -> None:
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    assert seg.number_of_segments == len(CLASSES) - 1
    labels = [seg.get_segment_description(n).segment_label for n in range(1, len(CLASSES))]
    assert labels == CLASSES[1:]
    liver = seg.get_segment_description(1)
    assert liver.segmented_property_type == codes.SCT.Liver
    assert liver.segmented_property_category == codes.SCT.Organ
    assert seg.get_segment_description(2).segmented_property_type == codes.SCT.Spleen
    assert seg.get_segment_description(3).segmented_property_type == codes.SCT.Kidney
    unknown = seg.get_segment_description(4)
    assert unknown.segmented_property_type == codes.SCT.Tissue
    algorithm = unknown.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("SFPC-test", "1.2.3")
    # The empty class (3 = kidney_left) is still a segment, with all-zero frames.
    assert not seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                                  .ReferencedSOPInstanceUID],
        segment_numbers=[3],
    ).any()


def test_seg_passes_dciodvfy(seg_bytes: bytes, tmp_path: Path) -> None:
    assert dciodvfy_errors(seg_bytes, tmp_path) == []


def test_parametric_map(volume: Volume, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.random(volume.array.shape, dtype=np.float32)
    data = write_parametric_map(values, volume)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series.series_instance_uid
    frames = ds.pixel_array
    assert frames.dtype == np.float32
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = [ref.sop_instance_uid for ref in volume.source_frames].index(source)
        np.testing.assert_array_equal(frames[k], values[:, :, z].T)
    pm = hd.pm.ParametricMap.from_dataset(ds)
    assert pm.Modality is not None
    assert dciodvfy_errors(data, tmp_path) == []


def test_multiframe_source(tmp_path: Path) -> None:
    legacy = pytest.importorskip("highdicom.legacy")
    datasets = fresh_uids(series_datasets())
    random.Random(9).shuffle(datasets)
    enhanced = legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(),
        instance_number=1, include_dimension_index=False,
    )
    volume = decode_upload([("enhanced.dcm", to_bytes(enhanced))])
    mask = _mask(volume)
    data = write_seg(mask, volume, CLASSES)
    seg = hd.seg.segread(io.BytesIO(data))
    frame_numbers = [ref.frame_number for ref in volume.source_frames]
    assert sorted(frame_numbers) == list(range(1, 21)) and frame_numbers != sorted(frame_numbers)
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=enhanced.SOPInstanceUID, source_frame_numbers=frame_numbers,
        segment_numbers=[1, 2, 4], combine_segments=True, relabel=False,
    )
    for k in range(len(frame_numbers)):
        expected = np.where(np.isin(mask[:, :, k], [1, 2, 4]), mask[:, :, k], 0)
        np.testing.assert_array_equal(pixels[k], expected.T)
    assert dciodvfy_errors(data, tmp_path) == []


def test_fractional_seg(volume: Volume) -> None:
    rng = np.random.default_rng(1)
    probs = rng.random((2, *volume.array.shape)).astype(np.float32)
    data = write_seg(probs, volume, ["background", "liver", "spleen"], fractional=True)
    seg = hd.seg.segread(io.BytesIO(data))
    assert seg.SegmentationType == "FRACTIONAL"
    uids = [ref.sop_instance_uid for ref in volume.source_frames]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2], combine_segments=False,
    )
    expected = np.transpose(probs, (3, 2, 1, 0))  # (Z, rows, cols, segments)
    # Stored as 8-bit fractions of 255.
    np.testing.assert_allclose(pixels, expected, atol=0.5 / 255 + 1e-6)


def test_nifti_upload_cannot_make_a_seg() -> None:
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    volume = decode_upload([("x.nii", img.to_bytes())])
    with pytest.raises(UploadError) as info:
        write_seg(np.zeros((4, 4, 4), np.uint8), volume, CLASSES)
    assert (info.value.status, info.value.code) == (422, "seg_needs_dicom")


def test_bad_masks_are_refused(volume: Volume) -> None:
    with pytest.raises(ValueError, match="shape"):
        write_seg(np.zeros((3, 3, 3), np.uint8), volume, CLASSES)
    with pytest.raises(ValueError, match="values"):
        write_seg(np.full(volume.array.shape, 9, np.uint8), volume, CLASSES)


def test_source_without_geometry(tmp_path: Path) -> None:
    # A secondary capture without patient geometry: the SEG is still valid (frames referenced
    # by source image only); highdicom cannot lay out a parametric map for it, a clear 422.
    volume = decode_upload([("sc.dcm", require(TRANSFER_SYNTAXES / "deflated.dcm"))])
    assert volume.series.geometry == "assumed"
    mask = np.zeros(volume.array.shape, np.uint8)
    mask[100:200, 50:80, 0] = 2
    data = write_seg(mask, volume, CLASSES)
    seg = hd.seg.segread(io.BytesIO(data))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[volume.source_frames[0].sop_instance_uid],
        segment_numbers=[2], combine_segments=False,
    )
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask[:, :, 0].T == 2)
    assert dciodvfy_errors(data, tmp_path) == []
    with pytest.raises(UploadError) as info:
        write_parametric_map(np.zeros(volume.array.shape, np.float32), volume)
    assert (info.value.status, info.value.code) == (422, "dicom_source_incomplete")


def test_all_empty_mask_is_a_valid_seg(volume: Volume, tmp_path: Path) -> None:
    data = write_seg(np.zeros(volume.array.shape, np.uint8), volume, CLASSES)
    seg = hd.seg.segread(io.BytesIO(data))
    assert seg.number_of_segments == len(CLASSES) - 1
    uids = [ref.sop_instance_uid for ref in volume.source_frames]
    assert not seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3, 4]).any()
    assert dciodvfy_errors(data, tmp_path) == []
