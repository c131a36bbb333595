"""The pure logic of benchmarks/uncertainty_shift.py against hand-worked numbers: which methods
an export can run, pooling cases, the flag's sensitivity / specificity, the cost ratio, the
scoring of one case's pass, and the tables."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.uncertainty_shift import (
    CANDIDATE_PREFIX,
    METHODS,
    Accumulator,
    Method,
    candidate_methods,
    cost,
    detection,
    flag_outcome,
    method_availability,
    pass_spec,
    summarise,
    summary_table,
)
from sfpc.training.uncertainty_metrics import ScoreHistogram

QUALITY = {"threshold": 0.08, "dice_target": 0.8, "map": "entropy"}


def hist(scores: list[float], errors: list[bool]) -> ScoreHistogram:
    h = ScoreHistogram()
    h.add(np.asarray(scores, np.float32), np.asarray(errors))
    return h


def test_availability_follows_the_engine_refusal_and_the_graph() -> None:
    refused = method_availability(METHODS, True, "trained without flips")
    assert [k for k, why in refused.items() if why is None] == [
        "softmax_entropy", "flpm_entropy", "flpm_mi"]
    assert "trained without flips" in str(refused["flip_tta"])
    assert "trained without flips" in str(refused["flpm_flip"])
    plain_only = method_availability(METHODS, False, None)
    assert [k for k, why in plain_only.items() if why is None] == [
        "softmax_entropy", "flip_tta"]
    both = method_availability(METHODS, False, "no")
    assert "uncertainty graph" in str(both["flpm_flip"]) and "flip" in str(both["flpm_flip"])


def test_pooled_detection_counts_every_case_voxel() -> None:
    # Case 1: error scored 0.9 above two correct (0.1, 0.5); case 2: error 0.3, correct 0.7.
    # Pooled: errors {0.9, 0.3}, correct {0.1, 0.5, 0.7}: 0.9 beats 3, 0.3 beats 1 -> 4/6.
    # AP: ranking 0.9(E) 0.7 0.5 0.3(E) 0.1 -> 1/2 * 1/1 + 1/2 * 2/4 = 0.75.
    a = [hist([0.9, 0.1, 0.5], [True, False, False]), hist([0.3, 0.7], [True, False])]
    out = detection(a, None)
    assert out["auroc"] == pytest.approx(4 / 6)
    assert out["ap"] == pytest.approx(0.75)
    assert (out["voxels"], out["errors"]) == (5, 2)
    assert out["case_auroc"] == [pytest.approx(1.0), pytest.approx(0.0)]
    assert "minus_reference" not in out


def test_detection_against_a_reference_is_paired_by_case() -> None:
    # Method b ranks case 2 right (error 0.8 over correct 0.2): pooled b: errors {0.9, 0.8},
    # correct {0.1, 0.5, 0.2} -> 1.0; a - b = 4/6 - 1 on all cases.
    a = [hist([0.9, 0.1, 0.5], [True, False, False]), hist([0.3, 0.7], [True, False])]
    b = [hist([0.9, 0.1, 0.5], [True, False, False]), hist([0.8, 0.2], [True, False])]
    d = detection(a, b, n_boot=200)["minus_reference"]
    assert d["difference"] == pytest.approx(4 / 6 - 1)
    assert d["cases"] == 2
    assert d["ci"][1] <= 0.0  # a never beats b on any resample of these two cases


def test_flag_outcome_by_hand() -> None:
    # Poor (Dice < 0.8): u 0.10 flagged, u 0.05 not -> sensitivity 1/2. Good: u None has no
    # boundary (left out), u 0.20 flagged, u 0.01 not -> specificity 1 - 1/2.
    out = flag_outcome([0.10, 0.05, None, 0.20, 0.01], [0.5, 0.6, 0.9, 0.95, 0.85], QUALITY)
    assert out["sensitivity"] == pytest.approx(0.5)
    assert out["specificity"] == pytest.approx(0.5)
    assert (out["cases"], out["flagged"], out["without_boundary"], out["poor"]) == (5, 2, 1, 2)
    # A threshold without a Dice target: the benchmark's 0.8.
    no_target = flag_outcome([0.10, 0.01], [0.5, 0.9], {"threshold": 0.08})
    assert (no_target["dice_target"], no_target["sensitivity"],
            no_target["specificity"]) == (0.8, 1.0, 1.0)
    with pytest.raises(ValueError):
        flag_outcome([0.1], [0.5, 0.6], QUALITY)


def test_cost_is_the_median_of_summed_passes_over_the_plain_median() -> None:
    seconds = {"plain": [1.0, 2.0, 3.0], "flpm": [1.2, 2.2, 3.6]}
    assert cost(seconds, ["plain"]) == {"seconds": 2.0, "relative": 1.0}
    assert cost(seconds, ["flpm"]) == pytest.approx({"seconds": 2.2, "relative": 1.1})
    # Two passes per case: sums 2.2, 4.2, 6.6 -> median 4.2, 2.1x.
    assert cost(seconds, ["plain", "flpm"]) == pytest.approx({"seconds": 4.2, "relative": 2.1})
    with pytest.raises(ValueError):
        cost({"plain": [1.0, 2.0], "flpm": [1.0]}, ["flpm"])


def test_accumulator_scores_a_case_by_hand() -> None:
    # 2 classes, 4 voxels in a row; label 0 0 1 1; predicted 0 1 1 0 -> errors at voxels 1, 3.
    probs = np.array([[0.9, 0.4, 0.2, 0.6], [0.1, 0.6, 0.8, 0.4]], np.float32)[..., None, None]
    label = np.array([0, 0, 1, 1])[..., None, None]
    scores = np.array([0.1, 0.7, 0.3, 0.2], np.float32)[..., None, None]
    m = Method("m", "m", "plain", "entropy", ("plain",))
    acc = Accumulator(["bg", "fg"], [m], band=1)
    row = acc.add("plain", probs, {"entropy": scores}, label)["m"]
    # Overall: errors {0.7, 0.2}, correct {0.1, 0.3}: 0.7 beats 2, 0.2 beats 1 -> 3/4.
    assert row["auroc"] == pytest.approx(0.75)
    # Organ region (predicted or labelled fg): voxels 1, 2, 3: errors {0.7, 0.2}, correct
    # {0.3} -> 1/2.
    assert row["organ_auroc"] == pytest.approx(0.5)
    # Boundary band (1 voxel, both sides) of the predicted fg {1, 2}: voxels 0..3, mean 0.325.
    assert row["boundary_uncertainty"] == pytest.approx(0.325)


def test_summary_table_marks_unavailable_methods_once_per_reason() -> None:
    summary = {"a": {"title": "flip TTA", "available": False, "reason": "no flips"},
               "b": {"title": "FLPM + flip", "available": False, "reason": "no flips"}}
    text = summary_table(summary)
    assert "| flip TTA | unavailable |" in text
    assert text.count("unavailable (no flips)") == 1
    assert "flip TTA, FLPM + flip: unavailable (no flips)" in text


def test_a_candidate_export_is_one_unflipped_uncertainty_pass_with_its_own_flag() -> None:
    ent, mi = candidate_methods("ens", "ensemble")
    assert ent.source == mi.source == CANDIDATE_PREFIX + "ens"
    assert (ent.key, mi.key) == ("ens", "ens_mi")
    assert (ent.map_name, mi.map_name) == ("entropy", "mutual_information")
    assert pass_spec(ent.source) == (True, False)
    # Available even when the main export has no uncertainty graph: the candidate has its own.
    assert method_availability([ent], False, "no flips") == {"ens": None}

    # Two cases, one voxel row each; the served (plain) and the candidate pass score the same
    # errors. The candidate's flag uses its own threshold 0.5, the main export's is 0.08.
    label = np.array([0, 0, 1, 1])[..., None, None]
    probs = np.array([[0.9, 0.4, 0.2, 0.6], [0.1, 0.6, 0.8, 0.4]], np.float32)[..., None, None]
    soft = Method("softmax_entropy", "softmax entropy", "plain", "entropy", ("plain",))
    acc = Accumulator(["bg", "fg"], [soft, ent, mi], band=1)
    cases = []
    for u in (0.3, 0.7):
        maps = {"entropy": np.full((4, 1, 1), u, np.float32),
                "mutual_information": np.full((4, 1, 1), u / 10, np.float32)}
        acc.add("plain", probs, {"entropy": maps["entropy"]}, label)
        acc.add(ent.source, probs, maps, label)
        cases.append({"dice": {"served": {"mean": 0.9}, ent.source: {"mean": 0.6 if u > 0.5
                                                                      else 0.9}},
                      "seconds": {"plain": 1.0, ent.source: 1.5}})
    availability = {"softmax_entropy": None, "ens": None, "ens_mi": None}
    out = summarise([soft, ent, mi], availability, acc, cases, QUALITY, n_boot=20, seed=0,
                    candidate_quality={ent.source: {**QUALITY, "threshold": 0.5}})
    # Boundary uncertainty is the map's value (constant): 0.3 and 0.7 -> fires on case 2 only,
    # the one below the Dice target: sensitivity 1, specificity 1.
    assert out["ens"]["flag"]["sensitivity"] == 1.0 and out["ens"]["flag"]["specificity"] == 1.0
    assert out["ens"]["flag"]["threshold_chosen_on_this_map"] is True
    assert out["ens_mi"]["flag"]["threshold_chosen_on_this_map"] is False
    assert out["ens"]["mean_dice"] == pytest.approx(0.75)
    assert out["ens"]["cost"]["relative"] == pytest.approx(1.5)
    # Under the main export's 0.08 both softmax cases fire: specificity 0 on the Dice-0.9 case.
    assert out["softmax_entropy"]["flag"]["specificity"] == 0.0
    # Uncalibrated, the candidate borrows 0.08: both fire, and the table says it was not
    # chosen on this map.
    borrowed = summarise([soft, ent], availability, acc, cases, QUALITY, n_boot=20, seed=0)
    assert borrowed["ens"]["flag"]["specificity"] == 0.0
    assert borrowed["ens"]["flag"]["threshold_chosen_on_this_map"] is False
