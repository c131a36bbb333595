"""Results as DICOM objects every PACS stores and most viewers show, beside the SEG and the
parametric map of :mod:`sfpc.io.dicom_seg`:

- :func:`write_measurement_report`: a Comprehensive 3D SR holding a TID 1500 Measurement Report
  (highdicom.sr): one measurement group per structure (volume, mean and boundary uncertainty;
  the group references its segment in the SEG when one was written), one group for the whole
  case (boundary uncertainty, the review threshold and the review verdict), the model's name and
  version as the algorithm of every group and as the observing device;
- :func:`write_secondary_capture`: the PNG overlay as a Secondary Capture image (highdicom.sc)
  in the source's study, for viewers that render nothing else;
- :func:`write_rtstruct`: the mask as an RT Structure Set (contours along the pixel edges of each
  structure, slice by slice), for radiotherapy planning systems. highdicom has no RTSTRUCT
  writer; this one is pydicom, checked by dciodvfy in the tests.

Every object joins the source's study and patient, and gets its own new series. Concepts without
a standard code (the uncertainty measures, the review recommendation) use the private coding
scheme ``99SFPC`` (PS3.16 8.2: local schemes start with "99").
"""

from __future__ import annotations

import datetime
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from sfpc.errors import UNPROCESSABLE, UploadError
from sfpc.io.dicom_seg import (
    _build,
    _series_number,
    _source_datasets,
    _to_bytes,
    property_codes,
)
from sfpc.io.volume import Volume

SCHEME = "99SFPC"
MEAN_ENTROPY = Code("MEAN_ENTROPY", SCHEME, "Mean normalised predictive entropy")
BOUNDARY_ENTROPY = Code("BOUNDARY_ENTROPY", SCHEME,
                        "Boundary mean normalised predictive entropy")
REVIEW_THRESHOLD = Code("REVIEW_THRESHOLD", SCHEME, "Review threshold")
REVIEW_RECOMMENDED = Code("REVIEW_RECOMMENDED", SCHEME, "Review recommended")
MILLILITER = Code("ml", "UCUM", "milliliter")
UNITLESS = codes.UCUM.NoUnits
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
CASE_IDENTIFIER = "case"

SR_OFFSET, SC_OFFSET, RTSTRUCT_OFFSET = 3000, 4000, 5000


def _device_uid(name: str, version: str) -> str:
    # The same model is the same observing device in every report.
    return str(pydicom.uid.generate_uid(entropy_srcs=["sfpc-model", name, version]))


def write_measurement_report(
    report: Mapping[str, Any],
    volume: Volume,
    *,
    model_name: str,
    model_version: str,
    seg: Dataset | None = None,
    manufacturer: str = "SFPC Seg",
    software_versions: str = "0.1.0",
    series_description: str = "SFPC measurements",
    series_number: int | None = None,
) -> bytes:
    """A Comprehensive 3D SR (TID 1500) of the segmentation ``report`` (the pipeline's
    ``report.json`` dict: ``classes``, ``case``, ``quality``) on ``volume``'s source series;
    with ``seg`` (the SEG written from the same mask) each structure's group references its
    segment. Values the report has as null (an absent structure's mean uncertainty) are left
    out rather than written as a number."""
    datasets = _source_datasets(volume)
    algorithm = hd.sr.AlgorithmIdentification(name=model_name[:64], version=model_version[:64])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_device_uid(model_name, model_version), name=model_name[:64],
        manufacturer_name=manufacturer, model_name=f"{model_name} {model_version}"[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    source_series = str(datasets[0].SeriesInstanceUID)
    groups: list[Any] = []
    for name, entry in report.get("classes", {}).items():
        label = int(entry.get("label", 0))
        if label == 0:
            continue  # the background is no structure
        category, kind = property_codes(str(name))
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume,
                                          value=float(entry.get("volume_ml") or 0.0),
                                          unit=MILLILITER, algorithm_id=algorithm)]
        for code, key in ((MEAN_ENTROPY, "mean_entropy"),
                          (BOUNDARY_ENTROPY, "boundary_mean_entropy")):
            value = entry.get(key)
            if value is not None and math.isfinite(float(value)):
                measurements.append(hd.sr.Measurement(name=code, value=float(value),
                                                      unit=UNITLESS, algorithm_id=algorithm))
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=str(name)[:64])
        if seg is not None:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=label,
                    source_series=hd.sr.SourceSeriesForSegmentation(source_series)),
                finding_type=kind, finding_category=category, algorithm_id=algorithm,
                measurements=measurements))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, finding_type=kind, finding_category=category,
                algorithm_id=algorithm, measurements=measurements))
    groups.append(_case_group(report, algorithm))
    content = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    evidence = list(datasets) + ([seg] if seg is not None else [])
    sr = _build(lambda: hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content[0],
        series_instance_uid=hd.UID(),
        series_number=_series_number(datasets, series_number, offset=SR_OFFSET),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,  # an algorithm's result, verified by nobody yet
        software_versions=software_versions,
    ))
    sr.SeriesDescription = series_description[:64]
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return _to_bytes(sr)


