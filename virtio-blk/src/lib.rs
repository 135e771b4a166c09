//! vmkit-virtio-blk: a virtio-blk device model on `virtio-queue`, independent of transport and
//! of disk backend.
//!
//! This crate is a placeholder in the workspace layout: the device, its transports and their
//! tests arrive with the virtio-blk issue. Nothing here is usable yet.
#![deny(missing_docs)]
