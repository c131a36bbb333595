"""Talk to NVIDIA Triton directly, without the gateway: a thin example for pipelines that own
their pre- and post-processing and want the exported graphs only.

The Triton model repository written by ``sfpc export --triton-repo`` holds two models per
export, ``<name>`` (``image`` -> ``logits``) and ``<name>_uncertainty`` (``image`` [and
``temperature``] -> ``mean_probs``, ``mean_entropy``), and embeds the export metadata
(``sfpc_model.json``: classes, patch size, spacing, normalisation) in the model configuration,
so this client needs nothing but the server's address and the model name:

    direct = TritonDirect("127.0.0.1:8001", "ct")          # gRPC; protocol="http" for :8000
    meta = direct.metadata()                                # class names, patch size, ...
    out = direct.infer(windows)                             # windows: (N, C, *patch) float32
    probs = direct.infer(windows, uncertainty=True)["mean_probs"]

Windows must be prepared as the model was trained: on the model grid (orientation, spacing) and
normalised as ``meta["normalisation"]`` says. :func:`sfpc.inference.direct.segment_volume` does
the whole path for one image with the project's own torch-free preprocessing and sliding window
(the same code the gateway runs) around a ``TritonDirect``, and ``python -m sfpc.inference.direct``
runs it on a NIfTI file. This module itself needs only the model contract: the tensor names and
the metadata parameter of :mod:`sfpc.inference.contract`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from sfpc.inference.contract import (
    INPUT_NAME,
    METADATA_PARAMETER,
    TEMPERATURE_NAME,
    UNCERTAINTY_SUFFIX,
)


class TritonDirect:
    """One exported SFPC model on a Triton server, over gRPC or HTTP (binary tensors)."""

    def __init__(self, url: str, model: str, *, protocol: str = "grpc",
                 timeout_s: float = 60.0) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as module
        elif protocol == "http":
            import tritonclient.http as module
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
        self.module = module
        self.protocol = protocol
        self.model = model
        self.timeout_s = float(timeout_s)
        if protocol == "grpc":
            self.client = module.InferenceServerClient(url=url)
        else:
            self.client = module.InferenceServerClient(url=url, connection_timeout=timeout_s,
                                                       network_timeout=timeout_s)
        self._configs: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TritonDirect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def config(self, model: str) -> dict[str, Any]:
        """Triton's configuration of ``model`` as a dict (fetched once)."""
        if model not in self._configs:
            if self.protocol == "grpc":
                self._configs[model] = self.client.get_model_config(
                    model, as_json=True, client_timeout=self.timeout_s)["config"]
            else:
                self._configs[model] = self.client.get_model_config(model)
        return self._configs[model]

    def metadata(self) -> dict[str, Any]:
        """The export metadata (``sfpc_model.json``) embedded in the model configuration."""
        entry = self.config(self.model).get("parameters", {}).get(METADATA_PARAMETER)
        if not entry:
            raise ValueError(f"Triton model {self.model!r} carries no {METADATA_PARAMETER} "
                             "parameter: was its repository written by `sfpc export`?")
        return json.loads(entry["string_value"])

    def infer(self, windows: np.ndarray, *, uncertainty: bool = False,
              temperature: float | None = None) -> dict[str, np.ndarray]:
        """Run ``windows`` (N, C, *spatial), float32, through the plain graph (``logits``) or
        the uncertainty graph (``mean_probs``, ``mean_entropy``), in batches the server takes.
        ``temperature`` (uncertainty graph only) defaults to the export's calibrated one."""
        model = self.model + (UNCERTAINTY_SUFFIX if uncertainty else "")
        config = self.config(model)
        inputs = {spec["name"] for spec in config.get("input", [])}
        outputs = [spec["name"] for spec in config.get("output", [])]
        batch = int(config.get("max_batch_size", 0)) or len(windows)
        array = np.ascontiguousarray(windows, dtype=np.float32)
        if uncertainty and TEMPERATURE_NAME in inputs and temperature is None:
            temperature = float(self.metadata().get("temperature") or 1.0)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for start in range(0, len(array), batch):
            chunk = array[start:start + batch]
            feeds = [self._tensor(INPUT_NAME, chunk)]
            if uncertainty and TEMPERATURE_NAME in inputs:
                feeds.append(self._tensor(TEMPERATURE_NAME, np.full(
                    (len(chunk), 1), temperature, dtype=np.float32)))
            requested = [self._output(name) for name in outputs]
            extra = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            result = self.client.infer(model, feeds, outputs=requested, **extra)
            for name in outputs:
                parts[name].append(result.as_numpy(name))
        return {name: np.concatenate(values) for name, values in parts.items()}

    def predictor(self, *, uncertainty: bool = False) -> Callable[[np.ndarray], dict]:
        """``infer`` as the sliding window's ``predict`` callable."""
        return lambda windows: self.infer(windows, uncertainty=uncertainty)

    def _tensor(self, name: str, array: np.ndarray) -> Any:
        tensor = self.module.InferInput(name, list(array.shape), "FP32")
        if self.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def _output(self, name: str) -> Any:
        if self.protocol == "http":
            return self.module.InferRequestedOutput(name, binary_data=True)
        return self.module.InferRequestedOutput(name)
