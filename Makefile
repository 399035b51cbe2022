# Two commands on a fresh machine: `make demo` and `make test`; `make docs` builds the site.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO_ARGS ?= --epochs 3 --rule s1 --out runs/demo --overwrite

.PHONY: install demo test lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first, when no torch is present: any looser requirement may pull a multi-GB
# CUDA build where a CPU wheel would do.
$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[test,ray,docs]"
	# The peer the tests compare against; --no-deps, as its own requirements pin old releases.
	$(BIN)/python -m pip install --no-deps biotorch==0.0.16
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/gfalign train $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The documentation site, offline, every warning an error (a broken link, a missing anchor).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs build *.egg-info
