# `make test` and `make bench` set up a fresh machine themselves: a virtual environment in .venv
# with torch 2.14.1 (CUDA 13.0 build) and triton 3.8, then an editable install that compiles csrc/
# into lora_kernels._C when nvcc is present.
#
# To use an interpreter that already has torch and triton (a GPU box with no package registry):
#     make test PYTHON=python3        make bench PYTHON=python3
# Then nothing is downloaded: the package is built in place with that interpreter.

VENV        ?= .venv
TORCH_SPEC  ?= torch==2.14.1
TRITON_SPEC ?= triton==3.8.*
# PEFT and transformers pinned: tests/peft_suite/baseline-*.json records PEFT's own suite for these
PEFT_SPEC   ?= peft==0.21.2 transformers==5.25.0
# what PEFT's own test files import beyond the package
PEFT_SUITE_DEPS ?= datasets==5.2.0 pyyaml==6.0.4 parameterized==0.9.0 scipy==1.17.1 diffusers==0.42.1 attrs==26.1.0
PYTEST_ARGS ?=
PEFT_SUITE_ARGS ?=  # --triton-full: PEFT's test_custom_models.py under the Triton interpreter too
BENCH_ARGS  ?=

export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS  ?= 2

ifeq ($(origin PYTHON), undefined)
PYTHON := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
else
DEPS   :=
endif

.PHONY: test test-triton36 test-triton39 test-peft test-package test-oldest oldest-env bench install lint format clean

$(VENV)/.deps-installed: Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade "pip>=23"
	$(VENV)/bin/pip install "$(TORCH_SPEC)" "$(TRITON_SPEC)" numpy ninja setuptools wheel \
		pytest hypothesis pytest-benchmark matplotlib $(PEFT_SPEC) safetensors
	touch $@

