# Two entry points: `make run` (the main job on the packaged model) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dyncomp-installed

.PHONY: setup run test

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

run: setup
	$(BIN)/dyncomp pipeline --config configs/smollm2-gsm8k-smoke.yaml

test: setup
	$(BIN)/python -m pytest -q
