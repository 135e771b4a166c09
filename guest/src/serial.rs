//! The serial console: bytes written to the UART's data register reach the VMM's console (the
//! contract needs no UART setup). Every write is a VM exit, so output is for reports, not bulk.

use core::fmt;
use core::sync::atomic::{AtomicU16, Ordering};

use crate::sync::{SpinLock, SpinLockGuard};

/// The UART's I/O port: the contract's COM1 until `BootInfo` says otherwise.
static PORT: AtomicU16 = AtomicU16::new(vmkit_guest_abi::SERIAL_PORT);

/// Serializes whole lines, so that lines printed by different vCPUs do not interleave.
static CONSOLE: SpinLock<Serial> = SpinLock::new(Serial);

/// Writer for the serial console. It has no state: the lock around it orders output.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let port = PORT.load(Ordering::Relaxed);
        for &byte in s.as_bytes() {
            // SAFETY: writing the UART's data register only sends the byte.
            unsafe { crate::io::outb(port, byte) };
        }
        Ok(())
    }
}

/// Uses `port` for the console from now on (the one `BootInfo::serial_port` names).
pub fn set_port(port: u16) {
    PORT.store(port, Ordering::Relaxed);
}

/// Locks the console, for output that spans several writes; lines are ended with `'\n'`.
pub fn lock() -> SpinLockGuard<'static, Serial> {
    CONSOLE.lock()
}

/// Prints `args` and a newline as one unit. Used by [`println!`](crate::println).
pub fn print_line(args: fmt::Arguments<'_>) {
    use fmt::Write;
    let mut console = lock();
    // Serial::write_str cannot fail; a formatting impl's error leaves a truncated line, which
    // is the most that could be done anyway.
    let _ = console.write_fmt(args);
    let _ = console.write_str("\n");
}

/// A console writer for the panic handler. It waits a bounded time for the lock, because the
/// panic may have happened while this vCPU (or a stuck one) held it; after that it writes
/// unlocked, since a garbled line beats a silent hang.
pub fn panic_writer() -> impl fmt::Write {
    enum Writer {
        Locked(SpinLockGuard<'static, Serial>),
        Unlocked(Serial),
    }
    impl fmt::Write for Writer {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            match self {
                Writer::Locked(guard) => guard.write_str(s),
                Writer::Unlocked(serial) => serial.write_str(s),
            }
        }
    }
    match CONSOLE.lock_for(crate::cpu::ticks_for_seconds(1)) {
        Some(guard) => Writer::Locked(guard),
        None => Writer::Unlocked(Serial),
    }
}

/// Prints a formatted line on the serial console, atomically with respect to other vCPUs.
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::print_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::serial::print_line(format_args!($($arg)*))
    };
}
