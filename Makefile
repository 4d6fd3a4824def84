# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.voco-installed
# The CPU build of torch; installed before anything else so no package can pull a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-fast test-browser bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[notebooks,test]"
	touch $(STAMP)

install: $(STAMP)

# Notebooks 00-03 executed by papermill in the cpu profile into runs/demo/, plus runs/demo/report.html.
demo: install
	$(BIN)/voco demo --out runs/demo --profile cpu

# The whole suite: unit + integration tests, then the notebooks under nbval in the smoke profile.
test: install
	VOCO_PROFILE=smoke $(BIN)/python -m pytest tests
	VOCO_PROFILE=smoke $(BIN)/python -m pytest --nbval-lax notebooks/

test-fast: install
	VOCO_PROFILE=smoke $(BIN)/python -m pytest tests -m "not slow and not network and not browser"

# The 3-D viewer in a real browser: Debian's chromium + playwright, JupyterLab runs 01_geometric_context,
# the NiiVue canvas must not be blank; screenshots in test-artifacts/.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: install
	@test -x /usr/bin/chromium || ($(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium)
	$(BIN)/pip install --quiet -e ".[browser]"
	VOCO_PROFILE=smoke $(BIN)/python tests/browser/run_browser_check.py

bench: install
	for b in $(filter-out benchmarks/gpu_check.py,$(wildcard benchmarks/*.py)); do $(BIN)/python $$b || exit 1; done

# One prepared check of every GPU path (≤ 8 min on an H100/H200): gpu-check/gpu_check.json + gpu_check.txt.
# On a machine without CUDA: `$(BIN)/python benchmarks/gpu_check.py --dry-run` (plan, imports, configs).
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out gpu-check

clean:
	rm -rf $(VENV) runs .pytest_cache
