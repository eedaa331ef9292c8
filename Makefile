# Two commands: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision as a matching pair (this pair lies on local disk where pip is capped)
	$(BIN)/python -m pip install -q "torch>=2.5,<=2.14.1" "torchvision<=0.29.1"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/sparse_vit.py

lint: $(STAMP)
	$(BIN)/ruff check fxsparse tests benchmarks examples

# The suite: lint, then the reference path and the FX pass on CPU, then the Triton kernels
# themselves through Triton's interpreter (TRITON_INTERPRET=1 is read when triton
# decorates the kernels, so the kernel tests run in their own pytest process). Inductor's on-disk
# caches are off: they key compiled graphs without the op's fake kernel, so an old entry could be reused.
test: lint
	TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $(BIN)/python -m pytest tests -m "not interpret"
	TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest tests -m interpret

# The CPU half without the larger model tests: a quick check while working.
test-fast: $(STAMP)
	TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $(BIN)/python -m pytest tests -m "not slow and not interpret"

clean:
	rm -rf $(VENV)
