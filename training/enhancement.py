"""Simulated intravenous contrast: the one labelled CT is unenhanced, most clinical ones are not.

ct_a, the only labelled CT, was acquired without contrast (liver ~46 HU, spleen ~35 HU, kidneys
~12 HU, aorta blood-dark). A routine abdominal CT is a portal-venous scan: liver ~100-120 HU,
spleen ~110-130 HU, kidneys and vessels brighter still. A model that has only seen ct_a's
intensities under-segments enhanced organs. ct_a's TotalSegmentator label map names every
tissue that enhances, so the enhancement can be simulated per tissue: a random phase strength
``s ~ U(0, 1)`` and, per tissue group, ``s * U(lo, hi)`` HU added to its voxels, smoothed over a
voxel for partial volume. The same table drives the robustness benchmark's "portal venous" shift
(training/shifts.py), which is why that row is optimistic: it tests a model on the simulation it
was trained with, not on a real second scan.

Torch-free (numpy, scipy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sfpc.inference.preprocess import normalise

# TotalSegmentator 2.x 'total' ids per tissue group (ct_a's raw labels).
TOTALSEG_TISSUES: dict[str, tuple[int, ...]] = {
    "artery": (52, 65, 66),  # aorta, iliac arteries
    "vein": (63, 67, 68),  # inferior vena cava, iliac veins
    "portal_vein": (64,),  # portal and splenic vein
    "kidney": (2, 3),
    "spleen": (1,),
    "liver": (5,),
    "pancreas": (7, 8, 9),  # pancreas, adrenal glands
    "stomach": (6,),
    "bowel": (18, 19, 20),  # small bowel, duodenum, colon: the enhancing wall
    "muscle": tuple(range(80, 90)),  # gluteal, autochthonous, iliopsoas muscles
}

# HU added at full phase strength, per group, (lo, hi): portal-venous minus unenhanced values
# from the radiology literature (liver ~+50-60, spleen ~+70, renal parenchyma ~+100-150, aorta
# and portal vein ~+120-150 at 60-70 s), widened to cover arterial-to-late phases.
PORTAL_VENOUS_HU: dict[str, tuple[float, float]] = {
    "artery": (100.0, 250.0),
    "vein": (60.0, 170.0),
    "portal_vein": (80.0, 170.0),
    "kidney": (80.0, 180.0),
    "spleen": (40.0, 110.0),
    "liver": (30.0, 90.0),
    "pancreas": (30.0, 80.0),
    "stomach": (0.0, 40.0),
    "bowel": (0.0, 40.0),
    "muscle": (5.0, 25.0),
}


def tissue_map_for(groups: Sequence[str] | None = None) -> dict[int, str]:
    """Raw TotalSegmentator id -> tissue group name, for a dataset entry's ``tissue_map``."""
    names = list(TOTALSEG_TISSUES) if groups is None else list(groups)
    return {i: name for name in names for i in TOTALSEG_TISSUES[name]}


def group_tissues(label: np.ndarray, tissue_map: Mapping[int, str]
                  ) -> tuple[np.ndarray, tuple[str, ...]]:
    """A raw label's voxels as tissue group indices: ``k`` for ``names[k - 1]``, 0 for voxels of
    no group; ``names`` sorted."""
    names = tuple(sorted(set(tissue_map.values())))
    tissue = np.zeros(label.shape, dtype=np.int16)
    for src, name in tissue_map.items():
        tissue[label == int(src)] = names.index(name) + 1
    return tissue, names


def enhancement_hu(tissue: np.ndarray, names: Sequence[str],
                   added_hu: Mapping[str, float], sigma: float = 0.7) -> np.ndarray:
    """The HU to add: ``added_hu[name]`` on each voxel of tissue ``names[k - 1]`` (``tissue`` holds
    ``k``, 0 = none), smoothed with a Gaussian of ``sigma`` voxels in every axis (partial volume:
    a real enhanced organ has no one-voxel step at its label boundary)."""
    delta = np.zeros(tissue.shape, dtype=np.float32)
    for k, name in enumerate(names, start=1):
        value = float(added_hu.get(name, 0.0))
        if value:
            delta[tissue == k] = value
    if sigma > 0:
        delta = ndimage.gaussian_filter(delta, sigma, mode="nearest")
    return delta


@dataclass(frozen=True)
class ContrastEnhance:
    """Random contrast phase on a normalised CT slice or patch (the training augmentation).

    With probability ``p``: strength ``s ~ U(0, 1)``, each group's HU ``s * U(lo, hi)`` from
    ``ranges``, converted to normalised units by the width of ``window`` (the CT window the
    image was normalised with) and
    added where the normalised image is strictly inside (0, 1): voxels clipped by the window
    (gas below it, bone above) would show an enhancement that the clipping hid, so they keep
    their values. The result is clipped to [0, 1] as the window clips.
    """

    p: float = 0.5
    ranges: Mapping[str, tuple[float, float]] | None = None
    window: tuple[float, float] = (-250.0, 350.0)
    sigma: float = 0.7
    p_fill: float = 0.0

    @property
    def hu_per_unit(self) -> float:
        return float(self.window[1]) - float(self.window[0])

    def __call__(self, image: np.ndarray, tissue: np.ndarray, names: Sequence[str],
                 rng: np.random.Generator) -> np.ndarray:
        # The filling is drawn only when asked for: runs without it keep their random streams.
        if self.p_fill > 0 and "stomach" in names and rng.random() < self.p_fill:
            image = self.fill(image, tissue == names.index("stomach") + 1, rng)
        if rng.random() >= self.p:
            return image
        ranges = PORTAL_VENOUS_HU if self.ranges is None else self.ranges
        strength = float(rng.uniform(0.0, 1.0))
        added = {n: strength * float(rng.uniform(*ranges[n])) for n in names if n in ranges}
        delta = enhancement_hu(tissue, names, added, self.sigma) / np.float32(self.hu_per_unit)
        inside = (image > 0.0) & (image < 1.0)
        out = np.where(inside, image + delta, image)  # delta broadcasts over the channels
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)

    def fill(self, image: np.ndarray, organ: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The stomach's content replaced, inside its wall (the label eroded by one voxel): gas,
        water, positive oral contrast, or an air-fluid level (gas anterior, fluid posterior, as
        in a supine patient; the slice's second axis runs anterior in RAS). ct_a's stomach is
        collapsed and fluid-filled; another patient's may hold any of these."""
        lumen = ndimage.binary_erosion(organ, iterations=1)
        if not lumen.any():
            return image
        n = int(lumen.sum())
        noise = rng.normal(0.0, 10.0, n).astype(np.float32)
        kind = int(rng.integers(4))
        fluid = float(rng.uniform(0.0, 25.0)) if kind != 2 else float(rng.uniform(150.0, 350.0))
        content = np.full(n, fluid, dtype=np.float32) + noise
        if kind == 0:
            content[:] = -900.0
        elif kind == 3:
            ys = np.nonzero(lumen)[1]
            level = rng.uniform(ys.min(), ys.max() + 1)
            content[ys >= level] = -900.0
        out = image.copy()
        out[..., lumen] = normalise(content, {"kind": "ct_window", "window": list(self.window)})
        return out
