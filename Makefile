# make train: the built-in pipeline end to end.   make test: the test suite.
# make countdown: the same pipeline on the countdown task, where self-correction pays (~70 min on 2 cores).
# Each creates .venv and installs what is missing on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install when the venv has none (override: make TORCH=torch==2.6.0 ...).
TORCH ?= torch==2.13.0

.PHONY: train countdown test bench clean

$(VENV)/.deps: requirements.txt requirements-test.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

train: $(VENV)/.deps
	$(PY) train.py $(ARGS)

countdown: $(VENV)/.deps
	$(PY) train.py --task=countdown --out=runs/countdown $(ARGS)

test: $(VENV)/.deps
	$(PY) -m pytest -q tests

bench: $(VENV)/.deps
	$(PY) bench.py sampler

clean:
	rm -rf $(VENV) runs
