"""Training configuration: every hyper-parameter of the paper is a field with the paper's value as
default, settable from a YAML/JSON config file and overridable by command-line flags."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints


@dataclass
class TrainConfig:
    # data
    data: str = ""  # folder, JSON/CSV list, BraTS2020 or ACDC folder, or a dataset.json
    layout: str = "auto"  # auto | folder | msd | list | brats | acdc
    label_map: dict[str, int] | None = None  # e.g. {"1": 1, "5": 2, "6": 3}; "binary" via layout
    class_names: list[str] | None = None
    labelled_fraction: float | None = 0.1
    labelled_count: int | None = None
    val_fraction: float | None = 0.2
    val_count: int | None = None
    split_file: str | None = None  # saved split; written on first use, reused after
    spatial_dims: int = 3
    plane: str = "axial"  # 2D only
    patch_size: list[int] = field(default_factory=lambda: [112, 112, 112])
    spacing: list[float | None] | None = None  # resample to this grid (mm); None = keep
    input_mode: str = "spacing"  # 2D: "resize" scales each slice to patch_size (paper's ACDC)
    normalisation: dict[str, Any] = field(default_factory=lambda: {"kind": "zscore",
                                                                   "foreground": "nonzero"})
    foreground_fraction: float = 0.5  # 3D: share of labelled patches centred on foreground
    augment: dict[str, Any] = field(default_factory=dict)  # passed to the data pipeline
    num_workers: int = 0
    # method
    method: str = "sfpc"
    perturbation: str = "flpm"  # flpm | fnoise | fdrop | sdrop (Figure 9)
    m: int = 4
    tau: float = 0.1
    consistency_norm: str = "l2"
    detach_mean: bool = False
    w_max: float = 0.1
    lambda2: float = 0.5
    uamt_t: int = 8
    ema_decay: float = 0.99
    encoder_dropout: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    # optimisation (paper: SGD 0.01, momentum 0.9, wd 1e-4, 6000 it, x0.1 every 2500, 4+4)
    iterations: int = 6000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 2500
    lr_gamma: float = 0.1
    batch_labelled: int = 4
    batch_unlabelled: int = 4
    # bookkeeping
    val_every: int = 200
    val_overlap: float = 0.5
    seed: int = 1337
    out: str = "runs/sfpc"
    resume: str | None = None  # path to a checkpoint, or "auto" for <out>/last.pt
    device: str = "auto"
    threads: int | None = None
    name: str = "sfpc"
    task: str = ""
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_config_file(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def _parse_value(kind: Any, text: str) -> Any:
    """Flags for list/dict fields take JSON (or comma-separated numbers)."""
    if text.lower() in ("none", "null"):
        return None
    origin = get_origin(kind)
    if origin is list or (origin is None and kind is list):
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(v) if v.strip().lower() != "none" else None for v in text.split(",")]
    if origin is dict or kind is dict:
        return json.loads(text)
    if kind is bool:
        return text.lower() in ("1", "true", "yes", "on")
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if origin is not None:  # Optional[X] / X | None
        for arg in get_args(kind):
            if arg is not type(None):
                return _parse_value(arg, text)
    return text


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file with any of the fields below")
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                            type=lambda s, k=hints[f.name]: _parse_value(k, s),
                            help=f"(default: {json.dumps(default)})")


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if getattr(ns, "config", None):
        values.update(load_config_file(ns.config))
    for f in fields(TrainConfig):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    unknown = set(values) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise SystemExit(f"unknown config keys: {', '.join(sorted(unknown))}")
    return TrainConfig(**values)
