"""The uncertainty candidates of issue 18 (sfpc.model.uncertainty_heads), against oracles:

- the position-hash dropout keeps 1 - p of the elements, scaled by 1 / (1 - p), the same ones on
  every call, independently between samples (mask agreement (1-p)^2 + p^2);
- MC dropout with every rate at 0 is the plain network's softmax and its entropy, written out in
  NumPy; with the trained rates its ONNX graph equals PyTorch and its samples differ;
- FLPM at depth 0 only equals the served FLPM head (itself checked against the paper's equations
  in test_export.py); zero spreads at a deeper stage change nothing; the measured spreads at
  depth 0 equal FLPM's own training-time batch spreads on the same features;
- the ensemble's graphs equal the members' softmax averaged in NumPy, served by the engine with
  ``uncertainty_method`` "ensemble"; members that serve differently are refused;
- ``sfpc export`` and ``sfpc stage-spreads`` on a checkpoint that `sfpc train` wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sfpc.inference.contract import INPUT_NAME, TEMPERATURE_NAME, ModelMetadata
from sfpc.model import export_cli
from sfpc.model.export import export_ensemble, export_model, parity
from sfpc.model.networks import SFPCNet, UncertaintyHead
from sfpc.model.uncertainty_heads import (
    EnsembleHead,
    EnsembleNet,
    HashDropout,
    MCDropoutHead,
    StageFLPMHead,
    stage_spreads,
)
from tests.support.models import train_tiny_net

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-4
PATCH = [64, 64]
CHANNELS = (8, 16, 32, 64, 128)


def _net(seed: int, dropout: tuple[float, ...] | None = None) -> tuple[SFPCNet, ModelMetadata]:
    net = train_tiny_net(2, 3, PATCH, channels=CHANNELS, steps=3, seed=seed,
                         encoder_dropout=None if dropout is None else (0.1,) * len(CHANNELS))
    if dropout is not None:  # the rates asked for, on the dropout modules built above
        for module, p in zip([m for m in net.encoder.modules()
                              if isinstance(m, torch.nn.Dropout)], dropout, strict=False):
            module.p = p
    meta = ModelMetadata(spatial_dims=2, num_classes=3, patch_size=PATCH,
                         class_names=["bg", "a", "b"])
    return net.eval(), meta


@pytest.fixture(scope="module")
def nets() -> list[tuple[SFPCNet, ModelMetadata]]:
    return [_net(seed) for seed in (1, 2, 3)]


def _x(batch: int = 3, shape: tuple[int, int] = (64, 96), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.5, 0.25, size=(batch, 1, *shape)).astype(np.float32)


def _softmax_moments(logits: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, B, K, ...) logits -> mean softmax(z / T) and mean entropy, float64."""
    z = logits.astype(np.float64) / t.reshape(1, -1, *([1] * (logits.ndim - 2)))
    e = np.exp(z - z.max(axis=2, keepdims=True))
    p = e / e.sum(axis=2, keepdims=True)
    h = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=2, keepdims=True)
    return p.mean(axis=0), h.mean(axis=0)


def _run(folder: Path, x: np.ndarray, t: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(folder / "seg_uncertainty.onnx"),
                                providers=["CPUExecutionProvider"])
    return sess.run(["mean_probs", "mean_entropy"], {INPUT_NAME: x, TEMPERATURE_NAME: t})


def test_hash_dropout_keeps_its_share_the_same_way_every_call_and_independently():
    p = 0.3
    x = torch.ones(8, 16, 64, 64)
    drop = HashDropout(p, salt=1.0)
    y = drop(x)
    assert torch.equal(y, drop(x))  # no RNG state: the same request, the same masks
    kept = y > 0
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # 524288 elements: sd 0.0006
    # Samples (batch rows), channels and neighbouring pixels are independent of each other.
    for a, b in ((kept[0], kept[1]), (kept[:, 0], kept[:, 1]), (kept[..., 0], kept[..., 1])):
        agreement = (a == b).float().mean().item()
        assert abs(agreement - ((1 - p) ** 2 + p ** 2)) < 0.01
    assert not torch.equal(HashDropout(p, salt=8.0)(x), y)  # layers differ by their salt


