"""The numpy sliding window against ``monai.inferers.sliding_window_inference`` (the oracle) with
a fixed random conv net wrapped for both, plus slice-wise batching and input checks."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from sfpc.inference.sliding_window import (
    gaussian_importance_map,
    scan_interval,
    slicewise_inference,
    sliding_window_inference,
    window_starts,
)

torch = pytest.importorskip("torch")
monai_inferers = pytest.importorskip("monai.inferers")
monai_data_utils = pytest.importorskip("monai.data.utils")

ATOL = 1e-5


def conv_net(spatial_dims: int, in_ch: int, out_ch: int, seed: int) -> torch.nn.Module:
    """Two convs with a nonlinearity: a window's border sees the zero padding differently from its
    centre, so a misplaced window or weight shows up in the blend."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    net = torch.nn.Sequential(
        conv(in_ch, 4, 3, padding=1), torch.nn.Tanh(), conv(4, out_ch, 3, padding=1)
    )
    return net.eval()


class TwoHeads(torch.nn.Module):
    """Probabilities (K channels) and their normalised entropy (1 channel), like the serving
    model's mean_probs / mean_entropy outputs."""

    def __init__(self, net: torch.nn.Module, k: int):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p = torch.softmax(self.net(x), dim=1)
        ent = -(p * torch.log(p)).sum(dim=1, keepdim=True) / math.log(self.k)
        return {"mean_probs": p, "mean_entropy": ent}


def numpy_predict(module: torch.nn.Module, calls: list[int] | None = None):
    @torch.no_grad()
    def predict(batch: np.ndarray):
        assert batch.dtype == np.float32
        if calls is not None:
            calls.append(batch.shape[0])
        out = module(torch.from_numpy(batch))
        if isinstance(out, dict):
            return {k: v.numpy() for k, v in out.items()}
        return out.numpy()

    return predict


def monai_sw(image: np.ndarray, roi, module, overlap, sw_batch_size, sigma_scale=0.125):
    with torch.no_grad():
        out = monai_inferers.sliding_window_inference(
            torch.from_numpy(image)[None],
            roi,
            sw_batch_size,
            module,
            overlap=overlap,
            mode="gaussian",
            sigma_scale=sigma_scale,
            padding_mode="constant",
        )
    if isinstance(out, dict):
        return {k: v[0].numpy() for k, v in out.items()}
    return out[0].numpy()


@pytest.mark.parametrize(
    ("roi", "sigma_scale"),
    [((16, 16), 0.125), ((7, 9, 5), 0.125), ((12, 5, 8), (0.1, 0.2, 0.3)), ((3, 3, 3), 0.01)],
)
def test_gaussian_importance_map_matches_monai(roi, sigma_scale):
    ours = gaussian_importance_map(roi, sigma_scale)
    ref = monai_data_utils.compute_importance_map(roi, mode="gaussian", sigma_scale=sigma_scale)
    assert ours.dtype == np.float32 and ours.shape == tuple(roi)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=1e-7)


CASES_2D = [
    # (image spatial size, roi, overlap): divisible, not divisible by the stride, image smaller
    # than the roi on one axis, on both axes, and an overlap giving an odd stride.
    ((32, 32), (16, 16), 0.5),
    ((37, 29), (16, 12), 0.5),
    ((10, 41), (16, 16), 0.5),
    ((9, 7), (12, 12), 0.25),
    ((45, 38), (20, 14), 0.3),
]


@pytest.mark.parametrize(("size", "roi", "overlap"), CASES_2D)
def test_2d_matches_monai(size, roi, overlap):
    net = conv_net(2, 2, 3, seed=0)
    image = np.random.default_rng(1).standard_normal((2, *size)).astype(np.float32)
    out = sliding_window_inference(
        image, roi, numpy_predict(net), overlap=overlap, sw_batch_size=3
    )
    ref = monai_sw(image, roi, net, overlap, 3)
    assert list(out) == ["out"]
    assert out["out"].shape == (3, *size) and out["out"].dtype == np.float32
    np.testing.assert_allclose(out["out"], ref, atol=ATOL)


CASES_3D = [
    ((20, 18, 22), (8, 8, 8), 0.5),
    ((21, 13, 10), (8, 16, 6), 0.5),  # smaller than roi on axis 1; 21 not a stride multiple
    ((17, 11, 9), (10, 10, 10), 0.25),  # smaller on the last axis only
]


@pytest.mark.parametrize(("size", "roi", "overlap"), CASES_3D)
def test_3d_matches_monai(size, roi, overlap):
    net = conv_net(3, 1, 2, seed=2)
    image = np.random.default_rng(3).standard_normal((1, *size)).astype(np.float32)
    out = sliding_window_inference(image, roi, numpy_predict(net), overlap=overlap)
    ref = monai_sw(image, roi, net, overlap, 4)
    np.testing.assert_allclose(out["out"], ref, atol=ATOL)


def test_multi_output_dict_matches_monai():
    heads = TwoHeads(conv_net(3, 1, 3, seed=4), k=3)
    image = np.random.default_rng(5).standard_normal((1, 19, 14, 12)).astype(np.float32)
    out = sliding_window_inference(image, (8, 16, 8), numpy_predict(heads), sw_batch_size=2)
    ref = monai_sw(image, (8, 16, 8), heads, 0.5, 2)
    assert sorted(out) == ["mean_entropy", "mean_probs"]
    assert out["mean_probs"].shape == (3, 19, 14, 12)
    assert out["mean_entropy"].shape == (1, 19, 14, 12)
    for name in ref:
        np.testing.assert_allclose(out[name], ref[name], atol=ATOL)
    # Blending convex weights keeps probabilities summing to one.
    np.testing.assert_allclose(out["mean_probs"].sum(axis=0), 1.0, atol=1e-5)


