"""``sfpc predict`` and ``sfpc.predict``: segment files on this machine, no server.

The same :class:`~sfpc.inference.pipeline.SegmentationService` as the gateway runs here, on the
embedded default model unless another export is named, so a file gives the same artefacts, under
the same names, and is refused with the same error codes as ``POST /v1/segment``::

    sfpc predict -i ct.nii.gz -o out/ --uncertainty
    sfpc predict -i dicom_series/ -o out/ --outputs seg_dicom report_json
    sfpc predict -i cases/ -o out/          # out/<case>/ per NIfTI file and DICOM series folder

    from sfpc import predict
    result = predict("ct.nii.gz", uncertainty=True)
    result.mask, result.entropy, result.report["quality"]
    result.save("out/")

INPUT is one case (a NIfTI file, a zip of a DICOM series, a multi-frame DICOM file, or a folder
that directly holds the DICOM files of one series: artefacts go to OUTDIR) or a folder of cases
(each NIfTI file, each zip and each folder that directly holds DICOM files is a case: artefacts go
to OUTDIR/<case>/, the case's path relative to INPUT).

Exit codes: 0 every case done; 2 bad arguments or a bad input (the gateway's 4xx); 1 any other
failure (the backend); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from sfpc.errors import SFPCError
from sfpc.inference.options import (
    SegmentOptions,
    add_option_arguments,
    option_fields,
    options_from_args,
    parse_options,
)
from sfpc.io.files import write_atomic

EXIT_OK, EXIT_INTERRUPTED = 0, 130
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SKIP_NAMES = frozenset({"DICOMDIR", "Thumbs.db"})
Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One input to segment: its name, the files of its upload, and the folder its artefacts
    go to relative to the output folder ("." for a single input)."""

    name: str
    files: tuple[Path, ...]
    output: str = "."

    def uploads(self) -> list[tuple[str, bytes | Path]]:
        return [(path.name, path) for path in self.files]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return path.stem or name


def _kind(path: Path) -> str:
    """What a file in a folder of cases is: "nifti", "zip", "dicom" or "other"."""
    from sfpc.io import sniff

    if _is_nifti(path):
        return "nifti"
    try:
        with open(path, "rb") as handle:
            head = handle.read(600)
    except OSError:
        return "other"
    kind = sniff.sniff(head)
    if kind == sniff.ZIP:
        return "zip"
    if kind in (sniff.DICOM, sniff.DICOM_NO_PREAMBLE):
        return "dicom"
    if kind in (sniff.NIFTI1, sniff.NIFTI2):
        return "nifti"
    return "other"


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in _SKIP_NAMES)


def find_cases(input: str | os.PathLike[str]) -> tuple[list[Case], list[Path]]:
    """The cases of ``input`` and the files of a folder of cases that are none (neither NIfTI,
    zip nor DICOM). A missing path raises :class:`SFPCError` ``missing_file``."""
    root = Path(input)
    if root.is_file():
        return [Case(_stem(root), (root,))], []
    if not root.is_dir():
        raise SFPCError(f"no such file or folder: {root}", status=400, code="missing_file")
    own = _visible_files(root)
    subfolders = [d for d in sorted(root.rglob("*")) if d.is_dir()
                  and not any(part.startswith(".") for part in d.relative_to(root).parts)]
    kinds = {path: _kind(path) for path in own}
    if own and all(kinds[p] in ("dicom", "other") for p in own) \
            and any(kinds[p] == "dicom" for p in own) \
            and not any(_kind(p) != "other" for d in subfolders for p in _visible_files(d)):
        # One DICOM series folder: sent whole, as a client would upload it.
        return [Case(root.name or "input", tuple(own))], []
    cases: list[Case] = []
    skipped: list[Path] = []
    for folder in [root, *subfolders]:
        files = own if folder == root else _visible_files(folder)
        relative = PurePosixPath(folder.relative_to(root).as_posix())
        dicom: list[Path] = []
        for path in files:
            kind = kinds.get(path) or _kind(path)
            if kind in ("nifti", "zip"):
                output = (relative / _stem(path)).as_posix()
                cases.append(Case(output, (path,), output))
            elif kind == "dicom":
                dicom.append(path)
            else:
                skipped.append(path)
        if dicom:
            output = relative.as_posix() if folder != root else root.name or "series"
            cases.append(Case(output, tuple(dicom), output))
    return _unique(cases), skipped


