//! The example VMM's legacy devices: the serial console and the exit port.

pub mod exit_port;
pub mod serial;

pub use exit_port::ExitPort;
pub use serial::{SerialConsole, SerialOutput};
