"""What a segmentation request may choose: the one options schema of the gateway's
``/v1/segment`` and ``/v1/jobs``, the Python client, the batch command and ``sfpc predict``.

:class:`SegmentOptions` declares every option once (name, type, limits, description). Everything
else is generated from it: the gateway's query parameters, multipart form fields and OpenAPI
request body (``sfpc.server.routers``), the client's query string (:func:`option_params`), and
the command-line flags of ``sfpc client`` and ``sfpc predict`` (:func:`add_option_arguments`).
Text values from any of those travel through one parser, :func:`parse_options`.
"""

from __future__ import annotations

import argparse
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sfpc.errors import OptionError
from sfpc.io import artefacts as files

OutputName = Literal["mask_nifti", "seg_dicom", "entropy_nifti", "mi_nifti", "overlay_png",
                     "report_json", "pmap_dicom", "sr_dicom", "sc_dicom", "rtstruct_dicom"]
ResponseFormat = Literal["auto", "nifti", "dicom-seg", "zip"]
MapPrecision = Literal["uint8", "uint16"]  # the keys of files.MAP_PRECISIONS

OUTPUT_FILES: dict[str, tuple[str, str]] = {
    "mask_nifti": ("mask.nii.gz", files.NIFTI_MEDIA_TYPE),
    "seg_dicom": ("segmentation.dcm", files.DICOM_MEDIA_TYPE),
    "entropy_nifti": ("entropy.nii.gz", files.NIFTI_MEDIA_TYPE),
    "mi_nifti": ("mutual_information.nii.gz", files.NIFTI_MEDIA_TYPE),
    "overlay_png": ("overlay.png", files.PNG_MEDIA_TYPE),
    "report_json": ("report.json", files.JSON_MEDIA_TYPE),
    # DICOM objects beside the SEG (sfpc.io.dicom_results): the entropy as a Parametric Map,
    # a TID 1500 measurement report (Comprehensive 3D SR), the overlay as a Secondary Capture,
    # the mask as an RT Structure Set.
    "pmap_dicom": ("uncertainty.dcm", files.DICOM_MEDIA_TYPE),
    "sr_dicom": ("measurements.dcm", files.DICOM_MEDIA_TYPE),
    "sc_dicom": ("overlay.dcm", files.DICOM_MEDIA_TYPE),
    "rtstruct_dicom": ("rtstruct.dcm", files.DICOM_MEDIA_TYPE),
}
OUTPUTS: tuple[str, ...] = typing.get_args(OutputName)
FORMATS: tuple[str, ...] = typing.get_args(ResponseFormat)
UNCERTAINTY_OUTPUTS = frozenset({"entropy_nifti", "mi_nifti", "pmap_dicom"})
# DICOM objects derived from the source series: only for DICOM uploads, and only when the series
# has the identifiers they must reference (checked before inference, sfpc.io.dicom_seg).
DICOM_OUTPUTS = frozenset({"seg_dicom", "pmap_dicom", "sr_dicom", "sc_dicom", "rtstruct_dicom"})
# Outputs that show uncertainty when the model has it (it is turned on for them), without
# needing it: the overlay's heat map, the report's uncertainty measurements.
SHOWS_UNCERTAINTY = frozenset({"overlay_png", "sc_dicom", "sr_dicom"})
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class SegmentOptions(BaseModel):
    """What a segmentation request may choose.

    ``outputs`` None means the default for the upload: ``mask_nifti`` for NIfTI,
    ``seg_dicom`` for DICOM; with ``uncertainty`` true the defaults also hold ``entropy_nifti``,
    ``mi_nifti`` and ``report_json``. Asking for an uncertainty output implies ``uncertainty``.
    ``format`` packs the response: ``auto`` sends a single artefact as itself and several as a
    zip; ``nifti`` / ``dicom-seg`` send the mask as that file alone (adding it to the outputs);
    ``zip`` always zips.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Served model name (GET /v1/models); default "
                              "model when omitted.", max_length=200)
    outputs: list[OutputName] | None = Field(
        None, description="Artefacts to produce, repeated or comma-separated: "
        + ", ".join(OUTPUTS) + ". Default: the mask (mask_nifti for NIfTI, seg_dicom for "
        "DICOM), with uncertainty also entropy_nifti, mi_nifti and report_json. The DICOM "
        "objects (seg_dicom, pmap_dicom, sr_dicom, sc_dicom, rtstruct_dicom) need a DICOM "
        "upload.")
    uncertainty: bool = Field(False, description="Run the FLPM multi-sample graph (entropy and "
                              "mutual information maps, uncertainty statistics).")
    flip: bool = Field(False, description="Also run every window mirrored along the model grid's "
                       "first axis (left-right for 3D, axial and coronal models) and average "
                       "(test-time augmentation: twice the cost; with uncertainty, FLPM's samples "
                       "of both passes). Only for models trained with flips.")
    series_uid: str | None = Field(None, description="DICOM: SeriesInstanceUID to segment when "
                                   "the upload holds several series.", max_length=64)
    map_precision: MapPrecision = Field(
        typing.cast(MapPrecision, files.DEFAULT_MAP_PRECISION),
        description="Storage of the entropy and MI NIfTI maps (values in [0, 1] through "
        "scl_slope): uint8, each map in 255 steps of its own range "
        "(at most 1/255: within 0.002 of the float map; a map of small values such as the "
        "mutual information is stored finer), what a viewer shows; uint16, steps of 1/65535, "
        "within 8e-6, for analysis (files up to 5x larger on noisy volumes, slower to write). "
        "The report's map_files states each file's step and largest error.")
    format: ResponseFormat = Field("auto", description="Packing of the result: auto (a single "
                                   "artefact as itself, several as a zip; sfpc predict writes "
                                   "each file), nifti / dicom-seg (the mask alone, as that "
                                   "file), zip (always one zip).")

    @field_validator("outputs")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("outputs is empty; omit it for the default or name at least one of "
                             f"{', '.join(OUTPUTS)}")
        return list(dict.fromkeys(value))

    def wants_uncertainty(self) -> bool:
        """Whether the multi-sample graph must run."""
        return self.uncertainty or bool(UNCERTAINTY_OUTPUTS.intersection(self.outputs or ()))

    def resolve_outputs(self, source: str) -> list[str]:
        """The artefacts to produce for an upload decoded from ``source`` ("nifti"/"dicom")."""
        chosen: list[str]
        if self.outputs is not None:
            chosen = list(self.outputs)
        else:
            chosen = ["seg_dicom" if source == "dicom" else "mask_nifti"]
            if self.uncertainty:
                chosen += ["entropy_nifti", "mi_nifti", "report_json"]
        wanted = {"nifti": "mask_nifti", "dicom-seg": "seg_dicom"}.get(self.format)
        if wanted and wanted not in chosen:
            chosen.insert(0, wanted)
        derived = [name for name in OUTPUTS if name in chosen and name in DICOM_OUTPUTS]
        if derived and source != "dicom":
            what = ("a DICOM SEG (outputs=seg_dicom or format=dicom-seg) references"
                    if derived == ["seg_dicom"]
                    else f"DICOM objects ({', '.join(derived)}) reference")
            raise OptionError(
                f"{what} the source DICOM series, but this upload is {source}; ask "
                "for mask_nifti (and entropy_nifti, overlay_png, report_json) instead",
                code="seg_needs_dicom",
            )
        return [name for name in OUTPUTS if name in chosen]


# ----------------------------------------------------------------------------------------------
# The fields, as the gateway, the client and the command lines read them
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionField:
    """One field of :class:`SegmentOptions` in the terms every transport needs: ``kind`` "bool"
    (true/false), "list" (repeated or comma-separated) or "text"; the allowed values; the
    maximum length of a text value; the description (help text and OpenAPI)."""

    name: str
    kind: Literal["bool", "list", "text"]
    description: str
    choices: tuple[str, ...] = ()
    max_length: int | None = None

    @property
    def flag(self) -> str:
        """The command-line flag: ``--series-uid`` for ``series_uid``."""
        return "--" + self.name.replace("_", "-")


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def _describe_field(name: str, info: Any) -> OptionField:
    annotation = _without_none(info.annotation)
    max_length = next((m.max_length for m in info.metadata if hasattr(m, "max_length")), None)
    if annotation is bool:
        return OptionField(name, "bool", info.description or "")
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else ()
        return OptionField(name, "list", info.description or "", tuple(map(str, choices)))
    if typing.get_origin(annotation) is Literal:
        return OptionField(name, "text", info.description or "",
                           tuple(map(str, typing.get_args(annotation))), max_length)
    if annotation is str:
        return OptionField(name, "text", info.description or "", (), max_length)
    raise TypeError(f"SegmentOptions.{name}: no transport for type {info.annotation!r}; "
                    "options are booleans, text, literals or lists of literals")


@functools.cache
def option_fields() -> tuple[OptionField, ...]:
    """Every field of :class:`SegmentOptions`, in declaration order."""
    return tuple(_describe_field(name, info)
                 for name, info in SegmentOptions.model_fields.items())


def option_field(name: str) -> OptionField:
    found = next((f for f in option_fields() if f.name == name), None)
    if found is None:
        raise KeyError(name)
    return found


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in option_fields())


def split_list(values: str | Sequence[str]) -> list[str]:
    """A list option's items from repeated and/or comma-separated values."""
    if isinstance(values, str):
        values = [values]
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


