//! libFuzzer target: see `vmkit_fuzz::qcow2`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkit_fuzz::qcow2::run(data));
