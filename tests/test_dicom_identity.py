"""Derived DICOM objects from imperfect series: SOP identity taken from the file meta, and a series
without Study/Series UIDs refused before any inference, naming the missing attributes.

Series: the real MR series of the shared data folder, edited with pydicom the way anonymisers
leave series (data-set UIDs blanked, the file meta kept). Oracles: pydicom's reading of the
edited files (the UIDs the SEG must reference), dciodvfy, and the pipeline's stage observer (no
"inference" stage ran) and a wall clock.
"""

from __future__ import annotations

import io
import time

import pydicom
import pytest

from sfpc.errors import UploadError
from sfpc.inference.contract import DEFAULT_MODEL_DIR
from sfpc.inference.options import SegmentOptions
from sfpc.inference.pipeline import ModelRegistry, RuntimeConfig, SegmentationService
from tests.support.io import dciodvfy_errors, fresh_uids, series_datasets, series_files, to_bytes

pytestmark = pytest.mark.data


class Stages:
    """The pipeline's stage observer: which stages ran."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, stage: str, seconds: float) -> None:
        self.seen.append(stage)


@pytest.fixture(scope="module")
def stages() -> Stages:
    return Stages()


@pytest.fixture(scope="module")
def service(stages: Stages) -> SegmentationService:
    series_files()  # skips when the shared data is absent
    registry = ModelRegistry(RuntimeConfig(model_dirs=[DEFAULT_MODEL_DIR],
                                           onnx_intra_op_threads=1))
    return SegmentationService(registry, registry.settings, on_stage=stages)


def _blank(keywords: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """The series with valid UIDs, then ``keywords`` emptied in every data set (file meta
    untouched, so MediaStorageSOPInstanceUID still names each instance)."""
    files = []
    for i, ds in enumerate(fresh_uids(series_datasets())):
        for keyword in keywords:
            setattr(ds, keyword, "")
        files.append((f"img{i:03d}.dcm", to_bytes(ds)))
    return files


def test_sop_instance_uid_from_the_file_meta(service: SegmentationService, tmp_path) -> None:
    files = _blank(("SOPInstanceUID",))
    metas = [pydicom.dcmread(io.BytesIO(data)) for _, data in files]
    assert all(ds.SOPInstanceUID == "" for ds in metas)
    expected = {str(ds.file_meta.MediaStorageSOPInstanceUID) for ds in metas}
    study = {str(ds.StudyInstanceUID) for ds in metas}
    assert len(expected) == len(files) and len(study) == 1

    result = service.segment_upload(files, SegmentOptions(outputs=["seg_dicom"]))
    seg_bytes = result.get("segmentation.dcm").read()
    seg = pydicom.dcmread(io.BytesIO(seg_bytes))
    assert seg.StudyInstanceUID in study
    (series,) = seg.ReferencedSeriesSequence
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedInstanceSequence} == expected
    assert dciodvfy_errors(seg_bytes, tmp_path) == []


def test_series_without_study_and_series_uid_is_refused_before_inference(
        service: SegmentationService, stages: Stages) -> None:
    files = _blank(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    # The same series decodes and segments as NIfTI (what the refusal suggests instead).
    nifti = service.segment_upload(files, SegmentOptions(outputs=["mask_nifti"]))
    assert nifti.get("mask.nii.gz") is not None

    stages.seen.clear()
    started = time.perf_counter()
    with pytest.raises(UploadError) as caught:
        service.segment_upload(files, SegmentOptions(outputs=["mask_nifti", "seg_dicom"],
                                                     uncertainty=True))
    seconds = time.perf_counter() - started
    error = caught.value
    assert (error.status, error.code) == (422, "dicom_source_incomplete")
    assert "StudyInstanceUID" in error.message and "SeriesInstanceUID" in error.message
    assert "seg_dicom" in error.message
    # The SOP Instance UIDs came from the file meta: not named as missing.
    assert "SOPInstanceUID" not in error.message
    assert stages.seen == ["decode"], stages.seen  # no preprocess, inference or encode
    assert seconds < 1.0, f"refused after {seconds:.2f} s"


def test_missing_frame_of_reference_is_named(service: SegmentationService,
                                             stages: Stages) -> None:
    files = _blank(("FrameOfReferenceUID",))
    stages.seen.clear()
    with pytest.raises(UploadError) as caught:
        service.segment_upload(files, SegmentOptions(outputs=["seg_dicom"]))
    assert caught.value.code == "dicom_source_incomplete"
    assert "FrameOfReferenceUID (all of 20 data sets)" in caught.value.message
    assert "inference" not in stages.seen
