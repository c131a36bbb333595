"""One weights file for all the graphs of an export: ONNX external data, identical tensors once.

The plain graph and the uncertainty graph carry the same encoder and decoder weights. Written
inline, an export holds them twice; :func:`share_weights` moves every initializer of at least
:data:`INLINE_BELOW` bytes out of the graphs into one file (``weights.bin``) beside them, each
distinct tensor (same data type, shape and bytes) stored once at an offset aligned to
:data:`ALIGNMENT` bytes, and points every graph's copy of it there (``TensorProto.data_location =
EXTERNAL`` with ``location``/``offset``/``length``, ONNX's external data). Smaller tensors (FLPM's
running spreads, shape constants) and the tensors of ``Constant`` nodes stay in the graphs.

The graphs then load by path (ONNX Runtime, Triton, ``onnx.load`` resolve ``weights.bin`` next to
the graph file), or from bytes with the weights file's bytes handed over as well (the gateway's
ONNX Runtime backend, which verifies both checksums first). The metadata records the file and its
SHA-256 as ``weights`` (sfpc/inference/contract.py).

``export_model`` calls :func:`share_weights` unless asked for inline weights. For an export
written before (or with ``--inline-weights``), the command

    python -m sfpc.model.shared_weights EXPORT_DIR          # share
    python -m sfpc.model.shared_weights EXPORT_DIR --inline # back to single-file graphs

rewrites it in place, after checking with ONNX Runtime that every graph gives bit-identical
outputs on a random batch before and after (:func:`convert_export`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfpc.io.files import write_atomic

WEIGHTS_FILE = "weights.bin"
# Initializers smaller than this stay in the graph (onnx's own default threshold): what they would
# save is less than the bookkeeping, and the graph keeps its scalars readable.
INLINE_BELOW = 1024
ALIGNMENT = 64  # offset of every tensor in the weights file, in bytes
# Typed payload fields of a TensorProto; a tensor moved to external data keeps none of them.
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _raw_bytes(tensor: Any) -> bytes:
    """The tensor's data as ONNX stores raw_data (little-endian), whatever field holds it."""
    from onnx import numpy_helper

    if tensor.HasField("raw_data"):
        return bytes(tensor.raw_data)
    return bytes(numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data)


def share_weights(folder: str | Path, files: Sequence[str], *, weights_file: str = WEIGHTS_FILE,
                  inline_below: int = INLINE_BELOW) -> dict[str, str]:
    """Move the initializers of the graphs ``files`` (names in ``folder``) to one external data
    file ``weights_file`` in ``folder``, each distinct tensor once; rewrites the graphs in place.

    Graphs already pointing at external data are read with it first, so sharing an export twice
    gives the same files. Returns the metadata record ``{"file", "sha256"}`` of the weights file,
    or ``{}`` when no tensor reaches ``inline_below`` bytes (the graphs are then written inline
    and no weights file is left behind).
    """
    import onnx
    from onnx import TensorProto, external_data_helper

    folder = Path(folder)
    if Path(weights_file).name != weights_file or weights_file in (".", ".."):
        raise ValueError(f"weights_file must be a file name, not {weights_file!r}")
    if weights_file in files:
        raise ValueError(f"the weights file {weights_file!r} would overwrite a graph")
    models = [onnx.load(str(folder / name)) for name in files]  # external data read in
    blob = bytearray()
    placed: dict[tuple[int, tuple[int, ...], bytes], tuple[int, int]] = {}
    unshareable = (TensorProto.UNDEFINED, TensorProto.STRING)
    for model in models:
        for tensor in model.graph.initializer:
            if tensor.data_type in unshareable:
                continue
            raw = _raw_bytes(tensor)
            if len(raw) < inline_below:
                continue
            key = (tensor.data_type, tuple(tensor.dims), raw)
            if key not in placed:
                blob.extend(b"\0" * (-len(blob) % ALIGNMENT))
                placed[key] = (len(blob), len(raw))
                blob.extend(raw)
            offset, length = placed[key]
            for name in _TYPED_FIELDS:
                tensor.ClearField(name)
            tensor.raw_data = raw
            external_data_helper.set_external_data(tensor, weights_file, offset, length)
            tensor.ClearField("raw_data")
    weights = folder / weights_file
    if placed:
        write_atomic(weights, bytes(blob))
    for name, model in zip(files, models, strict=True):
        write_atomic(folder / name, model.SerializeToString())
    if not placed:
        weights.unlink(missing_ok=True)
        return {}
    from sfpc.inference.contract import sha256_bytes

    return {"file": weights_file, "sha256": sha256_bytes(bytes(blob))}


