"""`sfpc uncertainty-eval` and `sfpc calibrate`: score an export's uncertainty maps and
calibration on labelled cases, and fit its temperature and review-flag threshold.

Both read any layout `sfpc train` reads (``--role val`` keeps the validation entries of a
dataset JSON) and run the export through the serving engine (ONNX Runtime).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfpc.training.calibration import (
    DEFAULT_DICE_TARGET,
    DEFAULT_FLAG_QUANTILE,
    choose_quality_threshold,
    fit_temperature,
    sample_voxels,
    write_calibration,
)
from sfpc.training.layouts import Case, discover_cases
from sfpc.training.uncertainty_eval import (
    evaluate_export,
    load_engine,
    report_text,
    write_case_csv,
    write_reliability,
)
from sfpc.training.uncertainty_metrics import DEFAULT_BINS

RESULT_FILE = "uncertainty_eval.json"
CALIBRATION_FILE = "calibration.json"
DEFAULT_FIT_VOXELS = 2_000_000
LOG_FLOOR = 1e-38  # log of a float32 probability that underflowed to 0
FIT_REGIONS = ("all", "foreground")


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="export directory (sfpc_model.json + ONNX)")
    p.add_argument("--data", required=True, help="labelled cases, any layout `sfpc train` reads")
    p.add_argument("--layout", default="auto")
    p.add_argument("--label-map", default=None,
                   help='label remapping for every case, JSON such as {"1": 1, "5": 2} or '
                        '"binary" (default: the layout\'s or each entry\'s own)')
    p.add_argument("--role", action="append", default=None,
                   help="keep only dataset-JSON entries with this role (repeatable), e.g. val")
    p.add_argument("--bins", type=int, default=DEFAULT_BINS, help="calibration bins")
    p.add_argument("--band", type=int, default=10, help="boundary band width in voxels")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def load_cases(data: str, layout: str = "auto", label_map: str | None = None,
               roles: Sequence[str] | None = None) -> list[Case]:
    """The labelled cases of ``data`` (only ``roles`` when given)."""
    parsed: Any = None
    if label_map is not None:
        parsed = label_map if label_map == "binary" else json.loads(label_map)
    cases = [c for c in discover_cases(data, layout, label_map=parsed) if c.label is not None]
    if roles:
        cases = [c for c in cases if c.role in set(roles)]
    if not cases:
        raise SystemExit(f"no labelled case in {data}" + (f" with role {roles}" if roles else ""))
    return cases


def _progress(total: int) -> Any:
    seen = {"n": 0}

    def report(case_id: str) -> None:
        seen["n"] += 1
        print(f"[{seen['n']}/{total}] {case_id}", flush=True)

    return report


def eval_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sfpc uncertainty-eval",
        description="How well an export's uncertainty maps find its errors (voxel AUROC, "
                    "average precision, share of errors in the top 5%%/10%% most uncertain "
                    "voxels, per class and overall), calibration (ECE, reliability diagram) and "
                    "the correlation of case boundary uncertainty with Dice. Writes "
                    f"{RESULT_FILE}, cases.csv and reliability.png to --out.")
    _data_arguments(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--temperature", type=float, default=None,
                   help="override the export's temperature for this evaluation")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    cases = load_cases(a.data, a.layout, a.label_map, a.role)
    overrides = {} if a.temperature is None else {"temperature": a.temperature}
    engine = load_engine(a.model, band=a.band, threads=a.threads, **overrides)
    t0 = time.perf_counter()
    result = evaluate_export(engine, cases, n_bins=a.bins,
                             progress=None if a.quiet else _progress(len(cases)))
    result["data"] = {"source": str(a.data), "roles": a.role, "cases": [c.id for c in cases]}
    result["seconds"] = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
    sources = result["sources"]
    if "flpm" in sources:
        write_case_csv(sources["flpm"]["cases"], out / "cases.csv")
    write_reliability([(f"{name} (T={engine.metadata.temperature:.3g})", s["calibration"])
                       for name, s in sources.items()], out / "reliability.png")
    print(report_text(result))
    print(json.dumps({"cases": len(cases), "out": str(out)}))
    return 0


class VoxelSample:
    """A uniform sample of (log-probability, label) voxels, ``per_case`` at most per case."""

    def __init__(self, per_case: int, seed: int = 0, region: str = "all") -> None:
        if region not in FIT_REGIONS:
            raise ValueError(f"region must be one of {FIT_REGIONS}, got {region!r}")
        self.region = region
        self.per_case = int(per_case)
        self.rng = np.random.default_rng(seed)
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def __call__(self, probs: np.ndarray, label: np.ndarray) -> None:
        k = probs.shape[0]
        flat = probs.reshape(k, -1)
        lab = np.asarray(label).reshape(-1)
        if self.region == "foreground":  # predicted or labelled foreground
            keep = np.flatnonzero((flat.argmax(axis=0) > 0) | (lab > 0))
            flat, lab = flat[:, keep], lab[keep]
        index = sample_voxels(lab.size, self.per_case, self.rng)
        if index is not None:
            flat, lab = flat[:, index], lab[index]
        # log p is the logit up to a per-voxel constant, which softmax ignores: exact for
        # voxels covered by one window, and the blend of the overlaps elsewhere.
        self.logits.append(np.log(np.maximum(flat.T, LOG_FLOOR)).astype(np.float32))
        self.labels.append(lab.astype(np.int64))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.logits), np.concatenate(self.labels)


def _compact(result: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for source, s in result["sources"].items():
        c = s["calibration"]
        out[source] = {"ece": c["ece"], "ece_foreground_region": c["foreground_region"]["ece"],
                       "mean_classwise_ece": c["mean_classwise_ece"], "mean_dice": s["mean_dice"]}
    return out


def calibrate(export_dir: str | Path, cases: Sequence[Case], *, data: str = "",
              n_bins: int = DEFAULT_BINS, band: int = 10, dice_target: float =
              DEFAULT_DICE_TARGET, flag_quantile: float = DEFAULT_FLAG_QUANTILE,
              fit_voxels: int = DEFAULT_FIT_VOXELS, fit_region: str = "all", seed: int = 0,
              threads: int | None = None, write: bool = True,
              progress: Any = None) -> dict[str, Any]:
    """Fit the temperature and the review threshold of an export on labelled ``cases``.

    Runs the export at T = 1 (ECE before; a voxel sample for the NLL fit: every voxel, or with
    ``fit_region="foreground"`` the voxels predicted or labelled foreground), fits T, runs it
    again at T (ECE after; the boundary uncertainty and Dice of every case, as the server will
    compute them), chooses the threshold, and (``write``) stores both in sfpc_model.json.
    Without a usable threshold (no uncertainty graph, or no case with a predicted boundary) the
    export's ``quality`` is cleared and ``summary["quality_skipped"]`` says why.
    Returns {"temperature", "fit", "quality", "summary", "before", "after"}.
    """
    sample = VoxelSample(max(1, fit_voxels // max(1, len(cases))), seed, fit_region)
    engine = load_engine(export_dir, band=band, threads=threads, temperature=1.0, quality={})
    before = evaluate_export(engine, cases, n_bins=n_bins, voxel_sink=sample, progress=progress)
    logits, labels = sample.arrays()
    fit = fit_temperature(logits, labels)
    if labels.size == 0:
        raise ValueError(f"no voxel to fit the temperature on (fit region {fit_region!r})")
    fit["voxels"] = int(labels.size)
    fit["region"] = fit_region
    temperature = fit["temperature"]
    engine = load_engine(export_dir, band=band, threads=threads, temperature=temperature,
                         quality={})
    after = evaluate_export(engine, cases, n_bins=n_bins, progress=progress)
    quality, skipped = None, None
    if "flpm" in after["sources"]:
        rows = after["sources"]["flpm"]["cases"]
        try:
            quality = choose_quality_threshold(
                [r["boundary_uncertainty"].get("entropy") for r in rows],
                [r["dice"]["mean"] for r in rows], dice_target, flag_quantile, band=band)
        except ValueError as exc:  # e.g. nothing predicted: the model gets no flag, not a guess
            skipped = str(exc)
        else:
            quality["chosen_on"] = {"data": str(data), "cases": [c.id for c in cases],
                                    "temperature": temperature,
                                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    else:
        skipped = "the export has no uncertainty graph, so no boundary uncertainty"
    summary = {"temperature": temperature, "nll_before": fit["nll_before"],
               "nll_after": fit["nll_after"], "fit_voxels": fit["voxels"],
               "fit_region": fit_region,
               "cases": len(cases), "data": str(data),
               "before": _compact(before), "after": _compact(after)}
    if skipped:
        summary["quality_skipped"] = skipped
    if write:
        write_calibration(export_dir, temperature, quality, summary)
    return {"temperature": temperature, "fit": fit, "quality": quality, "summary": summary,
            "before": before, "after": after}


def calibration_text(res: dict[str, Any]) -> str:
    s = res["summary"]
    rows = [f"temperature {s['temperature']:.4f} (NLL {s['nll_before']:.4f} -> "
            f"{s['nll_after']:.4f} on {s['fit_voxels']} {s['fit_region']} voxels of "
            f"{s['cases']} cases)",
            f"{'source':<8}{'ECE before':>12}{'ECE after':>11}{'fg ECE before':>15}"
            f"{'fg ECE after':>14}"]
    for source in s["before"]:
        b, a = s["before"][source], s["after"][source]
        rows.append(f"{source:<8}{b['ece']:>12.4f}{a['ece']:>11.4f}"
                    f"{b['ece_foreground_region']:>15.4f}{a['ece_foreground_region']:>14.4f}")
    q = res["quality"]
    if not q:
        rows.append(f"no review flag: {s.get('quality_skipped')}")
    else:
        rows.append(f"review flag: boundary uncertainty > {q['threshold']:.4f} "
                    f"({q['flagged_cases']} of {q['cases']} validation cases flagged, "
                    f"{q['poor_cases']} with Dice < {q['dice_target']:g})")
        rows.append(f"rule: {q['rule']}")
    return "\n".join(rows)


def calibrate_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sfpc calibrate",
        description="Fit an export's temperature (NLL of softmax(logits / T) over validation "
                    "voxels) and the boundary-uncertainty threshold of the per-case review flag, "
                    "and write both into its sfpc_model.json (fields temperature and quality; "
                    "the graphs and their sha256 are untouched). Prints ECE before and after.")
    _data_arguments(p)
    p.add_argument("--dice-target", type=float, default=DEFAULT_DICE_TARGET,
                   help="cases below this mean foreground Dice are the ones to flag")
    p.add_argument("--flag-quantile", type=float, default=DEFAULT_FLAG_QUANTILE,
                   help="threshold quantile when validation has no case on one side of the "
                        "Dice target")
    p.add_argument("--fit-voxels", type=int, default=DEFAULT_FIT_VOXELS,
                   help="voxels sampled (uniformly, per case) for the temperature fit")
    p.add_argument("--fit-region", choices=FIT_REGIONS, default="all",
                   help="voxels whose NLL T minimises: all (standard), or foreground = those "
                        "predicted or labelled foreground (the organ region, where the "
                        "all-voxel fit, dominated by easy background, can over-sharpen)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"folder for {CALIBRATION_FILE} and "
                                               "reliability.png (before / after)")
    p.add_argument("--dry-run", action="store_true", help="fit and report, write no metadata")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    cases = load_cases(a.data, a.layout, a.label_map, a.role)
    res = calibrate(a.model, cases, data=a.data, n_bins=a.bins, band=a.band,
                    dice_target=a.dice_target, flag_quantile=a.flag_quantile,
                    fit_voxels=a.fit_voxels, fit_region=a.fit_region, seed=a.seed,
                    threads=a.threads,
                    write=not a.dry_run, progress=None if a.quiet else _progress(len(cases)))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / CALIBRATION_FILE).write_text(json.dumps(res, indent=1) + "\n")
        panels = []
        for source in res["before"]["sources"]:
            panels.append((f"{source} T=1", res["before"]["sources"][source]["calibration"]))
            panels.append((f"{source} T={res['temperature']:.3g}",
                           res["after"]["sources"][source]["calibration"]))
        write_reliability(panels, out / "reliability.png")
    print(calibration_text(res))
    print(json.dumps({"temperature": res["temperature"],
                      "threshold": (res["quality"] or {}).get("threshold"),
                      "written": not a.dry_run, "model": a.model}))
    return 0
