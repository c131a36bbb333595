"""The one exception type that bad uploads raise, with the HTTP status the gateway answers with.

Decoders never let a library's own exception (pydicom, nibabel, zipfile, zlib...) escape for bad
input: they wrap it here with a message in the user's terms, so the gateway can answer 4xx without
knowing which library failed.
"""

from __future__ import annotations

# Status families; the gateway passes ``UploadError.status`` straight to the HTTP response.
MALFORMED = 400  # the bytes are not what they claim to be (truncated, corrupt, unsafe archive)
TOO_LARGE = 413  # over a size limit (upload, decompressed size, voxels, archive members)
UNSUPPORTED = 415  # a format or encoding this server does not read (transfer syntax, colour...)
UNPROCESSABLE = 422  # readable, but not a volume that can be segmented (geometry, dims, NaN...)

_STATUSES = (MALFORMED, TOO_LARGE, UNSUPPORTED, UNPROCESSABLE)


class UploadError(ValueError):
    """An upload that cannot be turned into a volume; ``status`` is the HTTP status to answer.

    ``code`` is a stable machine-readable slug (e.g. ``"zip_path_traversal"``) for clients and
    tests; the message says what is wrong and, where possible, what to send instead.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        if status not in _STATUSES:
            raise ValueError(f"UploadError status must be one of {_STATUSES}, got {status}")
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, object]:
        """JSON body for an error response."""
        return {"status": self.status, "code": self.code, "detail": self.message}

    def __repr__(self) -> str:
        return f"UploadError({self.status}, {self.code!r}, {self.message!r})"
