"""Finding the cases of a data set on disk: one function per folder layout, and the Case record.

Supported layouts (``discover_cases(source, layout="auto")``):

- ``folder``: ``<id>_image.nii.gz`` with optional ``<id>_label.nii.gz`` (``<id>_image_unlabelled``
  also marks a case without label).
- ``msd``: Medical Segmentation Decathlon / nnU-Net ``imagesTr`` + ``labelsTr`` (+ ``imagesTs``);
  nnU-Net channel files ``<id>_0000.nii.gz``, ``<id>_0001.nii.gz`` are grouped into one case.
- ``json``: a list of ``{"image", "label", "id", "slices", "role", "group", "label_map",
  "tissue_map"}`` entries
  (top level, or under ``cases`` / ``training`` / ``unlabelled`` / ``test`` as in MSD's
  dataset.json); paths relative to the JSON file.
- ``csv``: columns ``image,label`` (label may be empty), optional ``id``, ``slices`` ("69:80"),
  ``role``, ``group``; several channel files separated by ``;``.
- ``brats``: BraTS2020 ``BraTS20_Training_XXX/BraTS20_Training_XXX_flair.nii.gz`` + ``_seg``;
  label map "binary" (whole tumour = label > 0).
- ``acdc``: ``patientXXX/patientXXX_frameYY.nii.gz`` + ``_frameYY_gt.nii.gz`` (RV/Myo/LV = 1/2/3),
  ``_4d`` files ignored; both frames of a patient share a ``group`` so splits keep them together.

A case without a label belongs to the unlabelled pool.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

LabelMap = Union[Mapping[int, int], str, None]  # noqa: UP007 - a runtime alias, py3.10-safe
ROLES = ("labelled", "unlabelled", "val")
LAYOUTS = ("folder", "msd", "json", "csv", "brats", "acdc")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Case:
    """One image (one or more channel files) with its optional label.

    ``slices`` is a half-open ``[start, stop)`` range of axial slices (voxel indices along the third
    axis after reorientation to RAS) restricting the case to a slab; ``role`` pins the case to a
    split part ("labelled", "unlabelled" or "val") instead of letting the split draw it; ``group``
    keeps related cases (frames of one patient) on the same side of a split; ``label_map`` remaps
    label ids on loading ({src: dst}, other ids -> 0; "binary": label > 0). ``tissue_map``
    ({raw label id: tissue group name}) names the tissues of the *raw* label file that a
    contrast-enhancement augmentation may brighten (training/enhancement.py).
    """

    id: str
    image: tuple[Path, ...]
    label: Path | None = None
    slices: tuple[int, int] | None = None
    role: str | None = None
    group: str | None = None
    label_map: LabelMap = None
    tissue_map: dict[int, str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.image, (str, Path)):
            self.image = (Path(self.image),)
        self.image = tuple(Path(p) for p in self.image)
        if not self.image:
            raise ValueError(f"case {self.id!r} has no image file")
        self.label = Path(self.label) if self.label not in (None, "") else None
        if self.slices is not None:
            start, stop = (int(v) for v in self.slices)
            if not 0 <= start < stop:
                raise ValueError(f"case {self.id!r}: slices must be [start, stop), start < stop")
            self.slices = (start, stop)
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"case {self.id!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.role in ("labelled", "val") and self.label is None:
            raise ValueError(f"case {self.id!r} has role {self.role!r} but no label")
        self.label_map = parse_label_map(self.label_map)
        if self.tissue_map is not None:
            if self.label is None:
                raise ValueError(f"case {self.id!r} has a tissue_map but no label file")
            self.tissue_map = {int(k): str(v) for k, v in dict(self.tissue_map).items()}

    @property
    def split_group(self) -> str:
        return self.group or self.id

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "image": [str(p) for p in self.image],
            "label": None if self.label is None else str(self.label),
        }
        if self.slices is not None:
            out["slices"] = list(self.slices)
        if self.role is not None:
            out["role"] = self.role
        if self.group is not None:
            out["group"] = self.group
        if self.label_map is not None:
            out["label_map"] = (
                self.label_map
                if isinstance(self.label_map, str)
                else {str(k): int(v) for k, v in self.label_map.items()}
            )
        if self.tissue_map is not None:
            out["tissue_map"] = {str(k): v for k, v in self.tissue_map.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path | None = None) -> Case:
        """Build a case from a JSON entry; relative paths are resolved against ``base``."""
        images = data["image"]
        images = [images] if isinstance(images, str) else list(images)
        label = data.get("label") or None
        case_id = data.get("id") or _strip_nifti(Path(images[0]).name)
        if data.get("slices") is not None and "id" not in data:
            start, stop = data["slices"]
            case_id = f"{case_id}[{start}:{stop}]"  # one volume may be listed once per slab
        return cls(
            id=str(case_id),
            image=tuple(_resolve(p, base) for p in images),
            label=_resolve(label, base) if label else None,
            slices=tuple(data["slices"]) if data.get("slices") is not None else None,
            role=data.get("role"),
            group=data.get("group"),
            label_map=data.get("label_map"),
            tissue_map=data.get("tissue_map"),
        )


def parse_label_map(label_map: LabelMap) -> LabelMap:
    """Normalise a label map: None, "binary", or {int: int} (JSON string keys accepted)."""
    if label_map is None:
        return None
    if isinstance(label_map, str):
        if label_map != "binary":
            raise ValueError(f"label_map string must be 'binary', got {label_map!r}")
        return label_map
    return {int(k): int(v) for k, v in dict(label_map).items()}


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------


def discover_cases(
    source: str | Path,
    layout: str = "auto",
    label_map: LabelMap = None,
    modalities: Sequence[str] = ("flair",),
) -> list[Case]:
    """List the cases of a data set, sorted by id.

    ``label_map`` overrides the layout's default for every case (BraTS defaults to "binary");
    ``modalities`` picks the BraTS channel files, in order.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    if layout == "auto":
        layout = detect_layout(path)
    finders = {
        "folder": _folder,
        "msd": _msd,
        "json": _json,
        "csv": _csv,
        "brats": lambda p: _brats(p, modalities),
        "acdc": _acdc,
    }
    if layout not in finders:
        raise ValueError(f"unknown layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
    cases = finders[layout](path)
    if not cases:
        raise ValueError(f"no cases found in {path} (layout {layout!r})")
    if label_map is not None:
        parsed = parse_label_map(label_map)
        for case in cases:
            case.label_map = parsed
    ids = [c.id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate case ids in {path}: {duplicates[:5]}")
    return sorted(cases, key=lambda c: c.id)


def detect_layout(path: Path) -> str:
    """Guess the layout of a file or folder (see the module docstring)."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "json"
        if suffix == ".csv":
            return "csv"
        raise ValueError(f"cannot tell the layout of file {path}: expected .json or .csv")
    if (path / "imagesTr").is_dir():
        return "msd"
    subdirs = [d for d in path.iterdir() if d.is_dir()]
    if any(_BRATS_DIR.match(d.name) for d in subdirs):
        return "brats"
    if any(_ACDC_DIR.match(d.name) for d in subdirs):
        return "acdc"
    if any(_FOLDER_IMAGE.match(f.name) for f in path.iterdir() if f.is_file()):
        return "folder"
    if (path / "dataset.json").is_file():
        return "json"
    raise ValueError(
        f"cannot tell the layout of {path}: expected <id>_image.nii.gz files, imagesTr/, "
        "BraTS20_* or patientXXX folders; pass layout= explicitly"
    )


_NIFTI = r"\.nii(?:\.gz)?"
_FOLDER_IMAGE = re.compile(rf"^(?P<id>.+)_image(?P<unlabelled>_unlabell?ed)?{_NIFTI}$")
_BRATS_DIR = re.compile(r"^BraTS\d*_(?:Training|Validation|Testing)_\d+$", re.IGNORECASE)
_ACDC_DIR = re.compile(r"^patient\d+$")
_ACDC_FRAME = re.compile(rf"^(?P<patient>patient\d+)_frame(?P<frame>\d+){_NIFTI}$")
_NNUNET_CHANNEL = re.compile(rf"^(?P<id>.+)_(?P<channel>\d{{4}}){_NIFTI}$")


def _strip_nifti(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _resolve(path: str | Path, base: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return p.resolve()


def _folder(path: Path) -> list[Case]:
    cases = []
    for f in sorted(path.iterdir()):
        m = _FOLDER_IMAGE.match(f.name)
        if not m or not f.is_file():
            continue
        label = None if m["unlabelled"] else _find_nifti(path, f"{m['id']}_label")
        cases.append(Case(id=m["id"], image=(f.resolve(),), label=label and label.resolve()))
    return cases


def _msd(path: Path) -> list[Case]:
    cases = _msd_images(path / "imagesTr", path / "labelsTr")
    if (path / "imagesTs").is_dir():
        cases += _msd_images(path / "imagesTs", None)
    return cases


def _msd_images(images_dir: Path, labels_dir: Path | None) -> list[Case]:
    files = sorted(
        f for f in images_dir.iterdir() if f.is_file() and not f.name.startswith(("._", "."))
    )
    files = [f for f in files if f.name.endswith(NIFTI_SUFFIXES)]
    # nnU-Net names channels <id>_0000; MSD stores them in one 4D file named <id>.
    groups: dict[str, list[tuple[int, Path]]] = {}
    nnunet = bool(files) and all(_NNUNET_CHANNEL.match(f.name) for f in files)
    for f in files:
        m = _NNUNET_CHANNEL.match(f.name)
        if nnunet and m:
            groups.setdefault(m["id"], []).append((int(m["channel"]), f))
        else:
            groups.setdefault(_strip_nifti(f.name), []).append((0, f))
    cases = []
    for case_id, channels in groups.items():
        label = _find_nifti(labels_dir, case_id) if labels_dir and labels_dir.is_dir() else None
        images = tuple(f.resolve() for _, f in sorted(channels))
        cases.append(Case(id=case_id, image=images, label=label and label.resolve()))
    return cases


def _json(path: Path) -> list[Case]:
    if path.is_dir():
        path = path / "dataset.json"
    data = json.loads(path.read_text())
    base = path.parent
    if isinstance(data, list):
        entries: list[Any] = data
    else:
        entries = []
        for key in ("cases", "training", "validation"):
            entries += data.get(key, [])
        for key in ("unlabelled", "unlabeled", "test"):
            # MSD lists test images as bare path strings.
            entries += [
                {"image": e} if isinstance(e, (str, list)) else {**e, "label": None}
                for e in data.get(key, [])
            ]
        if not entries:
            raise ValueError(f"{path}: expected a list of cases or a 'cases'/'training' list")
    return [Case.from_dict({"image": e} if isinstance(e, str) else e, base) for e in entries]


def _csv(path: Path) -> list[Case]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image" not in rows[0]:
        raise ValueError(f"{path}: expected a header row with an 'image' column")
    cases = []
    for row in rows:
        entry: dict[str, Any] = {"image": [p.strip() for p in row["image"].split(";") if p.strip()]}
        if (row.get("label") or "").strip():
            entry["label"] = row["label"].strip()
        for key in ("id", "role", "group"):
            if (row.get(key) or "").strip():
                entry[key] = row[key].strip()
        if (row.get("slices") or "").strip():
            entry["slices"] = [int(v) for v in re.split(r"[:,\-]", row["slices"].strip())]
        cases.append(Case.from_dict(entry, path.parent))
    return cases


def _brats(path: Path, modalities: Sequence[str]) -> list[Case]:
    cases = []
    for d in sorted(p for p in path.iterdir() if p.is_dir() and _BRATS_DIR.match(p.name)):
        images = []
        for modality in modalities:
            f = _find_nifti(d, f"{d.name}_{modality}")
            if f is None:
                raise FileNotFoundError(f"{d}: missing {d.name}_{modality}.nii(.gz)")
            images.append(f.resolve())
        label = _find_nifti(d, f"{d.name}_seg")
        if label is None:
            # BraTS2020 training case 355 ships its mask under another name (W39_1998...Segm.nii).
            others = [f for f in d.iterdir() if re.search(r"seg", f.name, re.IGNORECASE)]
            label = others[0] if len(others) == 1 else None
        label = label.resolve() if label else None
        cases.append(Case(id=d.name, image=tuple(images), label=label, label_map="binary"))
    return cases


def _acdc(path: Path) -> list[Case]:
    cases = []
    for d in sorted(p for p in path.iterdir() if p.is_dir() and _ACDC_DIR.match(p.name)):
        for f in sorted(d.iterdir()):
            m = _ACDC_FRAME.match(f.name)  # excludes _4d and _gt files by construction
            if not m or m["patient"] != d.name:
                continue
            stem = _strip_nifti(f.name)
            label = _find_nifti(d, f"{stem}_gt")
            cases.append(
                Case(id=stem, image=(f.resolve(),), label=label and label.resolve(), group=d.name)
            )
    return cases
