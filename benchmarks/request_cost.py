"""What an uncertainty map costs a hospital pipeline: end-to-end request time through the gateway.

Starts ``sfpc serve`` on the embedded default model (127.0.0.1, a free port, stopped by pid) and
times, upload to last byte, three requests per input, interleaved and repeated:

- ``plain``: the mask alone (``mask_nifti``);
- ``entropy``: mask + entropy map (``mask_nifti,entropy_nifti``);
- ``all``: mask, entropy, mutual information, overlay (``...,mi_nifti,overlay_png``);
- ``entropy16``: ``entropy`` with ``map_precision=uint16`` instead of the default uint8 maps
  (not a goal: what 8-bit maps save, measured beside them).

Every request also asks for ``report_json`` (a few kB), whose stage timings (decode, preprocess,
inference, postprocess, encode) split the server's time. The inputs:

- ``series20``: 20 axial CT slices of 512 x 512 as a zip of JPEG 2000 DICOM files, made from
  ``ct_a`` of the sample data (resampled in-plane to 0.71 mm, 3 mm slices);
- ``ct400``: a synthetic 512 x 512 x 400 CT (int16 HU, 0.7 x 0.7 x 1.25 mm) as gzipped NIfTI.

It prints medians, the ratios against issue 13's goals and the gateway's peak RSS, writes
``--out`` (JSON), and exits 3 when a goal is missed (0 when all are met)::

    .venv/bin/python benchmarks/request_cost.py --repeats 3 --out benchmarks/request_cost.json
    .venv/bin/python benchmarks/request_cost.py --inputs series20 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# Sibling scripts: `python benchmarks/request_cost.py` puts this folder first on sys.path.
from engine_memory import ct_volume
from load_test import LocalServer, MemorySampler

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO.parent / "shared" / "data" / "organs" / "ct_a_image.nii.gz"
MODES = {  # the query of each request, besides report_json and format=zip
    "plain": {"outputs": "mask_nifti"},
    "entropy": {"outputs": "mask_nifti,entropy_nifti"},
    "all": {"outputs": "mask_nifti,entropy_nifti,mi_nifti,overlay_png"},
    # The maps at 16 bits instead of the default 8: what the smaller files save.
    "entropy16": {"outputs": "mask_nifti,entropy_nifti", "map_precision": "uint16"},
}
GOALS = {"entropy/plain": 1.15, "all/plain": 1.25,
         "overhead plain": 0.15, "overhead uncertainty": 0.25, "peak rss GiB": 2.0}
# Issue 13 sets these on the 512 x 512 x 400 CT alone; the ratios hold for both inputs.
CT400_ONLY = ("overhead plain", "overhead uncertainty", "peak rss GiB")
STAGES = ("decode", "preprocess", "inference", "postprocess", "encode")


def series20(path: Path, sample: Path) -> Path:
    """A zip of 20 JPEG 2000 CT slices of 512 x 512 made from the sample CT's abdomen."""
    import nibabel as nib
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import JPEG2000Lossless, generate_uid
    from scipy import ndimage

    image = nib.as_closest_canonical(nib.load(str(sample)))
    hu = np.asarray(image.dataobj, dtype=np.float32)[:, :, 80:100]  # organs in slices 69-111
    size_mm = np.array(hu.shape[:2]) * np.asarray(image.header.get_zooms()[:2])
    pixel = float(size_mm.max() / 512)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for k in range(hu.shape[2]):
            zoomed = ndimage.zoom(hu[:, :, k], 512 / np.array(hu.shape[:2]), order=1)
            # RAS (i: R->L... stored L<-R) to DICOM's LPS rows (anterior first), columns (right
            # first): row r is y = A..P, column c is x = R..L.
            rows = zoomed.T[::-1, ::-1]
            stored = np.clip(rows + 1024, 0, 4095).astype(np.uint16)
            ds = pydicom.Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
            ds.SOPClassUID = pydicom.uid.CTImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.FrameOfReferenceUID = frame
            ds.Modality, ds.PatientID, ds.PatientName = "CT", "BENCH", "Bench^Request"
            ds.InstanceNumber, ds.SeriesNumber = k + 1, 1
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-256 * pixel, -256 * pixel, 3.0 * k]
            ds.PixelSpacing, ds.SliceThickness = [pixel, pixel], 3.0
            ds.Rows = ds.Columns = 512
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.compress(JPEG2000Lossless, stored)
            member = io.BytesIO()
            ds.save_as(member, enforce_file_format=True)
            archive.writestr(f"slice{k:03d}.dcm", member.getvalue())
    path.write_bytes(buffer.getvalue())
    return path


