# The two commands of the README's Quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test check pytest audit install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/imrelay demo

check: $(STAMP)
	scripts/check

pytest: $(STAMP)
	scripts/test

test: $(STAMP)
	scripts/check
	scripts/bandit
	scripts/test

audit: $(STAMP)
	scripts/audit

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
