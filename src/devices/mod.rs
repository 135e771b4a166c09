//! The example VMM's devices: the serial console, the exit port, the i8042 reset line, the
//! PCI root complex, virtio-blk disks and passed-through PCI devices.

pub mod exit_port;
pub mod i8042;
pub mod pci;
pub mod serial;
pub mod vfio;
pub mod virtio_blk;

pub use exit_port::ExitPort;
pub use i8042::I8042;
pub use serial::{SerialConsole, SerialOutput};
pub use vfio::VfioConfig;
pub use virtio_blk::{DiskConfig, DiskTransport};
