"""Uncertainty benchmark (issue 7): FLPM against softmax entropy, MC dropout and flip TTA, with
calibration and the per-case review flag, on the real abdominal CT organ task and on synthetic
3D lesions.

Per task: train an SFPC model (or take --organ-checkpoint / --synth-checkpoint), export it,
``sfpc calibrate`` it on calibration cases (temperature + review threshold into the export's
metadata), score the export's served maps on held-out test cases at T = 1 and at the fitted T
(``sfpc uncertainty-eval``'s code), then run the four methods side by side in torch on the same
test cases with the fitted T and time them.

- organ: 2D axial SFPC on ct_a/ct_b (training/organ_task.py, TotalSegmentator labels: a silver
  standard). Cases are single axial slices of ct_a: the calibration cases are the slices of
  the split's held-apart validation block, the test cases the other slices of the organ range
  that were never labelled (they were in the unlabelled pool: their labels were never used).
- synth3d: 3D SFPC on seeded synthetic BraTS-like heads with one irregular lesion
  (training/synth.py); separate calibration and test cases.

    python benchmarks/uncertainty_benchmark.py              # the full run (long on CPU)
    python benchmarks/uncertainty_benchmark.py --quick      # minutes: short trainings
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sfpc.inference.contract import ModelMetadata
from sfpc.model.export import export_checkpoint, load_checkpoint
from sfpc.training import synth
from sfpc.training.config import TrainConfig
from sfpc.training.data import load_eval_cases
from sfpc.training.layouts import discover_cases
from sfpc.training.organ_task import (
    LABEL_MAP,
    make_organ_dataset,
    train_overrides,
)
from sfpc.training.trainer import train
from sfpc.training.uncertainty_cli import calibrate, calibration_text
from sfpc.training.uncertainty_compare import (
    EXTRA_METHODS,
    METHODS,
    compare_methods,
    comparison_table,
)
from sfpc.training.uncertainty_eval import (
    evaluate_export,
    load_engine,
    report_text,
    write_reliability,
)

ORGAN_RANGE = (66, 112)  # RAS axial slices of ct_a around the organs (README: 69-111)
TASKS = ("organ", "synth3d")


# ----------------------------------------------------------------------------------------------
# Tasks: data, training, case lists
# ----------------------------------------------------------------------------------------------


def _write_cases(entries: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1) + "\n")
    return path


def _ct_a_roles(dataset_json: Path) -> dict[str, list[int]]:
    """ct_a's axial slices by role in an organ-task dataset JSON (training/organ_task.py)."""
    roles: dict[str, list[int]] = {"labelled": [], "unlabelled": [], "val": []}
    for e in json.loads(Path(dataset_json).read_text()):
        if e.get("slices") and "ct_a" in str(e["image"]):
            a, b = e["slices"]
            roles[e["role"]] += list(range(a, b))
    return roles


