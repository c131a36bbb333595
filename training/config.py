"""Training configuration: every hyper-parameter of the paper is a field with the paper's value as
default, settable from a YAML/JSON config file and overridable by command-line flags.

Every field has a help line (``HELP``) and a check (``check_values``) that runs on the values a
user gave before any data is read, so that a typo costs a message naming the flag and saying
what to type, not a traceback after minutes of loading. ``sfpc train`` plans the fields a user
did not give from the data (``sfpc.training.plan``); with ``--no-plan`` they keep these defaults.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from sfpc.inference.contract import RESAMPLING_MODES

CT_WINDOW_RULES = ("soft-tissue", "foreground")
PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # axis of a RAS volume each plane is normal to


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
    # 2.5D: k neighbouring slices on each side as extra channels (the contract's
    # context_slices); they are taken on the model grid, so the spacing fixes the slice axis too.
    context_slices: int = 0
    # "area" averages what a coarser voxel covers when an axis shrinks; "linear" is the old
    # trilinear resampling (docs/robustness.md measured the difference on noisy thin scans).
    resampling: str = "area"
    normalisation: dict[str, Any] = field(default_factory=lambda: {"kind": "zscore",
                                                                   "foreground": "nonzero"})
    # How the plan picks a CT window: "soft-tissue" widens the labels' percentiles to at least
    # a 400 HU soft-tissue window; "foreground" is nnU-Net's rule (the percentiles alone).
    ct_window_rule: str = "soft-tissue"
    # Share of labelled patches centred on foreground; None: 0.5 in 3D, uniform crops in 2D.
    foreground_fraction: float | None = None
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
    init: str | None = None  # checkpoint or export folder to start from (fine-tuning)
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
    warn_unpredicted: int = 200  # iterations a present class may go unpredicted before a warning

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# One line per field: what it does and what to type. `sfpc train --help` prints them; a test
# checks that none is missing.
HELP: dict[str, str] = {
    "data": "the cases: a folder of <id>_image.nii.gz (+ <id>_label.nii.gz), an nnU-Net/MSD "
            "folder (imagesTr, labelsTr), a JSON or CSV list of {image, label}, a BraTS2020 or "
            "ACDC folder, or the dataset JSON of `sfpc organ-split`; images without a label are "
            "the unlabelled pool",
    "layout": "how to read --data: auto (detected), folder, msd, json, csv, brats or acdc",
    "label_map": "remap label ids before training, JSON {id: class}, e.g. "
                 "'{\"1\": 1, \"5\": 2, \"6\": 3}' (other ids become background), or binary "
                 "(every id > 0 is class 1)",
    "class_names": "class names, background first, e.g. background,liver,tumour "
                   "(default: class1, class2, ... from the labels)",
    "labelled_fraction": "share of the training cases (whole cases, never slices) whose labels "
                         "are used; the others join the unlabelled pool, labels unused (the "
                         "paper's 10 % protocol). The plan uses every label",
    "labelled_count": "number of training cases whose labels are used (instead of "
                      "--labelled-fraction)",
    "val_fraction": "share of the labelled cases held out for validation (best.pt is chosen "
                    "on them)",
    "val_count": "number of labelled cases held out for validation; 0: none, and last.pt is "
                 "the result",
    "split_file": "where the case split is saved (default <out>/split.json); an existing file "
                  "is reused, so several runs can share one split",
    "spatial_dims": "2: a 2D network on slices of --plane; 3: a 3D network on patches",
    "plane": "2D only: the slices the model sees: axial, coronal or sagittal",
    "patch_size": "network input in voxels, one value per model axis, each a multiple of 16 "
                  "(2D: two, e.g. 128,128; 3D: three, e.g. 96,96,96)",
    "spacing": "voxel size in mm the images are resampled to. 2D: two in-plane values, e.g. "
               "0.8,0.8 (slices keep their thickness); 3D: three values x,y,z, or one for all "
               "axes; none: keep each image's own grid",
    "input_mode": "2D: spacing (resample to --spacing, then crop or pad to --patch-size) or "
                  "resize (scale each whole slice to --patch-size, the paper's ACDC recipe)",
    "context_slices": "2D, --input-mode spacing: k, the neighbouring slices on each side of a "
                      "slice that the network sees with it as extra channels (2.5D; 0: none), "
                      "e.g. 1 for three slices; --spacing must then fix the slice axis too, "
                      "e.g. --spacing 3,3,3 for axial slices 3 mm apart",
    "resampling": "how images reach --spacing: area (an output voxel is the mean of the input "
                  "voxels it covers where an axis shrinks, linear where it grows: a fine, noisy "
                  "scan reaches the model as a coarse acquisition would) or linear (trilinear "
                  "interpolation everywhere, the behaviour before 0.2)",
    "normalisation": "intensities, JSON: {\"kind\": \"ct_window\", \"window\": [-250, 350]} "
                     "(CT: clip to the HU window and scale to [0, 1], or with \"mean\" and "
                     "\"std\" z-score after clipping), {\"kind\": \"zscore\", \"foreground\": "
                     "\"nonzero\" or \"all\"} (per image), or {\"kind\": \"minmax\"}",
    "ct_window_rule": "how the plan chooses a CT window when --normalisation is not given: "
                      "soft-tissue (the labelled voxels' 0.5-99.5 percentiles, widened to at "
                      "least a 400 HU soft-tissue window around their median, so the tissue "
                      "around the structures keeps its contrast) or foreground (the "
                      "percentiles alone, nnU-Net's rule)",
    "foreground_fraction": "share of labelled patches centred on a foreground voxel (3D patches, "
                           "and 2D slices larger than the patch), 0 to 1; default 0.5 in 3D and "
                           "uniform crops in 2D",
    "augment": "augmentation, JSON. 2D keys: flip, rotate90, rotation (degrees), scale [lo, hi], "
               "empty_slice_prob (weight of labelled slices without foreground), intensity "
               "{brightness, contrast, gamma, p, and nnU-Net's image-quality transforms noise "
               "(max sd in image sds), blur ([lo, hi] sigma in voxels), lowres ([lo, hi] "
               "fraction of the resolution), each with p_noise / p_blur / p_lowres}, enhance "
               "{p, ranges, p_fill} (simulated intravenous contrast on cases with a tissue_map, "
               "and with p_fill the stomach's content replaced; CT window only), fov_cut "
               "{p, max} (a side of the slice cut off, up to max of it), elastic {p, alpha "
               "[lo, hi], sigma [lo, hi] voxels} (nnU-Net's elastic deformation); 3D keys: "
               "flip, rotate90, intensity. "
               "E.g. '{\"flip\": false, \"rotation\": 15}'",
    "num_workers": "data loader processes (0: sample in the training process)",
    "method": "sfpc (the paper), supervised, seg+rec, seg+flpm, seg+rec+flpm, seg+flpm+fpc "
              "(the paper's ablations), urpc, uamt or mcnet (baselines)",
    "perturbation": "SFPC's feature perturbation: flpm (the paper), fnoise, fdrop or sdrop "
                    "(Figure 9's alternatives)",
    "m": "M, perturbed predictions per unlabelled image",
    "tau": "tau, FLPM's perturbation range (eps in [-tau, tau])",
    "consistency_norm": "distance between perturbed predictions in the consistency loss: l2 or l1",
    "detach_mean": "true: no gradient through the mean prediction of the consistency loss",
    "w_max": "lambda1, the final weight of the unlabelled consistency loss (Gaussian ramp-up "
             "over the run)",
    "lambda2": "lambda2, the weight of the reconstruction loss",
    "uamt_t": "UAMT: stochastic teacher passes per step",
    "ema_decay": "UAMT: the teacher's exponential moving average decay",
    "encoder_dropout": "dropout per encoder stage, one value per --channels entry, e.g. "
                       "0.05,0.1,0.2,0.3,0.5",
    "channels": "feature channels per UNet stage, e.g. 16,32,64,128,256 (with N stages patch "
                "sizes must be multiples of 2^(N-1))",
    "init": "start from trained weights (fine-tuning): a checkpoint of sfpc train (.pt) or an "
            "export folder such as sfpc/default_model; the model's grid, normalisation, plane "
            "and network are kept",
    "iterations": "training steps (one labelled and one unlabelled batch each)",
    "lr": "SGD learning rate",
    "momentum": "SGD momentum, 0 to 1",
    "weight_decay": "SGD weight decay",
    "lr_step": "multiply the learning rate by --lr-gamma every this many iterations",
    "lr_gamma": "the learning rate factor applied every --lr-step iterations",
    "batch_labelled": "labelled patches per step",
    "batch_unlabelled": "unlabelled patches per step (semi-supervised methods)",
    "val_every": "validate and save last.pt (and best.pt) every this many iterations",
    "val_overlap": "overlap of the validation's sliding windows, 0 to below 1",
    "seed": "seed of the split, the sampling and the initial weights",
    "out": "output folder: plan.json, split.json, config.json, history.jsonl, last.pt, best.pt",
    "resume": "continue a run: auto (<out>/last.pt if it exists) or a checkpoint path",
    "device": "auto (a GPU when there is one), cpu, cuda or cuda:N",
    "threads": "torch CPU threads (1 is fastest when several jobs share a small machine)",
    "name": "model name in the checkpoint's metadata and the export",
    "task": "one line describing the task, kept in the metadata",
    "progress": "true or false: show the progress bar",
    "warn_unpredicted": "warn when a foreground class that the labelled patches contain has not "
                        "been predicted on any of them for this many iterations (0: never)",
}

LAYOUT_CHOICES = ("auto", "folder", "msd", "json", "csv", "brats", "acdc")
PERTURBATIONS = ("flpm", "fnoise", "fdrop", "sdrop")
AUGMENT_KEYS = {2: ("flip", "rotate90", "rotation", "scale", "intensity", "empty_slice_prob",
                    "enhance", "fov_cut", "elastic"),
                3: ("flip", "rotate90", "intensity")}
INTENSITY_KEYS = ("brightness", "contrast", "gamma", "p", "noise", "p_noise", "blur", "p_blur",
                  "lowres", "p_lowres")


class ConfigError(ValueError):
    """A value a user gave that cannot work; ``flag`` names it as typed on the command line."""

    def __init__(self, name: str, message: str):
        self.flag = flag_name(name)
        super().__init__(f"{self.flag}: {message}")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_config_file(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def _parse_value(kind: Any, text: str) -> Any:
    """Flags for list/dict fields take JSON (or comma-separated values)."""
    if text.lower() in ("none", "null"):
        return None
    origin = get_origin(kind)
    if origin is list or (origin is None and kind is list):
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [_list_item(v) for v in text.split(",")]
    if origin is dict or kind is dict:
        if not text.lstrip().startswith("{"):
            return text  # "binary" label map; anything else fails the check
        return json.loads(text)
    if kind is bool:
        if text.lower() not in _BOOLS:
            raise ValueError(f"expected true or false, got {text!r}")
        return _BOOLS[text.lower()]
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if origin is not None:  # Optional[X] / X | None
        for arg in get_args(kind):
            if arg is not type(None):
                return _parse_value(arg, text)
    return text


def _list_item(text: str) -> Any:
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # class names: background,liver,tumour


def _flag_type(name: str, kind: Any) -> Any:
    def parse(text: str) -> Any:
        try:
            return _parse_value(kind, text)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"cannot read {text!r} ({e}); {HELP[name]}") from e

    parse.__name__ = name  # argparse names the type in some of its own messages
    return parse


def _default_text(f: Any) -> str:
    default = f.default if f.default is not MISSING else f.default_factory()
    return json.dumps(default)


def add_config_arguments(parser: argparse.ArgumentParser, planned: bool = False) -> None:
    """One flag per TrainConfig field, each with its help line. ``planned``: say that a flag
    left out is chosen from the data (``sfpc train`` without ``--no-plan``, ``sfpc plan``)."""
    parser.add_argument("--config", help="YAML or JSON file with any of the fields below; flags "
                                          "given on the command line win over it")
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = flag_name(f.name)
        from_plan = planned and f.name in PLANNED_FIELDS
        default = ("planned from the data; --no-plan: " if from_plan else "default: ")
        text = f"{HELP[f.name]} ({default}{_default_text(f)})"
        parser.add_argument(flag, dest=f.name, default=None, metavar=_metavar(f.name),
                            type=_flag_type(f.name, hints[f.name]),
                            help=text.replace("%", "%%"))  # argparse formats help with %


# Fields the plan may choose (sfpc.training.plan); the others keep their defaults.
PLANNED_FIELDS = ("labelled_fraction", "val_fraction", "val_count", "spatial_dims", "plane",
                  "patch_size", "spacing", "input_mode", "normalisation", "foreground_fraction",
                  "augment", "method", "iterations", "lr_step", "batch_labelled",
                  "batch_unlabelled", "val_every", "class_names", "channels")


def _metavar(name: str) -> str:
    return {"patch_size": "N,N[,N]", "spacing": "MM,MM[,MM]", "normalisation": "JSON",
            "augment": "JSON", "label_map": "JSON", "channels": "N,N,...",
            "encoder_dropout": "P,P,...", "class_names": "NAME,NAME,..."}.get(name, name.upper())


def checked_values(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> dict[str, Any]:
    """The values a user gave to `sfpc train` or `sfpc plan`, each checked before any data is
    read; a bad one, or a missing or absent --data, exits 2 through ``parser.error``."""
    try:
        given = explicit_values(ns)
        check_values(given)
    except ConfigError as e:
        parser.error(str(e))
    if not given.get("data"):
        parser.error("--data is required (a folder of NIfTI files, a dataset JSON/CSV, BraTS "
                     "or ACDC)")
    if not Path(given["data"]).exists():
        parser.error(f"--data: {given['data']} does not exist")
    return given


def explicit_values(ns: argparse.Namespace) -> dict[str, Any]:
    """The fields a user gave: the --config file's, then the flags (which win)."""
    values: dict[str, Any] = {}
    if getattr(ns, "config", None):
        try:
            loaded = load_config_file(ns.config)
        except FileNotFoundError as e:
            raise ConfigError("config", f"no such file {ns.config}") from e
        except ValueError as e:
            raise ConfigError("config", f"{ns.config} is not valid JSON/YAML: {e}") from e
        if not isinstance(loaded, Mapping):
            raise ConfigError("config", f"{ns.config} must hold a mapping of field: value")
        values.update(loaded)
    for f in fields(TrainConfig):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    unknown = set(values) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError("config", f"unknown fields {', '.join(sorted(unknown))}; the fields "
                                    "are the flags of `sfpc train --help` without the dashes")
    return values


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    values = explicit_values(ns)
    check_values(values)
    return resolve(TrainConfig(**values))


