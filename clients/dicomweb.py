"""Segment series straight from a PACS over DICOMweb, and store the results back.

1. QIDO-RS (:func:`find_series`): the image series matching the query (studies, series,
   modalities, any other QIDO attribute filter). Derived objects (SEG, parametric maps,
   reports, presentation states) are never candidates, so results stored by an earlier run are
   not segmented in turn.
2. WADO-RS (:meth:`PacsHooks.fetch`): the series' instances, into a private temporary folder.
3. The gateway segments them (the batch machinery of :mod:`sfpc.clients.batch`: bounded
   concurrency, a manifest that makes a rerun skip what is done).
4. STOW-RS (:meth:`PacsHooks.deliver`): the DICOM SEG into the source study and, when asked,
   the voxel-wise uncertainty (normalised predictive entropy) as a DICOM Parametric Map that
   references the same series, so a viewer can overlay both on the source images.

The PACS URL and credentials come from :class:`~sfpc.clients.config.PacsConfig` (config file or
``SFPC_PACS_*`` variables). Requests to the PACS use ``dicomweb-client`` (requests underneath).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfpc.clients.batch import ItemHooks
from sfpc.clients.config import PacsConfig
from sfpc.clients.discover import NON_IMAGE_MODALITIES, WorkItem
from sfpc.clients.http import Upload
from sfpc.io.files import write_atomic

# DICOM attribute tags (QIDO-RS JSON keys).
STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
MODALITY = "00080060"
SERIES_NUMBER = "00200011"
SERIES_DESCRIPTION = "0008103E"
SERIES_INSTANCES = "00201209"
SOP_CLASS = "00080016"
SOP_INSTANCE = "00080018"

SEG_FILE = "segmentation.dcm"
ENTROPY_FILE = "entropy.nii.gz"
UNCERTAINTY_FILE = "uncertainty.dcm"
# SOP classes of objects that are not source images: SEG, parametric map, structured reports,
# key objects, presentation states, RT structure sets and plans, registrations, encapsulated
# documents, raw data.
_DERIVED_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.30",
                         "1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.11",
                         "1.2.840.10008.5.1.4.1.1.481", "1.2.840.10008.5.1.4.1.1.104")


class PacsError(RuntimeError):
    """The PACS refused a request or stored only part of what was sent."""


@dataclass(frozen=True)
class SeriesRef:
    """One series as QIDO-RS describes it."""

    study_uid: str
    series_uid: str
    modality: str | None = None
    number: str | None = None
    description: str | None = None
    instances: int | None = None

    def work_item(self) -> WorkItem:
        """The batch item: artefacts under ``<study>/<series>/``; the fingerprint changes when
        the series gains or loses instances, so such a series is segmented again."""
        what = " ".join(p for p in (self.modality, self.description) if p)
        return WorkItem(
            key=f"pacs:{self.series_uid}", kind="dicom",
            label=f"series {self.series_uid}" + (f" ({what})" if what else ""),
            output=f"{self.study_uid}/{self.series_uid}",
            fingerprint=f"instances={self.instances}", series_uid=self.series_uid,
            study_uid=self.study_uid,
            details={"modality": self.modality, "series_number": self.number,
                     "series_description": self.description, "instances": self.instances})


def connect(config: PacsConfig) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for ``config`` (basic auth or a bearer token)."""
    import requests
    from dicomweb_client import DICOMwebClient

    if not config.url:
        raise ValueError("no PACS URL: set pacs.url in the config file or SFPC_PACS_URL")
    session = requests.Session()
    if config.token is not None:
        session.headers["Authorization"] = f"Bearer {config.token.get_secret_value()}"
    elif config.username:
        password = config.password.get_secret_value() if config.password else ""
        session.auth = (config.username, password)
    session.verify = config.verify
    return DICOMwebClient(url=config.url.rstrip("/"), session=session,
                          qido_url_prefix=config.qido_prefix, wado_url_prefix=config.wado_prefix,
                          stow_url_prefix=config.stow_prefix, timeout=config.timeout_s)


