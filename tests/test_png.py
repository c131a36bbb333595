"""The PNG writer: Pillow (libpng's rules, CRCs checked) reads back exactly the pixels given."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from sfpc.io.png import encode_png

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _read(data: bytes) -> tuple[Image.Image, np.ndarray]:
    with Image.open(io.BytesIO(data)) as checked:
        checked.verify()  # chunk CRCs and structure
    image = Image.open(io.BytesIO(data))
    image.load()
    return image, np.asarray(image)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (29, 1), (64, 50)])
def test_pixels_read_back_exactly(channels: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(channels * 100 + shape[0])
    pixels = rng.integers(0, 256, size=(*shape, channels), dtype=np.uint8)
    # Flat runs and wrap-around differences (255 above 0) beside the noise.
    pixels[: shape[0] // 2] = 255
    pixels[shape[0] // 2:, : shape[1] // 3] = 0
    image, back = _read(encode_png(pixels if channels > 1 else pixels[..., 0]))
    assert image.mode == MODES[channels] and image.size == (shape[1], shape[0])
    np.testing.assert_array_equal(back.reshape(pixels.shape), pixels)


def test_idat_is_a_zlib_stream_of_up_filtered_rows() -> None:
    """The PNG container worked by hand: signature, IHDR fields, one IDAT whose zlib stream
    holds each row as filter byte 2 then the byte-wise difference to the row above."""
    pixels = np.array([[[10, 20, 30], [250, 0, 5]],
                       [[12, 18, 30], [1, 255, 5]]], dtype=np.uint8)
    data = encode_png(pixels)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[8:16] == b"\x00\x00\x00\x0dIHDR"
    assert data[16:29] == bytes([0, 0, 0, 2, 0, 0, 0, 2, 8, 2, 0, 0, 0])
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4:start], "big")
    raw = zlib.decompress(data[start + 4:start + 4 + length])
    assert raw == bytes([2, 10, 20, 30, 250, 0, 5,
                         2, 2, 254, 0, 7, 255, 0])  # (12-10, 18-20 mod 256, ...)
    assert data.endswith(b"\x00\x00\x00\x00IEND\xaeB`\x82")


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 5), np.uint8),
                                 np.zeros((0, 4), np.uint8), np.zeros(4, np.uint8)])
def test_refuses_what_it_cannot_write(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="PNG pixels"):
        encode_png(bad)
