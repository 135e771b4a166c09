//! Replays the `virtio_blk_queue` fuzz target's committed seed corpus (fuzz/corpus/virtio_blk_queue/)
//! through the same harness libFuzzer runs (fuzz/src/virtio_blk.rs, included by path), so the
//! harness's checks run in the normal suite without nightly or cargo-fuzz. A crash input
//! that `scripts/fuzz.sh` finds goes in that directory (or in a test of its own here).

#[path = "../../fuzz/src/virtio_blk.rs"]
mod harness;

#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn seed_corpus_replays_cleanly() {
    replay::replay_seeds("virtio_blk_queue", harness::run);
}

#[test]
fn empty_and_truncated_inputs() {
    replay::replay_truncated("virtio_blk_queue", harness::run);
}

/// Found by the fuzzer (3-minute run): `BlockQueue::process_queue` never returns. Queue
/// size 256, EVENT_IDX, descriptor table at 0xfffa, available ring at 0xfffc (its ring
/// runs past the end of the 64 KiB of guest RAM), used ring at 0xfeff (misaligned), all
/// guest memory zero: `pop_and_submit` loops on `enable_notification` returning
/// `Ok(true)` without ever popping a chain. The test gives it 5 s on another thread.
#[test]
fn process_queue_returns_on_an_invalid_queue() {
    let input = [
        0x10, 0x10, 0xff, 0xff, 0xff, 0xff, 0xfa, 0xff, 0xfc, 0xff, 0xff, 0xfe, 0x20,
    ];
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        harness::run(&input);
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("process_queue did not return within 5 s");
}
