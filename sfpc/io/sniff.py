"""Tell what an uploaded file is from its first bytes, not its name (names lie: ``scan.dcm.zip``
renamed ``scan.nii``, DICOM files without an extension, ``.nii`` that is really gzipped)."""

from __future__ import annotations

import struct

# Kinds returned by sniff(); archives and compressed streams are expanded by the caller.
ZIP, GZIP = "zip", "gzip"
NIFTI1, NIFTI2, NIFTI_PAIR = "nifti1", "nifti2", "nifti_pair"
DICOM, DICOM_NO_PREAMBLE = "dicom", "dicom_no_preamble"
UNKNOWN = "unknown"

# Formats recognised only to say clearly that they are not read here.
_OTHER_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"BZh", "a bzip2 stream"),
    (0, b"\xfd7zXZ\x00", "an xz stream"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (0, b"Rar!\x1a\x07", "a RAR archive"),
    (257, b"ustar", "a tar archive"),
    (0, b"\x89PNG\r\n\x1a\n", "a PNG picture"),
    (0, b"\xff\xd8\xff", "a JPEG picture"),
    (0, b"%PDF", "a PDF document"),
    (0, b"NRRD", "an NRRD image"),
    (0, b"\x93NUMPY", "a NumPy array file"),
    (0, b"\x89HDF", "an HDF5 file"),
)


def sniff(data: bytes) -> str:
    """The kind of ``data``: one of the constants above, or ``"other:<description>"``."""
    head = bytes(data[:600])
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return ZIP
    if head[:2] == b"\x1f\x8b":
        return GZIP
    if len(head) >= 132 and head[128:132] == b"DICM":
        return DICOM
    nifti = _nifti_kind(head)
    if nifti is not None:
        return nifti
    for offset, magic, what in _OTHER_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return f"other:{what}"
    if _looks_like_raw_dicom(head):
        return DICOM_NO_PREAMBLE
    return UNKNOWN


def describe_other(kind: str) -> str:
    return kind.split(":", 1)[1] if kind.startswith("other:") else "an unrecognised file"


def _nifti_kind(head: bytes) -> str | None:
    if len(head) < 348:
        return None
    for order in "<>":
        (sizeof_hdr,) = struct.unpack(order + "i", head[:4])
        if sizeof_hdr == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
            return NIFTI1 if head[344:347] == b"n+1" else NIFTI_PAIR
        if sizeof_hdr == 540 and len(head) >= 12 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
            return NIFTI2 if head[4:7] == b"n+2" else NIFTI_PAIR
    return None


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble (old ACR-NEMA style or a bare
    stream): the first element is a little-endian group 0002 or 0008 tag with a sane length."""
    if len(head) < 8:
        return False
    vr = head[4:6]
    explicit = vr.isalpha() and vr.isupper()  # a two-letter VR code follows the tag
    for order in "<>":
        group, element = struct.unpack(order + "HH", head[:4])
        if group not in (0x0002, 0x0008) or element > 0x00FF:
            continue
        if explicit:
            return True
        # Implicit VR (little endian only): a 4-byte length follows the tag.
        (length,) = struct.unpack("<I", head[4:8])
        return order == "<" and length < 1 << 16
    return False
