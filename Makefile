# Scalable ML Workbench. Every target creates .venv on first use.
#   make course     execute every notebook (full mode) into build/course/ with an index.html
#   make test       ruff + unit tests + every notebook in quick mode under nbval
#   make lab        JupyterLab on notebooks/ with the course's kernel
#   make notebooks  re-execute the committed notebooks in place (full mode)
#   make bench NAME=abstractions   run one benchmark and print its JSON
#   make test-install  the Colab path: the wheel in a fresh venv, notebooks alone in an empty folder
#   make browser-deps  Chromium (apt, as root) and the pages' JavaScript (npm) for the browser tests

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Simulated CPU device counts `make test` runs the notebooks with (chapters never assume one;
# `make test-devices` adds 2 and 4). Every notebook runs with the first count; the chapters whose
# cells depend on the device count (meshes, shardings, several processes) run with each further one.
NB_DEVICES ?= 8 1
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
NB_MULTI := $(filter notebooks/00_% notebooks/06_% notebooks/07_% notebooks/08_% notebooks/12_% notebooks/15_%,$(NOTEBOOKS))
NB_REPEAT ?= $(NB_MULTI)
NAME ?= abstractions

.PHONY: setup test test-install lint unit nbtest test-devices course notebooks lab bench web-deps browser-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

test: lint unit nbtest

lint: $(STAMP)
	$(BIN)/ruff check lib tests tools notebooks nbconvert_config.py

unit: $(STAMP)
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup --durations=15

# Notebooks run one at a time: several of them start worker processes, Dask clusters or
# multi-process JAX jobs, and two such notebooks at once on a 2-core machine only contend.
nbtest: $(STAMP)
	@nbs="$(NOTEBOOKS)"; for n in $(NB_DEVICES); do \
	  echo "== notebooks, quick mode, $$n simulated CPU device(s)"; \
	  SCALELAB_QUICK=1 SCALELAB_PROGRESS=0 SCALELAB_CPU_DEVICES=$$n $(BIN)/python -m pytest \
	    --nbval-lax --nbval-current-env --nbval-cell-timeout=600 -p no:cacheprovider \
	    -o testpaths=notebooks $$nbs || exit 1; \
	  nbs="$(NB_REPEAT)"; \
	done

# The installed (Colab-style) path: build the wheel, install it non-editable with the dev extra into
# a fresh virtual environment, copy only the notebooks into an empty temporary folder and run
# INSTALL_NOTEBOOKS there in quick mode. Nothing may come from the checkout but the notebooks.
INSTALL_NOTEBOOKS ?= 00_setup_and_abstractions 01_hardware 07_data_parallelism 12_checkpointing
test-install: $(STAMP)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	rm -rf build/lib build/bdist.*; echo "== wheel"; $(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir "$$tmp/dist" . ; \
	echo "== fresh venv, non-editable install with [dev]"; $(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install --quiet "$$(ls "$$tmp"/dist/scalelab-*.whl)[dev]"; \
	mkdir "$$tmp/course"; cp notebooks/*.ipynb "$$tmp/course/"; cd "$$tmp/course"; \
	"$$tmp/venv/bin/python" -c "import scalelab, scalelab.bench as b; assert 'site-packages' in scalelab.__file__, scalelab.__file__; assert b.checkout_root() is None; h = [r['device'] for r in b.load_results('hardware')]; assert 'NVIDIA H200' in h, h; print('installed:', scalelab.__version__, '| reference results shipped:', len(list(b.packaged_results_dir().glob('*.json'))), '| hardware results chapter 01 overlays:', h)"; \
	echo "== notebooks from an empty folder, quick mode"; \
	SCALELAB_QUICK=1 SCALELAB_PROGRESS=0 "$$tmp/venv/bin/python" -m pytest --nbval-lax --nbval-current-env \
	  --nbval-cell-timeout=600 -p no:cacheprovider $(addsuffix .ipynb,$(INSTALL_NOTEBOOKS))

# The device-count sweep every chapter must pass (slower: one nbval run per count).
test-devices:
	$(MAKE) nbtest NB_DEVICES="1 2 4 8" NB_REPEAT="$(NOTEBOOKS)"

# The HTML course: every chapter executed in full mode (copies under build/course/executed/, the
# committed notebooks untouched), exported with its widget state, and an index page built from those
# runs (run times, claims verdicts). `make browser-deps` first gives offline math and widgets.
course: $(STAMP)
	SCALELAB_QUICK=0 SCALELAB_PROGRESS=0 SCALELAB_SAVE_RESULTS=0 $(BIN)/jupyter nbconvert --config nbconvert_config.py \
	  --to notebook --output-dir build/course/executed $(NOTEBOOKS)
	$(BIN)/jupyter nbconvert --config nbconvert_config.py --ExecutePreprocessor.enabled=False \
	  --output-dir build/course $(patsubst notebooks/%,build/course/executed/%,$(NOTEBOOKS))
	$(BIN)/python tools/course_index.py build/course $(patsubst notebooks/%,build/course/executed/%,$(NOTEBOOKS))

notebooks: $(STAMP)
	SCALELAB_QUICK=0 SCALELAB_PROGRESS=0 $(BIN)/jupyter nbconvert --config nbconvert_config.py \
	  --to notebook --inplace $(NOTEBOOKS)

# onnxruntime-web for chapter 14's in-browser check (needs npm; the page itself can use a CDN)
web-deps: $(STAMP)
	$(BIN)/python -c "from scalelab import serve; print(serve.fetch_ort_web())"

# What the browser tests (tests/test_browser.py) and an offline HTML course need: the system
# Chromium (Playwright drives it by path; no browser download), onnxruntime-web, and local copies of
# MathJax 2, require.js and the widgets' HTML manager under build/web/ (make course uses them, the
# CDN where they are missing). Installing Chromium needs root and apt; elsewhere it says what to do.
WEB_PACKAGES := mathjax@2.7.9 requirejs@2.3.7 @jupyter-widgets/html-manager@1.0.15
browser-deps: $(STAMP) web-deps
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "Chromium: $$(command -v chromium || command -v chromium-browser)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "Chromium is missing: install it (Debian/Ubuntu, as root: apt-get install chromium)"; exit 1; fi
	mkdir -p build/web && cd build/web && npm install --no-audit --no-fund --silent $(WEB_PACKAGES)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

bench: $(STAMP)
	$(BIN)/python -m scalelab.bench $(NAME) --json

clean:
	rm -rf build .pytest_cache
