# The README's two commands. Each sets up .venv (idempotently) and then runs.
#   make demo   - the offline digits demo, results in runs/demo/
#   make test   - the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch and torchvision are pinned together (open_clip needs torchvision); override for another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

# The extension's sources are prerequisites too: editing a kernel rebuilds orwcfm_fast._C (ninja, incremental).
EXT_SOURCES := csrc/sources.txt $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp kernels/*.cu kernels/*.cuh)

$(STAMP): setup.py pyproject.toml Makefile $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=64" wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m orwcfm_fast.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info runs
