# godwit: build, demo, tests and benchmarks. See README.md.
CARGO ?= cargo
GODWIT := target/debug/godwit
GODWIT_RELEASE := target/release/godwit

.PHONY: all deps build release demo test lint bench fuzz clean

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

# Runs every fuzz target (fuzz/, cargo-fuzz on nightly) for FUZZ_SECONDS
# each, one at a time, from its corpus in fuzz/corpus/<target>/. New inputs
# go to fuzz/corpus-work/<target>/ (not in git; fold them in with
# `cargo fuzz cmin`), crashes to fuzz/artifacts/. Results go to FUZZING.md
# by hand. `make test` replays the corpora on stable.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = $(shell sed -n 's/^name = "\(.*\)"/\1/p' fuzz/Cargo.toml | grep -v '^godwit')
fuzz:
	cd fuzz && cargo +nightly fuzz build -O
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus-work/$$t; \
		(cd fuzz && cargo +nightly fuzz run -O $$t corpus-work/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -workers=1 \
			-rss_limit_mb=2048 -malloc_limit_mb=64 -timeout=10 -print_final_stats=1) || exit 1; \
	done

clean:
	$(CARGO) clean
