# longplay: `make demo` runs the whole system on this machine; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install tools test lint format demo bench clean stack-up stack-down

install: $(VENV)/.installed

# Re-install when the dependency list changes; torch==2.13.0 comes from the CPU wheel pip finds locally.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

# The demo dataset renders MIDI with fluidsynth + a GM soundfont (Debian packages): installed when we can.
tools:
	@if command -v fluidsynth >/dev/null && test -f /usr/share/sounds/sf2/FluidR3_GM.sf2; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null; \
	else echo "demo dataset needs: sudo apt-get install -y fluidsynth fluid-soundfont-gm"; fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install lint tools
	$(BIN)/pytest $(PYTEST_ARGS)

demo: install tools
	$(BIN)/longplay demo

bench: install
	@mkdir -p benchmarks/results
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b --out benchmarks/results || exit 1; done

stack-up: install
	$(BIN)/longplay stack up

stack-down:
	$(BIN)/longplay stack down

clean: stack-down
	rm -rf .longplay
