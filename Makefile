# tidal: two commands from a fresh clone: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_DIR ?= .models/k2-tiny
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint bench clean

$(BIN)/tidal: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench,sim]'
	touch $@

install: $(BIN)/tidal

$(MODEL_DIR)/config.json: | $(BIN)/tidal
	$(BIN)/tidal make-model --preset k2-tiny --out $(MODEL_DIR)

serve: $(BIN)/tidal $(MODEL_DIR)/config.json
	$(BIN)/tidal serve --model $(MODEL_DIR) --prefill 1 --decode 1 --host $(HOST) --port $(PORT)

test: $(BIN)/tidal
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(BIN)/tidal
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(BIN)/tidal
	$(BIN)/python bench/engine.py --quick --json bench/results/engine.json

clean:
	rm -rf $(VENV) .models build *.egg-info
