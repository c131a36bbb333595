"""Uncertainty maps travel as uint8 (the request default) or uint16 NIfTI with scl_slope: what
every reader decodes (nibabel applies the slope, as ITK and the viewers do) is within the stated
error of the float map, and nothing else about the file changes (shape, affine, header reuse;
masks stay uint8)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from sfpc.io.artefacts import (
    DEFAULT_MAP_PRECISION,
    MAP_MAX_ERROR,
    MAP_PRECISIONS,
    map_max_error,
    map_nifti_bytes,
    nifti_bytes,
    quantise_map,
)

# float32-exact, so that a reused upload header gives back this affine bit for bit.
AFFINE = np.array([[-0.75, 0, 0, 120.0], [0, 0.75, 0, -90.5], [0, 0, 2.5, 33.0], [0, 0, 0, 1]])


def decode(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_the_stated_error_is_half_a_step_of_65535():
    assert MAP_MAX_ERROR == pytest.approx(0.5 / 65535, abs=2e-7)


def test_decoded_map_is_within_the_stated_error_everywhere():
    rng = np.random.default_rng(3)
    values = rng.random((40, 31, 9), dtype=np.float32)
    values[0, 0, :3] = [0.0, 1.0, 0.5 / 65535]  # the ends and a value on a rounding edge
    image = decode(map_nifti_bytes(values, AFFINE, description="entropy"))
    assert image.get_data_dtype() == np.uint16
    decoded = image.get_fdata(dtype=np.float64)
    assert decoded.shape == values.shape
    assert np.abs(decoded - values).max() <= MAP_MAX_ERROR
    # 1 decodes to 65535 x float32(1/65535), a hair below 1.
    assert decoded[0, 0, 0] == 0.0 and decoded[0, 0, 1] == pytest.approx(1.0, abs=1e-8)
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)


def test_quantisation_rounds_to_nearest_and_clips_by_hand():
    # 65535 steps: 0.25 -> 16383.75 -> 16384; 0.1 -> 6553.5 -> 6554 (half rounds up);
    # out-of-range values (none should occur: maps are normalised) are clipped, NaN-free input.
    q = quantise_map(np.array([0.25, 0.1, -0.2, 1.7, 1.0, 0.0], dtype=np.float32))
    assert q.tolist() == [16384, 6554, 0, 65535, 65535, 0]


def test_slabs_give_the_same_result_as_one_pass(monkeypatch):
    import sfpc.io.artefacts as artefacts

    values = np.random.default_rng(5).random((17, 13, 11), dtype=np.float32)
    whole = artefacts.quantise_map(values)
    monkeypatch.setattr(artefacts, "_QUANTISE_VOXELS", 100)  # many small slabs
    np.testing.assert_array_equal(artefacts.quantise_map(values), whole)
    expected = np.floor(values.astype(np.float64) * 65535 + 0.5).astype(np.uint16)
    assert np.abs(whole.astype(int) - expected.astype(int)).max() <= 1  # float32 products


def test_upload_header_is_kept_and_slope_applies():
    upload = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), AFFINE)
    upload.header.set_qform(AFFINE, code=1)
    upload.header.set_sform(AFFINE, code=4)  # MNI: the reused header keeps it
    upload.header.set_slope_inter(2.0, -1024.0)  # the CT's own scaling must not leak through
    values = np.linspace(0, 1, 120, dtype=np.float32).reshape(6, 5, 4)
    image = decode(map_nifti_bytes(values, AFFINE, upload.header))
    assert int(image.header["sform_code"]) == 4
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)
    assert np.abs(image.get_fdata() - values).max() <= MAP_MAX_ERROR


def test_masks_are_unchanged_uint8_without_slope():
    mask = np.random.default_rng(7).integers(0, 4, (8, 9, 10)).astype(np.uint8)
    image = decode(nifti_bytes(mask, AFFINE))
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj), mask)
    assert image.dataobj.slope == 1.0 and image.dataobj.inter == 0.0


def test_the_map_file_is_smaller_than_float32():
    values = np.zeros((64, 64, 32), np.float32)
    values[16:48, 16:48, 8:24] = np.random.default_rng(9).random((32, 32, 16))
    as_float = nifti_bytes(values, AFFINE)
    assert len(map_nifti_bytes(values, AFFINE)) < 0.75 * len(as_float)


@pytest.mark.parametrize("kind", ["fresh", "nifti1", "nifti2"])
def test_streamed_map_file_is_what_nibabel_writes(kind, monkeypatch):
    """The map is written slab by slab; nibabel writing the whole quantised array with the same
    header is the oracle, byte for byte once decompressed."""
    import sfpc.io.artefacts as artefacts

    values = np.random.default_rng(11).random((13, 7, 23), dtype=np.float32)
    header = None
    if kind != "fresh":
        image_class = nib.Nifti1Image if kind == "nifti1" else nib.Nifti2Image
        header = image_class(np.zeros((13, 7, 23), np.int16), AFFINE).header
    monkeypatch.setattr(artefacts, "_QUANTISE_VOXELS", 13 * 7 * 4)  # slabs of 4 slices
    streamed = gzip.decompress(map_nifti_bytes(values, AFFINE, header, description="entropy"))
    whole = gzip.decompress(nifti_bytes(quantise_map(values), AFFINE, header,
                                        description="entropy (uint16 x 1/65535)",
                                        slope=1 / 65535))
    assert streamed == whole
    image = nib.Nifti2Image.from_bytes(streamed) if kind == "nifti2" else \
        nib.Nifti1Image.from_bytes(streamed)
    assert np.abs(image.get_fdata() - values).max() <= MAP_MAX_ERROR


# ----------------------------------------------------------------------------------------------
# 8-bit maps (map_precision "uint8", the request default)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fresh", "nifti1", "nifti2"])
def test_uint8_maps_decode_within_their_stated_error(kind):
    rng = np.random.default_rng(13)
    values = rng.random((21, 17, 9), dtype=np.float32)
    values[0, 0, :3] = [0.0, 1.0, 0.5 / 255]  # the ends and a value on a rounding edge
    header = None
    if kind != "fresh":
        image_class = nib.Nifti1Image if kind == "nifti1" else nib.Nifti2Image
        header = image_class(np.zeros(values.shape, np.int16), AFFINE).header
    error = map_max_error("uint8")
    assert error == pytest.approx(0.5 / 255 + 0.5 / 65535, abs=2e-7)
    for given in (values, quantise_map(values)):  # float maps, or the engine's uint16 levels
        raw = gzip.decompress(map_nifti_bytes(given, AFFINE, header, description="entropy",
                                              precision="uint8"))
        image = (nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image).from_bytes(raw)
        assert image.get_data_dtype() == np.uint8
        decoded = image.get_fdata(dtype=np.float64)
        assert np.abs(decoded - values).max() <= error
        assert 0.0 <= decoded.min() and decoded.max() <= 1.0  # the top level is not above 1
        assert decoded[0, 0, 1] == pytest.approx(1.0, abs=1e-6)
        assert b"uint8 x 257/65535" in image.header["descrip"].tobytes()  # 1/255
        # A map is not a label image: no cal range for viewers to window labels by.
        assert float(image.header["cal_max"]) == 0.0
        np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)


def test_uint8_levels_are_the_uint16_levels_rounded_by_hand():
    # 65535 = 255 x 257: uint16 level l is uint8 level round(l / 257); 128 / 257 rounds down,
    # 129 / 257 up, and 65535 stays the top.
    levels = np.array([0, 128, 129, 385, 386, 65535], dtype=np.uint16).reshape(1, 1, 6)
    image = decode(map_nifti_bytes(levels, AFFINE, precision="uint8"))
    assert np.asarray(image.dataobj.get_unscaled()).ravel().tolist() == [0, 0, 1, 1, 2, 255]


def test_unknown_map_precision_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        map_nifti_bytes(np.zeros((2, 2, 2), np.float32), AFFINE, precision="float16")


def test_the_request_option_offers_exactly_the_stored_precisions():
    import typing

    from sfpc.inference.options import MapPrecision, SegmentOptions

    assert set(typing.get_args(MapPrecision)) == set(MAP_PRECISIONS)
    assert SegmentOptions().map_precision == DEFAULT_MAP_PRECISION == "uint8"


def test_u8_of_u16_is_round_of_l_over_257_for_every_level():
    from sfpc.io.artefacts import u8_of_u16

    levels = np.arange(65536, dtype=np.uint16)
    expected = np.floor(levels.astype(np.float64) / 257 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(u8_of_u16(levels), expected)


# ----------------------------------------------------------------------------------------------
# Deflate in parallel pieces: one ordinary gzip member
# ----------------------------------------------------------------------------------------------


def _one_member(data: bytes) -> bytes:
    """The member's content, checking (as zlib does) CRC and size, and that nothing follows."""
    import zlib

    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    content = reader.decompress(data) + reader.flush()
    assert reader.eof and reader.unused_data == b""
    return content


