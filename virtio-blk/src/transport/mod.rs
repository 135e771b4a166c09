//! Transports: how a driver reaches the device's registers.

pub mod mmio;
pub mod pci;
