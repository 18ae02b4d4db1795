# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1: the CUDA build that also runs on CPU (pip takes it from local disk here)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast bench bench-gpu lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed  ## pretrain on the embedded digits and compare kNN with a random encoder
	$(VENV)/bin/ressl pretrain

test: $(VENV)/.installed  ## the whole suite (CI runs this)
	$(PY) -m pytest

test-fast: $(VENV)/.installed  ## skip the end-to-end runs
	$(PY) -m pytest -m "not slow and not distributed"

bench: $(VENV)/.installed  ## speed ratios, measured side by side
	$(PY) -m benchmarks

bench-gpu: $(VENV)/.installed  ## on a CUDA machine: the tests that need CUDA, then the benchmarks (cifar10 preset, ImageNet-size kNN bank)
	$(PY) -m pytest -k "cuda or graph or gpu"
	$(PY) -m benchmarks --device cuda

lint: $(VENV)/.installed
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check ressl tests benchmarks

clean:
	rm -rf $(VENV) runs *.egg-info