def organ_task(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Model and calibration / test case files of the organ task.

    The cases come from the split the model was trained on (its dataset JSON, also for a given
    --organ-checkpoint such as the default model's): calibration = the held-apart validation
    block, test = the slices of the organ range that were in the unlabelled pool (their labels
    were never used).
    """
    if args.organ_checkpoint:
        checkpoint = Path(args.organ_checkpoint)
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        dataset = Path(ck["config"]["data"])
        if not dataset.is_file():
            raise SystemExit(f"{checkpoint} was trained on {dataset}, which is not here: the "
                             "test cases must come from that split")
    else:
        checkpoint, dataset = out / "sfpc/best.pt", out / "dataset.json"
        make_organ_dataset(args.organ_data, dataset, 0.1, args.seed)
        fields = train_overrides()
        fields.update(data=str(dataset), method="sfpc",
                      iterations=args.organ_iterations,
                      lr_step=(args.organ_iterations if args.quick else
                               max(1, round(args.organ_iterations * 2500 / 6000))),
                      val_every=max(1, args.organ_iterations // 4), seed=args.seed,
                      out=str(out / "sfpc"), split_file=str(out / "split.json"),
                      progress=False, name="sfpc-organ-uncertainty", num_workers=args.workers)
        train(TrainConfig(**fields))
    roles = _ct_a_roles(dataset)
    data = Path(args.organ_data).resolve()
    image, label = str(data / "ct_a_image.nii.gz"), str(data / "ct_a_label.nii.gz")
    label_map = {str(k): v for k, v in LABEL_MAP.items()}

    def entry(z: int) -> dict:
        return {"id": f"ct_a_z{z:03d}", "image": image, "label": label, "slices": [z, z + 1],
                "label_map": label_map}

    calibration = [entry(z) for z in sorted(roles["val"])]
    test = [entry(z) for z in sorted(roles["unlabelled"]) if ORGAN_RANGE[0] <= z < ORGAN_RANGE[1]]
    return {"checkpoint": checkpoint, "dataset": str(dataset),
            "labelled_slices": sorted(roles["labelled"]),
            "calibration": _write_cases(calibration, out / "calibration_cases.json"),
            "test": _write_cases(test, out / "test_cases.json")}


def synth_task(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Synthetic 3D lesion cases, model and calibration / test case files."""
    n_lab, n_unl, n_cal, n_test = args.synth_cases
    shape, spacing = (48, 48, 48), (2.0, 2.0, 2.0)
    if not args.quick:
        shape, spacing = (96, 96, 96), (1.0, 1.0, 1.0)
    n_labelled_files = n_lab + n_cal + n_test
    cases = synth.generate("brats", out / "data", n_cases=n_labelled_files, seed=args.seed,
                           shape=shape, spacing=spacing, n_unlabelled=n_unl)
    roles = (["labelled"] * n_lab + ["val"] * n_cal + ["test"] * n_test + ["unlabelled"] * n_unl)
    entries = [{"id": c["id"], "image": c["image"], "label": c["label"], "role": r}
               for c, r in zip(cases, roles, strict=True)]
    training = [e for e in entries if e["role"] != "test"]
    for e in training:
        if e["role"] == "unlabelled":
            e["label"] = None
    _write_cases(training, out / "dataset.json")
    checkpoint = Path(args.synth_checkpoint) if args.synth_checkpoint else out / "sfpc/best.pt"
    if not args.synth_checkpoint:
        quick = args.quick
        cfg = TrainConfig(
            data=str(out / "dataset.json"), layout="json", spatial_dims=3,
            patch_size=[32, 32, 32] if quick else [64, 64, 64],
            normalisation={"kind": "zscore", "foreground": "nonzero"},
            class_names=["background", "lesion"], labelled_fraction=None, val_fraction=None,
            method="sfpc", iterations=args.synth_iterations,
            lr_step=(args.synth_iterations if quick else
                     max(1, round(args.synth_iterations * 2500 / 6000))),
            val_every=max(1, args.synth_iterations // (1 if quick else 4)),
            channels=[8, 16, 32, 64, 128] if quick else [16, 32, 64, 128, 256],
            batch_labelled=2 if quick else 4, batch_unlabelled=2 if quick else 4,
            seed=args.seed, out=str(out / "sfpc"), split_file=str(out / "split.json"),
            progress=False, name="sfpc-synth3d-uncertainty", task="synthetic 3D lesions",
            num_workers=args.workers)
        train(cfg)
    strip = [{k: v for k, v in e.items() if k != "role"} for e in entries]
    return {"checkpoint": checkpoint,
            "calibration": _write_cases([e for e, r in zip(strip, roles, strict=True)
                                         if r == "val"], out / "calibration_cases.json"),
            "test": _write_cases([e for e, r in zip(strip, roles, strict=True) if r == "test"],
                                 out / "test_cases.json")}


# ----------------------------------------------------------------------------------------------
# One task end to end
# ----------------------------------------------------------------------------------------------


def run_task(name: str, task: dict[str, Any], args: argparse.Namespace, out: Path) -> dict:
    export = out / "export"
    export_checkpoint(task["checkpoint"], export)
    cal_cases = discover_cases(task["calibration"], "json")
    test_cases = discover_cases(task["test"], "json")
    print(f"== {name}: calibrate on {len(cal_cases)} cases", flush=True)
    t0 = time.perf_counter()
    cal = calibrate(export, cal_cases, data=str(task["calibration"]), seed=args.seed,
                    fit_region=args.fit_region, threads=args.threads)
    cal_seconds = time.perf_counter() - t0
    print(calibration_text(cal), flush=True)
    temperature = cal["temperature"]

    print(f"== {name}: served maps on {len(test_cases)} test cases, T = 1 and T = "
          f"{temperature:.3f}", flush=True)
    before = evaluate_export(load_engine(export, threads=args.threads, temperature=1.0,
                                         quality={}), test_cases)
    after = evaluate_export(load_engine(export, threads=args.threads), test_cases)
    print(report_text(after), flush=True)
    write_reliability([("plain T=1 (test)", before["sources"]["plain"]["calibration"]),
                       (f"plain T={temperature:.3g} (test)",
                        after["sources"]["plain"]["calibration"]),
                       ("flpm T=1 (test)", before["sources"]["flpm"]["calibration"]),
                       (f"flpm T={temperature:.3g} (test)",
                        after["sources"]["flpm"]["calibration"])],
                      out / "reliability_test.png")

    print(f"== {name}: methods side by side (torch, M = {args.m})", flush=True)
    net, meta = load_checkpoint(task["checkpoint"])
    ck = torch.load(task["checkpoint"], map_location="cpu", weights_only=False)
    cfg = TrainConfig(**ck["config"])
    from sfpc.training.datamodule import context_margin, resample_axes

    # A 2.5D model's slabs keep their neighbour slices (margin), and the comparison reads k
    # from the metadata.
    volumes = load_eval_cases(test_cases, cfg.normalisation, cfg.spacing, resample_axes(cfg),
                              crop_to_slices=meta.spatial_dims == 2, margin=context_margin(cfg))
    compare = compare_methods(
        net, [v.to_dict() for v in volumes], class_names=meta.class_names,
        patch_size=meta.patch_size, methods=args.methods, m=args.m, temperature=temperature,
        plane_axis=meta.plane_axis, input_mode=meta.input_mode,
        overlap=float(meta.inference.get("overlap", 0.5)),
        sw_batch_size=int(meta.inference.get("sw_batch_size", 4)), seed=args.seed,
        metadata=meta)
    print(comparison_table(compare), flush=True)
    stored = ModelMetadata.load(export)
    return {"task": name, "checkpoint": str(task["checkpoint"]), "calibration": cal["summary"],
            "quality": cal["quality"], "calibration_seconds": cal_seconds,
            "test_before": before, "test_after": after, "compare": compare,
            "stored_metadata": {"temperature": stored.temperature, "quality": stored.quality,
                                "graphs": stored.graphs}}


def goals(result: dict) -> dict[str, Any]:
    """The issue's goals, measured: FLPM AUROC >= MC dropout's and TTA's at a fraction of their
    cost, and ECE after calibration <= 0.05 (test cases, served FLPM mean probabilities)."""
    methods = result["compare"]["methods"]

    def auroc(m: str, name: str) -> float | None:
        detection = methods.get(m, {}).get("error_detection", {})
        return detection.get(name, {}).get("overall", {}).get("auroc")

    out: dict[str, Any] = {}
    for other in ("mc_dropout", "tta_flip"):
        if other not in methods or "flpm" not in methods:
            continue
        for name in ("entropy", "mutual_information"):
            mine, theirs = auroc("flpm", name), auroc(other, name)
            if mine is not None and theirs is not None:
                out[f"flpm_{name}_auroc_ge_{other}"] = mine >= theirs
        out[f"flpm_cost_vs_{other}"] = methods["flpm"]["seconds"] / methods[other]["seconds"]
        paired = result["compare"].get("paired_auroc", {}).get(f"flpm-{other}")
        if paired and paired["difference"] is not None:
            out[f"flpm_minus_{other}_entropy_auroc"] = paired["difference"]
            out[f"flpm_minus_{other}_entropy_auroc_ci95"] = paired["ci"]
    ece = result["test_after"]["sources"]["flpm"]["calibration"]["ece"]
    out["ece_after_calibration"] = ece
    out["ece_after_le_0.05"] = ece is not None and ece <= 0.05
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    shared = Path(__file__).resolve().parents[2] / "shared/data/organs"
    p.add_argument("--out", default="runs/uncertainty_benchmark")
    p.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    p.add_argument("--organ-data", default=str(shared))
    p.add_argument("--organ-checkpoint", default=None, help="use this organ-task SFPC model")
    p.add_argument("--organ-iterations", type=int, default=1000)
    p.add_argument("--synth-checkpoint", default=None, help="use this synthetic 3D SFPC model")
    p.add_argument("--synth-iterations", type=int, default=1000)
    p.add_argument("--synth-cases", type=int, nargs=4, default=[8, 16, 8, 12],
                   metavar=("LABELLED", "UNLABELLED", "CALIBRATION", "TEST"))
    p.add_argument("--methods", nargs="*", default=list(METHODS),
                   choices=METHODS + EXTRA_METHODS)
    p.add_argument("--m", type=int, default=4, help="samples / passes per method")
    p.add_argument("--fit-region", choices=("all", "foreground"), default="all",
                   help="voxels the temperature is fitted on (sfpc calibrate --fit-region)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--workers", type=int, default=0, help="data loader processes for training")
    p.add_argument("--train-only", action="store_true",
                   help="make the data and train the models, then stop (e.g. train on a GPU "
                        "machine, evaluate here with --organ-checkpoint / --synth-checkpoint)")
    p.add_argument("--quick", action="store_true",
                   help="short trainings (150 organ, 60 synthetic iterations, no lr decay) and "
                        "small synthetic volumes: a smoke run of minutes")
    args = p.parse_args(argv)
    if args.quick:
        # Without lr decay the organ model segments the organs after ~150 iterations (at 40 it
        # still predicts background everywhere, leaving no boundary to flag).
        args.organ_iterations = min(args.organ_iterations, 150)
        args.synth_iterations = min(args.synth_iterations, 60)
        args.synth_cases = [4, 4, 4, 4]
    if args.threads:
        torch.set_num_threads(args.threads)
    if "organ" in args.tasks and not Path(args.organ_data).is_dir():
        p.error(f"organ data {args.organ_data} not found (pass --organ-data or --tasks synth3d)")
    # Case lists hold paths; relative ones would resolve against the list's own folder.
    root = Path(args.out).resolve()
    t_start = time.perf_counter()
    results = []
    for name in args.tasks:
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        print(f"== {name}: data and model", flush=True)
        task = organ_task(args, out) if name == "organ" else synth_task(args, out)
        if args.train_only:
            print(f"== {name}: trained {task['checkpoint']}", flush=True)
            continue
        result = run_task(name, task, args, out)
        result["goals"] = goals(result)
        results.append(result)
        (root / "results.json").write_text(json.dumps(
            {"args": vars(args), "results": results}, indent=1, default=str) + "\n")
    print(f"\nM = {args.m}, seed {args.seed}, torch threads {torch.get_num_threads()}, "
          f"{time.perf_counter() - t_start:.0f} s")
    for r in results:
        c = r["calibration"]
        tb, ta = r["test_before"]["sources"], r["test_after"]["sources"]
        print(f"\n## {r['task']}: T = {c['temperature']:.4f}; ECE (test, served) plain "
              f"{tb['plain']['calibration']['ece']:.4f} -> {ta['plain']['calibration']['ece']:.4f}"
              f", FLPM mean probs {tb['flpm']['calibration']['ece']:.4f} -> "
              f"{ta['flpm']['calibration']['ece']:.4f}")
        print(comparison_table(r["compare"]))
        if "quality" in r["test_after"]:
            q = r["test_after"]["quality"]
            def f(v: Any) -> str:
                return "-" if v is None else f"{v:.3f}"

            print(f"review flag on test: threshold {q['threshold']:.4f}, {q['flagged']} of "
                  f"{q['cases']} flagged; sensitivity {f(q.get('sensitivity'))}, specificity "
                  f"{f(q.get('specificity'))} for Dice < {q.get('dice_target')} "
                  f"({q.get('poor')} cases); mean Dice flagged {f(q.get('mean_dice_flagged'))}, "
                  f"unflagged {f(q.get('mean_dice_unflagged'))}")
        print("goals:", json.dumps(r["goals"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
