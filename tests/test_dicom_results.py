"""The gateway's DICOM results beside the SEG: the entropy as a Parametric Map, a TID 1500
measurement report (Comprehensive 3D SR), the overlay as a Secondary Capture and the mask as an
RT Structure Set, produced by the pipeline (what the gateway, jobs and ``sfpc predict`` run) with
the default model on the real MR series.

Oracles: dciodvfy (no "Error" line), highdicom's SR reader against the numbers of report.json,
the engine's own arrays on the source frames (Parametric Map, RTSTRUCT), Pillow's decoding of the
PNG (Secondary Capture), an even-odd ray-casting fill of the RTSTRUCT contours written out in
this file, and pydicom for the references to the source.
"""

from __future__ import annotations

import io
import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from sfpc.errors import OptionError
from sfpc.inference.contract import DEFAULT_MODEL_DIR
from sfpc.inference.options import SegmentOptions
from sfpc.inference.pipeline import ArtefactSet, ModelRegistry, RuntimeConfig, SegmentationService
from sfpc.io import Volume
from tests.support.io import dciodvfy_errors, fresh_uids, series_datasets, series_files, to_bytes

pytestmark = pytest.mark.data
DICOM_FILES = ["segmentation.dcm", "uncertainty.dcm", "measurements.dcm", "overlay.dcm",
               "rtstruct.dcm"]
OUTPUTS = ["seg_dicom", "pmap_dicom", "sr_dicom", "sc_dicom", "rtstruct_dicom", "overlay_png",
           "report_json"]


@pytest.fixture(scope="module")
def service() -> SegmentationService:
    series_files()  # skips without the shared data
    registry = ModelRegistry(RuntimeConfig(model_dirs=[DEFAULT_MODEL_DIR],
                                           onnx_intra_op_threads=1))
    return SegmentationService(registry, registry.settings)


@pytest.fixture(scope="module")
def run(service: SegmentationService) -> tuple[Volume, ArtefactSet]:
    files = [(f"f{i:02d}.dcm", to_bytes(ds)) for i, ds in
             enumerate(fresh_uids(series_datasets()))]
    volume, _ = service.decode(files)
    return volume, service.run(volume, SegmentOptions(outputs=OUTPUTS))


def _read(run: tuple[Volume, ArtefactSet], name: str) -> pydicom.Dataset:
    artefact = run[1].get(name)
    assert artefact is not None, f"{name} not produced: {run[1].filenames}"
    return pydicom.dcmread(io.BytesIO(artefact.read()))


def test_every_object_is_valid_dicom_in_the_source_study(run, tmp_path) -> None:
    volume, artefacts = run
    assert set(DICOM_FILES) <= set(artefacts.filenames)
    study = volume.series.study_instance_uid
    series = set()
    for name in DICOM_FILES:
        data = artefacts.get(name).read()
        assert dciodvfy_errors(data, tmp_path) == [], name
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.StudyInstanceUID == study, name
        assert ds.PatientID == volume.dicom_datasets[0].PatientID, name
        series.add(ds.SeriesInstanceUID)
    assert len(series) == len(DICOM_FILES)  # each a new series of its own
    assert volume.series.series_instance_uid not in series
    report = json.loads(artefacts.get("report.json").read())
    assert report["uncertainty"] is True  # the SR and the overlay turned it on


