# The two commands of the README: `make bench` (the main job) and `make test`.
# Both create .venv and install the project into it on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install test bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info
