# godwit: build, demo, tests and benchmarks. See README.md.
CARGO ?= cargo
GODWIT := target/debug/godwit
GODWIT_RELEASE := target/release/godwit

.PHONY: all deps build release demo test lint bench clean

all: build

# Debian packages the build, the demo and the tests need; installs only what
# is missing and says what (resources/install-deps.sh).
deps:
	resources/install-deps.sh

build:
	$(CARGO) build --workspace --all-targets

release:
	$(CARGO) build --release --workspace

# Boots the test guest with networking on one local host and live-migrates it
# to a second one (network namespaces; needs root).
demo: deps build
	resources/demo.sh $(GODWIT)

# Unit and end-to-end tests: real KVM, real TAP devices in namespaces the
# tests create and remove. Needs root.
test: deps build
	$(CARGO) test --workspace -- --test-threads=2

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Benchmarks; results go to BENCHMARKS.md by hand, with this command.
bench: release
	$(CARGO) run --release -p godwit-tests --bin godwit-bench -- all

clean:
	$(CARGO) clean