def parse_bool(name: str, value: str | bool) -> bool:
    """A boolean option's text value (true/false, 1/0, yes/no, on/off; empty is false)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise OptionError(f"{name}={value!r} is not a boolean (true/false)", code="invalid_option")


def parse_options(raw: Mapping[str, Any]) -> SegmentOptions:
    """SegmentOptions from values as they arrive in a query string, a form or on a command line
    (text, repeated values as lists; already typed values pass through). None is "not given";
    an empty text is "not given" too. Invalid options raise :class:`OptionError`
    (``invalid_option``) whose ``detail`` lists each field's problem."""
    known = {f.name: f for f in option_fields()}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field = known.get(key)
        if value is None or field is None:
            if field is None and value is not None:
                values[key] = value  # refused below as an unknown option
            continue
        if field.kind == "list":
            values[key] = split_list(value)
        elif field.kind == "bool":
            values[key] = parse_bool(key, value[-1] if isinstance(value, list) else value)
        else:
            text = value[-1] if isinstance(value, list) else value
            if text != "":
                values[key] = text
    try:
        return SegmentOptions(**values)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                    for e in exc.errors(include_url=False, include_input=False)]
        text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise OptionError(f"invalid options: {text}", detail=problems) from None


def option_params(options: Mapping[str, Any]) -> dict[str, str]:
    """The query parameters that send ``options`` (values None, empty text or an empty list are
    left out, so the gateway applies its default); TypeError for a name that is no option."""
    known = {f.name: f for f in option_fields()}
    params: dict[str, str] = {}
    for key, value in options.items():
        field = known.get(key)
        if field is None:
            raise TypeError(f"unknown segmentation option {key!r}; the options are "
                            f"{', '.join(known)}")
        if value is None or value == "" or (field.kind == "list" and not value):
            continue
        if field.kind == "bool":
            params[key] = "true" if value else "false"
        elif field.kind == "list":
            params[key] = ",".join(split_list(value))
        else:
            params[key] = str(value)
    return params


