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
normalised as ``meta["normalisation"]`` says. :func:`segment_volume` shows the whole path for one
image with the project's own torch-free preprocessing and sliding window (the same code the
gateway runs), and ``python -m sfpc.clients.triton_direct`` runs it on a NIfTI file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

METADATA_PARAMETER = "sfpc_model_json"
UNCERTAINTY_SUFFIX = "_uncertainty"
IMAGE_INPUT = "image"
TEMPERATURE_INPUT = "temperature"


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
        if uncertainty and TEMPERATURE_INPUT in inputs and temperature is None:
            temperature = float(self.metadata().get("temperature") or 1.0)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for start in range(0, len(array), batch):
            chunk = array[start:start + batch]
            feeds = [self._tensor(IMAGE_INPUT, chunk)]
            if uncertainty and TEMPERATURE_INPUT in inputs:
                feeds.append(self._tensor(TEMPERATURE_INPUT, np.full(
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


def segment_volume(direct: TritonDirect, image: np.ndarray, affine: np.ndarray
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The label map of ``image`` ((X, Y, Z) or (C, X, Y, Z), RAS ``affine``) on its own grid,
    and the blended model-grid maps: the project's preprocessing (reorientation, resampling,
    normalisation) and sliding window, with every window sent to Triton by ``direct``."""
    from sfpc.inference.contract import ModelMetadata
    from sfpc.inference.engine import Engine, predict_model_grid, softmax
    from sfpc.inference.preprocess import restore

    meta = ModelMetadata.from_dict(direct.metadata())
    # The engine only prepares geometry here; inference goes through `direct`.
    engine = Engine(None, meta)  # type: ignore[arg-type]
    model_image, geometry = engine.preprocess(image, affine)
    maps = predict_model_grid(
        direct.predictor(), model_image, spatial_dims=meta.spatial_dims,
        patch_size=meta.patch_size, plane_axis=engine.plane_axis, input_mode=meta.input_mode,
        overlap=engine.overlap, mode=engine.mode, sigma_scale=engine.sigma_scale,
        sw_batch_size=engine.sw_batch_size)
    probs = softmax(maps["logits"], axis=0, temperature=meta.temperature)
    labels = np.argmax(probs, axis=0).astype(np.uint8)
    return restore(labels, geometry, order=0).astype(np.uint8), maps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sfpc.clients.triton_direct",
        description="Segment a NIfTI image with an SFPC model served by Triton, directly.")
    parser.add_argument("image", help="NIfTI image (.nii / .nii.gz)")
    parser.add_argument("--url", required=True, help="Triton address, e.g. 127.0.0.1:8001")
    parser.add_argument("--model", required=True, help="Triton model name (plain graph)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("-o", "--output", help="write the mask here (NIfTI)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    import nibabel as nib

    source = nib.load(args.image)
    image = np.asanyarray(source.dataobj).astype(np.float32)
    with TritonDirect(args.url, args.model, protocol=args.protocol) as direct:
        mask, _ = segment_volume(direct, image, source.affine)
        names = direct.metadata()["class_names"]
    counts = {names[i]: int(n) for i, n in enumerate(np.bincount(mask.ravel(),
                                                                minlength=len(names)))}
    print(json.dumps({"shape": list(mask.shape), "voxels": counts}))
    if args.output:
        nib.save(nib.Nifti1Image(mask, source.affine), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
