//! The exit port: a guest writes its exit status here to end the VM (see `vmkit-guest-abi`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

use vmkit_vcpu::{BusDevice, VmControl};

/// The exit device. Byte, word and doubleword writes are zero-extended to the status.
#[derive(Default)]
pub struct ExitPort {
    status: AtomicU32,
    written: AtomicBool,
    control: OnceLock<VmControl>,
}

impl ExitPort {
    /// The number of I/O ports the device occupies.
    pub const PORT_COUNT: u64 = 4;

    /// An exit port not yet connected to a VM.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects the device to the VM it stops. Later calls are ignored.
    pub fn connect(&self, control: VmControl) {
        let _ = self.control.set(control);
    }

    /// The status the guest wrote, if it wrote one.
    pub fn status(&self) -> Option<u32> {
        self.written
            .load(Ordering::Acquire)
            .then(|| self.status.load(Ordering::Relaxed))
    }
}

impl BusDevice for ExitPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        // Only a write at the port itself counts; the first status written wins.
        if offset != 0 || self.written.load(Ordering::Acquire) {
            return;
        }
        let mut bytes = [0u8; 4];
        let len = data.len().min(4);
        bytes[..len].copy_from_slice(&data[..len]);
        self.status
            .store(u32::from_le_bytes(bytes), Ordering::Relaxed);
        self.written.store(true, Ordering::Release);
        if let Some(control) = self.control.get() {
            control.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_status_zero_extended() {
        let port = ExitPort::new();
        assert_eq!(port.status(), None);
        port.write(0, &[0x34, 0x12]);
        port.write(0, &[9]);
        assert_eq!(port.status(), Some(0x1234));
    }

    #[test]
    fn ignores_writes_to_other_offsets() {
        let port = ExitPort::new();
        port.write(1, &[1]);
        assert_eq!(port.status(), None);
    }
}
