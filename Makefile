# Two commands on a fresh machine:
#   make demo   runs the quickstart sweep on CPU (sweeps/quickstart.yaml, 2 local workers)
#   make test   runs every test
# For your own loop: make test-fast (pure and in-process tests: no libtorch, no processes).
# Both create the project-local Python venv (.venv, with torch 2.11 for libtorch) on first use
# and reuse it afterwards, then build release binaries that run without environment variables.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CARGO ?= cargo

# tch builds against the venv's torch (first `python` on PATH) when LIBTORCH_USE_PYTORCH is set.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test test-fast build venv lint fmt clean manifests browser

demo: build
	target/release/sweep run sweeps/quickstart.yaml --workers 2 --state-dir .sweep/quickstart

test: build browser
	$(CARGO) test --release --workspace
	bash scripts/check-manifests.sh

# The crates without libtorch, in process: spec, wire, worker session, store and server, the
# CLI's library (tests that run the binaries are in `tests/`, left to `make test`).
FAST_CRATES := -p sweep-core -p sweep-proto -p sweep-session -p sweep-coordinator -p sweep-cli
test-fast:
	$(CARGO) test --release $(FAST_CRATES)

build: $(STAMP)
	$(CARGO) build --release --workspace --bins

venv: $(STAMP)

# The dashboard's browser tests drive Debian's chromium through chromedriver.
browser:
	bash scripts/install-browser.sh

$(STAMP): requirements.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -r requirements.txt
	@touch $@

manifests: $(STAMP)
	bash scripts/check-manifests.sh

lint: $(STAMP)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf .sweep
