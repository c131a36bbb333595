"""The exported graphs against PyTorch and against FLPM's equations written out by hand.

- seg.onnx: ONNX Runtime equals the PyTorch network's eval logits.
- weights.bin: the initializers of both graphs, each distinct tensor once, against the inline
  export of the same net (same bytes, same outputs bit for bit).
- seg_uncertainty.onnx, both graph kinds ("folded", the default, and "stacked"): equal to
  PyTorch's stacked UncertaintyHead (``parity``) and to a float64 NumPy transcription of the
  paper's equations 1-3 with METHOD.md's serving choices (running dMu/dSigma buffers, the eps grid
  -tau, -tau/3, tau/3, tau), the 1x1 classifier, softmax(logits / T) and the natural-log entropy;
  2D and 3D, batch 1 and >1, a temperature per image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sfpc.errors import BackendError
from sfpc.inference.contract import INPUT_NAME, TEMPERATURE_NAME, ModelMetadata, sha256_file
from sfpc.model import export_cli
from sfpc.model.export import export_model, parity
from sfpc.model.networks import SFPCNet
from sfpc.model.shared_weights import INLINE_BELOW, WEIGHTS_FILE, convert_export
from tests.support.models import train_tiny_net

# Stated tolerance: float32 graphs, same ops; differences come from kernel summation order.
ATOL = 1e-4
GRAPHS = ("folded", "stacked")
CASES = {2: [64, 64], 3: [32, 32, 32]}
# Larger than the patch and not square: the spatial axes are dynamic (multiples of 16).
OTHER_SHAPE = {2: [64, 96], 3: [32, 32, 48]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_a_little(spatial_dims: int, patch: list[int]) -> tuple[SFPCNet, ModelMetadata]:
    # BatchNorm statistics and FLPM running spreads off their init (tests.support.models).
    net = train_tiny_net(spatial_dims, 3, patch, channels=(8, 16, 32, 64, 128), steps=3,
                         seed=spatial_dims)
    assert float(net.flpm().running_dmu.abs().sum()) > 0
    meta = ModelMetadata(spatial_dims=spatial_dims, num_classes=3, patch_size=patch,
                         class_names=["bg", "a", "b"])
    return net.eval(), meta


@pytest.fixture(scope="module")
def nets() -> dict[int, tuple[SFPCNet, ModelMetadata]]:
    return {d: _trained_a_little(d, patch) for d, patch in CASES.items()}


@pytest.fixture(scope="module")
def exports(nets, tmp_path_factory) -> dict[tuple[int, str], Path]:
    out = {}
    for d, (net, meta) in nets.items():
        for graph in GRAPHS:
            folder = tmp_path_factory.mktemp(f"export{d}d_{graph}")
            export_model(net, meta, folder, uncertainty_graph=graph)
            out[d, graph] = folder
    return out


def _equations(net: SFPCNet, x: np.ndarray, m: int, temperature: np.ndarray,
               tau: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean probabilities and mean entropy of M perturbed predictions, by hand in float64."""
    flpm = net.flpm()
    tau = flpm.tau if tau is None else tau
    grid = np.linspace(-tau, tau, m)  # METHOD.md: evenly spaced over [-tau, tau]
    if m == 4:
        np.testing.assert_allclose(grid, [-tau, -tau / 3, tau / 3, tau], rtol=1e-12)
    with torch.no_grad():
        f = net.seg_features(torch.from_numpy(x)).double().numpy()
    w = net.classifier.weight.detach().double().numpy()
    w = w.reshape(w.shape[0], w.shape[1])
    bias = net.classifier.bias.detach().double().numpy()
    dmu = flpm.running_dmu.double().numpy()
    dsigma = flpm.running_dsigma.double().numpy()
    b, c, *spatial = f.shape
    f = f.reshape(b, c, -1)  # (B, C, N)
    mean = f.mean(axis=2, keepdims=True)
    std = np.sqrt(f.var(axis=2, keepdims=True) + 1e-6)
    t = temperature.astype(np.float64).reshape(b, 1, 1)
    probs, entropies = [], []
    for eps in grid:
        # Eq. 1-3: f' = (s + eps dSigma_c) (f - m) / s + (m + eps dMu_c)
        perturbed = ((std + eps * dsigma[:, None]) * (f - mean) / std
                     + (mean + eps * dmu[:, None]))
        logits = w @ perturbed + bias[:, None]  # the 1x1 conv: (B, K, N)
        z = logits / t
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        probs.append(p)
        entropies.append(-(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1, keepdims=True))
    shape = (b, -1, *spatial)
    return np.mean(probs, axis=0).reshape(shape), np.mean(entropies, axis=0).reshape(shape)


