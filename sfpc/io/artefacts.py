"""Encoders of the result files: NIfTI on the input's grid, DICOM SEG, report JSON, zip.

The NIfTI outputs reuse the upload's own header when there was one (same NIfTI version, same
sform/qform codes and units), so a viewer overlays them on the input without a resampling step and
the affine round-trips bit for bit. DICOM uploads get a fresh NIfTI-1 header with the affine
decoded from the series (scanner coordinates).
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib

NIFTI_MEDIA_TYPE = "application/gzip"
DICOM_MEDIA_TYPE = "application/dicom"
PNG_MEDIA_TYPE = "image/png"
JSON_MEDIA_TYPE = "application/json"
ZIP_MEDIA_TYPE = "application/zip"
ZIP_NAME = "sfpc_result.zip"
# NIfTI files are gzipped by ISA-L (python-isal): on an uncertainty map of 512 x 512 x 20 it
# writes within 1 % of zlib level 4's size in 1/17 of the time (17 ms against 288 ms), and the
# encode step was what made an uncertainty request cost more than its network (issue 13).
# ISA-L levels run 0-3.
GZIP_LEVEL = 2
# Threads one request's encoders use side by side (its files, one file's deflate pieces, the
# overlay's tiles): ISA-L, PIL and numpy release the GIL; more would only wait for the cores.
ENCODE_THREADS = max(1, min(4, os.cpu_count() or 1))
# A file of this many bytes or more is deflated in DEFLATE_THREADS pieces at once, joined into
# one gzip member: a 512 x 512 x 400 mask in 0.26 s instead of 0.35 s, a noisy 8-bit map in
# 0.40 s instead of 0.54 s, on two cores (benchmarks/encode_parts.py).
DEFLATE_THREADS = ENCODE_THREADS
_PARALLEL_DEFLATE_BYTES = 8 << 20
# gzip's member header with no name and mtime 0 (the bytes do not depend on the clock), XFL 0,
# OS 255 (unknown).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
# Members already compressed gain nothing from deflate; storing them saves the CPU.
_STORED_SUFFIXES = (".gz", ".png", ".zip")
# Uncertainty maps (entropy and mutual information over ln K, both in [0, 1]) are stored as
# uint16 with scl_slope = MAP_STEP: every NIfTI reader applies the slope, the decoded value is
# within MAP_MAX_ERROR of the float map, and the file is half the bytes before deflate (a third
# after), which is what an uncertainty request cost beyond a plain one (issue 13).
MAP_LEVELS = 65535
MAP_STEP = 1.0 / MAP_LEVELS
MAP_MAX_ERROR = 0.5 * MAP_STEP + 1e-7  # half a step, and float32 rounding of the decoded value
_QUANTISE_VOXELS = 1 << 22
# What the files may store instead, chosen per request (``map_precision``): 8 bits are what a
# viewer shows and what a threshold needs, and on the noisy synthetic 512 x 512 x 400 CT of
# benchmarks/request_cost.py the mask + entropy response is 34 MiB instead of 161 MiB and the
# request 9.4 s instead of 10.7 s (docs/benchmarks.md, issue 13).
MAP_PRECISIONS: dict[str, int] = {"uint8": 255, "uint16": MAP_LEVELS}
DEFAULT_MAP_PRECISION = "uint8"


def map_max_error(precision: str = "uint16") -> float:
    """The largest difference between a decoded map file of ``precision`` and the float map,
    whatever the map (a map with small values is stored finer: :func:`map_file_step`)."""
    levels = _levels(precision)
    return map_file_error(-(-MAP_LEVELS // levels))


def map_file_step(values: np.ndarray, precision: str) -> int:
    """How many of the engine's uint16 levels (steps of MAP_STEP) one stored level of
    ``precision`` spans for this map: 1 for uint16 (the levels are stored as they are), and for
    uint8 just enough that the map's largest value fits in 255 levels. A map of small values
    keeps its resolution: the mutual information of a confident model peaks near 0.002 (the
    shipped model on ct_a), which 1/255 steps would store as zeros."""
    if _levels(precision) == MAP_LEVELS:
        return 1
    values = np.asarray(values)
    if values.size == 0:
        return 1
    top = np.max(values)
    top_level = int(top) if values.dtype == np.uint16 else int(
        np.floor(float(np.clip(top, 0.0, 1.0)) * MAP_LEVELS + 0.5))
    return max(1, -(-top_level // _levels(precision)))


def map_file_error(step: int) -> float:
    """The largest difference between the decoded file and the float map, for a file whose
    levels span ``step`` engine levels: half a stored step on top of the engine's own rounding."""
    return MAP_MAX_ERROR if step == 1 else 0.5 * step * MAP_STEP + MAP_MAX_ERROR


