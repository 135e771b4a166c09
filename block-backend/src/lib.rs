//! vmkit-block-backend: disk backends (raw files, host block devices, qcow2), cache modes, and
//! sync and io_uring I/O engines.
//!
//! This crate is a placeholder in the workspace layout: the backends arrive with the
//! block-backend issue. Nothing here is usable yet.
#![deny(missing_docs)]
