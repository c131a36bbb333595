"""Run the exported SFPC graphs in-process with ONNX Runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from sfpc.errors import BackendError, BackendUnavailable
from sfpc.inference.backends.base import (
    check_batch,
    check_temperature,
    output_names,
    temperature_input,
    untempered_graph_error,
)
from sfpc.inference.contract import (
    INPUT_NAME,
    SEG_GRAPH,
    TEMPERATURE_NAME,
    UNCERTAINTY_GRAPH,
    ModelMetadata,
    graph_path,
    load_metadata,
    read_graph_bytes,
    read_weights_bytes,
)

# Fastest first: TensorRT and CUDA only appear with the onnxruntime-gpu build.
PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)

ProviderSpec = str | tuple[str, dict[str, Any]]
# The CPU and GPU builds install the same `onnxruntime` module: with both distributions in one
# environment, whichever was installed last silently wins (often the CPU one).
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def check_single_build(version_of: Any = None) -> None:
    """Refuse an environment holding both the CPU and the GPU build of ONNX Runtime.

    ``version_of(name)`` returns an installed distribution's version or raises
    PackageNotFoundError (importlib.metadata.version by default)."""
    import importlib.metadata as md

    lookup = version_of or md.version
    found = []
    for name in _ORT_DISTRIBUTIONS:
        try:
            found.append(f"{name} {lookup(name)}")
        except md.PackageNotFoundError:
            continue
    if len(found) > 1:
        raise BackendUnavailable(
            f"both {' and '.join(found)} are installed; they share one module and the last one "
            "installed wins. Keep one: `pip uninstall -y onnxruntime onnxruntime-gpu` then "
            "`pip install onnxruntime-gpu` (GPU) or `pip install onnxruntime` (CPU)")


def gpu_provider_options(providers: Sequence[ProviderSpec], *, trt_cache_dir: str | None = None,
                         trt_fp16: bool = False) -> list[ProviderSpec]:
    """``providers`` with TensorRT's engine cache (and FP16) configured: building TensorRT
    engines takes minutes, and without a cache every start of the gateway pays it again."""
    out: list[ProviderSpec] = []
    for spec in providers:
        if spec == "TensorrtExecutionProvider" and (trt_cache_dir or trt_fp16):
            options: dict[str, Any] = {"trt_fp16_enable": bool(trt_fp16)}
            if trt_cache_dir:
                Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
                options.update(trt_engine_cache_enable=True,
                               trt_engine_cache_path=str(trt_cache_dir),
                               trt_timing_cache_enable=True)
            out.append((spec, options))
        else:
            out.append(spec)
    return out


def resolve_providers(
    requested: str | Sequence[ProviderSpec], available: Sequence[str]
) -> list[ProviderSpec]:
    """Execution providers to use: 'auto' picks TensorRT > CUDA > CPU among `available`.

    An explicit list is kept in the caller's order; entries may be (name, options) pairs as ONNX
    Runtime accepts them. Asking for a provider this build lacks is an error rather than a silent
    CPU fallback, so a GPU deployment that lost its GPU runtime is noticed.
    """
    if isinstance(requested, str):
        if requested != "auto":
            requested = [requested]
        else:
            chosen: list[ProviderSpec] = [n for n in PROVIDER_PREFERENCE if n in available]
            return chosen or [*available]
    resolved: list[ProviderSpec] = []
    for spec in requested:
        name = spec if isinstance(spec, str) else spec[0]
        if name not in available:
            raise BackendUnavailable(
                f"execution provider {name} is not available in this onnxruntime build "
                f"(available: {', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT "
                "or use providers='auto'"
            )
        resolved.append(spec)
    if not resolved:
        raise BackendError("providers list is empty; pass 'auto' or at least one provider name")
    return resolved


class OnnxRuntimeBackend:
    """Both SFPC graphs of an export directory in ONNX Runtime sessions.

    Both graphs, and the weights file they share when the export has one, are verified and
    loaded at construction, so a broken or tampered export fails at start-up rather than on the
    first request. The verified bytes are what ONNX Runtime loads: the graph from memory, with
    the weights file's contents handed over as its external data. Sessions are thread-safe for
    `run`. An uncertainty graph exported before the `temperature` input existed still loads, and
    serves temperature 1.
    ``metadata`` is the export's, when the caller has already loaded it (`load_metadata`).
    """

    def __init__(
        self,
        export_dir: str | Path,
        providers: str | Sequence[ProviderSpec] = "auto",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        *,
        metadata: ModelMetadata | None = None,
        trt_cache_dir: str | None = None,
        trt_fp16: bool = False,
        memory_pattern: bool = False,
    ) -> None:
        check_single_build()
        self.memory_pattern = bool(memory_pattern)
        self.export_dir = Path(export_dir)
        self.metadata = metadata if metadata is not None else load_metadata(self.export_dir)
        self.providers = gpu_provider_options(
            resolve_providers(providers, onnxruntime.get_available_providers()),
            trt_cache_dir=trt_cache_dir, trt_fp16=trt_fp16)
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self._closed = False
        kinds = [SEG_GRAPH, *([UNCERTAINTY_GRAPH] if self.metadata.has_uncertainty else [])]
        graphs = {kind: read_graph_bytes(self.export_dir, self.metadata, kind) for kind in kinds}
        # Read once for both graphs and dropped once they are loaded (ONNX Runtime copies it).
        weights = read_weights_bytes(self.export_dir, self.metadata)
        self._sessions: dict[str, Any] = {
            kind: self._load(kind, graphs[kind], weights) for kind in kinds}
        self.takes_temperature = False
        if self.metadata.has_uncertainty:
            inputs = {i.name for i in self._sessions[UNCERTAINTY_GRAPH].get_inputs()}
            self.takes_temperature = TEMPERATURE_NAME in inputs

    def _session_options(self) -> Any:
        options = onnxruntime.SessionOptions()
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = int(self.intra_op_threads)
        if self.inter_op_threads is not None:
            options.inter_op_num_threads = int(self.inter_op_threads)
        # ONNX Runtime's memory pattern plans one block for every activation of the shapes it
        # has seen; with the engine's batches (256^2 windows, batch 16) it held 330 MiB more at
        # peak than the arena alone, for no measured speed (docs/benchmarks.md, issue 13).
        options.enable_mem_pattern = self.memory_pattern
        return options

    def _load(self, kind: str, data: bytes, weights: tuple[str, bytes] | None) -> Any:
        """A session of graph ``kind`` from its verified bytes and those of the weights file."""
        options = self._session_options()
        model: bytes | str = data
        if weights is not None:
            name, blob = weights
            if hasattr(options, "add_external_initializers_from_files_in_memory"):
                options.add_external_initializers_from_files_in_memory([name], [blob], [len(blob)])
            else:
                # Builds whose Python API lacks that call read the weights file themselves, next
                # to the graph, which is then loaded by path; both were verified just above.
                model = str(graph_path(self.export_dir, self.metadata, kind))
        try:
            return onnxruntime.InferenceSession(
                model, sess_options=options, providers=list(self.providers)
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendError(
                f"onnxruntime could not load the '{kind}' graph of {self.export_dir} with "
                f"providers {self.providers}: {exc}"
            ) from exc

    def _session(self, uncertainty: bool) -> Any:
        session = self._sessions.get(UNCERTAINTY_GRAPH if uncertainty else SEG_GRAPH)
        if self._closed:
            raise BackendUnavailable("this OnnxRuntimeBackend was closed; create a new one")
        if session is None:
            raise BackendError(
                f"the export in {self.export_dir} has no uncertainty graph; re-export with "
                "uncertainty enabled or request plain inference"
            )
        return session

    def infer(
        self, batch: np.ndarray, *, uncertainty: bool = False, temperature: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Run one batch [B, C_in, *spatial]; see `Backend.infer`."""
        session = self._session(uncertainty)
        arr = check_batch(batch, self.metadata)
        temperature = check_temperature(temperature)
        names = list(output_names(uncertainty))
        feeds = {INPUT_NAME: arr}
        if uncertainty and self.takes_temperature:
            feeds[TEMPERATURE_NAME] = temperature_input(arr.shape[0], temperature)
        elif uncertainty and temperature != 1.0:
            raise untempered_graph_error(str(self.export_dir), temperature)
        try:
            results = session.run(names, feeds)
        except Exception as exc:
            raise BackendError(
                f"onnxruntime failed on a batch of shape {arr.shape}: {exc}"
            ) from exc
        return dict(zip(names, results, strict=True))

    def ready(self) -> bool:
        """True until `close` is called: the graph was loaded at construction."""
        return not self._closed

    def describe(self) -> dict[str, Any]:
        """Backend kind, model identity, execution providers and thread settings in effect."""
        session = self._sessions.get(SEG_GRAPH)
        options = session.get_session_options() if session is not None else None
        return {
            "backend": "onnxruntime",
            "export_dir": str(self.export_dir),
            "model_name": self.metadata.name,
            "model_version": self.metadata.version,
            "providers": session.get_providers() if session is not None else [],
            # Read back from the session: 0 means ONNX Runtime's own default (one per core).
            "intra_op_threads": options.intra_op_num_threads if options else None,
            "inter_op_threads": options.inter_op_num_threads if options else None,
            "memory_pattern": self.memory_pattern,
            "uncertainty": UNCERTAINTY_GRAPH in self._sessions,
            "temperature_input": self.takes_temperature,
            "ready": self.ready(),
        }

    def close(self) -> None:
        """Drop the sessions; ONNX Runtime frees them when the last reference goes."""
        self._closed = True
        self._sessions.clear()
