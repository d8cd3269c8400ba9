# duet_p2p: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-network demo demo-train demo-dp demo-host demo-offline demo-registry bench bench-large bench-network lint format signaling registry clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,fast]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-network: install
	$(PY) -m pytest -q -m network tests/network

demo: install
	$(PY) examples/seed_flow.py

demo-train: install
	$(PY) examples/train_digits/run.py

demo-dp: install
	$(PY) examples/dp_stats/run.py

demo-host: install
	$(PY) examples/host/run.py

demo-offline: install
	$(PY) examples/offline_digits/run.py

demo-registry: install
	$(PY) examples/registry/run.py

bench: install
	$(PY) -m benchmarks

bench-large: install
	$(PY) -m benchmarks.large_get

bench-network: install
	$(PY) -m benchmarks.network

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

signaling: install
	$(PY) -m signaling_server --host 127.0.0.1 --port 8765

registry: install
	$(PY) -m registry_server --host 127.0.0.1 --port 8780 --database sqlite:///registry.db

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
