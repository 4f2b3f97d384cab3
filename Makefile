# assignbench: `make demo` runs the main job on the embedded digits data, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.assignbench-installed

.PHONY: install browser demo test lint bench clean-demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'tidecv==1.0.1'  # test oracle of experiments/tide.py (see pyproject's dev extra)
	touch $(STAMP)

install: $(STAMP)

# The demo grid (IoU+none, ATSS+centerness, PAA+IoU on the quick schedule), trained into the
# gitignored results/runs/demo, then its report and a comparison with the committed reference runs
# of the same configs (results/reference/table1_modules, 3 seeds).
demo: $(STAMP)
	$(VENV)/bin/assignbench-data digits
	$(VENV)/bin/assignbench-train -m grid=demo
	$(VENV)/bin/assignbench-compare results/runs/demo results/reference/table1_modules --out results/runs/demo/comparison.md
	@echo "demo done: table in results/runs/demo/table.md, plots in results/runs/demo/*.png, comparison in results/runs/demo/comparison.md"

lint: $(STAMP)
	$(PY) -m ruff check .

# The report's browser test (tests/analysis/test_html.py) loads report.html in headless Chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the report's browser test"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

test: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.assign
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.eval
	$(PY) -m benchmarks.bootstrap
