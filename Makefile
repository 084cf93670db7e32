# Everything runs inside .venv, created on first use with the system's python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench bench-quick bench-peers-setup faults clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check banyan bench tests
	$(VENV)/bin/ruff format --check banyan bench tests
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(PY) -m banyan.demo

# Every benchmark at full size (about 25 minutes on 2 cores); tables on stdout, JSON and a
# summary table under bench/results/. W1-W3 also run Celery + Redis and HyperQueue, which
# bench-peers-setup installs first (redis-server with apt-get, the rest into bench/peers/.venv);
# a peer that cannot be set up is left out and said so, and Banyan's figures still come.
# bench-quick runs the same at small sizes in about 2 minutes, with the peers already set up.
bench: $(STAMP)
	$(PY) bench/peers/install.py || echo "make bench: going on without the peers named above"
	$(PY) bench/run_all.py

bench-peers-setup: $(STAMP)
	$(PY) bench/peers/install.py

bench-quick: $(STAMP)
	$(PY) bench/run_all.py --quick

# The fault-injection scenarios at full size (tests/faults; `make test` runs them reduced), with
# their summary table at the end. BANYAN_FAULTS_REPORT=FILE also writes the table to FILE.
faults: $(STAMP)
	BANYAN_FAULTS_FULL=1 $(PY) -m pytest -q tests/faults

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
