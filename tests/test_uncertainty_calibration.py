"""Temperature scaling and the review threshold: NLL against scipy's log-softmax, the fitted T
against scipy.optimize on the same objective and against the T that generated a toy, the
threshold rule on hand-worked validation sets, and the metadata update (graph digests intact)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, special

from sfpc.inference.contract import ModelMetadata, sha256_file
from sfpc.inference.review import quality_flag
from sfpc.training import calibration as C
from sfpc.training.uncertainty_metrics import expected_calibration_error


def toy(t_true: float, n: int = 60_000, k: int = 4, seed: int = 0):
    """Logits whose labels are drawn from softmax(z / t_true): calibrated at T = t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(n, k)).astype(np.float32)
    p = special.softmax(z / t_true, axis=1)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, np.minimum(labels, k - 1)


def test_nll_matches_scipy_log_softmax():
    z, y = toy(1.0, n=1000)
    for t in (0.5, 1.0, 3.0):
        logp = special.log_softmax(z.astype(np.float64) / t, axis=1)
        expected = -np.mean(logp[np.arange(1000), y])
        assert C.nll(z, y, t) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("t_true", [0.6, 1.0, 2.5])
def test_fit_recovers_the_generating_temperature(t_true):
    z, y = toy(t_true)
    fit = C.fit_temperature(z, y)
    ref = optimize.minimize_scalar(lambda lt: C.nll(z, y, math.exp(lt)), bounds=(-3, 3),
                                   method="bounded", options={"xatol": 1e-7})
    assert fit["temperature"] == pytest.approx(math.exp(ref.x), rel=1e-3)
    assert fit["temperature"] == pytest.approx(t_true, rel=0.05)
    assert fit["nll_after"] <= fit["nll_before"] + 1e-12
    # ECE of the top label: large when mis-tempered at T = 1, near 0 once fitted.
    p_after = special.softmax(z / fit["temperature"], axis=1)
    ece_after = expected_calibration_error(p_after.max(1), p_after.argmax(1) == y)
    assert ece_after < 0.02
    if t_true != 1.0:
        p_before = special.softmax(z, axis=1)
        assert expected_calibration_error(p_before.max(1), p_before.argmax(1) == y) > 0.05


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError):
        C.nll(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError):
        C.fit_temperature(np.zeros((3, 2)), np.zeros(3), bounds=(2.0, 5.0))


def test_threshold_maximises_youden_j():
    u = [0.05, 0.10, 0.12, 0.30, 0.35, 0.20]
    dice = [0.95, 0.90, 0.92, 0.60, 0.70, 0.85]
    q = C.choose_quality_threshold(u, dice, dice_target=0.8)
    # Poor cases are u = 0.30, 0.35; any t in [0.20, 0.30) separates perfectly (J = 1); the
    # candidates are midpoints, and ties go to the largest: (0.20 + 0.30) / 2.
    assert q["threshold"] == pytest.approx(0.25)
    assert q["youden_j"] == 1.0 and q["sensitivity"] == 1.0 and q["specificity"] == 1.0
    assert q["poor_cases"] == 2 and q["flagged_cases"] == 2 and q["measure"] == \
        "boundary_uncertainty"


def test_threshold_with_overlap_and_without_boundary():
    u = [0.1, 0.2, 0.3, 0.4, None]
    dice = [0.9, 0.5, 0.9, 0.5, 0.0]
    q = C.choose_quality_threshold(u, dice, dice_target=0.8)
    assert q["cases"] == 4  # the case without a boundary takes no part
    # t = 0.15 flags 0.2, 0.3, 0.4: sens 1, spec 1/2 (J .5); t = 0.35: sens 1/2, spec 1 (J .5);
    # equal J -> the larger t.
    assert q["threshold"] == pytest.approx(0.35) and q["youden_j"] == pytest.approx(0.5)


def test_threshold_falls_back_to_a_quantile():
    u = np.linspace(0.0, 1.0, 11)
    q = C.choose_quality_threshold(u, [0.95] * 11, flag_quantile=0.9)
    assert q["threshold"] == pytest.approx(0.9) and "quantile" in q["rule"]
    assert q["flagged_cases"] == 1
    with pytest.raises(ValueError):
        C.choose_quality_threshold([None, None], [0.0, 0.0])


def test_quality_flag():
    q = {"threshold": 0.2}
    assert quality_flag(0.3, q) == {"review_recommended": True, "boundary_uncertainty": 0.3,
                                      "threshold": 0.2}
    assert quality_flag(0.2, q)["review_recommended"] is False
    none = quality_flag(None, q)
    assert none["review_recommended"] is None and "reason" in none


def test_write_calibration_keeps_graphs(tmp_path):
    graph = tmp_path / "seg.onnx"
    graph.write_bytes(b"not really onnx, only bytes to hash")
    meta = ModelMetadata(name="m", graphs={"seg": {"file": "seg.onnx",
                                                   "sha256": sha256_file(graph)}})
    meta.save(tmp_path)
    quality = {"measure": "boundary_uncertainty", "threshold": 0.3, "rule": "r",
               "chosen_on": {"cases": ["a"]}}
    C.write_calibration(tmp_path, 1.7, quality, {"ece_before": 0.1})
    raw = json.loads((tmp_path / "sfpc_model.json").read_text())
    assert raw["temperature"] == 1.7 and raw["quality"] == quality
    assert raw["metrics"]["calibration"] == {"ece_before": 0.1}
    assert raw["graphs"]["seg"]["sha256"] == sha256_file(graph)
    assert ModelMetadata.load(tmp_path).quality["threshold"] == 0.3
    with pytest.raises(ValueError):
        C.write_calibration(tmp_path, 0.0, None)
