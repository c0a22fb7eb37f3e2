# The two commands: `make run` (the default experiment, ends with the report path) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
SNAKEMAKE := $(BIN)/snakemake
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup system-deps run report test test-fast bench lint clean

setup: $(VENV)/.installed system-deps

# Python packages, pinned (torch from the local wheel store where the machine has one).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

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
	$(SNAKEMAKE) --cores $(CORES) --workflow-profile workflow/profiles/default
	$(SNAKEMAKE) --cores 1 --report results/report.html --report-metadata results/report_metadata.yaml
	@echo "report: $(CURDIR)/results/report.html (opens on the claims' verdicts across families)"

test: setup
	$(BIN)/python -m pytest -q -ra tests

lint: setup
	$(SNAKEMAKE) --lint

bench: setup
	$(BIN)/python bench/run_bench.py

clean:
	rm -rf results logs .snakemake