def inline_weights(folder: str | Path, files: Sequence[str],
                   weights_file: str | None = WEIGHTS_FILE) -> None:
    """Write the graphs ``files`` back as single files, their external data read in; removes
    ``weights_file`` (None: keep every other file)."""
    import onnx

    folder = Path(folder)
    models = [onnx.load(str(folder / name)) for name in files]
    for name, model in zip(files, models, strict=True):
        write_atomic(folder / name, model.SerializeToString())
    if weights_file:
        (folder / weights_file).unlink(missing_ok=True)


def _outputs(folder: Path, files: Sequence[str], batch: np.ndarray,
             temperature: np.ndarray) -> dict[str, list[np.ndarray]]:
    import onnxruntime as ort

    from sfpc.inference.contract import INPUT_NAME, TEMPERATURE_NAME

    out = {}
    for name in files:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(folder / name), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        feeds = {INPUT_NAME: batch}
        if TEMPERATURE_NAME in {i.name for i in session.get_inputs()}:
            feeds[TEMPERATURE_NAME] = temperature
        out[name] = session.run(None, feeds)
    return out


def convert_export(export_dir: str | Path, *, inline: bool = False, seed: int = 0
                   ) -> dict[str, Any]:
    """Rewrite an export directory with shared (default) or inline weights, outputs unchanged.

    The checksums the metadata records are verified first. The graphs are rewritten in a scratch
    folder inside ``export_dir``; ONNX Runtime runs every graph there and on the files as they
    were, on one random batch (and a temperature of 1.3 where the graph takes one), and the files
    replace the old ones only when every output is bit-identical. The metadata's graph checksums
    and its ``weights`` record are updated. Returns the sizes and the checked outputs.
    """
    from sfpc.inference.contract import (
        METADATA_FILE,
        load_metadata,
        sha256_file,
        verify_graph_file,
        verify_weights_file,
    )

    export_dir = Path(export_dir)
    meta = load_metadata(export_dir)
    files = [str(entry["file"]) for entry in meta.graphs.values()]
    for kind in meta.graphs:
        verify_graph_file(export_dir, meta, kind)
    old_weights = verify_weights_file(export_dir, meta)
    before = _folder_bytes(export_dir)
    rng = np.random.default_rng(seed)
    batch = rng.normal(size=(2, meta.in_channels, *meta.patch_size)).astype(np.float32)
    temperature = np.full((2, 1), 1.3, dtype=np.float32)
    reference = _outputs(export_dir, files, batch, temperature)

    scratch = Path(tempfile.mkdtemp(prefix=".shared-weights-", dir=export_dir))
    try:
        for name in files:
            shutil.copyfile(export_dir / name, scratch / name)
        if old_weights is not None:
            shutil.copyfile(old_weights, scratch / old_weights.name)
        if inline:
            inline_weights(scratch, files, old_weights.name if old_weights else None)
            record: dict[str, str] = {}
        else:
            record = share_weights(scratch, files)
        converted = _outputs(scratch, files, batch, temperature)
        for name in files:
            for ref, new in zip(reference[name], converted[name], strict=True):
                if ref.dtype != new.dtype or not np.array_equal(ref, new):
                    raise RuntimeError(f"{name}: the rewritten graph's outputs differ from the "
                                       f"original's; {export_dir} is left as it was")
        if record:
            os.replace(scratch / record["file"], export_dir / record["file"])
        for name in files:
            os.replace(scratch / name, export_dir / name)
        if old_weights is not None and old_weights.name != record.get("file"):
            old_weights.unlink(missing_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for entry in meta.graphs.values():
        entry["sha256"] = sha256_file(export_dir / entry["file"])
    meta.weights = record
    meta.save(export_dir / METADATA_FILE)
    return {"export": str(export_dir), "weights": record, "bytes_before": before,
            "bytes_after": _folder_bytes(export_dir),
            "bit_identical_outputs": {name: [list(a.shape) for a in reference[name]]
                                      for name in files}}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sfpc.model.shared_weights",
        description="Store an export's graph weights once, in one external data file shared "
                    "by its graphs (or, with --inline, back inside each graph). Outputs are "
                    "checked bit for bit with ONNX Runtime before the files are replaced.")
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--inline", action="store_true",
                        help="write single-file graphs and remove the shared weights file")
    args = parser.parse_args(argv)
    print(json.dumps(convert_export(args.export_dir, inline=args.inline), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
