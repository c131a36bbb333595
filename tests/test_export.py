"""ONNX Runtime equals PyTorch eval output for both exported graphs, 2D/3D, batch 1 and >1."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sfpc.model.export import INPUT_NAME, export_model, parity
from sfpc.model.metadata import ModelMetadata, sha256_file
from sfpc.model.networks import NetConfig, SFPCNet

# Stated tolerance: float32 graphs, same ops; differences come from kernel summation order.
ATOL = 1e-4


def _trained_a_little(spatial_dims: int, patch: list[int]) -> tuple[SFPCNet, ModelMetadata]:
    torch.manual_seed(spatial_dims)
    cfg = NetConfig(spatial_dims=spatial_dims, num_classes=3, channels=(8, 16, 32, 64, 128))
    net = SFPCNet(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    for _ in range(3):  # move BatchNorm statistics and FLPM running spreads off their init
        out = net.forward_train(torch.randn(4, 1, *patch), n_unlabelled=2, m=4)
        loss = out.logits.mean() + out.perturbed.mean() + out.recon.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(net.flpm().running_dmu.abs().sum()) > 0
    meta = ModelMetadata(spatial_dims=spatial_dims, num_classes=3, patch_size=patch,
                         class_names=["bg", "a", "b"])
    return net.eval(), meta


@pytest.mark.parametrize("spatial_dims,patch", [(2, [64, 64]), (3, [32, 32, 32])])
def test_onnx_matches_pytorch(tmp_path, spatial_dims, patch):
    net, meta = _trained_a_little(spatial_dims, patch)
    written = export_model(net, meta, tmp_path)
    assert set(written.graphs) == {"seg", "uncertainty"}
    for g in written.graphs.values():
        assert sha256_file(tmp_path / g["file"]) == g["sha256"]
    assert ModelMetadata.load(tmp_path).graphs == written.graphs
    rng = np.random.default_rng(0)
    for batch, shape in ((1, patch), (3, patch), (2, [p * 2 for p in patch])):
        x = rng.normal(size=(batch, 1, *shape)).astype(np.float32)
        diffs = parity(net, tmp_path, x)
        assert set(diffs) == {"seg.logits", "uncertainty.mean_probs", "uncertainty.mean_entropy"}
        assert max(diffs.values()) < ATOL, diffs


def test_exported_graph_has_no_reconstruction_decoder_and_dynamic_batch(tmp_path):
    net, meta = _trained_a_little(2, [32, 32])
    export_model(net, meta, tmp_path)
    model = onnx.load(tmp_path / "seg.onnx")
    inits = {i.name for i in model.graph.initializer}
    assert not any("recon" in n for n in inits)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == INPUT_NAME
    assert dims[0].dim_param and not dims[0].dim_value  # batch is symbolic
    n_params = sum(np.prod(i.dims) for i in model.graph.initializer)
    seg_only = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("recon"))
    assert n_params <= seg_only + 1000  # constants folded in, no G2 weights
