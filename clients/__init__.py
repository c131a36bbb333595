"""Clients of the SFPC gateway: the Python library (:mod:`sfpc.clients.http`), batch
segmentation of folders and PACS series (``sfpc client``), and a direct Triton example.

The names below import lazily, so ``import sfpc.clients.discover`` does not pull in httpx.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SFPCClient": "sfpc.clients.http", "AsyncSFPCClient": "sfpc.clients.http",
    "RetryPolicy": "sfpc.clients.http", "APIError": "sfpc.clients.models",
    "JobFailed": "sfpc.clients.models", "SFPCError": "sfpc.clients.models",
    "SegmentResult": "sfpc.clients.models", "TransportError": "sfpc.clients.models",
    "RequestTimeout": "sfpc.clients.models", "WaitTimeout": "sfpc.clients.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sfpc.clients' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
