# Z-Image serving: a tuned inference server and a Kubernetes operator.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= builtin://tiny
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[server,operator,dev]'
	touch $@

.PHONY: install
install: $(VENV)/.installed ## Create .venv and install the project with its server, operator and dev extras

.PHONY: run
run: install ## Serve on http://127.0.0.1:8000 (override HOST, PORT, MODEL; default model builtin://tiny)
	$(VENV)/bin/zimage-server serve --host $(HOST) --port $(PORT) --model $(MODEL)

.PHONY: tiny-model
tiny-model: install ## Write the built-in tiny pipeline to ./tiny-model
	$(VENV)/bin/zimage-server make-tiny-model tiny-model

.PHONY: lint
lint: install ## ruff (lint and format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: fmt
fmt: install ## Format and auto-fix with ruff
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: test
test: lint cluster-binaries node-packages browser images ## Lint, build the cluster binaries and images, install Chromium, run every test that can run here (no GPU)
	$(VENV)/bin/pytest -m "not gpu" $(PYTEST_ARGS)

.PHONY: test-gpu
test-gpu: install ## Run the GPU tests (needs an NVIDIA GPU)
	$(VENV)/bin/pytest -m gpu $(PYTEST_ARGS)

.PHONY: bench
bench: install ## Run bench/performance.py on the tiny model here (on a GPU: see docs/performance.md)
	$(PY) bench/performance.py --scale tiny --size 256x256 --steps 2 --repeat 2 \
		--stages pipeline,report --work .out/bench

SOAK_MINUTES ?= 10
.PHONY: soak
soak: install ## Soak the server with mixed valid, invalid and abusive traffic on loopback (SOAK_MINUTES, 10)
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) --out .out/soak

BENCH_WORK ?= /tmp/zimage-bench
.PHONY: bench-gpu
bench-gpu: install ## On a GPU machine: every benchmark at full size; rewrites docs/performance.md
	$(PY) bench/performance.py --scale full --stages pipeline,text --repeat 2 --work $(BENCH_WORK)
	$(PY) bench/performance.py --scale full --stages imports,coldstart,http --paths server-bf16 --work $(BENCH_WORK)
	$(PY) bench/probe_latency.py --device cuda --probes 300 --out $(BENCH_WORK)/probe
	$(PY) bench/png_encode.py --repeat 30 --out $(BENCH_WORK)/png.json
	$(PY) bench/partials.py --scale full --size 1024x1024 --work $(BENCH_WORK) --out $(BENCH_WORK)/partials.json
	$(PY) bench/gemm_shapes.py --out $(BENCH_WORK)/gemm-b1.json
	$(PY) bench/gemm_shapes.py --batch 4 --out $(BENCH_WORK)/gemm-b4.json
	$(PY) bench/profile_step.py --work $(BENCH_WORK) --paths server-bf16,server-fp8 --out $(BENCH_WORK)/profile.json
	$(PY) bench/weights_prefetch.py --model $(BENCH_WORK)/model-full --device cuda --server-args "--compile false" \
		--runs 3 --work $(BENCH_WORK)/prefetch --results $(BENCH_WORK)/prefetch.json
	@gpus=$$($(PY) -c "import torch; print(torch.cuda.device_count())"); \
	if [ "$$gpus" -ge 2 ]; then \
		$(PY) bench/multigpu.py --scale full --gpus $$(seq -s, 2 2 $$gpus) --work $(BENCH_WORK) --results $(BENCH_WORK)/multigpu.json; \
	else echo "bench/multigpu.py skipped: it needs two or more GPUs ($$gpus here)"; fi
	$(PY) bench/performance.py --stages report --work $(BENCH_WORK) --doc docs/performance.md

.PHONY: cluster-binaries
cluster-binaries: ## Build the Kubernetes programs (control plane, kubelet, kube-proxy, kubectl), etcd, kwok, helm, crictl (cached)
	bash tests/cluster/build-binaries.sh

NODE_PACKAGES := containerd runc containernetworking-plugins iptables conntrack debootstrap
.PHONY: node-packages
node-packages: ## apt-get install what the kubelet node and its image builds need, where missing (root)
	@missing=$$(for p in $(NODE_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null \
	    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	fi

.PHONY: browser
browser: ## apt-get install Chromium for the playground's browser tests, where missing (root; else they skip, saying why)
	@command -v chromium >/dev/null || { \
	  echo "installing chromium"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
	    || echo "chromium could not be installed: the browser tests will be skipped"; }

.PHONY: images
images: install cluster-binaries node-packages ## Build the Dockerfile's server and operator images with BuildKit into ~/.cache/zimage/images
	$(PY) -m tests.cluster.images

.PHONY: cluster-up
cluster-up: install cluster-binaries node-packages ## Start a local cluster in .cluster/: two simulated GPU nodes and a real kubelet node
	$(PY) -m tests.cluster.local_cluster up --dir .cluster

.PHONY: cluster-down
cluster-down: install ## Stop the local cluster started by cluster-up; fails if it left anything behind
	$(PY) -m tests.cluster.local_cluster down --dir .cluster

.PHONY: demo
demo: install cluster-binaries ## Local cluster, the chart, the minimal example on the tiny model; prints the playground's loopback URL
	$(PY) -m tests.cluster.demo up --dir .demo

.PHONY: demo-down
demo-down: install ## Stop and remove everything make demo started
	$(PY) -m tests.cluster.demo down --dir .demo

.PHONY: constraints
constraints: install ## Re-pin constraints.txt from the current .venv
	{ echo "# Versions the project is tested with; make install uses them as pip constraints."; \
	  echo "# Refresh with: make constraints"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^zimage'; } > constraints.txt

.PHONY: clean
clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
