# fastkd: every target sets up what it needs on a fresh machine (idempotent, cached in .venv).
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1: CUDA builds that run on the CPU (detection needs torchvision's
# compiled ops; PyPI's torchvision does not import beside the 2.13.0 CPU wheel). ~5.5 GB in the venv.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SYS_PKGS := libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup sysdeps venv test demo demo-seg demo-det bench clean gpu-wheels gpu-check gpu-static triton-3.6

# Debian packages FFCV builds against, and Fashion-MNIST for the demo.
sysdeps:
	@if dpkg -s $(SYS_PKGS) >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(SYS_PKGS); \
	else echo "no apt-get: install $(SYS_PKGS) by hand (FFCV needs them)"; fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

venv: $(BIN)/python

$(VENV)/.deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC) -r requirements.txt  # one resolve: nothing re-pins torch
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: sysdeps $(VENV)/.built

test: setup triton-3.6
	FASTKD_REQUIRE_EXT=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The GPU image's Triton, for the ahead-of-time compilation audit only (benchmarks/gpu_static.py runs it in a
# subprocess with this folder first on the path): its own git-ignored folder, never the venv (~640 MB).
TRITON_GPU ?= 3.6.0
TRITON_GPU_DIR := .cache/triton-3.6
$(TRITON_GPU_DIR)/.installed: | $(BIN)/python
	rm -rf $(TRITON_GPU_DIR)
	$(BIN)/pip install -q --no-deps --target $(TRITON_GPU_DIR) triton==$(TRITON_GPU)
	touch $@

triton-3.6: $(TRITON_GPU_DIR)/.installed

# Every Triton kernel the host code launches x every tile config, compiled for sm_90 and sm_80 on the CPU with
# both Triton versions: registers, spills, shared memory, MMA kind, load pipelining, occupancy
# (benchmarks/results/gpu_static_triton3.8.md and _triton3.6.md; ~10-25 min on 2 cores, cached per compile).
gpu-static: setup triton-3.6
	@status=0; $(BIN)/python benchmarks/gpu_static.py || status=1; \
	$(BIN)/python benchmarks/gpu_static.py --triton-path $(TRITON_GPU_DIR) || status=1; exit $$status

# The main job: Fashion-MNIST teacher, then one student distilled four ways, one table (fastkd/demos/classification.py).
# More: make demo DEMO_ARGS="--device cuda --students train.max_steps=null train.epochs=10"
demo: setup
	$(BIN)/python -m fastkd.cli demo cls $(DEMO_ARGS)

# Segmentation: fashion-scenes label maps, PSPNet teacher, one student three ways, mIoU table + masks.png
# (fastkd/demos/segmentation.py). On a busy CPU: make demo-seg DEMO_SEG_ARGS="--threads 1"
demo-seg: setup
	$(BIN)/python -m fastkd.cli demo seg $(DEMO_SEG_ARGS)

# Detection: fashion scenes -> COCO .beton, RetinaNet teacher, one student three ways, box AP table +
# boxes.png (fastkd/demos/detection.py). On a busy CPU: make demo-det DEMO_DET_ARGS="--threads 1"
demo-det: setup
	$(BIN)/python -m fastkd.cli demo det $(DEMO_DET_ARGS)

clean:
	rm -rf build *.egg-info fastkd/_C*.so $(VENV)

# The GPU machine (python3 3.12, torch, triton; no pydantic, no network) gets what it lacks as wheels,
# downloaded here into .whl/ (git-ignored; travels with the tree: carry it). Versions: those of requirements.txt's
# resolution, pydantic-core pinned by pydantic, typing_extensions as new as they need.
GPU_WHEELS ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
GPU_CHECK_ARGS ?=

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(GPU_WHEELS)
	@ls .whl

# Every GPU claim in one command (benchmarks/gpu_check.py): results in $$OUT (or GPU_CHECK_ARGS="--out DIR").
# The wheels go into a temporary folder, put on the path only when pydantic is missing. Without CUDA: the dry run.
# Its python: PY when given, else the project's environment where it exists (a fresh CPU machine's python3 has
# no torch), else python3 (the GPU image's).
ifeq ($(origin PY),file)
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
else
GPU_PY := $(PY)
endif

gpu-check:
	@set -e; site=$$(mktemp -d); trap 'rm -rf "$$site"' EXIT; \
	if ! $(GPU_PY) -c "import pydantic" 2>/dev/null; then \
	  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu-check: pydantic is missing and .whl/ is empty: run make gpu-wheels"; exit 2; }; \
	  $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$$site" .whl/*.whl; \
	fi; \
	PYTHONPATH="$$site:$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
