"""The entry point: whatever a client uploaded -> one :class:`Volume`.

Each file is recognised by its content (:func:`sniff.sniff`), never by its name alone: a zip is
expanded once (safely, :mod:`archive`), a gzip stream is inflated once (``.nii.gz``, or a gzipped
DICOM file), and archives inside archives are refused. What remains must be exactly one NIfTI
image, or DICOM files (a series, several series to choose from, or one multi-frame file).
Anything else is skipped with a note, and an upload with nothing usable is a 415 that says what
each file was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sfpc.errors import MALFORMED, TOO_LARGE, UNSUPPORTED, UploadError
from sfpc.io.archive import extract_zip, gunzip
from sfpc.io.dicom import decode_dicom
from sfpc.io.nifti import decode_nifti
from sfpc.io.sniff import (
    DICOM,
    DICOM_NO_PREAMBLE,
    GZIP,
    NIFTI1,
    NIFTI2,
    NIFTI_PAIR,
    UNKNOWN,
    ZIP,
    describe_other,
    sniff,
)
from sfpc.io.volume import Limits, Volume

UploadFile = tuple[str, "bytes | bytearray | memoryview | str | os.PathLike[str]"]
_ARCHIVE_WORDS = ("archive", "stream")


def decode_upload(files: Sequence[UploadFile], limits: Limits | None = None, *,
                  max_channels: int = 1, series_uid: str | None = None) -> Volume:
    """Decode an upload: a list of ``(filename, bytes or path)``.

    ``max_channels`` lets a 4D NIfTI with that many volumes through as a ``(C, X, Y, Z)`` array;
    ``series_uid`` picks a DICOM series explicitly (otherwise the rule in
    :mod:`sfpc.io.dicom_series` chooses). Raises :class:`UploadError` (4xx) for anything
    that is not a segmentable volume.
    """
    limits = limits or Limits()
    if not files:
        raise UploadError(MALFORMED, "empty_upload", "the upload holds no files")
    inputs = _read_inputs(files, limits)
    niftis: list[tuple[str, bytes, str]] = []
    dicoms: list[tuple[str, bytes]] = []
    notes: list[str] = []
    n_files = 0
    for name, data in inputs:
        for member_name, content, kind in _expand(name, data, limits, notes):
            n_files += 1
            if n_files > limits.max_files:
                raise UploadError(TOO_LARGE, "too_many_files",
                                  f"the upload holds more than {limits.max_files:,} files")
            if kind in (NIFTI1, NIFTI2):
                niftis.append((member_name, content, kind))
            else:
                dicoms.append((member_name, content))
    if niftis and dicoms:
        raise UploadError(
            MALFORMED, "mixed_upload",
            f"the upload mixes NIfTI ({niftis[0][0]}) and DICOM ({dicoms[0][0]}) files; send "
            "one image per request",
        )
    if len(niftis) > 1:
        raise UploadError(
            MALFORMED, "multiple_nifti",
            f"the upload holds {len(niftis)} NIfTI images ({', '.join(n for n, _, _ in niftis)}); "
            "send one image per request",
        )
    if niftis:
        name, content, kind = niftis[0]
        volume = decode_nifti(name, content, kind, limits, max_channels=max_channels)
        volume.warnings[:0] = notes
        if series_uid is not None:
            volume.warnings.append("series_uid ignored: the upload is a NIfTI image")
        return volume
    if dicoms:
        return decode_dicom(dicoms, limits, series_uid=series_uid, notes=notes)
    raise UploadError(
        UNSUPPORTED, "unsupported_format",
        "no NIfTI or DICOM image found in the upload"
        + (f" ({'; '.join(notes)})" if notes else "")
        + ": send a .nii/.nii.gz file, DICOM files, or a zip of a DICOM series",
    )


def _read_inputs(files: Sequence[UploadFile], limits: Limits) -> list[tuple[str, bytes]]:
    if len(files) > limits.max_files:
        raise UploadError(TOO_LARGE, "too_many_files",
                          f"the upload holds {len(files):,} files; the limit is "
                          f"{limits.max_files:,}")
    sizes = []
    for _, content in files:
        if isinstance(content, (bytes, bytearray, memoryview)):
            sizes.append(len(content))
        else:
            sizes.append(os.stat(content).st_size)
    if sum(sizes) > limits.max_upload_bytes:
        raise UploadError(
            TOO_LARGE, "upload_too_large",
            f"the upload is {sum(sizes):,} bytes; the limit is {limits.max_upload_bytes:,}",
        )
    out = []
    for name, content in files:
        data = (bytes(content) if isinstance(content, (bytes, bytearray, memoryview))
                else Path(content).read_bytes())
        out.append((str(name), data))
    return out


def _expand(name: str, data: bytes, limits: Limits, notes: list[str]
            ) -> list[tuple[str, bytes, str]]:
    """The image files inside one uploaded file: ``(name, bytes, kind)``; others go to notes."""
    kind = sniff(data)
    if kind == ZIP:
        members, zip_notes = extract_zip(name, data, limits)
        notes += zip_notes
        out = []
        for member in members:
            out += _leaf(f"{name}:{member.name}", member.data, limits, notes, in_archive=True)
        return out
    return _leaf(name, data, limits, notes, in_archive=False)


def _leaf(name: str, data: bytes, limits: Limits, notes: list[str], *, in_archive: bool
          ) -> list[tuple[str, bytes, str]]:
    kind = sniff(data)
    if kind == ZIP:
        raise _nested(name)
    if kind == GZIP:
        data = gunzip(name, data, limits)
        kind = sniff(data)
        if kind in (ZIP, GZIP) or (kind.startswith("other:") and _is_archive(kind)):
            raise _nested(name)
        name = name[:-3] if name.lower().endswith(".gz") else name
    if kind in (NIFTI1, NIFTI2, DICOM, DICOM_NO_PREAMBLE):
        return [(name, data, NIFTI1 if kind == NIFTI1 else NIFTI2 if kind == NIFTI2 else DICOM)]
    if kind == NIFTI_PAIR:
        raise UploadError(
            UNSUPPORTED, "nifti_pair",
            f"{name} is the header of a NIfTI/Analyze .hdr/.img pair; convert it to a single "
            ".nii or .nii.gz file",
        )
    what = "an unrecognised file (not NIfTI or DICOM)" if kind == UNKNOWN else describe_other(kind)
    if kind.startswith("other:") and _is_archive(kind):
        if in_archive:
            raise _nested(name)
        raise UploadError(UNSUPPORTED, "unsupported_archive",
                          f"{name} is {what}; send a zip archive instead")
    notes.append(f"skipped {name}: {what}")
    return []


def _is_archive(kind: str) -> bool:
    return any(word in kind for word in _ARCHIVE_WORDS)


def _nested(name: str) -> UploadError:
    return UploadError(MALFORMED, "nested_archive",
                       f"{name} is an archive inside an archive; send a single flat zip")
