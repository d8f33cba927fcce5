# Charles' two images, one file:
#   docker build --target cpu -t charles:cpu .   broker, collectors, balancer, viewer, TensorBoard
#                                                 (and trainer/player on machines without a GPU)
#   docker build --target gpu -t charles:gpu .   trainer and player on an NVIDIA GPU
# `make images` runs both, with BuildKit (DOCKER_BUILDKIT=1; Docker 23+ uses it by default). Services
# start as `python -m charles.<service>`; docker-compose.yml and k8s/ give each container its command, so
# the image's CMD only prints the help.
#
# Both images are the same Debian bookworm Python 3.11 with one virtual environment in /opt/venv; they
# differ only in which torch wheel is in it. The GPU image needs no CUDA base image: PyPI's Linux torch
# wheels carry their CUDA libraries (the nvidia-* wheels), so the host needs only the NVIDIA driver and
# the NVIDIA Container Toolkit.
#
# No `# syntax=` line on purpose: it makes BuildKit fetch its Dockerfile frontend from Docker Hub, which
# an air-gapped build box cannot reach. What is used here (RUN --mount of type bind and secret, no
# heredocs) is in the frontend every BuildKit carries, Debian's docker.io 20.10 included.
#
# A CA bundle for TLS to PyPI and Debian behind an intercepting proxy (a corporate one, or our CI's) is
# a build secret, so it is in no layer: mounted for single RUN steps at /run/secrets/ca, used by pip
# (PIP_CERT) and apt there. It replaces the default trust store, so give the whole bundle:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
# (`make images` passes $SSL_CERT_FILE when it is set). Without the secret nothing changes.

# Pinned: a rebuild months from now gets the same Python and Debian. Bump deliberately. Where no registry
# is reachable, `make images` builds a stand-in with debootstrap (deploy/base-image.sh: Debian bookworm's
# own python3, also 3.11) and passes it here. So everything below says python3, which both have.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------------------------------------- deps
# Dependencies before code, so editing a .py file does not reinstall torch. What to install comes from
# pyproject.toml: torch and torchvision go to torch.txt (their index differs per image), the rest to
# requirements.txt. Which exact versions comes from constraints.txt (`-c`), so a rebuild gets the same
# packages as the last one.
FROM base AS deps
# A C compiler for the broker's counting proxy (services/broker/_countproxy.c), built when Charles is
# installed below; Python's headers too where the base has none (Debian's python3; the python image ships
# them). The runtime images copy only /opt/venv, so none of it ships.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then ca="-o Acquire::https::CAInfo=/run/secrets/ca"; fi \
 && pkgs="gcc libc6-dev" \
 && python3 -c "import os, sysconfig; assert os.path.exists(sysconfig.get_path('include') + '/Python.h')" 2>/dev/null \
    || pkgs="$pkgs python3-dev" \
 && apt-get ${ca:-} update \
 && apt-get ${ca:-} install -y --no-install-recommends $pkgs \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
COPY pyproject.toml constraints.txt /src/
# What to install comes from pyproject.toml: torch and torchvision go to torch.txt (their source differs
# per image), the rest to requirements.txt.
RUN python3 -c "import tomllib; \
deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; \
torch = [d for d in deps if d.split('==')[0].strip() in ('torch', 'torchvision')]; \
assert len(torch) == 2 and all('==' in d for d in torch), f'torch and torchvision must be pinned: {torch}'; \
open('/src/torch.txt', 'w').write('\\n'.join(torch) + '\\n'); \
open('/src/requirements.txt', 'w').write('\\n'.join(d for d in deps if d not in torch) + '\\n')"

# CPU: torch's CPU wheels from the PyTorch CPU index (~200 MB) instead of PyPI's CUDA build (~3 GB of
# CUDA libraries nobody on this image would use). "torch==X" matches the index's "X+cpu". Only those two
# come from there (--no-deps): everything else, torch's own dependencies included, is PyPI's pinned version.
# Where that index is out of reach (our CI), TORCH_INDEX= (empty) takes torch from PyPI: the CUDA build,
# which runs on the CPU too, in an image about 4.5 GB larger (torch's nvidia-* and triton wheels).
FROM deps AS deps-cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-deps ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} -r /src/torch.txt \
 && pip install -c /src/constraints.txt -r /src/torch.txt -r /src/requirements.txt

