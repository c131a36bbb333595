"""NIfTI-1 / NIfTI-2 uploads to a :class:`Volume` (outputs are written by :mod:`sfpc.io.artefacts`).

The affine is nibabel's ``img.affine`` (sform if its code is set, else qform, else voxel sizes
only), voxel values are nibabel's scaled data (``scl_slope``/``scl_inter`` applied) in native byte
order, and the dtype is kept otherwise (integer label maps stay integer).

Dimensions: 3D is the norm; 2D comes back as ``(X, Y, 1)`` for ``Limits.min_spatial`` to accept or
refuse; a 4th dimension of length 1 is dropped; a 4th (or 5th, NIfTI's vector dimension) of length
``2..max_channels`` becomes the channel axis of a ``(C, X, Y, Z)`` array; anything else is a 422.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from sfpc.errors import MALFORMED, UNPROCESSABLE, UNSUPPORTED, UploadError
from sfpc.io.sniff import NIFTI1, NIFTI2
from sfpc.io.volume import (
    Limits,
    Volume,
    check_affine,
    check_finite,
    check_min_spatial,
    check_size,
)

_CIFTI_INTENTS = range(3000, 3100)


def decode_nifti(name: str, data: bytes, kind: str, limits: Limits,
                 max_channels: int = 1) -> Volume:
    """Decode one uncompressed NIfTI file's bytes (``kind`` from :func:`sniff.sniff`)."""
    image_class = {NIFTI1: nib.Nifti1Image, NIFTI2: nib.Nifti2Image}[kind]
    try:
        img = image_class.from_bytes(data)
        header = img.header
        shape = tuple(int(n) for n in img.shape)
        dtype = np.dtype(header.get_data_dtype())
        intent = int(header["intent_code"])
    except Exception as exc:  # nibabel raises many types on corrupt headers
        raise UploadError(MALFORMED, "bad_nifti",
                          f"{name} is not a readable NIfTI file ({_why(exc)})") from exc
    if intent in _CIFTI_INTENTS:
        raise UploadError(
            UNSUPPORTED, "cifti",
            f"{name} is a CIFTI file (surface/grayordinate data), not a volume image",
        )
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise UploadError(
            UNSUPPORTED, "unsupported_dtype",
            f"{name} stores {_dtype_words(dtype)} voxels; send a greyscale integer or "
            "floating-point image",
        )
    spatial, channels = _layout(name, shape, max_channels)
    # The proxy knows the real offset (a header's vox_offset of 0 means "right after it").
    expected = len(data) - int(getattr(img.dataobj, "offset", header.get_data_offset()))
    needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected < needed:
        raise UploadError(
            MALFORMED, "truncated_nifti",
            f"{name} is truncated: its header describes {needed:,} bytes of voxels "
            f"(shape {shape}, {dtype}) but only {max(0, expected):,} follow the header",
        )
    check_size(spatial, channels, max(dtype.itemsize, 4), limits)
    affine = check_affine(img.affine, f"the affine of {name}")
    try:
        array = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise UploadError(MALFORMED, "bad_nifti",
                          f"the voxel data of {name} could not be read ({_why(exc)})") from exc
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    array = _arrange(array, spatial, channels)
    check_finite(array)
    check_min_spatial(spatial, limits)
    warnings = []
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        warnings.append(
            f"{name} has neither an sform nor a qform: orientation unknown, voxel sizes only "
            "(treated as RAS)"
        )
    return Volume(array=array, affine=affine, source="nifti", nifti_header=header.copy(),
                  warnings=warnings)


def _layout(name: str, shape: tuple[int, ...], max_channels: int) -> tuple[tuple[int, ...], int]:
    """(spatial shape, channels) of a NIfTI image of ``shape``, or a 422 saying why not."""
    if len(shape) < 2 or min(shape) < 1:
        raise UploadError(UNPROCESSABLE, "bad_dimensions",
                          f"{name} has shape {shape}; expected a 3D volume")
    if len(shape) == 2:
        return (shape[0], shape[1], 1), 1
    spatial = shape[:3]
    extra = [n for n in shape[3:]]
    # NIfTI keeps dim 4 for time and dim 5 for vector components; one of them may hold channels.
    extra_non_unit = [n for n in extra if n != 1]
    if not extra_non_unit:
        return spatial, 1
    if len(shape) > 5 or len(extra_non_unit) > 1:
        raise UploadError(
            UNPROCESSABLE, "bad_dimensions",
            f"{name} has shape {shape}: more than one non-spatial dimension; send a 3D volume",
        )
    n = extra_non_unit[0]
    if n > max_channels:
        allowed = ("this model takes one channel" if max_channels == 1
                   else f"this model takes at most {max_channels} channels")
        raise UploadError(
            UNPROCESSABLE, "too_many_volumes",
            f"{name} is 4D with {n} volumes (shape {shape}); {allowed}: send a single 3D volume",
        )
    return spatial, n


def _arrange(array: np.ndarray, spatial: tuple[int, ...], channels: int) -> np.ndarray:
    if channels == 1:
        return array.reshape(spatial)
    stacked = array.reshape(*spatial, channels)
    return np.ascontiguousarray(np.moveaxis(stacked, -1, 0))


def _dtype_words(dtype: np.dtype) -> str:
    if dtype.fields is not None:
        return "RGB/RGBA colour" if len(dtype.fields) in (3, 4) else f"structured ({dtype})"
    if dtype.kind == "c":
        return "complex"
    return str(dtype)


def _why(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."
