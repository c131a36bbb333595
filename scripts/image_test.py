"""`make image-test`: the built image runs the distributed mode for real.

Starts a throw-away PostgreSQL (Debian's package, 127.0.0.1, a free port), then from the image a
gateway (`sfpc serve`, the embedded default model) and a worker (`sfpc worker`) sharing a data
folder, both on the host's loopback; submits one CT as a job, waits for it, fetches the mask and
checks its shape against the upload. Everything is stopped by id at the end, whatever happened.

    .venv/bin/python scripts/image_test.py [--image localhost/sfpc-seg:latest] [--input CT.nii.gz]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # the throw-away PostgreSQL of the load test
from load_test import ThrowAwayPostgres  # noqa: E402

DEFAULT_INPUTS = (REPO / "data" / "organs" / "ct_a_image.nii.gz",
                  REPO.parent / "shared" / "data" / "organs" / "ct_a_image.nii.gz")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine() -> str:
    found = os.environ.get("CONTAINER") or shutil.which("podman") or shutil.which("docker")
    if not found:
        raise SystemExit("image-test: needs podman or docker")
    return found


def run_flags(tool: str) -> list[str]:
    flags = os.environ.get("CONTAINER_FLAGS")
    if flags is None:
        flags = subprocess.run(["bash", str(REPO / "scripts" / "container_flags.sh"), tool],
                               capture_output=True, text=True, check=True).stdout
    return flags.split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=os.environ.get("IMAGE", "localhost/sfpc-seg:latest"))
    parser.add_argument("--input", type=Path,
                        default=next((p for p in DEFAULT_INPUTS if p.is_file()), None),
                        help="a NIfTI CT (default: ct_a of `sfpc sample-data data`)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.input is None or not args.input.is_file():
        raise SystemExit("image-test: no input; run `.venv/bin/sfpc sample-data data` first")
    tool = engine()
    flags = run_flags(tool)
    data = Path(tempfile.mkdtemp(prefix="sfpc-image-test-"))
    data.chmod(0o777)  # the image runs as uid 10001
    postgres = ThrowAwayPostgres().start()
    port = free_port()
    env = {"SFPC_JOBS_BACKEND": "postgres", "SFPC_DATABASE_URL": postgres.url,
           "SFPC_HOST": "127.0.0.1", "SFPC_PORT": str(port), "SFPC_LOG_JSON": "false"}
    env_args = [item for key, value in env.items() for item in ("-e", f"{key}={value}")]
    common = [tool, "run", "-d", *flags, "--network=host", *env_args,
              "-v", f"{data}:/var/lib/sfpc"]
    containers: list[str] = []
    started = time.monotonic()
    try:
        gateway = subprocess.run([*common, args.image], capture_output=True, text=True,
                                 check=True).stdout.strip()
        containers.append(gateway)
        worker = subprocess.run([*common, "--entrypoint", "sfpc", args.image, "worker"],
                                capture_output=True, text=True, check=True).stdout.strip()
        containers.append(worker)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway container did not become ready:\n" + logs(
                    tool, gateway))
            time.sleep(1)
        print(f"gateway ready in {time.monotonic() - started:.1f} s: "
              f"{httpx.get(f'{url}/readyz').text}")
        with args.input.open("rb") as handle:
            submitted = httpx.post(f"{url}/v1/jobs", files={"file": (args.input.name, handle)},
                                   params={"outputs": "mask_nifti"}, timeout=120)
        submitted.raise_for_status()
        job = submitted.json()
        print(f"job {job['id']} {job['status']}")
        deadline = time.monotonic() + args.timeout
        while True:
            status = httpx.get(job["status_url"], timeout=10).json()
            if status["status"] in ("succeeded", "failed", "cancelled", "expired"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job still {status['status']} after {args.timeout:g} s")
            time.sleep(1)
        if status["status"] != "succeeded":
            raise RuntimeError(f"job {status['status']}: {status.get('error')}\n"
                               + logs(tool, worker))
        result = httpx.get(job["results_url"], timeout=60)
        result.raise_for_status()
        raw = result.content
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b"
                                          else raw)
        expected = nib.load(str(args.input)).shape
        if mask.shape != expected:
            raise RuntimeError(f"mask shape {mask.shape} != input shape {expected}")
        labels = sorted(int(v) for v in set(mask.get_fdata().ravel().astype(int)))
        stats = httpx.get(f"{url}/v1/jobs/stats", timeout=10).json()
        print(f"job succeeded, run by the worker container: mask {mask.shape}, labels {labels}; "
              f"/v1/jobs/stats {stats}")
        print(f"image-test passed in {time.monotonic() - started:.1f} s")
        return 0
    except Exception as exc:  # report, then clean up below
        print(f"image-test FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        for container in containers:
            subprocess.run([tool, "rm", "-f", container], capture_output=True)
        postgres.stop()
        shutil.rmtree(data, ignore_errors=True)


def logs(tool: str, container: str) -> str:
    done = subprocess.run([tool, "logs", container], capture_output=True, text=True)
    return (done.stdout + done.stderr)[-3000:]


if __name__ == "__main__":
    sys.exit(main())
