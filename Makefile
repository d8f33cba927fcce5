# Charles: every user action is a target here. `make help` lists them.
# Works from a fresh clone: targets that need Python create .venv first (make install).

PYTHON   ?= python3.11
VENV     ?= .venv
PY       := $(VENV)/bin/python
CHARLES  := $(VENV)/bin/charles
STAMP    := $(VENV)/.installed
# Compose v2 (`docker compose`) where the plugin is installed, else Debian's docker-compose 1.29.
COMPOSE  ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
# A docker client that builds with BuildKit (the Dockerfile uses RUN --mount): Docker 23+ does through its
# buildx plugin; a newer client without that plugin cannot, so then Debian's own client (20.10, BuildKit
# built in) is taken where it is installed.
DOCKER   ?= $(shell docker buildx version >/dev/null 2>&1 || ! test -x /usr/bin/docker && echo docker || echo /usr/bin/docker)
# An NVIDIA driver here? Then the trainer and the player run on the GPU (docker-compose.gpu.yml and the
# charles:gpu image); elsewhere on the CPU (docker-compose.yml alone, tiny preset).
GPU      ?= $(if $(shell command -v nvidia-smi 2>/dev/null),1,0)
COMPOSE_FILES := -f docker-compose.yml $(if $(filter 1,$(GPU)),-f docker-compose.gpu.yml)
# What `make images` builds and from what:
IMAGES   ?= cpu $(if $(filter 1,$(GPU)),gpu)
# the pinned base image; where it cannot be pulled, deploy/base-image.sh builds charles-base:bookworm
PYTHON_IMAGE ?= python:3.11.13-slim-bookworm
# the CPU image's torch; empty: PyPI's (a CUDA build, ~4.5 GB more) where this index is out of reach
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# a CA bundle the build trusts for PyPI and Debian (a TLS-intercepting proxy); a build secret, in no layer
CA_BUNDLE ?= $(SSL_CERT_FILE)
comma    := ,
CA_SECRET := $(if $(CA_BUNDLE),--secret id=ca$(comma)src=$(CA_BUNDLE))
# Grafana gets an admin account only when this is set (else it is read-only, anonymous viewers only)
GRAFANA_ADMIN_PASSWORD ?=
export GRAFANA_ADMIN_PASSWORD
export GRAFANA_NO_ADMIN := $(if $(GRAFANA_ADMIN_PASSWORD),false,true)
# Compose runs Docker Hub's Prometheus, or the one deploy/prometheus-image.sh built where that cannot be pulled
WITH_PROMETHEUS = PROMETHEUS_IMAGE=$$(DOCKER=$(DOCKER) deploy/prometheus-image.sh)
# the services `make up` starts (empty: all of them)
SERVICES ?=
COLLECTORS ?= 2
PRESET   ?= tiny
MINUTES  ?= 0
RUNS     ?= 1
N        ?= 3
CYCLES   ?= 10
KILLS    ?= 3

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast test-system test-compose lint format bench bench-viewer bench-e2e bench-gpu validate schema keys up down logs scale images clean prometheus

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# constraints.txt: the exact versions (the same the images get), so every fresh clone installs alike
# setup.py and the C file: a changed broker proxy is compiled again
$(STAMP): pyproject.toml constraints.txt setup.py services/broker/_countproxy.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install Charles with its tools (idempotent)

run: $(STAMP) ## the whole pipeline locally on the built-in sim (COLLECTORS=2 PRESET=tiny MINUTES=0 = until Ctrl-C)
	$(CHARLES) up --collectors $(COLLECTORS) --preset $(PRESET) --minutes $(MINUTES)

test: $(STAMP) ## the suite (real sockets, processes, files, browser, Prometheus); CI's first test step
	OMP_NUM_THREADS=1 $(PY) -m pytest

test-fast: $(STAMP) ## the tests not marked slow (a minute or two)
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow"

