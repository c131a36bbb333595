"""The torch method comparison: each method's predictor against the same quantity written out
by hand from the network (softmax of logits / T; FLPM's stacked perturbed features, an
independent path from the folded graph the method runs; flips undone by hand; dropout masks
drawn in training mode), the MC-dropout mode switch, and compare_methods' bookkeeping against
scikit-learn on its own maps."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

from sfpc.inference.uncertainty import predictive_entropy  # noqa: E402
from sfpc.model.networks import NetConfig, SFPCNet  # noqa: E402
from sfpc.training.uncertainty_compare import (  # noqa: E402
    compare_methods,
    comparison_table,
    dropout_layers,
    flip_combos,
    mc_dropout_mode,
    method_predictor,
)
from sfpc.training.uncertainty_metrics import quantise_scores  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny convolutions: thread start-up and, on a busy machine, spinning workers cost far more
    # than the arithmetic (100x measured on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(spatial_dims: int = 2, dropout: float = 0.3, seed: int = 0) -> SFPCNet:
    torch.manual_seed(seed)
    net = SFPCNet(NetConfig(spatial_dims=spatial_dims, num_classes=3,
                            channels=(4, 8, 16, 32, 64),
                            encoder_dropout=(dropout,) * 5))
    with torch.no_grad():
        flpm = net.flpm()
        flpm.running_dmu.uniform_(0.2, 0.5)
        flpm.running_dsigma.uniform_(0.2, 0.5)
        net.classifier.weight.mul_(20.0)  # confident enough for perturbations to show
    return net.eval()


def test_flip_combos():
    assert flip_combos(2, 4) == [(), (0,), (1,), (0, 1)]
    assert flip_combos(3, 4) == [(), (0,), (1,), (2,)]
    with pytest.raises(ValueError):
        flip_combos(2, 5)


def test_mc_dropout_mode_switches_only_dropout():
    net = tiny_net()
    net.train()
    layers = dropout_layers(net)
    assert len(layers) == 5  # one per encoder ConvBlock
    with mc_dropout_mode(net):
        assert all(m.training for m in layers)
        norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and not any(m.training for m in norms)
    assert net.training  # restored
    with pytest.raises(ValueError, match="dropout"), mc_dropout_mode(tiny_net(dropout=0.0)):
        pass


def test_predictors_against_hand_written_quantities():
    net = tiny_net()
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    xt = torch.from_numpy(x)
    t = 1.7
    with torch.no_grad():
        logits = net(xt)
        p = torch.softmax(logits / t, dim=1).numpy()
        soft = method_predictor(net, "softmax", temperature=t)(x)
        np.testing.assert_allclose(soft["mean_probs"], p, atol=1e-6)
        h = -(p * np.log(np.maximum(p, 1e-12))).sum(1, keepdims=True)
        np.testing.assert_allclose(soft["mean_entropy"], h, atol=1e-5)

        # FLPM: stacked perturbed features -> classifier, against the method's folded graph.
        stacked = torch.softmax(net.perturbed_logits(net.seg_features(xt), 4) / t, dim=2)
        flpm = method_predictor(net, "flpm", m=4, temperature=t)(x)
        np.testing.assert_allclose(flpm["mean_probs"], stacked.mean(0).numpy(), atol=1e-5)
        assert (stacked[0] - stacked[-1]).abs().max() > 1e-2  # the samples really differ

        # Flip TTA with M = 2: identity and axis-0 flip undone by hand.
        flipped = torch.softmax(torch.flip(net(torch.flip(xt, [2])), [2]) / t, dim=1).numpy()
        tta = method_predictor(net, "tta_flip", m=2, temperature=t)(x)
        np.testing.assert_allclose(tta["mean_probs"], (p + flipped) / 2, atol=1e-5)

        # FLPM on the input and its axis-0 flip: the mean of both passes' 4 perturbed samples.
        def stack_of(inp: torch.Tensor) -> torch.Tensor:
            return torch.softmax(net.perturbed_logits(net.seg_features(inp), 4) / t, dim=2)

        both = torch.cat([stacked, torch.flip(stack_of(torch.flip(xt, [2])), [3])])
        hybrid = method_predictor(net, "flpm_flip", m=4, temperature=t)(x)
        np.testing.assert_allclose(hybrid["mean_probs"], both.mean(0).numpy(), atol=1e-5)
        h_both = -(both * torch.log(both.clamp_min(1e-12))).sum(2, keepdim=True).mean(0)
        np.testing.assert_allclose(hybrid["mean_entropy"], h_both.numpy(), atol=1e-5)

    # MC dropout: M passes with the dropout masks of training mode, same seed -> same draws.
    with mc_dropout_mode(net):
        torch.manual_seed(5)
        mc = method_predictor(net, "mc_dropout", m=3, temperature=t)(x)
        torch.manual_seed(5)
        with torch.no_grad():
            draws = [torch.softmax(net(xt) / t, dim=1).numpy() for _ in range(3)]
    np.testing.assert_allclose(mc["mean_probs"], np.mean(draws, axis=0), atol=1e-6)
    assert np.abs(draws[0] - draws[1]).max() > 1e-4
    assert not net.training


def test_compare_methods_bookkeeping():
    """compare_methods' rows and bookkeeping; the softmax row's AUROC against sklearn on the
    quantised scores (where the scorer's histogram is exact) and within the proven bound of half
    the tie mass on the raw ones: a fixed tolerance would depend on the network's last bits,
    which differ between CPUs (see test_uncertainty_eval)."""
    net = tiny_net()
    rng = np.random.default_rng(1)
    volumes = []
    for i in range(2):
        image = rng.normal(size=(1, 24, 20, 3)).astype(np.float32)
        label = rng.integers(0, 3, size=(24, 20, 3))
        volumes.append({"id": f"v{i}", "image": image, "label": label,
                        "spacing": (2.0, 2.0, 3.0), "slices": None})
    res = compare_methods(net, volumes, class_names=["bg", "a", "b"], patch_size=[32, 32],
                          m=2, temperature=1.0, warmup=False)
    methods = res["methods"]
    assert list(methods) == ["softmax", "flpm", "mc_dropout", "tta_flip"]
    assert methods["softmax"]["relative_cost"] == 1.0
    assert [methods[k]["passes"] for k in methods] == [1, 1, 2, 2]
    assert "mutual_information" not in methods["softmax"]["error_detection"]
    assert len(methods["flpm"]["cases"]) == 2
    # The softmax row against sklearn on the same maps, recomputed through its predictor.
    from sfpc.inference.engine import predict_model_grid

    scores, errors = [], []
    for v in volumes:
        out = predict_model_grid(method_predictor(net, "softmax"), v["image"], spatial_dims=2,
                                 patch_size=[32, 32], plane_axis=2, sw_batch_size=16)
        scores.append(predictive_entropy(out["mean_probs"]).ravel())
        errors.append((out["mean_probs"].argmax(0) != v["label"]).ravel())
    e, s = np.concatenate(errors), np.concatenate(scores)
    overall = methods["softmax"]["error_detection"]["entropy"]["overall"]
    assert overall["auroc"] == pytest.approx(
        sklearn_metrics.roc_auc_score(e, quantise_scores(s)), abs=1e-9)
    assert abs(overall["auroc"] - sklearn_metrics.roc_auc_score(e, s)) <= \
        0.5 * overall["tie_mass"] + 1e-9
    assert "tta_flip" in comparison_table(res)
    assert set(res["paired_auroc"]) == {"flpm-softmax", "flpm-mc_dropout", "flpm-tta_flip"}
    extra = compare_methods(net, volumes, class_names=["bg", "a", "b"], patch_size=[32, 32],
                            m=2, methods=["softmax", "flpm_flip"], warmup=False)
    assert extra["methods"]["flpm_flip"]["passes"] == 2
    assert set(extra["paired_auroc"]) == {"flpm_flip-softmax"}
