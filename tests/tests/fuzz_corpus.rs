//! Replays every fuzz target's corpus (`fuzz/corpus/<target>/`) through the
//! target's body on stable Rust: a crash the fuzzer once found, kept there
//! as a regression input, fails `make test` without a nightly toolchain.
//! The bodies are the ones the libFuzzer binaries run (`fuzz/bodies`).

use std::path::{Path, PathBuf};

use godwit_fuzz_bodies::{seeds, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list the corpus {}: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_passes_its_target() {
    for target in TARGETS {
        let files = corpus(target.name);
        assert!(
            !files.is_empty(),
            "the corpus of fuzz target {} is empty; run fuzz/make-seeds.sh",
            target.name
        );
        for (path, bytes) in files {
            let outcome = std::panic::catch_unwind(|| (target.body)(&bytes));
            assert!(
                outcome.is_ok(),
                "fuzz target {} fails on {} (reproduce: cargo fuzz run {} {})",
                target.name,
                path.display(),
                target.name,
                path.display()
            );
        }
    }
}

/// The seeds made with godwit's encoders pass their targets too; with
/// `GODWIT_FUZZ_WRITE_SEEDS=1` they are written to the corpora
/// (`fuzz/make-seeds.sh` does this).
#[test]
fn encoded_seeds_pass_their_targets() {
    let state = std::fs::read(corpus_dir("snapshot_state").join("real-state")).ok();
    // The real state is stored behind the target's form byte.
    let state = state.as_deref().and_then(|s| s.get(1..));
    let write = std::env::var_os("GODWIT_FUZZ_WRITE_SEEDS").is_some();
    for seed in seeds::encoded(state) {
        let target = TARGETS
            .iter()
            .find(|t| t.name == seed.target)
            .unwrap_or_else(|| panic!("seed {} names no target {}", seed.name, seed.target));
        (target.body)(&seed.bytes);
        if write {
            let dir = corpus_dir(seed.target);
            std::fs::create_dir_all(&dir).expect("create the corpus directory");
            std::fs::write(dir.join(&seed.name), &seed.bytes).expect("write a seed");
        }
    }
}