# ----------------------------------------------------------------------------------------------
# Checks: run on the values a user gave, before any data is read
# ----------------------------------------------------------------------------------------------


def _number(name: str, value: Any, kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False, example: str = "") -> None:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    hint = f", e.g. {flag_name(name)} {example}" if example else ""
    words = "a whole number" if kind is int else "a number"
    if not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(name, f"expected {words}{hint}; got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(name, f"must be {'>' if lo_open else '>='} {lo}{hint}; got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(name, f"must be {'<' if hi_open else '<='} {hi}{hint}; got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}; got {value!r}")


def _int_list(name: str, value: Any, example: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(name, f"expected whole numbers separated by commas, e.g. "
                                f"{flag_name(name)} {example}; got {value!r}")
    return value


def check_values(values: Mapping[str, Any]) -> None:
    """Check the given fields one by one (types, ranges, choices, shapes) and the combinations
    that can be judged without data; ConfigError names the first bad flag and what to type."""
    v = dict(values)
    for name in v:
        if v[name] is None and name not in _NULLABLE:
            raise ConfigError(name, f"cannot be none; {HELP[name]}")
    checks = {
        "layout": lambda x: _choice("layout", x, LAYOUT_CHOICES),
        "labelled_fraction": lambda x: x is None or _number("labelled_fraction", x, float, 0, 1,
                                                            example="0.1"),
        "val_fraction": lambda x: x is None or _number("val_fraction", x, float, 0, 1,
                                                       hi_open=True, example="0.2"),
        "labelled_count": lambda x: x is None or _number("labelled_count", x, int, 1,
                                                         example="8"),
        "val_count": lambda x: x is None or _number("val_count", x, int, 0, example="2"),
        "spatial_dims": _check_dims,
        "plane": lambda x: _choice("plane", x, tuple(PLANES)),
        "input_mode": lambda x: _choice("input_mode", x, ("spacing", "resize")),
        "context_slices": lambda x: _number("context_slices", x, int, 0, example="1"),
        "resampling": lambda x: _choice("resampling", x, RESAMPLING_MODES),
        "foreground_fraction": lambda x: x is None or _number("foreground_fraction", x, float,
                                                              0, 1, example="0.33"),
        "num_workers": lambda x: _number("num_workers", x, int, 0, example="2"),
        "perturbation": lambda x: _choice("perturbation", x, PERTURBATIONS),
        "m": lambda x: _number("m", x, int, 1, example="4"),
        "tau": lambda x: _number("tau", x, float, 0, example="0.1"),
        "consistency_norm": lambda x: _choice("consistency_norm", x, ("l2", "l1")),
        "w_max": lambda x: _number("w_max", x, float, 0, example="0.1"),
        "lambda2": lambda x: _number("lambda2", x, float, 0, example="0.5"),
        "uamt_t": lambda x: _number("uamt_t", x, int, 1, example="8"),
        "ema_decay": lambda x: _number("ema_decay", x, float, 0, 1, example="0.99"),
        "iterations": lambda x: _number("iterations", x, int, 1, example="2000"),
        "lr": lambda x: _number("lr", x, float, 0, lo_open=True, example="0.01"),
        "momentum": lambda x: _number("momentum", x, float, 0, 1, hi_open=True, example="0.9"),
        "weight_decay": lambda x: _number("weight_decay", x, float, 0, example="1e-4"),
        "lr_step": lambda x: _number("lr_step", x, int, 1, example="2500"),
        "lr_gamma": lambda x: _number("lr_gamma", x, float, 0, 1, lo_open=True, example="0.1"),
        "batch_labelled": lambda x: _number("batch_labelled", x, int, 1, example="4"),
        "batch_unlabelled": lambda x: _number("batch_unlabelled", x, int, 0, example="4"),
        "val_every": lambda x: _number("val_every", x, int, 1, example="200"),
        "val_overlap": lambda x: _number("val_overlap", x, float, 0, 1, hi_open=True,
                                         example="0.5"),
        "seed": lambda x: _number("seed", x, int, 0, example="1337"),
        "threads": lambda x: x is None or _number("threads", x, int, 1, example="1"),
        "warn_unpredicted": lambda x: _number("warn_unpredicted", x, int, 0, example="200"),
        "detach_mean": lambda x: _bool("detach_mean", x),
        "progress": lambda x: _bool("progress", x),
        "device": _check_device,
        "method": _check_method,
        "label_map": _check_label_map,
        "class_names": _check_class_names,
        "normalisation": _check_normalisation,
        "ct_window_rule": lambda x: _choice("ct_window_rule", x, CT_WINDOW_RULES),
        "channels": lambda x: _check_channels(x, v.get("encoder_dropout")),
        "encoder_dropout": _check_dropout,
        "resume": _check_resume,
        "init": _check_init,
        "data": _check_data,
    }
    for name, check in checks.items():
        if name in v:
            check(v[name])
    dims = v.get("spatial_dims")
    if "patch_size" in v:
        patch = _int_list("patch_size", v["patch_size"], "128,128")
        stages = len(v.get("channels") or TrainConfig().channels)
        multiple = 2 ** (stages - 1)
        if dims is not None and len(patch) != dims:
            example = "128,128" if dims == 2 else "96,96,96"
            raise ConfigError("patch_size", f"a {dims}D model takes {dims} values, e.g. "
                                            f"--patch-size {example}; got {patch}")
        if len(patch) not in (2, 3):
            raise ConfigError("patch_size", f"takes 2 values (2D) or 3 (3D); got {patch}")
        bad = [p for p in patch if p < multiple or p % multiple]
        if bad:
            fixed = ",".join(str(max(multiple, round(p / multiple) * multiple)) for p in patch)
            raise ConfigError("patch_size", f"every value must be a multiple of {multiple} (the "
                                            f"network pools {stages - 1} times), e.g. "
                                            f"--patch-size {fixed}; got {patch}")
    if "spacing" in v:
        _check_spacing(v["spacing"], dims)
    if v.get("input_mode") == "resize" and dims == 3:
        raise ConfigError("input_mode", "resize is for 2D models (--spatial-dims 2); 3D models "
                                        "resample to --spacing")
    if v.get("context_slices"):
        check_context(v["context_slices"], dims, v.get("input_mode"), v.get("spacing"),
                      v.get("plane"), given="spacing" in v)
    if "augment" in v:
        _check_augment(v["augment"], dims)
    if v.get("labelled_fraction") is not None and v.get("labelled_count") is not None:
        raise ConfigError("labelled_count", "give --labelled-count or --labelled-fraction, "
                                            "not both")
    if v.get("val_fraction") is not None and v.get("val_count") is not None:
        raise ConfigError("val_count", "give --val-count or --val-fraction, not both")


_NULLABLE = {"label_map", "class_names", "labelled_fraction", "labelled_count", "val_fraction",
             "val_count", "split_file", "spacing", "foreground_fraction", "init", "resume",
             "threads"}


def _check_dims(value: Any) -> None:
    if value not in (2, 3) or isinstance(value, bool):
        raise ConfigError("spatial_dims", f"expected 2 or 3; got {value!r}")


def _check_data(value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError("data", f"expected a path; got {value!r}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, f"expected true or false; got {value!r}")


def _check_device(value: Any) -> None:
    ok = isinstance(value, str) and (value in ("auto", "cpu", "cuda", "mps") or (
        value.startswith("cuda:") and value[5:].isdigit()))
    if not ok:
        raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N; got {value!r}")


def _check_method(value: Any) -> None:
    from sfpc.training.methods import METHODS  # torch: only the training commands get here

    if value not in METHODS:
        raise ConfigError("method", f"expected one of {', '.join(METHODS)}; got {value!r}")


def _check_label_map(value: Any) -> None:
    if value is None or value == "binary":
        return
    example = "e.g. --label-map '{\"1\": 1, \"5\": 2}' or --label-map binary"
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("label_map", f"expected JSON {{id: class}} or binary, {example}; "
                                       f"got {value!r}")
    for k, c in value.items():
        try:
            src, dst = int(k), int(c)
        except (TypeError, ValueError):
            raise ConfigError("label_map", f"ids and classes must be whole numbers, {example}; "
                                           f"got {k!r}: {c!r}") from None
        if src < 0 or dst < 0:
            raise ConfigError("label_map", f"ids and classes must be >= 0; got {k!r}: {c!r}")


def _check_class_names(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or len(value) < 2 or not all(
            isinstance(n, str) and n for n in value):
        raise ConfigError("class_names", "expected at least two names, background first, e.g. "
                                         f"--class-names background,liver; got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError("class_names", f"names must differ; got {value!r}")


def _check_normalisation(value: Any) -> None:
    from sfpc.inference.contract import validate_normalisation

    try:
        validate_normalisation(value)
    except (ValueError, TypeError) as e:
        raise ConfigError("normalisation", f"{e}; e.g. --normalisation "
                                           "'{\"kind\": \"ct_window\", \"window\": [-250, 350]}' "
                                           "or '{\"kind\": \"zscore\", \"foreground\": "
                                           "\"nonzero\"}'") from None


def _check_channels(value: Any, dropout: Any) -> None:
    channels = _int_list("channels", value, "16,32,64,128,256")
    if len(channels) < 2 or min(channels) < 1:
        raise ConfigError("channels", f"expected at least two stages of >= 1 channels, e.g. "
                                      f"--channels 16,32,64,128,256; got {channels}")
    if dropout is None and len(channels) != len(TrainConfig().encoder_dropout):
        raise ConfigError("encoder_dropout", f"--channels has {len(channels)} stages: give one "
                                             f"dropout per stage, e.g. --encoder-dropout "
                                             f"{','.join(['0.1'] * len(channels))}")
    if dropout is not None and isinstance(dropout, list) and len(dropout) != len(channels):
        raise ConfigError("encoder_dropout", f"needs one value per --channels stage "
                                             f"({len(channels)}); got {dropout}")


def _check_dropout(value: Any) -> None:
    if not isinstance(value, list) or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1
            for p in value):
        raise ConfigError("encoder_dropout", f"expected probabilities in [0, 1) separated by "
                                             f"commas, e.g. 0.05,0.1,0.2,0.3,0.5; got {value!r}")


def _check_resume(value: Any) -> None:
    if value in (None, "auto"):
        return
    if not isinstance(value, str) or not Path(value).is_file():
        raise ConfigError("resume", f"expected auto or an existing checkpoint file; got {value!r}")


def _check_init(value: Any) -> None:
    if value is None:
        return
    path = Path(str(value))
    if path.is_dir() and (path / "sfpc_model.json").is_file():
        return
    if path.is_file():
        return
    raise ConfigError("init", f"expected a checkpoint (.pt of sfpc train) or an export folder "
                              f"with sfpc_model.json, e.g. --init sfpc/default_model; {value!r} "
                              "is neither")


def _check_spacing(value: Any, dims: int | None) -> None:
    if value is None:
        return
    example = {2: "--spacing 0.8,0.8", 3: "--spacing 1,1,1", None: "--spacing 0.8,0.8 (2D) or "
               "--spacing 1,1,1 (3D)"}[dims]
    if not isinstance(value, list) or not value or not all(
            s is None or (isinstance(s, (int, float)) and not isinstance(s, bool))
            for s in value):
        raise ConfigError("spacing", f"expected numbers in mm separated by commas, {example}; "
                                     f"got {value!r}")
    bad = [s for s in value if s is not None and not (math.isfinite(s) and s > 0)]
    if bad:
        raise ConfigError("spacing", f"voxel sizes must be positive mm, {example}; got {value}")
    n = len(value)
    if dims == 2 and n not in (1, 2, 3):
        raise ConfigError("spacing", f"a 2D model takes two in-plane values, {example}; "
                                     f"got {value}")
    if dims == 3 and n not in (1, 3):
        raise ConfigError("spacing", f"a 3D model takes three values (x,y,z mm) or one for all "
                                     f"axes, {example}; got {value}" + (
                                         " (two values are a 2D model's: add --spatial-dims 2)"
                                         if n == 2 else ""))
    if dims is None and n not in (1, 2, 3):
        raise ConfigError("spacing", f"takes one, two (2D, in-plane) or three values, "
                                     f"{example}; got {value}")
    if n == 2 and None in value:
        raise ConfigError("spacing", f"both in-plane values are needed, {example}; got {value}")


def check_context(context_slices: Any, dims: int | None, input_mode: str | None,
                  spacing: Any, plane: str | None, given: bool = True) -> None:
    """The fields a 2.5D model (``context_slices`` > 0) needs: a 2D model, resampled to a fixed
    spacing whose slice axis is set too (its neighbours are model-grid slices). None for a field
    not known yet (the plan chooses it); ``given`` False: the spacing is not known yet."""
    _number("context_slices", context_slices, int, 0, example="1")
    if not context_slices:
        return
    k = context_slices
    if dims is not None and dims != 2:
        raise ConfigError("context_slices", f"{k} neighbouring slices are for 2D models (a 3D "
                                            "model sees them already): add --spatial-dims 2 or "
                                            "use --context-slices 0")
    if input_mode == "resize":
        raise ConfigError("context_slices", "neighbouring slices are taken on the model grid, "
                                            "which --input-mode resize does not fix: use "
                                            "--input-mode spacing with e.g. --spacing 3,3,3")
    if not given:
        return
    axis = PLANES.get(plane or "axial", 2)
    values = list(spacing) if isinstance(spacing, (list, tuple)) else []
    fixed = (len(values) == 1 and values[0] is not None) or (
        len(values) == 3 and values[axis] is not None)
    if not fixed:
        raise ConfigError("context_slices", f"needs the slice spacing of the model grid: "
                                            f"--spacing {spacing!r} leaves the {plane or 'axial'} "
                                            f"slice axis (RAS axis {axis}) at each scan's own; "
                                            "give three values, e.g. --spacing 3,3,3 (or one "
                                            "for all axes)")


def _check_augment(value: Any, dims: int | None) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError("augment", "expected a JSON object, e.g. --augment "
                                     f"'{{\"flip\": false, \"rotation\": 15}}'; got {value!r}")
    allowed = AUGMENT_KEYS.get(dims or 2, ()) if dims else AUGMENT_KEYS[2]
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        which = f"{dims}D" if dims else "2D"
        raise ConfigError("augment", f"unknown keys {unknown} for a {which} model; the keys are "
                                     f"{', '.join(allowed)}")
    for key in ("flip", "rotate90"):
        if key in value and not isinstance(value[key], bool):
            raise ConfigError("augment", f"{key} must be true or false; got {value[key]!r}")
    if "rotation" in value:
        r = value["rotation"]
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r <= 180:
            raise ConfigError("augment", f"rotation is degrees in [0, 180]; got {r!r}")
    for key in ("scale",):
        if key in value and value[key] is not None:
            s = value[key]
            if not (isinstance(s, list) and len(s) == 2 and all(
                    isinstance(x, (int, float)) and x > 0 for x in s) and s[0] <= s[1]):
                raise ConfigError("augment", f"scale is [lo, hi] with 0 < lo <= hi, e.g. "
                                             f"[0.85, 1.15]; got {s!r}")
    if "empty_slice_prob" in value:
        p = value["empty_slice_prob"]
        if not isinstance(p, (int, float)) or isinstance(p, bool) or p < 0:
            raise ConfigError("augment", f"empty_slice_prob is a weight >= 0 (1: slices drawn "
                                         f"uniformly); got {p!r}")
    if value.get("intensity"):
        intensity = value["intensity"]
        if not isinstance(intensity, Mapping) or set(intensity) - set(INTENSITY_KEYS):
            raise ConfigError("augment", f"intensity takes the keys {', '.join(INTENSITY_KEYS)}, "
                                         f"e.g. {{\"brightness\": 0.1, \"p\": 0.3}}; got "
                                         f"{intensity!r}")
    for key, keys in (("enhance", ("p", "ranges", "sigma", "p_fill")), ("fov_cut", ("p", "max")),
                      ("elastic", ("p", "alpha", "sigma"))):
        if value.get(key):
            sub = value[key]
            if not isinstance(sub, Mapping) or set(sub) - set(keys):
                raise ConfigError("augment", f"{key} takes the keys {', '.join(keys)}; got {sub!r}")
            p = sub.get("p", 0.5)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
                raise ConfigError("augment", f"{key}.p is a probability in [0, 1]; got {p!r}")
    cut = (value.get("fov_cut") or {}).get("max", 0.35)
    if not isinstance(cut, (int, float)) or not 0.05 < cut < 1:
        raise ConfigError("augment", f"fov_cut.max is a fraction in (0.05, 1); got {cut!r}")


# ----------------------------------------------------------------------------------------------
# After the plan: the combination, and the one internal form of the spacing
# ----------------------------------------------------------------------------------------------


def resolve_spacing(spacing: Any, spatial_dims: int, plane: str,
                    context_slices: int = 0) -> list[float | None] | None:
    """The internal per-RAS-axis spacing from what a user typed: a 2D model's two in-plane values
    (in RAS axis order, the plane's own axis left out) become ``[x, y, None]`` for axial slices,
    one value applies to every axis the model resamples; the through-plane entry of a 2D model is
    None (slices keep their thickness), except for a 2.5D model (``context_slices`` > 0), which
    resamples every axis so that its neighbouring slices lie a fixed distance apart."""
    if spacing is None:
        return None
    _check_spacing(list(spacing), spatial_dims)
    values = [None if s is None else float(s) for s in spacing]
    if spatial_dims == 3 or (spatial_dims == 2 and context_slices):
        if spatial_dims == 2:
            check_context(context_slices, spatial_dims, "spacing", values, plane)
        return values * 3 if len(values) == 1 else values
    axis = PLANES[plane]
    in_plane = [a for a in range(3) if a != axis]
    if len(values) == 3:
        values[axis] = None
        return values
    if len(values) == 1:
        values = values * 2
    out: list[float | None] = [None, None, None]
    for a, s in zip(in_plane, values, strict=True):
        out[a] = s
    return out


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Bring a complete config to its internal form (spacing per RAS axis) and check the
    combinations of its fields; ConfigError names the flag to change."""
    check_context(cfg.context_slices, cfg.spatial_dims, cfg.input_mode, cfg.spacing, cfg.plane)
    cfg.spacing = resolve_spacing(cfg.spacing, cfg.spatial_dims, cfg.plane, cfg.context_slices)
    if len(cfg.patch_size) != cfg.spatial_dims:
        example = "128,128" if cfg.spatial_dims == 2 else "96,96,96"
        raise ConfigError("patch_size", f"a {cfg.spatial_dims}D model takes {cfg.spatial_dims} "
                                        f"values, e.g. --patch-size {example}; got "
                                        f"{cfg.patch_size}")
    if cfg.input_mode == "resize" and cfg.spatial_dims == 3:
        raise ConfigError("input_mode", "resize is for 2D models; 3D models resample to "
                                        "--spacing")
    _check_augment(cfg.augment, cfg.spatial_dims)
    if len(cfg.encoder_dropout) != len(cfg.channels):
        raise ConfigError("encoder_dropout", f"needs one value per --channels stage "
                                             f"({len(cfg.channels)}); got {cfg.encoder_dropout}")
    return cfg
