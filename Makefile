# Two commands: `make demo` (install + run the 2511 launcher on the tiny model) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	./Qwen-Image-Edit-2511.sh   # makes data/demo on first use

test: install
	$(PY) -m pytest -n 2 tests

bench: install
	$(PY) -m benchmarks run

clean:
	rm -rf data/demo data/cache train
