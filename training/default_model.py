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
CARD_FILE = "MODEL_CARD.md"


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


def model_card(meta: Any, validation: dict[str, Any], command: str,
               calibration: dict[str, Any] | None = None) -> str:
    """The model card, from the metadata and the measured validation numbers."""
    m = validation["metrics"]
    rows = ["| class | Dice | HD95 (mm) | ASD (mm) | boundary Dice |", "|---|---|---|---|---|"]
    for name in [*meta.class_names[1:], "mean"]:
        v = m[name]
        rows.append(f"| {name} | {v['dice']:.3f} | {v['hd95']:.1f} | {v['asd']:.2f} | "
                    f"{v['boundary_dice']:.3f} |")
    t = meta.training
    quality = meta.quality or {}
    flag = (f"Cases whose mean boundary uncertainty exceeds {quality['threshold']:.4f} are "
            f"flagged \"review recommended\" ({quality.get('rule', '')})."
            if quality.get("threshold") is not None else
            "No review threshold has been calibrated for this export.")
    ece = ""
    if calibration and calibration.get("summary"):
        b, a = calibration["summary"]["before"], calibration["summary"]["after"]
        n = calibration["summary"].get("cases")
        if calibration.get("mode", "slices") == "shifts":
            fitted = (f"Temperature and threshold were fitted on {n} cases: the held-apart "
                      f"block under the calibration shifts of `sfpc.training.shifts` (noise, "
                      f"grids, simulated contrast, field-of-view crops, body size), settings "
                      f"that differ from the robustness benchmark's, where the flag is then "
                      f"tested (docs/robustness.md). ")
        else:
            fitted = (f"Temperature and threshold were fitted on the same {n} validation "
                      f"slices they are reported on (there is no other labelled CT), so they "
                      f"are optimistic. ")
        ece = (f"Expected calibration error of the uncertainty-mode mean probabilities, before -> "
               f"after: {b['flpm']['ece']:.4f} -> {a['flpm']['ece']:.4f} over all voxels, "
               f"{b['flpm']['ece_foreground_region']:.3f} -> "
               f"{a['flpm']['ece_foreground_region']:.3f} in the organ region (voxels predicted "
               f"or labelled as an organ), on those cases. {fitted}")
    return f"""# Model card: {meta.name} {meta.version}

**Task.** {meta.task}. 2D model run slice by slice on axial slices; classes
{", ".join(f"{i} = {n}" for i, n in enumerate(meta.class_names))}.

**Method.** SFPC (semi-supervised, feature-perturbed consistency; shared encoder, segmentation
decoder with FLPM, reconstruction decoder for training only), trained with this project's
`sfpc train`. The uncertainty graph applies FLPM M = {meta.perturbation.get("M")} times in one
pass (tau = {meta.perturbation.get("tau")}).

**Input expectations.** CT in Hounsfield units (rescale slope/intercept applied, as the server's
DICOM reader does), any orientation, any spacing: the engine reorients to {meta.orientation},
resamples in-plane to {meta.spacing[0]} x {meta.spacing[1]} mm ({RESAMPLING_TEXT[meta.resampling]};
slices keep their own spacing),
clips to the window {meta.normalisation.get("window")} HU and scales to [0, 1]. Abdominal field of
view. Not for MR (intensities are meaningless to it), contrast phases or paediatric anatomy it has
not seen.

**Training data and licences.** The TotalSegmentator 2.18.0 test CTs (Apache-2.0):
`ct_a` (abdominal CT, 122x101x112 at 3 mm) with TotalSegmentator's own 'total' labels
(ids 1, 5, 6 -> spleen, liver, stomach) - model outputs, a *silver standard*, not manual
tracing - and `ct_b` (chest-abdomen CT, 1.5 mm, no labels). Labelled: {t.get("n_labelled")}
runs of slices = {len(t.get("labelled_slices", []))} axial slices of ct_a
(a fraction {t.get("labelled_fraction_slices")} of its {t.get("n_slices", 112)} slices; selection
"{t.get("selection")}": {t.get("organ_share")} of the budget on slices with organs, evenly
spaced, as sparse annotation would give); unlabelled: the rest of ct_a and all of ct_b.
Augmentation: {json.dumps(t.get("augment"))}. No left-right flips (they would swap liver and
spleen). Iterations: {t.get("iterations")}.

**Validation.** {validation["case"]}: a block of slices held apart from training
(never labelled, never in the unlabelled pool, with a {t.get("gap")}-slice gap on each side),
scored on the exported ONNX graphs through the serving engine, from the raw HU volume, against
the silver-standard labels:

{chr(10).join(rows)}

This is one patient; figures on other patients and scanners will differ, and the labels are
themselves model outputs.

**Calibration and review flag.** Temperature {meta.temperature:.3f}. {ece}{flag}

**Known limits.** Trained on two CTs: expect lower accuracy on unusual anatomy, strong
pathology, contrast phases, metal artefacts and fields of view that cut organs. The stomach's
appearance depends on its filling (gas, fluid, contrast) and is the least reliable class. On
ct_a's own lower slices it marks small false positives in bowel loops (liver / stomach labels
on gas-filled bowel below the organs): check the overlay.
The uncertainty maps flag where the model's perturbed predictions disagree; they are not a
guarantee of correctness. The review flag measures uncertainty along the predicted boundaries;
small, confident false positives barely move it: on ct_a's slices 66-67, below the organs, the
model labels 12 and 5 voxels as spleen / liver (Dice 0 for those classes, as the empty-case rule
scores them) and the flag stays silent (docs/uncertainty.md).

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
    from sfpc.training.organ_task import make_organ_dataset, train_overrides
    from sfpc.training.trainer import train

    work, out = Path(work), Path(out)
    fields = train_overrides()
    fields.update(load_config_file(config))
    split_args = fields.pop("split", {})
    split = make_organ_dataset(data_dir, work / "dataset.json", **split_args)
    fields.update(data=str(work / "dataset.json"), out=str(work / "run"),
                  split_file=str(work / "run" / "split.json"), progress=progress)
    if iterations:
        fields["iterations"] = iterations
    cfg = TrainConfig(**fields)
    if not (skip_training and (work / "run" / "last.pt").exists()):
        train(cfg)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = export_checkpoint(work / "run" / "last.pt", tmp, name=MODEL_NAME)
    meta.training.update(
        labelled_slices=split["labelled_slices"], n_slices=split["n_slices"],
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
    calibration = calibrate_export(tmp, data_dir, work, split["val_block"], calibration)
    command = "make default-model"
    (tmp / CARD_FILE).write_text(model_card(ModelMetadata.load(tmp), validation, command,
                                            calibration))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"out": str(out), "validation": validation,
            "calibration": {k: calibration.get(k) for k in ("temperature", "quality")}}


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
    p.add_argument("--validate-only", action="store_true",
                   help="only re-score an existing export on the validation block")
    a = p.parse_args(argv)
    if a.validate_only:
        print(json.dumps(validate_export(a.out, a.data), indent=2))
        return 0
    res = build(a.data, a.config, a.work, a.out, a.iterations, progress=not a.no_progress,
                skip_training=a.skip_training, calibration=a.calibration)
    print(json.dumps(res, indent=2))
    return 0
