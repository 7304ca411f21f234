# The README's two commands. Each sets up .venv (idempotently) and then runs.
#   make demo   - the offline digits demo, results in runs/demo/
#   make test   - the test suite
# And on a GPU machine (README "GPU validation"; benchmarks/gpu_check.py), two commands of at most 10 minutes:
#   make gpu-check            - stage check (540 s): install .whl/, build in place, backends, CUDA tests, memcheck;
#                               with the machine's python (GPU_PYTHON), not .venv; writes
#                               benchmarks/results/<device>.json and benchmarks/RESULTS.md (or into GPU_CHECK_OUT)
#   make gpu-check GPU_CHECK_STAGE=bench - stage bench (300 s): op benchmarks and throughput, reusing the wheels
#                               and the build a first call left on the machine (installs and builds on a fresh one)
#   make gpu-check DRY_RUN=1  - every step on the CPU, tiny sizes, with .venv; outputs to GPU_CHECK_OUT or a temp dir
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch and torchvision are pinned together (open_clip needs torchvision); override for another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
# make gpu-check: the python that has the GPU machine's torch; GPU_CHECK_OUT: a folder for the JSON and
# RESULTS.md instead of benchmarks/ (e.g. $OUT on a lent machine); GPU_CHECK_STAGE: check (default on a GPU), bench
# or all (the dry run's default); GPU_CHECK_ARGS: more flags (--skip, --budget-s, ...).
GPU_PYTHON    ?= python3
GPU_CHECK_OUT ?=
GPU_CHECK_STAGE ?=
GPU_CHECK_ARGS ?=
DRY_RUN       ?=
GPU_CHECK_FLAGS = $(if $(GPU_CHECK_STAGE),--stage $(GPU_CHECK_STAGE)) $(if $(GPU_CHECK_OUT),--out-dir $(GPU_CHECK_OUT))

.PHONY: demo demo-prompted test venv clean gpu-check

venv: $(STAMP)

# The extension's sources are prerequisites too: editing a kernel rebuilds orwcfm_fast._C (ninja, incremental).
EXT_SOURCES := csrc/sources.txt $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp kernels/*.cu kernels/*.cuh)

$(STAMP): setup.py pyproject.toml Makefile $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=64" wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,diffusers,tensorboard]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m orwcfm_fast.cli demo

# The text-to-image demo: a small SD3 pipeline on prompted digits, LoRA fine-tuning (runs/prompted-digits/).
demo-prompted: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m orwcfm_fast.cli demo-prompted

test: $(STAMP)
	$(PY) -m pytest -q

ifeq ($(DRY_RUN),1)
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --dry-run $(strip $(GPU_CHECK_FLAGS) $(GPU_CHECK_ARGS))
else
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(strip $(GPU_CHECK_FLAGS) $(GPU_CHECK_ARGS))
endif

clean:
	rm -rf $(VENV) build *.egg-info runs
