# SFPC Seg gateway: the HTTP server that segments uploads with exported ONNX models, in process
# (ONNX Runtime) or on an NVIDIA Triton server. Serving core only: the image installs the package
# without its `train`/`dev` extras, so it holds no torch. docs/deploy.md tells how to run it.
#
#   docker build -t sfpc-seg .
#   docker run --rm -p 8000:8000 -e SFPC_API_KEYS=a-long-random-key \
#       -v "$PWD/models/ct:/models/ct:ro" -e SFPC_MODEL_DIRS=/models/ct sfpc-seg

ARG PYTHON_IMAGE=python:3.12-slim

# ---- build: a virtual environment with the package and its serving dependencies --------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/sfpc
WORKDIR /src

# The dependencies come from pyproject.toml alone, in their own layer, so that a source change
# does not download them again. Only [project].dependencies: the extras (torch) stay out.
COPY pyproject.toml ./
# A site whose package index sits behind a TLS-inspecting proxy passes its CA bundle as the build
# secret pip_cert (scripts/build_image.sh does when PIP_CERT is set); it never enters a layer.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && /opt/sfpc/bin/pip install --requirement /tmp/requirements.txt

# sfpc/ links to model/, server/, training/ and clients/ (setuptools follows the links), so all
# of them are copied; training/ is in the wheel, but nothing imports sfpc.training while serving.
COPY README.md ./
COPY sfpc ./sfpc
COPY model ./model
COPY server ./server
COPY training ./training
COPY clients ./clients
# The checks run isolated (-I): from /src, the source folder sfpc/ would shadow the installed one.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/sfpc/bin/pip install --no-deps . \
 && /opt/sfpc/bin/python -I -c "import importlib.util as u, sys; sys.exit('torch is in the serving image' if u.find_spec('torch') else 0)" \
 && /opt/sfpc/bin/python -I -c "import sfpc.server.app, sfpc.inference.backends.triton_backend, tritonclient.grpc, tritonclient.http"

# ---- runtime: the virtual environment on a clean base, run by an unprivileged user -----------
FROM ${PYTHON_IMAGE} AS runtime

ARG SFPC_UID=10001
RUN groupadd --system --gid "${SFPC_UID}" sfpc \
 && useradd --system --uid "${SFPC_UID}" --gid sfpc --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sfpc \
 && install -d -o sfpc -g sfpc -m 0750 /var/lib/sfpc \
 && install -d -m 0755 /models /app

COPY --from=build /opt/sfpc /opt/sfpc

# Settings are SFPC_* variables (docs/server.md lists them all). The container listens on every
# interface, so the gateway refuses to start until SFPC_API_KEYS is given at `docker run`.
# One uvicorn worker: each worker loads its own copy of every model and runs its own job queue;
# raise SFPC_CONCURRENCY (segmentations at once) before adding workers, and containers before that.
# SFPC_MODEL_DIRS: export directories mounted under /models; unset, the embedded default model
# (sfpc/sfpc/default_model in the package) is served when the package ships one.
ENV PATH=/opt/sfpc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SFPC_HOST=0.0.0.0 \
    SFPC_PORT=8000 \
    SFPC_WORKERS=1 \
    SFPC_CONCURRENCY=1 \
    SFPC_DATA_DIR=/var/lib/sfpc \
    SFPC_LOG_JSON=true

# An empty working directory: the gateway reads a `.env` file from it when one is there.
WORKDIR /app
# The job database, uploads and results of asynchronous jobs must outlive the container.
VOLUME ["/var/lib/sfpc"]
EXPOSE 8000
USER ${SFPC_UID}:${SFPC_UID}

# Liveness only (/readyz also waits for the models' backends, e.g. Triton). The slim base has no
# curl: Python's urllib does the request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SFPC_PORT', '8000'), timeout=4)"]

# `sfpc serve` drains requests for up to 30 s on SIGTERM: give `docker stop` --time 40 or more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sfpc", "serve"]
CMD []