def test_mc_dropout_at_rate_zero_is_the_plain_softmax(nets):
    net, _ = _net(1, dropout=(0.0, 0.0, 0.0, 0.0, 0.0))
    # Rates of 0 leave nn.Dropout modules that MCDropoutHead replaces by masks keeping all.
    head = MCDropoutHead(net, 4).eval()
    x, t = _x(), np.array([[1.0], [0.7], [1.6]], dtype=np.float32)
    with torch.no_grad():
        probs, entropy = head(torch.from_numpy(x), torch.from_numpy(t))
        logits = net(torch.from_numpy(x)).numpy()
    want_p, want_h = _softmax_moments(logits[None], t)
    np.testing.assert_allclose(probs.numpy(), want_p, atol=ATOL)
    np.testing.assert_allclose(entropy.numpy(), want_h, atol=ATOL)


def test_mc_dropout_export_matches_torch_and_its_samples_differ(nets, tmp_path):
    net, meta = _net(1, dropout=(0.05, 0.1, 0.2, 0.3, 0.5))
    written = export_model(net, meta, tmp_path, uncertainty_method="mc_dropout", m=4)
    assert written.uncertainty_method == "mc_dropout"
    assert written.perturbation["kind"] == "mc_dropout" and written.perturbation["M"] == 4
    assert written.perturbation["dropout"] == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.5])
    assert written.maps_method()["method"] == "mc_dropout"
    x, t = _x(), np.ones((3, 1), dtype=np.float32)
    diffs = parity(net, tmp_path, x)
    assert max(diffs.values()) < ATOL, diffs
    probs, mean_entropy = _run(tmp_path, x, t)
    mi = _entropy(probs) - mean_entropy[:, 0]
    assert mi.mean() > 1e-3  # the samples disagree: dropout acts
    np.testing.assert_array_equal(_run(tmp_path, x, t)[0], probs)  # deterministic


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)


def test_flpm_at_depth_zero_only_is_the_served_flpm(nets):
    net, _ = nets[0]
    x, t = torch.from_numpy(_x()), torch.tensor([[1.0], [0.8], [1.3]])
    with torch.no_grad():
        served = UncertaintyHead(net, 4, "stacked").eval()(x, t)
        stages = StageFLPMHead(net, 4, {}, net.flpm().tau).eval()(x, t)
        zero = torch.zeros(CHANNELS[1])
        quiet = StageFLPMHead(net, 4, {1: (zero, zero)}, net.flpm().tau).eval()(x, t)
    for a, b, c in zip(served, stages, quiet, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=ATOL)
        np.testing.assert_allclose(c.numpy(), a.numpy(), atol=ATOL)


def test_deeper_flpm_perturbs_and_exports_with_its_spreads(nets, tmp_path):
    net, meta = nets[0]
    spreads = {1: (torch.full((CHANNELS[1],), 0.5), torch.full((CHANNELS[1],), 0.5))}
    written = export_model(net, meta, tmp_path, uncertainty_method="flpm_stages",
                           stage_spreads=spreads)
    assert written.perturbation["depths"] == [0, 1]
    assert written.perturbation["stage_spreads"]["1"]["dmu"] == [0.5] * CHANNELS[1]
    x = _x()
    assert max(parity(net, tmp_path, x).values()) < ATOL
    served = tmp_path / "served"
    export_model(net, meta, served)
    deeper, _ = _run(tmp_path, x, np.ones((3, 1), np.float32))
    plain, _ = _run(served, x, np.ones((3, 1), np.float32))
    assert np.abs(deeper - plain).max() > 1e-3
    with pytest.raises(ValueError, match="stage_spreads"):
        export_model(net, meta, tmp_path / "x", uncertainty_method="flpm_stages")
    with pytest.raises(ValueError, match="depth 7"):
        StageFLPMHead(net, 4, {7: spreads[1]}, 0.1)


