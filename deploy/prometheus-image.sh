#!/usr/bin/env bash
# Prints the Prometheus image docker-compose.yml should run (its PROMETHEUS_IMAGE), building one first
# where needed:
#
#   deploy/prometheus-image.sh [pinned image] [local image name]
#
# Docker Hub's pinned image when the daemon has it or can pull it; otherwise Prometheus from Debian's
# package on the local base image (deploy/prometheus.Dockerfile), built once and kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pinned=${1:-prom/prometheus:v3.5.0}
local_image=${2:-charles-prometheus:debian}
docker=${DOCKER:-docker}

if "$docker" image inspect "$pinned" >/dev/null 2>&1 || "$docker" pull -q "$pinned" >&2 2>/dev/null; then
  echo "$pinned"
  exit 0
fi
if ! "$docker" image inspect "$local_image" >/dev/null 2>&1; then
  base=$("$here"/base-image.sh)
  echo "prometheus-image: $pinned cannot be pulled; building $local_image from Debian's package" >&2
  # no build context: the Dockerfile needs none
  DOCKER_BUILDKIT=1 "$docker" build --build-arg BASE="$base" -t "$local_image" - <"$here"/prometheus.Dockerfile >&2
fi
echo "$local_image"
