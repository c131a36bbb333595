"""Uncertainty evaluation of a model on labelled cases: does each uncertainty map find the
model's errors, are the probabilities calibrated, and does a case's boundary uncertainty track
its Dice? Torch-free: an export runs through the serving :class:`~sfpc.inference.engine.Engine`
with ONNX Runtime, so the maps scored are the maps the server computes.

Per case, three engine passes on the case's image:

1. plain mode on the model grid: softmax(logits / T), its argmax and its normalised entropy
   (the "softmax_entropy" map: one pass, no perturbation);
2. uncertainty mode on the model grid: the FLPM mean probabilities p_bar, argmax and the
   "entropy" (H(p_bar) / ln K) and "mutual_information" maps;
3. ``Engine.segment`` in uncertainty mode on the input grid: mask, maps and the band
   statistics exactly as the server reports them; the case's boundary uncertainty (the quality
   flag's measure) and its Dice come from here.

Voxel-level measures (1, 2) use the model grid, where the probabilities live (as ``sfpc
evaluate`` does); each map is scored against the errors of its own pass's argmax. Per class c,
the voxels scored are those predicted or labelled c (the region where class c can be wrong);
"overall" is every voxel. Calibration is reported over all voxels and over the foreground region
(predicted or labelled foreground), where the easy background does not dilute it, plus
class-wise. Cases restricted to a slab of slices (``slices`` in a dataset JSON) are predicted on
the whole volume and scored on the slab, which for a 2D model equals an upload of the slab
whenever the normalisation does not depend on the volume (a CT window; a z-score takes the
whole volume's statistics, as training's evaluation does).

:class:`UncertaintyScorer` holds the accumulators and is shared with the torch method
comparison (training/uncertainty_compare.py).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfpc.inference.contract import ModelMetadata
from sfpc.inference.preprocess import Geometry, prepare_label, to_orientation
from sfpc.inference.review import quality_flag
from sfpc.inference.uncertainty import (
    DEFAULT_BAND,
    predictive_entropy,
    region_statistics,
    uncertainty_maps,
)
from sfpc.training.layouts import Case
from sfpc.training.metrics import dice
from sfpc.training.uncertainty_metrics import (
    DEFAULT_BINS,
    DEFAULT_FRACTIONS,
    DEFAULT_PRECISION_BITS,
    Calibration,
    CalibrationBins,
    ScoreHistogram,
    pearson,
    reliability_diagram,
    spearman,
)

OVERALL = "overall"
VoxelSink = Callable[[np.ndarray, np.ndarray], None]


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------


def foreground_dice(mask: np.ndarray, label: np.ndarray,
                    class_names: Sequence[str]) -> dict[str, float]:
    """Dice per foreground class (both empty -> 1, METHOD.md) and their mean under "mean"."""
    out = {str(name): dice(mask == c, label == c)
           for c, name in enumerate(class_names) if c > 0}
    out["mean"] = float(np.mean(list(out.values())))
    return out


@dataclass
class UncertaintyScorer:
    """Accumulators of one prediction source (a model and an uncertainty method).

    :meth:`add_volume` counts voxels (error detection per map, overall and per class; top-label
    and class-wise calibration of the probabilities, over all voxels and over the foreground
    region); :meth:`add_case` records a case's Dice and boundary uncertainties for the
    case-level correlation. Memory does not grow with the number of volumes, unless
    ``keep_volume_histograms``: then ``volume_histograms[map]`` also holds each volume's own
    overall histogram (for case-resampling statistics), which the overall one is merged from.
    """

    class_names: Sequence[str]
    map_names: Sequence[str]
    n_bins: int = DEFAULT_BINS
    precision_bits: int = DEFAULT_PRECISION_BITS
    fractions: Sequence[float] = DEFAULT_FRACTIONS
    keep_volume_histograms: bool = False
    detection: dict[str, dict[str, ScoreHistogram]] = field(init=False)
    volume_histograms: dict[str, list[ScoreHistogram]] = field(init=False)
    calibration: Calibration = field(init=False)
    region_calibration: CalibrationBins = field(init=False)
    cases: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        groups = [OVERALL, *map(str, self.class_names)]
        self.detection = {m: {g: ScoreHistogram(self.precision_bits) for g in groups}
                          for m in self.map_names}
        self.volume_histograms = {m: [] for m in self.map_names}
        self.calibration = Calibration(len(self.class_names), self.n_bins)
        self.region_calibration = CalibrationBins(self.n_bins)

    def add_volume(self, probs: np.ndarray, maps: Mapping[str, np.ndarray],
                   label: np.ndarray) -> np.ndarray:
        """Count one volume: ``probs`` (K, *sp), ``maps`` {name: (*sp)}, ``label`` (*sp) ints.
        Returns the predicted label map (argmax of ``probs``)."""
        p = np.asarray(probs)
        lab = np.asarray(label)
        if p.shape[1:] != lab.shape:
            raise ValueError(f"probs {p.shape} and label {lab.shape} differ spatially")
        pred = np.argmax(p, axis=0)
        errors = pred != lab
        for name in self.map_names:
            values = np.asarray(maps[name])
            if values.shape != lab.shape:
                raise ValueError(f"map {name!r} has shape {values.shape}, label {lab.shape}")
            hists = self.detection[name]
            if self.keep_volume_histograms:
                own = ScoreHistogram(self.precision_bits)
                own.add(values, errors)
                hists[OVERALL].merge(own)
                self.volume_histograms[name].append(own)
            else:
                hists[OVERALL].add(values, errors)
            for c, cname in enumerate(self.class_names):
                hists[str(cname)].add(values, errors, (pred == c) | (lab == c))
        self.calibration.add(p, lab)
        self.region_calibration.add(np.max(p, axis=0), ~errors, (pred > 0) | (lab > 0))
        return pred

    def add_case(self, case_id: str, dice_scores: Mapping[str, float],
                 boundary: Mapping[str, float | None], **extra: Any) -> None:
        """Record a case: its Dice (per class and "mean") and boundary uncertainty per map."""
        self.cases.append({"case": str(case_id), "dice": dict(dice_scores),
                           "boundary_uncertainty": dict(boundary), **extra})

    def correlation(self) -> dict[str, dict[str, Any]]:
        """Per map: Pearson and Spearman between boundary uncertainty and mean Dice over cases
        with a boundary (negative = more uncertain cases are worse)."""
        out = {}
        for name in self.map_names:
            pairs = [(c["boundary_uncertainty"].get(name), c["dice"]["mean"]) for c in self.cases]
            pairs = [(u, d) for u, d in pairs if u is not None]
            u = [p[0] for p in pairs]
            d = [p[1] for p in pairs]
            out[name] = {"pearson": pearson(u, d), "spearman": spearman(u, d),
                         "cases": len(pairs),
                         "cases_without_boundary": len(self.cases) - len(pairs)}
        return out

    def summary(self) -> dict[str, Any]:
        names = [str(c) for c in self.class_names]
        detection = {m: {g: h.summary(self.fractions) for g, h in groups.items()}
                     for m, groups in self.detection.items()}
        dices = [c["dice"]["mean"] for c in self.cases]
        return {
            "error_detection": detection,
            "calibration": {**self.calibration.summary(names),
                            "foreground_region": self.region_calibration.summary()},
            "case_correlation": self.correlation() if self.cases else {},
            "mean_dice": float(np.mean(dices)) if dices else None,
            "cases": self.cases,
        }


# ----------------------------------------------------------------------------------------------
# Slabs and grids
# ----------------------------------------------------------------------------------------------


def model_slab(slices: tuple[int, int], geometry: Geometry) -> tuple[int, int]:
    """A RAS slab [start, stop) of the input mapped to the model grid, as ``load_volume`` does."""
    scale = geometry.model_shape[2] / geometry.oriented_shape[2]
    start = min(int(round(slices[0] * scale)), geometry.model_shape[2] - 1)
    stop = min(max(int(round(slices[1] * scale)), start + 1), geometry.model_shape[2])
    return start, stop


def crop_last(array: np.ndarray, slab: tuple[int, int] | None) -> np.ndarray:
    """``array[..., start:stop]`` (the axial slab of a RAS array), or the array itself."""
    return array if slab is None else array[..., slab[0]:slab[1]]


def _check_slab_orientation(meta: ModelMetadata, cases: Sequence[Case]) -> None:
    if any(c.slices is not None for c in cases) and str(meta.orientation).upper() != "RAS":
        raise ValueError(f"cases with slices are RAS slabs; model orientation is "
                         f"{meta.orientation!r}")


# ----------------------------------------------------------------------------------------------
# Evaluation of an export
# ----------------------------------------------------------------------------------------------


def load_engine(export_dir: str | Path, *, band: int = DEFAULT_BAND,
                threads: int | None = None, **overrides: Any) -> Any:
    """An ONNX Runtime :class:`Engine` of an export; keyword ``overrides`` replace metadata
    fields for this engine only (e.g. ``temperature=1.0``, ``quality={}``)."""
    from sfpc.inference.backends import make_backend
    from sfpc.inference.engine import Engine

    meta = ModelMetadata.load(export_dir)
    if overrides:
        meta = ModelMetadata.from_dict({**meta.to_dict(), **overrides})
    backend = make_backend("onnxruntime", export_dir=export_dir, providers="auto",
                           intra_op_threads=threads)
    return Engine(backend, meta, band=band)


def evaluate_export(
    engine: Any,
    cases: Sequence[Case],
    *,
    n_bins: int = DEFAULT_BINS,
    precision_bits: int = DEFAULT_PRECISION_BITS,
    voxel_sink: VoxelSink | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score an engine's maps on labelled cases; see the module docstring.

    ``voxel_sink(probs, label)`` receives each case's plain-mode probabilities (K, *sp) and
    model-grid labels (temperature fitting). Returns {"model", "settings", "sources": {"plain":
    summary, "flpm": summary}, "quality" (when the metadata has a threshold)}.
    """
    from sfpc.training.data import apply_label_map, read_image, read_label

    meta: ModelMetadata = engine.metadata
    names = [str(c) for c in meta.class_names]
    _check_slab_orientation(meta, cases)
    uncertainty = meta.has_uncertainty
    plain = UncertaintyScorer(names, ["softmax_entropy"], n_bins, precision_bits)
    flpm = UncertaintyScorer(names, ["entropy", "mutual_information"], n_bins, precision_bits)
    groups: dict[tuple[Path, ...], list[Case]] = {}
    for case in cases:
        if case.label is None:
            raise ValueError(f"case {case.id} has no label")
        groups.setdefault(tuple(case.image), []).append(case)
    for image_paths, group in groups.items():
        raw, affine = read_image(image_paths)
        model_image, geometry = engine.preprocess(raw, affine)
        probs = engine.infer_model_grid(model_image)["probs"]
        grid = engine.infer_model_grid(model_image, uncertainty=True) if uncertainty else None
        seg = engine.segment(raw, affine, uncertainty=True) if uncertainty else None
        del model_image
        labels: dict[tuple[Any, ...], np.ndarray] = {}
        for case in group:
            if progress is not None:
                progress(case.id)
            key = (case.label, str(case.label_map))
            if key not in labels:
                labels[key] = apply_label_map(read_label(case.label), case.label_map)
            label = labels[key]
            slab = None if case.slices is None else model_slab(case.slices, geometry)
            label_model = crop_last(prepare_label(label, geometry), slab)
            p = crop_last(probs, slab)
            plain.add_volume(p, {"softmax_entropy": predictive_entropy(p)}, label_model)
            if voxel_sink is not None:
                voxel_sink(p, label_model)
            if grid is None:
                continue
            mean_probs = crop_last(grid["mean_probs"], slab)
            maps = uncertainty_maps(mean_probs, crop_last(grid["mean_entropy"], slab))
            flpm.add_volume(mean_probs, maps, label_model)
            _add_input_grid_case(flpm, case, seg, label, affine, names, engine.band,
                                 meta.quality, (mean_probs, maps))
    out: dict[str, Any] = {
        "model": {"name": meta.name, "version": meta.version, "task": meta.task,
                  "temperature": float(meta.temperature), "uncertainty": uncertainty,
                  "perturbations": int(meta.perturbation.get("M") or 0)},
        "settings": {"bins": n_bins, "precision_bits": precision_bits,
                     "band_width_voxels": engine.band, "fractions": list(DEFAULT_FRACTIONS),
                     "cases": len(cases)},
        "sources": {"plain": plain.summary()},
    }
    if uncertainty:
        out["sources"]["flpm"] = flpm.summary()
        if meta.quality:
            out["quality"] = quality_outcome(flpm.cases, meta.quality)
    return out


