"""``sfpc client batch`` and the discovery under it, against a real gateway process.

The input trees hold the real NIfTI images and the real DICOM series of the shared data folder
(linked, never copied into the project), with the series' files renamed, shuffled and split
over two folders. Oracles: pydicom (which file belongs to which series; what the SEG
references), nibabel (each mask's grid is its input's), the gateway's synchronous endpoint
(the same mask for the same file), and the gateway's job list (what was submitted, and how
often).
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from sfpc.clients.discover import discover  # noqa: E402
from sfpc.clients.http import SFPCClient  # noqa: E402
from sfpc.clients.manifest import Manifest  # noqa: E402
from tests.support.models import tiny_models
from tests.support.paths import DATA, DATA_MISSING, DICOM_SERIES, TRANSFER_SYNTAXES
from tests.support.server import GatewayServer

pytest.importorskip("torch")  # the tiny model is trained and exported with torch
# Real gateway processes and `sfpc client` subprocesses: not in `make test-fast`.
pytestmark = [pytest.mark.skipif(not DATA.is_dir(), reason=DATA_MISSING),
              pytest.mark.integration]
KEY = "batch-test-key"
NIFTIS = {  # link name in the tree -> shared file
    "nifti/brain1.nii.gz": "lesions/brain1_image.nii.gz",
    "nifti/deep/er/breast1.nii.gz": "lesions/breast1_image.nii.gz",
    "nifti/mr_d.nii.gz": "organs/mr_d_image.nii.gz",
}
EXTRA_NIFTIS = {"more/brain2.nii.gz": "lesions/brain2_image.nii.gz",
                "more/ct_a.nii.gz": "organs/ct_a_image.nii.gz",
                "more/lung1.nii.gz": "lesions/lung1_image.nii.gz"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tiny_models(tmp_path_factory.getbasetemp())
    env = {"SFPC_API_KEYS": f'["{KEY}"]', "SFPC_DATA_DIR": str(tmp_path_factory.mktemp("data")),
           "SFPC_JOB_WORKERS": "1", "SFPC_ONNX_INTRA_OP_THREADS": "1"}
    log = tmp_path_factory.mktemp("log") / "gateway.log"
    with GatewayServer([models["tiny3d"]], log, env=env) as srv:
        yield srv


@pytest.fixture
def api(server):
    with SFPCClient(server.url, api_key=KEY, timeout=60) as client:
        yield client


def series_files() -> list[Path]:
    return sorted(p for p in DICOM_SERIES.iterdir() if p.is_file())


def build_tree(root: Path, niftis: dict[str, str]) -> Path:
    """Links to the shared files: NIfTI images, and the DICOM series renamed (no extension,
    names in reverse order of the originals) and split over two folders, plus a text file."""
    for name, shared in niftis.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(DATA / shared)
    for index, path in enumerate(series_files()):
        folder = root / "scans" / "exam1" / ("part_a" if index % 2 else "part_b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"IM{999 - index:04d}").symlink_to(path)
    (root / "scans" / "README.txt").write_text("not an image\n")
    return root


def run_cli(server, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SFPC_API_KEY": KEY, "SFPC_SERVER_URL": server.url}
    return subprocess.run([sys.executable, "-m", "sfpc.cli", "client", "batch", *args,
                           "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=timeout)


def records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def mask_of(data: bytes) -> np.ndarray:
    raw = gzip.decompress(data)
    return np.asanyarray(nib.Nifti1Image.from_bytes(raw).dataobj)


# ----------------------------------------------------------------------------------------------


def test_discovery_groups_dicom_by_series_uid_whatever_the_names(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    root = build_tree(tmp_path / "in", NIFTIS)
    others = root / "misc"
    others.mkdir()
    for path in sorted(TRANSFER_SYNTAXES.iterdir()):
        (others / path.stem).symlink_to(path)  # extension-less as well
    (others / "report").symlink_to(get_testdata_file("test-SR.dcm"))
    # A bare data set: no preamble, no file meta (implicit VR little endian), as some old
    # archives hold them.
    bare = pydicom.dcmread(TRANSFER_SYNTAXES / "implicit_little.dcm")
    del bare.file_meta
    pydicom.dcmwrite(others / "bare_dataset", bare, enforce_file_format=False, implicit_vr=True,
                     little_endian=True)
    (root / "nifti" / "mask_label.nii.gz").symlink_to(DATA / "lesions" / "brain1_label.nii.gz")

    found = discover(root, exclude=["*_label.nii.gz"])

    # The oracle: each image file's SeriesInstanceUID as pydicom reads it.
    by_uid: dict[str, set[Path]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith((".nii.gz", ".txt")):
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if ds.Modality != "SR":
                by_uid.setdefault(ds.SeriesInstanceUID, set()).add(path)
    dicom = {item.series_uid: item for item in found.items if item.kind == "dicom"}
    assert set(dicom) == set(by_uid)
    for uid, paths in by_uid.items():
        assert set(dicom[uid].paths) == paths
    # One transfer-syntax sample belongs to the shared series: it joins it from its folder.
    main_uid = pydicom.dcmread(series_files()[0], stop_before_pixels=True).SeriesInstanceUID
    assert len(dicom[main_uid].paths) == len(series_files()) + 1
    assert dicom[main_uid].output == f"series-{main_uid}"  # spans scans/ and misc/
    singles = [item for uid, item in dicom.items() if uid != main_uid]
    assert {item.output for item in singles} == {f"misc/series-{uid}" for uid in by_uid
                                                 if uid != main_uid}

    niftis = sorted((item.label, item.output) for item in found.items if item.kind == "nifti")
    assert niftis == [("nifti/brain1.nii.gz", "nifti/brain1"),
                      ("nifti/deep/er/breast1.nii.gz", "nifti/deep/er/breast1"),
                      ("nifti/mr_d.nii.gz", "nifti/mr_d")]
    bare_uid = bare.SeriesInstanceUID
    assert others / "bare_dataset" in dicom[bare_uid].paths and len(dicom[bare_uid].paths) == 2
    skipped = {path.name: why for path, why in found.skipped}
    assert skipped["README.txt"] == "not NIfTI or DICOM"
    assert skipped["mask_label.nii.gz"] == "excluded"
    assert "not an image" in skipped["report"]

    # Without the stray sample, the series has a folder of its own, mirrored as it is.
    alone = discover(build_tree(tmp_path / "plain", {}))
    assert [(item.output, len(item.paths)) for item in alone.items] == [
        ("scans/exam1", len(series_files()))]


def test_folder_end_to_end_then_a_rerun_skips_everything(server, api, tmp_path):
    import pydicom

    root = build_tree(tmp_path / "in", NIFTIS)
    out = tmp_path / "out"
    jobs_before = api.jobs(limit=1).total
    first = run_cli(server, str(root), str(out), "--concurrency", "2")
    assert first.returncode == 0, first.stderr
    assert "4 inputs: 4 done, 0 already done, 0 failed" in first.stdout
    assert api.jobs(limit=1).total == jobs_before + 4

    for name, shared in NIFTIS.items():
        folder = out / name.removesuffix(".nii.gz")
        assert sorted(p.name for p in folder.iterdir()) == ["mask.nii.gz", "report.json"]
        source = nib.load(DATA / shared)
        written = nib.load(folder / "mask.nii.gz")
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
        sync = api.segment(DATA / shared)
        np.testing.assert_array_equal(np.asanyarray(written.dataobj),
                                      mask_of(sync.files["mask.nii.gz"]))
        report = json.loads((folder / "report.json").read_text())
        assert report["input"]["shape"] == list(source.shape)

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in series_files()]
    seg_folder = out / "scans" / "exam1"
    assert sorted(p.name for p in seg_folder.iterdir()) == ["report.json", "segmentation.dcm"]
    seg = pydicom.dcmread(seg_folder / "segmentation.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in sources}

    manifest = out / "manifest.jsonl"
    lines = records(manifest)
    done = [r for r in lines if r["status"] == "done"]
    assert sorted(r["key"] for r in done) == sorted(
        [f"nifti:{n}" for n in NIFTIS] + [f"dicom:{sources[0].SeriesInstanceUID}"])
    for record in done:
        assert record["job_id"] and record["fingerprint"]
        assert all((out / p).is_file() for p in record["outputs"])
        assert record["timings"]["total_s"] >= record["timings"]["run_s"] >= 0
        assert "error" not in record
    assert {r["status"] for r in lines} == {"submitted", "done"}

    second = run_cli(server, str(root), str(out))
    assert second.returncode == 0, second.stderr
    assert "4 inputs: 0 done, 4 already done, 0 failed" in second.stdout
    assert records(manifest) == lines  # nothing submitted, nothing recorded
    assert api.jobs(limit=1).total == jobs_before + 4

    # A deleted artefact makes its input due again (and only that one).
    (out / "nifti" / "mr_d" / "mask.nii.gz").unlink()
    third = run_cli(server, str(root), str(out))
    assert third.returncode == 0 and "1 done, 3 already done" in third.stdout
    assert api.jobs(limit=1).total == jobs_before + 5


def test_failed_input_sets_the_exit_code_and_is_retried_on_rerun(server, api, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    good = (DATA / "lesions" / "breast1_image.nii.gz").read_bytes()
    (root / "good.nii.gz").write_bytes(good)
    (root / "bad.nii.gz").write_bytes(good[: len(good) // 2])  # a truncated gzip stream
    out = tmp_path / "out"
    jobs_before = api.jobs(limit=1).total

    first = run_cli(server, str(root), str(out))
    assert first.returncode == 1
    assert "2 inputs: 1 done, 0 already done, 1 failed" in first.stdout
    assert "bad.nii.gz" in first.stderr
    last = {r["key"]: r for r in records(out / "manifest.jsonl")}
    assert last["nifti:good.nii.gz"]["status"] == "done"
    failed = last["nifti:bad.nii.gz"]
    assert failed["status"] == "failed" and failed["error"]["code"] and failed["job_id"]
    job = api.job(failed["job_id"])  # the gateway's own account of the failure
    assert job.status.value == "failed" and job.error.code == failed["error"]["code"]
    assert not (out / "bad").exists() or not any((out / "bad").iterdir())

    (root / "bad.nii.gz").write_bytes(gzip.compress(gzip.decompress(good)))  # repaired
    second = run_cli(server, str(root), str(out))
    assert second.returncode == 0, second.stderr
    assert "2 inputs: 1 done, 1 already done, 0 failed" in second.stdout
    assert api.jobs(limit=1).total == jobs_before + 3  # good once, bad twice
    np.testing.assert_array_equal(mask_of((out / "bad" / "mask.nii.gz").read_bytes()),
                                  mask_of((out / "good" / "mask.nii.gz").read_bytes()))


def test_killed_run_resumes_without_redoing_what_was_done(server, api, tmp_path):
    root = build_tree(tmp_path / "in", {**NIFTIS, **EXTRA_NIFTIS})
    out = tmp_path / "out"
    manifest = out / "manifest.jsonl"
    n_inputs = len(NIFTIS) + len(EXTRA_NIFTIS) + 1
    jobs_before = api.jobs(limit=1).total
    env = {**os.environ, "SFPC_API_KEY": KEY, "SFPC_SERVER_URL": server.url}
    process = subprocess.Popen(
        [sys.executable, "-m", "sfpc.cli", "client", "batch", str(root), str(out),
         "--concurrency", "1", "--no-progress"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if manifest.exists():
                latest = {r["key"]: r["status"] for r in records(manifest)}
                # Killed with one input done and the next one's job on the server.
                if "done" in latest.values() and "submitted" in latest.values():
                    break
            time.sleep(0.02)
        assert process.poll() is None, "the batch finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()

    killed_run = records(manifest)
    done_first = {r["key"]: r["job_id"] for r in killed_run if r["status"] == "done"}
    state = {r["key"]: r for r in killed_run}
    in_flight = {k: r["job_id"] for k, r in state.items() if r["status"] == "submitted"}
    assert 1 <= len(done_first) < n_inputs and in_flight

    rerun = run_cli(server, str(root), str(out), "--concurrency", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert (f"{n_inputs} inputs: {n_inputs - len(done_first)} done, {len(done_first)} "
            "already done, 0 failed") in rerun.stdout
    second = records(manifest)[len(killed_run):]
    assert not {r["key"] for r in second} & set(done_first)  # nothing redone
    final = {r["key"]: r for r in records(manifest)}
    assert len(final) == n_inputs and all(r["status"] == "done" for r in final.values())
    for key, job_id in done_first.items():
        assert final[key]["job_id"] == job_id
    for key, job_id in in_flight.items():  # the killed run's job was picked up, not redone
        assert final[key]["job_id"] == job_id
    # Every input was submitted once; a kill between a 202 and its manifest line may cost one
    # more submission, never a second run of a done input.
    assert api.jobs(limit=1).total - jobs_before in (n_inputs, n_inputs + 1)
    for record in final.values():
        assert all((out / p).is_file() for p in record["outputs"])


def test_dry_run_and_usage_errors(server, tmp_path):
    root = build_tree(tmp_path / "in", {"a/brain1.nii.gz": "lesions/brain1_image.nii.gz"})
    dry = run_cli(server, str(root), str(tmp_path / "out"), "--dry-run")
    assert dry.returncode == 0
    assert "segment  a/brain1.nii.gz -> a/brain1/" in dry.stdout
    assert "2 to segment, 0 skipped" in dry.stdout
    missing = run_cli(server, str(tmp_path / "absent"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unknown = run_cli(server, str(root), str(tmp_path / "out"), "--model", "nope")
    assert unknown.returncode == 2 and "serves no model 'nope'" in unknown.stderr
    env = {**os.environ, "SFPC_SERVER_URL": server.url}
    env.pop("SFPC_API_KEY", None)
    no_key = subprocess.run([sys.executable, "-m", "sfpc.cli", "client", "batch", str(root),
                             str(tmp_path / "out")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert no_key.returncode == 2 and "missing_api_key" in no_key.stderr
    with Manifest(tmp_path / "busy" / "manifest.jsonl"):  # another run holds the manifest
        locked = run_cli(server, str(root), str(tmp_path / "busy"))
    assert locked.returncode == 2 and "in use by another run" in locked.stderr
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_sync_mode_writes_the_same_artefacts_without_jobs(server, api, tmp_path):
    import pydicom

    root = build_tree(tmp_path / "in", {"n/breast1.nii.gz": "lesions/breast1_image.nii.gz"})
    out = tmp_path / "out"
    jobs_before = api.jobs(limit=1).total
    result = run_cli(server, str(root), str(out), "--mode", "sync", "--outputs",
                     "mask_nifti,seg_dicom")
    assert result.returncode == 0, result.stderr
    assert "2 inputs: 2 done" in result.stdout
    assert api.jobs(limit=1).total == jobs_before  # one request each, no job
    # seg_dicom is asked for the series only; a NIfTI input gets its mask.
    assert sorted(p.name for p in (out / "n" / "breast1").iterdir()) == ["mask.nii.gz"]
    assert sorted(p.name for p in (out / "scans" / "exam1").iterdir()) == [
        "mask.nii.gz", "segmentation.dcm"]
    seg = pydicom.dcmread(out / "scans" / "exam1" / "segmentation.dcm")
    series = pydicom.dcmread(series_files()[0], stop_before_pixels=True).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    sync = api.segment(DATA / "lesions" / "breast1_image.nii.gz")
    np.testing.assert_array_equal(
        mask_of((out / "n" / "breast1" / "mask.nii.gz").read_bytes()),
        mask_of(sync.files["mask.nii.gz"]))


def test_flip_is_sent_and_only_then_part_of_the_signature() -> None:
    from sfpc.clients.batch import BatchOptions
    from sfpc.clients.discover import WorkItem

    item = WorkItem(key="a", kind="nifti", label="a.nii.gz", output="a", fingerprint="f")
    plain, flipped = BatchOptions(), BatchOptions(flip=True)
    assert plain.request(item)["flip"] is None and flipped.request(item)["flip"] is True
    # manifests written before the option keep matching plain runs
    assert "flip" not in plain.signature(item) and flipped.signature(item)["flip"] is True
