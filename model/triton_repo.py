"""Write an NVIDIA Triton model repository from an SFPC export directory.

Layout (one model per exported graph; the gateway's TritonBackend relies on these names):

    <repo>/<name>/config.pbtxt                   plain segmentation: image -> logits
    <repo>/<name>/1/model.onnx
    <repo>/<name>/1/weights.bin                  the export's shared weights, when it has them
    <repo>/<name>/sfpc_model.json
    <repo>/<name>_uncertainty/config.pbtxt       image, temperature -> mean_probs, mean_entropy
    <repo>/<name>_uncertainty/1/model.onnx
    <repo>/<name>_uncertainty/1/weights.bin
    <repo>/<name>_uncertainty/sfpc_model.json

The graphs of an export written with shared weights (sfpc.model.shared_weights) point at
``weights.bin`` as ONNX external data, which Triton's ONNX Runtime backend (loading model.onnx by
path) and the Python backend's model.py resolve next to model.onnx: each version folder gets a
copy under the file name the graphs reference.

Tensor names, types and shapes are read from the ONNX graphs themselves (not only from the
metadata), so the configuration cannot drift from what Triton will load. The metadata is also
embedded as a model-config parameter so that a remote client can read class names and patch size
from the server alone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfpc.inference.contract import (
    METADATA_FILE,
    METADATA_PARAMETER,
    SEG_GRAPH,
    UNCERTAINTY_GRAPH,
    UNCERTAINTY_SUFFIX,
    ModelMetadata,
    load_metadata,
    verify_graph_file,
    verify_weights_file,
)

INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")

# ONNX Runtime's tensor type strings -> Triton's data types.
_TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it: dims exclude the batch axis, -1 = dynamic."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def read_graph_io(onnx_path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph, batch axis removed.

    Uses ONNX Runtime (a core dependency) so that the repository can be written on a serving
    machine without the `onnx` package. The batch axis must be dynamic, since every SFPC model is
    served with Triton's batching.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Only the signature is needed: skip graph optimisation to keep this quick for large graphs.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )

    def convert(args: Sequence[Any]) -> list[TensorSpec]:
        specs = []
        for arg in args:
            if arg.type not in _TRITON_TYPES:
                raise ValueError(f"{onnx_path}: tensor {arg.name} has unsupported type {arg.type}")
            shape = list(arg.shape)
            if not shape or isinstance(shape[0], int):
                raise ValueError(
                    f"{onnx_path}: tensor {arg.name} has shape {shape} without a dynamic batch "
                    "axis; export with a dynamic axis 0 so Triton can batch requests"
                )
            dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
            specs.append(TensorSpec(arg.name, _TRITON_TYPES[arg.type], dims))
        return specs

    return convert(session.get_inputs()), convert(session.get_outputs())


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor_block(kind: str, specs: Sequence[TensorSpec]) -> list[str]:
    lines = [f"{kind} ["]
    for i, spec in enumerate(specs):
        dims = ", ".join(str(d) for d in spec.dims)
        comma = "," if i < len(specs) - 1 else ""
        lines += [
            "  {",
            f"    name: {_quote(spec.name)}",
            f"    data_type: {spec.data_type}",
            f"    dims: [ {dims} ]",
            "  }" + comma,
        ]
    lines.append("]")
    return lines


def _shape_list(name: str, batch: int, dims: Sequence[int]) -> str:
    return f"{name}:" + "x".join(str(d) for d in (batch, *dims))


def _shapes(specs: Sequence[TensorSpec], batch: int) -> str:
    """Every input's shape at one batch size, in the comma-separated form of trtexec and of
    ONNX Runtime's TensorRT profile options (both want all dynamic inputs listed)."""
    return ",".join(_shape_list(spec.name, batch, spec.dims) for spec in specs)


