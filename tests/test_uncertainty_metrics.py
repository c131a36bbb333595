"""Uncertainty measures against hand-worked cases and oracles: scikit-learn (dev-only:
roc_auc_score, average_precision_score) for AUROC / AP with ties, scipy.stats for ranks and
correlations, and a calibrated toy (labels drawn with the stated probabilities) for ECE."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sfpc.training import uncertainty_metrics as U

sklearn_metrics = pytest.importorskip("sklearn.metrics")


# ----------------------------------------------------------------------------------------------
# AUROC / AP / capture: hand-worked
# ----------------------------------------------------------------------------------------------


def test_perfect_reversed_and_tied_rankings():
    errors = np.array([0, 0, 0, 1, 1])
    assert U.auroc([0.1, 0.2, 0.3, 0.8, 0.9], errors) == 1.0
    assert U.auroc([0.9, 0.8, 0.7, 0.2, 0.1], errors) == 0.0
    assert U.auroc([0.5] * 5, errors) == 0.5
    assert U.average_precision([0.1, 0.2, 0.3, 0.8, 0.9], errors) == 1.0
    # Every voxel tied: one threshold, precision = error rate.
    assert U.average_precision([0.5] * 5, errors) == pytest.approx(2 / 5)


def test_auroc_and_ap_hand_worked_with_ties():
    # errors at 0.9 and 0.5, correct voxels at 0.5, 0.3, 0.1.
    scores = np.array([0.9, 0.5, 0.5, 0.3, 0.1])
    errors = np.array([1, 1, 0, 0, 0])
    # Pairs (error, correct): 0.9 beats all 3; 0.5 ties one (1/2) and beats two -> 5.5 / 6.
    assert U.auroc(scores, errors) == pytest.approx(5.5 / 6)
    # Thresholds 0.9: P = 1, R = 1/2; 0.5: P = 2/3, R = 1 -> AP = 1/2 + 1/2 * 2/3.
    assert U.average_precision(scores, errors) == pytest.approx(0.5 + 1 / 3)


def test_error_capture_hand_worked():
    scores = np.arange(20, dtype=np.float32)  # voxel i has score i
    errors = np.zeros(20, bool)
    errors[[19, 18, 5]] = True
    cap = U.error_capture(scores, errors, fractions=(0.05, 0.10, 0.5))
    # Top 5 % = 1 voxel (19): 1 of 3 errors; top 10 % = 2 voxels: 2 of 3; top half: 2 of 3.
    assert cap == {"top5": pytest.approx(1 / 3), "top10": pytest.approx(2 / 3),
                   "top50": pytest.approx(2 / 3)}
    # A tie group straddling the cut counts pro rata: 4 voxels tied, 2 of them errors, k = 2.
    tied = U.error_capture(np.ones(4), np.array([1, 1, 0, 0]), fractions=(0.5,))
    assert tied["top50"] == pytest.approx(0.5)
    assert U.error_capture(np.ones(3), np.zeros(3), fractions=(0.1,)) == {"top10": None}


def test_one_class_absent_gives_none():
    assert U.auroc([0.1, 0.2], [0, 0]) is None
    assert U.auroc([0.1, 0.2], [1, 1]) is None
    assert U.average_precision([0.1, 0.2], [0, 0]) is None


# ----------------------------------------------------------------------------------------------
# Against scikit-learn
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_exact_measures_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    errors = rng.random(n) < 0.15
    # Scores correlated with the errors, rounded so that many ties exist across both groups.
    scores = np.round(np.clip(rng.normal(0.3 + 0.25 * errors, 0.2), 0, 1), 2)
    assert U.auroc(scores, errors) == pytest.approx(
        sklearn_metrics.roc_auc_score(errors, scores), abs=1e-12)
    assert U.average_precision(scores, errors) == pytest.approx(
        sklearn_metrics.average_precision_score(errors, scores), abs=1e-12)


def test_histogram_equals_sklearn_on_the_quantised_scores():
    rng = np.random.default_rng(7)
    errors = rng.random(20000) < 0.1
    # Uncertainty-map-like scores: most near zero, spread over orders of magnitude.
    scores = (10 ** rng.uniform(-7, 0, errors.size) * (1 + errors)).clip(0, 1).astype(np.float32)
    hist = U.ScoreHistogram(precision_bits=8)
    for part in np.array_split(np.arange(errors.size), 5):  # accumulated over "volumes"
        hist.add(scores[part], errors[part])
    levels = U.quantise_scores(scores, 8)
    assert hist.auroc() == pytest.approx(sklearn_metrics.roc_auc_score(errors, levels), abs=1e-12)
    assert hist.average_precision() == pytest.approx(
        sklearn_metrics.average_precision_score(errors, levels), abs=1e-12)
    # Versus the exact scores the difference is bounded by half the tied-pair mass.
    exact = sklearn_metrics.roc_auc_score(errors, scores)
    assert abs(hist.auroc() - exact) <= 0.5 * hist.tie_mass() + 1e-12
    # With the default 11 bits the histogram is practically exact.
    fine = U.ScoreHistogram()
    fine.add(scores, errors)
    assert fine.auroc() == pytest.approx(exact, abs=1e-4)
    assert fine.capture(0.1) == pytest.approx(U.error_capture(scores, errors)["top10"], abs=1e-3)


def test_quantisation_is_monotone_and_masks_and_merges():
    values = np.sort(np.r_[0.0, 10 ** np.linspace(-30, 0, 500)]).astype(np.float32)
    levels = U.quantise_scores(values)
    assert np.all(np.diff(levels.astype(np.int64)) >= 0)
    assert U.dequantise_level(int(U.quantise_scores(np.float32(0.5)))) == 0.5
    with pytest.raises(ValueError):
        U.quantise_scores(np.array([-0.1]))
    a, b, both = U.ScoreHistogram(), U.ScoreHistogram(), U.ScoreHistogram()
    s = np.array([0.1, 0.9, 0.4, 0.7], np.float32)
    e = np.array([0, 1, 0, 1])
    a.add(s[:2], e[:2])
    b.add(s[2:], e[2:])
    a.merge(b)
    both.add(s, e)
    np.testing.assert_array_equal(a.pos, both.pos)
    masked = U.ScoreHistogram()
    masked.add(s, e, mask=np.array([1, 1, 0, 0], bool))
    assert masked.n_voxels == 2 and masked.n_errors == 1 and masked.auroc() == 1.0


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


def test_ece_hand_worked_two_bins():
    conf = np.array([0.2, 0.2, 0.9, 0.9, 0.9, 0.9])
    correct = np.array([0, 1, 1, 1, 1, 0])
    # Bin [0, .5): conf .2, acc .5, weight 2/6; bin [.5, 1]: conf .9, acc .75, weight 4/6.
    expected = 2 / 6 * 0.3 + 4 / 6 * 0.15
    assert U.expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(expected)
    bins = U.CalibrationBins(2)
    bins.add(conf, correct)
    assert bins.mce() == pytest.approx(0.3)
    assert U.bin_index(np.array([0.0, 0.5, 1.0]), 2).tolist() == [0, 1, 1]


def test_calibrated_toy_has_ece_near_zero_and_overconfident_does_not():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.25, 1.0, 400_000)
    correct = rng.random(conf.size) < conf  # correct with exactly the stated probability
    assert U.expected_calibration_error(conf, correct) < 0.005
    over = np.clip(conf + 0.1, 0, 1)
    assert U.expected_calibration_error(over, correct) > 0.07


def test_classwise_and_top_label_calibration_of_probability_maps():
    rng = np.random.default_rng(1)
    k, shape = 3, (60, 50, 40)
    logits = rng.normal(size=(k, *shape)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=0)
    # Labels drawn from the probabilities themselves: calibrated in every sense.
    u = rng.random(shape)
    labels = (u[None] > np.cumsum(probs, axis=0)).sum(axis=0)
    cal = U.Calibration(k)
    cal.add(probs, labels)
    s = cal.summary(["a", "b", "c"])
    assert s["ece"] < 0.01 and s["mean_classwise_ece"] < 0.01
    assert set(s["classwise_ece"]) == {"a", "b", "c"}
    assert sum(row["count"] for row in s["bins"]) == probs[0].size


def test_reliability_diagram_png(tmp_path):
    from PIL import Image

    bins = U.CalibrationBins(10)
    bins.add(np.array([0.15, 0.55, 0.95, 0.95]), np.array([0, 1, 1, 0]))
    path = U.reliability_diagram([("before", bins), ("after", bins)], tmp_path / "r.png")
    img = Image.open(path)
    img.load()
    assert img.mode == "RGB" and img.width > 2 * img.height * 0.9


# ----------------------------------------------------------------------------------------------
# Correlation
# ----------------------------------------------------------------------------------------------


def test_ranks_and_correlations_match_scipy():
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=50), 1)  # ties
    y = -0.7 * x + rng.normal(scale=0.5, size=50)
    np.testing.assert_allclose(U.rankdata(x), stats.rankdata(x))
    assert U.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert U.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert U.pearson([1, 2], [3, 4]) is None
    assert U.pearson([1, 1, 1], [1, 2, 3]) is None


def test_chunked_accumulation_equals_one_pass(monkeypatch):
    rng = np.random.default_rng(9)
    scores = rng.random(1000).astype(np.float32)
    errors = rng.random(1000) < scores * 0.5
    mask = rng.random(1000) < 0.7
    whole_h, whole_c = U.ScoreHistogram(), U.CalibrationBins()
    whole_h.add(scores, errors, mask)
    whole_c.add(scores, errors, mask)
    monkeypatch.setattr(U, "_CHUNK", 7)  # many chunks, the last one partial
    chunked_h, chunked_c = U.ScoreHistogram(), U.CalibrationBins()
    chunked_h.add(scores, errors, mask)
    chunked_c.add(scores, errors, mask)
    np.testing.assert_array_equal(chunked_h.pos, whole_h.pos)
    np.testing.assert_array_equal(chunked_h.neg, whole_h.neg)
    np.testing.assert_allclose(chunked_c.conf_sum, whole_c.conf_sum)
    np.testing.assert_array_equal(chunked_c.count, whole_c.count)
    assert whole_h.auroc() == pytest.approx(
        sklearn_metrics.roc_auc_score(errors[mask], scores[mask]), abs=1e-3)


# ----------------------------------------------------------------------------------------------
# Paired case bootstrap of an AUROC difference
# ----------------------------------------------------------------------------------------------


def _case_hist(scores: np.ndarray, errors: np.ndarray) -> U.ScoreHistogram:
    h = U.ScoreHistogram()
    h.add(scores, errors)
    return h


def _cases(rng: np.random.Generator, n: int, signal: float) -> list[tuple[np.ndarray, ...]]:
    """Cases of voxels whose error probability rises with the score (more with ``signal``)."""
    out = []
    for _ in range(n):
        s = rng.random(500)
        out.append((s, rng.random(500) < 0.05 + signal * s))
    return out


def test_paired_difference_is_the_pooled_auroc_difference() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    cases = _cases(rng, 6, 0.4)
    a = [_case_hist(s, e) for s, e in cases]
    noisy = [(np.clip(s + rng.normal(0, 0.3, s.size), 0, 1), e) for s, e in cases]
    b = [_case_hist(s, e) for s, e in noisy]
    d = U.paired_auroc_difference(a, b, n_boot=300)
    pooled = (roc_auc_score(np.concatenate([e for _, e in cases]),
                            np.concatenate([s for s, _ in cases]))
              - roc_auc_score(np.concatenate([e for _, e in noisy]),
                              np.concatenate([s for s, _ in noisy])))
    assert d["difference"] == pytest.approx(pooled, abs=2e-3)  # scores quantised to 11 bits
    assert d["ci"][0] <= d["difference"] <= d["ci"][1]
    assert d["difference"] > 0 and d["ci"][0] > 0  # the noisier scores rank errors worse
    assert d["share_a_ge_b"] == 1.0


def test_paired_difference_of_a_method_with_itself_is_zero() -> None:
    rng = np.random.default_rng(1)
    a = [_case_hist(s, e) for s, e in _cases(rng, 5, 0.3)]
    d = U.paired_auroc_difference(a, a, n_boot=200)
    assert d["difference"] == 0.0 and d["ci"] == [0.0, 0.0]


def test_perfect_against_inverted_ranking() -> None:
    errors = np.array([0, 0, 1, 1, 0, 1], bool)
    right = [_case_hist(np.where(errors, 0.9, 0.1), errors) for _ in range(3)]
    wrong = [_case_hist(np.where(errors, 0.1, 0.9), errors) for _ in range(3)]
    d = U.paired_auroc_difference(right, wrong, n_boot=100)
    assert d["auroc_a"] == 1.0 and d["auroc_b"] == 0.0
    assert d["difference"] == 1.0 and d["ci"] == [1.0, 1.0]


def test_cases_that_disagree_give_an_interval_across_zero() -> None:
    # a ranks case 0's errors perfectly and case 1's backwards; b the other way round: the
    # pooled difference is 0 and resampling the two cases swings it both ways
    e = np.array([0, 1, 0, 1, 0, 1], bool)
    good, bad = np.where(e, 0.8, 0.2), np.where(e, 0.2, 0.8)
    a = [_case_hist(good, e), _case_hist(bad, e)]
    b = [_case_hist(bad, e), _case_hist(good, e)]
    d = U.paired_auroc_difference(a, b, n_boot=400)
    assert d["difference"] == pytest.approx(0.0)
    assert d["ci"][0] < 0 < d["ci"][1]


def test_paired_difference_needs_matching_cases() -> None:
    h = _case_hist(np.array([0.1, 0.9]), np.array([0, 1], bool))
    with pytest.raises(ValueError, match="same"):
        U.paired_auroc_difference([h], [h, h])
