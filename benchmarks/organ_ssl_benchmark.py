"""Train every method side by side on the real abdominal CT organ task and print one table like
the paper's Tables I and II (plus Figure 9's perturbation alternatives with --figure9).

Same data, split, schedule and seed for every method; 2D axial at 3 mm in-plane, 128x128 patches,
10% of ct_a's slices labelled (stratified), the rest of ct_a and all of ct_b unlabelled, scored on a
held-apart block of ct_a slices (TotalSegmentator labels: a silver standard).

    python benchmarks/organ_ssl_benchmark.py --iterations 1000          # the committed run
    python benchmarks/organ_ssl_benchmark.py --quick                    # minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sfpc.training.config import TrainConfig
from sfpc.training.methods import METHODS
from sfpc.training.organ_task import CLASS_NAMES, make_organ_dataset, train_overrides
from sfpc.training.trainer import train

ROWS = ["supervised", "seg+rec", "seg+flpm", "seg+rec+flpm", "seg+flpm+fpc", "sfpc",
        "urpc", "uamt", "mcnet"]
LABELS = {"supervised": "Seg (supervised-only UNet)", "seg+rec": "Seg+Rec",
          "seg+flpm": "Seg+FLPM", "seg+rec+flpm": "Seg+Rec+FLPM", "seg+flpm+fpc": "Seg+FLPM+FPC",
          "sfpc": "SFPC (Seg+Rec+FLPM+FPC)", "urpc": "URPC", "uamt": "UAMT", "mcnet": "MC-Net",
          "sfpc:fnoise": "SFPC, F-Noise", "sfpc:fdrop": "SFPC, F-Drop",
          "sfpc:sdrop": "SFPC, spatial dropout"}


def run_one(key: str, dataset: Path, out: Path, args: argparse.Namespace, seed: int) -> dict:
    method, _, perturbation = key.partition(":")
    fields = train_overrides()
    fields["augment"] = {**fields["augment"], "empty_slice_prob": args.empty_slice_prob}
    fields.update(
        data=str(dataset), method=method, perturbation=perturbation or "flpm",
        iterations=args.iterations, lr_step=max(1, round(args.iterations * 2500 / 6000)),
        val_every=args.val_every or max(1, args.iterations // 5), seed=seed,
        out=str(out / f"{key.replace(':', '_').replace('+', '_')}_seed{seed}"),
        progress=not args.no_progress, split_file=str(out / f"split_seed{seed}.json"),
        uamt_t=args.uamt_t,
    )
    cfg = TrainConfig(**fields)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    best = torch.load(Path(cfg.out) / "best.pt", weights_only=False)
    summary = best["metadata"]["metrics"]["validation"]
    return {"method": key, "seed": seed, "wall_s": wall,
            "step_time_median_s": result["step_time_median_s"],
            "best_iteration": best["metadata"]["metrics"]["iteration"], "summary": summary}


def fmt_row(runs: list[dict], base_step: float) -> str:
    """One method's row: the mean over seeds (and the spread of the mean Dice over seeds)."""

    def avg(get) -> float:
        return float(statistics.fmean(get(r["summary"]) for r in runs))

    dice = [r["summary"]["mean"]["dice"]["mean"] * 100 for r in runs]
    spread = f" ± {statistics.pstdev(dice):.1f}" if len(runs) > 1 else ""
    cells = [LABELS.get(runs[0]["method"], runs[0]["method"]),
             f"{statistics.fmean(dice):.2f}{spread}"]
    for metric, scale in (("hd95", 1), ("asd", 1), ("boundary_dice", 100)):
        cells.append(f"{avg(lambda s, m=metric: s['mean'][m]['mean']) * scale:.2f}")
    for cls in CLASS_NAMES[1:]:
        cells.append(f"{avg(lambda s, c=cls: s[c]['dice']['mean']) * 100:.1f}")
    step = statistics.median(r["step_time_median_s"] for r in runs)
    cells.append(f"{step / base_step:.2f}x")
    return "| " + " | ".join(cells) + " |"


def table(results: list[dict]) -> str:
    by_method: dict[str, list[dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    first = next(iter(by_method.values()))
    base = statistics.median(r["step_time_median_s"] for r in by_method.get("supervised", first))
    head = ("| method | Dice % (± sd over seeds) | HD95 mm | ASD mm | boundary Dice % | "
            "spleen Dice % | liver Dice % | stomach Dice % | step time vs supervised |")
    sep = "|" + "---|" * 9
    return "\n".join([head, sep, *(fmt_row(runs, base) for runs in by_method.values())])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    shared = Path(__file__).resolve().parents[2] / "shared/data/organs"
    p.add_argument("--data", default=str(shared))
    p.add_argument("--out", default="runs/organ_ssl_benchmark")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--val-every", type=int, default=0)
    p.add_argument("--labelled-fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337],
                   help="one split and one training run per seed; the table averages them")
    p.add_argument("--empty-slice-prob", type=float, default=1.0,
                   help="relative weight of labelled slices without organs (1 = uniform)")
    p.add_argument("--uamt-t", type=int, default=8)
    p.add_argument("--methods", nargs="*", default=None, help=f"subset of {ROWS}")
    p.add_argument("--figure9", action="store_true", help="add F-Noise, F-Drop, spatial dropout")
    p.add_argument("--quick", action="store_true", help="40 iterations, 4 methods: a smoke run")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.methods = 40, args.methods or ["supervised", "sfpc", "urpc", "uamt"]
        args.uamt_t = 2
    keys = list(args.methods or ROWS)
    if args.figure9:
        keys += ["sfpc:fnoise", "sfpc:fdrop", "sfpc:sdrop"]
    bad = [k for k in keys if k.partition(":")[0] not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}")
    out = Path(args.out)
    splits = {seed: make_organ_dataset(args.data, out / f"dataset_seed{seed}.json",
                                       args.labelled_fraction, seed) for seed in args.seeds}
    print(json.dumps(splits), flush=True)
    results = []
    for key in keys:
        for seed in args.seeds:
            print(f"== {key} seed {seed}", flush=True)
            results.append(run_one(key, out / f"dataset_seed{seed}.json", out, args, seed))
            (out / "results.json").write_text(json.dumps(
                {"splits": splits, "args": vars(args), "results": results}, indent=1))
    print()
    print(f"iterations {args.iterations}, seeds {args.seeds}, torch threads "
          f"{torch.get_num_threads()}, empty-slice weight {args.empty_slice_prob}, validation "
          f"block {splits[args.seeds[0]]['val_block']}, labelled slices per seed "
          + "; ".join(f"{s}: {v['labelled_slices']} (organ {v['labelled_organ_slices']})"
                      for s, v in splits.items()))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
