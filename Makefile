PYTHON ?= python
PYTEST_ARGS ?= -q

.PHONY: install test lint format bench gpu-check

# torch first, pinned: 2.13.0 resolves to the CPU wheel on this machine's disk; any other torch request would pull
# the CUDA build. Everything else then sees torch already satisfied.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

# pytest exit code 5 means "no tests collected": report it, do not fail on it.
test:
	@$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint:
	$(PYTHON) -m ruff check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# prefopt vs TRL's DPOTrainer and GRPOTrainer vs a bare PyTorch loop, side by side: 3 interleaved rounds (~22 min on 2 CPU cores;
# BENCH_ARGS="--rounds 5"; BENCH_ARGS=--quick for a seconds-long smoke run). TRL rows need the [bench] extra.
bench:
	$(PYTHON) -m bench $(BENCH_ARGS)

# on a GPU machine: full fine-tuning, LoRA and QLoRA vs TRL's DPOTrainer on a Qwen2.5-0.5B-shaped model (bench/gpu.py)
gpu-check:
	$(PYTHON) -m bench.gpu $(GPU_ARGS)
