# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the local CPU build (never let pip pick a CUDA build)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	# zoo: transformers for the Hugging Face zoo tests (~20 s, does not re-resolve torch)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,plot,zoo]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m decorrelate demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
