//! Replays the `vfio_config` fuzz target's committed seed corpus (fuzz/corpus/vfio_config/)
//! through the same harness libFuzzer runs (fuzz/src/vfio.rs, included by path), so the
//! harness's checks run in the normal suite without nightly or cargo-fuzz. A crash input
//! that `scripts/fuzz.sh` finds goes in that directory (or in a test of its own here).

#[path = "../../fuzz/src/vfio.rs"]
mod harness;

use std::path::PathBuf;

fn corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vfio_config");
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn seed_corpus_replays_cleanly() {
    let inputs = corpus();
    assert!(inputs.len() >= 5, "the seed corpus is missing");
    for (path, bytes) in inputs {
        eprintln!("{}", path.display());
        harness::run(&bytes);
    }
}

#[test]
fn empty_and_truncated_inputs() {
    harness::run(&[]);
    for (_, bytes) in corpus() {
        for len in [1, 9, 16, bytes.len() / 2] {
            harness::run(bytes.get(..len).unwrap_or(&bytes));
        }
    }
}
