# Two entry points: `make test` and `make bench`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.peft_kernels-installed
# torch is pinned to the CPU wheel: a bare `torch` would pull a multi-GB CUDA build.
DEPS   := torch==2.13.0 triton==3.8.0 numpy pytest ninja peft==0.21.0 setuptools wheel

.PHONY: test bench venv info clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/include/peft_kernels/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(DEPS)
	$(BIN)/python -m pip install --quiet --no-build-isolation -e .
	touch $@

# Runs the whole suite on CPU (Triton kernels under TRITON_INTERPRET=1, set by tests/conftest.py).
# pytest exit code 5 ("no tests collected") is turned into a failure: an empty suite is a defect.
test: $(STAMP)
	@PEFT_KERNELS_REQUIRE_EXT=1 PEFT_KERNELS_REQUIRE_CUDA_TOOLKIT=1 $(BIN)/python -m pytest -q tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; exit 1; fi; \
	exit $$rc

# The default CPU benchmark suite (prints a table on the current device).
bench: $(STAMP)
	$(BIN)/python -m peft_kernels.bench $(BENCH_ARGS)

info: $(STAMP)
	$(BIN)/python -m peft_kernels info

clean:
	rm -rf $(VENV) build *.egg-info