def test_constant_mode_matches_monai():
    net = conv_net(2, 1, 2, seed=6)
    image = np.random.default_rng(7).standard_normal((1, 30, 23)).astype(np.float32)
    out = sliding_window_inference(
        image, (16, 16), numpy_predict(net), overlap=0.25, mode="constant"
    )
    with torch.no_grad():
        ref = monai_inferers.sliding_window_inference(
            torch.from_numpy(image)[None], (16, 16), 4, net, overlap=0.25, mode="constant"
        )[0].numpy()
    np.testing.assert_allclose(out["out"], ref, atol=ATOL)


def test_window_placement_matches_monai():
    for size, roi, overlap in [((37, 29), (16, 12), 0.5), ((64, 16), (16, 16), 0.75)]:
        interval = scan_interval(size, roi, overlap)
        ours = window_starts(size, roi, interval)
        ref = monai_data_utils.dense_patch_slices(size, roi, interval)
        assert ours == [tuple(s.start for s in win) for win in ref]
    # Last window flush with the edge: 37 with roi 16 and stride 8 -> starts 0, 8, 16, 21.
    assert sorted({c[0] for c in window_starts((37, 29), (16, 12), (8, 6))}) == [0, 8, 16, 21]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slicewise_matches_per_slice_monai(axis):
    heads = TwoHeads(conv_net(2, 2, 3, seed=8), k=3)
    volume = np.random.default_rng(9).standard_normal((2, 14, 11, 9)).astype(np.float32)
    roi = (8, 8)
    out = slicewise_inference(volume, axis, roi, numpy_predict(heads), sw_batch_size=5)
    for name, channels in (("mean_probs", 3), ("mean_entropy", 1)):
        assert out[name].shape == (channels, 14, 11, 9)
        assert out[name].flags.c_contiguous
    for s in range(volume.shape[axis + 1]):
        image = np.take(volume, s, axis=axis + 1)
        ref = monai_sw(np.ascontiguousarray(image), roi, heads, 0.5, 4)
        for name in ref:
            np.testing.assert_allclose(np.take(out[name], s, axis=axis + 1), ref[name], atol=ATOL)


def test_slicewise_batches_windows_across_slices():
    net = conv_net(2, 1, 2, seed=10)
    volume = np.random.default_rng(11).standard_normal((1, 24, 20, 100)).astype(np.float32)
    calls: list[int] = []
    progress: list[tuple[int, int]] = []
    out = slicewise_inference(
        volume, 2, (24, 20), numpy_predict(net, calls), sw_batch_size=16,
        progress=lambda done, total: progress.append((done, total)),
    )
    # One window per slice: 100 windows in ceil(100 / 16) = 7 calls of 16 and a last of 4.
    assert calls == [16] * 6 + [4]
    assert progress[-1] == (100, 100) and len(progress) == 7
    assert out["out"].shape == (2, 24, 20, 100)

    # Several windows per slice are batched across slice boundaries too. A 24 x 20 plane with roi
    # 16 x 12 (strides 8, 6) has 2 x 3 windows; 3 slices make 18 windows in batches of 5.
    calls.clear()
    slicewise_inference(volume[..., :3], 2, (16, 12), numpy_predict(net, calls), sw_batch_size=5)
    assert calls == [5, 5, 5, 3]


def test_progress_and_batching_in_3d():
    net = conv_net(3, 1, 1, seed=12)
    image = np.zeros((1, 16, 16, 16), np.float32)
    calls: list[int] = []
    progress: list[tuple[int, int]] = []
    sliding_window_inference(
        image, (8, 8, 8), numpy_predict(net, calls), sw_batch_size=4,
        progress=lambda d, t: progress.append((d, t)),
    )
    # Stride 4 on 16 with roi 8: starts 0, 4, 8 per axis -> 27 windows.
    assert sum(calls) == 27 and calls == [4] * 6 + [3]
    assert progress == [(min(4 * i, 27), 27) for i in range(1, 8)]


def test_rejects_bad_predict_output_and_arguments():
    image = np.zeros((1, 10, 10), np.float32)
    with pytest.raises(ValueError, match="expected"):
        sliding_window_inference(image, (8, 8), lambda b: np.zeros((b.shape[0], 2, 4, 4)))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(image, (8, 8), lambda b: b, overlap=1.0)
    with pytest.raises(ValueError, match="mode"):
        sliding_window_inference(image, (8, 8), lambda b: b, mode="linear")
    with pytest.raises(ValueError, match="spatial axes"):
        sliding_window_inference(image, (8, 8, 8), lambda b: b)
    with pytest.raises(ValueError, match="axis"):
        slicewise_inference(np.zeros((1, 4, 4, 4), np.float32), 3, (4, 4), lambda b: b)


def test_identity_predict_returns_the_image():
    # Weighted average of identical values is the value itself, padding cropped back.
    image = np.random.default_rng(13).standard_normal((2, 13, 6, 9)).astype(np.float32)
    out = sliding_window_inference(image, (8, 8, 8), lambda b: {"x": b.copy()}, overlap=0.5)
    np.testing.assert_allclose(out["x"], image, rtol=1e-5, atol=1e-6)


def test_module_does_not_import_torch():
    code = (
        "import sys; import sfpc.inference.sliding_window; "
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
