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
PYTEST_ARGS ?=
BENCH_ARGS  ?=

export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS  ?= 2

ifeq ($(origin PYTHON), undefined)
PYTHON := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
else
DEPS   :=
endif

.PHONY: test bench install clean

$(VENV)/.deps-installed: Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade "pip>=23"
	$(VENV)/bin/pip install "$(TORCH_SPEC)" "$(TRITON_SPEC)" numpy ninja setuptools wheel \
		pytest hypothesis pytest-benchmark matplotlib peft transformers safetensors
	touch $@

install: $(DEPS)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

test: install
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(PYTHON) -m pytest bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info lora_kernels/_C*.so .pytest_cache
