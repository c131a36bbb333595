"""The paper's equations worked by hand against the implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sfpc.model.networks import NetConfig, SFPCNet, UncertaintyHead
from sfpc.model.perturbation import FLPM, eps_grid
from sfpc.training.losses import fpc_loss, lambda1, supervised_loss


def _hand_flpm(f: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Equations 1-3 with plain loops: f (B, C, N) -> (M, B, C, N)."""
    b, c, n = f.shape
    mean = [[sum(f[j, k]) / n for k in range(c)] for j in range(b)]
    std = [[math.sqrt(sum((v - mean[j][k]) ** 2 for v in f[j, k]) / n + 1e-6) for k in range(c)]
           for j in range(b)]

    def spread(vals: list[float]) -> float:  # sample std over the batch
        mu = sum(vals) / len(vals)
        return math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))

    dmu = [spread([mean[j][k] for j in range(b)]) for k in range(c)]
    dsig = [spread([std[j][k] for j in range(b)]) for k in range(c)]
    out = np.zeros((eps.shape[0], b, c, n))
    for m in range(eps.shape[0]):
        for j in range(b):
            for k in range(c):
                gamma = std[j][k] + eps[m, j] * dsig[k]  # eq. 2
                mu = mean[j][k] + eps[m, j] * dmu[k]  # eq. 3
                for i in range(n):
                    out[m, j, k, i] = gamma * (f[j, k, i] - mean[j][k]) / std[j][k] + mu  # eq. 1
    return out


def test_flpm_matches_equations_1_to_3_by_hand():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 2, 2, 3)).astype(np.float64) * np.array([1.0, 3.0])[None, :, None, None]
    eps = np.array([[0.1, -0.05, 0.02], [-0.1, 0.07, 0.0]])
    mod = FLPM(channels=2, tau=0.1).double().train()
    out = mod(torch.from_numpy(f), m=2, eps=torch.from_numpy(eps)).numpy()
    hand = _hand_flpm(f.reshape(3, 2, 6), eps).reshape(2 * 3, 2, 2, 3)
    np.testing.assert_allclose(out, hand, rtol=1e-10, atol=1e-12)


def test_flpm_running_spreads_are_used_at_inference_with_the_fixed_grid():
    torch.manual_seed(0)
    mod = FLPM(channels=4, tau=0.1, momentum=0.5).train()
    a, b = torch.randn(4, 4, 5, 5), torch.randn(4, 4, 5, 5) * 2
    mod(a, m=1)
    first = mod.running_dmu.clone()
    mod(b, m=1)
    m_b = b.mean(dim=(2, 3))
    expected = 0.5 * first + 0.5 * m_b.std(dim=0)
    torch.testing.assert_close(mod.running_dmu, expected)
    # Eval on ONE image: the spreads come from the buffers, eps from the grid [-tau, -tau/3, ...].
    mod.eval()
    x = torch.randn(1, 4, 5, 5)
    out = mod(x, m=4).reshape(4, 1, 4, 5, 5)
    assert eps_grid(4, 0.1) == pytest.approx([-0.1, -0.1 / 3, 0.1 / 3, 0.1])
    mean = x.mean(dim=(2, 3))
    for i, e in enumerate(eps_grid(4, 0.1)):
        got = out[i].mean(dim=(2, 3))
        torch.testing.assert_close(got, mean + e * mod.running_dmu[None], rtol=1e-4, atol=1e-5)
    assert torch.equal(mod(x, m=4), mod(x, m=4))  # deterministic uncertainty for serving


def test_one_classifier_call_on_the_stack_equals_m_separate_predictions():
    torch.manual_seed(0)
    net = SFPCNet(NetConfig(spatial_dims=2, num_classes=3, channels=(4, 8, 16, 32, 64))).eval()
    x = torch.randn(2, 1, 32, 32)
    probs = net.sample_probs(x, 4)
    f = net.seg_features(x)
    for i, e in enumerate(eps_grid(4, 0.1)):
        eps = torch.full((1, 2), e)
        one = torch.softmax(net.classifier(net.perturbation(f, 1, eps=eps)), dim=1)
        torch.testing.assert_close(probs[i], one)
    mean_p, mean_h = UncertaintyHead(net, 4)(x)
    torch.testing.assert_close(mean_p, probs.mean(0))
    h = -(probs * probs.log()).sum(2, keepdim=True).mean(0)
    torch.testing.assert_close(mean_h, h)


