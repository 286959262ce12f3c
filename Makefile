# The two set-up commands of the README:
#   make demo   installs everything into .venv and runs the default grid on the embedded phantom world
#   make test   installs everything into .venv and runs the test suite
PY ?= python3
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test bench

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/robustbench-med run

test: install
	$(VENV)/bin/python -m pytest -q

bench: install
	$(VENV)/bin/python benchmarks/bench_throughput.py
