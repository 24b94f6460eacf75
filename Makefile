# onecycle: `make setup` then `make test` on a fresh clone (Debian/Ubuntu, Python 3.11).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

# Offline by default, as `import onecycle` is, for what make starts itself too (`make ui`'s MLflow server):
# a value set in the environment wins, and ONECYCLE_TELEMETRY=1 leaves the libraries at their own defaults.
ifeq ($(filter 1 true yes on TRUE True YES Yes ON On,$(ONECYCLE_TELEMETRY)),)
export MLFLOW_DISABLE_TELEMETRY ?= true
export NO_ALBUMENTATIONS_UPDATE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
export HF_HUB_DISABLE_TELEMETRY ?= 1
endif

.PHONY: setup system vega test test-fast repro ui demo tune bench lint lock clean dvc-deps docs docs-serve

setup: $(VENV)/.installed system vega  ## .venv with the pinned requirements and the package (all its extras); Debian's Fashion-MNIST and PostgreSQL; Vega for offline DVC plots

# pip prints its errors only: no per-package notes, version nags or warnings about a machine's pip.conf
# (`make setup PIP_QUIET=` shows them all). --no-build-isolation builds the editable package with the pinned
# setuptools (requirements.txt), so the build needs no download and no other setuptools.
PIP_QUIET ?= -qq
PIP_INSTALL := $(PY) -m pip install $(PIP_QUIET) --disable-pip-version-check --no-warn-script-location

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing requirements.txt and requirements-dev.txt into $(VENV)"
	@$(PIP_INSTALL) --upgrade "pip>=25"
	@$(PIP_INSTALL) -r requirements.txt -r requirements-dev.txt
	@$(PIP_INSTALL) --no-deps --no-build-isolation -e ".[demo,postgres,s3]"
	@touch $@
	@echo "setup: $$($(PY) -m pip list --format=freeze 2>/dev/null | wc -l) packages in $(VENV), onecycle $$($(PY) -c 'import onecycle; print(onecycle.__version__)')"

# Debian packages: the offline default dataset, and the PostgreSQL server the distributed-tune test starts
SYSTEM_PACKAGES := dataset-fashion-mnist postgresql

system:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then \
		echo "Debian packages installed: $(SYSTEM_PACKAGES)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
		echo "note: not installed:$$missing (make setup installs them as root on Debian). Without"; \
		echo "  dataset-fashion-mnist 'onecycle fetch' downloads Fashion-MNIST; without postgresql the"; \
		echo "  PostgreSQL tune test is skipped."; \
	fi

# Vega, Vega-Lite and vega-embed for `dvc plots show/diff` pages that render offline (.dvc/plots/offline.html,
# DVC's plots.html_template, loads them from here; without them it falls back to the CDN, then says why).
# The npm registry's tarballs, each script checked against its SHA-256.
VEGA_DIR := .dvc/plots/vendor
VEGA_PACKAGES := vega@5.30.0 vega-lite@5.21.0 vega-embed@6.26.0
VEGA_SHA256 := e432c751a6363f4a61da62920cc7d7ebd13cf09d82949f8f486248f8071dc3ce  vega.min.js\n\
cd32314b1e76e7d879dc9f0534b62be714df03554486c7ca2381abfd0a92d2f4  vega-lite.min.js\n\
072c054f2a6310725e038c38a71e00052705e31835632462c9717a23a384e895  vega-embed.min.js

vega: $(VEGA_DIR)/.installed

$(VEGA_DIR)/.installed: Makefile
	@mkdir -p $(VEGA_DIR)
	@for spec in $(VEGA_PACKAGES); do name=$${spec%@*}; version=$${spec#*@}; \
		curl -fsSL --retry 2 "https://registry.npmjs.org/$$name/-/$$name-$$version.tgz" \
		| tar -xzO "package/build/$$name.min.js" > "$(VEGA_DIR)/$$name.min.js" || exit 1; done
	@cd $(VEGA_DIR) && printf '$(VEGA_SHA256)\n' | sha256sum --quiet -c - || { rm -f *.min.js; exit 1; }
	@touch $@
	@echo "setup: Vega for offline DVC plots in $(VEGA_DIR) ($(VEGA_PACKAGES))"

test:  ## the whole suite, slow (training, DVC, MLflow) tests included
	$(PY) -m pytest

test-fast:
	$(PY) -m pytest -m "not slow"

repro:
	$(BIN)/dvc repro

# MLflow's server imports starlette.middleware.wsgi, which Starlette deprecates with a warning in every worker at start-up:
# MLflow's code, not ours, so that one warning is filtered (by its text and the MLflow module it is raised in).
UI_WARNINGS := ignore:starlette.middleware.wsgi is deprecated:UserWarning:mlflow.server.fastapi_app

ui:  ## a bare `mlflow ui` (the store is MLflow's default ./mlflow.db), bound to loopback; prints the runs page once it answers
	@port=$${PORT:-5000}; \
	link=$$($(PY) -c 'import sys; from onecycle.stages.command import guarded; from onecycle.tracking.store import ui_link; \
		sys.exit(guarded("ui", lambda: print(ui_link(int(sys.argv[1])))))' $$port) || exit 1; \
	PYTHONWARNINGS='$(UI_WARNINGS)' $(BIN)/mlflow ui --host 127.0.0.1 --port $$port & server=$$!; \
	trap 'kill $$server 2>/dev/null' INT TERM; \
	$(PY) -c 'import sys; from onecycle.stages.command import guarded; from onecycle.tracking.store import wait_for_ui; \
		sys.exit(guarded("ui", lambda: wait_for_ui(int(sys.argv[1]), int(sys.argv[2]))))' $$port $$server \
		&& echo "$$link" || kill $$server 2>/dev/null; \
	wait $$server

demo:  ## the demo page for models/model.pt on http://127.0.0.1:7860 (PORT=... to change): upload an image, see its top classes
	$(BIN)/onecycle demo --port $${PORT:-7860}

tune:
	$(BIN)/onecycle tune

bench:  ## the trainer vs a bare loop, lr_find, evaluate; then each stage's start-up
	$(PY) bench/bench.py
	$(PY) bench/startup.py

lint:
	$(BIN)/ruff check src tests bench tools

docs:  ## the docs site in docs/_build/html, built offline; a warning (a broken link, an undocumented param) fails it
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html (make docs-serve: http://127.0.0.1:$${PORT:-8000}/)"

docs-serve: docs  ## serve the built docs on loopback
	$(PY) -m http.server --bind 127.0.0.1 --directory docs/_build/html $${PORT:-8000}

dvc-deps:  ## rewrite each DVC stage's src/ deps in dvc.yaml to the modules it runs (after changing a stage's imports)
	$(PY) tools/dvc_deps.py

# Re-pin requirements.txt (runtime with every extra: demo, postgres, s3; every platform: Linux with or without CUDA, macOS,
# Windows; Python 3.11-3.13) and requirements-dev.txt (test and lint tools) from pyproject.toml. Keeps the current pins where they still
# fit; `make lock LOCK_FLAGS=--upgrade` moves everything to the newest releases. Needs PyPI.
LOCK_FLAGS ?=
UV_COMPILE = $(BIN)/uv pip compile --universal --python-version 3.11 --custom-compile-command "make lock" \
	--no-python-downloads --quiet $(LOCK_FLAGS)
lock:
	$(UV_COMPILE) pyproject.toml --all-extras -o requirements.txt
	$(UV_COMPILE) --group pyproject.toml:dev -c requirements.txt -o requirements-dev.txt

clean:
	rm -rf data models checkpoints reports mlruns
