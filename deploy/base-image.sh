#!/usr/bin/env bash
# Makes the base image the Dockerfile builds FROM (its PYTHON_IMAGE build argument) and prints its name.
#
#   deploy/base-image.sh [pinned image] [local image name]
#
# The pinned image (python:3.11.13-slim-bookworm) is used when the daemon has it or can pull it. Where no
# registry is reachable (an air-gapped build box, our CI machines), the same Debian and the same Python
# minor version are built here instead: debootstrap makes a minimal bookworm root file system with
# Debian's python3 (3.11, what pyproject's requires-python asks for) and python3-venv, and `docker import`
# turns it into an image. It is built once and kept; `docker rmi` it to build it again.
# Needs root (debootstrap) and debootstrap itself (Debian's package), only in that second case.
set -euo pipefail
pinned=${1:-python:3.11.13-slim-bookworm}
local_image=${2:-charles-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

# Everything said goes to stderr: stdout is only the image name, for `make images` to read.
if "$docker" image inspect "$pinned" >/dev/null 2>&1 || "$docker" pull -q "$pinned" >&2 2>/dev/null; then
  echo "$pinned"
  exit 0
fi
if "$docker" image inspect "$local_image" >/dev/null 2>&1; then
  echo "$local_image"
  exit 0
fi
echo "base-image: $pinned cannot be pulled; building $local_image with debootstrap from $mirror" >&2
command -v debootstrap >/dev/null || { echo "base-image: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d /tmp/charles-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
# minbase: dpkg, apt and essentials only; python3-venv brings ensurepip's wheels for `python3 -m venv`.
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" >&2
# What an image does not need: the downloaded .debs, apt's lists (an image's apt-get update fetches them
# again), documentation and locales other than C. The pinned slim image leaves them out too.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
  "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
# The slim image's conventions: `python` is Python 3, UTF-8 text, and no .pyc written at run time.
ln -sf python3 "$root"/usr/bin/python
tar -C "$root" -c . | "$docker" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap bookworm minbase + python3, python3-venv (deploy/base-image.sh)" \
  - "$local_image" >&2
echo "$local_image"
