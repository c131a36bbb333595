"""Group the frames of a DICOM upload into stacks and pick the one to segment.

Grouping: frames belong to the same stack when they share the SeriesInstanceUID (files whose UID
is missing or empty group among themselves), the FrameOfReferenceUID, Rows/Columns, the
ImageOrientationPatient (within 1e-3) and the PixelSpacing (within 0.1 %). A series that mixes
geometries (a localizer with three planes) thus splits into several stacks.

Selection rule, in order:

1. ``series_uid`` given: the largest stack of that series (it must be an image series);
2. otherwise, among the stacks that are images this server can decode (greyscale, pixel data,
   not a derived object such as SEG or RTSTRUCT, a decodable transfer syntax): the one with the
   most slices (frames); ties go to the lowest SeriesNumber (missing numbers last), then to the
   smallest SeriesInstanceUID, so the choice never depends on upload order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sfpc.errors import UNPROCESSABLE, UploadError
from sfpc.io.dicom_frames import Frame, Instance
from sfpc.io.volume import SeriesSummary

_ORIENTATION_MATCH = 1e-3
_SPACING_MATCH = 1e-3


@dataclass
class Stack:
    """Frames that can form one volume (before sorting)."""

    series_uid: str | None
    frame_of_reference: str | None
    frames: list[Frame] = field(default_factory=list)

    @property
    def instances(self) -> list[int]:
        return list(dict.fromkeys(f.instance for f in self.frames))

    def accepts(self, frame: Frame, series_uid: str | None, frame_of_reference: str | None
                ) -> bool:
        first = self.frames[0]
        return (
            series_uid == self.series_uid
            and frame_of_reference == self.frame_of_reference
            and (frame.rows, frame.columns) == (first.rows, first.columns)
            and _close(frame.orientation, first.orientation, _ORIENTATION_MATCH, relative=False)
            and _close(frame.pixel_spacing, first.pixel_spacing, _SPACING_MATCH, relative=True)
        )


@dataclass(frozen=True)
class Rejected:
    """An instance that cannot be segmented, and why (status, code, words)."""

    instance: int
    status: int
    code: str
    reason: str


def group_stacks(instances: Sequence[Instance], frames: Sequence[Frame]) -> list[Stack]:
    stacks: list[Stack] = []
    for frame in frames:
        inst = instances[frame.instance]
        uid, frame_of_reference = inst.series_uid, inst.text("FrameOfReferenceUID")
        for stack in stacks:
            if stack.accepts(frame, uid, frame_of_reference):
                stack.frames.append(frame)
                break
        else:
            stacks.append(Stack(uid, frame_of_reference, [frame]))
    return stacks


def select_stack(
    instances: Sequence[Instance], stacks: Sequence[Stack], rejected: Sequence[Rejected],
    series_uid: str | None = None,
) -> tuple[Stack, str, tuple[SeriesSummary, ...]]:
    """The stack to segment, the rule that chose it (words), and summaries of everything else."""
    if series_uid is not None:
        wanted = [s for s in stacks if s.series_uid == series_uid]
        if not wanted:
            for r in rejected:
                if instances[r.instance].series_uid == series_uid:
                    raise UploadError(r.status, r.code,
                                      f"requested series {series_uid} {r.reason}")
            found = sorted({str(s.series_uid) for s in stacks}
                           | {str(instances[r.instance].series_uid) for r in rejected})
            raise UploadError(
                UNPROCESSABLE, "series_not_found",
                f"requested series {series_uid} is not in the upload; found: {', '.join(found)}",
            )
        chosen = max(wanted, key=lambda s: len(s.frames))
        rule = f"series_uid {series_uid} requested"
        if len(wanted) > 1:
            rule += (f" (largest of its {len(wanted)} geometry-consistent parts, "
                     f"{len(chosen.frames)} slices)")
    else:
        if not stacks:
            raise _nothing_to_segment(instances, rejected)
        chosen = min(stacks, key=lambda s: _rank(instances, s))
        if len(stacks) == 1:
            rule = "the only image series in the upload"
        else:
            rule = (f"most slices ({len(chosen.frames)}) among {len(stacks)} image series "
                    "(ties: lowest SeriesNumber, then SeriesInstanceUID)")
    others = [summarise(instances, s, eligible=True, reason="image series, not chosen")
              for s in stacks if s is not chosen]
    others += _rejected_summaries(instances, rejected)
    return chosen, rule, tuple(others)


def summarise(instances: Sequence[Instance], stack: Stack, *, eligible: bool, reason: str
              ) -> SeriesSummary:
    first = instances[stack.frames[0].instance]
    return SeriesSummary(
        series_instance_uid=stack.series_uid,
        modality=first.text("Modality"),
        series_number=first.integer("SeriesNumber"),
        series_description=first.text("SeriesDescription"),
        n_instances=len(stack.instances),
        n_frames=len(stack.frames),
        eligible=eligible,
        reason=reason,
    )


def _rank(instances: Sequence[Instance], stack: Stack) -> tuple[int, int, str]:
    number = instances[stack.frames[0].instance].integer("SeriesNumber")
    return (-len(stack.frames), number if number is not None else 1 << 62,
            stack.series_uid or "")


def _rejected_summaries(instances: Sequence[Instance], rejected: Sequence[Rejected]
                        ) -> list[SeriesSummary]:
    groups: dict[tuple[str | None, str], list[Rejected]] = {}
    for r in rejected:
        groups.setdefault((instances[r.instance].series_uid, r.reason), []).append(r)
    out = []
    for (uid, reason), members in groups.items():
        first = instances[members[0].instance]
        out.append(SeriesSummary(
            series_instance_uid=uid,
            modality=first.text("Modality"),
            series_number=first.integer("SeriesNumber"),
            series_description=first.text("SeriesDescription"),
            n_instances=len(members),
            n_frames=sum(instances[m.instance].n_frames for m in members),
            eligible=False,
            reason=reason,
        ))
    return out


def _nothing_to_segment(instances: Sequence[Instance], rejected: Sequence[Rejected]
                        ) -> UploadError:
    if not rejected:
        return UploadError(UNPROCESSABLE, "no_image_series", "the upload holds no DICOM image")
    parts = []
    for summary in _rejected_summaries(instances, rejected):
        what = summary.modality or "unknown modality"
        count = f"{summary.n_instances} file{'s' if summary.n_instances > 1 else ''}"
        parts.append(f"series {summary.series_instance_uid or '(no UID)'} ({what}, {count}) "
                     f"{summary.reason}")
    first = rejected[0]
    return UploadError(first.status, first.code,
                       "no image series to segment in the upload: " + "; ".join(parts))


def _close(a: object, b: object, tolerance: float, *, relative: bool) -> bool:
    if a is None or b is None:
        return a is None and b is None
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.maximum(np.abs(y), 1.0) if relative else 1.0
    return bool((np.abs(x - y) <= tolerance * scale).all())