# ----------------------------------------------------------------------------------------------
# Command-line flags
# ----------------------------------------------------------------------------------------------


class _ListAction(argparse.Action):
    """``--outputs a b``, ``--outputs a,b`` and ``--outputs a --outputs b`` alike; each item is
    checked against the field's choices."""

    def __init__(self, *args: Any, valid: tuple[str, ...] = (), **kwargs: Any) -> None:
        self.valid = valid
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = split_list(values)
        unknown = [item for item in items if self.valid and item not in self.valid]
        if unknown:
            parser.error(f"{option_string}: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(self.valid)}")
        if not items:
            parser.error(f"{option_string}: name at least one of {', '.join(self.valid)}")
        current = getattr(namespace, self.dest, None) or []
        setattr(namespace, self.dest, list(dict.fromkeys([*current, *items])))


def add_option_arguments(parser: argparse.ArgumentParser | Any, *,
                         exclude: Sequence[str] = (),
                         more_help: Mapping[str, str] | None = None,
                         several: bool = True) -> list[str]:
    """Add a flag per :class:`SegmentOptions` field (bar ``exclude``) to ``parser`` (a parser or
    an argument group), the field's description as help (plus ``more_help[name]``). A list
    option takes comma-separated values, repeated flags, and with ``several`` also several
    values after one flag (leave it off for a parser with positional arguments, which those
    values would swallow). Returns the names added; :func:`options_from_args` reads them
    back."""
    added = []
    for field in option_fields():
        if field.name in exclude:
            continue
        text = field.description + (" " + more_help[field.name]
                                    if more_help and field.name in more_help else "")
        text = text.replace("%", "%%")
        if field.kind == "bool":
            parser.add_argument(field.flag, dest=field.name, action="store_true", help=text)
        elif field.kind == "list":
            parser.add_argument(field.flag, dest=field.name, action=_ListAction,
                                nargs="+" if several else None, valid=field.choices,
                                default=None, metavar="NAME[,NAME...]", help=text)
        else:
            parser.add_argument(field.flag, dest=field.name, default=None,
                                choices=field.choices or None,
                                metavar=None if field.choices else field.name.upper(),
                                help=text)
        added.append(field.name)
    return added


def options_from_args(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The option values of parsed flags (those :func:`add_option_arguments` added), with
    ``overrides`` on top; give the result to :func:`parse_options` or a client method."""
    values = {f.name: getattr(args, f.name) for f in option_fields() if hasattr(args, f.name)}
    values.update(overrides)
    return values


__all__ = [
    "DICOM_OUTPUTS", "FORMATS", "OUTPUTS", "OUTPUT_FILES", "OptionField", "OutputName",
    "ResponseFormat", "SHOWS_UNCERTAINTY",
    "SegmentOptions", "UNCERTAINTY_OUTPUTS", "add_option_arguments", "option_field",
    "option_fields", "option_names", "option_params", "options_from_args", "parse_bool",
    "parse_options", "split_list",
]
