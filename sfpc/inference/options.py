"""What a segmentation request may choose: the one options schema of the gateway's
``/v1/segment`` and ``/v1/jobs``, the Python client, the batch command and ``sfpc predict``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sfpc.errors import OptionError
from sfpc.io import artefacts as files

OutputName = Literal["mask_nifti", "seg_dicom", "entropy_nifti", "mi_nifti", "overlay_png",
                     "report_json"]

OUTPUT_FILES: dict[str, tuple[str, str]] = {
    "mask_nifti": ("mask.nii.gz", files.NIFTI_MEDIA_TYPE),
    "seg_dicom": ("segmentation.dcm", files.DICOM_MEDIA_TYPE),
    "entropy_nifti": ("entropy.nii.gz", files.NIFTI_MEDIA_TYPE),
    "mi_nifti": ("mutual_information.nii.gz", files.NIFTI_MEDIA_TYPE),
    "overlay_png": ("overlay.png", files.PNG_MEDIA_TYPE),
    "report_json": ("report.json", files.JSON_MEDIA_TYPE),
}
OUTPUTS: tuple[str, ...] = tuple(OUTPUT_FILES)
UNCERTAINTY_OUTPUTS = frozenset({"entropy_nifti", "mi_nifti"})
FORMATS = ("auto", "nifti", "dicom-seg", "zip")
ResponseFormat = Literal["auto", "nifti", "dicom-seg", "zip"]


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
    outputs: list[OutputName] | None = Field(None, description="Artefacts to produce.")
    uncertainty: bool = Field(False, description="Run the FLPM multi-sample graph (entropy and "
                              "mutual information maps, uncertainty statistics).")
    flip: bool = Field(False, description="Also run every window mirrored along the model grid's "
                       "first axis (left-right for 3D, axial and coronal models) and average "
                       "(test-time augmentation: twice the cost; with uncertainty, FLPM's samples "
                       "of both passes). Only for models trained with flips.")
    series_uid: str | None = Field(None, description="DICOM: SeriesInstanceUID to segment when "
                                   "the upload holds several series.", max_length=64)
    format: ResponseFormat = Field("auto", description="Response packing.")

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
        if self.outputs is not None:
            chosen = list(self.outputs)
        else:
            chosen = ["seg_dicom" if source == "dicom" else "mask_nifti"]
            if self.uncertainty:
                chosen += ["entropy_nifti", "mi_nifti", "report_json"]
        wanted = {"nifti": "mask_nifti", "dicom-seg": "seg_dicom"}.get(self.format)
        if wanted and wanted not in chosen:
            chosen.insert(0, wanted)
        if "seg_dicom" in chosen and source != "dicom":
            raise OptionError(
                "a DICOM SEG (outputs=seg_dicom or format=dicom-seg) references the source DICOM "
                f"series, but this upload is {source}; ask for mask_nifti instead",
                code="seg_needs_dicom",
            )
        return [name for name in OUTPUTS if name in chosen]
