# The two commands a new user runs: `make demo` and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.bootstrapped

.PHONY: venv demo test test-fast bench train eval-real device-kit clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/bec demo

# Tests run in TEST_PROCS parallel pytest processes (pytest-xdist; 0 = one process). Most
# scenarios wait on real workers and services, so two processes on two cores finish the
# suite in about 55 % of the time of one. Each has its own database and moto server.
TEST_PROCS ?= 2
XDIST = $(if $(filter 0,$(TEST_PROCS)),,-n $(TEST_PROCS) --dist worksteal)

test: venv
	$(VENV)/bin/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/python -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/python -m benchmarks.ldv1

# The shipped small model, retrained from scratch on generated pages (CPU, under 45 min):
# exactly how bec/ldv1/weights/small.pth was made.
train: venv
	nice -n 10 $(VENV)/bin/python -m bec.tools.train_ldv1

# The line counts on real pages, against their true counts (read by path, never copied here).
REAL_DIR ?= ../shared/real-dev
eval-real: venv
	$(VENV)/bin/python -m bec.tools.evaluate_real $(REAL_DIR) benchmarks/real-dev-counts.csv

# What a bare, offline GPU machine needs for benchmarks/device_check.sh (see that script).
device-kit:
	bash scripts/device-kit.sh

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache
