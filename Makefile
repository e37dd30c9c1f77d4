# The two set-up commands of the README:
#   make run    build the environment, then run the embedded default experiment to its report
#   make test   build the environment, then run the test suite
VENV ?= .venv
PYTHON ?= python3
CORES ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --workflow-profile profiles/workstation

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf results .snakemake report/default report/test
