# qmail-smtpd-py: make run | make run-demo | make test | make lint | make bench | make install | make clean
#
# Everything runs from a local virtualenv (.venv) with the package installed
# non-editable, so the tests exercise exactly what `pip install .` ships.

PYTHON ?= python3
VENV ?= .venv
SHARED ?= ../shared
# Empty: every area in one run (core spp extfork auth spp-auth-hook); or e.g. `core spp`.
CONFORMANCE_AREAS ?=
CONFORMANCE_JOBS ?= 2
HOST ?= 127.0.0.1
PORT ?= 2525
RUNDIR ?= run
# pytest workers (pytest-xdist): many tests wait on processes and sockets, so
# more workers than the 2 cores pay off.
TEST_JOBS ?= 6

STAMP := $(VENV)/.installed
SOURCES := pyproject.toml $(wildcard qmail_smtpd_py/*.py qmail_smtpd_py/*/*.py) $(wildcard bin/*) $(wildcard plugins/*)
BIN := $(CURDIR)/$(VENV)/bin

.PHONY: all venv .venv run run-demo tcpserver openssl test pytest conformance lint coverage bench clean fuzz install

all: test

venv .venv: $(STAMP)

# (Re)install whenever the package sources change (pip always reinstalls a local
# directory). build/ is removed first: setuptools would otherwise ship modules that
# were deleted from the source tree.
$(STAMP): $(SOURCES)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV) || { \
	  rm -rf $(VENV); \
	  echo "make: '$(PYTHON) -m venv' failed; on Debian: apt-get install python3-venv" >&2; \
	  exit 1; }
	rm -rf build
	$(VENV)/bin/python -m pip install --quiet '.[test,lint]'
	rm -rf build
	$(call fast_launcher,$(VENV)/bin/qmail-smtpd-py)
	@touch $@

# pip writes a bare `#!.../python` into scripts; the per-connection launcher runs
# with -IS (no site module and its .pth hooks: about 8% of a cold session).
fast_launcher = sed -i '1{/ -IS$$/!s/$$/ -IS/}' $(1)

# tcpserver comes from Debian's ucspi-tcp-ipv6 (ucspi-tcp plus IPv6); install it when missing and we are root.
tcpserver:
	@command -v tcpserver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ucspi-tcp-ipv6; \
	  else \
	    echo "make: tcpserver not found: install ucspi-tcp-ipv6 or ucspi-tcp (apt-get install ucspi-tcp-ipv6)" >&2; \
	    exit 1; \
	  fi; }

# Serve SMTP on $(HOST):$(PORT); mail lands in $(RUNDIR)/Maildir/new. Try:
#   swaks --server 127.0.0.1:2525 --to user@localhost
RUN_HOME = $(abspath $(RUNDIR))

run: $(STAMP) tcpserver
	mkdir -p $(RUN_HOME)/Maildir
	ln -sfn $(CURDIR)/control $(RUN_HOME)/control
	@echo "qmail-smtpd-py on $(HOST):$(PORT), qmail home $(RUN_HOME), mail into $(RUN_HOME)/Maildir/new"
	cd $(RUN_HOME) && exec env \
	  QMAILHOME=$(RUN_HOME) \
	  QMAILQUEUE=$(BIN)/qmail-queue-maildir \
	  MAILDIR=$(RUN_HOME)/Maildir \
	  tcpserver -v -R -H -l localhost -c 20 $(HOST) $(PORT) $(BIN)/qmail-smtpd-py

# As `make run`, with STARTTLS and SMTP AUTH, in a demo qmail home $(RUNDIR)/demo (never
# the tracked control/): links to the sample control files, a self-signed certificate
# (control/servercert.pem; cert.pem beside it for clients that verify), and a
# checkpassword accepting $(DEMO_USER) with $(DEMO_PASSWORD) and nothing else. AUTH is
# offered after STARTTLS only (FORCETLS=1); mail lands in $(RUNDIR)/demo/Maildir/new.
DEMO_USER ?= demo
DEMO_PASSWORD ?= demo-password
DEMO_HOME = $(RUN_HOME)/demo

# checkpassword's interface: user NUL password NUL on fd 3; on success it runs its
# arguments (here /bin/true), otherwise it exits 1.
define DEMO_CHECKPASSWORD
#!/bin/sh
# make run-demo's checkpassword: accepts $(DEMO_USER) / $(DEMO_PASSWORD), nothing else.
user= password=
{ IFS= read -r user && IFS= read -r password; } <<EOF
$$(tr '\0' '\n' <&3)
EOF
[ "$$user" = '$(DEMO_USER)' ] && [ "$$password" = '$(DEMO_PASSWORD)' ] && exec "$$@"
exit 1
endef
export DEMO_CHECKPASSWORD

# openssl makes the demo certificate; installed like tcpserver when missing.
openssl:
	@command -v openssl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y openssl; \
	  else \
	    echo "make: openssl not found: install it (apt-get install openssl)" >&2; \
	    exit 1; \
	  fi; }

run-demo: $(STAMP) tcpserver openssl
	@mkdir -p $(DEMO_HOME)/control $(DEMO_HOME)/Maildir
	@for f in $(SAMPLES); do ln -sfn $(CURDIR)/$$f $(DEMO_HOME)/$$f; done
	@test -s $(DEMO_HOME)/control/servercert.pem || { \
	  echo "openssl: a self-signed certificate for localhost into $(DEMO_HOME)/control/servercert.pem"; \
	  umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
	    -days 3650 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
	    -keyout $(DEMO_HOME)/key.pem -out $(DEMO_HOME)/cert.pem 2>/dev/null && \
	  cat $(DEMO_HOME)/key.pem $(DEMO_HOME)/cert.pem > $(DEMO_HOME)/control/servercert.pem && \
	  rm -f $(DEMO_HOME)/key.pem; }
	@printf '%s\n' "$$DEMO_CHECKPASSWORD" > $(DEMO_HOME)/checkpassword
	@chmod 700 $(DEMO_HOME)/checkpassword
	@echo "qmail-smtpd-py demo on $(HOST):$(PORT): STARTTLS (self-signed certificate), then AUTH"
	@echo "LOGIN PLAIN as user $(DEMO_USER), password $(DEMO_PASSWORD); mail into $(DEMO_HOME)/Maildir/new"
	@echo "From another terminal:"
	@echo "  swaks --server $(HOST):$(PORT) --tls --auth-user $(DEMO_USER) --auth-password $(DEMO_PASSWORD) --to friend@example.org"
	@echo "Ctrl-C stops it."
	cd $(DEMO_HOME) && exec env \
	  QMAILHOME=$(DEMO_HOME) \
	  QMAILQUEUE=$(BIN)/qmail-queue-maildir \
	  MAILDIR=$(DEMO_HOME)/Maildir \
	  SMTPAUTH= FORCETLS=1 \
	  tcpserver -v -R -H -l localhost -c 20 $(HOST) $(PORT) $(BIN)/qmail-smtpd-py \
	    $(DEMO_HOME)/checkpassword /bin/true

# Both suites always run; make test fails if either does.  The conformance
# suite runs while pytest collects once, with bytecode writing on, so that its
# workers load the rewritten test modules instead of each rewriting them (4-5 s
# of CPU each).
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/python -m pytest
test: $(STAMP)
	@status=0; out=$$(mktemp); \
	{ $(MAKE) --no-print-directory conformance > "$$out" 2>&1; echo $$? >> "$$out"; } & \
	$(PYTEST) -q --collect-only t > /dev/null 2>&1; \
	$(PYTEST) -q -n $(TEST_JOBS) t || status=1; \
	wait; sed '$$d' "$$out"; [ "$$(tail -n 1 "$$out")" = 0 ] || status=1; rm -f "$$out"; \
	exit $$status

pytest: $(STAMP)
	$(PYTEST) -q -n $(TEST_JOBS) t

# ruff (configured in pyproject.toml) over the package, scripts, tests and benches.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Line coverage of the package by the whole suite, the server processes the
# tests start included (coverage's .pth hook starts it in every Python
# process that sees COVERAGE_PROCESS_START).
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	COVERAGE_PROCESS_START=$(CURDIR)/setup.cfg COVERAGE_FILE=$(CURDIR)/.coverage \
	  $(VENV)/bin/python -m coverage run -m pytest -q -n $(TEST_JOBS) t || true
	$(VENV)/bin/python -m coverage combine -q
	$(VENV)/bin/python -m coverage report --include='*/qmail_smtpd_py/core/*'
	$(VENV)/bin/python -m coverage report | tail -1

conformance: $(STAMP)
	@if [ -z "$(CONFORMANCE_AREAS)" ]; then \
	  echo "conformance: all areas"; \
	  $(PYTHON) $(SHARED)/conformance/run -j $(CONFORMANCE_JOBS) -- $(BIN)/qmail-smtpd-py; \
	else \
	  status=0; for area in $(CONFORMANCE_AREAS); do \
	    echo "conformance: $$area"; \
	    $(PYTHON) $(SHARED)/conformance/run -j $(CONFORMANCE_JOBS) -k $$area/ -- $(BIN)/qmail-smtpd-py || status=1; \
	  done; exit $$status; \
	fi

bench: $(STAMP)
	@set -e; for script in bench/[!_]*.py; do \
	  echo "== $$script"; \
	  $(VENV)/bin/python $$script; \
	done

clean:
	rm -rf $(VENV) build *.egg-info $(RUNDIR) .pytest_cache .hypothesis .coverage .coverage.*
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Fuzz the session core in-process for FUZZ_SECONDS (random sessions across plain, spp,
# AUTH, TLS and SMTPEXTFORK configurations); failing inputs land in fuzz/failures/.
FUZZ_SECONDS ?= 1200
fuzz: $(STAMP)
	$(VENV)/bin/python fuzz/fuzz_session.py --seconds $(FUZZ_SECONDS)

# ---------------------------------------------------------------------- install
#
#   make install [PREFIX=/usr/local] [DESTDIR=] [QMAILBIN=/var/qmail/bin] [PYTHON=python3]
#
# Creates a virtualenv at $(PREFIX)/lib/qmail-smtpd-py with $(PYTHON), or with
# $(SYSTEM_PYTHON) when other users could not run $(PYTHON) (the SMTP sessions run as
# qmaild: a Python under a mode-700 home would drop every connection; an existing venv
# made with such a Python is made again), with the package installed
# (non-editable, click and attrs from PyPI or pip's cache, with the dns and redis
# extras for the sample plugins and the metrics extra for serve --metrics), links
# $(PREFIX)/bin/qmail-smtpd-py and $(PREFIX)/bin/qmail-queue-maildir to its scripts,
# installs the man page into $(PREFIX)/share/man/man8 and the sample control files into
# $(PREFIX)/share/qmail-smtpd-py/control (samples only: nothing is written to a qmail
# home). Installing again upgrades in place.
#
# QMAILBIN=/var/qmail/bin also links $(QMAILBIN)/qmail-smtpd-py to the installed
# program, so that run scripts can name it beside qmail's own programs. An existing
# file of that name that is not already this link is never replaced: make stops with
# an error and leaves it alone (remove or rename it yourself first).
#
# DESTDIR is for staging a package: everything goes under $(DESTDIR), the symlinks
# point at the final $(PREFIX) paths. A virtualenv records its own absolute path (in
# pyvenv.cfg and the scripts' #! lines), so the staged venv works only once it sits at
# $(PREFIX)/lib/qmail-smtpd-py on the target; it cannot run from the staging directory.
PREFIX ?= /usr/local
DESTDIR ?=
QMAILBIN ?=
# Used instead of $(PYTHON) when other users (the SMTP user) could not run that one.
SYSTEM_PYTHON ?= /usr/bin/python3
ACCESS := $(CURDIR)/qmail_smtpd_py/access.py
LIBDIR := $(PREFIX)/lib/qmail-smtpd-py
MAN8DIR := $(PREFIX)/share/man/man8
SAMPLEDIR := $(PREFIX)/share/qmail-smtpd-py/control
SAMPLES := $(wildcard control/*)
# The sample qmail-spp plugins: pip installs them into $(LIBDIR)/bin, with the venv's
# python; $(LIBDIR)/plugins/NAME links to each, the path to write in smtpplugins.
PLUGINS := $(notdir $(wildcard plugins/*))

install:
	@if [ -n "$(QMAILBIN)" ]; then \
	  t="$(DESTDIR)$(QMAILBIN)/qmail-smtpd-py"; \
	  if [ -e "$$t" ] || [ -L "$$t" ]; then \
	    l=$$(readlink "$$t" 2>/dev/null || true); \
	    if [ "$$l" != "$(LIBDIR)/bin/qmail-smtpd-py" ] && [ "$$l" != "$(PREFIX)/bin/qmail-smtpd-py" ]; then \
	      echo "make install: $$t exists and is not a link to $(LIBDIR)/bin/qmail-smtpd-py; refusing to replace it (remove or rename it first)" >&2; \
	      exit 1; \
	    fi; \
	  fi; \
	fi
	@# The SMTP user must be able to run the venv's interpreter: a Python that other
	@# users cannot reach (pyenv under root's mode-700 home) would drop every connection.
	@venv="$(DESTDIR)$(LIBDIR)"; clear=; \
	if [ -x "$$venv/bin/python" ]; then \
	  why=$$("$$venv/bin/python" -I $(ACCESS)) && exit 0; \
	  echo "make install: $$venv was made with a Python other users cannot run ($$why); making it again"; \
	  clear=--clear; \
	fi; \
	python="$(PYTHON)"; \
	if ! why=$$($$python -I $(ACCESS) 2>&1); then \
	  if ! syswhy=$$($(SYSTEM_PYTHON) -I $(ACCESS) 2>&1); then \
	    echo "make install: $(PYTHON) will not do ($${why:-cannot be run}), nor $(SYSTEM_PYTHON) ($${syswhy:-cannot be run}); give a Python 3.11+ that other users can run: make install PYTHON=..." >&2; \
	    exit 1; \
	  fi; \
	  echo "make install: $(PYTHON) will not do ($${why:-cannot be run}): the SMTP user could not run the server; using $(SYSTEM_PYTHON) instead"; \
	  python="$(SYSTEM_PYTHON)"; \
	fi; \
	$$python -m venv $$clear "$$venv" || { \
	  echo "make install: '$$python -m venv' failed; on Debian: apt-get install python3-venv" >&2; \
	  exit 1; }
	@# pip always rebuilds a local directory: skip it when the sources are the ones installed.
	@sum=$$(cat $(SOURCES) | sha256sum | cut -c1-64); \
	if [ "$$(cat "$(DESTDIR)$(LIBDIR)/.source-sha256" 2>/dev/null)" = "$$sum" ]; then \
	  echo "make install: the package in $(DESTDIR)$(LIBDIR) is up to date"; \
	else \
	  rm -rf build && \
	  "$(DESTDIR)$(LIBDIR)/bin/python" -m pip install --quiet --disable-pip-version-check "$(CURDIR)[dns,redis,metrics]" && \
	  rm -rf build && echo "$$sum" > "$(DESTDIR)$(LIBDIR)/.source-sha256" || exit 1; \
	fi
	$(call fast_launcher,"$(DESTDIR)$(LIBDIR)/bin/qmail-smtpd-py")
	@# Staged (DESTDIR): the venv only works at its final place, nothing to ask here.
	@[ -n "$(DESTDIR)" ] || why=$$("$(LIBDIR)/bin/python" -I $(ACCESS) --venv) || \
	  echo "make install: warning: $$why: the SMTP user cannot run the server from $(LIBDIR); install under a PREFIX other users can reach" >&2
	install -d "$(DESTDIR)$(PREFIX)/bin" "$(DESTDIR)$(MAN8DIR)" "$(DESTDIR)$(SAMPLEDIR)" \
	  "$(DESTDIR)$(LIBDIR)/plugins"
	for p in $(PLUGINS); do ln -sfn "../bin/$$p" "$(DESTDIR)$(LIBDIR)/plugins/$$p"; done
	for s in connection mail rcpt; do \
	  ln -sfn "../bin/ratelimit" "$(DESTDIR)$(LIBDIR)/plugins/ratelimit-$$s"; done
	ln -sfn "$(LIBDIR)/bin/qmail-smtpd-py" "$(DESTDIR)$(PREFIX)/bin/qmail-smtpd-py"
	ln -sfn "$(LIBDIR)/bin/qmail-queue-maildir" "$(DESTDIR)$(PREFIX)/bin/qmail-queue-maildir"
	install -m 644 man/qmail-smtpd-py.8 "$(DESTDIR)$(MAN8DIR)/qmail-smtpd-py.8"
	install -m 644 $(SAMPLES) "$(DESTDIR)$(SAMPLEDIR)/"
	@if [ -n "$(QMAILBIN)" ]; then \
	  t="$(DESTDIR)$(QMAILBIN)/qmail-smtpd-py"; \
	  if [ -L "$$t" ]; then \
	    echo "$$t: already linked"; \
	  else \
	    install -d "$(DESTDIR)$(QMAILBIN)" && \
	    echo "ln -s $(LIBDIR)/bin/qmail-smtpd-py $$t" && \
	    ln -s "$(LIBDIR)/bin/qmail-smtpd-py" "$$t"; \
	  fi; \
	fi
