# The two commands of the README: `make run` and `make test`. Every install step lives here.
SHELL := /bin/bash
# Debian's own Python 3.11: the interpreter the Debian package runs under (and, built with
# PGO and LTO, about 1.5x as fast on spoold's work as an unoptimised pyenv build).
PYTHON ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
SPOOL ?= spool
# Every install comes from these, exact versions with their hashes, written by `make lock` from
# pyproject.toml's ranges: requirements.lock is what the Debian package bundles (the
# dependencies, extras docker, ssh and proxmox, pip and setuptools); requirements-dev.lock is
# that, at the same versions, plus the test extra (pytest, ruff, mypy, stubs, pip-tools).
LOCKS := requirements.lock requirements-dev.lock
LOCKED := $(VENV)/.locked
STAMP := $(VENV)/.installed

.PHONY: run test setup job-user lock system-deps lint typecheck unit bench clean deb deb-deps

# The venv holds exactly requirements-dev.lock: it is made anew whenever a lock file changes.
$(LOCKED): $(LOCKS)
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null)
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	touch $@

# spoold itself, over the locked set (setuptools, its build backend, is in it): nothing else is
# fetched. pip check fails when pyproject.toml asks for something the lock lacks.
$(STAMP): $(LOCKED) pyproject.toml
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@$(PY) -m pip check || { echo "pyproject.toml and requirements-dev.lock disagree: run make lock" >&2; exit 1; }
	touch $@

# The default job user (job_user in the config): a checkout run as root runs its jobs as
# spoold-job, as the Debian package does (the package's postinst makes it the same way: its own
# group only, no home, no shell). Made only where missing; nothing to do for other users.
# The job users of the default config's two worker slots (README: Trust): jobs running side by
# side run as two accounts, and cannot reach each other. One group for both.
JOB_USERS = spoold-job spoold-job2
job-user:
	@if [ "$$(id -u)" = 0 ]; then \
	  getent group spoold-job >/dev/null || groupadd --system spoold-job; \
	  for user in $(JOB_USERS); do \
	    getent passwd $$user >/dev/null || useradd --system --gid spoold-job --no-create-home \
	      --home-dir /nonexistent --shell /usr/sbin/nologin --comment "spoold jobs" $$user; \
	  done; \
	fi

setup: $(STAMP) job-user

# Write both lock files from pyproject.toml with the locked pip-tools. Pins that still fit the
# ranges are kept; `make lock UPGRADE=1` moves every package to its newest fitting release,
# `make lock UPGRADE='requests urllib3'` only those. Then `make test`, and commit both files.
# pip and the build backend (build-system.requires) are added on stdin: no dependency asks for
# them, but the venvs install from the lock alone (their lines read "via -r -").
UPGRADE ?=
PIP_COMPILE = CUSTOM_COMPILE_COMMAND='make lock' $(VENV)/bin/pip-compile --quiet --generate-hashes \
  --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
# Only the named packages that lock file $(1) already holds: pip-tools would add the others to it.
upgrade = $(if $(filter 1,$(UPGRADE)),--upgrade,$$(for p in $(UPGRADE); do \
  p=$$(echo "$$p" | tr 'A-Z_.' 'a-z--'); \
  if grep -q "^$$p==" $(1); then echo "--upgrade-package $$p"; fi; done))
lock: $(LOCKED)
	set -o pipefail; $(PY) -c 'import tomllib; print("pip", *tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	  | $(PIP_COMPILE) $(call upgrade,requirements.lock) --extra docker --extra ssh --extra proxmox \
	  -o requirements.lock pyproject.toml -
	$(PIP_COMPILE) $(call upgrade,requirements-dev.lock) --extra docker --extra ssh --extra proxmox \
	  --extra test -c requirements.lock -o requirements-dev.lock pyproject.toml

