# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.voco-installed
# The CPU build of torch; installed before anything else so no package can pull a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-fast test-browser bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[notebooks,test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/voco demo

# The whole suite: unit + integration tests, then the notebooks under nbval in the smoke profile.
test: install
	VOCO_PROFILE=smoke $(BIN)/python -m pytest tests

test-fast: install
	VOCO_PROFILE=smoke $(BIN)/python -m pytest tests -m "not slow and not network and not browser"

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
