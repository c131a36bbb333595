"""Auto-configured against hand-configured training: same split, same iterations, same seeds;
Dice per class on the validation cases.

--task organs (default), the abdominal CT organ task, validation on the held-apart block:

- hand: the organ benchmark's SFPC row (benchmarks/organ_ssl_benchmark.py, the flags of
  docs/benchmarks.md: 2D axial, 96^2 patches at 4 mm, CT window [-250, 350] HU scaled to [0, 1],
  no flips, rotation 15 deg, scale 0.85-1.15, empty-slice weight 0.25), trained by that script's
  own ``run_one``;
- auto: ``sfpc train --data <the same dataset JSON>`` with only the budget fixed (--iterations,
  --seed, --threads, --val-every as the hand run, --split-file shared, --out): everything else
  from the plan (<out>/auto_seed<S>/plan.json says what and why).

--task lesions, the four lesion cases of shared/data/lesions (brain MR, breast MR, lung CT), the
split the plan makes (one validation case, the other three labelled, so supervised):

- hand: issue 19's configuration (2D, 128^2 at 0.8 mm, foreground fraction 0.7, the flag
  defaults otherwise: z-score over non-zero voxels, flips and rotation 20 deg), supervised;
- auto: ``sfpc train --data shared/data/lesions`` with the budget fixed as above.

    python benchmarks/auto_config_benchmark.py --iterations 400 --seeds 1337 7 --jobs 2 \\
        --threads 1 --out runs/auto_config_benchmark
    # train only the auto rows again, the hand rows from an earlier run of the same split:
    python benchmarks/auto_config_benchmark.py --iterations 1000 --seeds 1337 7 --configs auto \
        --merge-from benchmarks/auto_config_results_1000it.json --out runs/auto_config_v2
    python benchmarks/auto_config_benchmark.py --task lesions --iterations 300 --seeds 1337 \\
        --jobs 2 --threads 1 --out runs/auto_config_benchmark_lesions
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

# A sibling script: `python benchmarks/auto_config_benchmark.py` puts this folder first on sys.path.
from organ_ssl_benchmark import run_one

from sfpc.training.config import TrainConfig
from sfpc.training.data import discover_cases, load_or_make_split, make_split_params
from sfpc.training.organ_task import make_organ_dataset
from sfpc.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


def hand_args(a: argparse.Namespace) -> argparse.Namespace:
    """The organ benchmark's committed CPU flags (docs/benchmarks.md)."""
    return argparse.Namespace(
        iterations=a.iterations, val_every=a.val_every or max(1, a.iterations // 5),
        empty_slice_prob=0.25, no_progress=True, uamt_t=8, threads=a.threads,
        patch_size=96, spacing=4.0)


def run_hand(dataset: Path, out: Path, a: argparse.Namespace, seed: int) -> dict:
    t0 = time.perf_counter()
    if a.task == "lesions":
        r = run_hand_lesions(dataset, out, a, seed)
        run = out / f"hand_seed{seed}"
    else:
        r = run_one("sfpc", dataset, out, hand_args(a), seed)
        run = out / f"sfpc_seed{seed}"
    history = _history(run / "history.jsonl")
    return {"config": "hand", "seed": seed, "wall_s": time.perf_counter() - t0,
            "best_iteration": r["best_iteration"], "summary": r["summary"],
            "last_val_dice": history[-1]["val_dice"] if history else None,
            "step_time_median_s": r["step_time_median_s"]}


def run_hand_lesions(data: Path, out: Path, a: argparse.Namespace, seed: int) -> dict:
    """Issue 19's hand-set lesion configuration on the plan's split."""
    cfg = TrainConfig(
        data=str(data), spatial_dims=2, patch_size=[128, 128], spacing=[0.8, 0.8, None],
        foreground_fraction=0.7, method="supervised", labelled_fraction=None, val_fraction=None,
        val_count=1, iterations=a.iterations, lr_step=max(1, round(a.iterations * 2500 / 6000)),
        val_every=hand_args(a).val_every, seed=seed, out=str(out / f"hand_seed{seed}"),
        split_file=str(out / f"split_seed{seed}.json"), threads=a.threads, progress=False)
    result = train(cfg)
    best = torch.load(Path(cfg.out) / "best.pt", weights_only=False)["metadata"]["metrics"]
    return {"best_iteration": best["iteration"], "summary": best["validation"],
            "step_time_median_s": result["step_time_median_s"]}


def run_auto(dataset: Path, out: Path, a: argparse.Namespace, seed: int) -> dict:
    run = out / f"auto_seed{seed}"
    cmd = [sys.executable, "-m", "sfpc.cli", "train", "--data", str(dataset),
           "--iterations", str(a.iterations), "--seed", str(seed),
           "--val-every", str(hand_args(a).val_every), "--split-file",
           str(out / f"split_seed{seed}.json"), "--out", str(run), "--progress", "false"]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    t0 = time.perf_counter()
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "train.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    best = torch.load(run / "best.pt", weights_only=False)["metadata"]["metrics"]
    history = _history(run / "history.jsonl")
    plan = json.loads((run / "plan.json").read_text())["plan"]["config"]
    return {"config": "auto", "seed": seed, "wall_s": time.perf_counter() - t0,
            "best_iteration": best["iteration"], "summary": best["validation"],
            "last_val_dice": history[-1]["val_dice"] if history else None,
            "step_time_median_s": float(statistics.median(
                h["step_time_median_s"] for h in history)),
            "command": " ".join(cmd[1:]),
            "plan": {k: v["value"] for k, v in plan.items()}}


def _history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _classes(results: list[dict]) -> list[str]:
    """Class columns: the hand run's names (auto runs on dataset JSONs written before
    `sfpc organ-split` named its labels call the same classes class1, ...)."""
    summary = next((r for r in results if r["config"] == "hand"), results[0])["summary"]
    return [k for k in summary if isinstance(summary[k], dict) and "dice" in summary[k]
            and k != "mean"]


def _dice(r: dict, cls: str, classes: list[str]) -> float:
    s = r["summary"]
    key = cls if cls in s else f"class{classes.index(cls) + 1}"
    return float(s[key]["dice"]["mean"])


def table(results: list[dict]) -> str:
    classes = _classes(results)
    rows = ["| configuration | seed | best it. | mean Dice % | "
            + " | ".join(f"{c} %" for c in classes)
            + " | last-checkpoint mean Dice % | median step s |",
            "|---|---|---|---|" + "---|" * len(classes) + "---|---|"]
    for r in sorted(results, key=lambda r: (r["config"] != "hand", r["seed"])):
        cells = [r["config"], str(r["seed"]), str(r["best_iteration"]),
                 f"{r['summary']['mean']['dice']['mean'] * 100:.1f}",
                 *(f"{_dice(r, c, classes) * 100:.1f}" for c in classes),
                 "-" if r["last_val_dice"] is None else f"{r['last_val_dice'] * 100:.1f}",
                 f"{r['step_time_median_s']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    for config in ("hand", "auto"):
        mine = [r for r in results if r["config"] == config]
        if len(mine) > 1:
            mean = statistics.fmean(r["summary"]["mean"]["dice"]["mean"] for r in mine) * 100
            per = [statistics.fmean(_dice(r, c, classes) for r in mine) * 100 for c in classes]
            last = [r["last_val_dice"] for r in mine if r["last_val_dice"] is not None]
            rows.append(f"| {config}, mean of {len(mine)} seeds | | | {mean:.1f} | "
                        + " | ".join(f"{v:.1f}" for v in per)
                        + f" | {statistics.fmean(last) * 100:.1f} | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["organs", "lesions"], default="organs")
    p.add_argument("--data", default=None, help="default: shared/data/organs or lesions")
    p.add_argument("--out", default="runs/auto_config_benchmark")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--val-every", type=int, default=0,
                   help="both runs (default: the organ benchmark's iterations / 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    p.add_argument("--jobs", type=int, default=2, help="trainings side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--configs", nargs="+", choices=["hand", "auto"], default=["hand", "auto"],
                   help="which configurations to train (default both)")
    p.add_argument("--merge-from", metavar="RESULTS_JSON",
                   help="take the rows of the configurations not trained from this earlier "
                        "results file (same split, seeds and iterations; checked)")
    p.add_argument("--table-from", metavar="RESULTS_JSON", help="print the table of a results "
                                                                "file, train nothing")
    a = p.parse_args(argv)
    if a.table_from:
        print(table(json.loads(Path(a.table_from).read_text())["results"]))
        return 0
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    a.data = a.data or str(REPO.parent / "shared" / "data" / a.task)
    datasets = {}
    splits: dict = {}
    for s in a.seeds:  # one split file per seed, written before the two runs share it
        if a.task == "organs":
            # The organ benchmark's split: 10 % of ct_a's slices, spread evenly, 3/4 on organs.
            datasets[s] = out / f"dataset_seed{s}.json"
            splits[s] = make_organ_dataset(a.data, datasets[s], 0.1, s, selection="even",
                                           organ_share=0.75)
            params = make_split_params(seed=s)
            cases = discover_cases(datasets[s], "json")
        else:
            # The plan's split of four labelled cases: one validation case, all others labelled.
            datasets[s] = Path(a.data)
            params = make_split_params(val_count=1, seed=s)
            cases = discover_cases(datasets[s])
        split = load_or_make_split(out / f"split_seed{s}.json", cases, **params)
        splits.setdefault(s, {})["val"] = [c.id for c in split.val]
    runs = [(kind, s) for s in a.seeds for kind in ("hand", "auto") if kind in a.configs]
    results: list[dict] = []
    if a.merge_from:
        earlier = json.loads(Path(a.merge_from).read_text())
        for key in ("iterations", "task"):
            if earlier["args"].get(key, "organs") != getattr(a, key):
                p.error(f"--merge-from {a.merge_from} was run with {key} "
                        f"{earlier['args'].get(key)}, not {getattr(a, key)}")
        results = [{**r, "from": a.merge_from} for r in earlier["results"]
                   if r["config"] not in a.configs and r["seed"] in a.seeds]
    t0 = time.perf_counter()

    def save() -> None:
        (out / "results.json").write_text(json.dumps(
            {"args": vars(a), "splits": splits, "results": results,
             "wall_minutes": (time.perf_counter() - t0) / 60}, indent=1) + "\n")

    # The hand run writes the shared split file first (its roles fix it); the auto run reuses it.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_hand if kind == "hand" else run_auto, datasets[s], out, a,
                               s): (kind, s)
                   for kind, s in runs}
        for fut in as_completed(futures):
            kind, s = futures[fut]
            results.append(fut.result())
            print(f"== {kind} seed {s}: {results[-1]['wall_s'] / 60:.1f} min, mean Dice "
                  f"{results[-1]['summary']['mean']['dice']['mean']:.3f}", flush=True)
            save()
    print(f"\niterations {a.iterations}, seeds {a.seeds}, {a.jobs} job(s) x {a.threads} "
          f"thread(s), wall {(time.perf_counter() - t0) / 60:.1f} min")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