def _unique(cases: list[Case]) -> list[Case]:
    """Distinct output folders (``x.nii.gz`` beside a series folder ``x/``)."""
    seen: dict[str, int] = {}
    out = []
    for case in sorted(cases, key=lambda c: c.output):
        count = seen.get(case.output, 0)
        seen[case.output] = count + 1
        if count:
            name = f"{case.output}__{count + 1}"
            case = Case(name, case.files, name)
        out.append(case)
    return out


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class PredictionResult:
    """One case segmented: the engine's arrays on the input grid, the report, and the artefact
    files (by file name, as ``POST /v1/segment`` names them, packed by ``format``)."""

    case: str
    mask: np.ndarray  # uint8 labels, the input's spatial shape; label i is class_names[i]
    affine: np.ndarray  # the input's voxel -> RAS mm affine
    class_names: list[str]
    entropy: np.ndarray | None  # H(p_bar) / ln K in [0, 1] (uncertainty runs)
    mutual_information: np.ndarray | None  # (H(p_bar) - mean H(p_m)) / ln K in [0, 1]
    report: dict[str, Any]
    artefacts: dict[str, bytes]
    seconds: float
    options: SegmentOptions = field(default_factory=SegmentOptions)

    @property
    def review(self) -> dict[str, Any] | None:
        """The review flag of a calibrated model in uncertainty mode (None otherwise)."""
        return self.report.get("quality")

    @property
    def review_recommended(self) -> bool | None:
        return (self.review or {}).get("review_recommended")

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write every artefact into ``directory`` (created); returns the paths written. Each
        file is written beside its final name and renamed, so no half-written file is left."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        return [write_atomic(out / name, content) for name, content in self.artefacts.items()]


# ----------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------


def _model_dir(model: str | os.PathLike[str] | None) -> Path:
    from sfpc.inference.contract import DEFAULT_MODEL_DIR, METADATA_FILE

    if model is None:
        if not (DEFAULT_MODEL_DIR / METADATA_FILE).is_file():
            raise SFPCError(f"the embedded default model is missing ({DEFAULT_MODEL_DIR}); "
                            "name an export folder with --model", status=404,
                            code="model_not_found")
        return DEFAULT_MODEL_DIR
    path = Path(model)
    if not (path / METADATA_FILE).is_file():
        raise SFPCError(f"{path} is not a model export: it holds no {METADATA_FILE} (the "
                        "folder `sfpc export` writes)", status=404, code="model_not_found")
    return path


