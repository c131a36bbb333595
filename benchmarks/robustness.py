"""Robustness benchmark (issues 16 and 18): an export under controlled shifts of ct_a, plus the
unlabelled second patient ct_b.

Each shift of training/shifts.py (resolution, slice thickness, noise, contrast phase, field of
view, body size) is applied to ct_a, written as NIfTI into a temporary folder and scored by the
torch-free export evaluator (training/uncertainty_eval.py: the serving Engine on ONNX Runtime)
on the model card's held-out block of slices [96, 106), mapped into the shifted grid by world z.
Per shift: Dice per organ, error-detection AUROC of the FLPM entropy map (all voxels, and the
organ region: voxels predicted or labelled as an organ), the case's boundary uncertainty, the
review flag on the block, and how many of its single slices the flag fires on (the review
threshold was chosen on single-slice cases). Then ct_b, which has no labels: predicted organ
volumes, boundary uncertainty, review flag, and its overlay PNG.

All shifts are synthetic transformations of one patient's CT with silver-standard
(TotalSegmentator) labels: they are not a second labelled patient.

    python benchmarks/robustness.py --json benchmarks/robustness_default_model.json \
        --out /tmp/robustness_out
    python benchmarks/robustness.py --shifts "none,noise 30HU" --export path/to/export
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfpc.inference.preprocess import Geometry, prepare_label, to_orientation
from sfpc.inference.review import quality_flag, review_flag
from sfpc.inference.uncertainty import region_statistics, uncertainty_maps
from sfpc.io.overlay import render_overlay
from sfpc.training.layouts import Case
from sfpc.training.organ_task import CLASS_NAMES, LABEL_MAP, VAL_BLOCK
from sfpc.training.shift_cli import (
    add_common_arguments,
    chosen_shifts,
    command_line,
    log,
    read_ct_a,
    read_nifti,
    write_results,
)
from sfpc.training.shifts import apply_shift, map_slab, shift_named, spacing, write_case
from sfpc.training.uncertainty_eval import (
    crop_last,
    evaluate_export,
    load_engine,
    model_slab,
)
from sfpc.training.uncertainty_metrics import ScoreHistogram

ORGANS = CLASS_NAMES[1:]


class RecordingEngine:
    """The engine, passed to ``evaluate_export`` in its place, keeping the last model-grid
    geometry and uncertainty-mode outputs it computed, so that the organ-region AUROC and the
    per-slice flags are taken from the very maps the evaluator scored, without a second pass."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.geometry: Geometry | None = None
        self.grid: dict[str, np.ndarray] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def preprocess(self, image: Any, affine: Any) -> tuple[np.ndarray, Geometry]:
        model_image, geometry = self._engine.preprocess(image, affine)
        self.geometry = geometry
        return model_image, geometry

    def infer_model_grid(self, model_image: np.ndarray, **kwargs: Any) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = self._engine.infer_model_grid(model_image, **kwargs)
        if kwargs.get("uncertainty"):
            self.grid = out
        return out


def _organ_region_and_slices(recorder: RecordingEngine, label: np.ndarray,
                             slab: tuple[int, int], quality: Mapping[str, Any]
                             ) -> dict[str, Any]:
    """Entropy AUROC / AP over the organ region of the model-grid slab, and the review flag of
    each single slice of it (boundary uncertainty as the evaluator takes it for a slab)."""
    assert recorder.grid is not None and recorder.geometry is not None
    names = [str(c) for c in recorder.metadata.class_names]
    mslab = model_slab(slab, recorder.geometry)
    mean_probs = crop_last(recorder.grid["mean_probs"], mslab)
    maps = uncertainty_maps(mean_probs, crop_last(recorder.grid["mean_entropy"], mslab))
    lab = crop_last(prepare_label(label, recorder.geometry), mslab)
    pred = mean_probs.argmax(axis=0)
    organ = ScoreHistogram()
    organ.add(maps["entropy"], pred != lab, (pred > 0) | (lab > 0))
    slices = []
    for z in range(pred.shape[-1]):
        stats = region_statistics(pred[..., z:z + 1], {k: v[..., z:z + 1] for k, v in
                                                       maps.items()},
                                  names, 1.0, band=recorder.band)
        u = stats["case"].get("boundary_mean_entropy")
        flag = quality_flag(u, quality)["review_recommended"] if quality else None
        slices.append({"model_slice": mslab[0] + z, "boundary_entropy": u, "flag": flag})
    return {"organ_region_entropy": organ.summary(), "model_slab": list(mslab),
            "slices": slices}


