//! A minimal i8042 keyboard controller, there so that a guest can reset the machine through it.
//!
//! Linux reboots (`reboot=k`, and as one of its default methods) by writing 0xfe, "pulse the
//! reset line", to the controller's command port 0x64. This device ends the VM when that
//! happens and records why. It has no keyboard: like Firecracker's, reads return 0 (status: no
//! data, input buffer empty, so nothing waits on it forever), and other commands and data are
//! ignored. Linux's i8042 driver then gives up on the controller after one command times out
//! ("Can't read CTR while initializing i8042"), which costs a fraction of a second at boot;
//! `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd` on the command line, or no i8042 driver,
//! avoids even that.

use std::sync::Mutex;

use vmkit_vcpu::{BusDevice, VmControl};

/// The offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;

/// The i8042 device, for ports [`I8042::BASE_PORT`]..+[`I8042::PORT_COUNT`].
#[derive(Default)]
pub struct I8042 {
    // One lock for both, as in the exit port: the guest may reset before the VMM connects the
    // device (its vCPUs start first), and whichever of `write` and `connect` comes second must
    // see the other and stop the VM, which two independent atomics cannot promise.
    state: Mutex<ResetState>,
}

#[derive(Default)]
struct ResetState {
    reset: bool,
    control: Option<VmControl>,
}

impl I8042 {
    /// The data port; the device covers it through the command/status port 0x64.
    pub const BASE_PORT: u16 = 0x60;
    /// The number of I/O ports the device occupies: 0x60 to 0x64. (0x61, the PC speaker and
    /// NMI status port, is KVM's in-kernel PIT's when there is one; otherwise it reads 0 here.)
    pub const PORT_COUNT: u64 = 5;
    /// How the VM ended, for the report, when the guest reset it through this device.
    pub const RESET_REASON: &'static str = "reset requested by the guest (i8042)";

    /// A controller not yet connected to a VM.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ResetState> {
        // The critical sections only assign plain values, so a poisoned lock holds a consistent
        // state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects the device to the VM a reset stops; stops it at once if the guest has already
    /// asked for a reset (its vCPUs start before this can be called). Later calls are ignored.
    pub fn connect(&self, control: VmControl) {
        let mut state = self.state();
        if state.control.is_some() {
            return;
        }
        if state.reset {
            control.stop();
        }
        state.control = Some(control);
    }

    /// Whether the guest asked for a reset.
    pub fn reset_requested(&self) -> bool {
        self.state().reset
    }

    /// [`Self::RESET_REASON`] if the guest asked for a reset.
    pub fn end_reason(&self) -> Option<&'static str> {
        self.reset_requested().then_some(Self::RESET_REASON)
    }
}

/// Whether a command pulses the reset line: commands 0xf0-0xff pulse the output lines whose bit
/// is clear in the low nibble, and line 0 is the CPU reset (0xfe pulses it alone).
fn pulses_reset(command: u8) -> bool {
    command & 0xf0 == 0xf0 && command & 1 == 0
}

impl BusDevice for I8042 {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Status 0: no byte to read, ready for a command. Data 0.
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset != COMMAND_OFFSET || !data.first().copied().is_some_and(pulses_reset) {
            return;
        }
        let mut state = self.state();
        if state.reset {
            return;
        }
        state.reset = true;
        if let Some(control) = &state.control {
            control.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with no vCPUs: enough for a real `VmControl`, and needs no /dev/kvm.
    fn control() -> (vmkit_vcpu::RunningVm, VmControl) {
        let vm = vmkit_vcpu::RunningVm::start(Vec::new(), Default::default()).unwrap();
        let control = vm.control();
        (vm, control)
    }

    #[test]
    fn reset_after_connecting_stops_the_vm() {
        let i8042 = I8042::new();
        let (_vm, control) = control();
        i8042.connect(control.clone());
        assert!(!control.is_stopping());
        assert_eq!(i8042.end_reason(), None);
        i8042.write(COMMAND_OFFSET, &[0xfe]);
        assert!(control.is_stopping());
        assert!(i8042.reset_requested());
        assert_eq!(
            i8042.end_reason(),
            Some("reset requested by the guest (i8042)")
        );
    }

    #[test]
    fn reset_before_connecting_stops_the_vm_on_connect() {
        let i8042 = I8042::new();
        i8042.write(COMMAND_OFFSET, &[0xfe]);
        let (_vm, control) = control();
        assert!(!control.is_stopping());
        i8042.connect(control.clone());
        assert!(control.is_stopping());
        assert!(i8042.reset_requested());
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let i8042 = I8042::new();
        let (_vm, control) = control();
        i8042.connect(control.clone());
        // Read/write the control byte, self-test, pulse line 1 only (0xfd), no line (0xff).
        for command in [0x20, 0x60, 0xaa, 0xad, 0xd1, 0xfd, 0xff] {
            i8042.write(COMMAND_OFFSET, &[command]);
        }
        // 0xfe to the data port is a keyboard byte, not a controller command.
        i8042.write(0, &[0xfe]);
        i8042.write(COMMAND_OFFSET, &[]);
        assert!(!i8042.reset_requested());
        assert!(!control.is_stopping());
        // 0xf0 pulses all four lines, the reset line among them.
        i8042.write(COMMAND_OFFSET, &[0xf0]);
        assert!(control.is_stopping());
    }

    #[test]
    fn reads_return_no_data_and_an_idle_status() {
        let i8042 = I8042::new();
        let mut status = [0xffu8];
        i8042.read(COMMAND_OFFSET, &mut status);
        // Bit 0 (output buffer full) and bit 1 (input buffer full) clear: Linux neither waits
        // for a byte nor for room to write.
        assert_eq!(status, [0]);
        let mut data = [0xffu8; 2];
        i8042.read(0, &mut data);
        assert_eq!(data, [0, 0]);
    }
}
