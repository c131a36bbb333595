"""Training step time of every method relative to the supervised-only step, measured side by side.

All methods get the same fixed two-stream batch; their steps are interleaved round-robin so that
machine drift hits every method alike; medians are reported.

    python benchmarks/step_time.py --size 128 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from sfpc.model.networks import NetConfig, SFPCNet
from sfpc.training.methods import METHODS, LossConfig, Method, TrainStep, net_config_for


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--spatial-dims", type=int, default=2)
    p.add_argument("--size", type=int, default=128, help="patch edge (128 = the organ benchmark)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="labelled = unlabelled batch size")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shape = (a.size,) * a.spatial_dims
    xl, xu = torch.randn(a.batch, 1, *shape), torch.randn(a.batch, 1, *shape)
    yl = torch.randint(0, a.classes, (a.batch, *shape))
    runners = {}
    for name in a.methods:
        lc = LossConfig()
        net = SFPCNet(net_config_for(name, NetConfig(spatial_dims=a.spatial_dims,
                                                     num_classes=a.classes), lc))
        method = Method(name, TrainStep(net), lc)
        if method.uses_teacher:
            method.init_teacher(net)
        runners[name] = (net, method, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    times: dict[str, list[float]] = {n: [] for n in runners}
    for i in range(a.warmup + a.repeats):
        for name, (net, method, opt) in runners.items():
            t0 = time.perf_counter()
            loss, _ = method.step(xl, yl, xu, i, 100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.update_teacher(net, i)
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times.get("supervised") or next(iter(times.values())))
    print(f"{a.spatial_dims}D, patch {shape}, batch {a.batch}+{a.batch}, {a.classes} classes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.repeats} repeats")
    print("| method | median step (s) | vs supervised |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
