# One command sets up .venv and runs the main job (`make demo`), one sets up and runs the tests
# (`make test`). Every install goes through constraints.txt, which pins torch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.linft-installed
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml constraints.txt requirements-dev.txt

.PHONY: venv build test test-gpu demo bench diag clean

venv: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -r requirements-dev.txt
	$(PIP) install -q -c constraints.txt --no-deps --no-build-isolation -e .
	$(PY) -m linft_kernels
	touch $@

build: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

demo: $(STAMP)
	$(PY) -m linft demo

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

diag: $(STAMP)
	$(PY) -m linft_kernels

clean:
	rm -rf $(VENV) build *.egg-info linft_kernels/_C_*.so linft_kernels/_build_info.json
