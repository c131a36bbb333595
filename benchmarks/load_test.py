"""Load test of the gateway: N concurrent requests, synchronous and/or as jobs.

Starts a gateway (``sfpc serve`` on 127.0.0.1, a fresh data dir) or targets a running one on this
machine, sends ``--requests`` uploads per mode from ``--concurrency`` client threads, and
reports throughput, p50/p95 latency, errors, the server's peak memory (RSS of the server process
and its children, sampled with psutil) and whether every accepted job finished (no job lost).

Bounded in count and time: each mode sends at most ``--requests`` uploads and stops sending
after ``--max-seconds``; a job not finished within ``--max-seconds`` after the last submission
counts as lost. Jobs refused with 503 are retried after their Retry-After (the retries are
reported). Only loopback addresses are accepted as targets.

    .venv/bin/python benchmarks/load_test.py --model runs/export/ct --requests 20 \\
        --concurrency 4 --mode both
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --server-pid 1234

Distributed jobs (SFPC_JOBS_BACKEND=postgres): ``--distributed-workers 1,2`` starts a throw-away
PostgreSQL (Debian's postgresql, as the tests do), one gateway and N ``sfpc worker`` processes per
run and reports jobs/s and p95 latency per N; ``--kill-worker`` adds a run with two workers in
which one is SIGKILLed once it runs a job (lost must be 0):

    .venv/bin/python benchmarks/load_test.py --model runs/export/ct --mode jobs \
        --requests 40 --concurrency 8 --distributed-workers 1,2 --kill-worker
"""

from __future__ import annotations

import argparse
import gzip
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "organs" / "ct_a_image.nii.gz"
_RUNNING = re.compile(r"running on https?://127\.0\.0\.1:(\d+)")
TERMINAL = ("succeeded", "failed", "cancelled", "expired")


# ----------------------------------------------------------------------------------------------
# The server under test
# ----------------------------------------------------------------------------------------------


