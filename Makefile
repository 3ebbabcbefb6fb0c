# Two commands for a fresh machine:
#   make run    installs into .venv and starts the service and the web console on the tiny offline model
#   make test   installs into .venv (CPU torch) and runs the test suite
# Then `. .venv/bin/activate` puts `loraloop` on the PATH of your shell (make cannot change it for you).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: plain `torch` would pull a multi-GB CUDA build. Override with
# TORCH_SPEC='torch' (and a CUDA index) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
	@echo "loraloop is installed in $(VENV): run '. $(VENV)/bin/activate' to put the loraloop command on your PATH"

# `loraloop run` prints the console's URL and its admin login link; with DISCORD_TOKEN set it runs the bot too.
run: install
	$(VENV)/bin/loraloop run

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
