//! Replays the `qcow2_image` fuzz target's committed seed corpus (fuzz/corpus/qcow2_image/)
//! through the same harness libFuzzer runs (fuzz/src/qcow2.rs, included by path), so the
//! harness's checks run in the normal suite without nightly or cargo-fuzz. A crash input
//! that `scripts/fuzz.sh` finds goes in that directory (or in a test of its own here).

#[path = "../../fuzz/src/qcow2.rs"]
mod harness;

use std::path::PathBuf;

#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn seed_corpus_replays_cleanly() {
    replay::replay_seeds("qcow2_image", harness::run);
}

#[test]
fn empty_and_truncated_inputs() {
    replay::replay_truncated("qcow2_image", harness::run);
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