class MemorySampler:
    """Peak RSS of a process and its children, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.start_rss = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            procs = [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self.peak = self.start_rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class LocalServer:
    """``sfpc serve`` in a child process on 127.0.0.1 with a fresh data dir."""

    def __init__(self, models: list[str], env: dict[str, str], workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "gateway.log"
        command = [sys.executable, "-m", "sfpc.cli", "serve", "--host", "127.0.0.1", "--port",
                   "0", "--data-dir", str(workdir / "data")]
        for model in models:
            command += ["--model", model]
        full_env = {**os.environ, "SFPC_LOG_JSON": "true", **env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=full_env, cwd=workdir)
        self.url = ""

    def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.process.returncode}):\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            found = _RUNNING.search(self.log_path.read_text(errors="replace"))
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                try:
                    if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                        return self.url
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the gateway did not become ready in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"refusing to load-test {host!r}: only loopback targets on this machine")


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: str
    sent: int = 0
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    retries_503: int = 0
    submit_latencies: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode, "requests": self.sent, "succeeded": self.ok,
            "errors": dict(self.errors), "wall_s": round(self.wall_s, 3),
            "throughput_per_s": round(self.ok / self.wall_s, 3) if self.wall_s else 0.0,
            "latency_p50_s": _pct(self.latencies, 50), "latency_p95_s": _pct(self.latencies, 95),
            "latency_max_s": round(max(self.latencies), 3) if self.latencies else None,
        }
        if self.mode == "jobs":
            out.update({"submit_p50_s": _pct(self.submit_latencies, 50),
                        "submit_p95_s": _pct(self.submit_latencies, 95),
                        "retries_503": self.retries_503, "accepted": len(self.accepted),
                        "lost": len(self.lost), "lost_ids": self.lost})
        return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values), q)), 3)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


def run_sync(url: str, payload: tuple[str, bytes], args: argparse.Namespace) -> ModeResult:
    result = ModeResult("sync")
    lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds

    def one(_: int) -> None:
        if time.monotonic() > deadline:
            return
        with lock:
            result.sent += 1
        t0 = time.perf_counter()
        try:
            with httpx.Client(base_url=url, timeout=args.request_timeout,
                              headers=_headers(args.api_key)) as client:
                response = client.post("/v1/segment", files={"file": payload},
                                       params=args.params)
        except httpx.HTTPError as exc:
            with lock:
                result.error(type(exc).__name__)
            return
        elapsed = time.perf_counter() - t0
        with lock:
            if response.status_code == 200:
                result.ok += 1
                result.latencies.append(elapsed)
            else:
                result.error(f"{response.status_code}:{_code(response)}")

    _fan_out(one, args, result)
    return result


def run_jobs(url: str, payload: tuple[str, bytes], args: argparse.Namespace) -> ModeResult:
    result = ModeResult("jobs")
    lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds

    def one(_: int) -> None:
        if time.monotonic() > deadline:
            return
        with lock:
            result.sent += 1
        with httpx.Client(base_url=url, timeout=args.request_timeout,
                          headers=_headers(args.api_key)) as client:
            t0 = time.perf_counter()
            job_id = None
            while time.monotonic() < deadline + args.max_seconds:
                try:
                    t_submit = time.perf_counter()
                    response = client.post("/v1/jobs", files={"file": payload},
                                           params=args.params)
                except httpx.HTTPError as exc:
                    with lock:
                        result.error(type(exc).__name__)
                    return
                if response.status_code == 202:
                    job_id = response.json()["id"]
                    with lock:
                        result.submit_latencies.append(time.perf_counter() - t_submit)
                        result.accepted.append(job_id)
                    break
                if response.status_code == 503 and "retry-after" in response.headers:
                    with lock:
                        result.retries_503 += 1
                    time.sleep(min(float(response.headers["retry-after"]), 5.0))
                    continue
                with lock:
                    result.error(f"{response.status_code}:{_code(response)}")
                return
            if job_id is None:
                with lock:
                    result.error("not_accepted_in_time")
                return
            status = _poll(client, job_id, deadline + args.max_seconds)
            elapsed = time.perf_counter() - t0
            with lock:
                if status == "succeeded":
                    result.ok += 1
                    result.latencies.append(elapsed)
                elif status is None:
                    result.lost.append(job_id)
                else:
                    result.error(f"job_{status}")

    _fan_out(one, args, result)
    _check_lost(url, args, result)
    return result


def _poll(client: httpx.Client, job_id: str, until: float) -> str | None:
    interval = 0.05
    while time.monotonic() < until:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200 and response.json()["status"] in TERMINAL:
            return response.json()["status"]
        if response.status_code in (404, 410):
            return f"http_{response.status_code}"
        time.sleep(interval)
        interval = min(0.5, interval * 1.5)
    return None


def _check_lost(url: str, args: argparse.Namespace, result: ModeResult) -> None:
    """Every accepted job must be listed and, if it succeeded, have downloadable results."""
    with httpx.Client(base_url=url, timeout=args.request_timeout,
                      headers=_headers(args.api_key)) as client:
        listed: set[str] = set()
        offset = 0
        while True:
            page = client.get("/v1/jobs", params={"limit": 500, "offset": offset}).json()
            listed |= {item["id"] for item in page["items"]}
            if page["next_offset"] is None:
                break
            offset = page["next_offset"]
        for job_id in result.accepted:
            if job_id not in listed and job_id not in result.lost:
                result.lost.append(job_id)
                continue
            status = client.get(f"/v1/jobs/{job_id}")
            if status.status_code == 200 and status.json()["status"] == "succeeded":
                if client.get(f"/v1/jobs/{job_id}/results").status_code != 200:
                    result.lost.append(job_id)


def _fan_out(one: Callable[[int], None], args: argparse.Namespace, result: ModeResult) -> None:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        list(pool.map(one, range(args.requests)))
    result.wall_s = time.perf_counter() - t0


def _code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def synthetic_volume(size: int) -> bytes:
    """A smooth int16 CT-like volume (2 mm voxels) as gzipped NIfTI, when no input is given."""
    import nibabel as nib
    from scipy import ndimage

    rng = np.random.default_rng(0)
    data = ndimage.gaussian_filter(rng.normal(size=(size,) * 3).astype(np.float32), 3.0)
    data = (data / data.std() * 300).astype(np.int16)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), compresslevel=1, mtime=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running gateway on this machine (loopback only)")
    target.add_argument("--model", action="append", dest="models", metavar="DIR",
                        help="start a gateway serving this export directory (repeatable; "
                             "default: the embedded default model)")
    p.add_argument("--server-pid", type=int, help="with --url: pid to sample memory from")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="settings of the started gateway, e.g. SFPC_JOB_WORKERS=2")
    p.add_argument("--mode", choices=("sync", "jobs", "both"), default="both")
    p.add_argument("--requests", type=int, default=20, help="uploads per mode (bounded)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="stop sending after this long (per mode)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--input", type=Path, help=f"upload file (default: {DEFAULT_INPUT} when "
                   "present, else a synthetic volume)")
    p.add_argument("--synthetic-size", type=int, default=96)
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="segmentation option, e.g. uncertainty=true (repeatable)")
    p.add_argument("--api-key", default=os.environ.get("SFPC_LOAD_API_KEY"))
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--distributed-workers", default="", metavar="N,N,...",
                   help="distributed mode: one run per worker count (PostgreSQL started here)")
    p.add_argument("--kill-worker", action="store_true",
                   help="distributed mode: also a 2-worker run with one worker SIGKILLed")
    args = p.parse_args(argv)
    args.worker_counts = [int(n) for n in args.distributed_workers.split(",") if n.strip()]
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")
    args.params = dict(opt.split("=", 1) for opt in args.option)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.input is not None:
        payload = (args.input.name, args.input.read_bytes())
    elif DEFAULT_INPUT.is_file():
        payload = (DEFAULT_INPUT.name, DEFAULT_INPUT.read_bytes())
    else:
        payload = ("synthetic.nii.gz", synthetic_volume(args.synthetic_size))

    if args.worker_counts or args.kill_worker:
        return run_distributed(payload, args)
    server: LocalServer | None = None
    workdir = None
    if args.url:
        check_loopback(args.url)
        url, pid = args.url.rstrip("/"), args.server_pid
    else:
        workdir = tempfile.TemporaryDirectory(prefix="sfpc-load-")
        env = dict(item.split("=", 1) for item in args.server_env)
        server = LocalServer(args.models or [], env, Path(workdir.name))
        url, pid = server.wait_ready(), server.process.pid
    modes = ("sync", "jobs") if args.mode == "both" else (args.mode,)
    report: dict[str, Any] = {"url": url, "input": payload[0], "input_bytes": len(payload[1]),
                              "requests_per_mode": args.requests,
                              "concurrency": args.concurrency, "options": args.params,
                              "modes": []}
    try:
        with httpx.Client(base_url=url, timeout=30, headers=_headers(args.api_key)) as c:
            models = c.get("/v1/models")
            if models.status_code == 200:
                report["models"] = [m["name"] for m in models.json().get("models", [])]
            # One request first: model warm-up is not what this measures.
            c.post("/v1/segment", files={"file": payload}, params=args.params,
                   timeout=args.request_timeout)
        sampler = MemorySampler(pid) if pid else None
        for mode in modes:
            if sampler is not None:
                with sampler:
                    result = (run_sync if mode == "sync" else run_jobs)(url, payload, args)
                entry = result.summary()
                entry["server_rss_start_mib"] = round(sampler.start_rss / 2**20, 1)
                entry["server_rss_peak_mib"] = round(sampler.peak / 2**20, 1)
                sampler = MemorySampler(pid)
            else:
                entry = (run_sync if mode == "sync" else run_jobs)(url, payload, args).summary()
            report["modes"].append(entry)
    finally:
        if server is not None:
            server.stop()
        if workdir is not None:
            workdir.cleanup()
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = any(m["errors"] or m.get("lost") for m in report["modes"])
    return 1 if failed else 0


def _start_worker(models: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "sfpc.cli", "worker"]
    for model in models:
        command += ["--model", model]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "SFPC_LOG_JSON": "true", **env})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"a worker exited:\n{log_path.read_text()[-3000:]}")
        if '"worker started"' in log_path.read_text(errors="replace"):
            return process
        time.sleep(0.1)
    raise RuntimeError("a worker did not start in time")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _kill_when_running(url: str, args: argparse.Namespace, victim: subprocess.Popen,
                       log_path: Path, done: threading.Event) -> None:
    """SIGKILL ``victim`` as soon as its log says it started a job."""
    while not done.is_set() and victim.poll() is None:
        if '"job started"' in log_path.read_text(errors="replace"):
            os.kill(victim.pid, signal.SIGKILL)
            return
        time.sleep(0.02)


class ThrowAwayPostgres:
    """Debian's PostgreSQL on 127.0.0.1 in a temporary folder (as the postgres user when run as
    root: initdb refuses root), stopped by the postmaster's pid. (The tests have their own copy
    in tests/support/postgres.py: benchmarks may not import the tests.)"""

    def __init__(self) -> None:
        import shutil
        import socket

        self.root = Path(tempfile.mkdtemp(prefix="sfpc-load-pg-"))
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.pid: int | None = None
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/sfpc"

    def start(self) -> ThrowAwayPostgres:
        import glob

        import psycopg

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
        if not bins:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        data = self.root / "data"
        subprocess.run([*self.as_user, f"{bins[0]}/initdb", "-D", str(data), "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True, capture_output=True)
        with open(self.root / "postgres.log", "wb") as log:
            subprocess.Popen([*self.as_user, f"{bins[0]}/postgres", "-D", str(data), "-p",
                              str(self.port), "-h", "127.0.0.1", "-k", str(self.root),
                              "-c", "max_connections=200"], stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
                                     autocommit=True) as conn:
                    conn.execute("CREATE DATABASE sfpc")
                self.pid = int((data / "postmaster.pid").read_text().split()[0])
                return self
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise RuntimeError((self.root / "postgres.log").read_text()[-2000:])

    def stop(self) -> None:
        import shutil

        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGINT)
                for _ in range(150):
                    os.kill(self.pid, 0)
                    time.sleep(0.1)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def run_distributed(payload: tuple[str, bytes], args: argparse.Namespace) -> int:
    """One run per worker count (and the kill run), each on a fresh database and data dir."""

    plans = [(n, False) for n in args.worker_counts] + ([(2, True)] if args.kill_worker else [])
    report: dict[str, Any] = {"url": "distributed (1 gateway)", "input": payload[0],
                              "input_bytes": len(payload[1]),
                              "requests_per_mode": args.requests,
                              "concurrency": args.concurrency, "options": args.params,
                              "modes": []}
    for count, kill in plans:
        postgres = ThrowAwayPostgres().start()
        workdir = tempfile.TemporaryDirectory(prefix="sfpc-load-")
        root = Path(workdir.name)
        env = {"SFPC_JOBS_BACKEND": "postgres", "SFPC_DATABASE_URL": postgres.url,
               "SFPC_DATA_DIR": str(root / "data"), "SFPC_WORKER_STALLED_S": "5",
               "SFPC_WORKER_HEARTBEAT_S": "1", "SFPC_WORKER_POLL_S": "0.5",
               "SFPC_JOB_MAX_QUEUED": str(max(100, args.requests * 2)),
               **dict(item.split("=", 1) for item in args.server_env)}
        workers: list[subprocess.Popen] = []
        server = None
        try:
            workers = [_start_worker(args.models or [], env, root / f"worker{i}.log")
                       for i in range(count)]
            server = LocalServer(args.models or [], env, root)
            url = server.wait_ready()
            done = threading.Event()
            killer = None
            if kill:
                killer = threading.Thread(target=_kill_when_running, daemon=True, args=(
                    url, args, workers[0], root / "worker0.log", done))
                killer.start()
            result = run_jobs(url, payload, args)
            done.set()
            entry = result.summary()
            entry["mode"] = f"jobs/{count}w" + ("+kill" if kill else "")
            if kill:
                entry["killed_worker"] = workers[0].poll() == -signal.SIGKILL
            report["modes"].append(entry)
        finally:
            if server is not None:
                server.stop()
            for worker in workers:
                _stop(worker)
            postgres.stop()
            workdir.cleanup()
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = any(m["errors"] or m.get("lost") for m in report["modes"])
    return 1 if failed else 0


def format_report(report: dict[str, Any]) -> str:
    lines = [f"target {report['url']}  input {report['input']} ({report['input_bytes']:,} B)  "
             f"{report['requests_per_mode']} requests/mode, concurrency "
             f"{report['concurrency']}  options {report['options'] or '{}'}"]
    header = (f"{'mode':6} {'ok/sent':>9} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
              f"{'peak RSS MiB':>13} {'errors':>8} {'lost':>5} {'503 retries':>12}")
    lines += [header, "-" * len(header)]
    for m in report["modes"]:
        errors = sum(m["errors"].values())
        lines.append(
            f"{m['mode']:6} {m['succeeded']:>4}/{m['requests']:<4} {m['throughput_per_s']:>7} "
            f"{_fmt(m['latency_p50_s'])} {_fmt(m['latency_p95_s'])} {_fmt(m['latency_max_s'])} "
            f"{m.get('server_rss_peak_mib', '-')!s:>13} {errors:>8} {m.get('lost', '-')!s:>5} "
            f"{m.get('retries_503', '-')!s:>12}")
        if m["errors"]:
            lines.append(f"       errors: {m['errors']}")
        if m.get("submit_p50_s") is not None:
            lines.append(f"       job submit latency p50 {m['submit_p50_s']} s, p95 "
                         f"{m['submit_p95_s']} s (upload fsynced before the 202)")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return f"{value:>7.3f}" if value is not None else f"{'-':>7}"


if __name__ == "__main__":
    sys.exit(main())
