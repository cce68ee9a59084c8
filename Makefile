# epmd.py - build, test and install.
PYTHON ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all test clean

all: test

$(VENV)/.stamp: tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r tests/requirements.txt
	touch $@

test: $(VENV)/.stamp
	$(VPY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
