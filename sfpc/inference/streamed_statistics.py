"""The uncertainty statistics of a report, taken slab by slab as the network delivers them.

:func:`~sfpc.inference.uncertainty.map_statistics` needs the whole model-grid label map: a class's
boundary band reaches ``band`` voxels across slab borders. Waiting for the last slab to take it
put a quarter of a second (a 512 x 512 x 400 CT at 3 mm) to a second (at 1.5 mm) after the
network, on the critical path of every uncertainty request, and held the whole model grid's
labels and maps. :class:`StreamedMapStatistics` takes the same numbers as the slabs arrive: the
class means are sums, and the band of a row depends only on the labels within ``band`` rows of
it, so each row's band is taken once the ``band`` rows after it have arrived, on a window that
holds those rows on both sides. Only that window is held.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sfpc.inference.uncertainty import DEFAULT_BAND, class_sums, cropped_boundary_band


class StreamedMapStatistics:
    """:func:`~sfpc.inference.uncertainty.map_statistics` of labels and maps pushed in
    consecutive slabs along ``axis`` (of a spatial grid of ``length`` rows along it): the same
    dictionary, up to the order of float64 sums."""

    def __init__(self, length: int, axis: int, class_names: Sequence[str],
                 map_names: Sequence[str], band: int = DEFAULT_BAND) -> None:
        self.length, self.axis, self.band = int(length), int(axis), int(band)
        self.class_names = [str(c) for c in class_names]
        self.map_names = list(map_names)
        k = len(self.class_names)
        self.counts = np.zeros(k)
        self.sums = {name: np.zeros(k) for name in self.map_names}
        self.band_voxels = np.zeros(k, dtype=np.int64)
        self.band_sums = {name: np.zeros(k) for name in self.map_names}
        self.union_voxels = 0
        self.union_sums = {name: 0.0 for name in self.map_names}
        self.voxels = 0
        self._labels: np.ndarray | None = None  # rows [_labels_start, received)
        self._labels_start = 0
        self._maps: dict[str, np.ndarray] = {}  # rows [done, received)
        self.received = 0
        self.done = 0  # rows whose band is counted

    def push(self, start: int, labels: np.ndarray, maps: Mapping[str, np.ndarray]) -> None:
        """Take the rows ``start:start + n`` (the next ones) of the labels and of every map."""
        if start != self.received:
            raise ValueError(f"rows from {start} pushed after {self.received} rows")
        rows = labels.shape[self.axis]
        k = len(self.class_names)
        self.counts += class_sums(labels, None, k)
        for name in self.map_names:
            self.sums[name] += class_sums(labels, maps[name], k)
        self.voxels += labels.size
        self._labels = labels if self._labels is None else np.concatenate(
            [self._labels, labels], axis=self.axis)
        self._maps = {name: maps[name] if name not in self._maps else
                      np.concatenate([self._maps[name], maps[name]], axis=self.axis)
                      for name in self.map_names}
        self.received += rows
        ready = self.length if self.received >= self.length else self.received - self.band
        if ready > self.done:
            self._count_bands(self.done, ready)

    def _rows(self, array: np.ndarray, first: int, last: int | None) -> np.ndarray:
        return array[(slice(None),) * self.axis + (slice(first, last),)]

    def _count_bands(self, first: int, last: int) -> None:
        """Count the band voxels of rows first:last, from a window of labels reaching ``band``
        rows beyond them (clipped at the grid's ends, which the whole-grid band treats alike:
        the filters see a volume edge there either way)."""
        assert self._labels is not None
        lo = max(0, first - self.band)
        window = self._rows(self._labels, lo - self._labels_start,
                            min(self.received, last + self.band) - self._labels_start)
        kept = (first - lo, last - lo)  # the rows counted, within the window
        union = np.zeros(self._rows(window, *kept).shape, dtype=bool)
        maps = {name: self._rows(values, 0, last - first) for name, values in self._maps.items()}
        for k in range(1, len(self.class_names)):
            found = cropped_boundary_band(window == k, self.band)
            if found is None:
                continue
            box, band = found
            # The band's rows that are counted now, and where they sit in `union` and the maps.
            rows = box[self.axis]
            a, b = max(rows.start, kept[0]), min(rows.stop, kept[1])
            if a >= b:
                continue
            in_band = self._rows(band, a - rows.start, b - rows.start)
            target = list(box)
            target[self.axis] = slice(a - kept[0], b - kept[0])
            region = tuple(target)
            self.band_voxels[k] += int(np.count_nonzero(in_band))
            for name, values in maps.items():
                self.band_sums[name][k] += float(np.sum(values[region], where=in_band,
                                                        dtype=np.float64))
            union[region] |= in_band
        self.union_voxels += int(np.count_nonzero(union))
        for name, values in maps.items():
            self.union_sums[name] += float(np.sum(values, where=union, dtype=np.float64))
        self.done = last
        # Keep the labels the next rows' bands reach back to, and the maps not yet counted.
        keep = max(0, last - self.band)
        self._labels = self._rows(self._labels, keep - self._labels_start, None)
        self._labels_start = keep
        self._maps = {name: self._rows(values, last - first, None)
                      for name, values in self._maps.items()}

    def result(self) -> dict[str, Any]:
        """The statistics, once every row has been pushed."""
        if self.received != self.length:
            raise RuntimeError(f"{self.received} of {self.length} rows pushed")
        classes: dict[str, Any] = {}
        for k, cname in enumerate(self.class_names):
            n = int(self.counts[k])
            entry: dict[str, Any] = {f"mean_{name}": float(self.sums[name][k] / n) if n else None
                                     for name in self.map_names}
            if k > 0:
                voxels = int(self.band_voxels[k])
                entry["boundary_voxels"] = voxels
                for name in self.map_names:
                    entry[f"boundary_mean_{name}"] = (float(self.band_sums[name][k] / voxels)
                                                      if voxels else None)
            classes[cname] = entry
        case: dict[str, Any] = {"boundary_voxels": int(self.union_voxels)}
        for name in self.map_names:
            case[f"mean_{name}"] = float(self.sums[name].sum() / self.voxels)
            case[f"boundary_mean_{name}"] = (float(self.union_sums[name] / self.union_voxels)
                                             if self.union_voxels else None)
        return {"band_width_voxels": self.band, "classes": classes, "case": case}