def _session(folder: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / "seg_uncertainty.onnx"), sess_options=options,
                                providers=["CPUExecutionProvider"])


def _run_uncertainty(sess: ort.InferenceSession, x: np.ndarray, t: np.ndarray
                     ) -> list[np.ndarray]:
    return sess.run(["mean_probs", "mean_entropy"], {INPUT_NAME: x, TEMPERATURE_NAME: t})


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("spatial_dims", sorted(CASES))
def test_onnx_matches_pytorch_and_the_equations(nets, exports, spatial_dims, graph):
    net, _ = nets[spatial_dims]
    folder = exports[spatial_dims, graph]
    written = ModelMetadata.load(folder)
    assert set(written.graphs) == {"seg", "uncertainty"}
    assert written.uncertainty_graph == graph
    for g in written.graphs.values():
        assert sha256_file(folder / g["file"]) == g["sha256"]
    tau = net.flpm().tau
    assert written.perturbation["eps_grid"] == pytest.approx([-tau, -tau / 3, tau / 3, tau])
    patch = CASES[spatial_dims]
    rng = np.random.default_rng(spatial_dims)
    x = rng.normal(size=(2, 1, *patch)).astype(np.float32)
    diffs = parity(net, folder, x, temperature=1.3)
    assert set(diffs) == {"seg.logits", "uncertainty.mean_probs", "uncertainty.mean_entropy"}
    assert max(diffs.values()) < ATOL, diffs
    sess = _session(folder)
    for batch, shape, temperatures in (
        (1, patch, [1.0]),
        (3, patch, [0.5, 1.0, 2.5]),
        (2, OTHER_SHAPE[spatial_dims], [1.7, 0.8]),
    ):
        x = rng.normal(size=(batch, 1, *shape)).astype(np.float32)
        t = np.asarray(temperatures, dtype=np.float32)[:, None]
        mean_probs, mean_entropy = _run_uncertainty(sess, x, t)
        ref_probs, ref_entropy = _equations(net, x, written.perturbation["M"], t)
        assert mean_probs.shape == (batch, 3, *shape) and mean_entropy.shape == (batch, 1, *shape)
        np.testing.assert_allclose(mean_probs, ref_probs, atol=ATOL)
        np.testing.assert_allclose(mean_entropy, ref_entropy, atol=ATOL)


