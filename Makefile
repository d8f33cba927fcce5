# Charles: every user action is a target here. `make help` lists them.
# Works from a fresh clone: targets that need Python create .venv first (make install).

PYTHON   ?= python3.11
VENV     ?= .venv
PY       := $(VENV)/bin/python
CHARLES  := $(VENV)/bin/charles
STAMP    := $(VENV)/.installed
COMPOSE  ?= docker compose
# No NVIDIA driver here? Add the CPU override (trainer and player on the CPU image, tiny preset).
CPU      ?= $(if $(shell command -v nvidia-smi 2>/dev/null),0,1)
COMPOSE_FILES := -f docker-compose.yml $(if $(filter 1,$(CPU)),-f docker-compose.cpu.yml)
COLLECTORS ?= 2
PRESET   ?= tiny
MINUTES  ?= 0
N        ?= 3

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format bench bench-e2e validate schema keys up down logs scale images clean prometheus

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

test: $(STAMP) ## every test (real sockets, processes, files); the command CI runs
	OMP_NUM_THREADS=1 $(PY) -m pytest

test-fast: $(STAMP) ## the tests not marked slow
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow"

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## every benchmark, quick mode; each prints one JSON line last
	@for b in bench/[a-z]*.py; do case $$b in bench/e2e.py) continue;; esac; \
	  echo "== $$b"; (cd bench && ../$(PY) $$(basename $$b) --quick) || exit 1; done

bench-e2e: $(STAMP) ## the learning proof: live training, then eval of player, npc and random (MINUTES=20)
	cd bench && ../$(PY) e2e.py --minutes $(if $(filter 0,$(MINUTES)),20,$(MINUTES))

validate: $(STAMP) ## docker-compose config, kubectl kustomize, kubernetes-validate, promtool, topology checks
	$(PY) -m charles.validate

schema: $(STAMP) ## regenerate proto/schema.json (the JSON Schema of every header) from charles.proto.wire
	$(PY) -m charles.proto.schema

keys: $(STAMP) ## CURVE key pairs for the broker and remote agents, in keys/
	$(CHARLES) keys --dir keys

up: ## docker compose up (detached; CPU=1 for machines without a GPU, auto-detected)
	$(COMPOSE) $(COMPOSE_FILES) up -d

down: ## docker compose down
	$(COMPOSE) $(COMPOSE_FILES) down

logs: ## follow docker compose logs
	$(COMPOSE) $(COMPOSE_FILES) logs -f --tail=100

scale: ## run N collectors under docker compose (make scale N=5)
	$(COMPOSE) $(COMPOSE_FILES) up -d --scale collector=$(N)

prometheus: $(STAMP) ## a local Prometheus scraping `make run` (Debian's prometheus package)
	prometheus --config.file=deploy/prometheus.local.yml --storage.tsdb.path=runs/prometheus

images: ## build the CPU and GPU images
	docker build --target cpu -t charles:cpu .
	docker build --target gpu -t charles:gpu .

clean: ## remove the virtual environment and caches (keeps runs/ and data/)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis proto/_fastcodec*.so services/broker/_countproxy*.so