def _g_hand(ps: list[list[float]], weighted: bool, norm: str = "l2") -> float:
    m, k = len(ps), len(ps[0])
    pbar = [sum(p[c] for p in ps) / m for c in range(k)]
    ws, ds = [], []
    for p in ps:
        h = -sum(v * math.log(v) for v in p)
        ws.append(math.exp(-h) if weighted else 1.0)
        diff = [p[c] - pbar[c] for c in range(k)]
        ds.append(math.sqrt(sum(d * d for d in diff)) if norm == "l2" else sum(map(abs, diff)))
    return (1 / m) * sum(w * d for w, d in zip(ws, ds, strict=True)) / sum(ws)  # eq. 5


def _as_probs(ps: list[list[float]]) -> torch.Tensor:
    return torch.tensor(ps, dtype=torch.float64)[:, None, :, None, None]  # (M, B=1, K, 1, 1)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_consistency_loss_matches_equation_5(norm):
    ps = [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.7, 0.2, 0.1]]
    got = fpc_loss(_as_probs(ps), norm=norm).item()
    assert got == pytest.approx(_g_hand(ps, weighted=True, norm=norm), rel=1e-9)
    assert fpc_loss(_as_probs(ps), norm=norm, weighted=False).item() == pytest.approx(
        _g_hand(ps, weighted=False, norm=norm), rel=1e-9)


def test_consistency_loss_zero_for_identical_and_weights_confident_outliers_more():
    same = [[0.8, 0.2]] * 4
    assert fpc_loss(_as_probs(same)).item() == pytest.approx(0.0, abs=1e-6)
    # Three agreeing samples and one outlier: a confident outlier gets a large w_m (low
    # entropy), so the weighted loss exceeds the plain one; an uncertain outlier the reverse.
    confident_outlier = [[0.3, 0.7]] * 3 + [[0.99, 0.01]]
    uncertain_outlier = [[0.95, 0.05]] * 3 + [[0.5, 0.5]]
    w_c = fpc_loss(_as_probs(confident_outlier)).item()
    u_c = fpc_loss(_as_probs(confident_outlier), weighted=False).item()
    w_u = fpc_loss(_as_probs(uncertain_outlier)).item()
    u_u = fpc_loss(_as_probs(uncertain_outlier), weighted=False).item()
    assert w_c > u_c
    assert w_u < u_u


def test_lambda1_gaussian_rampup_values():
    assert lambda1(0, 6000) == pytest.approx(0.1 * math.exp(-5))
    assert lambda1(3000, 6000) == pytest.approx(0.1 * math.exp(-1.25))
    assert lambda1(6000, 6000) == pytest.approx(0.1)
    assert lambda1(9000, 6000) == pytest.approx(0.1)  # clamped past t_max


def test_supervised_loss_equals_monai_dice_ce():
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 9)
    y = torch.randint(0, 4, (3, 8, 9))
    oracle = monai_losses.DiceCELoss(softmax=True, to_onehot_y=True, squared_pred=True, batch=True,
                                     smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=0.5, lambda_ce=0.5)
    torch.testing.assert_close(supervised_loss(logits, y), oracle(logits, y[:, None]))


def test_flpm_gradients_flow_through_features_not_statistics():
    f = torch.randn(4, 3, 6, 6, requires_grad=True)
    mod = FLPM(3).train()
    out = mod(f, m=2)
    out.sum().backward()
    # d/df of gamma*(f - m)/s + mu with m, s detached: gamma/s per element, never zero.
    assert f.grad is not None and torch.all(f.grad.abs() > 0)
