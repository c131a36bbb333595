"""Where the Triton tests find their tritonserver, and how they skip without it.

The server itself (:class:`~sfpc.model.triton_python_backend.TritonServer`) and the
Python-backend copy of a production repository (``python_backend_repository``) are product code
in sfpc.model.triton_python_backend, shared with benchmarks/inference_benchmark.py. The export
fixtures are in tests.support.models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sfpc.model.triton_python_backend import free_ports
from sfpc.model.triton_python_backend import missing_triton_message as _missing
from sfpc.model.triton_python_backend import triton_venv as _triton_venv
from tests.support.paths import REPO_ROOT


def triton_venv() -> Path:
    """Where scripts/setup_triton_env.sh put the triton venv (override: $SFPC_TRITON_VENV)."""
    return _triton_venv(REPO_ROOT / ".venv-triton")


def missing_triton_message(reason: str) -> str:
    return _missing(triton_venv(), reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def require_module(name: str) -> Any:
    """Import `name`, or skip the calling test module (fail it under CI, where all must run)."""
    import importlib

    import pytest

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = f"{name} is not importable ({exc}); install the dev extras"
        if running_in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


def running_in_ci() -> bool:
    """CI systems (this project's .ci/run included) set CI=true."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
