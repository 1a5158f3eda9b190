# Benchmarks (bench/README.md): each row is the bridge against a reference measured in the
# same run, with its ratio and PASS/FAIL against the target. Servers are started on 127.0.0.1.
PYTHON ?= .venv/bin/python

.PHONY: bench bench-quick

bench:  ## every benchmark, full size (about 10 minutes); BENCH_ARGS=--write-results for bench/RESULTS.md
	$(PYTHON) -m bench $(BENCH_ARGS)

bench-quick:  ## the same rows, smaller (about 2 minutes)
	$(PYTHON) -m bench --quick $(BENCH_ARGS)

.PHONY: compose-e2e

compose-e2e:  ## the compose stack end to end, images built locally (scripts/compose-e2e; root, Debian)
	./scripts/compose-e2e