def _add_input_grid_case(scorer: UncertaintyScorer, case: Case, seg: Any, label: np.ndarray,
                         affine: np.ndarray, class_names: Sequence[str], band: int,
                         quality: Mapping[str, Any],
                         model_grid: tuple[np.ndarray, Mapping[str, np.ndarray]]) -> None:
    """Dice of a case on the input grid and its boundary uncertainty on the model grid, as the
    server reports them (``model_grid``: the case's mean probabilities and maps there)."""
    mask = seg.mask
    if case.slices is None:
        stats = seg.statistics
    else:
        # RAS slab of the input grid for the Dice; the band statistics of the model-grid slab.
        mask = crop_last(to_orientation(mask, affine, "RAS")[0], case.slices)
        label = crop_last(to_orientation(label, affine, "RAS")[0], case.slices)
        mean_probs, model_maps = model_grid
        stats = region_statistics(mean_probs.argmax(axis=0), model_maps, class_names, 1.0,
                                  band=band)
    boundary = {k: stats["case"].get(f"boundary_mean_{k}")
                for k in ("entropy", "mutual_information")}
    extra: dict[str, Any] = {"errors": int(np.count_nonzero(mask != label)),
                             "voxels": int(mask.size)}
    if quality:
        extra["quality"] = quality_flag(boundary.get("entropy"), quality)
    scorer.add_case(case.id, foreground_dice(mask, label, class_names), boundary, **extra)


def quality_outcome(cases: Sequence[Mapping[str, Any]],
                    quality: Mapping[str, Any]) -> dict[str, Any]:
    """How the stored flag does on these cases: flagged count, and sensitivity / specificity
    for cases below the metadata's Dice target (when it has one)."""
    target = quality.get("dice_target")
    flags = [(quality_flag(c["boundary_uncertainty"].get("entropy"), quality)
              ["review_recommended"], c["dice"]["mean"]) for c in cases]
    known = [(f, d) for f, d in flags if f is not None]
    out: dict[str, Any] = {"threshold": float(quality["threshold"]), "cases": len(flags),
                           "flagged": sum(f for f, _ in known),
                           "without_boundary": len(flags) - len(known)}
    if target is not None:
        poor = [f for f, d in known if d < target]
        good = [f for f, d in known if d >= target]
        out.update({"dice_target": float(target), "poor": len(poor),
                    "sensitivity": float(np.mean(poor)) if poor else None,
                    "specificity": float(1 - np.mean(good)) if good else None,
                    "mean_dice_flagged": _mean([d for f, d in known if f]),
                    "mean_dice_unflagged": _mean([d for f, d in known if not f])})
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


# ----------------------------------------------------------------------------------------------
# Output: JSON, table, CSV, reliability PNG
# ----------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def detection_table(sources: Mapping[str, Mapping[str, Any]]) -> str:
    """Error detection rows: source, map, class group, AUROC, AP, error captures, error rate."""
    head = (f"{'source':<12}{'map':<20}{'class':<12}{'AUROC':>8}{'AP':>8}{'top5%':>8}"
            f"{'top10%':>8}{'err %':>8}{'voxels':>11}")
    rows = [head, "-" * len(head)]
    for source, summary in sources.items():
        for name, groups in summary["error_detection"].items():
            for group, s in groups.items():
                rate = None if s["error_rate"] is None else 100 * s["error_rate"]
                rows.append(f"{source:<12}{name:<20}{group:<12}{_f(s['auroc']):>8}"
                            f"{_f(s['ap']):>8}{_f(s['top5']):>8}{_f(s['top10']):>8}"
                            f"{_f(rate, 2):>8}{s['voxels']:>11}")
    return "\n".join(rows)


def calibration_table(sources: Mapping[str, Mapping[str, Any]]) -> str:
    head = (f"{'source':<12}{'ECE':>9}{'MCE':>9}{'ECE fg region':>15}{'classwise ECE':>15}"
            f"{'mean Dice':>11}")
    rows = [head, "-" * len(head)]
    for source, summary in sources.items():
        c = summary["calibration"]
        rows.append(f"{source:<12}{_f(c['ece']):>9}{_f(c['mce']):>9}"
                    f"{_f(c['foreground_region']['ece']):>15}"
                    f"{_f(c['mean_classwise_ece']):>15}{_f(summary['mean_dice']):>11}")
    return "\n".join(rows)


def correlation_table(sources: Mapping[str, Mapping[str, Any]]) -> str:
    head = f"{'source':<12}{'map':<20}{'Pearson':>9}{'Spearman':>10}{'cases':>7}"
    rows = [head, "-" * len(head)]
    for source, summary in sources.items():
        for name, s in (summary.get("case_correlation") or {}).items():
            rows.append(f"{source:<12}{name:<20}{_f(s['pearson'], 3):>9}"
                        f"{_f(s['spearman'], 3):>10}{s['cases']:>7}")
    return "\n".join(rows)


def report_text(result: Mapping[str, Any]) -> str:
    """The readable form of an evaluation result."""
    sources = result["sources"]
    parts = ["Error detection (voxel is misclassified; per class: voxels predicted or labelled "
             "as the class)", detection_table(sources), "",
             "Calibration of the probabilities (equal-width bins; ECE fg region: voxels "
             "predicted or labelled foreground)", calibration_table(sources)]
    if any(s.get("case_correlation") for s in sources.values()):
        parts += ["", "Case boundary uncertainty vs mean foreground Dice",
                  correlation_table(sources)]
    if "quality" in result:
        q = result["quality"]
        parts += ["", f"Quality flag (threshold {q['threshold']:.4f}): {q['flagged']} of "
                      f"{q['cases']} cases flagged" +
                  (f"; sensitivity {_f(q.get('sensitivity'), 3)}, specificity "
                   f"{_f(q.get('specificity'), 3)} for Dice < {q['dice_target']:g} "
                   f"({q['poor']} such cases)" if "dice_target" in q else "")]
    return "\n".join(parts)


def write_case_csv(cases: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One row per case: Dice per class, boundary uncertainty per map, flag."""
    rows = []
    for c in cases:
        row: dict[str, Any] = {"case": c["case"]}
        row.update({f"dice_{k}": v for k, v in c["dice"].items()})
        row.update({f"boundary_{k}": v for k, v in c["boundary_uncertainty"].items()})
        if "quality" in c:
            row["review_recommended"] = c["quality"]["review_recommended"]
        rows.append(row)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    out = Path(path)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


def bins_from_summary(summary: Mapping[str, Any]) -> CalibrationBins:
    """Rebuild top-label bins from a calibration summary (for reliability diagrams)."""
    table = summary["bins"]
    bins = CalibrationBins(len(table))
    for i, row in enumerate(table):
        n = row["count"]
        bins.count[i] = n
        bins.conf_sum[i] = (row["confidence"] or 0.0) * n
        bins.correct_sum[i] = (row["accuracy"] or 0.0) * n
    return bins


def write_reliability(panels: Sequence[tuple[str, Mapping[str, Any]]],
                      path: str | Path) -> Path:
    """Reliability diagrams of (title, calibration summary) pairs in one PNG."""
    return reliability_diagram([(t, bins_from_summary(s)) for t, s in panels], path)
