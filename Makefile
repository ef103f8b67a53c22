# Two commands: `make demo` (install + run the 2511 launcher on the tiny model) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install browser demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	-$(MAKE) --no-print-directory browser
	touch $@

# Best effort, never fails the install: Debian's chromium + chromium-driver for the app's browser test
# (tests/test_app.py skips it, saying why, when they are missing). Only as root with apt-get.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
			|| echo "note: could not install chromium + chromium-driver; the browser test will be skipped"; \
	else echo "note: chromium + chromium-driver missing (install them as root); the browser test will be skipped"; fi

install: $(VENV)/.installed

demo: install
	./Qwen-Image-Edit-2511.sh   # makes data/demo on first use

test: install
	$(PY) -m pytest -n 2 --durations=25 tests

bench: install
	$(PY) -m benchmarks run

clean:
	rm -rf data/demo data/cache train