def test_serving_tau_changes_only_the_uncertainty_graph(nets, exports, tmp_path):
    net, meta = nets[2]
    trained = net.flpm().tau
    export_model(net, meta, tmp_path, serving_tau=0.5)
    written = ModelMetadata.load(tmp_path)
    assert net.flpm().tau == trained  # the network is left as it was
    assert written.perturbation["tau"] == 0.5
    assert written.perturbation["training_tau"] == pytest.approx(trained)
    assert written.perturbation["eps_grid"] == pytest.approx([-0.5, -0.5 / 3, 0.5 / 3, 0.5])
    x = np.random.default_rng(5).normal(size=(2, 1, *CASES[2])).astype(np.float32)
    t = np.ones((2, 1), dtype=np.float32)
    probs, entropy = _run_uncertainty(_session(tmp_path), x, t)
    ref_probs, ref_entropy = _equations(net, x, 4, t, tau=0.5)
    np.testing.assert_allclose(probs, ref_probs, atol=ATOL)
    np.testing.assert_allclose(entropy, ref_entropy, atol=ATOL)
    old_probs, _ = _run_uncertainty(_session(exports[2, "folded"]), x, t)
    assert np.abs(probs - old_probs).max() > 10 * ATOL  # a wider range, another answer
    seg = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"])
    old = ort.InferenceSession(str(exports[2, "folded"] / "seg.onnx"),
                               providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(seg.run(None, {INPUT_NAME: x})[0],
                                  old.run(None, {INPUT_NAME: x})[0])


def test_temperature_changes_the_uncertainty_outputs(nets, exports):
    # Guards the oracle comparison above against a graph that ignores its temperature input.
    net, _ = nets[2]
    x = np.random.default_rng(5).normal(size=(2, 1, *CASES[2])).astype(np.float32)
    for graph in GRAPHS:
        sess = _session(exports[2, graph])
        at_1 = _run_uncertainty(sess, x, np.ones((2, 1), np.float32))
        at_3 = _run_uncertainty(sess, x, np.full((2, 1), 3.0, np.float32))
        assert np.abs(at_1[0] - at_3[0]).max() > 1e-2
        # A higher temperature flattens every sample's softmax, so each sample's entropy rises.
        assert np.all(at_3[1] >= at_1[1] - 1e-6)


@pytest.mark.parametrize("graph", GRAPHS)
def test_uncertainty_graph_inputs_share_the_batch_axis(exports, graph):
    model = onnx.load(exports[3, graph] / "seg_uncertainty.onnx")
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == [INPUT_NAME, TEMPERATURE_NAME]
    image = [d.dim_param or d.dim_value for d in inputs[INPUT_NAME].shape.dim]
    temperature = [d.dim_param or d.dim_value for d in inputs[TEMPERATURE_NAME].shape.dim]
    assert inputs[TEMPERATURE_NAME].elem_type == onnx.TensorProto.FLOAT
    assert isinstance(image[0], str) and temperature == [image[0], 1]


def test_folded_graph_runs_no_classifier_conv(exports):
    """Folded: FLPM and the 1x1 classifier become one batched MatMul on the clean features."""
    def ops(path: Path) -> list[str]:
        return [node.op_type for node in onnx.load(path).graph.node]

    seg = ops(exports[2, "folded"] / "seg.onnx")
    folded = ops(exports[2, "folded"] / "seg_uncertainty.onnx")
    stacked = ops(exports[2, "stacked"] / "seg_uncertainty.onnx")
    assert stacked.count("Conv") == seg.count("Conv")
    assert folded.count("Conv") == seg.count("Conv") - 1
    assert folded.count("MatMul") >= 1


def test_unknown_uncertainty_graph_is_refused(nets, tmp_path):
    net, meta = nets[2]
    with pytest.raises(ValueError, match="uncertainty_graph must be one of"):
        export_model(net, meta, tmp_path, uncertainty_graph="looped")


def _checkpoint(net: SFPCNet, meta: ModelMetadata, path: Path) -> Path:
    """A checkpoint as `sfpc train` writes it, with the fields `sfpc export` reads."""
    torch.save({"net_config": net.cfg.to_dict(), "model": net.state_dict(),
                "metadata": meta.to_dict()}, path)
    return path


def test_export_cli_records_the_graph_kind_and_checks_parity(nets, tmp_path, capsys):
    net, meta = nets[3]
    checkpoint = _checkpoint(net, meta, tmp_path / "best.pt")
    out = tmp_path / "export"
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out),
                            "--uncertainty-graph", "stacked", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert max(report["max_abs_diff"].values()) < ATOL
    assert ModelMetadata.load(out).uncertainty_graph == "stacked"
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert ModelMetadata.load(out).uncertainty_graph == "folded"


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


# --- one weights file for both graphs -----------------------------------------------------------
def _initializers(path: Path) -> list[onnx.TensorProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.initializer)


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


@pytest.fixture(scope="module")
def inline_exports(nets, tmp_path_factory) -> dict[int, Path]:
    out = {}
    for d, (net, meta) in nets.items():
        out[d] = tmp_path_factory.mktemp(f"inline{d}d")
        export_model(net, meta, out[d], inline_weights=True)
    return out


