"""Uncertainty under shift (issue 18): does each uncertainty method find the model's errors on
data that differs the way another scanner or patient does?

Every registered shift of ct_a (``training/shifts.py``) is one case, scored on the held-out
block [96, 106) mapped into the shifted grid (``map_slab``). Per case the export runs through
the serving :class:`~sfpc.inference.engine.Engine` (ONNX Runtime) on the model grid, once per
pass the methods need, each pass timed:

- ``plain``: softmax(logits / T) -> **softmax entropy** (normalised H of the probabilities);
- ``flpm``: the uncertainty graph -> **FLPM entropy** (H(p_bar) / ln K, the served map) and
  **FLPM mutual information**;
- ``plain_flip``: the engine's ``flip=True`` plain mode, the mean of the pass and its mirrored
  pass -> **flip TTA** (entropy of that mean);
- ``flpm_flip``: ``flip=True`` in uncertainty mode -> **FLPM + flip** (entropy of the 2M-sample
  mean).

- ``--candidate KEY=EXPORT``: another export of the same contract whose uncertainty graph is a
  different method (``sfpc export --uncertainty-method mc_dropout|flpm_stages``, ``--ensemble``)
  -> its entropy (``KEY``) and mutual information (``KEY_mi``), one pass of that export, its
  Dice from its own served mask, its flag from its own calibrated threshold.

Flip passes are asked of the engine once before the run; when it refuses (a model trained
without flips) both flip methods are reported unavailable with the engine's reason.

Per method, over all cases pooled: error-detection AUROC and AP (a voxel is positive when the
method's own argmax is wrong there) over every voxel of the block and over the organ region
(voxels predicted or labelled as an organ, as ``training/uncertainty_eval.py`` defines its
foreground region); ECE of the probabilities the method comes with (top label, all voxels and
organ region); the case-level review flag (the map's boundary uncertainty on the block against
the export's threshold) with its sensitivity and specificity for cases whose served mean
foreground Dice is below the export's Dice target (0.8); the paired case-bootstrap 95 %
interval of the method's AUROC minus softmax entropy's; and its cost, the median over cases of
the seconds of the passes it needs relative to the plain pass, measured in the same run (pass
order rotated from case to case, after an untimed warm-up of every pass).

The served Dice of a case is that of ``Engine.segment`` in uncertainty mode (the request that
carries the review flag; with ``flip`` for the flip methods), on the input grid's RAS block, as
``evaluate_export`` computes it. Voxel measures, as there, live on the model grid.

The cases are synthetic shifts of one patient scored against silver-standard labels; no second
labelled patient exists. Usage::

    OMP_NUM_THREADS=1 python benchmarks/uncertainty_shift.py \\
        --json benchmarks/uncertainty_shift_default_model.json
    python benchmarks/uncertainty_shift.py --shifts "none,noise 30HU" --export path/to/export
    python benchmarks/uncertainty_shift.py --candidate mc_dropout=runs/mc --candidate \
        ensemble=runs/ens/export --json benchmarks/uncertainty_shift_candidates.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sfpc.errors import InputError
from sfpc.inference.preprocess import prepare_label, to_orientation
from sfpc.inference.uncertainty import map_statistics, predictive_entropy, uncertainty_maps
from sfpc.training.data import apply_label_map
from sfpc.training.organ_task import LABEL_MAP, VAL_BLOCK
from sfpc.training.shift_cli import (
    add_common_arguments,
    chosen_shifts,
    command_line,
    log,
    read_ct_a,
    write_results,
)
from sfpc.training.shifts import apply_shift, map_slab, shift_named
from sfpc.training.uncertainty_eval import (
    UncertaintyScorer,
    crop_last,
    foreground_dice,
    load_engine,
    model_slab,
    quality_outcome,
)
from sfpc.training.uncertainty_metrics import ScoreHistogram, paired_auroc_difference

DEFAULT_DICE_TARGET = 0.8

PASSES: dict[str, tuple[bool, bool]] = {
    "plain": (False, False), "flpm": (True, False),
    "plain_flip": (False, True), "flpm_flip": (True, True),
}
"""Engine pass -> (uncertainty, flip) arguments of ``infer_model_grid``."""
REFERENCE_PASS = "plain"


CANDIDATE_PREFIX = "candidate:"


def is_candidate(pass_name: str) -> bool:
    """Whether an engine pass runs a ``--candidate`` export (its own engine)."""
    return pass_name.startswith(CANDIDATE_PREFIX)


def pass_spec(name: str) -> tuple[bool, bool]:
    """(uncertainty, flip) of an engine pass; a candidate export's pass is its uncertainty
    graph, unflipped."""
    return (True, False) if is_candidate(name) else PASSES[name]


def candidate_methods(key: str, title: str) -> tuple[Method, Method]:
    """The entropy and the mutual information of candidate export ``key``'s pass."""
    source = CANDIDATE_PREFIX + key
    return (Method(key, f"{title} entropy", source, "entropy", (source,)),
            Method(f"{key}_mi", f"{title} mutual information", source, "mutual_information",
                   (source,)))


