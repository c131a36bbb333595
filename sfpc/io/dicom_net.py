"""DICOM over the network, for the push paths in and the results out: which instances an AI node
takes (:func:`segmentable`), where results go (:class:`Destination`: a DICOMweb server by
STOW-RS, or a DICOM node by C-STORE), :func:`send` with retries and a record of what went where,
and the STOW-RS request body and response of PS3.18 (:func:`multipart_related`,
:func:`store_response`).

Used by both the gateway (``POST /dicomweb/studies``, delivery of job results) and
``sfpc listen`` (a client of the gateway), which is why it lives in the shared I/O layer.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

# -- what an AI node takes ---------------------------------------------------------------------

# Image storage SOP classes of volumes the decoder segments (CT, MR, PET, NM; classic, enhanced
# and legacy-converted). Everything else (SEG, SR, RT, presentation states, secondary captures,
# documents, waveforms, ...) is refused with "SOP Class not supported": results written back by
# this node, or forwarded in a loop by a PACS, never become inputs.
SEGMENTABLE_SOP_CLASSES: Mapping[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.20": "Nuclear Medicine Image Storage",
}

# Status / failure reason codes (PS3.4 Annex B, PS3.7 Annex C, PS3.18 Table I.2-2).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
# Not in the standard's table: an instance of another study than the STOW-RS URL names
# (implementation-specific Cxxx, the code dcm4chee uses for the same case).
STUDY_MISMATCH = 0xC409


def segmentable(sop_class_uid: str | None) -> bool:
    return str(sop_class_uid or "").strip() in SEGMENTABLE_SOP_CLASSES


# -- destinations ------------------------------------------------------------------------------


class Destination(BaseModel):
    """Where results go: ``kind`` ``dicomweb`` (``url``: the DICOMweb base, e.g. Orthanc's
    ``http://pacs:8042/dicom-web``; STOW-RS to ``{url}/studies/{study}``) or ``dimse``
    (``host``, ``port``, the node's ``ae_title``; C-STORE from ``calling_ae_title``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dicomweb", "dimse"]
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: str | None = Field(None, description="File holding the password (a "
                                      "systemd credential, a Docker secret).")
    token: SecretStr | None = Field(None, description="Bearer token instead of user/password.")
    verify: bool | str = True
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    ae_title: str | None = Field(None, max_length=16)
    calling_ae_title: str = Field("SFPC", max_length=16)
    timeout_s: float = Field(60.0, gt=0)
    attempts: int = Field(3, ge=1, description="Tries per delivery (1 = no retry).")
    backoff_s: float = Field(2.0, ge=0, description="Wait before the 2nd try, doubled after.")

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.kind == "dicomweb" and not self.url:
            raise ValueError("a dicomweb destination needs url (the DICOMweb base URL)")
        if self.kind == "dimse" and not (self.host and self.port and self.ae_title):
            raise ValueError("a dimse destination needs host, port and ae_title")
        return self

    def describe(self) -> str:
        """Where it points, without credentials."""
        if self.kind == "dicomweb":
            return str(self.url)
        return f"{self.ae_title}@{self.host}:{self.port}"


class Route(BaseModel):
    """Which destinations the results of a series go to: the first route whose ``calling_ae``
    and ``model`` both match (None or "*" matches anything) wins."""

    model_config = ConfigDict(extra="forbid")

    calling_ae: str | None = None
    model: str | None = None
    destinations: list[str] = Field(default_factory=list)

    def matches(self, calling_ae: str | None, model: str | None) -> bool:
        return (_wild(self.calling_ae) or self.calling_ae == calling_ae) and (
            _wild(self.model) or self.model == model)


def _wild(value: str | None) -> bool:
    return value is None or value == "*"


def choose_route(routes: Sequence[Route], calling_ae: str | None, model: str | None
                 ) -> list[str]:
    """The destination names for a series from ``calling_ae`` segmented by ``model``."""
    for route in routes:
        if route.matches(calling_ae, model):
            return list(route.destinations)
    return []


def check_routes(routes: Sequence[Route], destinations: Mapping[str, Destination]) -> None:
    """ValueError naming a route's destination that is not configured."""
    for index, route in enumerate(routes):
        unknown = [d for d in route.destinations if d not in destinations]
        if unknown:
            raise ValueError(f"route {index} names unknown destination(s) "
                             f"{', '.join(unknown)}; configured: "
                             f"{', '.join(destinations) or 'none'}")


# -- sending -----------------------------------------------------------------------------------


@dataclass
class Instance:
    """One DICOM file to send: its Part 10 bytes and identity."""

    name: str
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    transfer_syntax: str

    @classmethod
    def parse(cls, name: str, data: bytes) -> Instance:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return cls(name=name, data=data, sop_class_uid=str(ds.SOPClassUID),
                   sop_instance_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID),
                   transfer_syntax=str(ds.file_meta.TransferSyntaxUID))


class DeliveryFailed(RuntimeError):
    """A destination refused instances or could not be reached; ``retry`` says whether trying
    again may help (unreachable, overloaded) or not (instances refused)."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def send(name: str, destination: Destination, files: Iterable[tuple[str, bytes]], *,
         sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Send ``(file name, Part 10 bytes)`` to ``destination`` with its retries; returns the
    record of the delivery: ``{"destination", "kind", "target", "status": "delivered" |
    "failed", "attempts", "instances": [{"file", "sop_class_uid", "sop_instance_uid"}],
    "error"?, "time"}``. Never raises for the destination's failures: they are the record."""
    instances = [Instance.parse(n, d) for n, d in files]
    record: dict[str, Any] = {
        "destination": name, "kind": destination.kind, "target": destination.describe(),
        "instances": [{"file": i.name, "sop_class_uid": i.sop_class_uid,
                       "sop_instance_uid": i.sop_instance_uid} for i in instances],
    }
    attempt = 0
    wait = destination.backoff_s
    while True:
        attempt += 1
        try:
            if destination.kind == "dicomweb":
                stow(destination, instances)
            else:
                c_store(destination, instances)
            record.update(status="delivered", attempts=attempt)
            break
        except DeliveryFailed as exc:
            if not exc.retry or attempt >= destination.attempts:
                record.update(status="failed", attempts=attempt, error=str(exc))
                break
        sleep(wait)
        wait *= 2
    record["time"] = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    return record


def multipart_related(parts: Iterable[bytes], boundary: str | None = None
                      ) -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body of Part 10 files and its
    Content-Type header value."""
    boundary = boundary or f"sfpc-{uuid.uuid4().hex}"
    chunks = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        chunks.append(part)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return (b"".join(chunks),
            f'multipart/related; type="application/dicom"; boundary={boundary}')


def stow(destination: Destination, instances: Sequence[Instance]) -> None:
    """STOW-RS the instances, one request per study; DeliveryFailed for anything not stored."""
    import httpx

    headers = {"Accept": "application/dicom+json"}
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    auth = None
    if destination.username:
        password = destination.password.get_secret_value() if destination.password else ""
        if destination.password_file:
            from pathlib import Path

            password = Path(destination.password_file).read_text().strip()
        auth = httpx.BasicAuth(destination.username, password)
    studies: dict[str, list[Instance]] = {}
    for inst in instances:
        studies.setdefault(inst.study_uid, []).append(inst)
    base = str(destination.url).rstrip("/")
    with httpx.Client(timeout=destination.timeout_s, verify=destination.verify,
                      auth=auth) as client:
        for study, members in studies.items():
            body, content_type = multipart_related([i.data for i in members])
            try:
                response = client.post(f"{base}/studies/{study}", content=body,
                                       headers={**headers, "Content-Type": content_type})
            except httpx.HTTPError as exc:
                raise DeliveryFailed(f"STOW-RS to {base} failed: {exc}", retry=True) from exc
            if response.status_code in (408, 429) or response.status_code >= 500:
                raise DeliveryFailed(f"STOW-RS to {base}: HTTP {response.status_code}",
                                     retry=True)
            failed = _failed_sops(response)
            if response.status_code >= 400 or failed:
                detail = ", ".join(f"{uid}: failure reason 0x{reason:04X}"
                                   for uid, reason in failed) or response.text[:300]
                raise DeliveryFailed(f"STOW-RS to {base}: HTTP {response.status_code}, "
                                     f"{len(failed)} of {len(members)} refused ({detail})",
                                     retry=False)


def _failed_sops(response: Any) -> list[tuple[str, int]]:
    try:
        body = response.json()
    except ValueError:
        return []
    if isinstance(body, list):  # some servers answer a one-element array
        body = body[0] if body else {}
    items = ((body or {}).get("00081198") or {}).get("Value") or []
    out = []
    for item in items:
        uid = ((item.get("00081155") or {}).get("Value") or ["?"])[0]
        reason = ((item.get("00081197") or {}).get("Value") or [PROCESSING_FAILURE])[0]
        out.append((str(uid), int(reason)))
    return out


def c_store(destination: Destination, instances: Sequence[Instance]) -> None:
    """C-STORE the instances over one association; DeliveryFailed for anything not stored."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
    contexts: dict[str, list[str]] = {}
    for inst in instances:
        syntaxes = contexts.setdefault(inst.sop_class_uid, [])
        for ts in (inst.transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in syntaxes:
                syntaxes.append(ts)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    target = destination.describe()
    assoc = ae.associate(str(destination.host), int(destination.port or 0),
                         ae_title=str(destination.ae_title))
    if not assoc.is_established:
        rejected = assoc.is_rejected
        raise DeliveryFailed(f"association with {target} "
                             f"{'rejected' if rejected else 'failed'}", retry=not rejected)
    refused = []
    try:
        for inst in instances:
            ds = pydicom.dcmread(io.BytesIO(inst.data))
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            # Success or a warning (Bxxx: coerced or discarded elements) means stored.
            if code != SUCCESS and (code >> 12) != 0xB:
                refused.append((inst.sop_instance_uid, code))
    finally:
        if assoc.is_established:
            assoc.release()
    if refused:
        lost = [c for _, c in refused if c == -1]
        detail = ", ".join(f"{uid}: status 0x{code:04X}" if code >= 0 else f"{uid}: no answer"
                           for uid, code in refused)
        raise DeliveryFailed(f"C-STORE to {target}: {len(refused)} of {len(instances)} not "
                             f"stored ({detail})", retry=bool(lost))


# -- STOW-RS responses (the gateway's side) ----------------------------------------------------


def store_response(stored: Sequence[tuple[str, str]], failed: Sequence[tuple[str, str, int]],
                   retrieve_url: str | None = None) -> tuple[int, dict[str, Any]]:
    """The PS3.18 Store Instances response: HTTP status (200 all stored, 202 some failed,
    409 none stored) and the ``application/dicom+json`` data set with ReferencedSOPSequence
    (``(class, instance)`` stored) and FailedSOPSequence (``(class, instance, reason)``)."""
    body: dict[str, Any] = {}
    if retrieve_url:
        body["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": [cls]} if cls else {"vr": "UI"},
             "00081155": {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"},
             "00081197": {"vr": "US", "Value": [reason]}}
            for cls, uid, reason in failed]}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": [cls]},
             "00081155": {"vr": "UI", "Value": [uid]}} for cls, uid in stored]}
    status = 200 if not failed else 202 if stored else 409
    return status, body


__all__ = [
    "CANNOT_UNDERSTAND", "DeliveryFailed", "Destination", "Instance", "OUT_OF_RESOURCES",
    "PROCESSING_FAILURE", "Route", "SEGMENTABLE_SOP_CLASSES", "SOP_CLASS_NOT_SUPPORTED",
    "STUDY_MISMATCH", "SUCCESS", "check_routes", "choose_route", "multipart_related",
    "segmentable", "send", "stow", "store_response",
]
