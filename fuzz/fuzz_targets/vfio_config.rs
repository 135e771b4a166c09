//! libFuzzer target: see `vmkit_fuzz::vfio`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkit_fuzz::vfio::run(data));
