"""End to end: tiny 2D and 3D SFPC models train on synthetic data on CPU; crash-resume and a
2-process DDP (gloo) run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sfpc.training import synth
from sfpc.training.config import TrainConfig
from sfpc.training.trainer import Trainer, train

pytestmark = pytest.mark.slow

SMALL = [8, 16, 32, 64, 128]


@pytest.fixture(scope="module")
def acdc(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("acdc")
    synth.generate("acdc", out, n_cases=12, seed=0)
    return out


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("brats")
    synth.generate("brats", out, n_cases=8, seed=0, shape=(64, 64, 64))
    return out


def cfg_2d(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), spatial_dims=2, patch_size=[64, 64], input_mode="resize",
                normalisation={"kind": "minmax"}, labelled_count=3, val_count=3, iterations=150,
                val_every=50, lr=0.05, channels=SMALL, out=str(out), progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_2d_sfpc_learns(acdc, tmp_path):
    cfg = cfg_2d(acdc, tmp_path)
    trainer = Trainer(cfg)
    before = trainer.validate()["mean"]["dice"]["mean"]
    result = trainer.train()
    losses = [h["loss_avg"] for h in result["history"]]  # mean loss of each 50-step window
    assert losses[-1] < losses[0]
    assert result["best_dice"] > 0.3 > before + 0.1
    ck = torch.load(tmp_path / "best.pt", weights_only=False)
    assert ck["metadata"]["class_names"][0] == "background"
    assert ck["metadata"]["num_classes"] == 4  # ACDC: background, RV, Myo, LV
    assert float(ck["model"]["perturbation.running_dmu"].abs().sum()) > 0


def test_tiny_3d_sfpc_learns(brats, tmp_path):
    cfg = TrainConfig(data=str(brats), spatial_dims=3, patch_size=[32, 32, 32], labelled_count=3,
                      val_count=2, iterations=60, val_every=30, lr=0.05, channels=SMALL,
                      batch_labelled=2, batch_unlabelled=2, out=str(tmp_path), progress=False,
                      seed=1)
    trainer = Trainer(cfg)
    before = trainer.validate()["mean"]["dice"]["mean"]
    result = trainer.train()
    assert result["history"][-1]["loss_avg"] < result["history"][0]["loss_avg"]
    assert result["best_dice"] > max(0.25, before + 0.1)


@pytest.mark.parametrize("method", ["supervised", "seg+rec", "seg+flpm", "urpc", "uamt", "mcnet"])
def test_every_method_runs_a_few_steps(acdc, tmp_path, method):
    cfg = cfg_2d(acdc, tmp_path, method=method, iterations=4, val_every=4, uamt_t=2)
    result = train(cfg)
    assert result["history"] and all(v == v for v in result["history"][-1].values())  # no NaN


@pytest.mark.parametrize("perturbation", ["fnoise", "fdrop", "sdrop"])
def test_figure9_perturbations_run(acdc, tmp_path, perturbation):
    result = train(cfg_2d(acdc, tmp_path, perturbation=perturbation, iterations=3, val_every=3))
    assert result["history"][-1]["lu"] >= 0


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sfpc.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _args(data: Path, out: Path, iterations: int) -> list[str]:
    return ["--data", str(data), "--spatial-dims", "2", "--patch-size", "64,64", "--input-mode",
            "resize", "--normalisation", '{"kind": "minmax"}', "--labelled-count", "3",
            "--val-count", "2", "--iterations", str(iterations), "--val-every", "10",
            "--channels", "8,16,32,64,128", "--out", str(out), "--progress", "false",
            "--threads", "1", "--seed", "5"]


def test_resume_after_kill_gives_the_same_model_as_an_uninterrupted_run(acdc, tmp_path):
    straight = _run_cli(_args(acdc, tmp_path / "a", 40))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    crashed_dir = tmp_path / "b"
    proc = _run_cli(_args(acdc, crashed_dir, 40))
    deadline = time.time() + 240
    while time.time() < deadline and not (crashed_dir / "last.pt").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
    proc.wait(timeout=30)
    killed_at = torch.load(crashed_dir / "last.pt", weights_only=False)["iteration"]
    assert killed_at < 40

    resumed = _run_cli([*_args(acdc, crashed_dir, 40), "--resume", "auto"])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert f"resumed from {crashed_dir / 'last.pt'} at iteration {killed_at}" in out
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(crashed_dir / "last.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 40
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_ddp_two_process_gloo(acdc, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sfpc.cli", "train", *_args(acdc, tmp_path, 6)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 ranks in sync" in proc.stdout + proc.stderr
    assert (tmp_path / "best.pt").exists()
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["checkpoint"].endswith("best.pt")
