# epmd.py: test, lint, man page, install.
#
#   make test                      run the tests (creates .venv)
#   make lint                      ruff, mypy, and vermin proving Python 3.8 is enough
#   make man                       regenerate man/epmd.1 from man/epmd.rst
#   make soak                      long reliability runs (1M churn cycles, 1M fuzz packets)
#   make bench                     performance figures, side by side with OTP's epmd
#   make install [PREFIX=/usr/local] [DESTDIR=] [BINDIR=] [MANDIR=]
#   make uninstall                 (same variables)

PYTHON ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
PYTEST_ARGS ?=

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
DESTDIR ?=
INSTALL ?= install

LINT_DEPS = ruff mypy vermin

.PHONY: all test lint man soak bench install uninstall clean

all: test

$(VENV)/.stamp: tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r tests/requirements.txt
	touch $@

test: $(VENV)/.stamp
	$(VPY) -m pytest $(PYTEST_ARGS)

$(VENV)/.lint-stamp: $(VENV)/.stamp
	$(VPY) -m pip install -q $(LINT_DEPS)
	touch $@

lint: $(VENV)/.lint-stamp
	$(VENV)/bin/ruff check epmd.py man/build.py tests
	$(VENV)/bin/mypy epmd.py
	$(VENV)/bin/vermin -t=3.8- --no-tips --violations --eval-annotations epmd.py man/build.py

bench:
	$(PYTHON) tests/bench.py $(BENCH_ARGS)

soak: $(VENV)/.stamp
	$(VPY) tests/soak.py $(SOAK_ARGS)

man: $(VENV)/.stamp
	$(VPY) man/build.py

install:
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1
	$(INSTALL) -m 755 epmd.py $(DESTDIR)$(BINDIR)/epmd
	$(INSTALL) -m 644 man/epmd.1 $(DESTDIR)$(MANDIR)/man1/epmd.1

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/epmd $(DESTDIR)$(MANDIR)/man1/epmd.1

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