def _tensorrt_block(
    fp16: bool,
    engine_cache_dir: str | None,
    profile: tuple[str, str, str] | None,
) -> list[str]:
    params = [("precision_mode", "FP16" if fp16 else "FP32")]
    if engine_cache_dir is not None:
        params += [("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", engine_cache_dir)]
    if profile is not None:
        params += [
            ("trt_profile_min_shapes", profile[0]),
            ("trt_profile_opt_shapes", profile[1]),
            ("trt_profile_max_shapes", profile[2]),
        ]
    lines = [
        "optimization {",
        "  execution_accelerators {",
        "    gpu_execution_accelerator: [",
        "      {",
        '        name: "tensorrt"',
    ]
    lines += [f"        parameters {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in params]
    lines += ["      }", "    ]", "  }", "}"]
    return lines


def model_config_text(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    platform: str = "onnxruntime_onnx",
    max_batch_size: int = 8,
    instance_count: int = 1,
    instance_kind: str = "KIND_CPU",
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_us: int = 1000,
    tensorrt: bool = False,
    tensorrt_fp16: bool = False,
    trt_engine_cache_dir: str | None = None,
    trt_profile: tuple[str, str, str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """A Triton `config.pbtxt` (protobuf text format of inference.ModelConfig).

    `platform` is "onnxruntime_onnx" for the ONNX graphs, or "tensorrt_plan" for an engine built
    with trtexec (see docs/triton.md); the TensorRT accelerator block applies to the former only.
    """
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1: SFPC graphs have a batch axis")
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, not {instance_kind!r}")
    if instance_count < 1:
        raise ValueError("instance_count must be >= 1")
    if tensorrt and platform != "onnxruntime_onnx":
        raise ValueError("the TensorRT accelerator applies to platform onnxruntime_onnx only")
    if tensorrt and instance_kind != "KIND_GPU":
        raise ValueError("TensorRT needs GPU instances: pass instance_kind='KIND_GPU'")
    preferred = sorted(set(preferred_batch_sizes or ()))
    if any(not 1 <= b <= max_batch_size for b in preferred):
        raise ValueError(f"preferred_batch_sizes {preferred} must lie in [1, {max_batch_size}]")

    lines = [
        f"name: {_quote(name)}",
        f"platform: {_quote(platform)}",
        f"max_batch_size: {max_batch_size}",
        *_tensor_block("input", inputs),
        *_tensor_block("output", outputs),
        "dynamic_batching {",
    ]
    if preferred:
        lines.append(f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]")
    lines += [
        f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    if tensorrt:
        lines += _tensorrt_block(tensorrt_fp16, trt_engine_cache_dir, trt_profile)
    if metadata is not None:
        payload = json.dumps(metadata, separators=(",", ":"), sort_keys=True)
        lines += [
            "parameters {",
            f"  key: {_quote(METADATA_PARAMETER)}",
            f"  value: {{ string_value: {_quote(payload)} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _fixed_shape_profile(
    metadata: ModelMetadata, inputs: Sequence[TensorSpec], max_batch_size: int, opt_batch: int
) -> tuple[str, str, str] | None:
    """TensorRT optimisation profile over the batch axis for fixed-size (patch) models.

    With dynamic spatial axes the patch size is only a hint, so no profile is pinned and ONNX
    Runtime builds engines for the shapes it meets (cached when an engine cache is set).
    """
    if metadata.dynamic_spatial or any(d < 0 for s in inputs for d in s.dims):
        return None
    # The uncertainty graph's temperature [B, 1] shares the batch axis, so it is listed too.
    return (
        _shapes(inputs, 1),
        _shapes(inputs, opt_batch),
        _shapes(inputs, max_batch_size),
    )


def write_triton_repository(
    export_dir: str | Path,
    repo_dir: str | Path,
    model_name: str,
    *,
    max_batch_size: int = 8,
    instance_count: int = 1,
    instance_kind: str = "KIND_CPU",
    tensorrt: bool = False,
    tensorrt_fp16: bool = False,
    trt_engine_cache_dir: str | Path | None = None,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_us: int = 1000,
) -> list[Path]:
    """Write the plain and uncertainty models of an export into a Triton repository.

    The TensorRT accelerator (ONNX Runtime's TensorRT execution provider inside Triton) is enabled
    by `tensorrt=True`, or implied by `tensorrt_fp16` or `trt_engine_cache_dir`; it needs
    `instance_kind="KIND_GPU"`. Graph and weights checksums are verified before copying.
    Existing model folders of the same names are replaced. Returns every file written.
    """
    export_dir = Path(export_dir)
    repo_dir = Path(repo_dir)
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"invalid Triton model name {model_name!r}")
    metadata = load_metadata(export_dir)
    embedded = metadata.to_dict()  # what remote clients read from the model configuration
    use_trt = tensorrt or tensorrt_fp16 or trt_engine_cache_dir is not None
    cache_dir = str(trt_engine_cache_dir) if trt_engine_cache_dir is not None else None
    opt_batch = max(preferred_batch_sizes) if preferred_batch_sizes else max_batch_size

    models = [(SEG_GRAPH, model_name)]
    if metadata.has_uncertainty:
        models.append((UNCERTAINTY_GRAPH, model_name + UNCERTAINTY_SUFFIX))

    # Every graph is verified and every config rendered before anything is written, so a bad
    # export or option leaves an existing repository untouched.
    weights = verify_weights_file(export_dir, metadata)
    planned: list[tuple[str, Path, str]] = []
    for kind, name in models:
        graph = verify_graph_file(export_dir, metadata, kind)
        inputs, outputs = read_graph_io(graph)
        profile = (
            _fixed_shape_profile(metadata, inputs, max_batch_size, opt_batch) if use_trt else None
        )
        config = model_config_text(
            name,
            inputs,
            outputs,
            max_batch_size=max_batch_size,
            instance_count=instance_count,
            instance_kind=instance_kind,
            preferred_batch_sizes=preferred_batch_sizes,
            max_queue_delay_us=max_queue_delay_us,
            tensorrt=use_trt,
            tensorrt_fp16=tensorrt_fp16,
            trt_engine_cache_dir=cache_dir,
            trt_profile=profile,
            metadata=embedded,
        )
        planned.append((name, graph, config))

    written: list[Path] = []
    for name, graph, config in planned:
        model_dir = repo_dir / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        (model_dir / "1").mkdir(parents=True)
        config_path = model_dir / "config.pbtxt"
        config_path.write_text(config, encoding="utf-8")
        onnx_path = model_dir / "1" / "model.onnx"
        shutil.copyfile(graph, onnx_path)
        written += [config_path, onnx_path]
        if weights is not None:  # under the name the graph's external data gives
            weights_copy = model_dir / "1" / weights.name
            shutil.copyfile(weights, weights_copy)
            written.append(weights_copy)
        meta_path = model_dir / METADATA_FILE
        shutil.copyfile(export_dir / METADATA_FILE, meta_path)
        written.append(meta_path)
    return written


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    input_spec: TensorSpec,
    *,
    max_batch_size: int = 8,
    opt_batch_size: int | None = None,
    spatial_shape: Sequence[int] | None = None,
    fp16: bool = True,
    extra_inputs: Sequence[TensorSpec] = (),
) -> list[str]:
    """The trtexec call that builds a TensorRT plan for one SFPC graph.

    TensorRT plans have fixed optimisation ranges: the batch axis spans 1..max_batch_size and the
    spatial axes are pinned to `spatial_shape` (the patch size for sliding-window models).
    `extra_inputs` are the graph's other inputs (the uncertainty graph's `temperature`, from
    `read_graph_io(onnx)[0][1:]`); they share the batch range and have fixed dims.
    """
    spatial = tuple(spatial_shape) if spatial_shape is not None else input_spec.dims[1:]
    if any(d < 1 for d in spatial):
        raise ValueError("the graph has dynamic spatial axes: pass spatial_shape (the patch size)")
    if any(d < 1 for spec in extra_inputs for d in spec.dims):
        raise ValueError("extra inputs must have fixed dims besides the batch axis")
    image = TensorSpec(input_spec.name, input_spec.data_type, (input_spec.dims[0], *spatial))
    specs = [image, *extra_inputs]
    opt = opt_batch_size or max_batch_size
    command = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={_shapes(specs, 1)}",
        f"--optShapes={_shapes(specs, opt)}",
        f"--maxShapes={_shapes(specs, max_batch_size)}",
    ]
    if fp16:
        command.append("--fp16")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sfpc.model.triton_repo EXPORT_DIR REPO_DIR --name NAME [options]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sfpc.model.triton_repo",
        description="Write a Triton model repository from an SFPC export directory.",
    )
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("repo_dir", type=Path)
    parser.add_argument("--name", default=None,
                        help="Triton model name (default: the export's own model name, which "
                             "is the name the gateway asks Triton for)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--instances", type=int, default=1, help="instances per model")
    parser.add_argument("--gpu", action="store_true", help="KIND_GPU instances (default CPU)")
    parser.add_argument("--tensorrt", action="store_true", help="ONNX Runtime's TensorRT EP")
    parser.add_argument("--fp16", action="store_true", help="TensorRT FP16 (implies --tensorrt)")
    parser.add_argument("--trt-cache", default=None, help="TensorRT engine cache dir on server")
    parser.add_argument("--preferred", type=int, nargs="*", default=None, help="batch sizes")
    parser.add_argument("--queue-delay-us", type=int, default=1000)
    args = parser.parse_args(argv)
    if (args.tensorrt or args.fp16) and not args.gpu:
        parser.error("TensorRT runs on GPU instances: add --gpu")
    if args.name is None:
        args.name = load_metadata(args.export_dir).name
    written = write_triton_repository(
        args.export_dir,
        args.repo_dir,
        args.name,
        max_batch_size=args.max_batch_size,
        instance_count=args.instances,
        instance_kind="KIND_GPU" if args.gpu else "KIND_CPU",
        tensorrt=args.tensorrt,
        tensorrt_fp16=args.fp16,
        trt_engine_cache_dir=args.trt_cache,
        preferred_batch_sizes=args.preferred,
        max_queue_delay_us=args.queue_delay_us,
    )
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
