# Developer and CI entry points. `make test` is what .ci/run runs.
#   make install   the venv at .venv with the package and its test tools (redone when pyproject changes)
#   make deps      redis-server, Node.js/npm, chromium (browser tests) and the test peers' node_modules
#   make lint      ruff check, ruff format --check, mypy (strict) on the package
#   make test      install + deps + lint, then the whole pytest suite
#   make run       the sidecar with sidecar.yaml (CONFIG=path to use another file)
#   make bench     bench/run.py (ARGS=--quick for a one-minute smoke run)
#   make clean     caches and node_modules; `make distclean` also removes .venv

SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= $(shell command -v python3.11 || command -v python3)
CONFIG ?= sidecar.yaml
LINT_PATHS := sidecar tests bench
OP_DIR := tests/peers/op
YJS_DIR := tests/peers/yjs
# oidc-provider 9 needs a current Node.js (it calls crypto.hash): 20.19+ or 22+.
NODE_MIN_MAJOR := 20
NODE_MIN_MINOR := 19

# Installs Debian packages when we are root, else says what is missing and fails.
define apt_install
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(1) with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(1); \
	else \
		echo "missing: $(1) -- install it (e.g. sudo apt-get install -y $(1))" >&2; exit 1; \
	fi
endef

.PHONY: venv install deps redis node chromium lint test run bench clean distclean

venv: $(BIN)/python

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "no python3.11 or python3 on PATH" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "$(PYTHON) is older than 3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

deps: redis node chromium $(OP_DIR)/node_modules/.installed $(YJS_DIR)/node_modules/.installed

redis:
	@command -v redis-server >/dev/null || { $(call apt_install,redis-server); }
	@command -v redis-server >/dev/null

# Debian's chromium, driven headless over CDP by tests/test_browser_chromium.py (no downloads).
chromium:
	@command -v chromium >/dev/null || { $(call apt_install,chromium); }
	@command -v chromium >/dev/null

node:
	@command -v node >/dev/null && command -v npm >/dev/null || { $(call apt_install,nodejs npm); }
	@IFS=. read -r major minor _ <<< "$$(node -p process.versions.node)"; \
		if (( major < $(NODE_MIN_MAJOR) || (major == $(NODE_MIN_MAJOR) && minor < $(NODE_MIN_MINOR)) )); then \
			echo "node $$(node --version) is too old: oidc-provider needs >= $(NODE_MIN_MAJOR).$(NODE_MIN_MINOR)" >&2; \
			exit 1; \
		fi

# Order-only on `node`: a present Node.js must not force a reinstall of node_modules.
$(OP_DIR)/node_modules/.installed: $(OP_DIR)/package-lock.json $(OP_DIR)/package.json | node
	cd $(OP_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The real Yjs sync server (@y/websocket-server) and y-websocket clients of tests/test_sync_e2e.py.
$(YJS_DIR)/node_modules/.installed: $(YJS_DIR)/package-lock.json $(YJS_DIR)/package.json | node
	cd $(YJS_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy sidecar

test: install deps lint
	$(BIN)/pytest -q -p no:cacheprovider

run: install
	$(BIN)/sidecar run --config $(CONFIG)

bench: install deps
	$(BIN)/python bench/run.py $(ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info $(OP_DIR)/node_modules $(YJS_DIR)/node_modules
	rm -rf tests/artifacts
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
