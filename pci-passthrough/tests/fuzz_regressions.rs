//! Replays the `vfio_config` fuzz target's committed seed corpus (fuzz/corpus/vfio_config/)
//! through the same harness libFuzzer runs (fuzz/src/vfio.rs, included by path), so the
//! harness's checks run in the normal suite without nightly or cargo-fuzz. A crash input
//! that `scripts/fuzz.sh` finds goes in that directory (or in a test of its own here).

#[path = "../../fuzz/src/vfio.rs"]
mod harness;

#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn seed_corpus_replays_cleanly() {
    replay::replay_seeds("vfio_config", harness::run);
}

#[test]
fn empty_and_truncated_inputs() {
    replay::replay_truncated("vfio_config", harness::run);
}