# GPU: PyPI's torch wheel, CUDA included. torch 2.14.1 from PyPI is built for CUDA 13.0, which needs an
# NVIDIA driver of the 580 series or newer on the host. For an older driver, take the wheels of an older
# CUDA from PyTorch's own index, e.g.
#   docker build --target gpu --build-arg GPU_TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t charles:gpu .
FROM deps AS deps-gpu
ARG GPU_TORCH_INDEX=
# As on the CPU image, only torch and torchvision come from that index; their dependencies come from PyPI
# (the CUDA wheels of another CUDA are other packages than constraints.txt pins, and resolve unpinned).
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-deps ${GPU_TORCH_INDEX:+--index-url "$GPU_TORCH_INDEX"} -r /src/torch.txt \
 && pip install -c /src/constraints.txt -r /src/torch.txt -r /src/requirements.txt

# ---------------------------------------------------------------------------------------------- code
# Charles itself, as a wheel, from the build context mounted for this one step (rw: setuptools writes
# build/ there, and the writes are dropped). The wheel is built where the compiler is (its broker proxy is
# C) and installed last in each image below, over the dependency layer: editing a .py file makes a new
# layer of about half a megabyte, and the venv layer of several GB stays the one in the cache. (Installing
# Charles into the venv before copying it made every edit copy the whole venv again, 6 GB a build, which
# filled a CI disk after a few builds.) Its build backend (setuptools) comes from PyPI, hence the CA.
FROM deps AS wheel
RUN --mount=type=bind,target=/src/charles,rw --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip wheel --no-deps --wheel-dir /wheels /src/charles

# ---------------------------------------------------------------------------------------------- runtime
FROM base AS runtime
# opencv-python-headless still links GLib's libgthread on slim images.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then ca="-o Acquire::https::CAInfo=/run/secrets/ca"; fi \
 && apt-get ${ca:-} update \
 && apt-get ${ca:-} install -y --no-install-recommends libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
# A fixed, non-root uid (10001) so volumes and k8s securityContext (runAsUser/fsGroup) can name it.
# /runs and its checkpoints/ and storage/ exist owned by it: a fresh named volume mounted there copies
# that ownership, so the trainer can write without root.
RUN groupadd --system --gid 10001 charles \
 && useradd --system --uid 10001 --gid charles --home-dir /app --shell /usr/sbin/nologin charles \
 && mkdir -p /app /runs/checkpoints /runs/storage \
 && chown -R charles:charles /app /runs
WORKDIR /app
ENV CHARLES_RUN_DIR=/runs
# /healthz answers 200 while the service is healthy and 503 when not; the exit code is the verdict. No
# curl in a slim image, Python is here anyway: a bare socket under `python -S`, since importing urllib
# alone took 3-6 s on a loaded 2-core box; it reads the whole answer (an unread body made the
# service log a ConnectionResetError per check). Every Charles container sets CHARLES__SERVICE__HTTP_PORT
# (compose and k8s do). The start period covers model building and the trainer's refill from storage.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
  CMD ["python", "-S", "-c", "import os, socket; s = socket.create_connection(('127.0.0.1', int(os.environ['CHARLES__SERVICE__HTTP_PORT'])), 8); s.sendall(b'GET /healthz HTTP/1.0' + bytes([13, 10, 13, 10])); raise SystemExit(s.makefile('rb').read()[9:12] != b'200')"]
USER charles
CMD ["charles", "--help"]

LABEL org.opencontainers.image.title="charles" \
      org.opencontainers.image.description="Teach a car to drive in a game while it plays"

FROM runtime AS gpu
COPY --from=deps-gpu /opt/venv /opt/venv
USER root
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps --no-index /wheels/charles-*.whl
USER charles
# What the NVIDIA Container Toolkit should hand in: every GPU it was asked for, compute only.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Last, so a plain `docker build .` makes the slim image.
FROM runtime AS cpu
COPY --from=deps-cpu /opt/venv /opt/venv
USER root
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps --no-index /wheels/charles-*.whl
USER charles