def _slope(step: int) -> float:
    """step / MAP_LEVELS, or the float32 just below it where NIfTI-1's float32 scl_slope would
    round it up and decode the top level above 1 (float32(1/255) x 255 is 1.00000006)."""
    exact = step / MAP_LEVELS
    single = np.float32(exact)
    if float(single) * (MAP_LEVELS // step) > 1.0:
        return float(np.nextafter(single, np.float32(0)))
    return exact


def _coarser(levels: np.ndarray, step: int) -> np.ndarray:
    """uint16 engine levels rounded to multiples of ``step`` (counted in steps): round(l / step),
    ties up; for step 257 (a map reaching 1, in uint8) the multiply-shift of u8_of_u16."""
    if step == 257:
        return u8_of_u16(levels)
    wide = levels.astype(np.uint32)
    wide += step // 2
    wide //= step
    return wide


def _levels(precision: str) -> int:
    try:
        return MAP_PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"map precision must be one of {sorted(MAP_PRECISIONS)}, "
                         f"got {precision!r}") from None


def nifti_bytes(array: np.ndarray, affine: np.ndarray, header: Any = None, *,
                description: str = "", slope: float | None = None) -> bytes:
    """``array`` (uint8 labels or float32 maps) as a gzipped NIfTI with ``affine``.

    With the upload's ``header`` the file keeps its NIfTI version, sform/qform fields and codes
    and spatial units, so the affine a reader computes is the upload's, bit for bit; intensity
    scaling, calibration, intent and slice timing are reset so that the stored values are the
    array's. A header whose copy would not give back ``affine`` (fields no writer should have
    produced) is replaced by a fresh one holding ``affine`` as the scanner sform and qform.
    ``slope`` is written as scl_slope (scl_inter 0): a reader's values are ``array * slope``.
    """
    data = np.asarray(array)
    if data.dtype.kind == "f":
        data = data.astype(np.float32, copy=False)
    image = _nifti_image(data, np.asarray(affine, dtype=np.float64), header, description, slope)
    raw = memoryview(image.to_bytes())
    if len(raw) < _PARALLEL_DEFLATE_BYTES or DEFLATE_THREADS == 1:
        return igzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
    step = -(-len(raw) // DEFLATE_THREADS)

    def piece(lo: int) -> list[memoryview]:
        return [raw[lo:lo + step]]

    return gzip_parts([functools.partial(piece, lo) for lo in range(0, len(raw), step)])


def gzip_parts(parts: Sequence[Callable[[], Iterable[bytes | memoryview]]]) -> bytes:
    """One gzip member of the bytes the ``parts`` produce, in order; each part is deflated in
    its own thread (up to DEFLATE_THREADS at once) as a raw deflate stream ended by a sync
    flush (byte-aligned, not final), the last one by the final block, and their CRCs combined.
    Any gzip reader sees one ordinary member; only back-references across a part boundary are
    lost (a few kB on a file of tens of MB)."""

    def deflate(index: int) -> tuple[bytes, int, int]:
        compressor = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
        out, crc, size = [], 0, 0
        for piece in parts[index]():
            out.append(compressor.compress(piece))
            crc = isal_zlib.crc32(piece, crc)
            size += len(piece)
        last = index == len(parts) - 1
        out.append(compressor.flush() if last else compressor.flush(isal_zlib.Z_SYNC_FLUSH))
        return b"".join(out), crc, size

    if len(parts) == 1:
        results = [deflate(0)]
    else:
        with ThreadPoolExecutor(max_workers=min(DEFLATE_THREADS, len(parts)),
                                thread_name_prefix="sfpc-deflate") as pool:
            results = list(pool.map(deflate, range(len(parts))))
    crc, size = 0, 0
    for _, part_crc, part_size in results:
        crc = isal_zlib.crc32_combine(crc, part_crc, part_size) if size else part_crc
        size += part_size
    return b"".join([_GZIP_HEADER, *(r[0] for r in results),
                     struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)])


