"""The trainer: one loop for every method, on CPU, one GPU, or several GPUs/nodes via torchrun.

Checkpoints (last.pt every validation, best.pt on the best mean Dice) carry the model, optimiser,
scheduler, teacher, RNG states and the model metadata, so that `--resume auto` continues after a
crash from the same iteration, and `sfpc export` needs nothing but the checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import sfpc
from sfpc.inference.contract import ModelMetadata, plane_axis
from sfpc.model.networks import NetConfig, SFPCNet
from sfpc.model.perturbation import eps_grid
from sfpc.training.config import PLANES, TrainConfig, check_context, resolve_spacing
from sfpc.training.datamodule import TrainData, build_data
from sfpc.training.evaluate import evaluate_cases
from sfpc.training.methods import LossConfig, Method, TrainStep, net_config_for


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref not in ("auto", "cuda", "cpu"):
        device = torch.device(device_pref)
    elif cuda:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code draws from the global RNG
    torch.manual_seed(seed)


def loss_config(cfg: TrainConfig) -> LossConfig:
    return LossConfig(m=cfg.m, tau=cfg.tau, norm=cfg.consistency_norm, detach_mean=cfg.detach_mean,
                      w_max=cfg.w_max, lambda2=cfg.lambda2, perturbation=cfg.perturbation,
                      uamt_t=cfg.uamt_t, ema_decay=cfg.ema_decay)


def build_net(cfg: TrainConfig, data: TrainData) -> SFPCNet:
    base = NetConfig(spatial_dims=cfg.spatial_dims, in_channels=data.in_channels,
                     num_classes=data.num_classes, channels=tuple(cfg.channels),
                     encoder_dropout=tuple(cfg.encoder_dropout))
    return SFPCNet(net_config_for(cfg.method, base, loss_config(cfg)))


def make_metadata(cfg: TrainConfig, data: TrainData, net: SFPCNet) -> ModelMetadata:
    return ModelMetadata(
        name=cfg.name, version=sfpc.__version__, task=cfg.task, spatial_dims=cfg.spatial_dims,
        in_channels=data.in_channels, num_classes=data.num_classes,
        class_names=list(data.class_names), orientation="RAS", plane=cfg.plane,
        spacing=cfg.spacing, input_mode=cfg.input_mode, resampling=cfg.resampling,
        context_slices=cfg.context_slices, patch_size=list(cfg.patch_size),
        normalisation=dict(cfg.normalisation),
        perturbation={"kind": net.cfg.perturbation, "M": cfg.m, "tau": cfg.tau,
                      "eps_grid": eps_grid(cfg.m, cfg.tau)},
        inference={"overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125,
                   "sw_batch_size": 4 if cfg.spatial_dims == 3 else 16},
        training={"method": cfg.method, "data": cfg.data, "iterations": cfg.iterations,
                  "labelled_fraction": cfg.labelled_fraction, "labelled_count": cfg.labelled_count,
                  "n_labelled": data.n_labelled, "n_unlabelled": data.n_unlabelled,
                  "n_val": len(data.val_cases), "seed": cfg.seed,
                  # The engine refuses flip TTA for a model trained without flips: every export
                  # must say, not only the default model's build (flip is on unless turned off).
                  "augment": {"flip": True, **dict(cfg.augment)}},
        net=net.cfg.to_dict(), sfpc_version=sfpc.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def mean_dice(summary: dict) -> float:
    return float(summary["mean"]["dice"]["mean"])


def windows_per_case(shape: tuple[int, ...], cfg: TrainConfig) -> tuple[int, int]:
    """(slices or 1, windows per slice or volume) the validation's sliding window runs over a
    model-grid volume of spatial ``shape``, as the engine places them (padded to the patch)."""
    if cfg.spatial_dims == 2:
        axis = PLANES[cfg.plane]
        slices = shape[axis]
        if cfg.input_mode == "resize":
            return slices, 1
        spatial = [n for a, n in enumerate(shape) if a != axis]
    else:
        slices, spatial = 1, list(shape)
    windows = 1
    for n, p in zip(spatial, cfg.patch_size, strict=True):
        n = max(n, p)
        step = p if p == n else max(int(p * (1 - cfg.val_overlap)), 1)
        windows *= int(np.ceil((n - p) / step)) + 1
    return slices, windows


class PredictionWatch:
    """Which foreground classes the network predicts on the labelled patches of each step.

    A class that the labels of recent batches show but that has not been predicted on any
    labelled patch for ``window`` iterations gets one warning naming the likely causes; the
    forward hook reads the clean logits the step computes anyway (the classifier's first call).
    """

    def __init__(self, class_names: list[str], window: int):
        self.names, self.window = class_names, int(window)
        k = len(class_names)
        self.last_predicted = np.full(k, -1)
        self.first_present = np.full(k, -1)
        self.last_present = np.full(k, -1)
        self.warned: list[str] = []
        self._n = 0
        self._counts: torch.Tensor | None = None

    def hook(self, _module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if self._n and self._counts is None:
            pred = output[: self._n].detach().argmax(1).flatten()
            self._counts = torch.bincount(pred, minlength=output.shape[1])

    def arm(self, n_labelled: int) -> None:
        self._n, self._counts = n_labelled, None

    def update(self, iteration: int, labels: torch.Tensor) -> list[str]:
        """Record step ``iteration`` (1-based); return the warnings it raises."""
        counts, self._n = self._counts, 0
        if counts is None or self.window <= 0:
            return []
        k = len(self.names)
        predicted = (counts[:k] > 0).cpu().numpy()
        present = (torch.bincount(labels.flatten(), minlength=k)[:k] > 0).cpu().numpy()
        self.last_predicted[predicted] = iteration
        self.first_present[present & (self.first_present < 0)] = iteration
        self.last_present[present] = iteration
        out = []
        for c in range(1, k):
            if self.first_present[c] < 0 or self.names[c] in self.warned:
                continue
            since = max(self.last_predicted[c], self.first_present[c] - 1, 0)
            recent = self.last_present[c] > iteration - self.window
            if recent and iteration - since >= self.window:
                self.warned.append(self.names[c])
                when = ("has never been predicted" if self.last_predicted[c] < 0 else
                        f"has not been predicted since iteration {self.last_predicted[c]}")
                out.append(
                    f"warning: class {self.names[c]!r} is in the labelled patches but {when} on "
                    f"any of them ({iteration - since} iterations). Likely causes: class balance "
                    "(it is a small share of the voxels: raise --foreground-fraction, or in 2D "
                    "lower the augment key empty_slice_prob so that slices showing it are drawn "
                    "more often), sampling (patches crop it away: a larger --patch-size or a "
                    "coarser --spacing), or the learning rate (--lr; a supervised loss stuck at "
                    "the value of predicting background everywhere means it is not learning).")
        return out


class Trainer:
    def __init__(self, cfg: TrainConfig):
        # The internal form of the spacing: a 2D model's two in-plane values become [x, y, None]
        # (a 2.5D model's slice axis keeps its value: its neighbours lie that far apart).
        check_context(cfg.context_slices, cfg.spatial_dims, cfg.input_mode, cfg.spacing,
                      cfg.plane)
        cfg.spacing = resolve_spacing(cfg.spacing, cfg.spatial_dims, cfg.plane,
                                      cfg.context_slices)
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist, self.device = init_distributed(cfg.device)
        seed_everything(cfg.seed + self.dist.rank)
        self.out = Path(cfg.out)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.data = build_data(cfg, rank=self.dist.rank, world=self.dist.world)
        self.net = build_net(cfg, self.data).to(self.device)
        self.init_notes: list[str] = []
        if cfg.init:
            from sfpc.training.init_model import load_initial_weights

            # The first two batches (fixed by the seed) measure an export's folded BatchNorms.
            batches = [torch.cat([b[0], b[2]]).to(self.device)
                       for b in (self.data.loader.batch(i) for i in range(2))]
            self.init_notes = load_initial_weights(self.net, cfg.init, batches,
                                                   cfg.context_slices)
        self.meta = make_metadata(cfg, self.data, self.net)
        step_module: torch.nn.Module = TrainStep(self.net)
        if self.dist.world > 1:
            step_module = DDP(step_module, device_ids=[self.device.index] if
                              self.device.type == "cuda" else None, find_unused_parameters=True)
        self.method = Method(cfg.method, step_module, loss_config(cfg))
        if self.method.uses_teacher:
            self.method.init_teacher(self.net)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, cfg.lr_step, cfg.lr_gamma)
        self.iteration = 0
        self.best = -1.0
        self.best_iteration: int | None = None
        self.history: list[dict] = []
        # After the teacher's deepcopy: the teacher must not report into the student's watch.
        self.watch = PredictionWatch(self.data.class_names, cfg.warn_unpredicted)
        self.net.classifier.register_forward_hook(self.watch.hook)
        self.warnings: list[str] = []
        if cfg.resume:
            self._resume(cfg.resume)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "iteration": self.iteration, "best": self.best, "history": self.history,
            "best_iteration": self.best_iteration,
            "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "teacher": self.method.teacher.state_dict() if self.method.teacher else None,
            "config": self.cfg.to_dict(), "net_config": self.net.cfg.to_dict(),
            "metadata": self.meta.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002
                    "python": random.getstate()},
        }

    def save(self, name: str) -> Path:
        path = self.out / name
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)  # atomic: a crash mid-write never leaves a broken checkpoint
        return path

    def _resume(self, where: str) -> None:
        path = self.out / "last.pt" if where == "auto" else Path(where)
        if not path.exists():
            if where == "auto":
                return
            raise FileNotFoundError(f"cannot resume: no checkpoint at {path}")
        ck = torch.load(path, map_location=self.device, weights_only=False)
        self.net.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if ck.get("teacher") and self.method.teacher is not None:
            self.method.teacher.load_state_dict(ck["teacher"])
        self.iteration, self.best = ck["iteration"], ck["best"]
        self.best_iteration = ck.get("best_iteration")
        self.history = ck.get("history", [])
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])  # noqa: NPY002
        random.setstate(ck["rng"]["python"])
        self.data.loader.skip_to(self.iteration)
        if self.dist.main:
            tqdm.write(f"resumed from {path} at iteration {self.iteration}")

    # -- loop ----------------------------------------------------------------------------------
    def validate(self) -> dict:
        cfg = self.cfg
        res = evaluate_cases(self.net, self.data.val_cases, num_classes=self.data.num_classes,
                             spatial_dims=cfg.spatial_dims, patch_size=cfg.patch_size,
                             plane_axis=plane_axis(cfg.plane), input_mode=cfg.input_mode,
                             overlap=cfg.val_overlap, class_names=self.data.class_names,
                             device=self.device, context_slices=cfg.context_slices)
        return res["summary"]

    def describe(self) -> list[str]:
        """What the run will do: model, grid, patch, batches, cases per role, validation windows,
        schedule."""
        cfg, data = self.cfg, self.data
        if cfg.spatial_dims == 2:
            grid = f"2D {cfg.plane} slices"
            if cfg.input_mode == "resize":
                grid += " resized whole to the patch"
            elif cfg.context_slices and cfg.spacing:
                grid += (" on a " + " x ".join(f"{s:g}" for s in cfg.spacing if s is not None)
                         + f" mm grid, with {cfg.context_slices} neighbouring slice"
                         + ("s" if cfg.context_slices > 1 else "") + " on each side as channels")
            elif cfg.spacing:
                grid += (" on a " + " x ".join(f"{s:g}" for s in cfg.spacing if s is not None)
                         + " mm grid (slices keep their thickness)")
        else:
            grid = "3D patches" + (" on a " + " x ".join(
                "native" if s is None else f"{s:g}" for s in cfg.spacing) + " mm grid"
                if cfg.spacing else " on each image's own grid")
        semi = cfg.method != "supervised" and data.n_unlabelled > 0
        batch = f"{cfg.batch_labelled} labelled" + (
            f" + {cfg.batch_unlabelled} unlabelled" if semi else "")
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        lines = [
            f"sfpc train: {cfg.method}, {grid}, patch {' x '.join(map(str, cfg.patch_size))}, "
            f"batch {batch}; device {self.device}{threads}",
            f"  cases: {data.n_labelled} labelled, {data.n_unlabelled} unlabelled, "
            f"{len(data.val_cases)} validation (split {data.split_path}); classes "
            + ", ".join(data.class_names),
        ]
        if data.val_cases:
            per = [windows_per_case(self._val_shape(c), cfg) for c in data.val_cases]
            slices, windows = per[0]
            total = [s * w for s, w in per]
            shape = (f"{slices} slices x {windows}" if cfg.spatial_dims == 2 else f"{windows}")
            lines.append(f"  validation: {int(np.median(total))} windows per case (median; first "
                         f"case {shape}), every {cfg.val_every} iterations; best.pt is the best "
                         "mean Dice")
        else:
            lines.append(f"  validation: none (no validation cases): nothing is measured during "
                         f"training and last.pt, saved every {cfg.val_every} iterations, is the "
                         "result")
        lines.append(f"  schedule: {cfg.iterations} iterations, SGD lr {cfg.lr:g} x{cfg.lr_gamma:g}"
                     f" every {cfg.lr_step}, seed {cfg.seed}; output {self.out}")
        lines += [f"  {note}" for note in self.init_notes]
        return lines

    def _val_shape(self, case: dict) -> tuple[int, ...]:
        shape = list(case["image"].shape[1:])
        if case.get("slices") is not None:
            shape[PLANES[self.cfg.plane] if self.cfg.spatial_dims == 2 else 2] = (
                case["slices"][1] - case["slices"][0])
        return tuple(shape)

    def train(self) -> dict:
        cfg = self.cfg
        if self.dist.main:
            for line in self.describe():
                tqdm.write(line)
        t_start = time.perf_counter()
        self.net.train()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not (
            cfg.progress and self.dist.main), dynamic_ncols=True, desc=cfg.method)
        it = iter(self.data.loader)
        step_times: list[float] = []
        window: list[float] = []  # losses since the last validation, for a smoothed log
        while self.iteration < cfg.iterations:
            xl, yl, xu = next(it)
            xl, yl, xu = xl.to(self.device), yl.to(self.device), xu.to(self.device)
            t0 = time.perf_counter()
            self.watch.arm(xl.shape[0])
            loss, logs = self.method.step(xl, yl, xu, self.iteration, cfg.iterations)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.method.update_teacher(self.net, self.iteration)
            step_times.append(time.perf_counter() - t0)
            window.append(logs["loss"])
            self.iteration += 1
            for warning in self.watch.update(self.iteration, yl):
                self.warnings.append(warning)
                if self.dist.main:
                    tqdm.write(f"[{self.iteration}] {warning}")
            flpm = self.net.flpm()
            if flpm is not None and int(flpm.num_batches_tracked) > 0:
                logs["dmu"] = float(flpm.running_dmu.mean())
                logs["dsig"] = float(flpm.running_dsigma.mean())
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()}, refresh=False)
            if self.iteration % cfg.val_every == 0 or self.iteration == cfg.iterations:
                logs["loss_avg"] = float(np.mean(window))
                window.clear()
                self._validate_and_checkpoint(logs, step_times)
        bar.close()
        if self.dist.world > 1:
            self._check_ranks_in_sync()
        validated = bool(self.data.val_cases)
        result = {"best_dice": self.best if validated and self.best_iteration else None,
                  "best_iteration": self.best_iteration, "history": self.history,
                  "step_time_median_s": float(np.median(step_times)) if step_times else None,
                  "checkpoint": str(self.out / ("best.pt" if validated and self.best_iteration
                                                else "last.pt")),
                  "last": str(self.out / "last.pt"), "warnings": list(self.warnings),
                  "minutes": (time.perf_counter() - t_start) / 60, "validated": validated}
        if self.dist.main:
            for line in self.summary(result):
                tqdm.write(line)
        return result

    def summary(self, result: dict) -> list[str]:
        """The end of a run: time, the result and where it is, what went wrong."""
        step = result["step_time_median_s"]
        lines = [f"done: {self.iteration} iterations in {result['minutes']:.1f} min"
                 + (f" (median step {step:.2f} s)" if step else "")]
        if result["validated"] and result["best_iteration"]:
            per_class = ""
            validation = (self.meta.metrics or {}).get("validation") or {}
            names = [n for n in self.data.class_names[1:] if n in validation]
            if names:
                per_class = " (" + ", ".join(
                    f"{n} {validation[n]['dice']['mean']:.3f}" for n in names) + ")"
            lines.append(f"  best validation mean Dice {self.best:.4f} at iteration "
                         f"{result['best_iteration']}{per_class}: {result['checkpoint']}")
        else:
            lines.append("  no validation data, so no score: the model is the last checkpoint, "
                         f"{result['last']} (score it with sfpc evaluate on labelled cases "
                         "it did not train on)")
        lines.append(f"  last checkpoint: {result['last']}; history: {self.out / 'history.jsonl'}")
        never = [self.data.class_names[c] for c in range(1, len(self.data.class_names))
                 if self.watch.first_present[c] >= 0 and self.watch.last_predicted[c] < 0]
        if never:
            lines.append("  never predicted on a labelled patch: " + ", ".join(never))
        if self.watch.warned:
            lines.append("  went unpredicted for " + f"{self.watch.window}+ iterations: "
                         + ", ".join(self.watch.warned) + " (see the warnings above)")
        return lines

    def _check_ranks_in_sync(self) -> None:
        """DDP keeps replicas identical; a silent divergence would waste a multi-GPU run."""
        total = torch.stack([p.detach().double().sum() for p in self.net.parameters()]).sum()
        sums = [torch.zeros_like(total) for _ in range(self.dist.world)]
        dist.all_gather(sums, total)
        if not all(torch.allclose(s, sums[0], rtol=1e-9, atol=1e-9) for s in sums):
            raise RuntimeError(f"DDP replicas diverged: parameter sums {[float(s) for s in sums]}")
        if self.dist.main:
            tqdm.write(f"{self.dist.world} ranks in sync")

    def _validate_and_checkpoint(self, logs: dict, step_times: list[float]) -> None:
        if self.dist.main:
            summary = self.validate() if self.data.val_cases else None
            score = mean_dice(summary) if summary else None
            entry = {"iteration": self.iteration, **logs, "val_dice": score,
                     "step_time_median_s": float(np.median(step_times[-200:]))}
            self.history.append(entry)
            if summary is not None and score is not None and score > self.best:
                self.best = score
                self.best_iteration = self.iteration
                self.meta.metrics = {"validation": summary, "iteration": self.iteration}
                self.save("best.pt")
            self.save("last.pt")
            with open(self.out / "history.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            if summary is None:
                tqdm.write(f"[{self.iteration}] loss {logs['loss_avg']:.4f}; no validation data, "
                           f"last.pt saved")
            else:
                names = [n for n in self.data.class_names[1:] if n in summary]
                per_class = ", ".join(f"{n} {summary[n]['dice']['mean']:.3f}" for n in names[:8])
                tqdm.write(f"[{self.iteration}] loss {logs['loss_avg']:.4f}; val mean Dice "
                           f"{score:.4f} (best {self.best:.4f})" +
                           (f"; {per_class}" if per_class else ""))
        if self.dist.world > 1:
            dist.barrier()


def train(cfg: TrainConfig) -> dict:
    trainer = Trainer(cfg)
    if trainer.dist.main:
        cfg.save(trainer.out / "config.json")
    result = trainer.train()
    if trainer.dist.world > 1:
        dist.destroy_process_group()
    return result
