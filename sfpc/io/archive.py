"""Safe expansion of zip archives and gzip streams, entirely in memory (nothing touches disk, so
nothing is left behind and no path in an archive can point anywhere).

Hostile archives are refused outright rather than sanitised, so the client learns its archive is
wrong: member paths that climb out (``../``) or are absolute, symlinks, encrypted members, nested
archives (the caller refuses those by content), more members than ``Limits.max_files``, a total
uncompressed size over ``Limits.max_decompressed_bytes``, and compression ratios over
``Limits.max_compression_ratio`` (zip bombs). Declared sizes are not trusted: bytes are counted as
they are inflated. Directory entries, macOS resource forks and DICOMDIR index files are skipped
(a DICOMDIR only lists the files that the archive holds anyway).
"""

from __future__ import annotations

import io
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass

from isal import isal_zlib

from sfpc.errors import MALFORMED, TOO_LARGE, UNSUPPORTED, UploadError
from sfpc.io.volume import Limits

_CHUNK = 1 << 20
# Small members compress extremely well when they are mostly padding (a DICOM header, an empty
# mask): the per-member ratio check only applies above this size.
_RATIO_MIN_BYTES = 1 << 20
_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Member:
    """A file taken out of an upload: its name (archive path for members) and its bytes."""

    name: str
    data: bytes