def run_shift(name: str, recorder: RecordingEngine, image: np.ndarray, label: np.ndarray,
              affine: np.ndarray, workdir: Path, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    img, lab, aff = apply_shift(name, image, label, affine, seed=seed)
    block = map_slab(VAL_BLOCK, affine, image.shape, aff, img.shape)
    t_shift = time.perf_counter() - t0
    entry = write_case(name, (img, lab, aff), block, workdir, LABEL_MAP)
    case = Case.from_dict(entry)
    result = evaluate_export(recorder, [case])
    flpm = result["sources"]["flpm"]
    c = flpm["cases"][0]
    quality = recorder.metadata.quality or {}
    mapped = np.zeros(lab.shape, dtype=np.int16)
    for src, dst in LABEL_MAP.items():
        mapped[lab == src] = dst
    extra = _organ_region_and_slices(recorder, mapped, block, quality)
    ras_label = crop_last(to_orientation(mapped, aff, "RAS")[0], block)
    label_voxels = {o: int(np.count_nonzero(ras_label == k)) for k, o in enumerate(ORGANS, 1)}
    detection = flpm["error_detection"]
    flags = [s["flag"] for s in extra["slices"]]
    out = {
        "shift": name,
        "description": shift_named(name).description,
        "shape": [int(n) for n in img.shape],
        "spacing_mm": [round(float(v), 4) for v in spacing(aff)],
        "block": list(block),
        "label_voxels_in_block": label_voxels,
        "dice": c["dice"],
        "auroc_entropy": {"overall": detection["entropy"]["overall"]["auroc"],
                          "organ_region": extra["organ_region_entropy"]["auroc"],
                          **{o: detection["entropy"][o]["auroc"] for o in ORGANS}},
        "ap_entropy": {"overall": detection["entropy"]["overall"]["ap"],
                       "organ_region": extra["organ_region_entropy"]["ap"]},
        "ece": flpm["calibration"]["ece"],
        "ece_organ_region": flpm["calibration"]["foreground_region"]["ece"],
        "boundary_uncertainty": c["boundary_uncertainty"],
        "review": c.get("quality"),
        "slices": extra["slices"],
        "slices_flagged": sum(bool(f) for f in flags),
        "slices_with_boundary": sum(f is not None for f in flags),
        "seconds": {"shift": round(t_shift, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    for key in ("image", "label"):
        Path(entry[key]).unlink()
    return out



def run_unlabelled(engine: Any, path: Path, out_dir: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    image, affine = read_nifti(path)
    seg = engine.segment(image, affine, uncertainty=True)
    stats = seg.statistics
    volumes = {o: float(stats["classes"][o]["volume_ml"]) for o in ORGANS}
    flag = review_flag(engine.metadata, stats, True)
    out: dict[str, Any] = {
        "image": str(path), "shape": [int(n) for n in image.shape],
        "spacing_mm": [round(float(v), 4) for v in spacing(affine)],
        "volumes_ml": volumes,
        "boundary_uncertainty": {k: stats["case"].get(f"boundary_mean_{k}")
                                 for k in ("entropy", "mutual_information")},
        "review": flag,
    }
    if out_dir is not None:
        png = render_overlay(image, affine, seg.mask, seg.class_names,
                             uncertainty=seg.entropy_levels, volumes_ml=volumes,
                             title=f"{path.name.split('.')[0]}: {engine.metadata.name}")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / "ct_b_overlay.png"
        target.write_bytes(png)
        out["overlay"] = str(target)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def reference_volumes(label: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """ct_a's organ volumes from its labels (whole volume), for scale next to ct_b's."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    return {CLASS_NAMES[dst]: float(np.count_nonzero(label == src) * voxel_ml)
            for src, dst in LABEL_MAP.items()}


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _flag(review: Mapping[str, Any] | None) -> str:
    if not review or review.get("review_recommended") is None:
        return "-"
    return "yes" if review["review_recommended"] else "no"


def shift_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ("| shift | mean Dice | spleen | liver | stomach | AUROC entropy overall | "
            "AUROC entropy organ region | flag fired | boundary uncertainty | slices flagged |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d = r["dice"]
        a = r["auroc_entropy"]
        lines.append(
            f"| {r['shift']} | {_f(d['mean'])} | {_f(d['spleen'])} | {_f(d['liver'])} | "
            f"{_f(d['stomach'])} | {_f(a['overall'])} | {_f(a['organ_region'])} | "
            f"{_flag(r['review'])} | {_f(r['boundary_uncertainty'].get('entropy'), 4)} | "
            f"{r['slices_flagged']}/{r['slices_with_boundary']} |")
    return "\n".join(lines)


def unlabelled_table(ct_b: Mapping[str, Any], reference: Mapping[str, float]) -> str:
    lines = ["| case | spleen mL | liver mL | stomach mL | flag fired | boundary uncertainty |",
             "|---|---|---|---|---|---|"]
    v = ct_b["volumes_ml"]
    lines.append(f"| ct_b (predicted) | {v['spleen']:.0f} | {v['liver']:.0f} | "
                 f"{v['stomach']:.0f} | {_flag(ct_b['review'])} | "
                 f"{_f(ct_b['boundary_uncertainty'].get('entropy'), 4)} |")
    lines.append(f"| ct_a (labels, for scale) | {reference['spleen']:.0f} | "
                 f"{reference['liver']:.0f} | {reference['stomach']:.0f} | | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "ct_a_image/ct_a_label/ct_b_image_unlabelled")
    parser.add_argument("--no-ct-b", action="store_true", help="skip the unlabelled ct_b")
    parser.add_argument("--out", type=Path, default=None, help="folder for ct_b's overlay PNG")
    args = parser.parse_args(argv)
    names = chosen_shifts(parser, args.shifts)
    image, label, affine = read_ct_a(parser, args.data)

    t0 = time.perf_counter()
    engine = load_engine(args.export, threads=args.threads)
    meta = engine.metadata
    if not meta.has_uncertainty:
        parser.error(f"{args.export} has no uncertainty graph: the benchmark scores its maps")
    recorder = RecordingEngine(engine)
    log(f"model {meta.name} {meta.version} ({args.export}); ct_a {image.shape}, block "
        f"{list(VAL_BLOCK)}; {len(names)} shifts, {args.threads} thread(s)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sfpc_robustness_") as tmp:
        for i, name in enumerate(names, 1):
            row = run_shift(name, recorder, image, label, affine, Path(tmp), args.seed)
            rows.append(row)
            log(f"[{i}/{len(names)}] {name}: mean Dice {row['dice']['mean']:.3f}, entropy "
                f"AUROC {_f(row['auroc_entropy']['overall'])}, flag {_flag(row['review'])} "
                f"({row['seconds']['total']:.1f} s; shape {row['shape']}, block {row['block']})")
    ct_b = None
    reference = reference_volumes(label, affine)
    if not args.no_ct_b:
        ct_b_path = args.data / "ct_b_image_unlabelled.nii.gz"
        log(f"ct_b: {ct_b_path}")
        ct_b = run_unlabelled(engine, ct_b_path, args.out)
        log(f"ct_b: volumes {ct_b['volumes_ml']}, flag {_flag(ct_b['review'])} "
            f"({ct_b['seconds']:.1f} s)")

    print(f"\nShifts of ct_a, scored on the held-out block {list(VAL_BLOCK)} "
          "(silver-standard labels; Dice per organ, FLPM entropy map)\n")
    print(shift_table(rows))
    if ct_b is not None:
        print("\nct_b (another patient, unlabelled)\n")
        print(unlabelled_table(ct_b, reference))
        if "overlay" in ct_b:
            print(f"\noverlay: {ct_b['overlay']}")
    write_results(args.json, {
        "model": {"name": meta.name, "version": meta.version, "export": str(args.export),
                  "quality_threshold": (meta.quality or {}).get("threshold")},
        "settings": {"command": command_line(), "val_block": list(VAL_BLOCK), "seed": args.seed,
                     "threads": args.threads, "data": str(args.data)},
        "shifts": rows,
        "ct_b": ct_b,
        "ct_a_label_volumes_ml": reference,
    }, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
