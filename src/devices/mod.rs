//! The example VMM's devices: the serial console, the exit port, the PCI root complex and
//! virtio-blk disks.

pub mod exit_port;
pub mod pci;
pub mod serial;
pub mod virtio_blk;

pub use exit_port::ExitPort;
pub use serial::{SerialConsole, SerialOutput};
pub use virtio_blk::{DiskConfig, DiskTransport};
