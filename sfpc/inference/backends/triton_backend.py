"""Send inference to an NVIDIA Triton Inference Server over gRPC or HTTP (binary tensors).

The server hosts the repository written by `sfpc.model.triton_repo.write_triton_repository`: a
plain model `<name>` and an uncertainty model `<name>_uncertainty` (inputs `image` and, for
exports that have it, `temperature` [B, 1]). Tensors always travel as raw
bytes: gRPC does so natively and HTTP uses Triton's binary tensor extension, since JSON-encoded
volumes are an order of magnitude larger and slower to parse.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

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
    METADATA_PARAMETER,
    TEMPERATURE_NAME,
    UNCERTAINTY_SUFFIX,
)

PROTOCOLS = ("grpc", "http")
# Statuses meaning "the server cannot be reached" and "the model is not being served" (gRPC codes,
# HTTP statuses): both are BackendUnavailable, as opposed to a request the model rejected.
_UNREACHABLE_STATUSES = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "503", "504"}
_NOT_SERVED_STATUSES = {"StatusCode.NOT_FOUND", "404"}


def _import_client(protocol: str) -> tuple[Any, Any]:
    """The tritonclient module of ``protocol`` and its InferenceServerException (whose
    ``status()`` is the gRPC code or HTTP status)."""
    # Imported on first use (tritonclient is a dependency): gRPC and gevent are heavy imports
    # that a gateway running ONNX Runtime never needs.
    if protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    from tritonclient.utils import InferenceServerException

    return client_module, InferenceServerException


class TritonBackend:
    """SFPC inference through a running Triton server.

    One client per thread: the HTTP client is built on gevent, whose connections must stay on the
    thread that made them; gRPC channels would be shareable, but one rule for both is simpler.
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        model_name: str = "sfpc",
        uncertainty_model_name: str | None = None,
        model_version: str = "",
        timeout_s: float = 60.0,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise BackendError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        self.url = url
        self.protocol = protocol
        self.model_name = model_name
        self.uncertainty_model_name = uncertainty_model_name or model_name + UNCERTAINTY_SUFFIX
        self.model_version = model_version
        self.timeout_s = float(timeout_s)
        self._module, self._server_error = _import_client(protocol)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._configs: dict[str, dict[str, Any]] = {}
        self._closed = False

    # -- connection -------------------------------------------------------------------------
    def _client(self) -> Any:
        if self._closed:
            raise BackendUnavailable("this TritonBackend was closed; create a new one")
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(url=self.url)
            else:
                client = self._module.InferenceServerClient(
                    url=self.url,
                    connection_timeout=self.timeout_s,
                    network_timeout=self.timeout_s,
                )
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _timeout_kwargs(self) -> dict[str, float]:
        # The HTTP client takes its timeouts at construction; gRPC takes one per call.
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def _where(self, model: str | None = None) -> str:
        target = f"Triton at {self.url} ({self.protocol})"
        return f"model '{model}' on {target}" if model else target

    def _translate(self, exc: Exception, model: str, action: str) -> BackendError:
        status = str(exc.status()) if isinstance(exc, self._server_error) else ""
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, OSError) or status in _UNREACHABLE_STATUSES:
            return BackendUnavailable(
                f"{action} failed: cannot reach {self._where()} for model '{model}' ({text}). "
                f"Check that tritonserver is running and that {self.url} is its "
                f"{self.protocol.upper()} address and port"
            )
        if status in _NOT_SERVED_STATUSES or "not ready" in text or "unknown model" in text:
            return BackendUnavailable(
                f"{action} failed: {self._where(model)} is not loaded or not ready ({text}). "
                f"Check that the model repository holds '{model}' and the server log shows it "
                f"READY (GET /v2/models/{model}/ready)"
            )
        return BackendError(f"{action} on {self._where(model)} failed: {text}")

    # -- model configuration ----------------------------------------------------------------
    def model_config(self, model: str) -> dict[str, Any]:
        """The server's configuration of `model` as a dict (cached after the first fetch)."""
        if model in self._configs:
            return self._configs[model]
        try:
            if self.protocol == "grpc":
                response = self._client().get_model_config(
                    model, self.model_version, as_json=True, **self._timeout_kwargs()
                )
                config = response["config"]
            else:
                config = self._client().get_model_config(model, self.model_version)
        except (self._server_error, OSError) as exc:
            raise self._translate(exc, model, "reading the model configuration") from exc
        self._configs[model] = config
        return config

    def max_batch_size(self, model: str) -> int:
        """The model's max_batch_size; 0 means the model takes no batch dimension."""
        return int(self.model_config(model).get("max_batch_size", 0))

    def export_metadata(self) -> dict[str, Any] | None:
        """The `sfpc_model.json` content the repository writer embedded in the model config."""
        parameters = self.model_config(self.model_name).get("parameters", {})
        entry = parameters.get(METADATA_PARAMETER)
        if not entry:
            return None
        return json.loads(entry["string_value"])

    def _check_shape(self, arr: np.ndarray, model: str) -> None:
        """Reject a batch the served model cannot take, in the user's terms, before sending it."""
        inputs = self.model_config(model).get("input", [])
        spec = next((t for t in inputs if t.get("name") == INPUT_NAME), None)
        if spec is None:
            raise BackendError(
                f"{self._where(model)} has no input '{INPUT_NAME}'; it is not an SFPC model"
            )
        dims = [int(d) for d in spec.get("dims", [])]  # gRPC's JSON renders int64 as strings
        fits = arr.ndim == len(dims) + 1 and all(
            d < 0 or d == n for d, n in zip(dims, arr.shape[1:], strict=True)
        )
        if not fits:
            expected = ", ".join("any" if d < 0 else str(d) for d in dims)
            raise BackendError(
                f"input batch has shape {arr.shape}; {self._where(model)} expects "
                f"[B, {expected}] (channel-first; fixed sizes are the model's patch size)"
            )

    def takes_temperature(self, model: str) -> bool:
        """Whether the served `model` has the `temperature` input (uncertainty models exported
        since it exists)."""
        inputs = self.model_config(model).get("input", [])
        return any(t.get("name") == TEMPERATURE_NAME for t in inputs)

    # -- inference --------------------------------------------------------------------------
    def _tensor(self, name: str, value: np.ndarray) -> Any:
        tensor = self._module.InferInput(name, list(value.shape), "FP32")
        if self.protocol == "http":
            tensor.set_data_from_numpy(value, binary_data=True)
        else:
            tensor.set_data_from_numpy(value)
        return tensor

    def _infer_chunk(
        self, model: str, chunk: np.ndarray, names: tuple[str, ...], temperature: float | None
    ) -> list:
        inputs = [self._tensor(INPUT_NAME, chunk)]
        if temperature is not None:
            inputs.append(self._tensor(TEMPERATURE_NAME,
                                       temperature_input(chunk.shape[0], temperature)))
        if self.protocol == "http":
            outputs = [self._module.InferRequestedOutput(n, binary_data=True) for n in names]
        else:
            outputs = [self._module.InferRequestedOutput(n) for n in names]
        try:
            result = self._client().infer(
                model,
                inputs,
                model_version=self.model_version,
                outputs=outputs,
                **self._timeout_kwargs(),
            )
        except (self._server_error, OSError) as exc:
            error = self._translate(exc, model, f"inference on a batch of shape {chunk.shape}")
            if isinstance(error, BackendUnavailable):
                # The server may come back with another configuration: fetch it again then.
                self._configs.pop(model, None)
            raise error from exc
        arrays = []
        for name in names:
            array = result.as_numpy(name)
            if array is None:
                raise BackendError(f"{self._where(model)} returned no output '{name}'")
            arrays.append(array)
        return arrays

    def infer(
        self, batch: np.ndarray, *, uncertainty: bool = False, temperature: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Run one batch [B, C_in, *spatial], split to the model's max_batch_size; see
        `Backend.infer`."""
        arr = check_batch(batch)
        temperature = check_temperature(temperature)
        model = self.uncertainty_model_name if uncertainty else self.model_name
        names = output_names(uncertainty)
        self._check_shape(arr, model)
        feed: float | None = None
        if uncertainty and self.takes_temperature(model):
            feed = temperature
        elif uncertainty and temperature != 1.0:
            raise untempered_graph_error(self._where(model), temperature)
        limit = self.max_batch_size(model)
        if limit <= 0:
            raise BackendError(
                f"{self._where(model)} has max_batch_size 0, but SFPC models take a batch axis; "
                "regenerate the repository with write_triton_repository"
            )
        pieces = [
            self._infer_chunk(model, arr[start : start + limit], names, feed)
            for start in range(0, arr.shape[0], limit)
        ]
        return {
            name: pieces[0][i] if len(pieces) == 1 else np.concatenate([p[i] for p in pieces])
            for i, name in enumerate(names)
        }

    # -- health ------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Server live and the plain model ready (see `uncertainty_ready` for the other model)."""
        try:
            client = self._client()
            kwargs = self._timeout_kwargs()
            return bool(
                client.is_server_live(**kwargs)
                and client.is_model_ready(self.model_name, self.model_version, **kwargs)
            )
        except Exception:  # any failure to ask means "not ready", by the Protocol's contract
            return False

    def uncertainty_ready(self) -> bool:
        """Whether the uncertainty model is loaded on the server."""
        try:
            return bool(
                self._client().is_model_ready(
                    self.uncertainty_model_name, self.model_version, **self._timeout_kwargs()
                )
            )
        except Exception:  # unreachable counts as not ready
            return False

    def describe(self) -> dict[str, Any]:
        """Connection settings, and the served models' batch limits when the server answers."""
        info: dict[str, Any] = {
            "backend": "triton",
            "url": self.url,
            "protocol": self.protocol,
            "model_name": self.model_name,
            "uncertainty_model_name": self.uncertainty_model_name,
            "model_version": self.model_version,
            "timeout_s": self.timeout_s,
            "ready": self.ready(),
        }
        if info["ready"]:
            try:
                info["max_batch_size"] = self.max_batch_size(self.model_name)
                info["uncertainty"] = self.uncertainty_ready()
                if info["uncertainty"]:
                    info["temperature_input"] = self.takes_temperature(
                        self.uncertainty_model_name)
            except BackendError as exc:
                info["error"] = str(exc)
        return info

    def close(self) -> None:
        """Close every client this backend opened."""
        self._closed = True
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # a client whose connection already broke; it is discarded anyway
                pass
