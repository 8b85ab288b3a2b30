# `make test` and `make demo` create (or reuse) .venv and install what they need.
# torch is pinned to the CPU build that this project's machines carry on disk; users elsewhere
# can `pip install structprune` with any torch >= 2.1.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: test demo venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,onnx]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

demo: $(STAMP)
	$(BIN)/python tutorials/01_prune_resnet.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
