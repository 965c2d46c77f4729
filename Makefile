# make setup: .venv with the package and its dev extra, and Delta's jars cached from Maven Central.
# make demo:  set-up, build the demo corpus, run every stage, print what was written.
# make test:  set-up, then the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.mira-installed
JARS_STAMP := .mira/ivy/.resolved

.PHONY: setup demo test clean

setup: $(SETUP_STAMP) $(JARS_STAMP)

$(SETUP_STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(JARS_STAMP): $(SETUP_STAMP)
	$(PY) -m mira_spark.spark --resolve-jars --jars-dir .mira/ivy
	touch $@

demo: setup
	$(VENV)/bin/mira-spark --config conf/local.yml demo-corpus
	$(VENV)/bin/mira-spark --config conf/local.yml run

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf .mira spark-warehouse
