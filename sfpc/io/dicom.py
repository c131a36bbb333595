"""DICOM uploads (single-frame series, enhanced multi-frame images) to a :class:`Volume`.

Pipeline: parse every file (DICOMDIR indexes and repeated SOP instances are skipped), list the
frames of every image instance, group them into stacks and pick one (:mod:`dicom_series` states
the rule), sort the slices and build the affine (:mod:`dicom_geometry`), then decode the pixels of
the chosen stack only, apply RescaleSlope/RescaleIntercept (or a Modality LUT) per frame, and
return float32 voxels. Pixel data decodes with pydicom's handlers; the compressed transfer
syntaxes (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE) need the pylibjpeg plugins
(pylibjpeg-libjpeg, -openjpeg, -rle) or pyjpegls/Pillow; anything without a decoder is a 415
naming the transfer syntax.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    AllTransferSyntaxes,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from sfpc.errors import MALFORMED, UNSUPPORTED, UploadError
from sfpc.io.dicom_frames import Frame, Instance, frames_of, ineligibility
from sfpc.io.dicom_geometry import StackGeometry, arrange
from sfpc.io.dicom_series import Rejected, Stack, group_stacks, select_stack
from sfpc.io.volume import (
    FrameRef,
    Limits,
    SeriesInfo,
    Volume,
    check_affine,
    check_finite,
    check_min_spatial,
    check_size,
)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, Float/DoubleFloatPixelData
T = TypeVar("T")
P = ParamSpec("P")


def decode_dicom(files: Sequence[tuple[str, bytes]], limits: Limits, *,
                 series_uid: str | None = None, notes: Sequence[str] = ()) -> Volume:
    """Decode DICOM files (each a whole Part 10 file or a bare data set) into one volume."""
    warnings = list(notes)
    instances = _parse_all(files, warnings)
    if not instances:
        raise UploadError(UNSUPPORTED, "no_image_series",
                          "the upload holds only DICOMDIR index files, no DICOM images")
    frames: list[Frame] = []
    rejected: list[Rejected] = []
    for index, inst in enumerate(instances):
        problem = _guard(inst.name, _problem, inst)
        if problem is not None:
            rejected.append(Rejected(index, *problem))
            continue
        frames += _guard(inst.name, frames_of, index, inst)
    stacks = group_stacks(instances, frames)
    stack, rule, others = select_stack(instances, stacks, rejected, series_uid)
    geometry = arrange(instances, stack.frames)
    warnings += geometry.warnings
    array = _assemble(instances, geometry, limits)
    affine = check_affine(geometry.affine, "the affine built from the DICOM geometry")
    chosen = _chosen_instances(geometry.frames)
    position = {index: k for k, index in enumerate(chosen)}
    refs = tuple(
        FrameRef(instances[f.instance].sop_uid or "", f.frame_number, position[f.instance])
        for f in geometry.frames
    )
    return Volume(
        array=array,
        affine=affine,
        source="dicom",
        series=_series_info(instances, stack, geometry, chosen, rule, others),
        dicom_datasets=[_header_only(instances[i].ds) for i in chosen],
        source_frames=refs,
        warnings=warnings,
    )


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def _parse_all(files: Sequence[tuple[str, bytes]], warnings: list[str]) -> list[Instance]:
    instances: list[Instance] = []
    seen: dict[str, str] = {}
    filled: dict[str, int] = {}
    for name, data in files:
        ds = read_dataset(name, data)
        sop_class = _guard(name, _sop_class, ds)
        if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
            warnings.append(f"skipped {name}: DICOMDIR index (the image files themselves are read)")
            continue
        _guard(name, _identity_from_meta, ds, filled)
        inst = Instance(name, ds)
        uid = _guard(name, inst.text, "SOPInstanceUID")
        if uid is not None and uid in seen:
            warnings.append(f"skipped {name}: same SOPInstanceUID as {seen[uid]}")
            continue
        if uid is not None:
            seen[uid] = name
        instances.append(inst)
    for keyword, count in filled.items():
        warnings.append(f"{keyword} taken from the file meta information of {count} file"
                        f"{'s' if count > 1 else ''} whose data set left it empty")
    return instances


def _identity_from_meta(ds: Dataset, filled: dict[str, int]) -> None:
    """SOPInstanceUID and SOPClassUID from the file meta when the data set has them empty or
    absent (anonymisers leave files like that): the meta's MediaStorage UIDs are the same
    instance's identity (PS3.10 7.1), and a derived object must reference it."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for keyword, meta_keyword in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                                  ("SOPClassUID", "MediaStorageSOPClassUID")):
        value = str(meta.get(meta_keyword) or "").strip()
        if value and not str(ds.get(keyword) or "").strip():
            setattr(ds, keyword, value)
            filled[keyword] = filled.get(keyword, 0) + 1


