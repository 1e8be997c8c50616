# Developer and CI entry points. `make test` is what .ci/run calls.

PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
APT_PACKAGES := dovecot-imapd dovecot-pop3d curl fetchmail docker-compose

VENV_PYTHON := $(VENV)/bin/python
# Rebuilt when pyproject.toml changes, so new dependencies get installed.
VENV_STAMP := $(VENV)/.installed

.PHONY: test demo bench deps venv clean

test: deps venv
	@status=0; $(VENV_PYTHON) -m pytest -q -rs $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then \
		echo "make test: pytest collected no tests (exit 5); check PYTEST_ARGS" >&2; \
	fi; \
	exit $$status

# Runs the appliance with examples/quickstart.yaml in front of a throwaway demo Dovecot.
demo: deps venv
	$(VENV_PYTHON) -m examples.demo

# Measures the appliance against direct Dovecot, nginx's mail proxy and Dovecot's proxy
# (about 15 minutes; BENCH_ARGS=--quick for a smoke run) and rewrites the results in
# docs/benchmarks.md. Needs root; nginx rows need nginx and libnginx-mod-mail.
BENCH_ARGS ?=
bench: deps venv
	$(VENV_PYTHON) -m pip install --quiet -e '.[test,fast]'
	$(VENV_PYTHON) -m benchmarks.run $(BENCH_ARGS)

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

# Installs the Debian packages that the integration tests run. Installing
# dovecot-core may start a system Dovecot on ports 143 and 110; the tests start
# their own instances on free ports and never use those.
deps:
	@missing=""; \
	for package in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$package 2>/dev/null \
			| grep -q 'install ok installed' || missing="$$missing $$package"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then \
		echo "make deps: missing packages:$$missing (install them as root with apt-get)" >&2; \
		exit 0; \
	fi; \
	echo "make deps: installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update && apt-get install -y --no-install-recommends $$missing

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
