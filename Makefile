# cluster_service — the commands a user and CI run. `make help` lists them.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help setup browser demo test test-all bench bench-gpu bench-features lint plan mlflow-ui cluster-up cluster-down clean

help:
	@echo "make demo       set up if needed, then cluster a generated mixture and sklearn digits"
	@echo "make test       set up if needed, then run the test suite (what CI runs)"
	@echo "make bench      benchmarks vs sklearn BGM and faiss k-means; writes BENCHMARKS.md"
	@echo "make bench-gpu  GPU epoch benchmark at ImageNet scale (needs CUDA)"
	@echo "make bench-features  extraction images/s and shard-reader throughput; updates BENCHMARKS.md"
	@echo "make lint       ruff"
	@echo "make mlflow-ui  MLflow UI on the local store (./mlflow.db)"
	@echo "make cluster-up    local Ray head (job server :8265) + MLflow server (:5000) on 127.0.0.1"
	@echo "make cluster-down  stop them (pids and logs in .cluster/)"

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cluster-service demo --out runs/demo

test: $(STAMP) browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Debian's chromium for the report's headless-browser test (skipped, with the reason, where it cannot be installed)
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium could not be installed; the report's browser test will be skipped"


bench: $(STAMP)
	$(PY) -m cluster_service.bench --out BENCHMARKS.md

bench-gpu: $(STAMP)
	$(PY) -m cluster_service.bench --gpu --append --sections assign --out BENCHMARKS.md

bench-features: $(STAMP)
	$(PY) -m feature_extraction.bench --out BENCHMARKS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .

plan: $(STAMP)
	$(VENV)/bin/cluster-service plan

cluster-up: $(STAMP)
	$(VENV)/bin/cluster-service cluster up --state .cluster

cluster-down:
	$(VENV)/bin/cluster-service cluster down --state .cluster

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf runs mlruns mlflow.db mlartifacts .pytest_cache
