//! Ending the VM through the exit port.

use core::sync::atomic::{AtomicU16, Ordering};

/// The exit device's I/O port: the contract's default until `BootInfo` says otherwise.
static PORT: AtomicU16 = AtomicU16::new(vmkit_guest_abi::EXIT_PORT);

/// Exit statuses of the built-in guest (also documented in README.md and in the VMM's docs,
/// `src/builtin_guest.rs` of the root crate, which list them for users).
pub mod status {
    /// Everything passed.
    pub const SUCCESS: u32 = vmkit_guest_abi::EXIT_SUCCESS;
    /// Not every vCPU checked in before the timeout.
    pub const CHECK_IN_TIMEOUT: u32 = 1;
    /// The compute workload produced a wrong result.
    pub const COMPUTE_MISMATCH: u32 = 2;
    /// The arguments could not be parsed.
    pub const BAD_ARGUMENT: u32 = 3;
    /// A memory workload does not fit in the free memory.
    pub const NO_MEMORY: u32 = 4;
    /// A virtio-blk device could not be set up (probe, features, queues, memory).
    pub const DISK_SETUP: u32 = 5;
    /// A virtio-blk check failed (I/O error, wrong data or ID, timeout).
    pub const DISK_CHECK: u32 = 6;
    /// The I/O benchmark cannot run as asked (no such disk, `randwrite` on a read-only disk,
    /// a disk or queue too small, no TSC frequency).
    pub const IOBENCH_SETUP: u32 = 7;
    /// A benchmark request failed: a status other than OK, a wrong used length, a descriptor
    /// that was not in flight, or no completion within 10 s.
    pub const IOBENCH_IO: u32 = 8;
    /// A DMA test device check failed (a BAR or capability that is not usable, a wrong
    /// register, signature or MSI-X readback, wrong DMA data or checksum, an out-of-RAM DMA
    /// that was not refused, a completion count off, no completion within 2 s, no free
    /// memory for the buffers).
    pub const TESTDEV: u32 = 9;
    /// The boot information block (or the vCPU index) is invalid.
    pub const BAD_BOOT_INFO: u32 = 0xfe;
    /// The guest panicked.
    pub const PANIC: u32 = 0xff;
}

/// Uses `port` as the exit port from now on (the one `BootInfo::exit_port` names).
pub fn set_port(port: u16) {
    PORT.store(port, Ordering::Relaxed);
}

/// Ends the VM with `status`. The write makes the VMM stop every vCPU, but not necessarily
/// before this one runs on, so it then idles.
pub fn exit(status: u32) -> ! {
    // SAFETY: a write to the exit port ends the VM; nothing in the guest depends on continuing.
    unsafe { crate::io::outl(PORT.load(Ordering::Relaxed), status) };
    crate::cpu::idle()
}
