"""What the shift benchmarks share (benchmarks/robustness.py, benchmarks/uncertainty_shift.py):
their common flags, the choice of shifts, reading ct_a, progress lines and the JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from sfpc.inference.contract import DEFAULT_MODEL_DIR
from sfpc.training.shifts import CALIBRATION_SHIFTS, SHIFTS

DATA = Path(os.environ.get("SFPC_SHARED_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data")) / "organs"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_common_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """--export, --data, --shifts, --json, --seed and --threads."""
    parser.add_argument("--export", type=Path, default=DEFAULT_MODEL_DIR,
                        help="export directory (default: the embedded default model)")
    parser.add_argument("--data", type=Path, default=DATA,
                        help=f"folder with {data_help} (default: ../shared/data/organs or "
                             "$SFPC_SHARED_DATA/organs)")
    parser.add_argument("--shifts", default="all",
                        help="comma-separated shift names, 'all' (the benchmark's) or "
                             "'calibration' (the held-apart settings the review flag is fitted "
                             "on: " + ", ".join(CALIBRATION_SHIFTS).replace("%", "%%") + "); "
                             "known: "
                             + ", ".join(SHIFTS).replace("%", "%%"))  # argparse %-formats
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise shifts")
    parser.add_argument("--threads", type=int,
                        default=int(os.environ.get("SFPC_ONNX_INTRA_OP_THREADS", "1")),
                        help="ONNX Runtime intra-op threads (default: "
                             "$SFPC_ONNX_INTRA_OP_THREADS or 1)")


def chosen_shifts(parser: argparse.ArgumentParser, spec: str) -> list[str]:
    """The shift names of ``--shifts`` (a usage error names the unknown ones)."""
    if spec in ("all", "calibration"):
        return list(SHIFTS if spec == "all" else CALIBRATION_SHIFTS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHIFTS and n not in CALIBRATION_SHIFTS]
    if unknown:
        parser.error(f"unknown shifts {unknown}; known: {', '.join(SHIFTS)}")
    return names


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels as stored (no scaling to float) and the affine."""
    nii = nib.Nifti1Image.from_filename(str(path))
    return np.asarray(nii.dataobj), np.asarray(nii.affine, dtype=np.float64)


def read_ct_a(parser: argparse.ArgumentParser, data: Path
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ct_a's image, label and affine (a usage error when a file is missing or the two are on
    different grids)."""
    image_path, label_path = data / "ct_a_image.nii.gz", data / "ct_a_label.nii.gz"
    for p in (image_path, label_path):
        if not p.is_file():
            parser.error(f"{p} not found (point --data at shared/data/organs)")
    image, affine = read_nifti(image_path)
    label, label_affine = read_nifti(label_path)
    if not np.allclose(affine, label_affine, atol=1e-3):
        parser.error(f"{image_path} and {label_path} are on different grids")
    return image, label, affine


def command_line() -> str:
    """The command as typed (script path relative to the repository), for the JSON's record."""
    import shlex

    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return " ".join(["python", str(script), *(shlex.quote(a) for a in sys.argv[1:])])


def write_results(path: Path | None, result: Mapping[str, Any], started: float) -> None:
    """``result`` plus the run's seconds as JSON at ``path`` (if given), and the closing line."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "seconds": round(time.perf_counter() - started, 1)},
                                   indent=1) + "\n")
        log(f"wrote {path}")
    log(f"done in {time.perf_counter() - started:.0f} s")
