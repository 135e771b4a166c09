//! Replaying a fuzz target's committed seed corpus in the normal test suite: each crate's
//! `tests/fuzz_regressions.rs` includes this file and its target's harness by path, so the
//! harness's checks run without nightly or cargo-fuzz.

use std::path::PathBuf;

/// The committed seed corpus of `target` (fuzz/corpus/TARGET/), in name order.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .map(|path| {
            let bytes = std::fs::read(&path).expect("a corpus file");
            (path, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

/// Runs every seed of `target` through `run`.
pub fn replay_seeds(target: &str, run: impl Fn(&[u8])) {
    let inputs = corpus(target);
    assert!(inputs.len() >= 5, "the seed corpus of {target} is missing");
    for (path, bytes) in inputs {
        eprintln!("{}", path.display());
        run(&bytes);
    }
}

/// Runs the empty input and prefixes of every seed of `target` through `run`.
pub fn replay_truncated(target: &str, run: impl Fn(&[u8])) {
    run(&[]);
    for (_, bytes) in corpus(target) {
        for len in [1, 9, 16, bytes.len() / 2] {
            run(bytes.get(..len).unwrap_or(&bytes));
        }
    }
}
