"""``sfpc listen``: a DICOM C-STORE SCP that turns pushed series into gateway jobs and sends the
results back where they belong.

A modality or a PACS (Orthanc's auto-forward, a router) sends a series to this node's AE title.
The listener:

1. accepts associations only from the configured calling AE titles (any other is rejected:
   A-ASSOCIATE-RJ, "calling AE title not recognised") and only to its own AE title;
2. answers each C-STORE after the instance is on disk: written to the spool folder, fsynced,
   renamed into place and the folder fsynced; an image SOP class this node does not segment is
   refused with 0x0122 (SOP Class not supported) and written nowhere;
3. counts a series as complete once no instance of it has arrived for ``quiet_s`` seconds, then
   submits it as a job to the gateway over HTTP (:class:`~sfpc.clients.http.SFPCClient`, with
   the calling AE's model and outputs), like any other client;
4. waits for the job, downloads its results into the series' folder, and sends the DICOM
   objects to the destinations of the first matching route (per calling AE and/or model):
   DICOMweb servers by STOW-RS or DICOM nodes by C-STORE, with retries
   (:func:`sfpc.io.dicom_net.send`), recording in the series' ``state.json`` what was sent
   where.

The spool survives restarts: every series' state is a JSON file written atomically; at start,
series received but not yet submitted are submitted (after their quiet period, measured from
the files), submitted ones are polled again, and deliveries that failed are retried. A gateway
that refuses a series (4xx: a series of mixed geometry, no UIDs...) marks it ``failed`` with
the gateway's code and message; its instances stay in the spool.

Spool layout::

    <spool>/series/<id>/state.json          calling AE, UIDs, status, job id, error, deliveries
    <spool>/series/<id>/instances/*.dcm     the received instances (Part 10, as sent)
    <spool>/series/<id>/results/            the job's result files

Configuration (YAML, TOML or JSON; ``sfpc listen --config FILE``)::

    listen:
      ae_title: SFPC
      host: 0.0.0.0
      port: 11112
      spool: /var/lib/sfpc/listen
      quiet_s: 10
    calling_aes:                # who may send, and what their series get
      ORTHANC: {outputs: [seg_dicom, pmap_dicom, sr_dicom, sc_dicom, report_json]}
      CT_SCANNER_1: {model: ct, outputs: [seg_dicom, sr_dicom]}
    gateway: {url: http://127.0.0.1:8000}      # SFPC_SERVER_URL / SFPC_API_KEY(_FILE) win
    destinations:
      pacs: {kind: dicomweb, url: http://orthanc:8042/dicom-web, username: sfpc,
             password_file: /etc/sfpc/pacs-password}
      ris: {kind: dimse, host: 10.0.0.5, port: 104, ae_title: RIS}
    routes:                     # first match wins; calling_ae / model null or "*": any
      - {calling_ae: CT_SCANNER_1, destinations: [pacs, ris]}
      - {destinations: [pacs]}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sfpc.clients.config import ENV_VARIABLES, GatewayConfig, _env_value, read_config_file
from sfpc.errors import OptionError
from sfpc.inference.options import OutputName, parse_options
from sfpc.io import dicom_net
from sfpc.io.files import fsync_dir, write_atomic

log = logging.getLogger("sfpc.clients.listen")

RECEIVING, SUBMITTED, SUCCEEDED, DELIVERED, FAILED, DELIVERY_FAILED = (
    "receiving", "submitted", "succeeded", "delivered", "failed", "delivery_failed")
STATE_FILE = "state.json"
INSTANCES = "instances"
RESULTS = "results"
CANNOT_UNDERSTAND = 0xC210
_UID_CHARS = re.compile(r"[^0-9.]")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


class CallingAE(BaseModel):
    """What the series from one calling AE title get (the gateway's default model and outputs
    when left out)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    outputs: list[OutputName] | None = None
    uncertainty: bool = False
    flip: bool = False

    def options(self) -> dict[str, Any]:
        return {"model": self.model, "outputs": self.outputs,
                "uncertainty": self.uncertainty or None, "flip": self.flip or None}


class ListenSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ae_title: str = Field("SFPC", min_length=1, max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    spool: Path = Path("sfpc-listen")
    quiet_s: float = Field(10.0, ge=0, description="Seconds without a new instance after "
                           "which a series counts as complete.")
    poll_s: float = Field(1.0, gt=0, description="Seconds between two passes over the spool.")
    retry_s: float = Field(30.0, gt=0, description="Wait before submitting again after the "
                           "gateway was unreachable, or delivering again after a failure.")
    delivery_rounds: int = Field(5, ge=1, description="Delivery rounds (each with the "
                                 "destination's own retries) before a series stays "
                                 "delivery_failed.")
    keep_instances: bool = Field(False, description="Keep received instances after the "
                                 "results were delivered (default: delete the patient data).")


class ListenConfig(BaseModel):
    """The whole ``sfpc listen`` configuration file."""

    model_config = ConfigDict(extra="forbid")

    listen: ListenSection = Field(default_factory=ListenSection)
    calling_aes: dict[str, CallingAE] = Field(default_factory=dict)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    destinations: dict[str, dicom_net.Destination] = Field(default_factory=dict)
    routes: list[dicom_net.Route] = Field(default_factory=list)

    @field_validator("calling_aes")
    @classmethod
    def _aes(cls, value: dict[str, CallingAE]) -> dict[str, CallingAE]:
        if not value:
            raise ValueError("name at least one calling AE title allowed to send "
                             "(calling_aes: {ORTHANC: {}}); an open listener would take "
                             "patient data from anyone on the network")
        for title, entry in value.items():
            if not 0 < len(title) <= 16:
                raise ValueError(f"calling AE title {title!r} must have 1 to 16 characters")
            try:
                parse_options(entry.options())
            except OptionError as exc:
                raise ValueError(f"calling AE {title}: {exc.message}") from None
        return value

    def check(self) -> ListenConfig:
        dicom_net.check_routes(self.routes, self.destinations)
        return self


def load_listen_config(path: str | Path | None, env: Mapping[str, str] | None = None,
                       **listen: Any) -> ListenConfig:
    """The configuration in ``path`` (YAML/TOML/JSON), the gateway section under the
    ``SFPC_SERVER_URL`` / ``SFPC_API_KEY`` (``_FILE``) variables, ``listen`` overrides (None
    values ignored) on top. ValueError for anything wrong, with the field named."""
    env = os.environ if env is None else env
    data = read_config_file(path) if path else {}
    gateway = dict(data.get("gateway") or {})
    for name, (section, key) in ENV_VARIABLES.items():
        value = _env_value(name, env)
        if section == "gateway" and value is not None:
            gateway[key] = value
    data["gateway"] = gateway
    overrides = dict(data.get("listen") or {})
    overrides.update({k: v for k, v in listen.items() if v is not None})
    data["listen"] = overrides
    try:
        return ListenConfig.model_validate(data).check()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False))
        raise ValueError(f"configuration {path or '(none)'}: {problems}") from None


# ----------------------------------------------------------------------------------------------
# The spool
# ----------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Series:
    """One received series (or the part of it that arrived before it went quiet)."""

    folder: Path
    state: dict[str, Any]
    last_received: float = 0.0
    writing: int = 0  # C-STOREs writing into it right now

    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def status(self) -> str:
        return str(self.state["status"])

    def instance_files(self) -> list[Path]:
        folder = self.folder / INSTANCES
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")

    def save(self) -> None:
        self.state["updated"] = _now()
        write_atomic(self.folder / STATE_FILE,
                     (json.dumps(self.state, indent=1, sort_keys=True) + "\n").encode(),
                     sync_folder=True)


@dataclass
class Spool:
    """The series folders under ``root/series``."""

    root: Path
    series: dict[str, Series] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.root / "series").mkdir(parents=True, exist_ok=True)

    def load(self) -> None:
        """Every series a previous process left, with its quiet clock from its files."""
        for folder in sorted((self.root / "series").iterdir()):
            state_path = folder / STATE_FILE
            if not state_path.is_file():
                continue
            try:
                state = json.loads(state_path.read_text())
            except ValueError:
                log.error("unreadable state file left as is", extra={"path": str(state_path)})
                continue
            item = Series(folder, state)
            times = [p.stat().st_mtime for p in item.instance_files()]
            item.last_received = max(times, default=state_path.stat().st_mtime)
            self.series[item.id] = item
            for leftover in (folder / INSTANCES).glob(".*.part") if (
                    folder / INSTANCES).is_dir() else ():
                leftover.unlink()  # a write the crash interrupted: never acknowledged

    def create(self, calling_ae: str, study_uid: str, series_uid: str) -> Series:
        digest = hashlib.sha1(f"{calling_ae}\0{study_uid}\0{series_uid}".encode()).hexdigest()
        folder = self.root / "series" / f"{time.time_ns()}-{digest[:12]}"
        (folder / INSTANCES).mkdir(parents=True)
        item = Series(folder, {"calling_ae": calling_ae, "study_uid": study_uid,
                               "series_uid": series_uid, "status": RECEIVING,
                               "created": _now(), "deliveries": []})
        item.save()
        fsync_dir(folder.parent)
        self.series[item.id] = item
        return item


# ----------------------------------------------------------------------------------------------
# The listener
# ----------------------------------------------------------------------------------------------


class Listener:
    """The C-STORE SCP and the loop that submits, polls and delivers; see the module docstring.

    ``client_factory()`` gives a gateway client (a context manager), ``clock`` the time.
    """

    def __init__(self, config: ListenConfig, *, client_factory: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.section = config.listen
        self.spool = Spool(Path(self.section.spool))
        self.clock = clock
        self.client_factory = client_factory or self._gateway_client
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str, str], str] = {}  # (AE, study, series) -> series id
        self._retry_at: dict[str, float] = {}
        self._server: Any = None
        self.address: tuple[str, int] | None = None

    def _gateway_client(self) -> Any:
        from sfpc.clients.config import gateway_client

        return gateway_client(self.config.gateway)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Recover the spool and start accepting associations; returns (host, port)."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.spool.load()
        for item in self.spool.series.values():
            if item.status in (RECEIVING, "submitting"):
                item.state["status"] = RECEIVING
                key = (item.state["calling_ae"], item.state["study_uid"],
                       item.state["series_uid"])
                self._open[key] = item.id
        pending = {s: sum(1 for i in self.spool.series.values() if i.status == s)
                   for s in (RECEIVING, SUBMITTED, SUCCEEDED, DELIVERY_FAILED)}
        log.info("spool recovered", extra={"series": len(self.spool.series), **pending})

        ae = AE(ae_title=self.section.ae_title)
        # Every storage SOP class in every transfer syntax is negotiated, so that a series
        # with, say, a structured report in it gets a per-instance refusal (0x0122) rather
        # than an association that cannot carry the images either.
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.calling_aes)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_ABORTED, self._on_abort),
                    (evt.EVT_ESTABLISHED, self._on_established),
                    (evt.EVT_REJECTED, self._on_rejected)]
        self._server = ae.start_server((self.section.host, self.section.port), block=False,
                                       evt_handlers=handlers)
        host, port = self._server.server_address[:2]
        self.address = (str(host), int(port))
        log.info("listening", extra={"ae_title": self.section.ae_title, "host": host,
                                     "port": port})
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def run(self, stop: threading.Event) -> None:
        """Pass over the spool every ``poll_s`` until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # a bug must not stop the node from receiving
                log.exception("processing pass failed; retrying")
            stop.wait(self.section.poll_s)

    # -- receiving (association threads) ----------------------------------------------------
    def _on_established(self, event: Any) -> None:
        log.info("association", extra={"calling_ae": _title(event.assoc.requestor.ae_title),
                                       "address": event.assoc.requestor.address})

    def _on_rejected(self, event: Any) -> None:
        log.warning("association rejected",
                    extra={"calling_ae": _title(event.assoc.requestor.ae_title)})

    def _on_abort(self, event: Any) -> None:
        # Instances acknowledged before the abort are on disk and stay there.
        log.warning("association aborted",
                    extra={"calling_ae": _title(event.assoc.requestor.ae_title)})

    def _on_store(self, event: Any) -> int:
        calling = _title(event.assoc.requestor.ae_title)
        sop_class = str(event.request.AffectedSOPClassUID)
        if not dicom_net.segmentable(sop_class):
            log.info("instance refused: not an image this node segments",
                     extra={"calling_ae": calling, "sop_class": sop_class})
            return dicom_net.SOP_CLASS_NOT_SUPPORTED
        try:
            ds = event.dataset
            study = str(ds.get("StudyInstanceUID", "") or "").strip()
            series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            instance = str(event.request.AffectedSOPInstanceUID or "").strip()
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # a data set pydicom cannot parse
            log.warning("instance refused: unreadable", extra={"error": str(exc)[:200]})
            return CANNOT_UNDERSTAND
        name = (_UID_CHARS.sub("", instance) or uuid.uuid4().hex)[:96] + ".dcm"
        item = self._receiving(calling, study, series_uid)
        try:
            write_atomic(item.folder / INSTANCES / name, data, sync_folder=True)
        except OSError as exc:
            log.error("instance refused: cannot write the spool", extra={"error": str(exc)})
            return dicom_net.OUT_OF_RESOURCES
        finally:
            with self._lock:
                item.writing -= 1
                item.last_received = self.clock()
        return dicom_net.SUCCESS

    def _receiving(self, calling: str, study: str, series_uid: str) -> Series:
        """The open series for these UIDs (a new one after the last was submitted), with
        one more write in flight."""
        key = (calling, study, series_uid)
        with self._lock:
            item = self.spool.series.get(self._open.get(key, ""))
            if item is None or item.status != RECEIVING:
                item = self.spool.create(calling, study, series_uid)
                self._open[key] = item.id
            item.writing += 1
            item.last_received = self.clock()
            return item

    # -- processing (the loop's thread) -----------------------------------------------------
    def step(self) -> None:
        """One pass: submit quiet series, poll submitted jobs, deliver results."""
        now = self.clock()
        with self._lock:  # association threads add series meanwhile
            items = list(self.spool.series.values())
        for item in items:
            if self._retry_at.get(item.id, 0.0) > now:
                continue
            if item.status == RECEIVING and self._quiet(item, now):
                self._submit(item)
            elif item.status == SUBMITTED:
                self._poll(item)
            if item.status in (SUCCEEDED, DELIVERY_FAILED):
                self._deliver(item)

    def _quiet(self, item: Series, now: float) -> bool:
        with self._lock:
            if item.writing or now - item.last_received < self.section.quiet_s:
                return False
            # From here on a new instance of this series opens a new folder.
            item.state["status"] = "submitting"
            key = (item.state["calling_ae"], item.state["study_uid"], item.state["series_uid"])
            if self._open.get(key) == item.id:
                del self._open[key]
            return True

    def _submit(self, item: Series) -> None:
        from sfpc.clients.models import APIError, SFPCError

        files = item.instance_files()
        ae = self.config.calling_aes.get(item.state["calling_ae"], CallingAE())
        options = {k: v for k, v in ae.options().items() if v is not None}
        if item.state["series_uid"]:
            options["series_uid"] = item.state["series_uid"]
        item.state.update(instances=len(files), options=options)
        try:
            with self.client_factory() as client:
                submitted = client.submit_job(files, **options)
        except APIError as exc:
            if exc.status in (429, 503) or exc.status >= 500:
                self._later(item, RECEIVING, f"gateway busy: {exc}")
                return
            self._fail(item, {"code": exc.code, "message": exc.message, "status": exc.status})
            return
        except SFPCError as exc:  # unreachable gateway: the series waits in the spool
            self._later(item, RECEIVING, f"gateway unreachable: {exc}")
            return
        item.state.update(status=SUBMITTED, job_id=submitted.id, submitted=_now())
        item.state.pop("last_error", None)
        item.save()
        log.info("series submitted", extra={"series": item.id, "job_id": submitted.id,
                                            "instances": len(files)})

    def _poll(self, item: Series) -> None:
        from sfpc.clients.models import APIError, JobStatus, SFPCError

        try:
            with self.client_factory() as client:
                job = client.job(item.state["job_id"])
                if job.status is JobStatus.SUCCEEDED:
                    folder = item.folder / RESULTS
                    folder.mkdir(exist_ok=True)
                    paths = client.download_job(job.id, folder, job=job)
                    model = _report_model(folder) or item.state.get("options", {}).get("model")
                    item.state.update(status=SUCCEEDED, results=[p.name for p in paths],
                                      model=model)
                    item.save()
                    log.info("job succeeded", extra={"series": item.id, "job_id": job.id})
                elif job.status.terminal:
                    error = job.error.model_dump() if job.error else {"code": job.status.value}
                    self._fail(item, {**error, "job_status": job.status.value})
        except APIError as exc:
            if exc.status == 404:  # the gateway lost the job (a new data dir): submit again
                self._later(item, RECEIVING, f"job {item.state['job_id']} unknown to the "
                            "gateway; submitting again")
            elif exc.status == 410:
                self._fail(item, {"code": exc.code, "message": exc.message,
                                  "status": exc.status})
            else:
                self._later(item, SUBMITTED, str(exc))
        except SFPCError as exc:
            self._later(item, SUBMITTED, f"gateway unreachable: {exc}")

    def _deliver(self, item: Series) -> None:
        names = dicom_net.choose_route(self.config.routes, item.state["calling_ae"],
                                       item.state.get("model"))
        done = {d["destination"] for d in item.state.get("deliveries", [])
                if d.get("status") == "delivered"}
        folder = item.folder / RESULTS
        files = [(name, (folder / name).read_bytes()) for name in item.state.get("results", [])
                 if name.endswith(".dcm") and (folder / name).is_file()]
        failed = False
        for name in names:
            if name in done:
                continue
            if not files:
                record = {"destination": name, "status": "failed", "time": _now(),
                          "error": "the job produced no DICOM object (ask for seg_dicom...)"}
            else:
                record = dicom_net.send(name, self.config.destinations[name], files)
            item.state.setdefault("deliveries", []).append(record)
            failed = failed or record["status"] != "delivered"
            log.info("results delivered" if record["status"] == "delivered"
                     else "results not delivered",
                     extra={"series": item.id, "destination": name,
                            "error": record.get("error")})
        if failed:
            rounds = int(item.state.get("delivery_rounds", 0)) + 1
            item.state.update(status=DELIVERY_FAILED, delivery_rounds=rounds)
            if rounds < self.section.delivery_rounds:
                self._retry_at[item.id] = self.clock() + self.section.retry_s
            else:
                self._retry_at[item.id] = float("inf")  # until the next start
            item.save()
            return
        item.state["status"] = DELIVERED
        item.state["delivered"] = _now()
        if not names:
            item.state["note"] = "no route matched: the results stay in the spool only"
        item.save()
        if not self.section.keep_instances:
            for path in item.instance_files():
                path.unlink()

    def _later(self, item: Series, status: str, why: str) -> None:
        item.state.update(status=status, last_error=why)
        item.save()
        if status == RECEIVING:
            key = (item.state["calling_ae"], item.state["study_uid"], item.state["series_uid"])
            with self._lock:
                self._open.setdefault(key, item.id)
        self._retry_at[item.id] = self.clock() + self.section.retry_s
        log.warning("will retry", extra={"series": item.id, "reason": why})

    def _fail(self, item: Series, error: dict[str, Any]) -> None:
        item.state.update(status=FAILED, error=error, failed=_now())
        item.save()
        log.warning("series failed; its instances stay in the spool",
                    extra={"series": item.id, **{f"error_{k}": v for k, v in error.items()}})


def _title(value: Any) -> str:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip()


def _report_model(folder: Path) -> str | None:
    try:
        report = json.loads((folder / "report.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return (report.get("model") or {}).get("name")


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


class _JsonFormatter(logging.Formatter):
    _SKIP = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _now(), "level": record.levelname, "message": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._SKIP})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfpc listen",
        description="Receive DICOM series (C-STORE), segment them through the gateway's jobs "
                    "and send the results back (STOW-RS or C-STORE). See "
                    "docs/hospital-pipeline.md.")
    parser.add_argument("--config", required=True, help="YAML, TOML or JSON file (listen, "
                        "calling_aes, gateway, destinations, routes)")
    parser.add_argument("--port", type=int, help="TCP port (overrides listen.port; 0 = any)")
    parser.add_argument("--host", help="address to bind (overrides listen.host)")
    parser.add_argument("--ae-title", help="this node's AE title (overrides listen.ae_title)")
    parser.add_argument("--spool", help="spool folder (overrides listen.spool)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[handler], force=True)
    for noisy in ("pynetdicom", "httpx"):  # a line per PDU / per request otherwise
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        config = load_listen_config(args.config, port=args.port, host=args.host,
                                    ae_title=args.ae_title, spool=args.spool)
    except (OSError, ValueError) as exc:
        print(f"sfpc listen: {exc}", file=sys.stderr)
        return 2
    listener = Listener(config)
    try:
        host, port = listener.start()
    except OSError as exc:
        print(f"sfpc listen: cannot listen on {config.listen.host}:{config.listen.port}: "
              f"{exc}", file=sys.stderr)
        return 2
    print(f"sfpc listen: {config.listen.ae_title} on {host}:{port}, spool "
          f"{config.listen.spool}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        listener.run(stop)
    finally:
        listener.stop()
    return 0


__all__ = ["CallingAE", "ListenConfig", "Listener", "Series", "Spool", "build_parser",
           "load_listen_config", "main"]