def test_parametric_map_holds_the_entropy_on_the_source_frames(run) -> None:
    volume, artefacts = run
    ds = _read(run, "uncertainty.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "ENTROPY"
    assert float(mapping.RealWorldValueSlope) == 1.0
    assert float(mapping.RealWorldValueIntercept) == 0.0
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    expected = np.clip(artefacts.result.entropy, 0, 1).astype(np.float32)
    uids = [ref.sop_instance_uid for ref in volume.source_frames]
    frames = ds.pixel_array
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_array_equal(frames[k], expected[:, :, uids.index(source)].T)


def test_measurement_report_holds_the_reports_numbers(run) -> None:
    volume, artefacts = run
    report = json.loads(artefacts.get("report.json").read())
    seg = _read(run, "segmentation.dcm")
    sr = hd.sr.srread(io.BytesIO(artefacts.get("measurements.dcm").read()))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    content = sr.content
    groups = {g.tracking_identifier: g
              for g in content.get_volumetric_roi_measurement_groups()}
    structures = {n: e for n, e in report["classes"].items() if e["label"] > 0}
    assert set(groups) == set(structures)
    for name, entry in structures.items():
        group = groups[name]
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment.referenced_segment_numbers == [entry["label"]]
        values = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
        assert values["Volume"] == (pytest.approx(entry["volume_ml"], rel=1e-12), "ml")
        for meaning, key in (("Mean normalised predictive entropy", "mean_entropy"),
                             ("Boundary mean normalised predictive entropy",
                              "boundary_mean_entropy")):
            if entry[key] is None:
                assert meaning not in values  # an absent structure has no mean
            else:
                assert values[meaning] == (pytest.approx(entry[key], rel=1e-12), "1")
    (case,) = content.get_image_measurement_groups()
    assert case.tracking_identifier == "case"
    values = {m.name.meaning: m.value for m in case.get_measurements()}
    quality = report["quality"]
    assert values["Review threshold"] == pytest.approx(quality["threshold"], rel=1e-12)
    assert values["Boundary mean normalised predictive entropy"] == pytest.approx(
        quality["boundary_uncertainty"], rel=1e-12)
    (flag,) = case.get_qualitative_evaluations()
    assert flag.name.meaning == "Review recommended"
    assert flag.value.meaning == ("Yes" if quality["review_recommended"] else "No")
    # The model as the algorithm of the measurements and as the observing device.
    texts = _text_items(pydicom.dcmread(io.BytesIO(artefacts.get("measurements.dcm").read())))
    assert ("Algorithm Name", report["model"]["name"]) in texts
    assert ("Algorithm Version", report["model"]["version"]) in texts
    assert ("Device Observer Name", report["model"]["name"]) in texts
    # Evidence: the source series and the SEG.
    evidence = {item.SeriesInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for item in study.ReferencedSeriesSequence}
    assert evidence == {volume.series.series_instance_uid, seg.SeriesInstanceUID}


def _text_items(ds: pydicom.Dataset) -> set[tuple[str, str]]:
    found = set()

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") in ("TEXT", "UIDREF") and "ConceptNameCodeSequence" in item:
                value = item.get("TextValue") or item.get("UID")
                found.add((item.ConceptNameCodeSequence[0].CodeMeaning, str(value)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return found


def test_secondary_capture_holds_the_overlay_pixels(run) -> None:
    volume, artefacts = run
    ds = _read(run, "overlay.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    with Image.open(io.BytesIO(artefacts.get("overlay.png").read())) as png:
        expected = np.asarray(png.convert("RGB"))
    np.testing.assert_array_equal(ds.pixel_array, expected)


def _even_odd_fill(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixel centres (x, y) inside an odd number of the polygons (ray casting along +x)."""
    xs, ys = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    inside = np.zeros(shape, bool)
    for poly in polygons:
        crossing = np.zeros(shape, bool)
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for a, b, c, d in zip(x0, y0, x1, y1, strict=True):
            straddles = (b > ys) != (d > ys)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_cross = a + (ys - b) * (c - a) / (d - b)
            crossing ^= straddles & (xs < x_cross)
        inside ^= crossing
    return inside


def test_rtstruct_contours_fill_back_to_the_mask(run) -> None:
    volume, artefacts = run
    ds = _read(run, "rtstruct.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    names = artefacts.result.class_names
    assert [r.ROIName for r in ds.StructureSetROISequence] == list(names[1:])
    referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    series = referenced.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == volume.series.series_instance_uid
    by_uid = {d.SOPInstanceUID: d for d in volume.dicom_datasets}
    slice_of = {ref.sop_instance_uid: k for k, ref in enumerate(volume.source_frames)}
    mask = artefacts.result.mask
    checked = 0
    for roi in ds.ROIContourSequence:
        label = int(roi.ReferencedROINumber)
        polygons: dict[int, list[np.ndarray]] = {}
        for contour in roi.get("ContourSequence", []):
            uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            image = by_uid[uid]
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            # Patient coordinates back to pixel units (x = column, y = row) on that image.
            cosines = np.asarray([float(v) for v in image.ImageOrientationPatient])
            spacing = [float(v) for v in image.PixelSpacing]
            offset = points - np.asarray([float(v) for v in image.ImagePositionPatient])
            x = offset @ cosines[:3] / spacing[1]
            y = offset @ cosines[3:] / spacing[0]
            normal = np.cross(cosines[:3], cosines[3:])
            np.testing.assert_allclose(offset @ normal, 0, atol=1e-3)  # on the image plane
            polygons.setdefault(slice_of[uid], []).append(np.stack([x, y], axis=1))
        for k in range(mask.shape[2]):
            expected = mask[:, :, k] == label
            filled = _even_odd_fill(polygons.get(k, []), expected.shape)
            np.testing.assert_array_equal(filled, expected, err_msg=f"{names[label]} slice {k}")
            checked += int(expected.sum())
    assert checked == int((mask > 0).sum()) > 0


def test_rtstruct_tracing_of_holes_and_touching_corners(run) -> None:
    """A ring (a hole), two pixels touching at a corner only, and a lone pixel, on one slice of
    the real series: the contours fill back to exactly these pixels."""
    from sfpc.io.dicom_results import write_rtstruct

    volume, _ = run
    mask = np.zeros(volume.spatial_shape, np.uint8)
    mask[10:20, 10:20, 4] = 1
    mask[13:16, 13:16, 4] = 0  # the hole
    mask[30, 30, 4] = mask[31, 31, 4] = 2  # diagonal neighbours
    mask[50, 60, 4] = 2
    ds = pydicom.dcmread(io.BytesIO(write_rtstruct(mask, volume, ["bg", "ring", "dots"])))
    image = volume.dicom_datasets[volume.source_frames[4].dataset_index]
    cosines = np.asarray([float(v) for v in image.ImageOrientationPatient])
    spacing = [float(v) for v in image.PixelSpacing]
    for roi in ds.ROIContourSequence:
        polygons = []
        for contour in roi.ContourSequence:
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            offset = points - np.asarray([float(v) for v in image.ImagePositionPatient])
            polygons.append(np.stack([offset @ cosines[:3] / spacing[1],
                                      offset @ cosines[3:] / spacing[0]], axis=1))
        label = int(roi.ReferencedROINumber)
        np.testing.assert_array_equal(_even_odd_fill(polygons, mask.shape[:2]),
                                      mask[:, :, 4] == label)
    counts = [len(roi.ContourSequence) for roi in ds.ROIContourSequence]
    assert counts == [2, 3]  # ring: outer + hole; dots: the lone pixel and the diagonal pair


def test_dicom_objects_need_a_dicom_upload(service: SegmentationService) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((16, 16, 4), np.float32), np.eye(4))
    with pytest.raises(OptionError) as caught:
        service.segment_upload([("x.nii", image.to_bytes())],
                               SegmentOptions(outputs=["mask_nifti", "sr_dicom", "sc_dicom"]))
    assert caught.value.code == "seg_needs_dicom"
    assert "sr_dicom, sc_dicom" in caught.value.message
