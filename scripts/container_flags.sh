#!/usr/bin/env bash
# Extra flags for `podman build/run` where the host forbids what the runtime asks by default:
# in sandboxes that refuse raising RLIMIT_NOFILE/NPROC to podman's defaults, lower limits are
# always allowed; runc where crun cannot use hybrid cgroups. Prints nothing for docker.
engine="${1:-podman}"
case "$(basename "$engine")" in
  podman)
    flags="--ulimit nofile=4096:4096 --ulimit nproc=4096:4096"
    if command -v runc >/dev/null 2>&1; then flags="--runtime runc $flags"; fi
    echo "$flags" ;;
  *) echo "" ;;
esac
