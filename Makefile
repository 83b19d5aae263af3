# Two entry points: `make run` (the main job on the packaged model) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
STAMP := $(VENV)/.dyncomp-installed

.PHONY: setup run test

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

run: setup
	$(BIN)/dyncomp generate --data $(DATA)/gsm8k/test.jsonl --index 0

test: setup
	$(BIN)/python -m pytest -q
