# The two commands: `make run` (the default experiment, ends with the report path) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
# `make run` caps each job at this many threads: on 2 cores two one-thread training jobs side by
# side get through more images than one two-thread job (`make bench` job_threads). SLURM and other
# profiles keep each rule's own thread count.
THREADS_PER_JOB ?= 1
SNAKEMAKE := $(BIN)/snakemake
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup system-deps run report test test-fast bench faults choices lint clean

setup: $(VENV)/.installed $(VENV)/.torchsort system-deps

# Python packages: requirements.txt's pins, and the lock constraints.txt for everything they pull in
# (torch from the local wheel store where the machine has one).
$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# torchsort (differentiable soft rank; the ssl family's `sorting` with relaxation: soft_rank) ships as an
# sdist whose setup.py builds its CUDA kernels whenever `nvcc` is on PATH, and that build fails on a
# machine with the CUDA toolkit but no GPU (no architecture to target). Without a GPU, nvcc's folders
# leave PATH for this one build (CPU kernels only, ~2 minutes); with one, the CUDA kernels are built.
TORCHSORT := torchsort==0.1.10
$(VENV)/.torchsort: $(VENV)/.installed
	@if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then path="$$PATH"; \
	else path=$$(echo "$$PATH" | tr ':' '\n' | while read -r d; do [ -x "$$d/nvcc" ] || printf '%s:' "$$d"; done); fi; \
	PATH="$${path%:}" MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation --no-deps $(TORCHSORT)
	touch $@

# Refresh the lock after editing requirements.txt: resolve it in a fresh temporary virtualenv, freeze
# every package into constraints.txt (setuptools too, which torch needs; not pip, not classlab), and
# write the same pins into environment.yml's pip section (the CUDA wheels marked Linux-only).
.PHONY: lock
lock:
	set -euo pipefail; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install -q --upgrade pip; \
	"$$tmp/venv/bin/pip" install -q -r requirements.txt; \
	{ echo "# The lock: every package a fresh install of requirements.txt resolves to, pinned (pip freeze of a"; \
	  echo "# clean virtualenv, setuptools included, pip and classlab excluded). Written by \`make lock\`; used by"; \
	  echo "# \`make setup\` (pip install -r requirements.txt -c constraints.txt) and copied into environment.yml."; \
	  "$$tmp/venv/bin/pip" freeze --all --exclude-editable | grep -viE '^(pip|classlab)=='; } > "$$tmp/constraints.txt"; \
	sed -n '1,/^  - pip:$$/p' environment.yml > "$$tmp/environment.yml"; \
	grep -v '^#' "$$tmp/constraints.txt" \
	  | sed -E -e "s/^((nvidia-|cuda-|triton).*)$$/'\1; sys_platform == \"linux\"'/" -e 's/^/      - /' >> "$$tmp/environment.yml"; \
	echo '      - -e ..' >> "$$tmp/environment.yml"; \
	mv "$$tmp/constraints.txt" constraints.txt; mv "$$tmp/environment.yml" environment.yml
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pins; environment.yml rewritten from it"

# System packages: Fashion-MNIST's Debian mirror, and SLURM + munge for the cluster test.
# Installed only when running as root with apt; elsewhere the download rule falls back to the URLs
# and the SLURM test is skipped with a message.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  need=""; \
	  [ -d /usr/share/datasets/fashion-mnist ] || need="$$need dataset-fashion-mnist"; \
	  command -v slurmctld >/dev/null || need="$$need slurmctld slurmd slurm-client munge"; \
	  if [ -n "$$need" ]; then \
	    echo "apt-get install$$need"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	  fi; \
	else echo "not root with apt: skipping system packages (Fashion-MNIST mirror, SLURM)"; fi

run: setup
	$(SNAKEMAKE) --cores $(CORES) --max-threads $(THREADS_PER_JOB) --workflow-profile workflow/profiles/default
	$(SNAKEMAKE) --cores 1 --report results/report.html --report-metadata results/report_metadata.yaml
	@echo "report: $(CURDIR)/results/report.html (opens on the claims' verdicts across families)"

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15 tests

lint: setup
	$(SNAKEMAKE) --lint

bench: setup
	$(BIN)/python bench/run_bench.py

# Reliability: SIGKILL small training jobs at 20 random points, resume, count bit-identical endings.
faults: setup
	$(BIN)/python bench/faults.py

# Re-measure on the validation split the settings the README reports choosing (about an hour).
choices: setup
	$(BIN)/python bench/choose_on_val.py

clean:
	rm -rf results logs .snakemake
