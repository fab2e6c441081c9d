# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so that this machine's CPU build is taken from disk; elsewhere e.g.
#   make test TORCH='torch --index-url https://download.pytorch.org/whl/cpu'
TORCH  ?= torch==2.13.0
DEMO   := demo-output

.PHONY: install test test-fast demo docs bench clean

# The package alone (torch first, so that the pinned build is the one used): what the demo needs.
$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

# Everything the tests need (the test extra: trainers, Dask, ruff, hypothesis).
$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.docs: $(VENV)/.base
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check cmdtool tests benchmarks sample_checkpoints
	$(PY) -m pytest -q

# The fast tier: every test not marked slow (under a minute).
test-fast: install
	$(PY) -m pytest -q -m 'not slow'

# The documentation site into site/ (mkdocs.yml); warnings are errors.
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

demo: $(VENV)/.base
	mkdir -p $(DEMO)
	$(VENV)/bin/cmd fit sample_checkpoints -o $(DEMO)/sample.cmd.h5 \
		--trajectory $(DEMO)/sample.trajectory.h5 --force
	$(VENV)/bin/cmd info $(DEMO)/sample.cmd.h5
	$(VENV)/bin/cmd reconstruct $(DEMO)/sample.cmd.h5 -o $(DEMO)/reconstructed --at last --force
	$(VENV)/bin/cmd report $(DEMO)/sample.cmd.h5 -o $(DEMO)/report --force \
		--eval sample_checkpoints.model:evaluate --select accuracy --max-rel-error 0.2 \
		--require 'test/accuracy>=0.8'

# Speed and memory against the machine's floors and the naive baseline (benchmarks/README.md).
# Generates its checkpoints once into benchmarks/.data (synthetic 1.3 GB + 5.4 GB, and a trained
# 1.3 GB run, which needs scikit-learn's digits: the samples extra), plus as much again for the
# stores. A subset: make bench BENCH_ARGS='--runs trained --skip-large --only floors,fit'
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,samples]'
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache site
