# The two commands a new user runs: `make demo` and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.bootstrapped

.PHONY: venv demo test test-fast bench device-kit clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/bec demo

test: venv
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/python -m benchmarks.ldv1

# What a bare, offline GPU machine needs for benchmarks/device_check.sh (see that script).
device-kit:
	bash scripts/device-kit.sh

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache
