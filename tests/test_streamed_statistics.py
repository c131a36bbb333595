"""Report statistics taken slab by slab against the whole-grid oracle, ``map_statistics``
(itself checked against ``training.metrics.boundary_band`` in tests/test_engine.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sfpc.inference.streamed_statistics import StreamedMapStatistics
from sfpc.inference.uncertainty import map_statistics

NAMES = ["background", "a", "b", "c"]


def _case(shape, seed):
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(3, *shape)), (0, 2, 2, 2))
    labels = np.where(smooth.max(axis=0) > 0.05, smooth.argmax(axis=0) + 1, 0).astype(np.uint8)
    labels[..., :2] = np.where(labels[..., :2] == 3, 0, labels[..., :2])  # a class off an edge
    maps = {"entropy": rng.random(shape, dtype=np.float32),
            "mutual_information": rng.random(shape, dtype=np.float32) * 0.1}
    return labels, maps


def _assert_same(got, expected):
    assert got.keys() == expected.keys()
    assert got["band_width_voxels"] == expected["band_width_voxels"]
    for group in ("classes", "case"):
        assert list(got[group]) == list(expected[group])
    for name, entry in [*got["classes"].items(), ("case", got["case"])]:
        oracle = expected["case"] if name == "case" else expected["classes"][name]
        assert list(entry) == list(oracle)
        for key, value in entry.items():
            if value is None or isinstance(value, int):
                assert value == oracle[key], (name, key)
            else:
                assert value == pytest.approx(oracle[key], rel=1e-9, abs=1e-12), (name, key)


@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize("slab", [1, 3, 7, 40])
@pytest.mark.parametrize("band", [1, 3])
def test_slab_by_slab_equals_the_whole_grid(axis, slab, band):
    labels, maps = _case((23, 19, 31), seed=axis * 10 + slab)
    expected = map_statistics(labels, maps, NAMES, band)
    streamed = StreamedMapStatistics(labels.shape[axis], axis, NAMES, list(maps), band)
    for start in range(0, labels.shape[axis], slab):
        rows = (slice(None),) * axis + (slice(start, start + slab),)
        streamed.push(start, labels[rows], {k: v[rows] for k, v in maps.items()})
    _assert_same(streamed.result(), expected)


def test_a_class_absent_and_an_empty_band_are_reported_as_the_oracle_does():
    labels = np.zeros((12, 10, 9), np.uint8)
    labels[:, :, :] = 1  # class a fills the grid: no boundary inside it, so an empty band
    maps = {"entropy": np.full(labels.shape, 0.25, np.float32)}
    expected = map_statistics(labels, maps, NAMES, 2)
    streamed = StreamedMapStatistics(9, 2, NAMES, ["entropy"], 2)
    for start in range(0, 9, 4):
        streamed.push(start, labels[:, :, start:start + 4],
                      {"entropy": maps["entropy"][:, :, start:start + 4]})
    got = streamed.result()
    _assert_same(got, expected)
    assert got["classes"]["b"]["mean_entropy"] is None
    assert got["classes"]["a"]["boundary_voxels"] == 0


def test_rows_out_of_order_or_missing_are_refused():
    streamed = StreamedMapStatistics(6, 0, NAMES, ["entropy"], 1)
    block = np.zeros((2, 3, 3), np.uint8)
    streamed.push(0, block, {"entropy": block.astype(np.float32)})
    with pytest.raises(ValueError, match="rows from 4"):
        streamed.push(4, block, {"entropy": block.astype(np.float32)})
    with pytest.raises(RuntimeError, match="2 of 6 rows"):
        streamed.result()
