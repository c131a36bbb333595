"""From a TrainConfig to what the trainer consumes: the two-stream loader and validation cases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfpc.inference.contract import plane_axis
from sfpc.training.config import TrainConfig
from sfpc.training.data import (
    IntensityAugment,
    PatchDataset3D,
    SliceDataset2D,
    TwoStreamLoader,
    discover_cases,
    load_eval_cases,
    load_or_make_split,
    load_volumes,
)
from sfpc.training.enhancement import ContrastEnhance


@dataclass
class TrainData:
    loader: TwoStreamLoader
    val_cases: list[dict[str, Any]]
    in_channels: int  # the network's: the image's channels times the slices stacked (2.5D)
    num_classes: int
    class_names: list[str]
    n_labelled: int
    n_unlabelled: int
    split_path: Path


def resample_axes(cfg: TrainConfig) -> tuple[int, ...] | None:
    """2D models resample in-plane only: the slice axis keeps its native spacing. 2.5D models
    (``context_slices``) resample it too, so that their neighbours are a fixed distance apart
    (the engine's rule, sfpc.inference.engine._target_spacing)."""
    if cfg.spatial_dims == 2 and not cfg.context_slices:
        return tuple(a for a in range(3) if a != plane_axis(cfg.plane))
    return None


def context_margin(cfg: TrainConfig) -> int:
    """Axial slices to keep on each side of a cropped slab: a 2.5D model's neighbours. Slabs are
    axial, so only axial slices have neighbours outside them."""
    if cfg.spatial_dims == 2 and plane_axis(cfg.plane) == 2:
        return cfg.context_slices
    return 0


def _label_map(cfg: TrainConfig) -> Any:
    if cfg.label_map is None:
        return None
    if cfg.label_map == "binary":
        return "binary"
    return {int(k): int(v) for k, v in dict(cfg.label_map).items()}


def _window(cfg: TrainConfig) -> tuple[float, float]:
    """The CT window the images are scaled to [0, 1] with: the contrast enhancement adds HU."""
    norm = cfg.normalisation or {}
    if norm.get("kind") != "ct_window" or "mean" in norm:
        kind = "ct_window with mean/std" if "mean" in norm else norm.get("kind")
        raise ValueError("augment.enhance simulates contrast in HU on a CT window scaled to "
                         f"[0, 1]; this config normalises with {kind!r}")
    lo, hi = norm["window"]
    return float(lo), float(hi)


def _wait_for_rank_zero(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def build_data(cfg: TrainConfig, rank: int = 0, world: int = 1) -> TrainData:
    cases = discover_cases(cfg.data, cfg.layout, label_map=_label_map(cfg))
    if not cases:
        raise ValueError(f"no cases found in {cfg.data} (layout {cfg.layout})")
    split_path = Path(cfg.split_file) if cfg.split_file else Path(cfg.out) / "split.json"
    split_path.parent.mkdir(parents=True, exist_ok=True)
    # An explicit count wins over the default fraction of the same kind.
    lab_fraction = None if cfg.labelled_count is not None else cfg.labelled_fraction
    val_fraction = None if cfg.val_count is not None else cfg.val_fraction
    split_params = {"labelled_fraction": lab_fraction, "labelled_count": cfg.labelled_count,
                    "val_fraction": val_fraction, "val_count": cfg.val_count, "seed": cfg.seed}
    # Rank 0 makes and saves the split; the others read it once it is there. A rank that finds
    # no file (an output folder that is not shared between nodes) makes the same split: it is a
    # function of the cases and the seed alone.
    if rank == 0:
        split = load_or_make_split(split_path, cases, **split_params)
    _wait_for_rank_zero(world)
    if rank != 0:
        split = load_or_make_split(split_path, cases, **split_params)
    if not split.labelled:
        raise ValueError("the split has no labelled case: raise --labelled-fraction or "
                         "--labelled-count, or give cases with labels")
    axes = resample_axes(cfg)
    norm = cfg.normalisation
    grid = {"resampling": cfg.resampling, "margin": context_margin(cfg)}
    labelled = load_volumes(split.labelled, norm, cfg.spacing, axes, with_labels=True, **grid)
    unlabelled = load_volumes(split.unlabelled, norm, cfg.spacing, axes, with_labels=False,
                              **grid)
    # A 2D model sees one slice at a time (2.5D: and its neighbours, the margin), so a
    # validation slab needs no more context around it.
    val = load_eval_cases(split.val, norm, cfg.spacing, axes,
                          crop_to_slices=cfg.spatial_dims == 2, **grid)
    in_channels = labelled[0].image.shape[0] * (2 * cfg.context_slices + 1)

    if cfg.class_names:
        class_names = list(cfg.class_names)
    else:
        top = max(int(v.label.max()) for v in [*labelled, *val] if v.label is not None)
        if isinstance(_label_map(cfg), dict):
            top = max(top, *_label_map(cfg).values())
        class_names = ["background"] + [f"class{i}" for i in range(1, max(top, 1) + 1)]
    num_classes = len(class_names)

    needs_unlabelled = cfg.method != "supervised"
    if needs_unlabelled and not unlabelled:
        raise ValueError(f"method {cfg.method!r} needs unlabelled cases but the split has none; "
                         "lower --labelled-fraction or add images without labels")
    aug = dict(cfg.augment)
    intensity = IntensityAugment(**aug.pop("intensity")) if aug.get("intensity") else None
    if aug.get("enhance"):
        aug["enhance"] = ContrastEnhance(**aug["enhance"], window=_window(cfg))
    else:
        aug.pop("enhance", None)

    # Unset: half the 3D patches on foreground, uniform 2D crops (the earlier behaviour of each).
    foreground = cfg.foreground_fraction
    if foreground is None:
        foreground = 0.5 if cfg.spatial_dims == 3 else 0.0

    def stream(volumes: list, is_labelled: bool, seed: int) -> Any:
        if cfg.spatial_dims == 3:
            return PatchDataset3D(volumes, patch_size=cfg.patch_size, labelled=is_labelled,
                                  foreground_fraction=foreground,
                                  intensity=intensity, seed=seed, rank=rank, **aug)
        geometry = ({"size": cfg.patch_size, "patch_size": None} if cfg.input_mode == "resize"
                    else {"size": None, "patch_size": cfg.patch_size})
        return SliceDataset2D(volumes, plane=cfg.plane, labelled=is_labelled, intensity=intensity,
                              seed=seed, rank=rank, foreground_fraction=foreground,
                              context_slices=cfg.context_slices, **geometry, **aug)

    lab_ds = stream(labelled, True, cfg.seed)
    unl_ds = stream(unlabelled, False, cfg.seed + 1) if unlabelled and needs_unlabelled else None
    loader = TwoStreamLoader(lab_ds, unl_ds, n_labelled=cfg.batch_labelled,
                             n_unlabelled=cfg.batch_unlabelled if unl_ds else 0, seed=cfg.seed,
                             num_workers=cfg.num_workers, rank=rank)
    val_cases = [v.to_dict() for v in val]
    return TrainData(loader=loader, val_cases=val_cases, in_channels=in_channels,
                     num_classes=num_classes, class_names=class_names,
                     n_labelled=len(split.labelled), n_unlabelled=len(split.unlabelled),
                     split_path=split_path)
