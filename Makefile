# epmd.py: test, lint, man page, install.
#
#   make test [TEST_JOBS=4]        run the tests (creates .venv), TEST_JOBS
#                                  pytest-xdist workers side by side
#                                  (TEST_JOBS=0: one process)
#   make test-pythons              the wire, erl and client tests with epmd.py
#                                  run by Python 3.8 and the newest Python 3
#                                  found (tests/tools/pythons.py says which ran)
#   make lint                      ruff, mypy, and vermin proving Python 3.8 is enough
#   make man                       regenerate man/epmd.1 from man/epmd.rst
#   make soak                      long reliability runs (1M churn cycles, 1M fuzz packets)
#   make bench                     performance figures, side by side with OTP's epmd
#   make install [PREFIX=/usr/local] [DESTDIR=] [BINDIR=] [LIBDIR=] [MANDIR=]
#                [SYSTEMDUNITDIR=] [PYTHON=/usr/bin/python3]
#                                  the module as LIBDIR/epmd.py, byte-compiled
#                                  by PYTHON into LIBDIR/__pycache__; BINDIR/epmd,
#                                  a launcher whose first line is #!PYTHON (an
#                                  absolute path; /usr/bin/python3 unless PYTHON
#                                  is given) that imports it from LIBDIR; the man
#                                  page, and the systemd units with
#                                  ExecStart=BINDIR/epmd
#   make uninstall                 (same variables)

PYTHON ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
PYTEST_ARGS ?=
# Two workers: this project's machines have two cores.  --dist loadgroup keeps
# tests marked xdist_group on one worker; tests marked `alone` wait until
# nothing else runs (tests/conftest.py).
TEST_JOBS ?= 4

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
# The module and its byte code: a launcher that imports a compiled module
# starts in about half the time of the 5,000-line script, which Python
# compiles on every run (README, "Installing").
LIBDIR ?= $(PREFIX)/lib/epmd-py
MANDIR ?= $(PREFIX)/share/man
# systemd reads units from /usr/local/lib/systemd/system before the
# distribution's /usr/lib/systemd/system, so the default prefix shadows the
# units an Erlang package ships under the same names.
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
DESTDIR ?=
INSTALL ?= install
# The interpreter in the installed script's first line: PYTHON when given on
# the command line or in the environment, else /usr/bin/python3 (a direct
# path, as Debian's policy wants, rather than /usr/bin/env).
INSTALL_PYTHON = $(if $(filter command line environment environment override,$(origin PYTHON)),$(PYTHON),/usr/bin/python3)
UNITS = epmd.service epmd.socket

LINT_DEPS = ruff mypy vermin

.PHONY: all test test-pythons lint man soak bench install uninstall clean

all: test

$(VENV)/.stamp: tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r tests/requirements.txt
	touch $@

test: $(VENV)/.stamp
	$(VPY) -m pytest -n $(TEST_JOBS) --dist loadgroup $(PYTEST_ARGS)

test-pythons: $(VENV)/.stamp
	$(VPY) -m tests.tools.pythons $(PYTEST_ARGS)

$(VENV)/.lint-stamp: $(VENV)/.stamp
	$(VPY) -m pip install -q $(LINT_DEPS)
	touch $@

lint: $(VENV)/.lint-stamp
	$(VENV)/bin/ruff check epmd.py man/build.py tests
	$(VENV)/bin/mypy epmd.py
	$(VENV)/bin/vermin -t=3.8- --no-tips --violations --eval-annotations epmd.py man/build.py

bench:
	$(PYTHON) -m tests.tools.bench $(BENCH_ARGS)

soak: $(VENV)/.stamp
	$(VPY) -m tests.tools.soak $(SOAK_ARGS)

man: $(VENV)/.stamp
	$(VPY) man/build.py

# The byte code is made by the launcher's interpreter, and names LIBDIR (not
# DESTDIR) as the source's place in tracebacks. A re-exec (SIGUSR2) checks
# the launcher and the module, and their directories: root's (or the daemon
# user's) and writable by no one else, hence the explicit modes.
install:
	@case "$(INSTALL_PYTHON)" in /*) ;; *) echo "PYTHON must be an absolute path, not $(INSTALL_PYTHON)" >&2; exit 1;; esac
	$(INSTALL) -d -m 755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(SYSTEMDUNITDIR)
	$(INSTALL) -m 644 epmd.py $(DESTDIR)$(LIBDIR)/epmd.py
	rm -rf $(DESTDIR)$(LIBDIR)/__pycache__
	$(INSTALL_PYTHON) -m compileall -q -d $(LIBDIR) $(DESTDIR)$(LIBDIR)/epmd.py
	chmod 755 $(DESTDIR)$(LIBDIR)/__pycache__
	chmod 644 $(DESTDIR)$(LIBDIR)/__pycache__/*
	printf '%s\n' '#!$(INSTALL_PYTHON)' \
		'# epmd.py, installed by make install: the program is $(LIBDIR)/epmd.py' \
		'import sys' \
		'sys.path.insert(0, "$(LIBDIR)")' \
		'from epmd import console_main' \
		'console_main()' > $(DESTDIR)$(BINDIR)/epmd.tmp
	chmod 755 $(DESTDIR)$(BINDIR)/epmd.tmp
	mv -f $(DESTDIR)$(BINDIR)/epmd.tmp $(DESTDIR)$(BINDIR)/epmd
	$(INSTALL) -m 644 man/epmd.1 $(DESTDIR)$(MANDIR)/man1/epmd.1
	sed 's|^ExecStart=/usr/bin/epmd |ExecStart=$(BINDIR)/epmd |' contrib/systemd/epmd.service \
		> $(DESTDIR)$(SYSTEMDUNITDIR)/epmd.service
	$(INSTALL) -m 644 contrib/systemd/epmd.socket $(DESTDIR)$(SYSTEMDUNITDIR)/epmd.socket
	chmod 644 $(DESTDIR)$(SYSTEMDUNITDIR)/epmd.service

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/epmd $(DESTDIR)$(MANDIR)/man1/epmd.1
	rm -f $(DESTDIR)$(LIBDIR)/epmd.py $(DESTDIR)$(LIBDIR)/__pycache__/epmd.*.pyc
	-rmdir $(DESTDIR)$(LIBDIR)/__pycache__ $(DESTDIR)$(LIBDIR) 2>/dev/null
	rm -f $(addprefix $(DESTDIR)$(SYSTEMDUNITDIR)/,$(UNITS))

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache build .build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