def test_stage_spreads_at_depth_zero_are_flpms_training_spreads(nets):
    net, _ = nets[1]
    batches = [torch.from_numpy(_x(4, (64, 64), seed=s)) for s in range(3)]
    measured = stage_spreads(net, batches, [0])[0]
    flpm = net.flpm()
    expected = [torch.zeros_like(flpm.running_dmu), torch.zeros_like(flpm.running_dsigma)]
    probe = type(flpm)(flpm.running_dmu.numel()).train()  # a fresh module, training mode
    from sfpc.model.perturbation import instance_stats

    with torch.no_grad():
        for b in batches:
            dmu, dsigma = probe.batch_spreads(*instance_stats(net.seg_features(b)))
            expected[0] += dmu / len(batches)
            expected[1] += dsigma / len(batches)
    np.testing.assert_allclose(measured[0].numpy(), expected[0].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(measured[1].numpy(), expected[1].numpy(), rtol=1e-5, atol=1e-7)


def test_ensemble_graphs_average_the_members(nets, tmp_path):
    members = [n for n, _ in nets]
    paths = [_checkpoint(n, m, tmp_path / f"m{i}.pt") for i, (n, m) in enumerate(nets)]
    written = export_ensemble(paths, tmp_path / "ens", name="ens")
    assert written.uncertainty_method == "ensemble" and written.perturbation["M"] == 3
    assert len(written.training["ensemble"]) == 3
    x, t = _x(), np.array([[1.0], [0.5], [2.0]], dtype=np.float32)
    with torch.no_grad():
        logits = np.stack([m(torch.from_numpy(x)).numpy() for m in members])
    want_p, want_h = _softmax_moments(logits, t)
    probs, entropy = _run(tmp_path / "ens", x, t)
    np.testing.assert_allclose(probs, want_p, atol=ATOL)
    np.testing.assert_allclose(entropy, want_h, atol=ATOL)
    seg = ort.InferenceSession(str(tmp_path / "ens" / "seg.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    mean_t1, _ = _softmax_moments(logits, np.ones(3, np.float32))
    np.testing.assert_allclose(_softmax_np(seg), mean_t1, atol=ATOL)
    with torch.no_grad():  # the torch modules the graphs were traced from
        np.testing.assert_allclose(EnsembleNet(members)(torch.from_numpy(x)).softmax(1).numpy(),
                                   mean_t1, atol=ATOL)
        np.testing.assert_allclose(EnsembleHead(members)(torch.from_numpy(x),
                                                         torch.from_numpy(t))[0].numpy(),
                                   want_p, atol=ATOL)


def _softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_engine_serves_an_ensemble_and_says_so(nets, tmp_path):
    from sfpc.inference.backends import make_backend
    from sfpc.inference.engine import Engine

    paths = [_checkpoint(n, m, tmp_path / f"m{i}.pt") for i, (n, m) in enumerate(nets[:2])]
    export_ensemble(paths, tmp_path / "ens")
    meta = ModelMetadata.load(tmp_path / "ens")
    engine = Engine(make_backend("onnxruntime", export_dir=tmp_path / "ens"), meta)
    volume = np.random.default_rng(0).normal(0.5, 0.2, size=(80, 72, 3)).astype(np.float32)
    result = engine.segment(volume, np.eye(4), uncertainty=True)
    assert result.mask.shape == volume.shape
    assert result.model["uncertainty_method"]["method"] == "ensemble"
    assert result.model["uncertainty_method"]["samples"] == 2
    assert result.entropy.shape == volume.shape


def test_ensemble_members_must_serve_alike(nets, tmp_path):
    (a, meta), (b, _) = nets[:2]
    other = ModelMetadata.from_dict({**meta.to_dict(), "patch_size": [32, 32]})
    paths = [_checkpoint(a, meta, tmp_path / "a.pt"), _checkpoint(b, other, tmp_path / "b.pt")]
    with pytest.raises(ValueError, match="patch_size"):
        export_ensemble(paths, tmp_path / "ens")
    stacked = ModelMetadata.from_dict({**meta.to_dict(), "context_slices": 1, "in_channels": 3})
    paths[1] = _checkpoint(b, stacked, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="context_slices"):
        export_ensemble(paths, tmp_path / "ens")
    with pytest.raises(ValueError, match="at least two"):
        export_ensemble(paths[:1], tmp_path / "ens")


def _checkpoint(net: SFPCNet, meta: ModelMetadata, path: Path) -> Path:
    torch.save({"net_config": net.cfg.to_dict(), "model": net.state_dict(),
                "metadata": meta.to_dict()}, path)
    return path


def test_export_cli_methods(nets, tmp_path, capsys):
    (net, meta), (other, _) = nets[:2]
    ck = _checkpoint(net, meta, tmp_path / "a.pt")
    with pytest.raises(SystemExit):
        export_cli.main(["--checkpoint", str(ck), "--out", str(tmp_path / "s"),
                         "--uncertainty-method", "flpm_stages"])
    assert "needs --stage-spreads" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # trained without encoder dropout
        export_cli.main(["--checkpoint", str(ck), "--out", str(tmp_path / "mc"),
                         "--uncertainty-method", "mc_dropout"])
    assert "MC dropout needs a network with encoder dropout" in capsys.readouterr().err
    ck = _checkpoint(*_net(4, dropout=(0.05, 0.1, 0.2, 0.3, 0.5)), tmp_path / "drop.pt")
    assert export_cli.main(["--checkpoint", str(ck), "--out", str(tmp_path / "mc"),
                            "--uncertainty-method", "mc_dropout", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert max(report["max_abs_diff"].values()) < ATOL
    assert ModelMetadata.load(tmp_path / "mc").uncertainty_method == "mc_dropout"
    ck2 = _checkpoint(other, meta, tmp_path / "b.pt")
    assert export_cli.main(["--checkpoint", str(ck), "--ensemble", str(ck2),
                            "--out", str(tmp_path / "ens")]) == 0
    assert json.loads(capsys.readouterr().out)["members"] == 2
    assert ModelMetadata.load(tmp_path / "ens").uncertainty_method == "ensemble"


@pytest.mark.slow
def test_stage_spreads_cli_on_a_trained_checkpoint(tmp_path, capsys):
    from sfpc.training import stage_spreads as cli
    from sfpc.training import synth
    from sfpc.training.config import TrainConfig
    from sfpc.training.trainer import train

    data = tmp_path / "data"
    synth.generate("acdc", data, n_cases=6, seed=0)
    cfg = TrainConfig(data=str(data), spatial_dims=2, patch_size=[64, 64], input_mode="resize",
                      normalisation={"kind": "minmax"}, labelled_count=2, val_count=1,
                      iterations=2, val_every=2, channels=list(CHANNELS),
                      out=str(tmp_path / "run"), progress=False, seed=0, threads=1)
    train(cfg)
    spreads = tmp_path / "spreads.json"
    assert cli.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--depths", "1,2",
                     "--batches", "3", "--out", str(spreads)]) == 0
    depths = json.loads(spreads.read_text())["depths"]
    assert sorted(depths) == ["1", "2"] and len(depths["1"]["dmu"]) == CHANNELS[1]
    assert all(v > 0 for v in depths["2"]["dsigma"])
    out = tmp_path / "export"
    assert export_cli.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--out", str(out),
                            "--uncertainty-method", "flpm_stages", "--stage-spreads",
                            str(spreads), "--check"]) == 0
    assert ModelMetadata.load(out).perturbation["depths"] == [0, 1, 2]
