"""Find what to segment in a folder tree: NIfTI files, and DICOM series grouped by their
SeriesInstanceUID whatever the files are called or wherever they lie under the root.

Every input becomes a :class:`WorkItem` with a stable key (for the batch manifest), a fingerprint
that changes when the input changes (sizes and modification times of its files), and the
relative folder its artefacts go to, mirroring the input tree:

- ``a/b/case.nii.gz`` -> ``a/b/case/``;
- a series -> the deepest folder holding all its files (``scans/exam1/`` -> ``scans/exam1/``),
  when nothing else to segment lies under that folder; otherwise (several series in one
  folder, or a series spread over folders that also hold other inputs) that folder plus
  ``series-<SeriesInstanceUID>/``.

DICOM files are recognised by content (the ``DICM`` preamble, or a data set that carries a
SeriesInstanceUID), so extension-less PACS exports work. Objects that are not images (SEG,
structured reports, presentation states, ...) are not inputs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Modalities of derived or non-image objects: never segmented.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTRECORD",
                                  "REG", "DOC", "PLAN", "FID", "AU", "ECG"})
_SKIP_NAMES = frozenset({"DICOMDIR", ".DS_Store", "Thumbs.db"})
_HEADER_TAGS = ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "Rows", "Columns",
                "SeriesNumber", "SeriesDescription", "SOPClassUID"]


@dataclass(frozen=True)
class WorkItem:
    """One input to segment."""

    key: str  # stable identity in the manifest
    kind: Literal["nifti", "dicom"]
    label: str  # what people see (a relative path, or a series description)
    output: str  # relative folder of its artefacts (POSIX separators)
    fingerprint: str  # changes when the input changes
    paths: tuple[Path, ...] = ()
    series_uid: str | None = None
    study_uid: str | None = None
    details: dict[str, object] = field(default_factory=dict, compare=False)


@dataclass
class Discovery:
    items: list[WorkItem]
    skipped: list[tuple[Path, str]]  # files that are no input, and why


@dataclass
class _Series:
    uid: str
    study_uid: str | None
    modality: str | None
    number: str | None
    description: str | None
    files: list[Path] = field(default_factory=list)


def discover(root: str | Path, *, exclude: Sequence[str] = (),
             skip_dirs: Iterable[str | Path] = ()) -> Discovery:
    """Walk ``root`` and return its NIfTI files and DICOM series, sorted by output folder.

    ``exclude``: glob patterns matched against each file's path relative to ``root`` (POSIX
    separators), e.g. ``"*_label.nii.gz"``. ``skip_dirs``: folders not to descend into (the
    batch's own output folder when it lies inside the input tree).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"input folder {root} does not exist or is not a folder")
    skip = {Path(d).resolve() for d in skip_dirs}
    niftis: list[Path] = []
    series: dict[str, _Series] = {}
    skipped: list[tuple[Path, str]] = []
    for path in _walk(root, skip):
        relative = path.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(relative, pattern) for pattern in exclude):
            skipped.append((path, "excluded"))
        elif path.name.lower().endswith(NIFTI_SUFFIXES):
            niftis.append(path)
        else:
            why = _add_dicom(path, series)
            if why:
                skipped.append((path, why))
    items = [_nifti_item(root, path) for path in niftis]
    items += _series_items(root, list(series.values()), niftis)
    items = _unique_outputs(items)
    return Discovery(sorted(items, key=lambda item: (item.output, item.key)), skipped)


def _walk(root: Path, skip: set[Path]) -> Iterable[Path]:
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (here / d).resolve() not in skip)
        for name in sorted(files):
            if name.startswith(".") or name in _SKIP_NAMES:
                continue
            path = here / name
            if path.is_file():
                yield path


