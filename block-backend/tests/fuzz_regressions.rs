//! Replays the `qcow2_image` fuzz target's committed seed corpus (fuzz/corpus/qcow2_image/)
//! through the same harness libFuzzer runs (fuzz/src/qcow2.rs, included by path), so the
//! harness's checks run in the normal suite without nightly or cargo-fuzz. A crash input
//! that `scripts/fuzz.sh` finds goes in that directory (or in a test of its own here).

#[path = "../../fuzz/src/qcow2.rs"]
mod harness;

use std::path::PathBuf;

fn corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qcow2_image");
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

/// Found by the fuzzer in its first 3-minute run: an image whose virtual size (94464) is not
/// a whole number of sectors. The disk offered the partial last sector, and a write there
/// reported success but kept only the bytes below the virtual size. The disk now offers
/// whole sectors only (94208 bytes), as QEMU does, so every write it takes reads back.
#[test]
fn qcow2_write_on_corrupt_image_reads_back() {
    let input = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions/qcow2_image/crash-cbf2fe998c29d9cf829e276efd167b0645488925"),
    )
    .unwrap();
    harness::run(&input);
}
