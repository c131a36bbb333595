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

from sfpc.inference.uncertainty import DEFAULT_BAND, MapSums, cropped_boundary_band


class StreamedMapStatistics:
    """:func:`~sfpc.inference.uncertainty.map_statistics` of labels and maps pushed in
    consecutive slabs along ``axis`` (of a spatial grid of ``length`` rows along it): the same
    dictionary, up to the order of float64 sums."""

    def __init__(self, length: int, axis: int, class_names: Sequence[str],
                 map_names: Sequence[str], band: int = DEFAULT_BAND) -> None:
        self.length, self.axis, self.band = int(length), int(axis), int(band)
        self.sums = MapSums(class_names, map_names, band)
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
        self.sums.add_classes(labels, maps)
        self._labels = labels if self._labels is None else np.concatenate(
            [self._labels, labels], axis=self.axis)
        self._maps = {name: maps[name] if name not in self._maps else
                      np.concatenate([self._maps[name], maps[name]], axis=self.axis)
                      for name in self.sums.map_names}
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
        for k in range(1, len(self.sums.class_names)):
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
            self.sums.add_band(k, in_band,
                               {name: values[region] for name, values in maps.items()})
            union[region] |= in_band
        self.sums.add_union(union, maps)
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
        return self.sums.statistics()