def _nifti_image(data: np.ndarray, affine: np.ndarray, header: Any, description: str,
                 slope: float | None) -> nib.Nifti1Image:
    """The image :func:`nifti_bytes` writes: on the upload's header when that gives back
    ``affine`` bit for bit, else on a fresh one."""
    if isinstance(header, nib.Nifti1Header):  # Nifti2Header derives from it
        try:
            image = _with_header(data, affine, header)
            _describe(image, data, description, slope)
            head = io.BytesIO()
            image.update_header()
            image.header.write_to(head)
            if _written_affine_equals(head.getvalue(), type(header), affine):
                return image
        except Exception:  # a corrupt field nibabel cannot write: use a fresh header below
            pass
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, affine)
    image.set_data_dtype(data.dtype)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    _describe(image, data, description, slope)
    return image


_XFORM_CODES = (0, 1, 2, 3, 4, 5)


def _with_header(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header
                 ) -> nib.Nifti1Image:
    hdr = header.copy()
    hdr.set_slope_inter(1.0, 0.0)
    for key in ("cal_min", "cal_max", "slice_start", "slice_end", "slice_duration", "toffset",
                "intent_p1", "intent_p2", "intent_p3", "intent_code", "slice_code", "dim_info"):
        hdr[key] = 0
    hdr["intent_name"] = b""
    hdr["aux_file"] = b""
    xyz = int(hdr["xyzt_units"]) & 0x07  # the time bits mean nothing for a 3D mask
    hdr["xyzt_units"] = xyz if xyz in (0, 1, 2, 3) else 2
    for key in ("sform_code", "qform_code"):
        if int(hdr[key]) not in _XFORM_CODES:
            # Readers use any non-zero code's transform; 1 (scanner) keeps that choice valid.
            hdr[key] = 1
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, affine, header=hdr)
    image.set_data_dtype(data.dtype)
    return image


def _written_affine_equals(raw: bytes, header_class: type[nib.Nifti1Header],
                           affine: np.ndarray) -> bool:
    size = 540 if issubclass(header_class, nib.Nifti2Header) else 348
    written = header_class.from_fileobj(io.BytesIO(raw[:size]))
    return bool(np.array_equal(written.get_best_affine(), affine))


def _describe(image: nib.Nifti1Image, data: np.ndarray, description: str,
              slope: float | None = None) -> None:
    header = image.header
    if slope is not None:
        header.set_slope_inter(slope, 0.0)
    if description:
        header["descrip"] = description.encode("ascii", "replace")[:79]
    if data.dtype == np.uint8 and data.size and slope is None:
        # Viewers scale label maps to [cal_min, cal_max]: the label range, not the input's.
        header["cal_min"] = 0
        header["cal_max"] = int(data.max())


def quantise_map(values: np.ndarray) -> np.ndarray:
    """A [0, 1] map as uint16 steps of MAP_STEP (rounded to nearest, clipped), computed in slabs
    so that no float copy of the whole map is made."""
    src = np.asarray(values)
    out = np.empty(src.shape, dtype=np.uint16)
    flat_src, flat_out = src.reshape(-1), out.reshape(-1)
    for start in range(0, flat_src.size, _QUANTISE_VOXELS):
        block = np.clip(flat_src[start:start + _QUANTISE_VOXELS], 0.0, 1.0).astype(np.float32)
        block *= MAP_LEVELS
        block += 0.5
        flat_out[start:start + _QUANTISE_VOXELS] = block  # truncation of x + 0.5: rounding
    return out


def u8_of_u16(levels: np.ndarray) -> np.ndarray:
    """uint16 levels rounded to 255 steps: round(l / 257), since 65535 = 255 x 257, computed as
    (255 l + 32895) >> 16, which equals it for every uint16 (tested exhaustively) at half the
    time of a lookup table."""
    wide = levels.astype(np.uint32)
    wide *= 255
    wide += 32895
    wide >>= 16
    return wide.astype(np.uint8)


def decode_map(levels: np.ndarray) -> np.ndarray:
    """uint16 levels of :func:`quantise_map` back to float32 values in [0, 1] (what a NIfTI
    reader gets from the file's scl_slope), in the levels' memory order."""
    out = np.empty_like(levels, dtype=np.float32)
    np.multiply(levels, np.float32(MAP_STEP), out=out)
    return out


