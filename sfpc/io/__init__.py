"""Medical image I/O for the gateway: uploads (NIfTI, DICOM) in, volumes with a RAS affine out.

``decode_upload(files, limits)`` is the one entry point; every bad input raises
:class:`UploadError` with an HTTP status (400/413/415/422) and a message in the user's terms.
"""

from sfpc.errors import UploadError
from sfpc.io.upload import decode_upload
from sfpc.io.volume import FrameRef, Limits, SeriesInfo, SeriesSummary, Volume

__all__ = [
    "FrameRef",
    "Limits",
    "SeriesInfo",
    "SeriesSummary",
    "UploadError",
    "Volume",
    "decode_upload",
]
