# The two set-up commands of the README:
#   make demo   installs everything into .venv and runs the default grid on the embedded phantom world
#   make test   installs everything into .venv and runs the test suite
PY ?= python3
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install browser demo test bench leaderboards

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Headless Chromium for the HTML leaderboard test (Debian packages; needs root). Without it that test is skipped.
browser:
	-@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "note: chromium not installed; the HTML leaderboard browser test will be skipped"

demo: install
	$(VENV)/bin/robustbench-med run

test: install browser
	$(VENV)/bin/python -m pytest -q

bench: install
	-$(VENV)/bin/pip install -q adversarial-robustness-toolbox
	$(VENV)/bin/python benchmarks/bench_throughput.py
	$(VENV)/bin/python benchmarks/bench_store.py
	$(VENV)/bin/python benchmarks/bench_f3.py

# Re-run every packaged study and regenerate leaderboards/ (resumes from runs/; about 2.5 h on 2 CPU cores, zoo included)
leaderboards: install
	$(VENV)/bin/robustbench-med publish --out leaderboards