def _private_scheme() -> Dataset:
    """SOP Common's identification of the local coding scheme the report's own concepts use."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "SFPC Seg uncertainty and review concepts"
    item.CodingSchemeResponsibleOrganization = "SFPC Seg"
    return item


def _case_group(report: Mapping[str, Any], algorithm: Any) -> Any:
    """The whole case: boundary uncertainty, the review threshold and verdict (when the model
    was calibrated and the run had uncertainty)."""
    measurements = []
    evaluations = []
    case = report.get("case") or {}
    quality = report.get("quality") or {}
    boundary = quality.get("boundary_uncertainty", case.get("boundary_mean_entropy"))
    if boundary is not None and math.isfinite(float(boundary)):
        measurements.append(hd.sr.Measurement(name=BOUNDARY_ENTROPY, value=float(boundary),
                                              unit=UNITLESS, algorithm_id=algorithm))
    if quality.get("threshold") is not None:
        measurements.append(hd.sr.Measurement(name=REVIEW_THRESHOLD,
                                              value=float(quality["threshold"]),
                                              unit=UNITLESS, algorithm_id=algorithm))
    if quality.get("review_recommended") is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=REVIEW_RECOMMENDED,
            value=codes.SCT.Yes if quality["review_recommended"] else codes.SCT.No))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=CASE_IDENTIFIER),
        algorithm_id=algorithm, measurements=measurements or None,
        qualitative_evaluations=evaluations or None)


# ----------------------------------------------------------------------------------------------
# Secondary capture
# ----------------------------------------------------------------------------------------------


def write_secondary_capture(
    png: bytes,
    volume: Volume,
    *,
    manufacturer: str = "SFPC Seg",
    software_versions: str = "0.1.0",
    series_description: str = "SFPC overlay",
    series_number: int | None = None,
) -> bytes:
    """The overlay PNG (RGB) as a Secondary Capture image in the source's study. Its tiles are
    axial slices in the radiological view (patient's right on the left, anterior at the top),
    hence PatientOrientation L\\P; the text on it names the model and the structures only."""
    from PIL import Image

    datasets = _source_datasets(volume)
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    sc = _build(lambda: hd.sc.SCImage.from_ref_dataset(
        ref_dataset=datasets[0],
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=hd.UID(),
        series_number=_series_number(datasets, series_number, offset=SC_OFFSET),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    ))
    sc.SeriesDescription = series_description[:64]
    sc.SoftwareVersions = software_versions
    sc.BurnedInAnnotation = "NO"  # model, structure names and volumes; no patient identity
    sc.ConversionType = "WSD"  # workstation: rendered by software from the images
    # General Series' Laterality (type 2C): the source's, empty (unknown) when it does not say.
    sc.Laterality = datasets[0].get("Laterality", "")
    return _to_bytes(sc)


# ----------------------------------------------------------------------------------------------
# RT Structure Set
# ----------------------------------------------------------------------------------------------

ROI_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230))
# Copied from the source: patient and study (so the structure set joins the study), and the
# equipment's absence of identity.
_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                  "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
                  "StudyID", "AccessionNumber")


def write_rtstruct(
    mask: np.ndarray,
    volume: Volume,
    class_names: Sequence[str],
    *,
    model_name: str = "SFPC",
    model_version: str = "0.1.0",
    manufacturer: str = "SFPC Seg",
    software_versions: str = "0.1.0",
    series_description: str = "SFPC structures",
    series_number: int | None = None,
) -> bytes:
    """An RT Structure Set of the label map ``mask`` ``(X, Y, Z)`` on ``volume``'s source
    series: one ROI per foreground class (absent ones without contours), each slice's regions as
    CLOSED_PLANAR contours traced along pixel edges, so a planning system's even-odd filling of
    the contours gives back exactly the mask's pixels (holes are contours inside contours)."""
    datasets = _source_datasets(volume)
    if any("NumberOfFrames" in ds for ds in datasets):
        raise UploadError(UNPROCESSABLE, "seg_unsupported_source",
                          "an RT Structure Set references single-frame images; this series is "
                          "multi-frame: ask for seg_dicom instead")
    mask = np.asarray(mask)
    if mask.shape != volume.spatial_shape:
        raise ValueError(f"mask shape {mask.shape} != volume shape {volume.spatial_shape}")
    names = [str(n) for n in class_names]
    source = datasets[0]
    ds = Dataset()
    for keyword in _PATIENT_STUDY:
        ds.__setattr__(keyword, source.get(keyword, ""))
    uid = str(hd.UID())
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = uid
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = hd.UID()
    ds.SeriesNumber = _series_number(datasets, series_number, offset=RTSTRUCT_OFFSET)
    ds.SeriesDescription = series_description[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = f"{model_name} {model_version}"[:64]
    ds.SoftwareVersions = software_versions
    ds.OperatorsName = ""
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 100")
    stamp = datetime.datetime.now()
    ds.StructureSetLabel = "SFPC"
    ds.StructureSetName = model_name[:64]
    ds.StructureSetDate = ds.InstanceCreationDate = stamp.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = stamp.strftime("%H%M%S")
    ds.ApprovalStatus = "UNAPPROVED"

    frame_of_reference = str(source.FrameOfReferenceUID)
    contour_images = []
    for item in datasets:
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.SOPClassUID
        ref.ReferencedSOPInstanceUID = item.SOPInstanceUID
        contour_images.append(ref)
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = source.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence(contour_images)
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    study_ref.ReferencedSOPInstanceUID = source.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_of_reference
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])
    # The Frame of Reference module (type 1 UID, type 2 indicator) is part of the IOD.
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")

    rois, observations, contours = [], [], []
    by_uid = {str(item.SOPInstanceUID): item for item in datasets}
    for number in range(1, len(names)):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_of_reference
        roi.ROIName = names[number][:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{model_name} {model_version}"[:64]
        rois.append(roi)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        observations.append(obs)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(ROI_COLOURS[(number - 1) % len(ROI_COLOURS)])
        items = []
        for k, frame in enumerate(volume.source_frames):
            plane = mask[:, :, k] == number
            if not plane.any():
                continue
            image = by_uid[frame.sop_instance_uid]
            for loop in _pixel_edge_loops(plane):
                contour = Dataset()
                image_ref = Dataset()
                image_ref.ReferencedSOPClassUID = image.SOPClassUID
                image_ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
                contour.ContourImageSequence = DicomSequence([image_ref])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                points = _patient_points(loop, image)
                contour.NumberOfContourPoints = len(points)
                contour.ContourData = [_ds_number(v) for v in points.reshape(-1)]
                items.append(contour)
        if items:
            roi_contour.ContourSequence = DicomSequence(items)
        contours.append(roi_contour)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ROIContourSequence = DicomSequence(contours)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID(RTSTRUCT_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return _to_bytes(ds)


def _ds_number(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def _patient_points(loop: np.ndarray, image: Dataset) -> np.ndarray:
    """Pixel-edge corners ``(x, y)`` (in pixel units, the centre of pixel (0, 0) at (0, 0)) as
    patient coordinates (LPS mm) on the image plane, ``(N, 3)``."""
    position = np.asarray([float(v) for v in image.ImagePositionPatient])
    cosines = np.asarray([float(v) for v in image.ImageOrientationPatient])
    row_dir, col_dir = cosines[:3], cosines[3:]
    spacing_rows, spacing_cols = (float(v) for v in image.PixelSpacing)
    x, y = loop[:, 0], loop[:, 1]
    return (position[None] + x[:, None] * spacing_cols * row_dir[None]
            + y[:, None] * spacing_rows * col_dir[None])


def _pixel_edge_loops(plane: np.ndarray) -> list[np.ndarray]:
    """Closed loops along the edges between pixels in and out of ``plane`` (indexed ``[x, y]``,
    x the column and y the row): every boundary, outer or hole, is one loop of corner points,
    collinear points dropped. Corners sit half a pixel from pixel centres."""
    inside = np.pad(plane.astype(bool), 1)
    # Directed edges with the inside on the left walking along them, as (start, end) corners;
    # corner (i, j) is the point (i - 1.5, j - 1.5) in pixel units of the unpadded plane.
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(a: tuple[int, int], b: tuple[int, int]) -> None:
        edges.setdefault(a, []).append(b)

    xs, ys = np.nonzero(inside)
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        if not inside[x, y - 1]:  # edge at lower y
            add((x + 1, y), (x, y))
        if not inside[x, y + 1]:
            add((x, y + 1), (x + 1, y + 1))
        if not inside[x - 1, y]:
            add((x, y), (x, y + 1))
        if not inside[x + 1, y]:
            add((x + 1, y + 1), (x + 1, y))
    loops = []
    while edges:
        start = next(iter(edges))
        loop = [start]
        current = start
        previous_dir: tuple[int, int] | None = None
        while True:
            options = edges[current]
            # At a corner shared by two diagonal pixels, turn so that each loop stays simple.
            nxt = options[0]
            if len(options) > 1 and previous_dir is not None:
                right = (previous_dir[1], -previous_dir[0])
                for candidate in options:
                    if (candidate[0] - current[0], candidate[1] - current[1]) == right:
                        nxt = candidate
                        break
            options.remove(nxt)
            if not options:
                del edges[current]
            previous_dir = (nxt[0] - current[0], nxt[1] - current[1])
            current = nxt
            if current == start:
                break
            loop.append(current)
        points = np.asarray(_drop_collinear(loop), dtype=np.float64) - 1.5
        loops.append(points)
    return loops


def _drop_collinear(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    n = len(loop)
    for i in range(n):
        a, b, c = loop[i - 1], loop[i], loop[(i + 1) % n]
        if (b[0] - a[0]) * (c[1] - b[1]) != (b[1] - a[1]) * (c[0] - b[0]):
            out.append(b)
    return out or loop


# ----------------------------------------------------------------------------------------------
# The pipeline's encoders: a model's metadata (name, version) in, the file's bytes out
# ----------------------------------------------------------------------------------------------


def _software() -> str:
    import sfpc

    return str(sfpc.__version__)


def parametric_map_bytes(entropy: np.ndarray, volume: Volume, metadata: Any) -> bytes:
    """The normalised predictive entropy as a float Parametric Map on the source frames, with
    its real world value mapping (unitless, 0 = certain, 1 = uniform over the classes)."""
    from sfpc.io.dicom_seg import write_parametric_map

    return write_parametric_map(
        np.clip(np.asarray(entropy, dtype=np.float32), 0.0, 1.0), volume, label="ENTROPY",
        explanation="Predictive entropy H(p_bar) / ln(C), 0 = certain, 1 = uniform",
        manufacturer_model_name=f"SFPC {metadata.name}"[:64], software_versions=_software(),
        series_description="SFPC uncertainty (normalised entropy)")


def measurement_report_bytes(report: Mapping[str, Any], volume: Volume, metadata: Any,
                             seg: bytes | None = None) -> bytes:
    """:func:`write_measurement_report` of the pipeline's report; ``seg``: the SEG file written
    from the same mask, whose segments the structures' groups then reference."""
    seg_dataset = None
    if seg is not None:
        seg_dataset = pydicom.dcmread(io.BytesIO(seg), stop_before_pixels=True)
    return write_measurement_report(report, volume, model_name=str(metadata.name),
                                    model_version=str(metadata.version), seg=seg_dataset,
                                    software_versions=_software())


def secondary_capture_bytes(png: bytes, volume: Volume, metadata: Any) -> bytes:
    return write_secondary_capture(png, volume, software_versions=_software(),
                                   series_description=f"SFPC overlay {metadata.name}"[:64])


def rtstruct_bytes(mask: np.ndarray, volume: Volume, class_names: Sequence[str],
                   metadata: Any) -> bytes:
    return write_rtstruct(mask, volume, class_names, model_name=str(metadata.name),
                          model_version=str(metadata.version), software_versions=_software())