class Predictor:
    """One model loaded once (ONNX Runtime, or a Triton server) for many cases.

    ``model``: an export folder (default: the embedded default model); ``threads``: ONNX
    Runtime's intra-op threads (default: its own choice).
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *,
                 backend: str = "onnxruntime", triton_url: str | None = None,
                 threads: int | None = None) -> None:
        from sfpc.inference.pipeline import ModelRegistry, RuntimeConfig, SegmentationService

        if backend not in ("onnxruntime", "triton"):
            raise SFPCError(f"backend {backend!r} is not one of onnxruntime, triton",
                            status=400, code="invalid_option")
        if backend == "triton" and not triton_url:
            raise SFPCError("the triton backend needs the server's address (--triton-url "
                            "host:port)", status=400, code="invalid_option")
        if threads is not None and threads < 1:
            raise SFPCError(f"threads must be >= 1, got {threads}", status=400,
                            code="invalid_option")
        export = _model_dir(model)
        self.config = RuntimeConfig(model_dirs=[export], backend=backend, triton_url=triton_url,
                                    onnx_intra_op_threads=threads)
        try:
            self.registry = ModelRegistry(self.config)
        except SFPCError:
            raise
        except (ValueError, KeyError, OSError) as exc:
            raise SFPCError(f"cannot load the model export {export}: {exc}", status=422,
                            code="invalid_model") from None
        self.service = SegmentationService(self.registry, self.config)
        self.model = self.registry.get()

    def close(self) -> None:
        self.registry.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def options(self, **options: Any) -> SegmentOptions:
        """The options of a run, checked as the gateway checks them (OptionError)."""
        if "model" in options:
            raise TypeError("give the model export to Predictor/predict (model=DIR), not as "
                            "an option")
        return parse_options({**options, "model": self.model.name})

    def predict(self, input: str | os.PathLike[str] | Case, *, progress: Progress | None = None,
                **options: Any) -> PredictionResult:
        """Segment one case: a NIfTI file, a DICOM series folder or zip, or a :class:`Case`."""
        chosen = self.options(**options)
        case = input if isinstance(input, Case) else _one_case(input)
        started = time.perf_counter()
        # The Python API hands back both maps in uncertainty mode, whatever files were asked for.
        result = self.service.segment_upload(case.uploads(), chosen, progress=progress,
                                             all_maps=True)
        engine = result.result
        if engine is None:  # every SegmentationService.run keeps it; a guard for the types
            raise RuntimeError("the pipeline returned no arrays")
        if chosen.format == "auto":
            artefacts = {a.filename: a.read() for a in result.artefacts}
        else:
            packed = result.response(chosen.format)
            artefacts = {packed.filename: packed.read()}
        return PredictionResult(
            case=case.name, mask=engine.mask, affine=np.asarray(engine.affine),
            class_names=list(engine.class_names), entropy=engine.entropy,
            mutual_information=engine.mutual_information, report=result.report,
            artefacts=artefacts, seconds=time.perf_counter() - started, options=chosen)


def _one_case(input: str | os.PathLike[str]) -> Case:
    cases, _ = find_cases(input)
    if not cases:
        raise SFPCError(f"no NIfTI file or DICOM series in {input}", status=400,
                        code="missing_file")
    if len(cases) > 1:
        raise SFPCError(
            f"{input} holds {len(cases)} cases ({', '.join(c.name for c in cases[:3])}"
            f"{', ...' if len(cases) > 3 else ''}); segment them one by one with "
            "iter_predictions(folder), or `sfpc predict -i FOLDER -o OUTDIR`", status=400,
            code="several_cases")
    return cases[0]


def predict(input: str | os.PathLike[str], model: str | os.PathLike[str] | None = None, *,
            backend: str = "onnxruntime", triton_url: str | None = None,
            threads: int | None = None, progress: Progress | None = None,
            **options: Any) -> PredictionResult:
    """Segment one case (a NIfTI file, a DICOM series folder or zip) with the export ``model``
    (default: the embedded default model), as ``POST /v1/segment`` would; the options are the
    gateway's, e.g. ``uncertainty=True``, ``outputs=["mask_nifti", "report_json"]``,
    ``flip=True``. Bad input raises :class:`~sfpc.errors.SFPCError` with the gateway's code.
    For many cases, load the model once: ``with Predictor(model) as p: p.predict(...)``."""
    with Predictor(model, backend=backend, triton_url=triton_url, threads=threads) as predictor:
        return predictor.predict(input, progress=progress, **options)


def _document_options(function: Callable[..., Any]) -> None:
    lines = [f"    ``{f.name}``: {f.description}" for f in option_fields() if f.name != "model"]
    function.__doc__ = (function.__doc__ or "").rstrip() + "\n\n    Options (SegmentOptions):\n" \
        + "\n".join(lines) + "\n"


_document_options(predict)
_document_options(Predictor.predict)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfpc predict",
        description="Segment a NIfTI file, a DICOM series (folder or zip) or a folder of cases on "
                    "this machine, no server: the gateway's pipeline and artefact names "
                    "(mask.nii.gz, segmentation.dcm, entropy.nii.gz, ...), on the embedded "
                    "default model unless --model names an export.",
        epilog="Exit codes: 0 done, 2 bad arguments or input (the gateway's 4xx codes), "
               "1 other failures, 130 interrupted.")
    parser.add_argument("-i", "--input", required=True, type=Path, metavar="INPUT",
                        help="a NIfTI file, a DICOM series folder or zip, or a folder of cases "
                             "(each NIfTI file and DICOM series folder a case)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR",
                        help="folder for the artefacts (OUTDIR/<case>/ for a folder of cases)")
    parser.add_argument("--model", metavar="EXPORT",
                        help="model export folder (written by `sfpc export`); default: the "
                             "embedded default model")
    add_option_arguments(parser, exclude=("model",))
    parser.add_argument("--backend", choices=("onnxruntime", "triton"), default="onnxruntime",
                        help="where the graphs run (default onnxruntime, in this process)")
    parser.add_argument("--triton-url", metavar="HOST:PORT",
                        help="Triton server serving the model (with --backend triton)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="ONNX Runtime threads (default: its own choice)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars and no summary (errors only)")
    return parser


class _Bars:
    """tqdm bars over cases and, inside each case, over its windows."""

    def __init__(self, total_cases: int, enabled: bool) -> None:
        self.enabled = enabled
        self.cases: Any = None
        self.windows: Any = None
        if enabled and total_cases > 1:
            from tqdm import tqdm

            self.cases = tqdm(total=total_cases, unit="case", desc="cases", position=0,
                              file=sys.stderr, dynamic_ncols=True)

    def progress(self, case: str) -> Progress | None:
        if not self.enabled:
            return None

        def update(done: int, total: int) -> None:
            from tqdm import tqdm

            if self.windows is None:
                self.windows = tqdm(total=total, unit="window", desc=case, leave=False,
                                    position=1 if self.cases is not None else 0,
                                    file=sys.stderr, dynamic_ncols=True, mininterval=0.2)
            self.windows.update(done - self.windows.n)

        return update

    def case_done(self) -> None:
        if self.windows is not None:
            self.windows.close()
            self.windows = None
        if self.cases is not None:
            self.cases.update(1)

    def write(self, text: str, stream: Any) -> None:
        if self.cases is not None or self.windows is not None:
            from tqdm import tqdm

            tqdm.write(text, file=stream)
        else:
            print(text, file=stream)

    def close(self) -> None:
        if self.windows is not None:
            self.windows.close()
        if self.cases is not None:
            self.cases.close()


def _summary(result: PredictionResult, folder: Path) -> str:
    line = (f"{result.case}: {', '.join(result.artefacts)} -> {folder} "
            f"({result.seconds:.1f} s)")
    flag = result.review
    if flag is not None:
        verdict = flag.get("review_recommended")
        word = ("no verdict" if verdict is None
                else "REVIEW RECOMMENDED" if verdict else "no review flagged")
        u = flag.get("boundary_uncertainty")
        line += f"; {word}" + (f" (boundary uncertainty {u:.3f}, threshold "
                               f"{flag['threshold']:.3f})" if u is not None else "")
    return line


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.backend == "triton" and not args.triton_url:
        parser.error("--backend triton needs --triton-url HOST:PORT")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    cases, skipped = find_cases(args.input)
    if not cases:
        raise SFPCError(f"no NIfTI file, zip or DICOM series found in {args.input}",
                        status=400, code="missing_file")
    options = options_from_args(args)
    options.pop("model", None)
    with Predictor(args.model, backend=args.backend, triton_url=args.triton_url,
                   threads=args.threads) as predictor:
        predictor.options(**options)  # a bad option stops before any work
        bars = _Bars(len(cases), not args.quiet)
        for path in skipped:
            bars.write(f"sfpc predict: skipped {path} (neither NIfTI nor DICOM)", sys.stderr)
        worst = EXIT_OK
        started = time.perf_counter()
        try:
            for case in cases:
                folder = args.output / case.output
                try:
                    result = predictor.predict(case, progress=bars.progress(case.name),
                                               **options)
                    result.save(folder)
                except SFPCError as exc:
                    if len(cases) == 1:
                        raise
                    bars.write(f"sfpc predict: {case.name}: {exc.code}: {exc.message}",
                               sys.stderr)
                    worst = max(worst, exc.exit_code)
                    continue
                finally:
                    bars.case_done()
                if not args.quiet:
                    bars.write(_summary(result, folder), sys.stdout)
        finally:
            bars.close()
        if not args.quiet and len(cases) > 1:
            failed = "" if worst == EXIT_OK else " (some failed, see above)"
            print(f"{len(cases)} cases in {time.perf_counter() - started:.1f} s{failed}")
        return worst


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args, parser)
    except SFPCError as exc:
        print(f"sfpc predict: {exc.code}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sfpc predict: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def iter_predictions(input: str | os.PathLike[str], model: str | os.PathLike[str] | None = None,
                     **kwargs: Any) -> Iterator[PredictionResult]:
    """Every case of ``input`` (a file, a series folder or a folder of cases), segmented with
    one loaded model; the options as for :func:`predict`."""
    keys = ("backend", "triton_url", "threads")
    loader = {k: kwargs.pop(k) for k in keys if k in kwargs}
    cases, _ = find_cases(input)
    with Predictor(model, **loader) as predictor:
        for case in cases:
            yield predictor.predict(case, **kwargs)


__all__ = ["Case", "PredictionResult", "Predictor", "find_cases", "iter_predictions", "main",
           "predict"]


if __name__ == "__main__":
    sys.exit(main())
