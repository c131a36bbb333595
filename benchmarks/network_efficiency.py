"""How close ONNX Runtime runs the shipped network to the machine's SGEMM rate (issue 13, goal 4).

The network's arithmetic is counted from the ONNX graph itself (every Conv, ConvTranspose, Gemm
and MatMul, shapes from ONNX shape inference at the batch timed), the reference rate is torch's
single-precision matrix multiply (``torch.mm`` of square matrices, the best of a few sizes) on the
same number of threads, and ONNX Runtime is timed on the shipped default model's plain graph
under the session settings that could matter on a CPU: batch size, graph optimisation level,
spinning of the intra-op thread pool, denormals flushed to zero. Every setting runs in turns
(interleaved rounds, medians), so that the machine's noise falls on all of them alike.

    .venv/bin/python benchmarks/network_efficiency.py --threads 1 2 \\
        --json benchmarks/network_efficiency.json

Prints, per thread count, the SGEMM rate, and per setting the network's GFLOP/s and its share
of the SGEMM rate; exits 1 when no setting reaches ``--goal`` (0.80) of it on the most threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sfpc.inference.contract import (
    DEFAULT_MODEL_DIR,
    SEG_GRAPH,
    load_metadata,
    read_graph_bytes,
    read_weights_bytes,
)

# (name, batch, session config): the settings compared. ORT's default is ENABLE_ALL with
# spinning threads and its memory pattern; "basic" keeps the graph as exported but for
# constant folding.
SETTINGS = (
    ("default b8", 8, {}),
    ("default b16", 16, {}),
    ("default b32", 32, {}),
    ("no spinning b16", 16, {"session.intra_op.allow_spinning": "0"}),
    ("denormals to zero b16", 16, {"session.set_denormal_as_zero": "1"}),
    ("no memory pattern b16", 16, {"memory_pattern": "0"}),
    ("basic optimisation b16", 16, {"level": "basic"}),
)


def graph_flops(model_bytes: bytes, batch: int, patch: list[int], in_channels: int) -> float:
    """Floating-point operations (2 per multiply-add) of one pass of ``batch`` windows."""
    import onnx
    from onnx import shape_inference

    model = onnx.load_from_string(model_bytes)
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    for dim, value in zip(dims, [batch, in_channels, *patch], strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = value
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for info in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        shape = [d.dim_value for d in info.type.tensor_type.shape.dim]
        if shape and all(shape):
            shapes[info.name] = shape
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    flops = 0.0
    missing = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        y = shapes.get(node.output[0])
        if x is None or w is None or y is None:
            missing.append(node.name)
            continue
        if node.op_type == "Conv":  # w: (C_out, C_in / group, *k); every output sums C_in/g*k
            flops += 2.0 * np.prod(y) * np.prod(w[1:])
        elif node.op_type == "ConvTranspose":  # w: (C_in, C_out / group, *k); per input voxel
            flops += 2.0 * np.prod(x) * np.prod(w[1:])
        else:
            flops += 2.0 * np.prod(y) * x[-1]
    if missing:
        raise RuntimeError(f"shape inference left {len(missing)} matrix nodes unsized: "
                           f"{missing[:3]}")
    return float(flops)


def sgemm_rate(threads: int, seconds: float) -> float:
    """Best GFLOP/s of torch.mm on square float32 matrices (several sizes) on ``threads``."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        best = max(best, 2.0 * n ** 3 / statistics.median(times) / 1e9)
    return best


def make_session(model_bytes: bytes, threads: int, config: dict[str, str],
                 weights: tuple[str, bytes] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if weights is not None:  # an export whose graphs share one weights file (verified bytes)
        name, blob = weights
        options.add_external_initializers_from_files_in_memory([name], [blob], [len(blob)])
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for key, value in config.items():
        if key == "memory_pattern":
            options.enable_mem_pattern = value == "1"
        elif key == "level":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        else:
            options.add_session_config_entry(key, value)
    return ort.InferenceSession(model_bytes, sess_options=options,
                                providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR,
                   help="export directory (default: the embedded default model)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="intra-op thread counts to measure (default 1 2)")
    p.add_argument("--rounds", type=int, default=7,
                   help="interleaved rounds over the settings; medians are quoted (default 7)")
    p.add_argument("--windows", type=int, default=64,
                   help="windows per timed call sequence, whatever the batch (default 64)")
    p.add_argument("--goal", type=float, default=0.80,
                   help="share of the SGEMM rate to reach on the most threads (default 0.80)")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args(argv)

    meta = load_metadata(a.model)
    model_bytes = read_graph_bytes(a.model, meta, SEG_GRAPH)
    weights = read_weights_bytes(a.model, meta)
    patch = [int(n) for n in meta.patch_size]
    rng = np.random.default_rng(0)
    flops = {batch: graph_flops(model_bytes, batch, patch, meta.in_channels)
             for batch in sorted({b for _, b, _ in SETTINGS})}
    print(f"model {meta.name} {meta.version}: {flops[8] / 1e9:.2f} GFLOP per batch of 8 "
          f"windows of {'x'.join(map(str, patch))}")
    results: dict[str, dict] = {}
    for threads in a.threads:
        peak = sgemm_rate(threads, seconds=1.0)
        sessions = {name: (make_session(model_bytes, threads, config, weights), batch)
                    for name, batch, config in SETTINGS}
        feeds = {batch: rng.standard_normal((batch, meta.in_channels, *patch),
                                            dtype=np.float32)
                 for _, batch, _ in SETTINGS}
        for session, batch in sessions.values():  # warm-up: allocation, layout transforms
            session.run(None, {session.get_inputs()[0].name: feeds[batch]})
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(a.rounds):
            for name, (session, batch) in sessions.items():
                feed = {session.get_inputs()[0].name: feeds[batch]}
                calls = max(1, a.windows // batch)
                t0 = time.perf_counter()
                for _ in range(calls):
                    session.run(None, feed)
                times[name].append((time.perf_counter() - t0) / (calls * batch))
        rows = {}
        for name, batch, _ in SETTINGS:
            per_window = statistics.median(times[name])
            rate = flops[batch] / batch / per_window / 1e9
            rows[name] = {"batch": batch, "ms_per_window": per_window * 1e3,
                          "gflops": rate, "share_of_sgemm": rate / peak}
        results[str(threads)] = {"sgemm_gflops": peak, "settings": rows}
        print(f"\n{threads} thread(s): torch SGEMM {peak:.1f} GFLOP/s")
        print("| setting | batch | ms / window | GFLOP/s | share of SGEMM |")
        print("|---|---|---|---|---|")
        for name, row in rows.items():
            print(f"| {name} | {row['batch']} | {row['ms_per_window']:.2f} | "
                  f"{row['gflops']:.1f} | {row['share_of_sgemm']:.2f} |")
    most = str(max(a.threads))
    best_name, best = max(results[most]["settings"].items(),
                          key=lambda kv: kv[1]["share_of_sgemm"])
    met = best["share_of_sgemm"] >= a.goal
    print(f"\nbest on {most} thread(s): {best_name}, {best['share_of_sgemm']:.2f} of SGEMM "
          f"(goal {a.goal:.2f}): {'met' if met else 'MISSED'}")
    if a.json:
        a.json.write_text(json.dumps({
            "command": " ".join(["benchmarks/network_efficiency.py", *(argv or sys.argv[1:])]),
            "model": f"{meta.name} {meta.version}", "gflop_per_window": flops[8] / 8 / 1e9,
            "rounds": a.rounds, "threads": results}, indent=1) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
