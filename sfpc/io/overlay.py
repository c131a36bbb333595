"""A PNG montage that shows at a glance what the model segmented and where it is unsure.

Axial slices through the segmented structure (evenly spaced from its lowest to its highest slice;
through the whole volume when nothing was found), each showing the image in grey, the predictive
entropy as a heat map (transparent where the model is confident) and the mask's outline in one
colour per class. Slices are shown in the radiological convention (patient's right on the
viewer's left, anterior at the top) with square millimetres, whatever the upload's voxel order
and spacing, and each tile names its slice index along the upload's own array axis. A header holds
the title, the class legend (with volumes) and the heat-map scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from PIL import Image, ImageDraw, ImageFont

from sfpc.io.artefacts import ENCODE_THREADS
from sfpc.io.png import encode_png

# Outline colours, chosen to stand out on grey and on the red-yellow heat map.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 230, 255),  # cyan
    (60, 255, 60),  # green
    (255, 60, 255),  # magenta
    (70, 130, 255),  # blue
    (255, 255, 255),  # white
    (160, 255, 200),  # mint
    (190, 120, 255),  # violet
    (255, 160, 200),  # pink
)
# Heat map anchors (value, RGB): dark red -> red -> orange -> yellow, as in "hot" colour maps.
_HEAT_ANCHORS = ((0.0, (120, 0, 0)), (0.35, (230, 20, 0)), (0.7, (255, 150, 0)),
                 (1.0, (255, 255, 80)))
# Entropy below this is drawn transparent (confident voxels stay plain grey); the opacity ramps
# up to HEAT_ALPHA at HEAT_FULL.
HEAT_FLOOR = 0.05
HEAT_FULL = 0.5
HEAT_ALPHA = 0.55
BACKGROUND = (18, 18, 22)
TEXT = (235, 235, 235)
MUTED = (160, 160, 170)
# Threads the tiles are rendered in. Since the outlines and blend got cheap, 12 tiles of 20 CT
# slices gain nothing from a second core (0.065 s on one thread, 0.066 s on two;
# benchmarks/encode_parts.py); larger tiles or more classes would.
TILE_THREADS = ENCODE_THREADS


def _lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    stops = np.array([a for a, _ in _HEAT_ANCHORS])
    colours = np.array([c for _, c in _HEAT_ANCHORS], dtype=np.float64)
    return np.stack([np.interp(x, stops, colours[:, i]) for i in range(3)], axis=1).astype(
        np.uint8)


HEAT_LUT = _lut()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def class_colour(label: int) -> tuple[int, int, int]:
    """Outline colour of foreground class ``label`` (1-based)."""
    return CLASS_COLOURS[(label - 1) % len(CLASS_COLOURS)]


def choose_slices(mask: np.ndarray, max_slices: int) -> tuple[list[int], bool]:
    """Indices along the last axis to show: evenly through the foreground's extent (and whether
    any foreground was found), else evenly through the volume."""
    # A reduction over the view: a reshape of a reoriented (non-contiguous) mask would copy it.
    present = np.flatnonzero(np.asarray(mask).any(axis=tuple(range(mask.ndim - 1))))
    found = present.size > 0
    first, last = (int(present[0]), int(present[-1])) if found else (0, mask.shape[-1] - 1)
    count = min(max_slices, last - first + 1)
    picks = np.unique(np.round(np.linspace(first, last, count)).astype(int))
    return [int(k) for k in picks], found


def _window(image: np.ndarray) -> tuple[float, float]:
    """0.5th-99.5th percentile of the image (a subsample: a CT has tens of millions of voxels).

    The subsample is a strided view along every axis: flattening a reoriented, non-contiguous
    image would copy all of it first (2.7 s of a 512^2 x 400 overlay)."""
    step = max(1, math.ceil((image.size / 2_000_000) ** (1.0 / max(1, image.ndim))))
    sample = image[(slice(None, None, step),) * image.ndim]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def zoom_box(mask_ras: np.ndarray, spacing_xy: Sequence[float], margin_mm: float = 25.0,
             ) -> tuple[slice, slice] | None:
    """In-plane (x, y) crop around the foreground of every slice, square in mm, when the
    structure is small enough that the whole field of view would shrink it to a few pixels;
    None to show the whole slice."""
    fg: np.ndarray = np.any(mask_ras, axis=2)
    if not fg.any():
        return None
    extent_mm, centre = [], []
    for axis, sp in enumerate(spacing_xy):
        hits = np.flatnonzero(fg.any(axis=1 - axis))
        extent_mm.append((hits[-1] - hits[0] + 1) * sp)
        centre.append((hits[0] + hits[-1] + 1) / 2.0)
    side_mm = max(extent_mm) * 1.5 + 2 * margin_mm
    fov_mm = [n * sp for n, sp in zip(fg.shape, spacing_xy, strict=True)]
    if side_mm > 0.7 * min(fov_mm):
        return None
    box = []
    for axis, sp in enumerate(spacing_xy):
        half = side_mm / sp / 2.0
        lo = int(round(centre[axis] - half))
        hi = int(round(centre[axis] + half))
        shift = max(0, -lo) - max(0, hi - fg.shape[axis])  # keep the square inside the image
        box.append(slice(max(0, lo + shift), min(fg.shape[axis], hi + shift)))
    return box[0], box[1]


def _unit(values: np.ndarray) -> np.ndarray:
    """A slice of the uncertainty map as float in [0, 1] (uint16 levels decoded)."""
    if values.dtype == np.uint16:
        return values.astype(np.float32) / np.float32(65535)
    return values


def _display(slice_xy: np.ndarray) -> np.ndarray:
    """A RAS (x, y) slice as screen rows/columns: anterior up, patient's right on the left."""
    return slice_xy.T[::-1, ::-1]


