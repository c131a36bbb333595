"""The parts of a request's encode and decode that issue 13 changed, timed one by one.

On the embedded default model's own output for the 20-slice JPEG 2000 series of
``request_cost.py`` (series20) and on a noisy 512 x 512 x 400 uint16 map and mask:

- the overlay montage with its tiles on 1 thread vs ``ENCODE_THREADS``, and its canvas written
  as PNG by Pillow (zlib level 1, a filter chosen per row) and by ``sfpc.io.png`` (ISA-L, the
  Up filter), the same pixels;
- an 8-bit map and a mask deflated in one piece vs ``DEFLATE_THREADS`` pieces;
- the 20 JPEG 2000 frames decoded on 1 vs 2 threads by each installed decoder (pydicom's
  pylibjpeg and Pillow plugins): whether decoding frames in parallel pays;
- the series' mask written to NIfTI from a row-major array (how DICOM volumes were assembled)
  vs a column-major one (NIfTI's own order, how they are now);
- area resampling of the fastest axis of a column-major 512 x 512 x 16 slab (512 -> 122, the
  series' slices to the default model's 3 mm) by a cumulative sum along it (before) vs by
  gathers (``sfpc.inference.preprocess``, now).

Medians of ``--repeats``, the variants interleaved; prints a table and writes ``--json``::

    .venv/bin/python benchmarks/encode_parts.py --repeats 7 --json benchmarks/encode_parts.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# Sibling scripts: `python benchmarks/encode_parts.py` puts this folder first on sys.path.
from request_cost import SAMPLE, series20


def medians(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():  # interleaved: drift hits all alike
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import pydicom
    from PIL import Image
    from pydicom.pixels import get_decoder

    import sfpc
    from sfpc.inference.options import SegmentOptions
    from sfpc.inference.pipeline import SegmentationService
    from sfpc.inference.registry import ModelRegistry, RuntimeConfig
    from sfpc.io import artefacts, overlay
    from sfpc.io.overlay import render_overlay
    from sfpc.io.png import encode_png

    upload = series20(Path(tempfile.mkdtemp(prefix="sfpc-encode-parts-")) / "s.zip", SAMPLE)
    config = RuntimeConfig(model_dirs=[Path(sfpc.__file__).parent / "default_model"],
                           onnx_intra_op_threads=1)
    service = SegmentationService(ModelRegistry(config), config)
    options = SegmentOptions(outputs=["mask_nifti", "entropy_nifti", "report_json"])
    done = service.segment_upload([("s.zip", upload.read_bytes())], options)
    volume = service.decode([("s.zip", upload.read_bytes())], options)[0]
    result = done.result
    volumes = {name: entry["volume_ml"] for name, entry in done.report["classes"].items()}
    figures: dict[str, dict[str, float]] = {}

    def render(threads: int) -> Callable[[], bytes]:
        def run() -> bytes:
            saved = overlay.TILE_THREADS
            overlay.TILE_THREADS = threads
            try:
                return render_overlay(volume.array, result.affine, result.mask,
                                      result.class_names, uncertainty=result.entropy_levels,
                                      volumes_ml=volumes, title="sfpc")
            finally:
                overlay.TILE_THREADS = saved
        return run

    threads = artefacts.ENCODE_THREADS
    figures["overlay, series20"] = medians(
        {"1 thread": render(1), f"{threads} threads": render(threads)}, args.repeats)
    canvas = Image.open(io.BytesIO(render(threads)())).convert("RGB")
    sizes = {}

    pixels = np.asarray(canvas)

    def pillow() -> None:
        out = io.BytesIO()
        canvas.save(out, format="PNG", optimize=False, compress_level=1)
        sizes["Pillow bytes"] = out.tell()

    def isal_up() -> None:
        sizes["sfpc.io.png bytes"] = len(encode_png(pixels))

    if not np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(pixels)))), pixels):
        raise SystemExit("sfpc.io.png changed the overlay's pixels")
    figures["overlay PNG, series20"] = {
        **medians({"Pillow zlib 1": pillow, "sfpc.io.png": isal_up}, args.repeats), **sizes}

    rng = np.random.default_rng(0)
    levels = np.asfortranarray((rng.random((512, 512, 400), dtype=np.float32) * 2000 + 500)
                               .astype(np.uint16))
    mask = np.asfortranarray(rng.integers(0, 4, (512, 512, 400)).astype(np.uint8))

    def deflate(pieces: int, what: str) -> Callable[[], bytes]:
        def run() -> bytes:
            saved = artefacts.DEFLATE_THREADS
            artefacts.DEFLATE_THREADS = pieces
            try:
                if what == "map":
                    return artefacts.map_nifti_bytes(levels, np.eye(4), precision="uint8")
                return artefacts.nifti_bytes(mask, np.eye(4))
            finally:
                artefacts.DEFLATE_THREADS = saved
        return run

    for what in ("map", "mask"):
        figures[f"{what} NIfTI, 512x512x400"] = medians(
            {"1 piece": deflate(1, what), f"{threads} pieces": deflate(threads, what)},
            max(3, args.repeats // 2))

    archive = zipfile.ZipFile(upload)
    raw = [archive.read(name) for name in archive.namelist()]

    def decode(plugin: str, workers: int) -> Callable[[], None]:
        def one(data: bytes) -> np.ndarray:
            ds = pydicom.dcmread(io.BytesIO(data))
            return get_decoder(ds.file_meta.TransferSyntaxUID).as_array(
                ds, decoding_plugin=plugin)[0]

        def run() -> None:
            if workers == 1:
                [one(d) for d in raw]
            else:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(one, raw))
        return run

    for plugin in ("pylibjpeg", "pillow"):
        figures[f"JPEG 2000 decode, 20 frames, {plugin}"] = medians(
            {"1 thread": decode(plugin, 1), "2 threads": decode(plugin, 2)}, args.repeats)

    row_major = np.ascontiguousarray(result.mask)
    column_major = np.asfortranarray(result.mask)
    figures["mask NIfTI, series20"] = medians(
        {"row-major": lambda: artefacts.nifti_bytes(row_major, result.affine),
         "column-major": lambda: artefacts.nifti_bytes(column_major, result.affine)},
        args.repeats)

    from sfpc.inference.preprocess import _resample_axis, axis_weights

    slab = np.asfortranarray(np.asarray(volume.array[:, :, :16], dtype=np.float32)).T
    n_out = 122
    area = axis_weights(slab.shape[-1], n_out, "area")

    def by_cumsum() -> np.ndarray:
        # The former path: the integral of each row, differenced at the output voxels' edges.
        n_in = slab.shape[-1]
        edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
        k = np.minimum(np.floor(edges).astype(np.intp), n_in - 1)
        integral = np.take(np.cumsum(slab, axis=-1, dtype=np.float32), k, axis=-1)
        integral -= np.take(slab, k, axis=-1) * (1.0 - (edges - k)).astype(np.float32)
        return (integral[..., 1:] - integral[..., :-1]) * np.float32(n_out / n_in)

    def by_gathers() -> np.ndarray:
        return _resample_axis(slab, 2, n_out)

    for run in (by_cumsum, by_gathers):
        np.testing.assert_allclose(run(), slab @ area.T, rtol=1e-4, atol=0.05)
    figures["area resampling, 512 -> 122, column-major 512x512x16"] = medians(
        {"cumulative sum": by_cumsum, "gathers": by_gathers}, args.repeats)

    print(f"medians of {args.repeats} (deflate: {max(3, args.repeats // 2)}), seconds")
    for part, values in figures.items():
        print(f"{part}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in values.items()))
    if args.json:
        args.json.write_text(json.dumps(
            {"command": " ".join(["benchmarks/encode_parts.py", *sys.argv[1:]]),
             "figures": figures}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
