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
from sfpc.training.config import TrainConfig
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
        spacing=cfg.spacing, input_mode=cfg.input_mode, patch_size=list(cfg.patch_size),
        normalisation=dict(cfg.normalisation),
        perturbation={"kind": net.cfg.perturbation, "M": cfg.m, "tau": cfg.tau,
                      "eps_grid": eps_grid(cfg.m, cfg.tau)},
        inference={"overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125,
                   "sw_batch_size": 4 if cfg.spatial_dims == 3 else 16},
        training={"method": cfg.method, "data": cfg.data, "iterations": cfg.iterations,
                  "labelled_fraction": cfg.labelled_fraction, "labelled_count": cfg.labelled_count,
                  "n_labelled": data.n_labelled, "n_unlabelled": data.n_unlabelled,
                  "n_val": len(data.val_cases), "seed": cfg.seed},
        net=net.cfg.to_dict(), sfpc_version=sfpc.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def mean_dice(summary: dict) -> float:
    return float(summary["mean"]["dice"]["mean"])


class Trainer:
    def __init__(self, cfg: TrainConfig):
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
        self.history: list[dict] = []
        if cfg.resume:
            self._resume(cfg.resume)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "iteration": self.iteration, "best": self.best, "history": self.history,
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
                             device=self.device)
        return res["summary"]

    def train(self) -> dict:
        cfg = self.cfg
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
            loss, logs = self.method.step(xl, yl, xu, self.iteration, cfg.iterations)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.method.update_teacher(self.net, self.iteration)
            step_times.append(time.perf_counter() - t0)
            window.append(logs["loss"])
            self.iteration += 1
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
        return {"best_dice": self.best, "history": self.history,
                "step_time_median_s": float(np.median(step_times)) if step_times else None}

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
            score = mean_dice(summary) if summary else -1.0
            entry = {"iteration": self.iteration, **logs, "val_dice": score,
                     "step_time_median_s": float(np.median(step_times[-200:]))}
            self.history.append(entry)
            if summary is not None and score > self.best:
                self.best = score
                self.meta.metrics = {"validation": summary, "iteration": self.iteration}
                self.save("best.pt")
            self.save("last.pt")
            with open(self.out / "history.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            tqdm.write(f"[{self.iteration}] val mean Dice {score:.4f} (best {self.best:.4f})")
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
