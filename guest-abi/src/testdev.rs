//! The DMA test device: a small PCI function that `examples/vfio-user-device.rs` serves over
//! vfio-user and the built-in guest drives through passthrough. Its ID and register layout
//! are made up for vmkit; nothing else uses them.
//!
//! # Configuration space
//! Vendor [`VENDOR_ID`], device [`DEVICE_ID`], class [`CLASS_CODE`]; an MSI-X capability
//! with [`MSIX_VECTORS`] vectors, table at offset 0 of BAR [`MSIX_BAR`] and PBA at
//! [`MSIX_PBA_OFFSET`] in it.
//!
//! # BARs
//! - BAR [`REGISTER_BAR`]: [`REGISTER_BAR_SIZE`] bytes of 32-bit registers, trapped (every
//!   access is a message to the device).
//! - BAR [`MSIX_BAR`]: the MSI-X table and PBA, [`MSIX_BAR_SIZE`] bytes, trapped by the VMM.
//! - BAR [`MEMORY_BAR`]: [`MEMORY_BAR_SIZE`] bytes of device memory that the device offers
//!   for mmap, so the VMM maps it into the guest directly: guest accesses cause no exits.
//!   Its first dword reads [`MEMORY_SIGNATURE`] after reset; the rest reads as zeroes.
//!
//! # Registers (BAR [`REGISTER_BAR`], 32-bit accesses)
//! A DMA runs when the guest writes [`REG_COMMAND`]: [`COMMAND_WRITE_GUEST`] makes the
//! device write [`REG_DMA_LEN`] bytes of its pattern ([`pattern_byte`]) to guest memory at
//! [`REG_DMA_ADDR_LO`]/[`REG_DMA_ADDR_HI`]; [`COMMAND_READ_GUEST`] makes it read as many
//! bytes from there and store their [`checksum`] in [`REG_RESULT_LO`]/[`REG_RESULT_HI`].
//! When the DMA is over, [`REG_COMPLETIONS`] has counted it, [`REG_STATUS`] reads
//! [`STATUS_DONE`] (or [`STATUS_ERROR`] if the range is not all guest memory the device was
//! given, or longer than [`MAX_DMA_LEN`]), and MSI-X vector [`REG_IRQ_VECTOR`] is raised. A
//! command does not clear the status of the previous one: a driver waits for
//! [`REG_COMPLETIONS`] to advance, then reads the status.

/// PCI vendor ID (Red Hat, whose range QEMU's own test devices use).
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device ID, chosen for vmkit.
pub const DEVICE_ID: u16 = 0x10f0;
/// Class code: base class 0xff (unassigned), subclass 0, interface 0.
pub const CLASS_CODE: u32 = 0xff_0000;

/// BAR of the registers.
pub const REGISTER_BAR: u8 = 0;
/// Bytes of the register BAR.
pub const REGISTER_BAR_SIZE: u64 = 0x1000;
/// BAR of the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 2;
/// Bytes of the MSI-X BAR.
pub const MSIX_BAR_SIZE: u64 = 0x2000;
/// Offset of the PBA in the MSI-X BAR.
pub const MSIX_PBA_OFFSET: u32 = 0x1000;
/// MSI-X vectors.
pub const MSIX_VECTORS: u16 = 2;
/// BAR of the device memory that is mapped into the guest.
pub const MEMORY_BAR: u8 = 4;
/// Bytes of the memory BAR.
pub const MEMORY_BAR_SIZE: u64 = 0x1_0000;
/// What the first dword of the memory BAR holds after reset.
pub const MEMORY_SIGNATURE: u32 = 0x4d4b_4d56; // "VMKM"

/// Read-only: [`REGISTER_SIGNATURE`].
pub const REG_ID: u64 = 0x00;
/// What [`REG_ID`] reads.
pub const REGISTER_SIGNATURE: u32 = 0x544b_4d56; // "VMKT"
/// DMA guest address, low 32 bits.
pub const REG_DMA_ADDR_LO: u64 = 0x08;
/// DMA guest address, high 32 bits.
pub const REG_DMA_ADDR_HI: u64 = 0x0c;
/// DMA length in bytes, at most [`MAX_DMA_LEN`].
pub const REG_DMA_LEN: u64 = 0x10;
/// Seed of the pattern a [`COMMAND_WRITE_GUEST`] writes.
pub const REG_PATTERN_SEED: u64 = 0x14;
/// Write-only: starts a DMA ([`COMMAND_WRITE_GUEST`] or [`COMMAND_READ_GUEST`]).
pub const REG_COMMAND: u64 = 0x18;
/// Read-only: [`STATUS_DONE`], [`STATUS_ERROR`], or 0 before the first command.
pub const REG_STATUS: u64 = 0x1c;
/// Read-only: the checksum of the last [`COMMAND_READ_GUEST`], low 32 bits.
pub const REG_RESULT_LO: u64 = 0x20;
/// Read-only: the checksum's high 32 bits.
pub const REG_RESULT_HI: u64 = 0x24;
/// The MSI-X vector raised when a DMA ends (default 0).
pub const REG_IRQ_VECTOR: u64 = 0x28;
/// Read-only: DMAs completed since reset, successful or not.
pub const REG_COMPLETIONS: u64 = 0x2c;

/// Command: write the pattern to guest memory.
pub const COMMAND_WRITE_GUEST: u32 = 1;
/// Command: read guest memory and checksum it.
pub const COMMAND_READ_GUEST: u32 = 2;
/// Status: the last DMA succeeded.
pub const STATUS_DONE: u32 = 1;
/// Status: the last DMA failed (bad range or length, or an unknown command).
pub const STATUS_ERROR: u32 = 2;
/// The longest DMA.
pub const MAX_DMA_LEN: u32 = 1 << 20;

/// Byte `i` of the pattern a [`COMMAND_WRITE_GUEST`] with `seed` writes.
pub const fn pattern_byte(seed: u32, i: u32) -> u8 {
    (seed.wrapping_add(i.wrapping_mul(7)) ^ (i >> 8)) as u8
}

/// The checksum a [`COMMAND_READ_GUEST`] computes (FNV-1a, 64-bit).
pub fn checksum(data: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &byte in data {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