def read_dataset(name: str, data: bytes) -> Dataset:
    """Parse one DICOM file; a 400 naming the file if it is not readable DICOM."""
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
        # Reading is lazy: touch every top-level element now so a corrupt one fails here, with
        # the file's name, rather than deep inside the geometry code.
        for _ in ds:
            pass
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise UploadError(MALFORMED, "bad_dicom",
                          f"{name} is not a readable DICOM file ({_why(exc)})") from exc
    if len(ds) == 0:
        raise UploadError(MALFORMED, "bad_dicom", f"{name} is not a DICOM file (no data elements)")
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files written without a meta header still have an encoding; record it as a transfer
    syntax so pixel decoding and the DICOM SEG writer see one."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = False, True
    syntax = (ImplicitVRLittleEndian if implicit
              else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


def _sop_class(ds: Dataset) -> str:
    return str(_meta_or_top(ds, "MediaStorageSOPClassUID", "SOPClassUID"))


def _meta_or_top(ds: Dataset, meta_keyword: str, keyword: str) -> Any:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get(meta_keyword):
        return meta.get(meta_keyword)
    return ds.get(keyword, "")


def _problem(inst: Instance) -> tuple[int, str, str] | None:
    """Why ``inst`` cannot be decoded and segmented, as (status, code, words); None if it can."""
    return ineligibility(inst) or _codec_problem(inst)


def _codec_problem(inst: Instance) -> tuple[int, str, str] | None:
    ts = inst.transfer_syntax
    if ts is None:
        return None
    if ts not in AllTransferSyntaxes:
        return (UNSUPPORTED, "unsupported_transfer_syntax",
                f"uses transfer syntax {ts}, which this server does not know")
    if not ts.is_compressed:
        return None
    try:
        available = get_decoder(ts).is_available
    except NotImplementedError:
        available = False
    if not available:
        return (UNSUPPORTED, "unsupported_transfer_syntax",
                f"uses transfer syntax {ts.name} ({ts}), which this server cannot decode; "
                "send it uncompressed or with JPEG, JPEG-LS, JPEG 2000 or RLE compression")
    return None


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------


def _assemble(instances: Sequence[Instance], geometry: StackGeometry, limits: Limits
              ) -> np.ndarray:
    first = geometry.frames[0]
    shape = (first.columns, first.rows, len(geometry.frames))
    check_size(shape, 1, 4, limits)
    check_min_spatial(shape, limits)
    # Column-major, as NIfTI stores voxels: each frame (rows x columns, row-major) is then one
    # contiguous slice of the volume, copied as it is, and the mask and maps restored on this
    # grid are written to NIfTI without a transposing copy (benchmarks/encode_parts.py).
    out = np.empty(shape, dtype=np.float32, order="F")
    cache: dict[int, np.ndarray] = {}
    remaining = {i: 0 for i in range(len(instances))}
    for frame in geometry.frames:
        remaining[frame.instance] += 1
    for k, frame in enumerate(geometry.frames):
        if frame.instance not in cache:
            cache[frame.instance] = decode_pixels(instances[frame.instance])
        pixels = cache[frame.instance][(frame.frame_number or 1) - 1]
        out[:, :, k] = _rescaled(instances[frame.instance], pixels, frame).T
        remaining[frame.instance] -= 1
        if remaining[frame.instance] == 0:  # keep at most one decoded instance alive
            del cache[frame.instance]
    check_finite(out)
    return out


def decode_pixels(inst: Instance) -> np.ndarray:
    """Stored pixel values of every frame, ``(frames, rows, columns)`` in native byte order."""
    ts = inst.transfer_syntax
    try:
        arr = np.asarray(inst.ds.pixel_array)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # noqa: B036 - native plugins panic (pyo3's PanicException
        # is a BaseException) on corrupt streams; any failure here is the data's fault
        what = f" ({ts.name})" if ts is not None else ""
        if ts is not None and ts.is_compressed:
            # Every installed plugin failed: a codec variant they lack, or a corrupt stream;
            # either way the fix is another encoding, so it is the media type that fails.
            raise UploadError(
                UNSUPPORTED, "undecodable_pixel_data",
                f"the pixel data of {inst.name} is compressed with {ts.name} ({ts}) and none "
                f"of the installed decoders could decode it ({_why(exc)}); send it "
                "uncompressed",
            ) from exc
        raise UploadError(
            MALFORMED, "bad_pixel_data",
            f"the pixel data of {inst.name}{what} could not be decoded; the file may be "
            f"truncated or corrupt ({_why(exc)})",
        ) from exc
    rows, columns = int(inst.integer("Rows") or 0), int(inst.integer("Columns") or 0)
    expected = (inst.n_frames, rows, columns)
    if arr.size != int(np.prod(expected)):
        raise UploadError(
            MALFORMED, "bad_pixel_data",
            f"{inst.name}: decoded pixel data has shape {arr.shape}, expected {expected} "
            "(frames, rows, columns)",
        )
    arr = arr.reshape(expected)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _rescaled(inst: Instance, pixels: np.ndarray, frame: Frame) -> np.ndarray:
    if "ModalityLUTSequence" in inst.ds and "RescaleSlope" not in inst.ds:
        return np.asarray(apply_modality_lut(pixels, inst.ds), dtype=np.float32)
    if frame.slope == 1.0 and frame.intercept == 0.0:
        return pixels.astype(np.float32)
    # float64 arithmetic, then one rounding to float32: the result pydicom's apply_rescale gives.
    return (pixels.astype(np.float64) * frame.slope + frame.intercept).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------


def _chosen_instances(frames: Sequence[Frame]) -> list[int]:
    return list(dict.fromkeys(f.instance for f in frames))


def _series_info(instances: Sequence[Instance], stack: Stack, geometry: StackGeometry,
                 chosen: Sequence[int], rule: str, others: Any) -> SeriesInfo:
    first = instances[chosen[0]]
    syntaxes = [instances[i].transfer_syntax for i in chosen]
    return SeriesInfo(
        series_instance_uid=stack.series_uid,
        study_instance_uid=first.text("StudyInstanceUID"),
        frame_of_reference_uid=stack.frame_of_reference,
        modality=first.text("Modality"),
        series_number=first.integer("SeriesNumber"),
        series_description=first.text("SeriesDescription"),
        n_instances=len(chosen),
        n_frames=len(geometry.frames),
        rule=rule,
        others=others,
        transfer_syntaxes=tuple(dict.fromkeys(ts.name for ts in syntaxes if ts is not None)),
        geometry=geometry.kind,
        slice_spacing=float(geometry.slice_spacing),
    )


def _header_only(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without its pixel data (the volume holds the decoded voxels)."""
    out = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            out.add(elem)
    out.file_meta = ds.file_meta
    out.preamble = getattr(ds, "preamble", None)
    return out


def _guard(name: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` on one file's data set; any non-UploadError failure is that
    file's fault. (Arguments rather than a closure: a lambda in the callers' loops would need
    default-argument binding, which type checkers cannot infer.)"""
    try:
        return fn(*args, **kwargs)
    except UploadError:
        raise
    except Exception as exc:  # a malformed element surfaces as any exception type
        raise UploadError(MALFORMED, "bad_dicom",
                          f"{name} has a malformed data element ({_why(exc)})") from exc


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."
