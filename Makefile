# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/gpucredit run --out results --stress next-gen-glut --stress crypto-winter \
		--stress liquidity-freeze --stress rate-shock --stress paper-metrics \
		--stress largest-offtaker-default

# Tests: one pytest-xdist worker per core; a test file stays on one worker, so its module
# fixtures (the validation pack, the Dask clusters) run once.
test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -n auto --dist loadfile

lint: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) results .pytest_cache
