"""`sfpc build-default-model`: re-create the embedded default model from the data, in one command.

The shipped model (``sfpc/default_model/``) is a 2D SFPC model for spleen, liver and stomach on
CT, trained semi-supervised on the TotalSegmentator test CTs (``shared/data/organs``). The steps
are the project's own commands, in order, with the committed config
``configs/default_organ_ct.yaml``:

1. ``sfpc organ-split``: a seeded, stratified 20% of ct_a's axial slices as labelled, a held-apart
   block of slices for validation (never labelled, never seen), everything else of ct_a and all of
   ct_b as the unlabelled pool;
2. ``sfpc train --config configs/default_organ_ct.yaml``;
3. ``sfpc export`` of the *last* checkpoint (not the best on validation: the card's numbers are
   then measured on slices that played no part in training or model selection);
4. validation of the exported ONNX graphs through the serving engine on the raw ct_a volume
   (HU, its own affine), scored on the validation block, written into the metadata and the model
   card ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default_organ_ct.yaml"
DEFAULT_OUT = REPO / "sfpc" / "default_model"
MODEL_NAME = "sfpc-organs-ct"
# 0.1.0: 20 labelled slices, light augmentation; 0.2.0: every label, augmentation for shift.
MODEL_VERSION = "0.2.0"
CARD_FILE = "MODEL_CARD.md"
COMMAND = "make default-model"


def validate_export(export_dir: str | Path, data_dir: str | Path,
                    val_block: Sequence[int] | None = None) -> dict[str, Any]:
    """Score an exported organ model through the serving engine (ONNX Runtime) on ct_a.

    The whole raw volume goes in (as a user would post it); the metrics are computed on the
    validation block of axial slices only, on ct_a's own 3 mm grid, against the mapped labels.
    """
    from sfpc.inference.backends import make_backend
    from sfpc.inference.contract import ModelMetadata
    from sfpc.inference.engine import Engine
    from sfpc.inference.preprocess import to_orientation
    from sfpc.training.metrics import case_metrics
    from sfpc.training.organ_task import LABEL_MAP, VAL_BLOCK

    meta = ModelMetadata.load(export_dir)
    lo, hi = val_block or meta.training.get("val_block") or VAL_BLOCK
    data = Path(data_dir)
    img = nib.load(str(data / "ct_a_image.nii.gz"))
    lab = nib.load(str(data / "ct_a_label.nii.gz"))
    engine = Engine(make_backend("onnxruntime", export_dir=str(export_dir)), meta)
    t0 = time.perf_counter()
    result = engine.segment(np.asarray(img.dataobj), img.affine)
    seconds = time.perf_counter() - t0
    # Score in RAS so that "axial slices lo:hi" means what organ_task's split means.
    pred, _, _ = to_orientation(result.mask, img.affine, "RAS")
    raw, _, _ = to_orientation(np.asarray(lab.dataobj), lab.affine, "RAS")
    gt = np.zeros(raw.shape, dtype=np.uint8)
    for src, dst in LABEL_MAP.items():
        gt[raw == src] = dst
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(img.affine))
    metrics = case_metrics(pred[..., lo:hi], gt[..., lo:hi], meta.num_classes, spacing,
                           class_names=meta.class_names)
    return {"case": f"ct_a axial slices [{lo}, {hi})", "metrics": metrics,
            "seconds": round(seconds, 2)}


RESAMPLING_TEXT = {
    "area": "each model voxel the mean of the finer input voxels it covers, so a thin, noisy "
            "scan reaches the model as a 3 mm acquisition would",
    "linear": "linear interpolation",
}


def calibration_record(calibration: dict[str, Any]) -> dict[str, Any]:
    """What the card says about the temperature fit, kept in the metadata (``metrics``) so that
    the card can be rendered again from the export alone."""
    summary = calibration.get("summary") or {}
    b, a = summary.get("before", {}).get("flpm", {}), summary.get("after", {}).get("flpm", {})
    return {"mode": calibration.get("mode", "slices"), "cases": summary.get("cases"),
            "ece_before": b.get("ece"), "ece_after": a.get("ece"),
            "ece_organ_before": b.get("ece_foreground_region"),
            "ece_organ_after": a.get("ece_foreground_region")}


def _calibration_text(meta: Any) -> str:
    quality = meta.quality or {}
    flag = (f"Cases whose mean boundary uncertainty exceeds {quality['threshold']:.4f} are "
            f"flagged \"review recommended\" ({quality.get('rule', '')}); on the cases it was "
            f"fitted on: sensitivity {quality.get('sensitivity', float('nan')):.2f}, specificity "
            f"{quality.get('specificity', float('nan')):.2f}, {quality.get('poor_cases')} of "
            f"{quality.get('cases')} cases below the Dice target {quality.get('dice_target')}."
            if quality.get("threshold") is not None else
            "No review threshold has been calibrated for this export.")
    c = (meta.metrics or {}).get("calibration")
    if not c or c.get("ece_before") is None:
        return f"Temperature {meta.temperature:.3f}. {flag}"
    n = c.get("cases")
    if c.get("mode") == "shifts":
        fitted = (f"Temperature and threshold were fitted on {n} cases that the model never "
                  f"trained on: the held-apart block under each of the calibration shifts of "
                  f"`sfpc.training.shifts` (noise, grids, simulated contrast, field-of-view "
                  f"crops, body size), settings that differ from the robustness benchmark's "
                  f"below, where the flag is then tested.")
    else:
        fitted = (f"Temperature and threshold were fitted on the same {n} validation slices "
                  f"they are reported on (there is no other labelled CT), so they are "
                  f"optimistic.")
    return (f"Temperature {meta.temperature:.3f}. Expected calibration error of the "
            f"uncertainty-mode mean probabilities on those cases, before -> after: "
            f"{c['ece_before']:.4f} -> {c['ece_after']:.4f} over all voxels, "
            f"{c['ece_organ_before']:.3f} -> {c['ece_organ_after']:.3f} in the organ region "
            f"(voxels predicted or labelled as an organ). {fitted} {flag}")


def _robustness_text(robustness: dict[str, Any] | None) -> str:
    if not robustness:
        return ("Not measured for this export: run `python benchmarks/robustness.py --export "
                "<this folder> --json r.json` and `sfpc build-default-model --card-only "
                "--robustness r.json`.")
    rows = ["| shift of ct_a's block | mean Dice | spleen | liver | stomach | review flag |",
            "|---|---|---|---|---|---|"]
    for r in robustness["shifts"]:
        d, review = r["dice"], r.get("review") or {}
        flag = {True: "fires", False: "silent"}.get(review.get("review_recommended"), "-")
        rows.append(f"| {r['shift']} | {d['mean']:.3f} | {d['spleen']:.3f} | {d['liver']:.3f} "
                    f"| {d['stomach']:.3f} | {flag} |")
    text = "\n".join(rows)
    ct_b = robustness.get("ct_b")
    if ct_b:
        v = ct_b["volumes_ml"]
        fired = (ct_b.get("review") or {}).get("review_recommended")
        text += (f"\n\nct_b (the unlabelled chest-abdomen CT of another patient, 1.5 mm, "
                 f"contrast-enhanced; in the unlabelled training pool): predicted spleen "
                 f"{v['spleen']:.0f} mL, liver {v['liver']:.0f} mL, stomach {v['stomach']:.0f} "
                 f"mL; review flag {'fires' if fired else 'silent'}. There are no labels to "
                 f"score it against.")
    settings = robustness.get("settings", {})
    return (f"`{settings.get('command', 'python benchmarks/robustness.py')}`, the held-out "
            f"block [96, 106) of ct_a under synthetic shifts (docs/robustness.md says what "
            f"each is; silver-standard labels):\n\n{text}")


def _context_text(meta: Any) -> str:
    """A 2.5D model sees more than the slice it labels; users choosing slabs to send need to
    know (empty for a plain 2D model)."""
    k = int(getattr(meta, "context_slices", 0) or 0)
    if not k:
        return ""
    return f", each seen with its {k} neighbouring slice{'s' if k > 1 else ''} on either side"


def _grid_text(meta: Any) -> str:
    """What the engine does to a scan's grid. A plain 2D model keeps each scan's slices; a
    2.5D one resamples them too, since its neighbours must lie a fixed distance apart."""
    spacing = meta.spacing  # the contract also allows one number for every axis
    values = list(spacing) if isinstance(spacing, (list, tuple)) else [spacing] * 3
    axis = meta.plane_axis
    in_plane = [v for a, v in enumerate(values) if a != axis]
    how = RESAMPLING_TEXT[meta.resampling]
    k = int(getattr(meta, "context_slices", 0) or 0)
    if not k:
        return (f"resamples in-plane to {in_plane[0]} x {in_plane[1]} mm ({how};\nslices keep "
                "their own spacing)")
    return (f"resamples to {' x '.join(str(v) for v in values)} mm ({how};\nslices too, so "
            f"that the {k} neighbouring slice{'s' if k > 1 else ''} on either side that the "
            f"model sees with each slice lie {values[axis]} mm apart whatever the scan's slice "
            "thickness)")


def model_card(meta: Any, validation: dict[str, Any], command: str,
               robustness: dict[str, Any] | None = None) -> str:
    """The model card, from the metadata, the measured validation numbers and (optionally)
    the robustness benchmark's JSON."""
    m = validation["metrics"]
    rows = ["| class | Dice | HD95 (mm) | ASD (mm) | boundary Dice |", "|---|---|---|---|---|"]
    for name in [*meta.class_names[1:], "mean"]:
        v = m[name]
        rows.append(f"| {name} | {v['dice']:.3f} | {v['hd95']:.1f} | {v['asd']:.2f} | "
                    f"{v['boundary_dice']:.3f} |")
    t = meta.training
    aug = t.get("augment") or {}
    n_lab = len(t.get("labelled_slices", []))
    rest = t.get("n_unlabelled_ct_a_slices")
    unlabelled = ("all of ct_b" if rest == 0 else
                  f"{'the' if rest is None else f'the other {rest}'} slices of ct_a outside the "
                  f"validation block and all of ct_b")
    contrast = ""
    if aug.get("enhance"):
        contrast = (" Because ct_a was scanned without contrast and most clinical abdominal "
                    "CTs are portal-venous, training simulates intravenous contrast on the "
                    "labelled slices (`augment.enhance`: every enhancing tissue of ct_a's full "
                    "TotalSegmentator label map - vessels, kidneys, spleen, liver, pancreas, "
                    "bowel wall, muscle - brightened by a random phase strength times a "
                    "per-tissue range, training/enhancement.py)"
                    + (", and replaces the stomach's content with gas, water, positive oral "
                       "contrast or an air-fluid level" if aug["enhance"].get("p_fill") else "")
                    + ".")
    return f"""# Model card: {meta.name} {meta.version}

**Task.** {meta.task}. 2D model run slice by slice on axial slices{_context_text(meta)}; classes
{", ".join(f"{i} = {n}" for i, n in enumerate(meta.class_names))}.

**Method.** SFPC (semi-supervised, feature-perturbed consistency; shared encoder, segmentation
decoder with FLPM, reconstruction decoder for training only), trained with this project's
`sfpc train`. The uncertainty graph applies FLPM M = {meta.perturbation.get("M")} times in one
pass (tau = {meta.perturbation.get("tau")}).

**Input expectations.** CT in Hounsfield units (rescale slope/intercept applied, as the server's
DICOM reader does), any orientation, any spacing: the engine reorients to {meta.orientation},
{_grid_text(meta)},
clips to the window {meta.normalisation.get("window")} HU and scales to [0, 1]. Abdominal field of
view. Not for MR (intensities are meaningless to it) or paediatric anatomy.

**Training data and licences.** The TotalSegmentator 2.18.0 test CTs (Apache-2.0):
`ct_a` (abdominal CT without contrast, 122x101x112 at 3 mm) with TotalSegmentator's own 'total'
labels (ids 1, 5, 6 -> spleen, liver, stomach) - model outputs, a *silver standard*, not manual
tracing - and `ct_b` (chest-abdomen CT with contrast, 1.5 mm, no labels).
Labelled: {t.get("n_labelled")} runs of slices = {n_lab} axial slices of ct_a
(a fraction {t.get("labelled_fraction_slices")} of its {t.get("n_slices", 112)} slices; selection
"{t.get("selection")}"); unlabelled: {unlabelled}.
Augmentation: {json.dumps(aug)}. No left-right flips (they would swap liver and
spleen).{contrast} Iterations: {t.get("iterations")}.

**Validation.** {validation["case"]}: a block of slices held apart from training
(never labelled, never in the unlabelled pool, with a {t.get("gap")}-slice gap on each side),
scored on the exported ONNX graphs through the serving engine, from the raw HU volume, against
the silver-standard labels (`{command}` prints it; the test suite re-scores it):

{chr(10).join(rows)}

This is one patient; figures on other patients and scanners will differ, and the labels are
themselves model outputs.

**Robustness.** {_robustness_text(robustness)}

**Calibration and review flag.** {_calibration_text(meta)}

**Known limits.** Abdominal field of view only: ct_a holds no heart and no upper chest, and on
ct_b's chest slices the model labels the contrast-filled heart and great vessels as liver and
chest-wall muscle as stomach or spleen (ct_b's overlay, docs/robustness.md); crop uploads to the
abdomen. One labelled patient, scanned without contrast, with silver-standard labels:
the contrast, noise, field-of-view and body-size variation above is simulated, not seen. No
labelled second patient exists in this project, so accuracy on other patients is not measured;
expect lower accuracy on unusual anatomy, strong pathology, metal artefacts and fields of view
that cut organs. The stomach's appearance depends on its filling (gas, fluid, contrast) and is
the least reliable class. The uncertainty maps flag where the model's perturbed predictions
disagree; they are not a guarantee of correctness. The review flag measures uncertainty along
the predicted boundaries; small, confident false positives (e.g. labels on bowel loops below
the organs) barely move it: check the overlay.

**What to do.** Review every case the flag marks, and look at the overlay of the others.
For your own scanners and patients, fine-tune on a few labelled cases of your own:
`sfpc train --data your_cases/ --init sfpc/default_model --iterations 300 --out runs/mine`
then `sfpc export --checkpoint runs/mine/last.pt --out my_model` and
`sfpc calibrate --model my_model --data your_validation_cases/` (README, "Fine-tune").

**Reproduce.** `{command}` re-creates every file of this folder from `shared/data/organs`
(bit-identical graphs are not guaranteed across torch builds; the validation numbers are checked
by the test suite within a tolerance).
"""


def build(data_dir: str | Path, config: str | Path = DEFAULT_CONFIG,
          work: str | Path = "runs/default_model", out: str | Path = DEFAULT_OUT,
          iterations: int | None = None, progress: bool = True,
          skip_training: bool = False, calibration: str = "shifts") -> dict[str, Any]:
    from sfpc.inference.contract import ModelMetadata
    from sfpc.model.export import export_checkpoint
    from sfpc.training.config import TrainConfig, load_config_file
    from sfpc.training.organ_task import (
        context_split_args,
        make_organ_dataset,
        train_overrides,
    )
    from sfpc.training.trainer import train

    work, out = Path(work), Path(out)
    fields = train_overrides()
    fields.update(load_config_file(config))
    split_args = fields.pop("split", {})
    # A 2.5D model's slabs read neighbours beyond their ends: the split widens its gap so that
    # they never reach into the validation block (a plain 2D model's split is unchanged).
    split = make_organ_dataset(data_dir, work / "dataset.json", **split_args,
                               **context_split_args(fields))
    fields.update(data=str(work / "dataset.json"), out=str(work / "run"),
                  split_file=str(work / "run" / "split.json"), progress=progress)
    if iterations:
        fields["iterations"] = iterations
    cfg = TrainConfig(**fields)
    if not (skip_training and (work / "run" / "last.pt").exists()):
        train(cfg)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = export_checkpoint(work / "run" / "last.pt", tmp, name=MODEL_NAME, version=MODEL_VERSION)
    meta.training.update(
        labelled_slices=split["labelled_slices"], n_slices=split["n_slices"],
        n_unlabelled_ct_a_slices=split["n_unlabelled_ct_a_slices"],
        val_block=split["val_block"], gap=split["gap"],
        labelled_fraction_slices=round(len(split["labelled_slices"]) / split["n_slices"], 4),
        selection=split["selection"], organ_share=split["organ_share"], augment=cfg.augment,
        data_files=["ct_a_image.nii.gz", "ct_a_label.nii.gz", "ct_b_image_unlabelled.nii.gz"],
        labels="TotalSegmentator 'total' outputs (silver standard), ids 1, 5, 6",
        licence="Apache-2.0 (TotalSegmentator test data)")
    validation = validate_export(tmp, data_dir, split["val_block"])
    meta.metrics = {"validation": validation["metrics"], "validated_on": validation["case"],
                    "checkpoint": "last", "labels": "silver standard"}
    meta.save(tmp)
    fitted = calibrate_export(tmp, data_dir, work, split["val_block"], calibration)
    meta = ModelMetadata.load(tmp)  # calibrate wrote temperature and quality into it
    meta.metrics["calibration"] = calibration_record(fitted)
    meta.save(tmp)
    (tmp / CARD_FILE).write_text(model_card(meta, validation, COMMAND))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"out": str(out), "validation": validation,
            "calibration": {k: fitted.get(k) for k in ("temperature", "quality")}}


