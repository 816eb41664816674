# The two commands a user needs:  make run  (set up and run the experiment)  and  make test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: tests/requirements.txt $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -r tests/requirements.txt
	touch $@

run: $(VENV)/.runtime  ## train, measure, write figures/ (pass flags with ARGS="--quick")
	$(BIN)/python main.py $(ARGS)

test: $(VENV)/.dev  ## the whole test suite
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

$(VENV)/.bench: bench/requirements.txt $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	touch $@

bench: $(VENV)/.bench  ## time every stage against its baseline and the field's tools; writes bench/RESULTS.md
	$(BIN)/python bench/bench.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