def extract_zip(name: str, data: bytes, limits: Limits) -> tuple[list[Member], list[str]]:
    """The files of a zip archive, checked as described in the module docstring.

    Returns ``(members, notes)``; ``notes`` says what was skipped and why.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            NotImplementedError) as exc:  # e.g. a version or multi-disk layout zipfile lacks
        raise UploadError(MALFORMED, "bad_zip", f"{name} is not a readable zip archive ({exc})"
                          ) from exc
    files = [info for info in infos if not info.is_dir()]
    if len(files) > limits.max_files:
        raise UploadError(
            TOO_LARGE, "too_many_files",
            f"{name} holds {len(files):,} files; the limit is {limits.max_files:,}",
        )
    for info in files:
        _check_member(name, info, limits)
    declared = sum(info.file_size for info in files)
    if declared > limits.max_decompressed_bytes:
        raise UploadError(
            TOO_LARGE, "too_large_decompressed",
            f"{name} expands to {declared:,} bytes; the limit is "
            f"{limits.max_decompressed_bytes:,}",
        )
    compressed = sum(info.compress_size for info in files)
    if declared > _RATIO_MIN_BYTES and declared > limits.max_compression_ratio * max(1, compressed):
        raise UploadError(
            TOO_LARGE, "zip_bomb",
            f"{name} expands {declared / max(1, compressed):,.0f}-fold (the limit is "
            f"{limits.max_compression_ratio:g}-fold): refusing a likely zip bomb",
        )
    members: list[Member] = []
    notes: list[str] = []
    budget = limits.max_decompressed_bytes
    for info in files:
        skip = _skip_reason(info.filename)
        if skip:
            notes.append(f"skipped {info.filename}: {skip}")
            continue
        content = _read_member(name, archive, info, budget, limits)
        budget -= len(content)
        members.append(Member(info.filename, content))
    return members, notes


def _check_member(archive_name: str, info: zipfile.ZipInfo, limits: Limits) -> None:
    path = info.filename.replace("\\", "/")
    parts = path.split("/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path) or ".." in parts:
        raise UploadError(
            MALFORMED, "zip_path_traversal",
            f"{archive_name} member {info.filename!r} has an absolute or parent-relative path; "
            "refusing an archive that could write outside its folder",
        )
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):  # 3: Unix, where links are stored
        raise UploadError(
            MALFORMED, "zip_symlink",
            f"{archive_name} member {info.filename!r} is a symbolic link; links are not accepted",
        )
    if info.flag_bits & 0x1:
        raise UploadError(
            UNSUPPORTED, "zip_encrypted",
            f"{archive_name} member {info.filename!r} is encrypted; send an unencrypted zip",
        )
    if (info.file_size > _RATIO_MIN_BYTES
            and info.file_size > limits.max_compression_ratio * max(1, info.compress_size)):
        raise UploadError(
            TOO_LARGE, "zip_bomb",
            f"{archive_name} member {info.filename!r} expands "
            f"{info.file_size / max(1, info.compress_size):,.0f}-fold (the limit is "
            f"{limits.max_compression_ratio:g}-fold): refusing a likely zip bomb",
        )


def _skip_reason(filename: str) -> str | None:
    path = filename.replace("\\", "/")
    base = path.rsplit("/", 1)[-1]
    if path.startswith("__MACOSX/") or base.startswith("._"):
        return "macOS resource fork"
    if base.lower() in _JUNK_NAMES:
        return "desktop metadata file"
    if base.upper() == "DICOMDIR":
        return "DICOMDIR index (the image files themselves are read)"
    return None


def _read_member(archive_name: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                 budget: int, limits: Limits) -> bytes:
    out = bytearray()
    try:
        with archive.open(info) as stream:
            while True:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                out += chunk
                if len(out) > budget:
                    raise UploadError(
                        TOO_LARGE, "too_large_decompressed",
                        f"{archive_name} expands beyond {limits.max_decompressed_bytes:,} bytes",
                    )
    except UploadError:
        raise
    except NotImplementedError as exc:  # e.g. deflate64 or another method zipfile lacks
        raise UploadError(
            UNSUPPORTED, "zip_method",
            f"{archive_name} member {info.filename!r} uses an unsupported compression method "
            f"({exc}); use plain deflate",
        ) from exc
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        raise UploadError(
            MALFORMED, "bad_zip",
            f"{archive_name} member {info.filename!r} is corrupt or truncated ({exc})",
        ) from exc
    return bytes(out)


def gunzip(name: str, data: bytes, limits: Limits) -> bytes:
    """Inflate a gzip stream (all its members), counting bytes so a gzip bomb stops at the limit."""
    # Input is fed in pieces and output capped per call: feeding it whole would make every
    # call copy the unconsumed rest of the input (quadratic: minutes for a 200 MB CT). Chunks
    # are joined once at the end rather than grown in a bytearray and copied out again.
    parts: list[bytes] = []
    total = 0
    remaining = memoryview(data)
    try:
        while len(remaining):
            # ISA-L's inflate: zlib's API, a fraction of its time.
            inflater = isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)
            fed = 0
            pending: bytes | memoryview = b""
            while not inflater.eof:
                if not len(pending):
                    if fed >= len(remaining):
                        raise UploadError(MALFORMED, "truncated_gzip",
                                          f"{name} is a truncated gzip stream")
                    pending = remaining[fed:fed + _CHUNK]
                    fed += len(pending)
                room = limits.max_decompressed_bytes - total
                chunk = inflater.decompress(pending, min(_CHUNK, room + 1))
                parts.append(chunk)
                total += len(chunk)
                if total > limits.max_decompressed_bytes:
                    raise UploadError(
                        TOO_LARGE, "too_large_decompressed",
                        f"{name} expands beyond {limits.max_decompressed_bytes:,} bytes",
                    )
                tail = inflater.unconsumed_tail
                if not chunk and len(tail) == len(pending) and fed >= len(remaining):
                    raise UploadError(MALFORMED, "truncated_gzip",
                                      f"{name} is a truncated gzip stream")
                pending = tail
            # Concatenated gzip members are one stream; trailing zero padding is not a member.
            rest = inflater.unused_data + bytes(remaining[fed:])
            remaining = memoryview(rest.lstrip(b"\x00"))
    except (zlib.error, isal_zlib.error) as exc:  # type: ignore[misc]
        raise UploadError(MALFORMED, "bad_gzip", f"{name} is a corrupt gzip stream ({exc})"
                          ) from exc
    return b"".join(parts)
