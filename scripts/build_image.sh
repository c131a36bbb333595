#!/usr/bin/env bash
# `make image`: the gateway/worker image from a clean checkout, with podman or docker.
#
# PYTHON_IMAGE is the Dockerfile's base (a Debian with python3 and venv). When it is the local
# default (localhost/sfpc-base:bookworm) and absent, it is made here with debootstrap from
# Debian's own archive and imported, so no container registry is needed. Elsewhere, pass any
# base: make image PYTHON_IMAGE=python:3.12-slim
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE="${CONTAINER:-$(command -v podman || command -v docker || true)}"
[ -n "$ENGINE" ] || { echo "make image: needs podman or docker (apt-get install podman)" >&2; exit 2; }
BASE="${PYTHON_IMAGE:-localhost/sfpc-base:bookworm}"
IMAGE="${IMAGE:-localhost/sfpc-seg:latest}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
read -r -a FLAGS <<< "${CONTAINER_FLAGS:-$(bash scripts/container_flags.sh "$ENGINE")}"

if [ "$BASE" = "localhost/sfpc-base:$SUITE" ] && ! "$ENGINE" image exists "$BASE" 2>/dev/null \
   && ! "$ENGINE" image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "make image: needs debootstrap to make the base" >&2; exit 2; }
    root="$(mktemp -d)"
    trap 'rm -rf "$root"' EXIT
    echo "making $BASE with debootstrap ($SUITE, $MIRROR)"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        "$SUITE" "$root" "$MIRROR" > "$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "$ENGINE" import - "$BASE"
fi

SECRET=()
if [ -n "${PIP_CERT:-}" ] && [ -s "$PIP_CERT" ]; then
    SECRET=(--secret "id=pip_cert,src=$PIP_CERT")  # the site's CA bundle, for pip only
fi
echo "building $IMAGE on $BASE"
"$ENGINE" build "${FLAGS[@]}" "${SECRET[@]}" --network=host --build-arg "PYTHON_IMAGE=$BASE" \
    -t "$IMAGE" .
"$ENGINE" image inspect "$IMAGE" --format '{{.Id}} {{.Size}}' 
