#!/usr/bin/env bash
# Creates the isolated Python environment that provides a real `tritonserver` for the tests.
#
# Why a separate venv: the nvidia-pytriton wheel ships tritonserver 2.51 (Python backend only) but
# pins numpy<2, while the project runs on numpy 2. The Python-backend stub finds its interpreter
# through `python3` on PATH, so this venv's bin/ is put first on PATH when the server starts
# (model/triton_python_backend.py does that).
#
# Usage: scripts/setup_triton_env.sh [VENV_DIR]   (default: <repo>/.venv-triton; env TRITON_VENV too)
# Idempotent: a venv that already has a working tritonserver and onnxruntime is left as it is.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${TRITON_VENV:-$repo_root/.venv-triton}}"
python_bin="${PYTHON:-python3}"

pytriton_version="0.7.0"

is_ready() {
    [ -x "$venv/bin/python" ] || return 1
    "$venv/bin/python" - "$pytriton_version" <<'PY' >/dev/null 2>&1
import importlib.metadata as md
import pathlib
import sys

import numpy
import onnxruntime  # noqa: F401

assert md.version("nvidia-pytriton") == sys.argv[1]
assert int(numpy.__version__.split(".")[0]) < 2
import pytriton

server = pathlib.Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
assert server.is_file()
PY
}

if is_ready; then
    echo "triton env ready: $venv"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    "$python_bin" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "nvidia-pytriton==$pytriton_version" onnxruntime "numpy<2"

if ! is_ready; then
    echo "setup_triton_env: $venv was built but tritonserver/onnxruntime/numpy<2 check failed" >&2
    exit 1
fi
echo "triton env ready: $venv"
