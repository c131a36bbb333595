"""Voxel-wise uncertainty maps and their region statistics, in plain numpy.

Shared by the serving engine and the uncertainty evaluation command, so that a map shown to a user
and a map scored offline are computed by the same lines.

Conventions: probabilities are channel-first (K, *spatial); entropies use the natural log with
0 ln 0 = 0 (the exported uncertainty graph clamps p at 1e-12 before the log, which gives the same
value to float32 precision). "Normalised" means divided by ln K, so both maps lie in [0, 1]:

- predictive entropy ``H(p_bar) / ln K``, p_bar the mean of the M perturbed softmax outputs;
- mutual information ``(H(p_bar) - mean_m H(p_m)) / ln K`` (the BALD score), the part of the
  predictive entropy that comes from the perturbations disagreeing. It is >= 0 by concavity of H;
  float rounding can make it a hair negative, which is clipped to 0.

The band statistics use :func:`boundary_band` (also the band of
the training metrics' boundary Dice), so "the 10-voxel band around
the boundary" means the same voxels here as in the boundary Dice of the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

ENTROPY_FLOOR = 1e-12  # as the exported graph: p * ln(max(p, 1e-12)) is 0 at p = 0
DEFAULT_BAND = 10
# Voxels per chunk when reducing over a whole volume: float64 accumulators and bool temporaries
# stay at a few tens of MB even for a 512x512x400 CT.
_CHUNK_VOXELS = 1 << 22


def entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """Shannon entropy in nats over ``axis`` (float32), with 0 ln 0 = 0."""
    p = np.asarray(probs, dtype=np.float32)
    # In place: one K-channel temporary instead of three (this runs on every restored voxel).
    plogp = np.maximum(p, np.float32(ENTROPY_FLOOR))
    np.log(plogp, out=plogp)
    plogp *= p
    h = np.asarray(np.sum(plogp, axis=axis, dtype=np.float32))
    return np.negative(h, out=h)


def sample_moments(samples: np.ndarray, sample_axis: int = 0,
                   class_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """From M sample probability maps, the mean probabilities and the mean per-sample entropy.

    ``samples`` holds the M softmax outputs along ``sample_axis`` and the K classes along
    ``class_axis`` (e.g. (M, K, *spatial) or SFPCNet.sample_probs' (M, B, K, *spatial) with
    class_axis=2). Returns ``(mean_probs, mean_entropy)`` as the uncertainty graph does: the
    sample axis removed, the class axis kept (size K, resp. 1). float32.
    """
    s = np.asarray(samples, dtype=np.float32)
    class_axis = class_axis % s.ndim
    per_sample = np.expand_dims(entropy(s, axis=class_axis), class_axis)
    return s.mean(axis=sample_axis), per_sample.mean(axis=sample_axis)


def predictive_entropy(mean_probs: np.ndarray, axis: int = 0,
                       normalise: bool = True) -> np.ndarray:
    """H(p_bar) over the class ``axis``; divided by ln K and clipped to [0, 1] when normalised."""
    p = np.asarray(mean_probs)
    h = entropy(p, axis=axis)
    if not normalise:
        return h
    k = p.shape[axis]
    _check_classes(k)
    h /= np.float32(math.log(k))
    return np.clip(h, 0.0, 1.0, out=h)


def mutual_information(mean_probs: np.ndarray, mean_entropy: np.ndarray, axis: int = 0,
                       normalise: bool = True) -> np.ndarray:
    """H(p_bar) - mean_m H(p_m), clipped at 0; divided by ln K when normalised.

    ``mean_entropy`` is in nats, with or without the singleton class axis.
    """
    p = np.asarray(mean_probs)
    me = np.asarray(mean_entropy, dtype=np.float32)
    if me.ndim == p.ndim:
        me = np.squeeze(me, axis=axis)
    mi = entropy(p, axis=axis) - me
    np.maximum(mi, 0.0, out=mi)
    if normalise:
        k = p.shape[axis]
        _check_classes(k)
        mi /= np.float32(math.log(k))
        np.minimum(mi, 1.0, out=mi)
    return mi


def uncertainty_maps(mean_probs: np.ndarray, mean_entropy: np.ndarray,
                     axis: int = 0) -> dict[str, np.ndarray]:
    """Both normalised maps: {"entropy": H(p_bar)/ln K, "mutual_information": MI/ln K}, the
    same values as :func:`predictive_entropy` and :func:`mutual_information`, with H(p_bar)
    computed once for both."""
    p = np.asarray(mean_probs)
    k = p.shape[axis]
    _check_classes(k)
    me = np.asarray(mean_entropy, dtype=np.float32)
    if me.ndim == p.ndim:
        me = np.squeeze(me, axis=axis)
    h = entropy(p, axis=axis)
    mi = h - me
    np.maximum(mi, 0.0, out=mi)
    scale = np.float32(math.log(k))
    mi /= scale
    np.minimum(mi, 1.0, out=mi)
    h /= scale
    np.clip(h, 0.0, 1.0, out=h)
    return {"entropy": h, "mutual_information": mi}


def _check_classes(k: int) -> None:
    if k < 2:
        raise ValueError(f"normalised entropy needs at least 2 classes, got {k}")


# ----------------------------------------------------------------------------------------------
# Region statistics
# ----------------------------------------------------------------------------------------------


def class_sums(labels: np.ndarray, values: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Per label 0..K-1, the number of voxels (``values`` None) or the float64 sum of ``values``.

    Chunked along the first axis so that the float64 weights bincount needs never exist for the
    whole volume at once.
    """
    lab = np.asarray(labels)
    if values is not None and np.shape(values) != lab.shape:
        raise ValueError(f"values shape {np.shape(values)} != labels shape {lab.shape}")
    out = np.zeros(num_classes, dtype=np.float64)
    if lab.size == 0:
        return out
    if lab.flags.f_contiguous and not lab.flags.c_contiguous and (
            values is None or np.asarray(values).flags.f_contiguous):
        # A Fortran-ordered mask (the engine's outputs for a NIfTI upload): its transpose is
        # C-ordered, so the chunks below are slices of memory, not strided gathers.
        lab = lab.T
        values = None if values is None else np.asarray(values).T
    rows = max(1, _CHUNK_VOXELS // max(1, lab[0].size)) if lab.ndim > 1 else lab.shape[0]
    for start in range(0, lab.shape[0], rows):
        chunk = lab[start:start + rows].ravel()
        weights = None if values is None else np.asarray(values[start:start + rows]).ravel()
        out += np.bincount(chunk, weights=weights, minlength=num_classes)[:num_classes]
    return out


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel, grown by ``margin`` and clipped to
    the array; None when the mask is empty."""
    m = np.asarray(mask, dtype=bool)
    box = []
    for axis in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != axis)
        hits = np.flatnonzero(m.any(axis=other))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0),
                         min(int(hits[-1]) + 1 + margin, m.shape[axis])))
    return tuple(box)


def boundary_band(mask: np.ndarray, band: int = 10) -> np.ndarray:
    """Voxels within `band` voxels (chessboard distance, in voxel units) of the mask's boundary, on
    both sides: outside voxels with a mask voxel in their (2*band+1)-cube, and mask voxels with a
    non-mask voxel in it. Outside the image is not treated as background, so a mask touching the
    field-of-view edge has no band along that edge (a truncation, not an anatomical boundary).

    Chessboard rather than Euclidean: the cube is separable into 1D min/max filters, about ten
    times cheaper than two distance transforms on a full-resolution CT crop, and it is the band of
    iterated 3x3 erosions used by Boundary IoU (Cheng et al., 2021).
    """
    m = np.asarray(mask, dtype=bool)
    if int(band) != band or band < 1:
        raise ValueError(f"band must be a whole number of voxels >= 1, got {band}")
    size = 2 * int(band) + 1
    dilated = ndimage.maximum_filter(m, size=size, mode="constant", cval=False)
    eroded = ndimage.minimum_filter(m, size=size, mode="nearest")
    return dilated & ~eroded


def cropped_boundary_band(mask: np.ndarray,
                          band: int = DEFAULT_BAND) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """:func:`boundary_band` of ``mask``, computed on the mask's bounding
    box grown by ``band + 1`` voxels. Returns ``(box, band_in_box)``, None for an empty mask.

    Identical to the band of the whole array: every band voxel lies within ``band`` voxels of a
    mask voxel, hence inside the box, and the (2 band + 1)-cube of such a voxel never reaches past
    the box's margin except where the box meets the image edge, which both versions treat alike.
    A small organ in a CT thus costs a filter over its box, not over the volume.
    """
    box = bounding_box(mask, margin=int(band) + 1)
    if box is None:
        return None
    return box, boundary_band(np.asarray(mask, dtype=bool)[box], band)


def volume_statistics(labels: np.ndarray, class_names: Sequence[str],
                      voxel_volume_ml: float) -> dict[str, Any]:
    """Per class the voxel count and volume in mL of a label map; "case" holds the voxel
    count. The plain-mode statistics, and the volume half of :func:`region_statistics`."""
    labels = np.asarray(labels)
    return count_statistics(class_sums(labels, None, len(class_names)), class_names,
                            voxel_volume_ml)


def count_statistics(counts: Sequence[float] | np.ndarray, class_names: Sequence[str],
                     voxel_volume_ml: float) -> dict[str, Any]:
    """:func:`volume_statistics` from the label counts (voxels per class, in label order), for
    callers that counted the labels as they wrote them."""
    counts = np.asarray(counts)
    if counts.shape != (len(class_names),):
        raise ValueError(f"{counts.shape[0] if counts.ndim else 0} counts for "
                         f"{len(class_names)} classes")
    classes = {str(cname): {"label": k, "voxels": int(counts[k]),
                            "volume_ml": int(counts[k]) * float(voxel_volume_ml)}
               for k, cname in enumerate(class_names)}
    return {"voxel_volume_ml": float(voxel_volume_ml), "classes": classes,
            "case": {"voxels": int(counts.sum())}}


class MapSums:
    """The sums :func:`map_statistics` reports means of, per class (counts, map sums) and in the
    boundary bands (per class, and their union), for ``class_names`` and maps ``map_names``.
    Taken over a whole grid by :func:`map_statistics` or slab by slab by
    :class:`~sfpc.inference.streamed_statistics.StreamedMapStatistics`; :meth:`statistics`
    turns either into the report's dictionary."""

    def __init__(self, class_names: Sequence[str], map_names: Sequence[str],
                 band: int = DEFAULT_BAND) -> None:
        self.class_names = [str(c) for c in class_names]
        self.map_names = list(map_names)
        self.band = int(band)
        k = len(self.class_names)
        self.voxels = 0
        self.counts = np.zeros(k)
        self.sums = {name: np.zeros(k) for name in self.map_names}
        self.band_voxels = np.zeros(k, dtype=np.int64)
        self.band_sums = {name: np.zeros(k) for name in self.map_names}
        self.union_voxels = 0
        self.union_sums = {name: 0.0 for name in self.map_names}

    def add_classes(self, labels: np.ndarray, maps: Mapping[str, np.ndarray]) -> None:
        """Count ``labels`` and sum every map over each class."""
        k = len(self.class_names)
        self.counts += class_sums(labels, None, k)
        for name in self.map_names:
            self.sums[name] += class_sums(labels, maps[name], k)
        self.voxels += labels.size

    def add_band(self, k: int, band: np.ndarray, maps: Mapping[str, np.ndarray]) -> None:
        """Count class ``k``'s band voxels ``band`` (a mask over ``maps``' arrays)."""
        self.band_voxels[k] += int(np.count_nonzero(band))
        for name in self.map_names:
            self.band_sums[name][k] += float(np.sum(maps[name], where=band, dtype=np.float64))

    def add_union(self, union: np.ndarray, maps: Mapping[str, np.ndarray]) -> None:
        """Count the voxels in any foreground band, ``union`` (a mask over ``maps``' arrays)."""
        self.union_voxels += int(np.count_nonzero(union))
        for name in self.map_names:
            self.union_sums[name] += float(np.sum(maps[name], where=union, dtype=np.float64))

    def statistics(self) -> dict[str, Any]:
        """Per class the mean of every map inside it and, for foreground classes, inside its
        band (with the band's voxel count); "case": each map's mean over the volume and over
        the union of the bands ("boundary"). Means over no voxels are None (JSON null)."""
        def mean(total: float, n: int) -> float | None:
            return float(total / n) if n else None

        classes: dict[str, Any] = {}
        for k, cname in enumerate(self.class_names):
            n = int(self.counts[k])
            entry: dict[str, Any] = {f"mean_{name}": mean(self.sums[name][k], n)
                                     for name in self.map_names}
            if k > 0:
                voxels = int(self.band_voxels[k])
                entry["boundary_voxels"] = voxels
                for name in self.map_names:
                    entry[f"boundary_mean_{name}"] = mean(self.band_sums[name][k], voxels)
            classes[cname] = entry
        case: dict[str, Any] = {"boundary_voxels": int(self.union_voxels)}
        for name in self.map_names:
            case[f"mean_{name}"] = mean(self.sums[name].sum(), self.voxels)
            case[f"boundary_mean_{name}"] = mean(self.union_sums[name], self.union_voxels)
        return {"band_width_voxels": self.band, "classes": classes, "case": case}


def map_statistics(labels: np.ndarray, maps: Mapping[str, np.ndarray],
                   class_names: Sequence[str], band: int = DEFAULT_BAND) -> dict[str, Any]:
    """The uncertainty half of :func:`region_statistics`, on the whole grid: see
    :meth:`MapSums.statistics`; the bands are :func:`cropped_boundary_band` of each foreground
    class."""
    labels = np.asarray(labels)
    sums = MapSums(class_names, list(maps), band)
    sums.add_classes(labels, maps)
    union = np.zeros(labels.shape, dtype=bool)
    for k in range(1, len(sums.class_names)):
        found = cropped_boundary_band(labels == k, band) if sums.counts[k] else None
        if found is not None:
            box, class_band = found
            sums.add_band(k, class_band, {name: values[box] for name, values in maps.items()})
            union[box] |= class_band
    sums.add_union(union, maps)
    return sums.statistics()


def merge_statistics(volumes: Mapping[str, Any], maps: Mapping[str, Any] | None,
                     **extra: Any) -> dict[str, Any]:
    """:func:`volume_statistics` with :func:`map_statistics`' entries added class by class
    (``extra`` goes to the top level, e.g. on which grid the maps were summarised)."""
    out: dict[str, Any] = {"voxel_volume_ml": volumes["voxel_volume_ml"]}
    if maps is not None:
        out["band_width_voxels"] = maps["band_width_voxels"]
    out.update(extra)
    out["classes"] = {name: {**entry, **(maps["classes"].get(name, {}) if maps else {})}
                      for name, entry in volumes["classes"].items()}
    out["case"] = {**volumes["case"], **(maps["case"] if maps else {})}
    return out


def region_statistics(
    labels: np.ndarray,
    maps: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    voxel_volume_ml: float,
    band: int = DEFAULT_BAND,
) -> dict[str, Any]:
    """Volumes and uncertainty summaries of a predicted label map, both on its grid.

    Per class: voxel count, volume in mL, and for every map in ``maps`` (e.g. "entropy",
    "mutual_information") its mean inside the class and, for foreground classes (label > 0), its
    mean inside the ``band``-voxel band around the class boundary (boundary_band, both sides).
    The background's boundary is the union of the foreground ones, reported once for the case as
    "boundary": the mean inside the union of the foreground bands. "case" also holds the mean of
    each map over the whole volume. Means over no voxels are None (JSON null).
    """
    volumes = volume_statistics(labels, class_names, voxel_volume_ml)
    if not maps:
        return {**volumes, "band_width_voxels": int(band)}
    return merge_statistics(volumes, map_statistics(labels, maps, class_names, band))