@dataclass(frozen=True)
class Method:
    """An uncertainty method: the map ``map_name`` of engine pass ``source`` (its argmax gives
    the errors, its probabilities the ECE); ``passes`` are what it costs."""

    key: str
    title: str
    source: str
    map_name: str
    passes: tuple[str, ...]


METHODS: tuple[Method, ...] = (
    Method("softmax_entropy", "softmax entropy", "plain", "entropy", ("plain",)),
    Method("flpm_entropy", "FLPM entropy (served)", "flpm", "entropy", ("flpm",)),
    Method("flpm_mi", "FLPM mutual information", "flpm", "mutual_information", ("flpm",)),
    # The engine's flip pass runs the plain and the mirrored window in one call.
    Method("flip_tta", "flip TTA (plain + mirrored)", "plain_flip", "entropy", ("plain_flip",)),
    Method("flpm_flip", "FLPM + flip", "flpm_flip", "entropy", ("flpm_flip",)),
)
REFERENCE = "softmax_entropy"


# ----------------------------------------------------------------------------------------------
# Pure logic: availability, pooling, flag outcome, cost
# ----------------------------------------------------------------------------------------------


def method_availability(methods: Sequence[Method], has_uncertainty: bool,
                        flip_refusal: str | None) -> dict[str, str | None]:
    """Per method, why it cannot run on this export (None when it can): FLPM passes need the
    uncertainty graph, flip passes an engine that accepts ``flip`` (``flip_refusal`` is the
    engine's reason when it refused)."""
    out: dict[str, str | None] = {}
    for m in methods:
        uncertainty, flip = pass_spec(m.source)
        reasons = []
        # A candidate's pass runs its own export's uncertainty graph (checked when loaded).
        if uncertainty and not has_uncertainty and not is_candidate(m.source):
            reasons.append("the export has no uncertainty graph (no FLPM)")
        if flip and flip_refusal:
            reasons.append(f"the engine refuses flip: {flip_refusal}")
        out[m.key] = "; ".join(reasons) or None
    return out


def pooled(hists: Sequence[ScoreHistogram]) -> ScoreHistogram:
    """One histogram holding every case's counts (the measures over all cases' voxels)."""
    if not hists:
        raise ValueError("no histograms to pool")
    total = ScoreHistogram(hists[0].precision_bits)
    for h in hists:
        total.merge(h)
    return total