def _tile_size(shape_xy: Sequence[int], spacing_xy: Sequence[float], tile: int) -> tuple[int, int]:
    width_mm = shape_xy[0] * spacing_xy[0]
    height_mm = shape_xy[1] * spacing_xy[1]
    scale = tile / max(width_mm, height_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def outline_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Where each class's outline is drawn: ``labels``'s class k on a 2-3 px line along the
    inside of its boundary, 0 elsewhere (uint8, same shape).

    A pixel of class k is on its boundary when a 4-neighbour has another label, or it lies on
    the image edge; the line is that boundary grown by one pixel (4-neighbours), and where the
    lines of two classes cross the higher class is drawn. These are, per class, a binary
    erosion and dilation with the cross, drawn in class order (the test's oracle), done for all
    classes at once in a few comparisons of shifted arrays instead of two filters per class."""
    lab = np.asarray(labels)
    boundary = np.zeros(lab.shape, bool)
    boundary[0], boundary[-1], boundary[:, 0], boundary[:, -1] = True, True, True, True
    across = lab[1:] != lab[:-1]
    boundary[1:] |= across
    boundary[:-1] |= across
    along = lab[:, 1:] != lab[:, :-1]
    boundary[:, 1:] |= along
    boundary[:, :-1] |= along
    edge = np.where(boundary & (lab < num_classes), lab, 0).astype(np.uint8)
    line = edge.copy()
    np.maximum(line[1:], edge[:-1], out=line[1:])
    np.maximum(line[:-1], edge[1:], out=line[:-1])
    np.maximum(line[:, 1:], edge[:, :-1], out=line[:, 1:])
    np.maximum(line[:, :-1], edge[:, 1:], out=line[:, :-1])
    return line


def _palette(num_classes: int) -> np.ndarray:
    return np.array([(0, 0, 0)] + [class_colour(k) for k in range(1, max(1, num_classes))],
                    dtype=np.uint8)


def _render_tile(grey: np.ndarray, labels: np.ndarray, heat: np.ndarray | None,
                 size: tuple[int, int], num_classes: int) -> np.ndarray:
    """The tile's RGB pixels (uint8, rows x columns x 3)."""
    grey_img = Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR)
    rgb = np.repeat(np.asarray(grey_img)[..., None], 3, axis=2)
    if heat is not None:
        heat_img = Image.fromarray(heat.astype(np.float32), mode="F").resize(
            size, Image.Resampling.BILINEAR)
        h = np.clip(np.asarray(heat_img), 0.0, 1.0)
        # Below HEAT_FLOOR the heat is transparent (alpha 0 leaves the grey as it is): blended
        # where it shows only, most of a confident slice.
        shown = h > HEAT_FLOOR
        hs = h[shown]
        alpha = (np.clip((hs - HEAT_FLOOR) / (HEAT_FULL - HEAT_FLOOR), 0.0, 1.0)
                 * HEAT_ALPHA)[:, None]
        colours = HEAT_LUT[(hs * 255).astype(np.uint8)].astype(np.float32)
        blended = rgb[shown].astype(np.float32) * (1 - alpha) + colours * alpha
        rgb[shown] = np.clip(blended, 0, 255).astype(np.uint8)
    lab = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
    line = outline_labels(lab, num_classes)
    drawn = line > 0
    rgb[drawn] = _palette(num_classes)[line[drawn]]
    return rgb


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str,
           font: ImageFont.ImageFont | ImageFont.FreeTypeFont, fill=TEXT) -> None:
    box = draw.textbbox(xy, text, font=font)
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
    draw.text(xy, text, font=font, fill=fill)


