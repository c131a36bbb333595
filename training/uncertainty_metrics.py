"""How well uncertainty finds errors, and how well probabilities are calibrated: numpy only.

Error detection (a voxel is "positive" when the prediction is wrong there, its score is the
uncertainty):

- AUROC: the Mann-Whitney statistic P(score of an error > score of a correct voxel), ties counted
  one half (the area under the ROC curve with ties interpolated, as scikit-learn computes it);
- average precision: sum over distinct thresholds of (R_n - R_{n-1}) P_n, tied scores forming
  one threshold (scikit-learn's ``average_precision_score``);
- error capture at q: the share of all errors among the q * N most uncertain voxels; a tie
  group straddling the cut contributes pro rata (the expectation under random tie breaking).

All three come from per-level counts of errors and correct voxels over the sorted distinct
score levels. The exact functions take the levels from ``np.unique``; :class:`ScoreHistogram`
accumulates them over many volumes in bounded memory by quantising each float32 score to the
top bits of its bit pattern, which for non-negative floats is monotone in the value: with the
default 11 mantissa bits, two scores share a level only when they agree to 1 part in 2048 at
any magnitude (linear bins would lump every confident voxel, 1e-6 and 1e-3 alike, into the
first bin). The measures of a histogram are exactly those of the quantised scores; ``tie_mass``
says how much of the AUROC rests on pairs tied by the quantisation (0.5 x that share at most).

Calibration: equal-width confidence bins over [0, 1], bin i holding [i/B, (i+1)/B) and the last
also 1.0. ECE = sum_b (n_b / N) |accuracy_b - confidence_b|; MCE the largest gap of a non-empty
bin. Top-label calibration uses the max probability and "argmax == truth"; class-wise
calibration (Kull et al., 2019) uses p_c and "truth == c" for every class c.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_FRACTIONS = (0.05, 0.10)
DEFAULT_BINS = 15
DEFAULT_PRECISION_BITS = 11
_FLOAT32_MANTISSA = 23
_CHUNK = 1 << 22  # voxels per step when accumulating: bounded float64 / int64 temporaries


# ----------------------------------------------------------------------------------------------
# Ranking measures over score levels
# ----------------------------------------------------------------------------------------------


def _check_pair(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores).ravel()
    e = np.asarray(errors).ravel()
    if s.shape != e.shape:
        raise ValueError(f"scores and errors differ in size: {s.size} vs {e.size}")
    if s.size and not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, e.astype(bool, copy=False)


def level_counts(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct score, ascending: (number of errors, number of correct voxels), float64."""
    s, e = _check_pair(scores, errors)
    _, inverse = np.unique(s, return_inverse=True)
    total = np.bincount(inverse).astype(np.float64)
    pos = np.bincount(inverse, weights=e.astype(np.float64), minlength=total.size)
    return pos, total - pos


def auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUROC from per-level counts (ascending levels); None when either class is absent."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / n_pos / n_neg)


