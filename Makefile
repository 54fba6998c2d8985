VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test lint bench bench-quick bench-peers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/tqbroker

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) -m loadtest.bench

bench-quick: $(VENV)/.installed
	$(PY) -m loadtest.bench --quick

bench-peers: $(VENV)/.installed
	command -v beanstalkd >/dev/null && command -v redis-server >/dev/null || \
		(apt-get update && apt-get install -y beanstalkd redis-server)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m loadtest.bench --peers

clean:
	rm -rf $(VENV) data bench-results
