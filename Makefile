# The two set-up commands of the README:
#   make run    build the environment, then run the embedded default experiment to its report
#   make test   build the environment, then run the test suite
VENV ?= .venv
PYTHON ?= python3
CORES ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup run run-glue test test-reference clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --workflow-profile profiles/workstation

# The real-data experiment (GLUE on all-MiniLM-L6-v2; needs ../shared/data/glue): about 35 minutes.
run-glue: $(STAMP)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet -c requirements.lock -e '.[real]'
	$(VENV)/bin/snakemake --cores $(CORES) --workflow-profile profiles/workstation --configfile config/glue_minilm.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# Conformance of our RTN grids and GPTQ with compressed-tensors / llm-compressor (skipped by `make test`
# when they are not installed). llm-compressor's own pins exclude our transformers, hence --no-deps.
test-reference: $(STAMP)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet -c requirements.lock -e '.[quant-ref]'
	$(VENV)/bin/pip install --disable-pip-version-check --quiet --no-deps llmcompressor==0.14.0.1
	$(VENV)/bin/python -m pytest tests/test_quantize_reference.py

clean:
	rm -rf results .snakemake report/default report/test