# Debian packages the test suite drives for real (installed only where missing): rsync, for
# the test that delivers job files the way rsync does.
# rsync: uploads in the intake tests; openssl: checks callback signatures independently;
# docker.io, busybox-static (the test image) and openssh-server: the real servers the docker
# and ssh executors are tested against (the test fixtures start them); chromium and
# chromium-driver: the browser the web page is tested in (headless, through Selenium); gcc and
# libc6-dev: the benchmarks' compiled floor, which a test builds and runs.
system-deps:
	@command -v rsync >/dev/null && command -v openssl >/dev/null && command -v dockerd >/dev/null \
	  && command -v cc >/dev/null && test -f /usr/include/stdio.h \
	  && test -x /bin/busybox && test -x /usr/sbin/sshd \
	  && test -x /usr/bin/chromium && test -x /usr/bin/chromedriver \
	  && command -v sshfs >/dev/null && command -v ip >/dev/null && command -v nsenter >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      rsync openssl docker.io busybox-static openssh-server chromium chromium-driver \
	      sshfs fuse3 iproute2 util-linux gcc libc6-dev >/dev/null)

# Set up, initialise ./spool, drop the example job, run the daemon in the foreground.
run: setup
	$(VENV)/bin/spoold init --spool $(SPOOL)
	@# The example once: a second run would only see it rejected as a duplicate job id.
	$(VENV)/bin/spoold status hello --spool $(SPOOL) >/dev/null 2>&1 || $(VENV)/bin/spoold submit --spool $(SPOOL) examples/hello.yaml
	$(VENV)/bin/spoold run --spool $(SPOOL)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping (executors/ -> spoold.executors),
# so it checks a link tree laid out as the installed package is.
typecheck: setup
	rm -rf build/typecheck && mkdir -p build/typecheck
	cp -as $(CURDIR)/spoold build/typecheck/spoold
	ln -s $(CURDIR)/executors build/typecheck/spoold/executors
	ln -s $(CURDIR)/tests $(CURDIR)/benchmarks build/typecheck/
	cd build/typecheck && $(abspath $(VENV))/bin/mypy --config-file $(CURDIR)/pyproject.toml -p spoold -p tests -p benchmarks

# The package test installs a real /etc/spoold/config.yaml (which any spoold command without
# --config then finds) and adds and removes the spoold-job user: it runs alone, after the rest.
unit: setup
	$(VENV)/bin/pytest -n auto -q --durations=15 --ignore=tests/test_deb.py
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/test_deb.py

test: setup system-deps lint typecheck unit

# The Debian package: dist/spoold_<version>-1_<arch>.deb (see packaging/README.md). Built from a
# copy of the tracked files in build/deb, with packaging/debian as its debian/ directory.
DEB_VERSION := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' packaging/debian/changelog)
DEB_SRC := build/deb/spoold-$(firstword $(subst -, ,$(DEB_VERSION)))

deb-deps:
	@command -v dpkg-buildpackage >/dev/null && command -v dh >/dev/null && command -v lintian >/dev/null && command -v gcc >/dev/null \
	  && test -x /usr/bin/python3.11 && test -f /usr/include/yaml.h && test -f /usr/include/python3.11/Python.h && /usr/bin/python3.11 -c 'import ensurepip, venv' 2>/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      build-essential dpkg-dev debhelper lintian fakeroot python3.11 python3.11-venv python3.11-dev libyaml-dev >/dev/null)

deb: deb-deps
	rm -rf build/deb && mkdir -p $(DEB_SRC) dist
	git ls-files -z --cached --others --exclude-standard | grep -zv '^packaging/debian/' \
	  | xargs -0 -I{} cp --parents -P {} $(DEB_SRC)/ 2>/dev/null; true
	cp -r packaging/debian $(DEB_SRC)/debian
	cp packaging/systemd/spoold.service $(DEB_SRC)/debian/spoold.service
	cd $(DEB_SRC) && dpkg-buildpackage -us -uc -b --no-sign >../build.log 2>&1 \
	  || (tail -40 ../build.log; exit 1)
	rm -f dist/spoold_*.deb
	cp build/deb/spoold_$(DEB_VERSION)_*.deb dist/
	set -o pipefail; lintian --tag-display-limit 0 build/deb/spoold_$(DEB_VERSION)_*.changes | tee build/deb/lintian.txt
	@ls dist/spoold_*.deb

bench: setup
	$(PY) benchmarks/bench_spool.py

clean:
	rm -rf build dist $(VENV) .pytest_cache .mypy_cache .ruff_cache