@pytest.mark.parametrize("spatial_dims", sorted(CASES))
def test_weights_are_stored_once_for_both_graphs(exports, inline_exports, spatial_dims):
    """Oracle: the inline export of the same net. Every initializer of >= INLINE_BELOW bytes of
    either graph lives in weights.bin with the inline graph's bytes, each distinct tensor once."""
    shared, inline = exports[spatial_dims, "folded"], inline_exports[spatial_dims]
    files = ("seg.onnx", "seg_uncertainty.onnx")
    assert sorted(p.name for p in shared.iterdir()) == sorted(
        [*files, WEIGHTS_FILE, "sfpc_model.json"])
    assert not (inline / WEIGHTS_FILE).exists()
    meta, inline_meta = ModelMetadata.load(shared), ModelMetadata.load(inline)
    assert meta.weights == {"file": WEIGHTS_FILE, "sha256": sha256_file(shared / WEIGHTS_FILE)}
    assert inline_meta.weights == {}
    blob = (shared / WEIGHTS_FILE).read_bytes()
    distinct: set[tuple[int, tuple[int, ...], bytes]] = set()
    places: dict[tuple[int, tuple[int, ...], bytes], set[tuple[int, int]]] = {}
    for name in files:
        reference = {t.name: t for t in _initializers(inline / name)}
        tensors = _initializers(shared / name)
        assert sorted(t.name for t in tensors) == sorted(reference)
        for tensor in tensors:
            raw = reference[tensor.name].raw_data
            key = (tensor.data_type, tuple(tensor.dims), raw)
            if len(raw) < INLINE_BELOW:
                assert tensor.data_location == onnx.TensorProto.DEFAULT
                assert tensor.raw_data == raw
                continue
            assert tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data
            where = _external(tensor)
            assert where["location"] == WEIGHTS_FILE
            offset, length = int(where["offset"]), int(where["length"])
            assert offset % 64 == 0 and blob[offset:offset + length] == raw
            distinct.add(key)
            places.setdefault(key, set()).add((offset, length))
    # One place per distinct tensor, and the file holds nothing else (alignment aside).
    assert all(len(p) == 1 for p in places.values())
    payload = sum(len(key[2]) for key in distinct)
    assert payload <= len(blob) < payload + 64 * len(distinct)
    # The two graphs share the encoder/decoder: the file is far smaller than their sum inline.
    inline_bytes = sum((inline / name).stat().st_size for name in files)
    shared_bytes = sum(p.stat().st_size for p in shared.iterdir() if p.suffix != ".json")
    assert shared_bytes < 0.6 * inline_bytes


@pytest.mark.parametrize("spatial_dims", sorted(CASES))
def test_shared_weights_give_the_inline_export_outputs_exactly(
        exports, inline_exports, spatial_dims):
    shared, inline = exports[spatial_dims, "folded"], inline_exports[spatial_dims]
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 1, *OTHER_SHAPE[spatial_dims])).astype(np.float32)
    t = np.asarray([[0.7], [1.9]], dtype=np.float32)
    for name in ("seg.onnx", "seg_uncertainty.onnx"):  # loaded by path: weights.bin resolved
        runs = []
        for folder in (shared, inline):
            sess = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
            feeds = {INPUT_NAME: x}
            if len(sess.get_inputs()) == 2:
                feeds[TEMPERATURE_NAME] = t
            runs.append(sess.run(None, feeds))
        for a, b in zip(*runs, strict=True):
            np.testing.assert_array_equal(a, b)
    # The gateway's backend: graphs from verified bytes, the weights handed over in memory.
    from sfpc.inference.backends import OnnxRuntimeBackend

    backends = [OnnxRuntimeBackend(folder, intra_op_threads=1) for folder in (shared, inline)]
    for uncertainty in (False, True):
        a, b = (bk.infer(x, uncertainty=uncertainty, temperature=1.4) for bk in backends)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for bk in backends:
        bk.close()


