//! The exit port: a guest writes its exit status here to end the VM (see `vmkit-guest-abi`).

use std::sync::Mutex;

use vmkit_vcpu::{BusDevice, VmControl};

/// The exit device. Byte, word and doubleword writes are zero-extended to the status.
#[derive(Default)]
pub struct ExitPort {
    // One lock for both, because the guest may write its status before the VMM connects the
    // device: whichever of `write` and `connect` comes second must see the other and stop the
    // VM, which two independent atomics cannot promise.
    state: Mutex<ExitState>,
}

#[derive(Default)]
struct ExitState {
    status: Option<u32>,
    control: Option<VmControl>,
}

impl ExitPort {
    /// The number of I/O ports the device occupies.
    pub const PORT_COUNT: u64 = 4;

    /// An exit port not yet connected to a VM.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ExitState> {
        // The critical sections only assign plain values, so a poisoned lock holds a consistent
        // state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects the device to the VM it stops; stops it at once if the guest has already
    /// written its status (its vCPUs start before this can be called). Later calls are ignored.
    pub fn connect(&self, control: VmControl) {
        let mut state = self.state();
        if state.control.is_some() {
            return;
        }
        if state.status.is_some() {
            control.stop();
        }
        state.control = Some(control);
    }

    /// The status the guest wrote, if it wrote one.
    pub fn status(&self) -> Option<u32> {
        self.state().status
    }
}

impl BusDevice for ExitPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        // Only a write at the port itself counts; the first status written wins.
        if offset != 0 {
            return;
        }
        let mut state = self.state();
        if state.status.is_some() {
            return;
        }
        let mut bytes = [0u8; 4];
        let len = data.len().min(4);
        bytes[..len].copy_from_slice(&data[..len]);
        state.status = Some(u32::from_le_bytes(bytes));
        if let Some(control) = &state.control {
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

    /// A VM with no vCPUs: enough for a real `VmControl`, and needs no /dev/kvm.
    fn control() -> (vmkit_vcpu::RunningVm, VmControl) {
        let vm = vmkit_vcpu::RunningVm::start(Vec::new(), Default::default()).unwrap();
        let control = vm.control();
        (vm, control)
    }

    #[test]
    fn a_status_written_before_connecting_stops_the_vm_on_connect() {
        let port = ExitPort::new();
        port.write(0, &[3]);
        let (_vm, control) = control();
        assert!(!control.is_stopping());
        port.connect(control.clone());
        assert!(control.is_stopping());
        assert_eq!(port.status(), Some(3));
    }

    #[test]
    fn a_status_written_after_connecting_stops_the_vm() {
        let port = ExitPort::new();
        let (_vm, control) = control();
        port.connect(control.clone());
        assert!(!control.is_stopping());
        port.write(0, &[0]);
        assert!(control.is_stopping());
    }
}