test-system: $(STAMP) ## whole pipelines: charles up + Prometheus, e2e and GPU benches on the CPU, kill -9 rounds (KILLS=3), SIGTERM cycles (CYCLES=10), hostile runs
	CHARLES_STOP_CYCLES=$(CYCLES) CHARLES_KILLS=$(KILLS) OMP_NUM_THREADS=1 $(PY) -m pytest -m system

test-compose: $(STAMP) ## the real stack: make images, docker-compose up, scale, restart, down (needs dockerd)
	@rm -f runs/compose-test/phases.json
	DOCKER=$(DOCKER) OMP_NUM_THREADS=1 $(PY) -m pytest -m compose tests/test_compose.py; rc=$$?; \
	  cat runs/compose-test/phases.json 2>/dev/null; exit $$rc

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## every benchmark, quick mode; each prints one JSON line last
	@for b in bench/[a-z]*.py; do case $$b in bench/e2e.py|bench/gpu.py) continue;; esac; \
	  echo "== $$b"; (cd bench && ../$(PY) $$(basename $$b) --quick) || exit 1; done

bench-gpu: $(STAMP) ## on an NVIDIA GPU: trainer bf16 vs fp32, torch.compile, player latency, nvJPEG; one JSON line (< 10 min)
	cd bench && ../$(PY) gpu.py

bench-viewer: $(STAMP) ## the stream page in headless Chromium while charles up runs: painted fps and latency (chromium)
	cd bench && ../$(PY) viewer.py

bench-e2e: $(STAMP) ## the learning proof: live training, then eval of player, npc and random (MINUTES=20 RUNS=1)
	cd bench && ../$(PY) e2e.py --minutes $(if $(filter 0,$(MINUTES)),20,$(MINUTES)) --runs $(RUNS)

validate: $(STAMP) ## docker-compose config, kubectl kustomize, kubernetes-validate, promtool, topology checks
	$(PY) -m charles.validate

schema: $(STAMP) ## regenerate proto/schema.json (the JSON Schema of every header) from charles.proto.wire
	$(PY) -m charles.proto.schema

keys: $(STAMP) ## CURVE key pairs for the broker and remote agents, in keys/
	$(CHARLES) keys --dir keys

up: images ## docker compose up, detached (on the GPU where nvidia-smi exists, GPU=0|1 to choose)
	$(WITH_PROMETHEUS) $(COMPOSE) $(COMPOSE_FILES) up -d $(SERVICES)

down: ## docker compose down (the volumes stay: `docker compose down -v` drops them)
	$(WITH_PROMETHEUS) $(COMPOSE) $(COMPOSE_FILES) down

logs: ## follow docker compose logs
	$(WITH_PROMETHEUS) $(COMPOSE) $(COMPOSE_FILES) logs -f --tail=100

scale: ## run N collectors under docker compose (make scale N=5)
	$(WITH_PROMETHEUS) $(COMPOSE) $(COMPOSE_FILES) up -d --scale collector=$(N) $(SERVICES)

prometheus: $(STAMP) ## a local Prometheus scraping `make run` (Debian's prometheus package)
	prometheus --config.file=deploy/prometheus.local.yml --storage.tsdb.path=runs/prometheus

images: ## build charles:cpu (and charles:gpu with a GPU; IMAGES=...) and, if it cannot be pulled, Prometheus
	@base=$$(DOCKER=$(DOCKER) deploy/base-image.sh $(PYTHON_IMAGE)) && for target in $(IMAGES); do \
	  echo "== charles:$$target on $$base"; \
	  DOCKER_BUILDKIT=1 $(DOCKER) build --target $$target -t charles:$$target --build-arg PYTHON_IMAGE=$$base \
	    --build-arg TORCH_INDEX=$(TORCH_INDEX) $(CA_SECRET) . || exit 1; \
	done; \
	echo "== the charles images these replaced, pruned: $$($(DOCKER) image prune -f \
	  --filter label=org.opencontainers.image.title=charles | tail -n 1)"
	@echo "== Prometheus: $$(DOCKER=$(DOCKER) deploy/prometheus-image.sh)"

clean: ## remove the virtual environment and caches (keeps runs/ and data/)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis proto/_fastcodec*.so services/broker/_countproxy*.so