def ct400(path: Path) -> Path:
    import nibabel as nib

    volume = ct_volume((512, 512, 400))
    image = nib.Nifti1Image(volume, np.diag([0.7, 0.7, 1.25, 1.0]))
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=1))
    return path


def one_request(url: str, upload: Path, query: dict[str, str]) -> dict[str, Any]:
    params = {**query, "outputs": f"{query['outputs']},report_json", "format": "zip"}
    outputs = params["outputs"]
    started = time.perf_counter()
    with upload.open("rb") as handle:
        response = httpx.post(f"{url}/v1/segment", params=params, timeout=1800,
                              files={"file": (upload.name, handle)})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{upload.name} {outputs}: {response.status_code} "
                           f"{response.text[:300]}")
    report = json.loads(zipfile.ZipFile(io.BytesIO(response.content)).read("report.json"))
    return {"seconds": seconds, "bytes": len(response.content),
            "stages": {k: float(report["timings"].get(k, 0.0)) for k in STAGES}}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "bytes": int(statistics.median(r["bytes"] for r in runs)),
            "stages": {k: statistics.median(r["stages"][k] for r in runs) for k in STAGES},
            "all_seconds": [round(r["seconds"], 3) for r in runs]}


def overhead(summary: dict[str, Any]) -> float:
    """Share of the server's time not spent in the network (inference stage)."""
    stages = summary["stages"]
    total = sum(stages.values())
    return (total - stages["inference"]) / total if total else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", choices=("series20", "ct400"),
                        default=["series20", "ct400"])
    parser.add_argument("--repeats", type=int, default=3, help="requests per mode and input")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads of the gateway (1: the ratio is "
                             "stable on a shared 2-core machine)")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="the sample CT (ct_a)")
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="sfpc-request-cost-"))
    makers = {"series20": lambda: series20(work / "series20.zip", args.sample),
              "ct400": lambda: ct400(work / "ct400.nii.gz")}
    uploads = {name: makers[name]() for name in args.inputs}
    env = {"SFPC_ONNX_INTRA_OP_THREADS": str(args.threads), "SFPC_REQUEST_TIMEOUT_S": "3600",
           "SFPC_MAX_UPLOAD_BYTES": str(4 << 30)}
    server = LocalServer([], env, work)
    results: dict[str, Any] = {"command": " ".join(["benchmarks/request_cost.py", *sys.argv[1:]]),
                               "threads": args.threads, "inputs": {}}
    missed: list[str] = []
    try:
        url = server.wait_ready()
        for name, upload in uploads.items():
            one_request(url, upload, MODES["plain"])  # warm-up: sessions, caches, page cache
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            with MemorySampler(server.process.pid) as memory:
                for _ in range(args.repeats):
                    for mode, query in MODES.items():  # interleaved: drift hits all alike
                        runs[mode].append(one_request(url, upload, query))
            summary = {mode: summarise(r) for mode, r in runs.items()}
            plain = summary["plain"]["seconds"]
            figures = {
                "entropy/plain": summary["entropy"]["seconds"] / plain,
                "all/plain": summary["all"]["seconds"] / plain,
                "entropy16/plain": summary["entropy16"]["seconds"] / plain,
                "overhead plain": overhead(summary["plain"]),
                "overhead uncertainty": overhead(summary["all"]),
                "peak rss GiB": memory.peak / 2**30,
            }
            results["inputs"][name] = {"upload_bytes": upload.stat().st_size,
                                       "modes": summary, "figures": figures}
            print(f"\n{name} ({upload.stat().st_size / 2**20:.1f} MiB upload, "
                  f"{args.repeats} interleaved repeats, medians)")
            header = "".join(f"{s:>12}" for s in STAGES)
            print(f"{'mode':<9}{'seconds':>9}{'MiB out':>9}  {header}")
            for mode, s in summary.items():
                print(f"{mode:<9}{s['seconds']:>9.2f}{s['bytes'] / 2**20:>9.1f}  "
                      + "".join(f"{s['stages'][k]:>12.2f}" for k in STAGES))
            for key, value in figures.items():
                if key not in GOALS:
                    print(f"  {key:<22}{value:>7.3f}   (not a goal)")
                    continue
                goal = GOALS[key]
                ok = value <= goal
                if name != "ct400" and key in CT400_ONLY:
                    print(f"  {key:<22}{value:>7.3f}   (goal on ct400 only)")
                    continue
                if not ok:
                    missed.append(f"{name}: {key}")
                print(f"  {key:<22}{value:>7.3f}   goal <= {goal}   {'met' if ok else 'MISSED'}")
    finally:
        server.stop()
    results["missed"] = missed
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("\nall goals met" if not missed else f"\nmissed: {', '.join(missed)}")
    return 0 if not missed else 3


if __name__ == "__main__":
    sys.exit(main())
