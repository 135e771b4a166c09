//! Port I/O. The VMM starts the guest with `IOPL=3`, so `in` and `out` work at CPL3.
//!
//! The asm blocks deliberately do not claim `nomem`: a port write may tell a device to read
//! guest memory (a virtqueue notification, say), so it must act as a compiler barrier that keeps
//! earlier memory writes before it. Port accesses are not reordered with memory by the CPU.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The write must be valid for the device behind `port`: port writes can make devices act
/// (including reading or writing guest memory).
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` has no memory operands; the caller vouches for the device effect.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

/// Writes a 32-bit value to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: `out` has no memory operands; the caller vouches for the device effect.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As for [`outb`]: reads can have side effects on devices too (they clear status bits).
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` has no memory operands; the caller vouches for the device effect.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) };
    value
}

/// Reads a 32-bit value from an I/O port.
///
/// # Safety
/// As for [`inb`].
#[allow(dead_code)] // Used by drivers to come (PCI configuration data at 0xcfc).
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` has no memory operands; the caller vouches for the device effect.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags))
    };
    value
}
