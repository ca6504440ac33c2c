PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test venv lint bench models clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# The test extras only; the test-only provider plugins are never installed (tests/conftest.py finds
# them in tests/fixtures/fake_provider), so `make run` and `appliance providers` never list them.
$(TEST_STAMP): pyproject.toml setup.py $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(STAMP)

## make run: serve the bundled reference models on http://127.0.0.1:8000
run: $(STAMP)
	$(BIN)/appliance serve

## make test: the whole suite
test: $(TEST_STAMP)
	$(BIN)/python -m pytest

## make models: retrain and rewrite the bundled reference models (about 85 min on 2 quiet cores)
models: $(STAMP)
	$(BIN)/pip install --quiet -e '.[train]'
	$(BIN)/python models/recipe/build.py

lint: $(TEST_STAMP)
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check appliance tests bench models/recipe setup.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build
