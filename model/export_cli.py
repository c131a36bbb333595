"""`sfpc export`: checkpoint -> ONNX graphs + metadata, and optionally a Triton model repository."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from sfpc.inference.contract import UNCERTAINTY_METHODS


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sfpc export",
        description="Export encoder + segmentation decoder to ONNX (seg.onnx), the FLPM "
                    "multi-sample uncertainty graph (seg_uncertainty.onnx), the weights both "
                    "graphs share (weights.bin) and sfpc_model.json; with --triton-repo, also "
                    "write a Triton model repository.")
    p.add_argument("--checkpoint", required=True, help="best.pt from `sfpc train`")
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--name", help="model name (default: the training run's --name)")
    p.add_argument("--model-version", help="model version string for the metadata")
    p.add_argument("--m", type=int, default=None, help="perturbation samples (default: training M)")
    p.add_argument("--uncertainty-graph", choices=("folded", "stacked"), default="folded",
                   help="folded (default): FLPM folded into the classifier weights, one batched "
                        "matmul for all M samples; stacked: the M perturbed feature maps "
                        "through the classifier, as the equations are written. Same outputs")
    p.add_argument("--tau", type=float, default=None,
                   help="FLPM range of the uncertainty graph (default: the training tau; "
                        "docs/uncertainty.md on fitting it for serving)")
    p.add_argument("--uncertainty-method", default="flpm",
                   choices=[m for m in UNCERTAINTY_METHODS if m != "ensemble"],
                   help="what the uncertainty graph samples: flpm (default, the paper's FLPM "
                        "before the classifier), flpm_stages (FLPM at more decoder depths; "
                        "needs --stage-spreads), mc_dropout (M encoder-dropout samples, "
                        "deterministic masks). docs/uncertainty.md compares them")
    p.add_argument("--stage-spreads", type=Path,
                   help="JSON of `sfpc stage-spreads` (for --uncertainty-method flpm_stages)")
    p.add_argument("--ensemble", nargs="+", metavar="CHECKPOINT",
                   help="more checkpoints: export --checkpoint and these as one deep ensemble "
                        "(one graph; the members' mean probabilities and their spread)")
    p.add_argument("--fixed-spatial", action="store_true",
                   help="fix spatial dims to the patch size (TensorRT plans like this)")
    p.add_argument("--inline-weights", action="store_true",
                   help="keep each graph's weights inside it (single-file graphs, the weights "
                        "stored twice) instead of one weights.bin the graphs share")
    p.add_argument("--check", action="store_true",
                   help="compare ONNX Runtime with PyTorch on a random batch and print the error")
    t = p.add_argument_group("Triton")
    t.add_argument("--triton-repo", type=Path, help="also write a Triton model repository here")
    t.add_argument("--max-batch-size", type=int, default=8)
    t.add_argument("--instances", type=int, default=1)
    t.add_argument("--gpu", action="store_true", help="KIND_GPU instances (default KIND_CPU)")
    t.add_argument("--fp16", action="store_true", help="TensorRT FP16 accelerator (needs --gpu)")
    t.add_argument("--trt-cache", help="TensorRT engine cache folder on the Triton host")
    a = p.parse_args(argv)
    if a.fp16 and not a.gpu:
        p.error("--fp16 (TensorRT) runs on GPU instances: add --gpu")

    if a.uncertainty_method == "flpm_stages" and not a.stage_spreads:
        p.error("--uncertainty-method flpm_stages needs --stage-spreads (sfpc stage-spreads)")
    import numpy as np

    from sfpc.model.export import export_ensemble, export_model, load_checkpoint, parity

    if a.ensemble:
        try:
            written = export_ensemble([a.checkpoint, *a.ensemble], a.out,
                                      dynamic_spatial=not a.fixed_spatial, name=a.name,
                                      version=a.model_version, inline_weights=a.inline_weights)
        except ValueError as exc:  # members that serve differently
            p.error(str(exc))
        print(json.dumps({"export": a.out, "graphs": written.graphs,
                          "members": len(a.ensemble) + 1}, indent=2))
        return 0
    spreads = None
    if a.stage_spreads:
        from sfpc.model.uncertainty_heads import spreads_from_json

        spreads = spreads_from_json(json.loads(a.stage_spreads.read_text())["depths"])
    net, meta = load_checkpoint(a.checkpoint)
    try:
        written = export_model(net, meta, a.out, m=a.m, dynamic_spatial=not a.fixed_spatial,
                               name=a.name, version=a.model_version,
                               uncertainty_graph=a.uncertainty_graph, serving_tau=a.tau,
                               inline_weights=a.inline_weights,
                               uncertainty_method=a.uncertainty_method, stage_spreads=spreads)
    except ValueError as exc:  # a method this network cannot run (e.g. no dropout, no FLPM)
        p.error(str(exc))
    report: dict = {"export": a.out, "graphs": written.graphs, "weights": written.weights}
    if a.check:
        x = np.random.default_rng(0).normal(size=(2, meta.in_channels, *meta.patch_size))
        report["max_abs_diff"] = parity(net, a.out, x.astype(np.float32),
                                        temperature=float(written.temperature or 1.0))
    if a.triton_repo:
        from sfpc.model.triton_repo import write_triton_repository

        files = write_triton_repository(
            a.out, a.triton_repo, written.name, max_batch_size=a.max_batch_size,
            instance_count=a.instances, instance_kind="KIND_GPU" if a.gpu else "KIND_CPU",
            tensorrt_fp16=a.fp16, trt_engine_cache_dir=a.trt_cache)
        report["triton_repo"] = [str(f) for f in files]
    print(json.dumps(report, indent=2))
    return 0
