//! Fuzzing harnesses for vmkit, one module per libFuzzer target. The regression tests of
//! the crates replay crash inputs through the same modules (included by path), so a crash
//! found here is reproduced by `cargo test` without libFuzzer.
#![deny(missing_docs)]

pub mod qcow2;
pub mod vfio;
pub mod virtio_blk;
