//! vmkit-pci-passthrough: a PCI bus and VFIO device passthrough.
//!
//! This crate is a placeholder in the workspace layout: the PCI bus and VFIO devices arrive with
//! the pci-passthrough issue. Nothing here is usable yet.
#![deny(missing_docs)]