def test_gzip_parts_is_one_member_of_the_parts_in_order():
    from sfpc.io.artefacts import gzip_parts

    rng = np.random.default_rng(21)
    pieces = [rng.integers(0, 4, n, dtype=np.uint8).tobytes() for n in (70_000, 1, 0, 33_333)]
    # Repeats across the boundaries, which no part can refer back to.
    pieces[1] = pieces[0][:5000]
    data = gzip_parts([(lambda p=p: [p[:100], p[100:]]) for p in pieces])
    assert _one_member(data) == b"".join(pieces)
    assert gzip.decompress(data) == b"".join(pieces)  # the stdlib reader agrees
    assert data[4:8] == b"\0\0\0\0"  # mtime 0: the bytes do not depend on the clock
    assert gzip_parts([lambda: pieces]) != data  # one part: a different but equal stream
    assert _one_member(gzip_parts([lambda: pieces])) == b"".join(pieces)


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_deflate_changes_no_decoded_byte(threads, monkeypatch):
    import sfpc.io.artefacts as artefacts

    values = np.random.default_rng(23).random((19, 11, 30), dtype=np.float32)
    mask = (values > 0.5).astype(np.uint8)
    serial = {"map": _one_member(map_nifti_bytes(values, AFFINE, precision="uint8")),
              "mask": _one_member(nifti_bytes(mask, AFFINE))}
    monkeypatch.setattr(artefacts, "_PARALLEL_DEFLATE_BYTES", 1)
    monkeypatch.setattr(artefacts, "DEFLATE_THREADS", threads)
    monkeypatch.setattr(artefacts, "_QUANTISE_VOXELS", 19 * 11 * 4)  # slabs of 4 slices
    assert _one_member(map_nifti_bytes(values, AFFINE, precision="uint8")) == serial["map"]
    assert _one_member(nifti_bytes(mask, AFFINE)) == serial["mask"]
    empty = np.zeros((4, 4, 0), np.float32)
    image = nib.Nifti1Image.from_bytes(_one_member(map_nifti_bytes(empty, AFFINE)))
    assert image.shape == (4, 4, 0)


