"""Masks and uncertainty maps back to DICOM: a Segmentation (SEG) and a Parametric Map that
reference the uploaded series, so a PACS viewer overlays them on the source images.

Both are built with highdicom from the source data sets the decoder kept
(``Volume.dicom_datasets``) and its frame mapping (``Volume.source_frames``): slice ``k`` of an
``(X, Y, Z)`` array is source frame ``source_frames[k]``, pixel ``(x, y)`` its column ``x`` and
row ``y``. Frames therefore line up with the source frames one to one, nothing is resampled.

Segments: one per foreground class of the model, *all* of them, numbered by label value
(``class_names[i]`` names label ``i``; index 0 is the background and gets no segment), so the same
model gives the same segment numbers on every study and an absent organ is an empty segment rather
than a renumbering.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from sfpc.errors import UNPROCESSABLE, UploadError
from sfpc.io.volume import Volume

T = TypeVar("T")
_ORGAN = codes.SCT.Organ
_ANATOMY = codes.SCT.AnatomicalStructure
_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure
_TISSUE = codes.SCT.Tissue
# Segmented property (category, type) for the class names our models use; keys are normalised
# (lower case, single spaces). Unknown names fall back to the generic Tissue/Tissue pair.
PROPERTY_CODES: dict[str, tuple[Code, Code]] = {
    "spleen": (_ORGAN, codes.SCT.Spleen),
    "liver": (_ORGAN, codes.SCT.Liver),
    "stomach": (_ORGAN, codes.SCT.Stomach),
    "pancreas": (_ORGAN, codes.SCT.Pancreas),
    "gallbladder": (_ORGAN, codes.SCT.Gallbladder),
    "kidney": (_ORGAN, codes.SCT.Kidney),
    "kidney left": (_ORGAN, codes.SCT.Kidney),
    "kidney right": (_ORGAN, codes.SCT.Kidney),
    "left kidney": (_ORGAN, codes.SCT.Kidney),
    "right kidney": (_ORGAN, codes.SCT.Kidney),
    "heart": (_ORGAN, codes.SCT.Heart),
    "brain": (_ORGAN, codes.SCT.Brain),
    "lung": (_ORGAN, codes.SCT.Lung),
    "prostate": (_ORGAN, codes.SCT.Prostate),
    "bladder": (_ORGAN, codes.SCT.Bladder),
    "esophagus": (_ORGAN, codes.SCT.Esophagus),
    "duodenum": (_ORGAN, codes.SCT.Duodenum),
    "colon": (_ORGAN, codes.SCT.Colon),
    "aorta": (_ANATOMY, codes.SCT.Aorta),
    "rv": (_ANATOMY, codes.SCT.RightVentricle),
    "right ventricle": (_ANATOMY, codes.SCT.RightVentricle),
    "lv": (_ANATOMY, codes.SCT.LeftVentricle),
    "left ventricle": (_ANATOMY, codes.SCT.LeftVentricle),
    "myo": (_ANATOMY, codes.SCT.LeftVentricleMyocardium),
    "myocardium": (_ANATOMY, codes.SCT.LeftVentricleMyocardium),
    "tumour": (_ABNORMAL, codes.SCT.Neoplasm),
    "tumor": (_ABNORMAL, codes.SCT.Neoplasm),
    "whole tumour": (_ABNORMAL, codes.SCT.Neoplasm),
    "whole tumor": (_ABNORMAL, codes.SCT.Neoplasm),
    "neoplasm": (_ABNORMAL, codes.SCT.Neoplasm),
    "lesion": (_ABNORMAL, codes.SCT.Lesion),
    "nodule": (_ABNORMAL, codes.SCT.Nodule),
    "mass": (_ABNORMAL, codes.SCT.Mass),
    "edema": (_ABNORMAL, codes.SCT.Edema),
    "oedema": (_ABNORMAL, codes.SCT.Edema),
    "necrosis": (_ABNORMAL, codes.SCT.Necrosis),
}


def property_codes(class_name: str) -> tuple[Code, Code]:
    """(SegmentedPropertyCategory, SegmentedPropertyType) for a class name; Tissue if unknown."""
    key = re.sub(r"[\s_\-]+", " ", class_name.strip().lower())
    return PROPERTY_CODES.get(key, (_TISSUE, _TISSUE))


def write_seg(
    mask: np.ndarray,
    volume: Volume,
    class_names: Sequence[str],
    *,
    algorithm_name: str = "SFPC",
    algorithm_version: str = "0.1.0",
    manufacturer: str = "SFPC Seg",
    manufacturer_model_name: str = "SFPC Seg",
    software_versions: str = "0.1.0",
    device_serial_number: str = "0",
    series_description: str = "SFPC segmentation",
    series_number: int | None = None,
    fractional: bool = False,
) -> bytes:
    """A DICOM SEG (BINARY, or FRACTIONAL probabilities) of ``mask`` on ``volume``'s source series.

    ``mask``: uint8 label map ``(X, Y, Z)`` with values ``0..len(class_names)-1``; with
    ``fractional=True``, float probabilities in [0, 1], ``(K, X, Y, Z)`` for the K foreground
    classes (or ``(X, Y, Z)`` when there is one). Returns the Part 10 file's bytes.
    """
    datasets = _source_datasets(volume)
    names = [str(n) for n in class_names]
    if len(names) < 2:
        raise ValueError("class_names must name the background and at least one class")
    n_segments = len(names) - 1
    frames = _seg_frames(np.asarray(mask), volume, n_segments, fractional)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version,
    )
    descriptions = []
    for number in range(1, n_segments + 1):
        category, kind = property_codes(names[number])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names[number][:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        ))
    seg = _build(lambda: hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=(hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
                           else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=_series_number(datasets, series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        content_label="SEGMENTATION",
        content_description=series_description[:64],
        # Frames without a voxel of their segment are left out (a CT with a few small organs
        # would otherwise carry hundreds of blank frames per segment); an absent class stays
        # described as a segment with no frames, which readers return as all zeros.
        omit_empty_frames=True,
        # Read only for FRACTIONAL (probabilities scaled to 0..255); BINARY ignores them.
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
    ))
    seg.SeriesDescription = series_description[:64]
    _patient_orientation(seg, datasets)
    return _to_bytes(seg)


def write_parametric_map(
    values: np.ndarray,
    volume: Volume,
    *,
    label: str = "UNCERTAINTY",
    explanation: str = "Predictive entropy normalised by ln(C)",
    value_range: tuple[float, float] = (0.0, 1.0),
    manufacturer: str = "SFPC Seg",
    manufacturer_model_name: str = "SFPC Seg",
    software_versions: str = "0.1.0",
    device_serial_number: str = "0",
    series_description: str = "SFPC uncertainty",
    series_number: int | None = None,
) -> bytes:
    """A DICOM Parametric Map (float32 voxels, unitless) of ``values`` ``(X, Y, Z)`` on
    ``volume``'s source series, e.g. the voxel-wise uncertainty map. Returns the file's bytes."""
    datasets = _source_datasets(volume)
    values = np.asarray(values, dtype=np.float32)
    if values.shape != volume.spatial_shape:
        raise ValueError(f"map shape {values.shape} != volume shape {volume.spatial_shape}")
    if not np.isfinite(values).all():
        raise ValueError("the parametric map holds NaN or Inf values")
    frames = _to_source_order(values, volume, fill=0.0)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label[:16],
        lut_explanation=explanation[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(float(value_range[0]), float(value_range[1])),
        slope=1.0,
        intercept=0.0,
    )
    low, high = float(value_range[0]), float(value_range[1])
    pm = _build(lambda: hd.pm.ParametricMap(
        source_images=datasets,
        pixel_array=frames,
        series_instance_uid=hd.UID(),
        series_number=_series_number(datasets, series_number, offset=2000),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(
            window_center=(low + high) / 2, window_width=max(high - low, 1e-6),
        )],
        content_label=label[:16].upper().replace(" ", "_"),
        content_description=series_description[:64],
    ))
    pm.SeriesDescription = series_description[:64]
    # General Series' Laterality is type 2C; the map's laterality is the source's, and empty
    # (unknown) when the source does not say, rather than absent.
    pm.Laterality = datasets[0].get("Laterality", "")
    return _to_bytes(pm)


# ----------------------------------------------------------------------------------------------
# What a derived object needs from its source
# ----------------------------------------------------------------------------------------------

# Attributes of the source every derived object (SEG, parametric map, SR, secondary capture,
# RTSTRUCT) copies or references: it joins the source's study, points at its series and at
# each source instance (by class and instance UID), and places frames in its frame of reference.
# None is generated when missing: a made-up UID references nothing a PACS holds, so the object
# would land in a study of its own, detached from the images (docs/hospital-pipeline.md).
REFERENCED_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                         "SOPClassUID")


def missing_references(volume: Volume) -> dict[str, int]:
    """The attributes a derived object must reference that ``volume``'s source data sets lack,
    with how many data sets have them empty or absent, e.g. ``{"StudyInstanceUID": 20}``;
    FrameOfReferenceUID counts when the series has patient geometry."""
    wanted = list(REFERENCED_ATTRIBUTES)
    if volume.series is not None and volume.series.geometry == "patient":
        wanted.append("FrameOfReferenceUID")
    missing = {}
    for keyword in wanted:
        count = sum(not str(ds.get(keyword) or "").strip() for ds in volume.dicom_datasets)
        if count:
            missing[keyword] = count
    return missing


def check_derivable(volume: Volume, outputs: Sequence[str]) -> None:
    """422 ``dicom_source_incomplete`` (before any inference) when DICOM ``outputs`` (their
    names, for the message) cannot reference ``volume``'s source series, naming the missing
    attributes; also the source kinds no derived object is written for."""
    if not outputs:
        return
    _source_datasets(volume)
    missing = missing_references(volume)
    if missing:
        n = len(volume.dicom_datasets)
        where = ", ".join(f"{keyword} ({'all' if count == n else count} of {n} data sets)"
                          for keyword, count in missing.items())
        raise UploadError(
            UNPROCESSABLE, "dicom_source_incomplete",
            f"the DICOM series lacks {', '.join(missing)}, which {', '.join(outputs)} must "
            f"reference (empty or absent: {where}): a derived object joins the source's study "
            "and points at its series and instances. Ask for mask_nifti / entropy_nifti "
            "instead, or send the series with its UIDs (an anonymiser should replace UIDs "
            "consistently, not blank them)",
        )


# ----------------------------------------------------------------------------------------------


def _source_datasets(volume: Volume) -> list[Dataset]:
    if volume.source != "dicom" or not volume.dicom_datasets or not volume.source_frames:
        raise UploadError(
            UNPROCESSABLE, "seg_needs_dicom",
            "DICOM SEG and parametric map outputs reference the uploaded DICOM series; this "
            f"upload was {volume.source}: ask for NIfTI output instead",
        )
    if volume.array.ndim != 3:
        raise ValueError(f"volume array of shape {volume.array.shape} is not (X, Y, Z)")
    multi = [ds for ds in volume.dicom_datasets if "NumberOfFrames" in ds]
    if multi and len(volume.dicom_datasets) > 1:
        raise UploadError(
            UNPROCESSABLE, "seg_unsupported_source",
            "DICOM outputs for a volume assembled from several multi-frame files are not "
            "supported; ask for NIfTI output instead",
        )
    return list(volume.dicom_datasets)


def _seg_frames(mask: np.ndarray, volume: Volume, n_segments: int, fractional: bool
                ) -> np.ndarray:
    spatial = volume.spatial_shape
    if not fractional:
        if mask.shape != spatial:
            raise ValueError(f"mask shape {mask.shape} != volume shape {spatial}")
        if mask.dtype.kind not in "biu":
            raise ValueError(f"a binary SEG needs an integer label map, got dtype {mask.dtype}")
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > n_segments):
            raise ValueError(f"mask values span {int(mask.min())}..{int(mask.max())}; "
                             f"class_names allow 0..{n_segments}")
        return _to_source_order(mask.astype(np.uint8), volume, fill=0)
    probs = mask.astype(np.float32)
    if probs.shape == spatial:
        probs = probs[None]
    if probs.shape != (n_segments, *spatial):
        raise ValueError(f"fractional mask shape {mask.shape} != ({n_segments}, *{spatial})")
    if probs.size and (float(probs.min()) < 0 or float(probs.max()) > 1):
        raise ValueError("fractional mask values must lie in [0, 1]")
    return np.stack([_to_source_order(p, volume, fill=0.0) for p in probs], axis=-1)


def _to_source_order(array: np.ndarray, volume: Volume, fill: float) -> np.ndarray:
    """``(X, Y, Z)`` -> the frames highdicom expects: one per source image (single-frame
    sources, in ``dicom_datasets`` order) or one per frame of the single multi-frame source
    (frames that are not slices of the volume stay ``fill``)."""
    slices = volume.to_source_frames(array)  # (Z, rows, cols), slice k = source_frames[k]
    refs = volume.source_frames
    if refs[0].frame_number is None:
        order = np.argsort([ref.dataset_index for ref in refs])
        return slices[order]
    n_frames = int(volume.dicom_datasets[0].NumberOfFrames)
    out = np.full((n_frames, *slices.shape[1:]), fill, dtype=slices.dtype)
    for k, ref in enumerate(refs):
        out[int(ref.frame_number) - 1] = slices[k]  # type: ignore[arg-type]
    return out


def _series_number(datasets: Sequence[Dataset], requested: int | None, offset: int = 1000
                   ) -> int:
    if requested is not None:
        return int(requested)
    try:
        return int(datasets[0].get("SeriesNumber") or 0) + offset
    except (TypeError, ValueError):
        return offset


def _patient_orientation(derived: Dataset, datasets: Sequence[Dataset]) -> None:
    """General Image's PatientOrientation is type 2C: needed when frames carry no plane
    orientation (a secondary capture source); the source's value, else empty (unknown)."""
    shared = derived.get("SharedFunctionalGroupsSequence")
    if shared and "PlaneOrientationSequence" in shared[0]:
        return
    derived.PatientOrientation = datasets[0].get("PatientOrientation", "")


def _build(factory: Callable[[], T]) -> T:
    try:
        return factory()
    except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as exc:
        # highdicom validates the source images: a series without the identifiers or geometry
        # a derived object must reference (UIDs, patient/study modules, plane positions of a
        # secondary capture) cannot be written.
        raise UploadError(
            UNPROCESSABLE, "dicom_source_incomplete",
            f"the uploaded DICOM series lacks what a derived DICOM object must reference "
            f"({exc}); ask for NIfTI output instead",
        ) from exc


def _to_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