def _value(entry: Mapping[str, Any], tag: str) -> Any:
    values = (entry.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _text(entry: Mapping[str, Any], tag: str) -> str | None:
    value = _value(entry, tag)
    return None if value is None else str(value)


def _or_any(values: list[str]) -> list[str | None]:
    """The values to query one by one, or [None] (no constraint) when none is given."""
    return list(values) if values else [None]


def find_series(dw: Any, *, studies: Sequence[str] = (), series: Sequence[str] = (),
                modalities: Sequence[str] = (), filters: Mapping[str, str] | None = None,
                limit: int | None = None) -> list[SeriesRef]:
    """The image series matching every given criterion, by QIDO-RS (one query per study and
    modality asked for), in study then series order. ``filters``: further QIDO attribute
    matches, e.g. ``{"StudyDate": "20240101-"}``."""
    found: dict[str, SeriesRef] = {}
    queries = [(study, modality, uid)
               for study in _or_any(list(studies))
               for modality in _or_any([m.upper() for m in modalities])
               for uid in _or_any(list(series))]
    for study, modality, uid in queries:
        query = dict(filters or {})
        if modality:
            query["Modality"] = modality
        if uid:
            query["SeriesInstanceUID"] = uid
        entries = dw.search_for_series(
            study_instance_uid=study, search_filters=query or None, get_remaining=True,
            fields=["SeriesDescription", "NumberOfSeriesRelatedInstances", "SeriesNumber"])
        for entry in entries:
            ref = SeriesRef(
                study_uid=str(_value(entry, STUDY_UID) or study or ""),
                series_uid=str(_value(entry, SERIES_UID) or ""),
                modality=(_text(entry, MODALITY) or "").upper() or None,
                number=_text(entry, SERIES_NUMBER),
                description=_text(entry, SERIES_DESCRIPTION),
                instances=_count(_value(entry, SERIES_INSTANCES)))
            if ref.series_uid and ref.study_uid and ref.series_uid not in found:
                found[ref.series_uid] = ref
    wanted = set(series)
    refs = [r for r in found.values() if not wanted or r.series_uid in wanted]
    refs = [r for r in refs if r.modality not in NON_IMAGE_MODALITIES and _is_image(dw, r)]
    refs.sort(key=lambda r: (r.study_uid, _number(r.number), r.series_uid))
    return refs[:limit] if limit else refs


def _count(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _number(value: str | None) -> float:
    try:
        return float(value) if value is not None else float("inf")
    except ValueError:
        return float("inf")


def _is_image(dw: Any, ref: SeriesRef) -> bool:
    """Whether the series' first instance is an image (not a SEG, parametric map, report...):
    the series-level Modality does not tell (a parametric map is 'OT', a SEG may be stored
    under the source's modality by some writers)."""
    entries = dw.search_for_instances(study_instance_uid=ref.study_uid,
                                      series_instance_uid=ref.series_uid, limit=1,
                                      fields=["SOPClassUID"])
    if not entries:
        return False
    sop_class = _text(entries[0], SOP_CLASS) or ""
    return not sop_class.startswith(_DERIVED_SOP_PREFIXES)


def store(dw: Any, datasets: Iterable[Any], study_uid: str) -> list[dict[str, str]]:
    """STOW-RS ``datasets`` into ``study_uid``; returns what was stored (SOP class, SOP instance
    and series UIDs). :class:`PacsError` when the PACS reports any failed instance."""
    datasets = list(datasets)
    for ds in datasets:
        if str(ds.StudyInstanceUID) != study_uid:
            raise PacsError(f"instance {ds.SOPInstanceUID} belongs to study "
                            f"{ds.StudyInstanceUID}, not {study_uid}")
    response = dw.store_instances(datasets, study_instance_uid=study_uid)
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: failure reason "
                            f"{item.get('FailureReason', '?')}" for item in failed)
        raise PacsError(f"the PACS refused {len(failed)} of {len(datasets)} instances: "
                        f"{reasons}")
    return [{"sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID),
             "series_instance_uid": str(ds.SeriesInstanceUID)} for ds in datasets]


def uncertainty_map(files: Sequence[Path], entropy_nifti: Path, series_uid: str | None) -> bytes:
    """The entropy map (NIfTI, on the series' voxel grid as the gateway returns it) as a DICOM
    Parametric Map referencing the series in ``files``.

    The series is decoded with the gateway's own decoder, so voxel (x, y, k) of the map lands on
    the same source frame and pixel as the mask in the SEG; a map whose grid is not the
    series' is refused rather than written onto the wrong pixels.
    """
    import nibabel as nib
    import numpy as np

    from sfpc.io import decode_upload
    from sfpc.io.dicom_seg import write_parametric_map

    volume = decode_upload([(p.name, p) for p in files], series_uid=series_uid)
    image = nib.load(str(entropy_nifti))
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image derives from it
        raise ValueError(f"{entropy_nifti} is not a NIfTI image")
    values = np.asarray(image.dataobj, dtype=np.float32)
    if values.shape != tuple(volume.spatial_shape):
        raise ValueError(f"entropy map shape {values.shape} != series shape "
                         f"{tuple(volume.spatial_shape)}")
    if not np.allclose(image.affine, volume.affine, atol=1e-3):
        raise ValueError("the entropy map's affine is not the series' grid")
    return write_parametric_map(
        np.clip(values, 0.0, 1.0), volume, label="ENTROPY",
        explanation="Predictive entropy H(p_bar) / ln(C), 0 = certain, 1 = uniform",
        series_description="SFPC uncertainty (normalised entropy)")


class PacsHooks(ItemHooks):
    """Fetch series by WADO-RS; store the SEG (and the uncertainty map) by STOW-RS."""

    def __init__(self, dw: Any, *, store_seg: bool = True, store_uncertainty: bool = False,
                 temp_dir: str | Path | None = None) -> None:
        self.dw = dw
        self.store_seg = store_seg
        self.store_uncertainty = store_uncertainty
        self.temp_dir = temp_dir
        self._folders: dict[str, Path] = {}
        self._lock = threading.Lock()

    def fetch(self, item: WorkItem) -> list[Upload]:
        import pydicom

        folder = Path(tempfile.mkdtemp(prefix="sfpc-pacs-", dir=self.temp_dir))
        with self._lock:
            self._folders[item.key] = folder
        paths: list[Upload] = []
        for index, ds in enumerate(self.dw.iter_series(item.study_uid, item.series_uid)):
            # Command Set elements (group 0000) belong to network messages, not files; some
            # old modalities wrote them into the files a PACS then returns verbatim.
            for tag in [t for t in ds.keys() if t.group == 0]:
                del ds[tag]
            path = folder / f"{index:05d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
        if not paths:
            raise PacsError(f"WADO-RS returned no instance for series {item.series_uid}")
        return paths

    def deliver(self, item: WorkItem, folder: Path, files: Sequence[str],
                uploads: list[Upload] | None) -> dict[str, Any]:
        import pydicom

        if item.study_uid is None:
            raise PacsError(f"series {item.series_uid} has no study to store results into")
        stored: list[dict[str, str]] = []
        written: list[str] = []
        if self.store_seg:
            if SEG_FILE not in files:
                raise PacsError(f"the gateway returned no {SEG_FILE} for series "
                                f"{item.series_uid} (outputs must include seg_dicom)")
            stored += store(self.dw, [pydicom.dcmread(folder / SEG_FILE)], item.study_uid)
        if self.store_uncertainty:
            if ENTROPY_FILE not in files:
                raise PacsError(f"the gateway returned no {ENTROPY_FILE} for series "
                                f"{item.series_uid} (run with uncertainty)")
            fetched_here = uploads is None
            sources = self.fetch(item) if uploads is None else uploads
            try:
                # The series is re-read from its files: in-memory uploads have none.
                paths = [Path(p) for p in sources if not isinstance(p, tuple)]
                if len(paths) != len(sources):
                    raise PacsError("the parametric map needs the series as files on disk")
                data = uncertainty_map(paths, folder / ENTROPY_FILE, item.series_uid)
            finally:
                if fetched_here:
                    self.release(item, sources)
            write_atomic(folder / UNCERTAINTY_FILE, data)
            written.append(f"{item.output}/{UNCERTAINTY_FILE}")
            stored += store(self.dw, [pydicom.dcmread(folder / UNCERTAINTY_FILE)],
                            item.study_uid)
        return {"stored": stored, **({"files": written} if written else {})}

    def release(self, item: WorkItem, uploads: list[Upload] | None) -> None:
        with self._lock:
            folder = self._folders.pop(item.key, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


__all__ = ["PacsError", "PacsHooks", "SeriesRef", "connect", "find_series", "store",
           "uncertainty_map"]
