"""How wide should FLPM's serving eps grid be? Error-detection quality of FLPM uncertainty for a
range of serving tau on one trained model, next to softmax entropy and flip TTA (issue 7).

METHOD.md serves on the fixed grid eps in [-tau, tau] with the training tau (0.1). At that width
the M predictions barely disagree (mutual information ~1e-5 on the default model), so FLPM's
entropy is softmax entropy. A wider serving grid perturbs the features further along the same
directions (the batch-level spreads dMu, dSigma learned in training) without retraining.

Same cases as benchmarks/uncertainty_benchmark.py (organ: the model's own split; synth3d: the
seeded synthetic test cases), same scorer, temperature 1.

    python benchmarks/flpm_tau_sweep.py --task organ \
        --checkpoint runs/default_model/run/last.pt --taus 0.1 0.3 0.5 1 2 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# A sibling script: `python benchmarks/flpm_tau_sweep.py` puts this folder first on sys.path.
import uncertainty_benchmark as ub

from sfpc.model.export import load_checkpoint
from sfpc.training.config import TrainConfig
from sfpc.training.data import load_eval_cases
from sfpc.training.datamodule import context_margin, resample_axes
from sfpc.training.layouts import discover_cases
from sfpc.training.uncertainty_compare import compare_methods


def row(name: str, s: dict) -> dict:
    ent = s["error_detection"]["entropy"]["overall"]
    mi = s["error_detection"].get("mutual_information", {}).get("overall", {})
    return {"method": name, "auroc": ent["auroc"], "ap": ent["ap"], "top10": ent["top10"],
            "mi_auroc": mi.get("auroc"), "ece": s["calibration"]["ece"],
            "dice": s["mean_dice"], "cost": s["relative_cost"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    shared = Path(__file__).resolve().parents[2] / "shared/data/organs"
    p.add_argument("--task", choices=ub.TASKS, default="organ")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0, 2.0, 3.0])
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--organ-data", default=str(shared))
    p.add_argument("--out", default="runs/flpm_tau_sweep")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--synth-cases", type=int, nargs=4, default=[8, 16, 8, 12])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-cases", type=int, default=None,
                   help="score only the first N test cases (3D sweeps are slow on a CPU)")
    p.add_argument("--with-flpm-flip", action="store_true",
                   help="also score FLPM on the input and its flip (2 passes, 2M samples)")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out).resolve() / a.task
    out.mkdir(parents=True, exist_ok=True)
    targs = argparse.Namespace(organ_checkpoint=a.checkpoint, synth_checkpoint=a.checkpoint,
                               organ_data=a.organ_data, seed=a.seed, quick=False,
                               synth_cases=a.synth_cases, workers=0)
    task = ub.organ_task(targs, out) if a.task == "organ" else ub.synth_task(targs, out)
    net, meta = load_checkpoint(task["checkpoint"])
    cfg = TrainConfig(**torch.load(task["checkpoint"], map_location="cpu",
                                   weights_only=False)["config"])
    cases = discover_cases(task["test"], "json")[:a.max_cases]
    volumes = [v.to_dict() for v in load_eval_cases(
        cases, cfg.normalisation, cfg.spacing, resample_axes(cfg),
        crop_to_slices=meta.spatial_dims == 2, margin=context_margin(cfg))]
    kw = dict(class_names=meta.class_names, patch_size=meta.patch_size, m=a.m,
              plane_axis=meta.plane_axis, input_mode=meta.input_mode,
              overlap=float(meta.inference.get("overlap", 0.5)),
              sw_batch_size=int(meta.inference.get("sw_batch_size", 4)), seed=a.seed,
              metadata=meta)
    flpm = net.flpm()
    trained_tau = flpm.tau
    rows = []
    paired: dict[str, dict] = {}
    softmax_seconds = None
    for tau in a.taus:
        flpm.tau = tau
        first = softmax_seconds is None
        # softmax and TTA do not depend on tau: run them once, with the first tau
        methods = (["softmax", "flpm", "tta_flip"] + (["flpm_flip"] if a.with_flpm_flip else [])
                   if first else ["flpm"])
        res = compare_methods(net, volumes, methods=methods, warmup=first, **kw)
        ms = res["methods"]
        for name, d in res["paired_auroc"].items():
            if d["difference"] is not None and "flpm-softmax" != name:
                print(f"tau {tau:g}: AUROC {name} {d['difference']:+.4f} "
                      f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] over {d['cases']} cases",
                      flush=True)
                paired[f"tau={tau:g} {name}"] = d
        if first:
            softmax_seconds = ms["softmax"]["seconds"]
            rows += [row("softmax", ms["softmax"]), row(f"tta_flip M={a.m}", ms["tta_flip"])]
            if "flpm_flip" in ms:
                rows.append(row(f"flpm_flip tau={tau:g}", ms["flpm_flip"]))
        ms["flpm"]["relative_cost"] = ms["flpm"]["seconds"] / softmax_seconds
        rows.append(row(f"flpm tau={tau:g}", ms["flpm"]))
        print(json.dumps(rows[-1]), flush=True)
    flpm.tau = trained_tau
    print(f"\n{a.task}: {len(cases)} test cases, trained tau {trained_tau:g}, M = {a.m}, "
          f"dSigma/dMu buffers as trained, T = 1")
    print(f"{'method':<18}{'AUROC':>8}{'AP':>8}{'top10%':>8}{'MI AUROC':>10}{'ECE':>8}"
          f"{'Dice':>8}{'cost':>8}")
    for r in rows:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"
        cost = "-" if r["cost"] is None else f"{r['cost']:.2f}x"
        print(f"{r['method']:<18}{f(r['auroc']):>8}{f(r['ap']):>8}{f(r['top10']):>8}"
              f"{f(r['mi_auroc']):>10}{f(r['ece']):>8}{f(r['dice']):>8}{cost:>8}")
    if a.json:
        Path(a.json).write_text(json.dumps({"task": a.task, "checkpoint": a.checkpoint,
                                            "rows": rows, "paired_auroc": paired},
                                           indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
