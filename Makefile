# pg_listsync: `make demo` shows it working, `make test` runs every test, `make bench` measures.
# Each target installs what it needs first (scripts/setup.sh, idempotent).

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
TEST_PGDATA ?= $(CURDIR)/target/test-pgdata

.PHONY: setup demo test lint bench install install-release

setup:
	@scripts/setup.sh

# Builds and installs the extension (release) into the system PostgreSQL 15.
install-release: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG)

install: setup
	cargo pgrx install --pg-config $(PG_CONFIG)

demo: install-release
	cargo build --release -p listsync-emulator
	scripts/demo.sh

# Every test: lint, pure unit tests and in-database tests (cargo pgrx test), integration tests
# against clusters with the worker running, Prism contract tests.
test: setup lint
	scripts/test.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --features "pg15 pg_test" -- -D warnings

bench: install-release
	cargo build --release -p listsync-emulator
	scripts/bench.sh
