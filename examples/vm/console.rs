//! Typing into the guest's serial console: standard input goes to the UART's receive FIFO,
//! with the terminal in raw mode (when it is a terminal) so that keys reach the guest as they
//! are typed and the guest, not the terminal, echoes them.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use vmkit::devices::SerialConsole;
use vmkit::Vmm;

/// The terminal's settings before raw mode, restored when dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts standard input in raw mode if it is a terminal; `None` if it is not (a pipe, a
    /// file, /dev/null: then nothing needs restoring).
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data, filled in by tcgetattr before it is used.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a valid termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep the terminal turning "\n" into "\r\n" on output, as the guest expects.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: a valid descriptor and a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// Forwards standard input to the VM's serial console on an I/O thread of its own, until
/// standard input ends. Bytes wait while the guest's receive FIFO is full. The thread is not
/// joined: it may be blocked reading the terminal when the VM ends, and ends with the process.
pub fn forward_stdin(vmm: &Vmm) {
    let console: Arc<SerialConsole> = vmm.console();
    let spawned = vmm.spawn_io_thread(
        "console-input",
        Box::new(move || {
            let mut buffer = [0u8; 64];
            let mut stdin = std::io::stdin().lock();
            while let Ok(n) = stdin.read(&mut buffer) {
                if n == 0 {
                    return;
                }
                let mut rest = &buffer[..n];
                while !rest.is_empty() {
                    let taken = console.enqueue_input(rest);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }),
    );
    if let Err(e) = spawned {
        eprintln!("vm: no console input: {e}");
    }
}