def test_inline_export_over_a_shared_one_removes_the_weights_file(nets, tmp_path):
    net, meta = nets[2]
    export_model(net, meta, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file()
    written = export_model(net, meta, tmp_path, inline_weights=True)
    assert written.weights == {} and not (tmp_path / WEIGHTS_FILE).exists()
    for name in ("seg.onnx", "seg_uncertainty.onnx"):
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                       for t in _initializers(tmp_path / name))
    x = np.random.default_rng(2).normal(size=(1, 1, *CASES[2])).astype(np.float32)
    assert max(parity(net, tmp_path, x).values()) < ATOL


def test_export_cli_inline_weights_flag(nets, tmp_path, capsys):
    net, meta = nets[2]
    checkpoint = _checkpoint(net, meta, tmp_path / "best.pt")
    out = tmp_path / "export"
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out), "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"]["file"] == WEIGHTS_FILE and (out / WEIGHTS_FILE).is_file()
    assert max(report["max_abs_diff"].values()) < ATOL
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out),
                            "--inline-weights", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == {} and not (out / WEIGHTS_FILE).exists()
    assert max(report["max_abs_diff"].values()) < ATOL


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_convert_export_shares_and_inlines_without_changing_outputs(inline_exports, tmp_path):
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(inline_exports[3], folder)
    before = _snapshot(folder)
    report = convert_export(folder)
    meta = ModelMetadata.load(folder)
    assert report["weights"] == meta.weights and meta.weights["file"] == WEIGHTS_FILE
    assert sha256_file(folder / WEIGHTS_FILE) == meta.weights["sha256"]
    assert report["bytes_after"] < 0.6 * report["bytes_before"]
    for entry in meta.graphs.values():
        assert sha256_file(folder / entry["file"]) == entry["sha256"]
    assert {p.name for p in folder.iterdir()} == {*before, WEIGHTS_FILE}
    # Everything but the graphs' checksums and the weights record is as it was.
    old = json.loads(before["sfpc_model.json"])
    new = json.loads((folder / "sfpc_model.json").read_text())
    assert {k: v for k, v in new.items() if k not in ("graphs", "weights")} == \
        {k: v for k, v in old.items() if k not in ("graphs", "weights")}
    assert convert_export(folder)["weights"] == meta.weights  # sharing twice: the same files
    # Back to inline: single-file graphs again, computing what the original files computed.
    assert convert_export(folder, inline=True)["weights"] == {}
    assert not (folder / WEIGHTS_FILE).exists() and ModelMetadata.load(folder).weights == {}
    x = np.random.default_rng(4).normal(size=(1, 1, *CASES[3])).astype(np.float32)
    t = np.ones((1, 1), np.float32)
    for name in ("seg.onnx", "seg_uncertainty.onnx"):
        ref = ort.InferenceSession(str(inline_exports[3] / name),
                                   providers=["CPUExecutionProvider"])
        now = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        feeds = {INPUT_NAME: x, TEMPERATURE_NAME: t}
        feeds = {i.name: feeds[i.name] for i in ref.get_inputs()}
        for a, b in zip(ref.run(None, feeds), now.run(None, feeds), strict=True):
            np.testing.assert_array_equal(a, b)


def test_convert_export_leaves_the_export_alone_when_outputs_would_change(
        inline_exports, tmp_path, monkeypatch):
    import shutil

    from sfpc.model import shared_weights

    folder = tmp_path / "export"
    shutil.copytree(inline_exports[2], folder)
    before = _snapshot(folder)
    real = shared_weights.share_weights

    def corrupting(scratch, files, **kwargs):
        record = real(scratch, files, **kwargs)
        data = bytearray((Path(scratch) / WEIGHTS_FILE).read_bytes())
        data[:4] = np.float32(1e3).tobytes()  # the first conv weight, as a broken writer would
        (Path(scratch) / WEIGHTS_FILE).write_bytes(bytes(data))
        return record

    monkeypatch.setattr(shared_weights, "share_weights", corrupting)
    with pytest.raises(RuntimeError, match="outputs differ .*left as it was"):
        convert_export(folder)
    assert _snapshot(folder) == before


def test_convert_export_refuses_a_tampered_export(exports, tmp_path):
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(exports[2, "folded"], folder)
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    with pytest.raises(BackendError, match=f"checksum mismatch for .*{WEIGHTS_FILE}"):
        convert_export(folder)
