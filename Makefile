# onecycle: `make setup` then `make test` on a fresh clone (Debian/Ubuntu, Python 3.11).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup system test test-fast repro ui tune bench lint clean

setup: $(VENV)/.installed system  ## .venv with the pinned requirements and the package; Debian's Fashion-MNIST and PostgreSQL

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

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

test:  ## the whole suite, slow (training, DVC, MLflow) tests included
	$(PY) -m pytest

test-fast:
	$(PY) -m pytest -m "not slow"

repro:
	$(BIN)/dvc repro

ui:  ## a bare `mlflow ui` (the store is MLflow's default ./mlflow.db), bound to loopback; prints the runs page
	@$(PY) -c 'from onecycle.tracking import ui_link; print(ui_link('"$${PORT:-5000}"'))'
	$(BIN)/mlflow ui --host 127.0.0.1 --port $${PORT:-5000}

tune:
	$(BIN)/onecycle tune

bench:
	$(PY) bench/bench.py

lint:
	$(BIN)/ruff check src tests bench

clean:
	rm -rf data models checkpoints reports mlruns