def detection(hists: Sequence[ScoreHistogram], reference: Sequence[ScoreHistogram] | None,
              *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """AUROC, AP and error rate over the pooled cases, and (with ``reference``, the same cases'
    histograms of the reference method) the paired case-bootstrap AUROC difference."""
    s = pooled(hists).summary(())
    out = {k: s[k] for k in ("auroc", "ap", "voxels", "errors", "error_rate")}
    out["case_auroc"] = [h.auroc() for h in hists]
    if reference is not None:
        out["minus_reference"] = paired_auroc_difference(hists, reference, n_boot=n_boot,
                                                         seed=seed)
    return out


def flag_outcome(boundary: Sequence[float | None], dice: Sequence[float],
                 quality: Mapping[str, Any],
                 dice_target: float = DEFAULT_DICE_TARGET) -> dict[str, Any]:
    """The review flag of one map on these cases: ``boundary[i]`` is case i's boundary
    uncertainty under the map, ``dice[i]`` its served mean foreground Dice. Sensitivity and
    specificity for cases below the export's Dice target (``dice_target`` when it has none),
    by the evaluator's own rule (``quality_outcome``, which reads the "entropy" entry: each
    map's value is passed under that key)."""
    if len(boundary) != len(dice):
        raise ValueError("one boundary uncertainty per Dice")
    q = {**quality, "dice_target": quality.get("dice_target", dice_target)}
    cases = [{"boundary_uncertainty": {"entropy": u}, "dice": {"mean": float(d)}}
             for u, d in zip(boundary, dice, strict=True)]
    return quality_outcome(cases, q)


def cost(seconds: Mapping[str, Sequence[float]], passes: Sequence[str],
         reference: str = REFERENCE_PASS) -> dict[str, float]:
    """A method's median seconds per case (the sum of its passes' seconds in each case) and
    that median over the reference pass's median seconds per case."""
    n = len(seconds[reference])
    if n == 0 or any(len(seconds[p]) != n for p in passes):
        raise ValueError("every pass needs one time per case")
    per_case = np.sum([np.asarray(seconds[p], dtype=np.float64) for p in passes], axis=0)
    median = float(np.median(per_case))
    return {"seconds": median, "relative": median / float(np.median(seconds[reference]))}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def pass_outputs(out: Mapping[str, np.ndarray], slab: tuple[int, int]
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Probabilities and maps of one engine pass, cropped to the model-grid slab."""
    if "probs" in out:
        probs = crop_last(out["probs"], slab)
        return probs, {"entropy": predictive_entropy(probs)}
    probs = crop_last(out["mean_probs"], slab)
    return probs, uncertainty_maps(probs, crop_last(out["mean_entropy"], slab))


@dataclass
class Accumulator:
    """Per-pass scorers (calibration and per-case overall histograms) and per-method organ
    region histograms and boundary uncertainties, case after case."""

    class_names: Sequence[str]
    methods: Sequence[Method]
    band: int
    scorers: dict[str, UncertaintyScorer] = field(init=False)
    organ: dict[str, list[ScoreHistogram]] = field(init=False)
    boundary: dict[str, list[float | None]] = field(init=False)

    def __post_init__(self) -> None:
        maps: dict[str, list[str]] = {}
        for m in self.methods:
            maps.setdefault(m.source, []).append(m.map_name)
        self.scorers = {p: UncertaintyScorer(self.class_names, names,
                                             keep_volume_histograms=True)
                        for p, names in maps.items()}
        self.organ = {m.key: [] for m in self.methods}
        self.boundary = {m.key: [] for m in self.methods}

    def add(self, pass_name: str, probs: np.ndarray, maps: Mapping[str, np.ndarray],
            label: np.ndarray) -> dict[str, Any]:
        """Count one case's pass; returns its per-method organ AUROC and boundary uncertainty."""
        scorer = self.scorers[pass_name]
        used = {name: maps[name] for name in scorer.map_names}
        pred = scorer.add_volume(probs, used, label)
        errors = pred != label
        region = (pred > 0) | (label > 0)
        stats = map_statistics(pred, used, self.class_names, self.band)["case"]
        out = {}
        for m in self.methods:
            if m.source != pass_name:
                continue
            h = ScoreHistogram(scorer.precision_bits)
            h.add(used[m.map_name], errors, region)
            self.organ[m.key].append(h)
            u = stats[f"boundary_mean_{m.map_name}"]
            self.boundary[m.key].append(u)
            out[m.key] = {"auroc": scorer.volume_histograms[m.map_name][-1].auroc(),
                          "organ_auroc": h.auroc(), "boundary_uncertainty": u}
        return out


def probe_flip(engine: Any, model_image: np.ndarray) -> str | None:
    """Ask the engine for a flip pass (untimed warm-up too); its refusal's reason, or None."""
    try:
        engine.infer_model_grid(model_image, flip=True)
    except InputError as exc:
        return str(exc)
    return None


def run_case(index: int, name: str, engine: Any, image: np.ndarray, label: np.ndarray,
             affine: np.ndarray, passes: Sequence[str], acc: Accumulator,
             seed: int, candidates: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Shift ct_a, run the passes (timed, order rotated by ``index``) and the served segment
    call(s), and feed the accumulator. ``candidates`` maps a candidate pass's name to its
    engine (same contract as ``engine``, so the same model-grid image feeds it)."""
    candidates = candidates or {}
    t0 = time.perf_counter()
    img, lab, aff = apply_shift(name, image, label, affine, seed=seed)
    block = map_slab(VAL_BLOCK, affine, image.shape, aff, img.shape)
    mapped = apply_label_map(lab, LABEL_MAP)
    model_image, geometry = engine.preprocess(img, aff)
    mslab = model_slab(block, geometry)
    label_model = crop_last(prepare_label(mapped, geometry), mslab)
    k = index % len(passes)
    seconds: dict[str, float] = {}
    methods: dict[str, Any] = {}
    for p in [*passes[k:], *passes[:k]]:  # rotated: no pass always runs first or last
        uncertainty, flip = pass_spec(p)
        t = time.perf_counter()
        out = candidates.get(p, engine).infer_model_grid(model_image, uncertainty=uncertainty,
                                                         flip=flip)
        seconds[p] = time.perf_counter() - t
        methods.update(acc.add(p, *pass_outputs(out, mslab), label_model))
        del out
    del model_image
    ras_label = crop_last(to_orientation(mapped, aff, "RAS")[0], block)
    dice: dict[str, dict[str, float]] = {}
    has_unc = bool(engine.metadata.has_uncertainty)
    for flip in sorted({pass_spec(p)[1] for p in passes if p not in candidates}):
        # The served mask of the request that carries the flag; no maps restored (unused).
        seg = engine.segment(img, aff, uncertainty=has_unc, flip=flip, maps=())
        mask = crop_last(to_orientation(seg.mask, aff, "RAS")[0], block)
        dice["flip" if flip else "served"] = foreground_dice(mask, ras_label, acc.class_names)
    for p, other in candidates.items():
        seg = other.segment(img, aff, uncertainty=True, maps=())
        mask = crop_last(to_orientation(seg.mask, aff, "RAS")[0], block)
        dice[p] = foreground_dice(mask, ras_label, acc.class_names)
    return {"shift": name, "description": shift_named(name).description,
            "shape": [int(n) for n in img.shape], "block": list(block),
            "model_slab": list(mslab), "dice": dice, "methods": methods,
            "seconds": {**{p: round(s, 4) for p, s in seconds.items()},
                        "total": round(time.perf_counter() - t0, 2)}}


def summarise(methods: Sequence[Method], availability: Mapping[str, str | None],
              acc: Accumulator, cases: Sequence[Mapping[str, Any]],
              quality: Mapping[str, Any] | None, *, n_boot: int, seed: int,
              candidate_quality: Mapping[str, Mapping[str, Any] | None] | None = None
              ) -> dict[str, Any]:
    """Per method: detection (overall and organ region, with the bootstrap against softmax
    entropy), ECE, flag outcome, cost; unavailable methods carry their reason only. A
    candidate's flag uses its own export's threshold (``candidate_quality``, by pass name),
    or the main export's when it has none."""
    candidate_quality = candidate_quality or {}
    ref = next(m for m in methods if m.key == REFERENCE)
    ref_overall = acc.scorers[ref.source].volume_histograms[ref.map_name]
    seconds = {p: [c["seconds"][p] for c in cases] for p in acc.scorers}
    out: dict[str, Any] = {}
    for m in methods:
        if availability[m.key]:
            out[m.key] = {"title": m.title, "available": False, "reason": availability[m.key]}
            continue
        scorer = acc.scorers[m.source]
        is_ref = m.key == REFERENCE
        candidate = is_candidate(m.source)
        family = m.source if candidate else ("flip" if PASSES[m.source][1] else "served")
        dice = [c["dice"][family]["mean"] for c in cases]
        calib = scorer.summary()["calibration"]
        entry: dict[str, Any] = {
            "title": m.title, "available": True, "passes": list(m.passes),
            "overall": detection(scorer.volume_histograms[m.map_name],
                                 None if is_ref else ref_overall, n_boot=n_boot, seed=seed),
            "organ_region": detection(acc.organ[m.key], None if is_ref else acc.organ[REFERENCE],
                                      n_boot=n_boot, seed=seed),
            "ece": calib["ece"], "ece_organ_region": calib["foreground_region"]["ece"],
            "mean_dice": float(np.mean(dice)),
            "cost": cost(seconds, m.passes),
        }
        # An uncalibrated candidate borrows the main export's threshold (marked as such).
        own = candidate_quality.get(m.source) if candidate else None
        q = own or quality
        if q:
            entry["flag"] = flag_outcome(acc.boundary[m.key], dice, q)
            # The export's threshold was chosen on the single-pass entropy map: on another
            # map's scale it is applied as the brief asks, but it is not calibrated there.
            entry["flag"]["threshold_chosen_on_this_map"] = (
                (bool(own) if candidate else m.source == "flpm")
                and m.map_name == q.get("map", "entropy"))
        out[m.key] = entry
    return out


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _diff(d: Mapping[str, Any] | None) -> str:
    if not d or d.get("difference") is None:
        return "(reference)" if d is None else "-"
    lo, hi = d["ci"]
    return f"{d['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def summary_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown table of every method (unavailable ones with a dash and a footnote)."""
    head = ("| method | AUROC | minus softmax [95 % CI] | AP | organ AUROC | "
            "minus softmax [95 % CI] | organ AP | ECE | organ ECE | mean Dice | "
            "flag sens. | flag spec. | s/case | cost |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    unavailable: dict[str, list[str]] = {}  # reason -> methods: one note per reason
    for s in summary.values():
        if not s["available"]:
            unavailable.setdefault(s["reason"], []).append(s["title"])
            lines.append(f"| {s['title']} | unavailable |" + " - |" * 12)
            continue
        o, r = s["overall"], s["organ_region"]
        flag = s.get("flag") or {}
        mark = "" if flag.get("threshold_chosen_on_this_map", True) else " †"
        lines.append(
            f"| {s['title']} | {_f(o['auroc'])} | {_diff(o.get('minus_reference'))} | "
            f"{_f(o['ap'])} | {_f(r['auroc'])} | {_diff(r.get('minus_reference'))} | "
            f"{_f(r['ap'])} | {_f(s['ece'], 4)} | {_f(s['ece_organ_region'], 4)} | "
            f"{_f(s['mean_dice'])} | {_f(flag.get('sensitivity'), 2)}{mark} | "
            f"{_f(flag.get('specificity'), 2)}{mark} | {s['cost']['seconds']:.2f} | "
            f"{s['cost']['relative']:.2f}x |")
    notes = [f"{', '.join(titles)}: unavailable ({reason})"
             for reason, titles in unavailable.items()]
    if any("†" in line for line in lines):
        notes.append("†: the export's threshold was chosen on the served FLPM entropy (one "
                     "pass); applied to this map as is, not calibrated for it")
    return "\n".join(lines + ([""] + notes if notes else []))


def case_table(cases: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
               threshold: float | None) -> str:
    """Per shift: served mean Dice, then per available method the organ-region AUROC and the
    block's boundary uncertainty (with the flag when a threshold exists)."""
    keys = [k for k, s in summary.items() if s["available"]]
    head = "| shift | mean Dice | " + " | ".join(
        f"{summary[k]['title']} organ AUROC / boundary u" for k in keys) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cases:
        cells = []
        for k in keys:
            r = c["methods"][k]
            u = r["boundary_uncertainty"]
            fired = "" if threshold is None or u is None else (" *" if u > threshold else "")
            # 4 significant digits: mutual information lives around 1e-5 here.
            shown = "-" if u is None else f"{u:.4g}"
            cells.append(f"{_f(r['organ_auroc'])} / {shown}{fired}")
        lines.append(f"| {c['shift']} | {_f(c['dice']['served']['mean'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------



def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "ct_a_image/ct_a_label")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--candidate", action="append", default=[], metavar="KEY=EXPORT",
                        help="another export of the same contract whose uncertainty graph is "
                             "a different method (repeatable)")
    args = parser.parse_args(argv)
    wanted = {}
    for spec in args.candidate:
        key, sep, path = spec.partition("=")
        if not sep or not key or not path:
            parser.error(f"--candidate {spec!r}: expected KEY=EXPORT_DIR")
        wanted[key] = path
    names = chosen_shifts(parser, args.shifts)
    image, label, affine = read_ct_a(parser, args.data)

    t0 = time.perf_counter()
    engine = load_engine(args.export, threads=args.threads)
    meta = engine.metadata
    # Warm-up of every pass (untimed), which also asks the engine whether it allows flip.
    warm, _ = engine.preprocess(image, affine)
    engine.infer_model_grid(warm)
    if meta.has_uncertainty:
        engine.infer_model_grid(warm, uncertainty=True)
    flip_refusal = probe_flip(engine, warm)
    if flip_refusal is None and meta.has_uncertainty:
        engine.infer_model_grid(warm, uncertainty=True, flip=True)
    candidates: dict[str, Any] = {}
    all_methods = list(METHODS)
    for key, path in wanted.items():
        other = load_engine(path, threads=args.threads)
        if not other.metadata.has_uncertainty:
            parser.error(f"--candidate {key}: {path} has no uncertainty graph")
        other.infer_model_grid(warm, uncertainty=True)  # warm-up, untimed
        candidates[CANDIDATE_PREFIX + key] = other
        method = other.metadata.uncertainty_method or "flpm"
        samples = other.metadata.perturbation["M"]
        all_methods += candidate_methods(key, f"{key} ({method}, M={samples})")
    del warm
    availability = method_availability(all_methods, bool(meta.has_uncertainty), flip_refusal)
    methods = [m for m in all_methods if not availability[m.key]]
    passes = list(dict.fromkeys(p for m in methods for p in m.passes))
    log(f"model {meta.name} {meta.version}; {len(names)} shifts; passes {passes}; "
        f"{args.threads} thread(s)" + (f"; flip refused: {flip_refusal}" if flip_refusal else ""))

    acc = Accumulator([str(c) for c in meta.class_names], methods, engine.band)
    cases = []
    for i, name in enumerate(names):
        c = run_case(i, name, engine, image, label, affine, passes, acc, args.seed, candidates)
        cases.append(c)
        log(f"[{i + 1}/{len(names)}] {name}: Dice {c['dice']['served']['mean']:.3f}, organ "
            "AUROC " + ", ".join(f"{k} {_f(v['organ_auroc'])}" for k, v in c["methods"].items())
            + f" ({c['seconds']['total']:.1f} s)")
    quality = meta.quality or None
    summary = summarise(all_methods, availability, acc, cases, quality, n_boot=args.bootstrap,
                        seed=args.seed, candidate_quality={
                            p: e.metadata.quality or None for p, e in candidates.items()})
    threshold = None if quality is None else float(quality["threshold"])
    print(f"\nUncertainty under shift: {len(cases)} shifted copies of ct_a, held-out block "
          f"{list(VAL_BLOCK)}, model {meta.name} {meta.version}\n")
    print(summary_table(summary))
    print("\nPer shift (organ-region AUROC / block boundary uncertainty; * = flag fires)\n")
    print(case_table(cases, summary, threshold))
    write_results(args.json, {
        "model": {"name": meta.name, "version": meta.version, "export": str(args.export),
                  "temperature": float(meta.temperature or 1.0), "quality": quality},
        "settings": {"command": command_line(), "val_block": list(VAL_BLOCK), "seed": args.seed,
                     "threads": args.threads, "bootstrap": args.bootstrap,
                     "data": str(args.data), "shifts": names, "band": engine.band},
        "candidates": {p[len(CANDIDATE_PREFIX):]: {
            "export": wanted[p[len(CANDIDATE_PREFIX):]],
            "method": e.metadata.maps_method(), "temperature": float(e.metadata.temperature or 1),
            "quality": e.metadata.quality or None} for p, e in candidates.items()},
        "availability": availability,
        "summary": summary,
        "cases": cases,
    }, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
