# The two commands of the README: `make bench` (the main job) and `make test`.
# Both create .venv and install the project into it on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install test bench clean install-oldest test-oldest

install: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml setup.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# CI runs this: every backend must load (cpp built from source, triton in its interpreter).
test: $(STAMP)
	SEPCONV_REQUIRE_BACKENDS=cpp,triton $(PYTHON) -m pytest -q -rs $(PYTEST_ARGS)

# Writes benchmarks/results/<machine>.jsonl (rows), .md (summary) and .png (chart) for this run.
bench: $(STAMP)
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

# The same tests on the oldest supported Python and torch (requirements-oldest.txt), in their own venv.
# The triton backend needs newer releases than these, so only cpp is required to load there.
OLDEST_VENV ?= .venv-oldest-torch
OLDEST_PYTHON ?= $(or $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9*/bin/python3.9)),python3)
OLDEST_STAMP := $(OLDEST_VENV)/.installed

install-oldest: $(OLDEST_STAMP)

$(OLDEST_STAMP): requirements-oldest.txt pyproject.toml setup.py
	test -x $(OLDEST_VENV)/bin/python || $(OLDEST_PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q -r requirements-oldest.txt
	$(OLDEST_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -c "import sys, torch; print('test-oldest: Python', sys.version.split()[0], 'torch', torch.__version__)"
	env -u SEPCONV_OLDEST_TRITON_PYTHON SEPCONV_REQUIRE_BACKENDS=cpp $(OLDEST_VENV)/bin/python -m pytest -q -rs $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info
