//! The example VMM's devices: the serial console, the exit port, the PCI root complex,
//! virtio-blk disks and passed-through PCI devices.

pub mod exit_port;
pub mod pci;
pub mod serial;
pub mod vfio;
pub mod virtio_blk;

pub use exit_port::ExitPort;
pub use serial::{SerialConsole, SerialOutput};
pub use vfio::VfioConfig;
pub use virtio_blk::{DiskConfig, DiskTransport};