# The editable install compiles csrc/ (minutes): redone only when the build's inputs change, so the
# targets below that need the package do not each compile it again. Its log (with ptxas's report per
# kernel, which tests/test_ptxas_report.py reads instead of compiling again) is kept.
INSTALLED := build/.installed-$(subst /,_,$(PYTHON))
BUILD_LOG := build/extension-build.log
$(INSTALLED): $(DEPS) setup.py pyproject.toml $(wildcard csrc/*)
	@mkdir -p build
	$(PYTHON) -m pip install -v --no-build-isolation --no-deps -e . > $(BUILD_LOG) 2>&1 \
		|| (tail -60 $(BUILD_LOG); exit 1)
	@grep "lora_kernels: installing WITHOUT" $(BUILD_LOG) || echo "lora_kernels: built with the CUDA extension (log: $(BUILD_LOG))"
	@touch $@

install: $(INSTALLED)

test: install
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

# Other Triton versions beside the installed 3.8, each in its own directory put first on PYTHONPATH:
# 3.6, which the GPU machines run (its interpreter needs numpy < 2.3), and 3.9, the newest (torch
# 2.15's). Interpreter tests of the Triton paths + sm_90 compile of all launches + the direct launch
# path against that version's own launch path (driver faked). The compile runs beside the
# interpreter tests: each keeps about one core busy, and the CI machine has two.
# $(1): the version, $(2): its directory, $(3): packages it needs beside triton
define test_triton_version
	$(PYTHON) -m pip install -q --no-deps --target $(2) "triton==$(1)" $(3)
	PYTHONPATH=$(CURDIR)/$(2) TRITON_CACHE_DIR=$(CURDIR)/$(2)/cache $(PYTHON) tests/triton/gpu_compile.py --quick \
		--arch 90 > $(2)/compile.log 2>&1 & compile=$$!; \
	PYTHONPATH=$(CURDIR)/$(2) TRITON_INTERPRET=1 TRITON_CACHE_DIR=$(CURDIR)/$(2)/cache $(PYTHON) -m pytest -q \
		-p no:cacheprovider -W ignore::DeprecationWarning tests/triton/test_triton_kernels.py tests/test_function.py \
		tests/test_multi.py tests/test_memory_determinism.py; tests=$$?; \
	wait $$compile || { tail -40 $(2)/compile.log; exit 1; }; exit $$tests
	PYTHONPATH=$(CURDIR)/$(2) TRITON_CACHE_DIR=$(CURDIR)/$(2)/cache $(PYTHON) tests/triton/direct_launch_check.py
	@echo "triton $(1): $$(grep -c '^ok' $(2)/compile.log) launch variants compiled for sm_90 (log: $(2)/compile.log)"
endef
T36 := .triton36
T39 := .triton39
test-triton36: install
	$(call test_triton_version,3.6.0,$(T36),"numpy==2.2.*")
test-triton39: install
	$(call test_triton_version,3.9.0,$(T39),)

# PEFT's own LoRA tests, unpatched (from tests/peft_suite/baseline-*.json where it matches the
# installed versions) and with every PEFT model patched: what passes unpatched must pass patched.
test-peft: install
	$(PYTHON) -m pip install -q $(PEFT_SUITE_DEPS)
	$(PYTHON) scripts/peft_suite.py $(PEFT_SUITE_ARGS)

# The package as users install it: `python -m build` (sdist, then a wheel built from it), the sdist's
# contents checked, then the sdist installed into a fresh virtual environment with torch, which
# compiles the extension (for sm_80 only, the quickest: without 9.0a the wgmma kernels are left out;
# `make test` compiles them), and a smoke test run from outside the
# checkout.
PKG_VENV ?= .venv-package
test-package: install
	rm -rf dist $(PKG_VENV)
	$(PYTHON) -m pip install -q build
	$(PYTHON) -m build
	$(PYTHON) scripts/check_sdist.py dist/lora_kernels-*.tar.gz
	python3 -m venv $(PKG_VENV)
	$(PKG_VENV)/bin/pip install -q "$(TORCH_SPEC)" numpy ninja setuptools wheel
	TORCH_CUDA_ARCH_LIST=8.0 $(PKG_VENV)/bin/pip install -q --no-build-isolation dist/lora_kernels-*.tar.gz
	cd $(PKG_VENV) && EXPECT_CUDA_EXTENSION=1 bin/python $(CURDIR)/scripts/smoke_test.py

# The oldest versions setup.py claims: Python 3.10, torch 2.11 (a CUDA build from the registry; it
# runs on CPU), triton 3.6, transformers 5.17, peft 0.21.2; the package installed without the
# extension and the tests of the Python package run against it. Left out, to keep CI short: the
# CUDA emulation, the sm_90 compiles and the ptxas report (they depend on g++/nvcc/ptxas, not on
# these versions), the Triton interpreter tests (tests/triton/; `make test-triton36` runs the
# Triton paths under triton 3.6) and the randomized property test (its inputs, not versions, vary).
OLDEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)
OLDEST_VENV   ?= .venv-oldest
OLDEST_SPEC   ?= torch==2.11.0 triton==3.6.0 "numpy<2.3" "setuptools<82" wheel peft==0.21.2 transformers==5.17.0 \
	accelerate safetensors pytest hypothesis "pytest-xdist==3.8.*"
# Its environment is a target of its own (torch 2.11 is downloaded: minutes of network, little CPU),
# which .ci/run makes in the background while make test runs.
$(OLDEST_VENV)/.deps-installed: Makefile
	test -x $(OLDEST_VENV)/bin/python || $(OLDEST_PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q $(OLDEST_SPEC)
	touch $@
oldest-env: $(OLDEST_VENV)/.deps-installed
# These tests keep one core busy each (the reference path on small tensors): a worker per core.
test-oldest: oldest-env
	LORA_KERNELS_SKIP_CUDA_BUILD=1 $(OLDEST_VENV)/bin/pip install -q --no-build-isolation --no-deps --force-reinstall .
	cd tests && LORA_KERNELS_SKIP_CUDA_BUILD=1 $(CURDIR)/$(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		-n auto --dist loadfile \
		--ignore=test_cuda_emulation.py --ignore=triton --ignore=test_ptxas_report.py \
		--ignore=test_properties.py $(PYTEST_ARGS)

# ruff (lint + format check, pyproject.toml) for the Python, clang-format (.clang-format) for csrc/;
# `make format` applies both. Pinned, so every machine formats the same way.
LINT_SPEC ?= ruff==0.17.6 clang-format==19.1.7
PY_SOURCES := lora_kernels bench tests scripts setup.py
C_SOURCES  := $(wildcard csrc/*.cu csrc/*.cpp csrc/*.h csrc/*.cuh)
CLANG_FORMAT = $(PYTHON) -c "import sys, clang_format; sys.argv[0] = 'clang-format'; clang_format.clang_format()"
lint: $(DEPS)
	$(PYTHON) -m pip install -q $(LINT_SPEC)
	$(PYTHON) -m ruff check $(PY_SOURCES)
	$(PYTHON) -m ruff format --check $(PY_SOURCES)
	$(CLANG_FORMAT) --dry-run -Werror $(C_SOURCES)

format: $(DEPS)
	$(PYTHON) -m pip install -q $(LINT_SPEC)
	$(PYTHON) -m ruff check --fix $(PY_SOURCES)
	$(PYTHON) -m ruff format $(PY_SOURCES)
	$(CLANG_FORMAT) -i $(C_SOURCES)

bench: install
	$(PYTHON) -m pytest bench $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info lora_kernels/_C*.so .pytest_cache $(T36) $(T39) .peft-suite $(PKG_VENV) $(OLDEST_VENV)