def render_card(export_dir: str | Path, robustness: str | Path | None = None) -> Path:
    """Write the export's MODEL_CARD.md again from its metadata and, if given, the robustness
    benchmark's JSON (``benchmarks/robustness.py --json``)."""
    from sfpc.inference.contract import ModelMetadata

    meta = ModelMetadata.load(export_dir)
    metrics = meta.metrics or {}
    if "validation" not in metrics:
        raise ValueError(f"{export_dir}: no validation figures in its metadata; build it with "
                         "`sfpc build-default-model` first")
    validation = {"metrics": metrics["validation"], "case": metrics.get("validated_on", "")}
    robust = json.loads(Path(robustness).read_text()) if robustness else None
    path = Path(export_dir) / CARD_FILE
    path.write_text(model_card(meta, validation, COMMAND, robust))
    return path


def calibrate_export(export_dir: Path, data_dir: str | Path, work: Path,
                     val_block: Sequence[int], mode: str = "shifts") -> dict[str, Any]:
    """Fit the temperature and the review-flag threshold on data the model never trained on.

    ``mode="shifts"``: the held-apart validation block as one case under each of
    :data:`~sfpc.training.shifts.CALIBRATION_SHIFTS` (noise, grids, contrast, field-of-view
    crops, body size, with settings other than the robustness benchmark's), so that the flag
    is fitted on whole uploads of which some the model gets wrong, as the review upload is.
    ``mode="slices"``: one case per axial slice of the unshifted block (the earlier rule).
    """
    from sfpc.training.organ_task import LABEL_MAP
    from sfpc.training.shifts import CALIBRATION_SHIFTS, write_shifted_cases
    from sfpc.training.uncertainty_cli import calibrate_main

    data = Path(data_dir).resolve()
    lo, hi = val_block
    if mode == "shifts":
        img = nib.load(str(data / "ct_a_image.nii.gz"))
        lab = nib.load(str(data / "ct_a_label.nii.gz"))
        entries = write_shifted_cases(np.asarray(img.dataobj), np.asarray(lab.dataobj),
                                      img.affine, (lo, hi), list(CALIBRATION_SHIFTS),
                                      work / "calibration_cases", LABEL_MAP)
    elif mode == "slices":
        entries = [{"id": f"ct_a_val_slice_{z}", "image": str(data / "ct_a_image.nii.gz"),
                    "label": str(data / "ct_a_label.nii.gz"), "slices": [z, z + 1],
                    "role": "val", "label_map": {str(k): v for k, v in LABEL_MAP.items()}}
                   for z in range(lo, hi)]
    else:
        raise ValueError(f"calibration mode must be 'shifts' or 'slices', not {mode!r}")
    cases = work / f"calibration_{mode}.json"
    cases.write_text(json.dumps(entries, indent=1) + "\n")
    out = work / "calibration"
    calibrate_main(["--model", str(export_dir), "--data", str(cases), "--role", "val",
                    "--threads", "1", "--quiet", "--out", str(out)])
    result = json.loads((out / "calibration.json").read_text())
    result["mode"] = mode
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sfpc build-default-model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "organs"),
                   help="folder with ct_a_image/ct_a_label/ct_b_image_unlabelled (.nii.gz)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--work", default="runs/default_model", help="dataset JSON and checkpoints")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="export folder (replaced)")
    p.add_argument("--iterations", type=int, default=None, help="override (for a quick try)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--skip-training", action="store_true",
                   help="reuse <work>/run/last.pt: export, validate, calibrate and write the card")
    p.add_argument("--calibration", choices=("shifts", "slices"), default="shifts",
                   help="fit temperature and review threshold on the held-apart block under "
                        "the calibration shifts (default), or on its single slices (the "
                        "earlier rule)")
    p.add_argument("--card-only", action="store_true",
                   help="only write MODEL_CARD.md of --out again from its metadata")
    p.add_argument("--robustness", default=None,
                   help="with --card-only: the JSON of benchmarks/robustness.py for the card")
    p.add_argument("--validate-only", action="store_true",
                   help="only re-score an existing export on the validation block")
    a = p.parse_args(argv)
    if a.card_only:
        print(render_card(a.out, a.robustness))
        return 0
    if a.validate_only:
        print(json.dumps(validate_export(a.out, a.data), indent=2))
        return 0
    res = build(a.data, a.config, a.work, a.out, a.iterations, progress=not a.no_progress,
                skip_training=a.skip_training, calibration=a.calibration)
    print(json.dumps(res, indent=2))
    return 0