def test_a_map_of_small_values_keeps_its_resolution_in_uint8():
    """The mutual information of a confident model peaks near 0.002: in steps of 1/255 it would
    be all zeros. Its uint8 file spans just its own range (step worked by hand)."""
    from sfpc.io.artefacts import map_file_error, map_file_step

    rng = np.random.default_rng(29)
    values = (rng.random((16, 12, 10)) * 0.002).astype(np.float32)
    values[0, 0, 0] = 0.0023  # level 150.7 -> 151: one engine level per stored level
    levels = quantise_map(values)
    assert int(levels.max()) == 151 and map_file_step(levels, "uint8") == 1
    image = decode(map_nifti_bytes(levels, AFFINE, precision="uint8", description="MI"))
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj.get_unscaled()), levels)
    assert np.abs(image.get_fdata() - values).max() <= map_file_error(1) == MAP_MAX_ERROR
    assert b"uint8 x 1/65535" in image.header["descrip"].tobytes()
    # A map reaching 0.5 (level 32768): ceil(32768 / 255) = 129 engine levels per stored level.
    values[0, 0, 1] = 0.5
    levels = quantise_map(values)
    step = map_file_step(levels, "uint8")
    assert step == 129
    image = decode(map_nifti_bytes(levels, AFFINE, precision="uint8"))
    expected = np.floor((levels.astype(np.int64) + 64) / 129)
    np.testing.assert_array_equal(np.asarray(image.dataobj.get_unscaled()), expected)
    assert np.abs(image.get_fdata() - values).max() <= map_file_error(step) \
        < map_max_error("uint8")
    with pytest.raises(ValueError, match="does not fit"):  # a step too fine for this map
        map_nifti_bytes(levels, AFFINE, precision="uint8", step=1)
