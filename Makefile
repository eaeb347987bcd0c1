# Every target runs inside the project's environment (bin/poso-env builds it on first use).
ENV := bin/poso-env
PYTEST_ARGS ?=
DEMO_HOME ?= poso_home/demo

.PHONY: env demo test test-slow bench-paper lock clean

env:            ## build (or reuse) the environment
	$(ENV) true

demo: env       ## synthetic logs -> daily TFX run -> serve -> gRPC and REST predictions
	bin/poso demo --home $(DEMO_HOME)

# bin/with-mysql starts a throw-away MariaDB on 127.0.0.1 (when the host has mariadb-server) for the
# tests that keep ML Metadata in MySQL; without one they are skipped, with the reason.
test: env       ## the default suite (about 10-18 minutes on 2 cores)
	bin/with-mysql $(ENV) python -m pytest $(PYTEST_ARGS)

test-slow: env  ## the long runs too
	bin/with-mysql $(ENV) python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

bench-paper: env  ## every section of the paper's tables and plots into benchmarks/RESULTS.md (about 2.5 h on 2 cores, 2 models at a time: benchmarks/README.md; PAPER_ARGS=...)
	bin/poso bench paper $(PAPER_ARGS)

bench-paper-%: env  ## one section: bench-paper-a (MovieLens) .. bench-paper-f (headroom on the synthetic presets)
	bin/poso bench paper --sections $* $(PAPER_ARGS)

lock:           ## re-resolve requirements.in into requirements.lock (inside the environment)
	$(ENV) bash -c 'set -e; d=$$(mktemp -d); python -m venv $$d; $$d/bin/pip install -q -r requirements.in; \
	  { sed -n "1,2p" requirements.lock; $$d/bin/pip freeze; } > requirements.lock.new; rm -rf $$d'
	mv requirements.lock.new requirements.lock

clean:          ## remove the demo's and tests' outputs (not the environment)
	rm -rf poso_home .pytest_cache
