# voicebot — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
export GRADIO_ANALYTICS_ENABLED := False

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(UV) pip install --python $(BIN)/python -q --compile-bytecode -e '.[ja]'
	@touch $@

$(VENV)/.installed-test: $(BIN)/activate pyproject.toml
	$(UV) pip install --python $(BIN)/python -q --compile-bytecode -e '.[ja,test,bench]'
	@touch $(VENV)/.installed $@

install: $(VENV)/.installed ## Create the virtual environment and install voicebot

run: install ## Start the main job: the voice agent's web page on http://127.0.0.1:7860
	$(BIN)/voicebot ui

serve: install ## Serve the API, WebRTC, phone routes and the page under /ui
	$(BIN)/voicebot serve

lint: $(VENV)/.installed-test ## ruff
	$(BIN)/ruff check voicebot tests scripts
	$(BIN)/ruff format --check voicebot tests scripts

type: $(VENV)/.installed-test ## mypy (strict on the package)
	$(BIN)/mypy

check: lint type ## lint + types

test: check ## Install what tests need, then lint, type-check and run the tests
	$(BIN)/python -m pytest -q

bench: install ## voice-to-voice benchmark against the FastRTC cookbook pipeline
	$(UV) pip install --python $(BIN)/python -q --compile-bytecode -e '.[ja,test,bench]'
	$(BIN)/voicebot bench --llm-profile gpu-8b --json out/bench.json --plot out/bench.png

bench-gpu: install ## The benchmark on an NVIDIA GPU (STT on CUDA; one pass, ~5 min)
	$(UV) pip install --python $(BIN)/python -q --compile-bytecode -e '.[ja,test,bench,gpu]'
	$(BIN)/voicebot doctor || true  # names a missing CUDA library
	VOICEBOT_DEVICE=cuda timeout 480 $(BIN)/voicebot bench --repeats 1 --sessions 4 \
		--llm-profile gpu-8b --json out/bench-gpu.json --plot out/bench-gpu.png

.PHONY: help install run serve lint type check test bench bench-gpu