def map_nifti_bytes(values: np.ndarray, affine: np.ndarray, header: Any = None, *,
                    description: str = "", precision: str = "uint16",
                    step: int | None = None) -> bytes:
    """An uncertainty map in [0, 1] as a gzipped ``precision`` (uint8 or uint16) NIfTI whose
    scl_slope decodes it to within :func:`map_file_error` of ``values`` (at most
    :func:`map_max_error`; the step is also written in the description). ``values`` already
    uint16 are taken as :func:`quantise_map` levels. ``step`` (default :func:`map_file_step`):
    engine levels per stored level; the levels are stored as round(level / step).

    The file is streamed: slabs of whole slices are quantised, laid out in the file's (Fortran)
    order and deflated one at a time, so that neither a uint16 copy of the whole map nor its
    uncompressed file ever exists (each would be 200 MB for a 512 x 512 x 400 CT); a large map
    is cut into DEFLATE_THREADS runs of slabs deflated side by side (:func:`gzip_parts`).
    """
    values = np.asarray(values)
    if values.ndim != 3:
        raise ValueError(f"an uncertainty map is 3D, got shape {values.shape}")
    levels = _levels(precision)
    dtype = np.dtype(precision)
    step = map_file_step(values, precision) if step is None else int(step)
    if step < 1:
        raise ValueError(f"step must be >= 1 engine level, got {step}")
    text = f"{description} ({precision} x {step}/{MAP_LEVELS})" if description else ""
    stand_in = np.broadcast_to(np.zeros((), dtype=dtype), values.shape)
    image = _nifti_image(stand_in, np.asarray(affine, dtype=np.float64), header, text,
                         _slope(step))
    image.header.extensions.clear()  # a map carries none of the upload's extensions
    head = io.BytesIO()
    image.update_header()
    image.header.set_data_offset(0)  # recomputed below from the header's own size
    image.header.write_to(head)
    offset = head.tell()
    image.header.set_data_offset(offset)
    head = io.BytesIO()
    image.header.write_to(head)
    header_bytes = head.getvalue()
    rows = max(1, _QUANTISE_VOXELS // max(1, values.shape[0] * values.shape[1]))
    starts = list(range(0, values.shape[2], rows))
    if not starts or values.size == 0:
        return gzip_parts([lambda: [header_bytes]])
    n_parts = DEFLATE_THREADS if values.size * dtype.itemsize >= _PARALLEL_DEFLATE_BYTES else 1
    per_part = -(-len(starts) // n_parts)

    def part(first_slab: int) -> Iterator[bytes]:
        if first_slab == 0:
            yield header_bytes
        for first in starts[first_slab:first_slab + per_part]:
            slab = values[:, :, first:first + rows]
            if slab.dtype != np.uint16:
                slab = quantise_map(slab)
            if step != 1 or dtype != np.uint16:
                slab = _coarser(slab, step)
                if slab.size and int(slab.max()) > levels:  # astype would wrap around
                    raise ValueError(f"a step of {step} engine levels does not fit this map "
                                     f"in {precision} (use map_file_step)")
            yield slab.astype(dtype, copy=False).tobytes(order="F")

    return gzip_parts([functools.partial(part, k) for k in range(0, len(starts), per_part)])


def report_bytes(report: dict[str, Any]) -> bytes:
    """The report as indented UTF-8 JSON (NaN would be invalid JSON: numbers are finite or
    null by construction of the statistics)."""
    return (json.dumps(report, indent=2, allow_nan=False, default=_default) + "\n").encode()


def _default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.name
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def zip_bytes(members: Iterable[tuple[str, bytes | Path]]) -> bytes:
    """A zip of ``(name, bytes or path)`` members; already-compressed members are stored."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members:
            method = (zipfile.ZIP_STORED if name.lower().endswith(_STORED_SUFFIXES)
                      else zipfile.ZIP_DEFLATED)
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            info.external_attr = 0o644 << 16
            data = content if isinstance(content, bytes) else Path(content).read_bytes()
            archive.writestr(info, data)
    return buffer.getvalue()


def dicom_seg_bytes(mask: np.ndarray, volume: Any, class_names: list[str],
                    metadata: Any) -> bytes:
    """A DICOM SEG of ``mask`` referencing the uploaded series (highdicom, via sfpc.server.
    dicom_seg)."""
    import sfpc
    from sfpc.io.dicom_seg import write_seg

    return write_seg(mask, volume, class_names, algorithm_name=f"SFPC {metadata.name}",
                     algorithm_version=str(metadata.version),
                     software_versions=sfpc.__version__)
