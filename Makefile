# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install linkrisk into it first (once).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(or $(LINKRISK_DATA),../shared/data)

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints-ci.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/linkrisk demo --data $(DATA) --out runs/demo

test: $(STAMP)
	LINKRISK_DATA=$(DATA) $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
