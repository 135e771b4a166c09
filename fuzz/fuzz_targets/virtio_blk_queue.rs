//! libFuzzer target: see `vmkit_fuzz::virtio_blk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkit_fuzz::virtio_blk::run(data));