def render_overlay(
    image: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    class_names: Sequence[str],
    *,
    uncertainty: np.ndarray | None = None,
    volumes_ml: Mapping[str, float] | None = None,
    title: str = "",
    max_slices: int = 12,
    columns: int = 4,
    tile: int = 240,
) -> bytes:
    """The montage as PNG bytes.

    ``image`` is (X, Y, Z) or channel-first (C, X, Y, Z) (channel 0 is shown), ``mask`` the
    uint8 labels and ``uncertainty`` the normalised predictive entropy on the same grid (float
    in [0, 1], or uint16 levels of :func:`sfpc.io.artefacts.quantise_map`, decoded per slice);
    ``affine`` maps voxels to RAS+ mm. ``volumes_ml`` (class name -> mL) goes in the legend.
    """
    img = np.asarray(image)
    if img.ndim == 4:
        img = img[0]
    labels = np.asarray(mask)
    if img.shape != labels.shape:
        raise ValueError(f"image shape {img.shape} != mask shape {labels.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(aff)
    transform = ornt_transform(ornt, axcodes2ornt("RAS"))
    img_ras = apply_orientation(img, transform)
    lab_ras = apply_orientation(labels, transform)
    unc_ras = None if uncertainty is None else apply_orientation(np.asarray(uncertainty),
                                                                 transform)
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    spacing_ras = [0.0, 0.0, 0.0]
    for axis in range(3):
        spacing_ras[int(transform[axis, 0])] = float(zooms[axis])
    # The upload's own axis (and direction) that the axial index runs along, for slice labels.
    source_axis = int(np.flatnonzero(transform[:, 0] == 2)[0])
    flipped = transform[source_axis, 1] < 0
    n_source = img.shape[source_axis]

    picks, found = choose_slices(lab_ras, max_slices)
    lo, hi = _window(img_ras)
    crop = zoom_box(lab_ras, spacing_ras[:2])
    if crop is not None:
        img_ras, lab_ras = img_ras[crop], lab_ras[crop]
        unc_ras = None if unc_ras is None else unc_ras[crop]
    size = _tile_size(img_ras.shape[:2], spacing_ras[:2], tile)
    num_classes = len(class_names)

    columns = max(1, min(columns, len(picks)))
    rows = math.ceil(len(picks) / columns)
    gap = 6
    legend_rows = max(1, math.ceil((num_classes - 1) / 3))
    header = 64 + 22 * legend_rows + 40
    footer = 38
    width = max(columns * (size[0] + gap) + gap, 640)
    height = header + rows * (size[1] + gap) + gap + footer
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    big, small, tiny = _font(20), _font(14), _font(12)

    # Header: what this is, the classes, the heat scale.
    draw.text((gap + 4, 8), title or "SFPC segmentation", font=big, fill=TEXT)
    subtitle = ("axial slices through the segmented structure" if found else
                "no structure found: axial slices through the whole volume")
    if crop is not None:
        width_mm = (crop[0].stop - crop[0].start) * spacing_ras[0]
        subtitle += f", zoomed on it ({width_mm:.0f} mm field of view)"
    draw.text((gap + 4, 34), subtitle, font=small, fill=MUTED)
    y = 60
    for i, k in enumerate(range(1, num_classes)):
        col, row = i % 3, i // 3
        x0, y0 = gap + 4 + col * 210, y + row * 22
        draw.rectangle((x0, y0 + 3, x0 + 22, y0 + 15), outline=class_colour(k), width=3)
        name = str(class_names[k])
        if volumes_ml is not None and name in volumes_ml:
            name = f"{name}  {volumes_ml[name]:.1f} mL"
        draw.text((x0 + 30, y0), name, font=small, fill=TEXT)
    y += 22 * legend_rows + 6
    if unc_ras is not None:
        draw.text((gap + 4, y + 2), "uncertainty (entropy / ln K)", font=small, fill=TEXT)
        bar_x, bar_w = gap + 220, 200
        for i in range(bar_w):
            v = i / (bar_w - 1)
            alpha = min(max((v - HEAT_FLOOR) / (HEAT_FULL - HEAT_FLOOR), 0.0), 1.0) * HEAT_ALPHA
            base = np.array([110, 110, 110], dtype=np.float64)
            colour = base * (1 - alpha) + HEAT_LUT[int(v * 255)] * alpha
            draw.line((bar_x + i, y + 4, bar_x + i, y + 18), fill=tuple(int(c) for c in colour))
        draw.text((bar_x - 2, y + 20), "0", font=tiny, fill=MUTED)
        draw.text((bar_x + bar_w // 2 - 10, y + 20), "0.5", font=tiny, fill=MUTED)
        draw.text((bar_x + bar_w - 6, y + 20), "1", font=tiny, fill=MUTED)
    else:
        draw.text((gap + 4, y + 2), "uncertainty not requested: outlines only", font=small,
                  fill=MUTED)

    def tile_of(k: int) -> np.ndarray:
        grey = np.clip((_display(img_ras[:, :, k]).astype(np.float32) - lo) / (hi - lo), 0, 1)
        heat = None if unc_ras is None else _display(_unit(unc_ras[:, :, k]))
        return _render_tile((grey * 255).astype(np.uint8),
                            np.ascontiguousarray(_display(lab_ras[:, :, k])).astype(np.uint8),
                            None if heat is None else np.ascontiguousarray(heat),
                            size, num_classes)

    # Tiles are independent and numpy and PIL release the GIL for most of their work: rendered
    # side by side, then drawn on the canvas in order.
    with ThreadPoolExecutor(max_workers=TILE_THREADS, thread_name_prefix="sfpc-overlay") as pool:
        tiles = list(pool.map(tile_of, picks))
    for index, (k, tile_img) in enumerate(zip(picks, tiles, strict=True)):
        row, col = divmod(index, columns)
        x0 = gap + col * (size[0] + gap)
        y0 = header + gap + row * (size[1] + gap)
        canvas.paste(Image.fromarray(tile_img), (x0, y0))
        source_index = n_source - 1 - k if flipped else k
        _label(draw, (x0 + 5, y0 + size[1] - 18), f"slice {source_index} (0-{n_source - 1})",
               tiny)
        if index == 0:  # orientation letters once: the convention is the same on every tile
            _label(draw, (x0 + 4, y0 + size[1] // 2 - 7), "R", tiny, fill=(255, 230, 120))
            _label(draw, (x0 + size[0] - 12, y0 + size[1] // 2 - 7), "L", tiny,
                   fill=(255, 230, 120))
            _label(draw, (x0 + size[0] // 2 - 4, y0 + 4), "A", tiny, fill=(255, 230, 120))
    notes = [f"slice index along axis {source_axis} of the upload; outlines: predicted mask",
             "radiological view: patient's right on the left, anterior at the top"]
    for i, note in enumerate(notes):
        draw.text((gap + 4, height - footer + 4 + 15 * i), note, font=tiny, fill=MUTED)
    return encode_png(np.asarray(canvas))
