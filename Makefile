# pg_listsync: `make demo` shows it working, `make test` runs every test, `make bench` measures.
# Each target installs what it needs first (scripts/setup.sh, idempotent).

# The PostgreSQL major to build and test against: 15 (Debian's, the default), 16, 17 or 18.
PG ?= 15
export PG
PG_CONFIG ?= $(shell scripts/pg-config $(PG))
export PG_CONFIG

.PHONY: setup demo test lint bench install install-release package

setup:
	@scripts/setup.sh

# Builds and installs the extension (release) into PostgreSQL $(PG).
install-release: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG)

install: setup
	cargo pgrx install --pg-config $(PG_CONFIG)

demo: install-release
	cargo build --release -p listsync-emulator
	scripts/demo.sh

# Every test, on PostgreSQL $(PG): lint, pure unit tests and in-database tests (cargo pgrx test),
# integration tests against clusters with the worker running, Prism contract tests.
test: setup lint
	scripts/test.sh

# Debian packages (postgresql-NN-pg-listsync) for PostgreSQL 15-18 in target/package/;
# MAJORS="17" builds one.
package: setup
	scripts/package.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --no-default-features --features "pg$(PG) pg_test" -- -D warnings

bench: install-release
	cargo build --release -p listsync-emulator
	scripts/bench.sh