def average_precision_from_counts(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Average precision from per-level counts (ascending levels); None without errors."""
    pos, neg = np.asarray(pos, np.float64)[::-1], np.asarray(neg, np.float64)[::-1]
    n_pos = pos.sum()
    if n_pos == 0:
        return None
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    keep = pos > 0  # a level without errors adds no recall, hence nothing to the sum
    return float(np.sum(pos[keep] / n_pos * tp[keep] / (tp[keep] + fp[keep])))


def capture_from_counts(pos: np.ndarray, neg: np.ndarray, fraction: float) -> float | None:
    """Share of the errors among the ``fraction`` most uncertain voxels; None without errors."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    pos, neg = np.asarray(pos, np.float64)[::-1], np.asarray(neg, np.float64)[::-1]
    n_pos = pos.sum()
    if n_pos == 0:
        return None
    total = pos + neg
    k = fraction * total.sum()
    cum = np.cumsum(total)
    # First level whose cumulative count reaches k: everything above it is inside the top k.
    cut = int(np.searchsorted(cum, k, side="left"))
    if cut >= total.size:
        return 1.0
    above = cum[cut] - total[cut]
    caught = pos[:cut].sum() + (pos[cut] * (k - above) / total[cut] if total[cut] else 0.0)
    return float(caught / n_pos)


def auroc(scores: np.ndarray, errors: np.ndarray) -> float | None:
    """AUROC of ``scores`` for the binary ``errors`` (ties count one half); None if one class
    is absent."""
    return auroc_from_counts(*level_counts(scores, errors))


def average_precision(scores: np.ndarray, errors: np.ndarray) -> float | None:
    """Average precision of ``scores`` for ``errors`` (scikit-learn's definition)."""
    return average_precision_from_counts(*level_counts(scores, errors))


def error_capture(scores: np.ndarray, errors: np.ndarray,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, float | None]:
    """{"top5": share of errors in the top 5 % most uncertain voxels, ...} per fraction."""
    pos, neg = level_counts(scores, errors)
    return {_capture_key(q): capture_from_counts(pos, neg, q) for q in fractions}


def _capture_key(fraction: float) -> str:
    pct = fraction * 100
    return f"top{int(round(pct))}" if abs(pct - round(pct)) < 1e-9 else f"top{pct:g}"


def quantise_scores(scores: np.ndarray, precision_bits: int = DEFAULT_PRECISION_BITS) -> np.ndarray:
    """Monotone integer levels of non-negative scores: the float32 bit pattern without its
    lowest ``23 - precision_bits`` mantissa bits (relative resolution 2^-precision_bits)."""
    if not 0 <= precision_bits <= _FLOAT32_MANTISSA:
        raise ValueError(f"precision_bits must lie in 0..{_FLOAT32_MANTISSA}")
    s = np.asarray(scores, dtype=np.float32)
    if s.size and (not np.all(np.isfinite(s)) or s.min() < 0):
        raise ValueError("quantised scores must be finite and >= 0 (uncertainty maps are)")
    s = s + np.float32(0.0)  # -0.0 -> +0.0, whose bit pattern sorts first
    return s.view(np.uint32) >> np.uint32(_FLOAT32_MANTISSA - precision_bits)


def dequantise_level(level: int, precision_bits: int = DEFAULT_PRECISION_BITS) -> float:
    """The smallest float32 score of a quantised level."""
    bits = np.uint32(int(level) << (_FLOAT32_MANTISSA - precision_bits))
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


@dataclass
class ScoreHistogram:
    """Error / correct counts per quantised score level, accumulated over any number of volumes.

    Memory: two float64 arrays over the levels seen so far (scores in [0, 1] use at most
    127 x 2^precision_bits levels: 2 MB at the default 11 bits).
    """

    precision_bits: int = DEFAULT_PRECISION_BITS
    pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    def add(self, scores: np.ndarray, errors: np.ndarray,
            mask: np.ndarray | None = None) -> None:
        """Count the voxels of ``scores`` / ``errors`` (where ``mask``, if given)."""
        s, e = _check_pair(scores, errors)
        if mask is not None:
            m = np.asarray(mask, dtype=bool).ravel()
            if m.shape != s.shape:
                raise ValueError(f"mask size {m.size} != scores size {s.size}")
            s, e = s[m], e[m]
        for start in range(0, s.size, _CHUNK):  # int64 / float64 temporaries of a chunk only
            levels = quantise_scores(s[start:start + _CHUNK], self.precision_bits)
            levels = levels.astype(np.int64)
            n = int(levels.max()) + 1
            if n > self.pos.size:
                self.pos = np.pad(self.pos, (0, n - self.pos.size))
                self.neg = np.pad(self.neg, (0, n - self.neg.size))
            total = np.bincount(levels, minlength=n).astype(np.float64)
            errs = np.bincount(levels, weights=e[start:start + _CHUNK], minlength=n)
            self.pos[:n] += errs
            self.neg[:n] += total - errs

    def merge(self, other: ScoreHistogram) -> None:
        if other.precision_bits != self.precision_bits:
            raise ValueError("cannot merge histograms of different precision")
        n = max(self.pos.size, other.pos.size)
        self.pos = np.pad(self.pos, (0, n - self.pos.size))
        self.neg = np.pad(self.neg, (0, n - self.neg.size))
        self.pos[:other.pos.size] += other.pos
        self.neg[:other.neg.size] += other.neg

    @property
    def n_errors(self) -> int:
        return int(self.pos.sum())

    @property
    def n_voxels(self) -> int:
        return int(self.pos.sum() + self.neg.sum())

    def auroc(self) -> float | None:
        return auroc_from_counts(self.pos, self.neg)

    def average_precision(self) -> float | None:
        return average_precision_from_counts(self.pos, self.neg)

    def capture(self, fraction: float) -> float | None:
        return capture_from_counts(self.pos, self.neg, fraction)

    def tie_mass(self) -> float | None:
        """Share of (error, correct) pairs that share a level: the AUROC counts them 1/2 each."""
        n_pos, n_neg = self.pos.sum(), self.neg.sum()
        if n_pos == 0 or n_neg == 0:
            return None
        return float(np.sum(self.pos * self.neg) / n_pos / n_neg)

    def summary(self, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, Any]:
        """AUROC, AP, error captures, voxel and error counts, error rate and tie mass."""
        n = self.n_voxels
        out: dict[str, Any] = {"auroc": self.auroc(), "ap": self.average_precision()}
        out.update({_capture_key(q): self.capture(q) for q in fractions})
        out.update({"voxels": n, "errors": self.n_errors,
                    "error_rate": self.n_errors / n if n else None,
                    "tie_mass": self.tie_mass()})
        return out


def paired_auroc_difference(a: Sequence[ScoreHistogram], b: Sequence[ScoreHistogram], *,
                            n_boot: int = 2000, level: float = 0.95,
                            seed: int = 0) -> dict[str, Any]:
    """AUROC of method ``a`` minus AUROC of method ``b`` on the same cases, with a paired
    case-resampling bootstrap interval.

    ``a[i]`` and ``b[i]`` are case i's histograms under the two methods. Voxels of a case are
    not independent (errors come in connected regions), so the cases, not the voxels, are
    resampled: each replicate draws cases with replacement and pools their counts for both
    methods alike. Returns the difference on all cases, its ``ci`` at ``level`` (percentile
    interval) and the share of replicates in which ``a`` is at least as good.
    """
    if len(a) != len(b) or not a:
        raise ValueError("need the same, non-empty list of cases for both methods")

    def stack(hists: Sequence[ScoreHistogram]) -> tuple[np.ndarray, np.ndarray]:
        n = max(h.pos.size for h in hists)
        pos = np.stack([np.pad(h.pos, (0, n - h.pos.size)) for h in hists])
        neg = np.stack([np.pad(h.neg, (0, n - h.neg.size)) for h in hists])
        seen = (pos.sum(axis=0) + neg.sum(axis=0)) > 0  # levels stay ascending
        return pos[:, seen], neg[:, seen]

    pa, na = stack(a)
    pb, nb = stack(b)
    whole_a = auroc_from_counts(pa.sum(axis=0), na.sum(axis=0))
    whole_b = auroc_from_counts(pb.sum(axis=0), nb.sum(axis=0))
    out: dict[str, Any] = {"cases": len(a), "level": level, "auroc_a": whole_a,
                           "auroc_b": whole_b, "difference": None, "ci": None,
                           "share_a_ge_b": None, "replicates": 0}
    if whole_a is None or whole_b is None:
        return out
    k = len(a)
    weights = np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=n_boot)
    diffs = []
    for chunk in np.array_split(weights, max(1, n_boot // 100)):
        for w_pa, w_na, w_pb, w_nb in zip(chunk @ pa, chunk @ na, chunk @ pb, chunk @ nb,
                                          strict=True):
            x, y = auroc_from_counts(w_pa, w_na), auroc_from_counts(w_pb, w_nb)
            if x is not None and y is not None:
                diffs.append(x - y)
    d = np.asarray(diffs)
    tail = (1.0 - level) / 2.0
    out.update({"difference": whole_a - whole_b,
                "ci": [float(np.quantile(d, tail)), float(np.quantile(d, 1.0 - tail))],
                "share_a_ge_b": float(np.mean(d >= 0)), "replicates": int(d.size)})
    return out


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


def bin_index(confidence: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """Equal-width bin of each confidence in [0, 1]: floor(c * B), 1.0 in the last bin."""
    c = np.asarray(confidence, dtype=np.float64)
    return np.clip(np.floor(c * n_bins), 0, n_bins - 1).astype(np.int64)


@dataclass
class CalibrationBins:
    """Per equal-width bin: voxel count, summed confidence and summed correctness."""

    n_bins: int = DEFAULT_BINS
    count: np.ndarray = field(default_factory=lambda: np.zeros(0))
    conf_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    correct_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if self.count.size == 0:
            self.count = np.zeros(self.n_bins)
            self.conf_sum = np.zeros(self.n_bins)
            self.correct_sum = np.zeros(self.n_bins)

    def add(self, confidence: np.ndarray, correct: np.ndarray,
            mask: np.ndarray | None = None) -> None:
        conf = np.asarray(confidence).ravel()
        ok = np.asarray(correct).ravel()
        if conf.shape != ok.shape:
            raise ValueError(f"confidence and correct differ in size: {conf.size} vs {ok.size}")
        m = None if mask is None else np.asarray(mask, dtype=bool).ravel()
        for start in range(0, conf.size, _CHUNK):  # float64 copies of a chunk only
            part = slice(start, start + _CHUNK)
            c = conf[part].astype(np.float64)
            y = ok[part].astype(np.float64)
            if m is not None:
                c, y = c[m[part]], y[m[part]]
            b = bin_index(c, self.n_bins)
            self.count += np.bincount(b, minlength=self.n_bins)
            self.conf_sum += np.bincount(b, weights=c, minlength=self.n_bins)
            self.correct_sum += np.bincount(b, weights=y, minlength=self.n_bins)

    @property
    def total(self) -> int:
        return int(self.count.sum())

    def gaps(self) -> np.ndarray:
        """|accuracy - confidence| per bin (0 for empty bins)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.abs(self.correct_sum - self.conf_sum) / self.count
        return np.where(self.count > 0, gap, 0.0)

    def ece(self) -> float | None:
        n = self.count.sum()
        return None if n == 0 else float(np.sum(np.abs(self.correct_sum - self.conf_sum)) / n)

    def mce(self) -> float | None:
        return None if self.count.sum() == 0 else float(self.gaps().max())

    def table(self) -> list[dict[str, Any]]:
        """One row per bin: edges, count, mean confidence and accuracy (None when empty)."""
        rows = []
        for i in range(self.n_bins):
            n = float(self.count[i])
            rows.append({"lo": i / self.n_bins, "hi": (i + 1) / self.n_bins, "count": int(n),
                         "confidence": self.conf_sum[i] / n if n else None,
                         "accuracy": self.correct_sum[i] / n if n else None})
        return rows

    def summary(self) -> dict[str, Any]:
        return {"ece": self.ece(), "mce": self.mce(), "voxels": self.total, "bins": self.table()}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               n_bins: int = DEFAULT_BINS) -> float | None:
    """ECE with ``n_bins`` equal-width bins (see the module docstring)."""
    bins = CalibrationBins(n_bins)
    bins.add(confidence, correct)
    return bins.ece()


@dataclass
class Calibration:
    """Top-label and class-wise calibration of channel-first probabilities (K, *spatial)."""

    num_classes: int
    n_bins: int = DEFAULT_BINS
    top: CalibrationBins = field(init=False)
    classwise: list[CalibrationBins] = field(init=False)

    def __post_init__(self) -> None:
        self.top = CalibrationBins(self.n_bins)
        self.classwise = [CalibrationBins(self.n_bins) for _ in range(self.num_classes)]

    def add(self, probs: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> None:
        p = np.asarray(probs)
        lab = np.asarray(labels)
        if p.shape[0] != self.num_classes or p.shape[1:] != lab.shape:
            raise ValueError(f"probs {p.shape} do not match {self.num_classes} classes x "
                             f"labels {lab.shape}")
        pred = np.argmax(p, axis=0)
        self.top.add(np.max(p, axis=0), pred == lab, mask)
        for c, bins in enumerate(self.classwise):
            bins.add(p[c], lab == c, mask)

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(class_names or range(self.num_classes))
        classwise = {str(n): b.ece() for n, b in zip(names, self.classwise, strict=True)}
        values = [v for v in classwise.values() if v is not None]
        return {**self.top.summary(), "classwise_ece": classwise,
                "mean_classwise_ece": float(np.mean(values)) if values else None}


# ----------------------------------------------------------------------------------------------
# Correlation
# ----------------------------------------------------------------------------------------------


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of their ranks."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # Start of each tie group in sorted order; the mean rank of a group is (first + last) / 2.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    group_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(v.size)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None for fewer than 3 pairs or a constant variable."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.shape != b.shape:
        raise ValueError("x and y differ in length")
    if a.size < 3:
        return None
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return None if denom == 0 else float(np.dot(a, b) / denom)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson of the tie-averaged ranks)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.shape != b.shape:
        raise ValueError("x and y differ in length")
    if a.size < 3:
        return None
    return pearson(rankdata(a), rankdata(b))


# ----------------------------------------------------------------------------------------------
# Reliability diagram
# ----------------------------------------------------------------------------------------------


def reliability_diagram(panels: Sequence[tuple[str, CalibrationBins]], path: str | Path,
                        panel_size: int = 320) -> Path:
    """A PNG with one reliability diagram per (title, bins): accuracy bars per confidence bin,
    the gap to the bin's mean confidence shaded, the diagonal, and the ECE in the title.

    Drawn with Pillow (matplotlib is not a dependency of the project).
    """
    from PIL import Image, ImageDraw

    margin_l, margin_r, margin_t, margin_b = 44, 12, 34, 36
    width = len(panels) * (panel_size + margin_l + margin_r)
    height = panel_size + margin_t + margin_b
    img = Image.new("RGB", (max(width, 1), height), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, bins) in enumerate(panels):
        x0 = i * (panel_size + margin_l + margin_r) + margin_l
        y0, s = margin_t, panel_size

        def px(u: float, v: float, x0: int = x0, y0: int = y0, s: int = s) -> tuple[float, float]:
            return x0 + u * s, y0 + (1 - v) * s

        for t in range(0, 11, 2):  # grid and tick labels every 0.2
            u = t / 10
            draw.line([px(u, 0), px(u, 1)], fill=(232, 232, 232))
            draw.line([px(0, u), px(1, u)], fill=(232, 232, 232))
            draw.text((px(u, 0)[0] - 8, y0 + s + 4), f"{u:.1f}", fill="black")
            draw.text((x0 - 30, px(0, u)[1] - 6), f"{u:.1f}", fill="black")
        for row in bins.table():
            if not row["count"]:
                continue
            acc, conf = row["accuracy"], row["confidence"]
            left, right = px(row["lo"], 0)[0] + 1, px(row["hi"], 0)[0] - 1
            draw.rectangle([left, px(0, acc)[1], right, px(0, 0)[1]], fill=(70, 110, 190))
            lo, hi = sorted((acc, conf))
            draw.rectangle([left, px(0, hi)[1], right, px(0, lo)[1]], fill=(230, 120, 110))
        draw.line([px(0, 0), px(1, 1)], fill=(40, 40, 40), width=1)
        draw.rectangle([px(0, 1), px(1, 0)], outline="black")
        ece = bins.ece()
        label = f"{title}  ECE {ece:.4f}" if ece is not None else f"{title}  (no voxels)"
        draw.text((x0, 8), label, fill="black")
        draw.text((x0 + s / 2 - 30, y0 + s + 20), "confidence", fill="black")
        draw.text((x0 + 4, y0 + 4), "accuracy (bars), gap to confidence (red)", fill="black")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out
