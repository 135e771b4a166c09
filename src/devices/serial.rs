//! The serial console: vm-superio's 16550A UART on the port-I/O bus, its interrupt on an irqfd.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use vm_superio::{Serial, Trigger};
use vmkit_vcpu::BusDevice;
use vmm_sys_util::eventfd::EventFd;

/// The UART's interrupt: an eventfd that KVM turns into an edge on the guest's IRQ line.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes: kept for the run report and, optionally, copied to
/// standard output as it arrives.
#[derive(Clone, Default)]
pub struct SerialOutput {
    captured: Arc<Mutex<Vec<u8>>>,
    first_byte: Arc<OnceLock<Instant>>,
    echo: bool,
}

impl SerialOutput {
    /// An output that also echoes to standard output when `echo` is set.
    pub fn new(echo: bool) -> Self {
        SerialOutput {
            echo,
            ..Default::default()
        }
    }

    /// Everything the guest wrote so far.
    pub fn captured(&self) -> Vec<u8> {
        self.captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// When the guest wrote its first byte.
    pub fn first_byte_at(&self) -> Option<Instant> {
        self.first_byte.get().copied()
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.first_byte.get_or_init(Instant::now);
        self.captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        if self.echo {
            let mut stdout = io::stdout().lock();
            stdout.write_all(buf)?;
            // Line-buffered so an interactive user sees output as the guest prints it.
            if buf.contains(&b'\n') {
                stdout.flush()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// A 16550A UART on the port-I/O bus (8 registers).
pub struct SerialConsole {
    uart: Mutex<Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOutput>>,
}

impl SerialConsole {
    /// The number of I/O ports the UART occupies.
    pub const PORT_COUNT: u64 = 8;

    /// A UART that raises `interrupt` and writes to `output`.
    pub fn new(interrupt: EventFd, output: SerialOutput) -> Self {
        SerialConsole {
            uart: Mutex::new(Serial::new(IrqTrigger(interrupt), output)),
        }
    }

    /// Puts bytes the user typed into the UART's receive FIFO, raising its interrupt if the
    /// guest enabled it. Returns how many fitted: the FIFO holds 64 bytes, and the caller
    /// retries the rest once the guest has read some (it polls [`Self::input_room`]).
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let room = uart.fifo_capacity();
        let taken = bytes.len().min(room);
        match uart.enqueue_raw_bytes(&bytes[..taken]) {
            Ok(n) => n,
            // The interrupt could not be raised: the bytes are in the FIFO regardless.
            Err(_) => taken,
        }
    }

    /// Free room in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fifo_capacity()
    }
}

impl BusDevice for SerialConsole {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // The UART's registers are bytes; wider accesses read the register and zero-extend.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self
                .uart
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(offset);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // A failed write to the host's stdout must not stop the guest; the bytes are still
            // captured for the report.
            let _ = self
                .uart
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_transmitted_bytes_and_raises_the_interrupt_when_enabled() {
        let output = SerialOutput::new(false);
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = SerialConsole::new(interrupt.try_clone().unwrap(), output.clone());
        // IER: interrupt when the transmitter holding register is empty.
        serial.write(1, &[0x02]);
        serial.write(0, b"h");
        serial.write(0, b"i");
        assert_eq!(output.captured(), b"hi");
        assert!(output.first_byte_at().is_some());
        assert!(interrupt.read().unwrap() >= 1);
        // LSR reports the transmitter empty.
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn typed_input_reaches_the_guest_with_its_interrupt_and_a_full_fifo_pushes_back() {
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = SerialConsole::new(interrupt.try_clone().unwrap(), SerialOutput::new(false));
        // IER: interrupt when received data is available.
        serial.write(1, &[0x01]);
        assert_eq!(serial.enqueue_input(b"ls\n"), 3);
        assert!(interrupt.read().unwrap() >= 1);
        let mut received = Vec::new();
        loop {
            let mut lsr = [0u8];
            serial.read(5, &mut lsr);
            if lsr[0] & 0x01 == 0 {
                break;
            }
            let mut byte = [0u8];
            serial.read(0, &mut byte);
            received.push(byte[0]);
        }
        assert_eq!(received, b"ls\n");
        // The FIFO holds 64 bytes; the rest waits for the guest to read.
        let room = serial.input_room();
        assert_eq!(serial.enqueue_input(&[b'x'; 100]), room);
        assert_eq!(serial.input_room(), 0);
        assert_eq!(serial.enqueue_input(b"y"), 0);
    }
}
