# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install linkrisk into it first (once).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(or $(LINKRISK_DATA),../shared/data)

.PHONY: install demo test test-deps clean

$(STAMP): pyproject.toml constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints-ci.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/linkrisk demo --data $(DATA) --out runs/demo

test: $(STAMP) test-deps
	LINKRISK_DATA=$(DATA) $(BIN)/python -m pytest

# tests/test_report_browser.py renders report.html in headless Chromium (Debian's `chromium` package).
test-deps:
	@if command -v chromium >/dev/null 2>&1; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && apt-get install -y --no-install-recommends chromium; \
	elif command -v sudo >/dev/null 2>&1; then \
		sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium; \
	else \
		echo "chromium is not installed, and installing it needs root or sudo: run" \
			"'apt-get install -y --no-install-recommends chromium' as root, then rerun make" >&2; \
		exit 1; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache
