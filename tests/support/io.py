"""Shared helpers for the I/O tests: edited copies of the real DICOM series, SimpleITK's reading
of a series as the reference grid, and dciodvfy (the data's location: tests.support.paths)."""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.paths import DICOM_SERIES as MR_SERIES

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (the real-data tests need ../shared/data)")
    return path


def series_files() -> list[Path]:
    return sorted(require(MR_SERIES).glob("*.dcm"))


@functools.cache
def _clean_series_bytes() -> tuple[bytes, ...]:
    # pydicom's rewrite of each real file: the same data elements, minus the 2.5 MB of bytes
    # trailing brain_001.dcm's data set that make every parse of it take a second or more.
    return tuple(to_bytes(pydicom.dcmread(p)) for p in series_files())


def series_datasets() -> list[Dataset]:
    """Fresh, editable data sets of the real series (parsed anew on every call)."""
    return [pydicom.dcmread(io.BytesIO(data)) for data in _clean_series_bytes()]


def to_bytes(ds: Dataset) -> bytes:
    # The real files carry stray command-set (group 0000) elements that pydicom will not write.
    for tag in [t for t in ds.keys() if t.group == 0]:
        del ds[tag]
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def fresh_uids(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The same images with valid UIDs (the real series uses an illegal ``0.0.0.0`` root, which
    dciodvfy flags in every object that references it). Deterministic per original UID."""
    for ds in datasets:
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                        "FrameOfReferenceUID"):
            if keyword in ds:
                setattr(ds, keyword, generate_uid(entropy_srcs=[str(ds.get(keyword))]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return list(datasets)


def edited_series(edit: Callable[[int, Dataset], Dataset | None] | None = None
                  ) -> list[tuple[str, bytes]]:
    """The real series as upload tuples, each data set passed through ``edit(index, ds)``
    (returning None drops the file)."""
    out = []
    for i, ds in enumerate(series_datasets()):
        ds = edit(i, ds) if edit is not None else ds
        if ds is not None:
            out.append((f"img{i:03d}.dcm", to_bytes(ds)))
    return out


def sitk_reference(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's reading of a series: the voxels as (X, Y, Z) and the voxel -> RAS affine."""
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    # Let GDCM sort by position, as a user of SimpleITK would.
    names = reader.GetGDCMSeriesFileNames(str(Path(paths[0]).parent))
    reader.SetFileNames(names)
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return array, LPS_TO_RAS @ lps


def world(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World coordinates of the eight corner voxels and the centre voxel."""
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)] + [[s // 2 for s in shape[:3]]], float)
    return (affine[:3, :3] @ corners.T).T + affine[:3, 3]


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for a DICOM file. Skips when dciodvfy is not installed,
    except under CI, where its absence is a failure (.ci/run installs dicom3tools)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        message = ("dciodvfy not installed (apt-get install -y dicom3tools); cannot validate the "
                   "written DICOM objects")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