def _add_dicom(path: Path, series: dict[str, _Series]) -> str | None:
    """Add ``path`` to its series; the reason it is no input otherwise."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return "unreadable"
    preamble = head[128:132] == b"DICM"
    # A data set without the Part 10 preamble starts with a group 0002 or 0008 tag (little
    # endian); anything else is not worth parsing (force=True reads any bytes as *something*).
    if not preamble and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return "not NIfTI or DICOM"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS,
                             force=not preamble)
    except Exception:  # any other file read as DICOM can fail in any way: it is not an input
        return "not NIfTI or DICOM"
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if not uid:
        return "DICOM without a series UID" if preamble else "not NIfTI or DICOM"
    modality = str(ds.get("Modality", "") or "").upper() or None
    if modality in NON_IMAGE_MODALITIES or "Rows" not in ds or "Columns" not in ds:
        return f"DICOM {modality or 'object'} that is not an image"
    entry = series.get(uid)
    if entry is None:
        entry = series[uid] = _Series(
            uid=uid, study_uid=str(ds.get("StudyInstanceUID", "") or "") or None,
            modality=modality, number=str(ds.get("SeriesNumber", "") or "") or None,
            description=str(ds.get("SeriesDescription", "") or "") or None)
    entry.files.append(path)
    return None


def fingerprint(paths: Sequence[Path], root: Path | None = None) -> str:
    """A digest of the files' names, sizes and modification times (not their content: reading
    every byte of a large tree on each run would cost more than the check is worth)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        stat = path.stat()
        name = path.relative_to(root).as_posix() if root else path.as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _nifti_item(root: Path, path: Path) -> WorkItem:
    relative = PurePosixPath(path.relative_to(root).as_posix())
    name = relative.name
    stem = name[:-7] if name.lower().endswith(".nii.gz") else name[:-4]
    output = (relative.parent / (stem or "image")).as_posix()
    return WorkItem(key=f"nifti:{relative.as_posix()}", kind="nifti", label=relative.as_posix(),
                    output=output, fingerprint=fingerprint([path], root), paths=(path,))


def _series_items(root: Path, found: list[_Series], niftis: list[Path]) -> list[WorkItem]:
    owners = [(path.parent, "nifti") for path in niftis]
    owners += [(path.parent, entry.uid) for entry in found for path in entry.files]
    items = []
    for entry in found:
        folders = {path.parent for path in entry.files}
        common = Path(os.path.commonpath([str(f) for f in folders]))
        relative = PurePosixPath(common.relative_to(root).as_posix())
        # The series owns its folder when nothing else to segment lies under it.
        alone = common != root and all(
            owner == entry.uid for folder, owner in owners if folder.is_relative_to(common))
        output = relative.as_posix() if alone else (relative / f"series-{entry.uid}").as_posix()
        files = tuple(sorted(entry.files))
        label = relative.as_posix() if alone else f"{relative.as_posix()} [{entry.uid}]"
        items.append(WorkItem(
            key=f"dicom:{entry.uid}", kind="dicom", label=label,
            output=output.removeprefix("./") or ".", fingerprint=fingerprint(list(files), root),
            paths=files, series_uid=entry.uid, study_uid=entry.study_uid,
            details={"modality": entry.modality, "series_number": entry.number,
                     "series_description": entry.description, "files": len(files)}))
    return items


def _unique_outputs(items: list[WorkItem]) -> list[WorkItem]:
    """Give two inputs that would share an output folder (``x/case.nii`` and ``x/case/``
    holding a series) distinct ones, so no artefact overwrites another."""
    import dataclasses

    seen: dict[str, int] = {}
    out = []
    for item in sorted(items, key=lambda i: (i.output, i.kind != "dicom", i.key)):
        count = seen.get(item.output, 0)
        seen[item.output] = count + 1
        if count:
            suffix = "nifti" if item.kind == "nifti" else "series"
            item = dataclasses.replace(item, output=f"{item.output}__{suffix}{count + 1}")
        out.append(item)
    return out


__all__ = ["Discovery", "NON_IMAGE_MODALITIES", "WorkItem", "discover", "fingerprint"]
