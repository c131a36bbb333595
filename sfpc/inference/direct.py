"""Segment one image with any window predictor: the gateway's own preprocessing (reorientation,
resampling, normalisation) and sliding window around a callable that maps prepared windows
``(N, C, *patch)`` to the graphs' outputs.

This is the whole path for pipelines that talk to the exported graphs themselves, e.g. through
:class:`sfpc.clients.triton_direct.TritonDirect`, which has the ``metadata()`` and
``predictor()`` that :func:`segment_volume` asks for::

    with TritonDirect("127.0.0.1:8001", "ct") as direct:
        mask, maps = segment_volume(direct, image, affine)

``python -m sfpc.inference.direct IMAGE --url HOST:PORT --model NAME`` does it for a NIfTI file
and a model served by Triton.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from sfpc.errors import BackendError
from sfpc.inference.backends.base import Backend
from sfpc.inference.contract import (
    METADATA_PARAMETER,
    PLAIN_OUTPUTS,
    ModelMetadata,
    check_servable,
)
from sfpc.inference.engine import Engine, predict_model_grid, softmax
from sfpc.inference.preprocess import restore
from sfpc.inference.sliding_window import Predictor


class WindowModel(Protocol):
    """What :func:`segment_volume` needs of a model: its export metadata (the
    ``sfpc_model.json`` content) and a predictor of windows."""

    def metadata(self) -> Mapping[str, Any]: ...

    def predictor(self, *, uncertainty: bool = False) -> Predictor: ...


class PredictorBackend:
    """A :class:`~sfpc.inference.backends.Backend` over a plain-mode window predictor (windows ->
    ``{"logits": ...}``), for an :class:`Engine` whose windows go elsewhere."""

    def __init__(self, predict: Predictor) -> None:
        self.predict = predict

    def infer(self, batch: np.ndarray, *, uncertainty: bool = False,
              temperature: float = 1.0) -> dict[str, np.ndarray]:
        if uncertainty:
            raise BackendError("this predictor runs the plain graph only; send uncertainty "
                               "windows through the model's own uncertainty predictor")
        return dict(self.predict(batch))

    def ready(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"backend": "predictor"}

    def close(self) -> None:
        """Nothing to release: the predictor belongs to the caller."""


def segment_volume(model: WindowModel, image: np.ndarray, affine: np.ndarray
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The label map of ``image`` ((X, Y, Z) or (C, X, Y, Z), RAS ``affine``) on its own grid,
    and the blended model-grid maps ``{"logits": (K, ...)}``: the project's preprocessing and
    sliding window, every window sent to ``model.predictor()``."""
    meta = check_servable(ModelMetadata.from_dict(model.metadata()))
    return segment_with_predictor(model.predictor(), meta, image, affine)


def segment_with_predictor(predict: Predictor, meta: ModelMetadata, image: np.ndarray,
                           affine: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`segment_volume` with the metadata and the plain-mode predictor given."""
    engine = Engine(PredictorBackend(predict), meta)
    model_image, geometry = engine.preprocess(image, affine)
    # The engine's settings: a 2.5D model's neighbour slices and any field the contract gains
    # reach the predictor as they reach the engine's own windows.
    maps = predict_model_grid(predict, model_image, **engine.grid_settings(model_image))
    probs = softmax(maps[PLAIN_OUTPUTS[0]], axis=0, temperature=meta.temperature)
    labels = np.argmax(probs, axis=0).astype(np.uint8)
    return restore(labels, geometry, order=0).astype(np.uint8), maps


class _BackendModel:
    """A served model as a :class:`WindowModel`: a backend and the metadata it serves."""

    def __init__(self, backend: Backend, meta: Mapping[str, Any]) -> None:
        self.backend = backend
        self.meta = meta

    def metadata(self) -> Mapping[str, Any]:
        return self.meta

    def predictor(self, *, uncertainty: bool = False) -> Predictor:
        temperature = float(self.meta.get("temperature") or 1.0) if uncertainty else 1.0
        return lambda windows: self.backend.infer(windows, uncertainty=uncertainty,
                                                  temperature=temperature)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sfpc.inference.direct",
        description="Segment a NIfTI image with an SFPC model served by Triton, directly.")
    parser.add_argument("image", help="NIfTI image (.nii / .nii.gz)")
    parser.add_argument("--url", required=True, help="Triton address, e.g. 127.0.0.1:8001")
    parser.add_argument("--model", required=True, help="Triton model name (plain graph)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("-o", "--output", help="write the mask here (NIfTI)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    import nibabel as nib

    from sfpc.inference.backends.triton_backend import TritonBackend

    source = nib.load(args.image)
    if not isinstance(source, nib.Nifti1Image):  # Nifti2Image derives from it
        parser.error(f"{args.image} is not a NIfTI image")
    image = np.asanyarray(source.dataobj).astype(np.float32)
    backend = TritonBackend(args.url, args.protocol, model_name=args.model)
    try:
        meta = backend.export_metadata()
        if meta is None:
            raise BackendError(f"Triton model {args.model!r} carries no {METADATA_PARAMETER} "
                               "parameter: was its repository written by `sfpc export`?")
        mask, _ = segment_volume(_BackendModel(backend, meta), image, source.affine)
    finally:
        backend.close()
    names = meta["class_names"]
    counts = {names[i]: int(n) for i, n in enumerate(np.bincount(mask.ravel(),
                                                                minlength=len(names)))}
    print(json.dumps({"shape": list(mask.shape), "voxels": counts}))
    if args.output:
        nib.save(nib.Nifti1Image(mask, source.affine), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
