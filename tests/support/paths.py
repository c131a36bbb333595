"""Where the repository and the shared real data are."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SFPC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DATA_MISSING = f"shared data folder {DATA} is absent (set SFPC_SHARED_DATA)"
NIFTI_IMAGES = sorted(DATA.glob("*/*_image*.nii.gz")) if DATA.is_dir() else []
DICOM_SERIES = DATA / "dicom" / "mr_pd_series"
TRANSFER_SYNTAXES = DATA / "dicom" / "transfer_syntaxes"
ORGANS = DATA / "organs"
