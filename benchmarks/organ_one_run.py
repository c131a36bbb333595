"""Train one method of the organ CT task on an existing dataset JSON, with config overrides, and
print its best validation Dice per class: for checks such as seed-to-seed spread.

    python benchmarks/organ_one_run.py NAME METHOD SEED ITERATIONS [JSON_OVERRIDES]
        [--dataset runs/organ_ssl_benchmark/dataset.json]

The seed-variance figure in docs/benchmarks.md came from
    python benchmarks/organ_one_run.py supA supervised 7 800
(the seed-1337 benchmark's dataset JSON, 1 thread, outputs under runs/exp/NAME).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sfpc.training.config import TrainConfig
from sfpc.training.organ_task import train_overrides
from sfpc.training.trainer import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("method")
    p.add_argument("seed", type=int)
    p.add_argument("iterations", type=int)
    p.add_argument("overrides", nargs="?", default="{}", help="JSON TrainConfig fields; "
                   "an 'augment' dict is merged into the task's augmentation")
    p.add_argument("--dataset", default="runs/organ_ssl_benchmark/dataset.json")
    a = p.parse_args()
    extra = json.loads(a.overrides)
    f = train_overrides()
    f.update(data=a.dataset, method=a.method, seed=a.seed, iterations=a.iterations,
             lr_step=max(1, round(a.iterations * 2500 / 6000)), val_every=a.iterations // 4,
             out=f"runs/exp/{a.name}", progress=False,
             split_file=f"runs/exp/{a.name}_split.json", threads=1)
    f["augment"] = {**f["augment"], **extra.pop("augment", {})}
    f.update(extra)
    t0 = time.time()
    train(TrainConfig(**f))
    best = torch.load(f"runs/exp/{a.name}/best.pt", weights_only=False)["metadata"]["metrics"]
    s = best["validation"]
    print(a.name, "wall", round(time.time() - t0), "best_it", best["iteration"], "mean",
          round(s["mean"]["dice"]["mean"], 3),
          {c: round(s[c]["dice"]["mean"], 3) for c in ("spleen", "liver", "stomach")}, flush=True)


if __name__ == "__main__":
    main()
