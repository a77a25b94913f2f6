# The README's two commands: `make demo` (the main job) and `make test`.
# Both create .venv themselves; torch==2.13.0 is installed explicitly first so pip never
# resolves optimkit's open range to a newer torch. The pin fixes the version, not the build:
# the configured index decides (CPU or CUDA); see README "What the torch pin does".
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.optimkit-installed

.PHONY: venv demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet torch==2.13.0 -e ".[test,data,integration,cluster]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/optimkit compare

test: $(STAMP)
	.ci/ensure-postgres
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) optimkit-report
