//! The boot contract between a vmkit VMM and a flat 64-bit guest program.
//!
//! vmkit starts a *flat program* (the built-in guest, or any static x86-64 ELF given with
//! `vm run --program FILE`) directly in 64-bit long mode at CPL3, the way kvm-unit-tests starts
//! its tests: no firmware, no boot loader, no kernel. This crate is that contract, shared by the
//! VMM (which writes it) and guest programs (which read it). It is `no_std` and has no
//! dependencies so that any guest can use it.
//!
//! # Entry state
//! Every vCPU starts at the ELF entry point at the same time, in this state:
//!
//! | what | value |
//! |---|---|
//! | mode | 64-bit long mode, CPL3 (`CS` = [`USER_CODE_SELECTOR`], `SS`/`DS`/`ES`/`FS`/`GS` = [`USER_DATA_SELECTOR`]) |
//! | paging | all guest RAM and the 32-bit MMIO hole identity-mapped (virtual = physical), user-accessible and writable, 2 MiB pages |
//! | `RFLAGS` | `IOPL=3` (so `in`/`out` work at CPL3), interrupts disabled |
//! | SSE | enabled (`CR0.MP`, `CR4.OSFXSR`, `CR4.OSXMMEXCPT`); x87 and SSE state reset |
//! | `RDI` | guest-physical address of the [`BootInfo`] block |
//! | `RSI` | this vCPU's index, `0..cpu_count` (vCPU 0 is the boot processor) |
//! | `RSP` | top of this vCPU's own stack, [`STACK_SIZE`] bytes, aligned as after a `call` (`RSP + 8` is 16-byte aligned) |
//!
//! There is no IDT: any exception ends the VM with a triple fault, which the VMM reports as an
//! error. The program takes no interrupts; it polls device state (used rings, registers).
//!
//! # Memory
//! The program is loaded at the physical addresses in its ELF program headers, which must lie in
//! guest RAM at or above [`PROGRAM_MIN_ADDRESS`]. Below that the VMM keeps its boot structures
//! (GDT, TSS, boot information, page tables). The range
//! `[BootInfo::free_memory_start, BootInfo::free_memory_end)` is RAM the program may use freely
//! (for virtqueues, buffers, heaps); the vCPU stacks lie above it.
//!
//! # Ending the VM
//! A write of a 32-bit status code to [`BootInfo::exit_port`] (`out dx, eax`) ends the VM.
//! Status [`EXIT_SUCCESS`] means the program succeeded; the example VMM exits with status 0 then
//! and non-zero otherwise. Byte and word writes are accepted and zero-extended.
//!
//! # Serial console
//! A 16550A UART at [`BootInfo::serial_port`] (COM1, 0x3f8). Writing a byte to its data register
//! sends it; no setup is needed.
#![no_std]
#![deny(missing_docs)]

pub mod testdev;

/// `BootInfo::magic`: "VMKITBI1" in little-endian bytes.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"VMKITBI1");
/// The version of the [`BootInfo`] layout this crate describes. Fields are only ever appended;
/// a program must check `version >= 1` and `size` before reading appended fields.
pub const BOOT_INFO_VERSION: u32 = 1;

/// The guest-physical address where the VMM places the [`BootInfo`] block.
pub const BOOT_INFO_ADDRESS: u64 = 0x3000;
/// Programs are loaded at or above this guest-physical address (1 MiB); below it lie the VMM's
/// boot structures.
pub const PROGRAM_MIN_ADDRESS: u64 = 0x10_0000;
/// Size of each vCPU's stack in bytes.
pub const STACK_SIZE: u64 = 64 * 1024;

/// The I/O port of the serial console (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// The I/O port of the exit device.
pub const EXIT_PORT: u16 = 0xf4;
/// Exit status for success.
pub const EXIT_SUCCESS: u32 = 0;

/// Code segment selector at entry: GDT entry 4, RPL 3, a 64-bit code segment with DPL 3.
pub const USER_CODE_SELECTOR: u16 = (4 << 3) | 3;
/// Stack and data segment selector at entry: GDT entry 3, RPL 3, a data segment with DPL 3.
pub const USER_DATA_SELECTOR: u16 = (3 << 3) | 3;

/// How many entries [`BootInfo::memory_map`] has room for.
pub const MAX_MEMORY_RANGES: usize = 8;
/// How many entries [`BootInfo::devices`] has room for.
pub const MAX_DEVICES: usize = 32;
/// Size of [`BootInfo::args`] in bytes, the terminating NUL included.
pub const ARGS_SIZE: usize = 256;

/// One range of guest RAM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRange {
    /// Guest-physical start address.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

/// What a [`DeviceInfo`] entry describes. Values are stable; new kinds are appended.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// An unused entry.
    None = 0,
    /// A virtio-blk device.
    VirtioBlock = 1,
    /// A PCI host bridge (configuration mechanism #1 at 0xcf8/0xcfc; `address` is its ECAM base).
    PciHostBridge = 2,
}

/// How a device is reached. Values are stable; new transports are appended.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Not applicable.
    None = 0,
    /// virtio-mmio version 2 registers at `address`.
    VirtioMmio = 1,
    /// A PCI function; `address` is its bus/device/function as `bus << 8 | device << 3 | function`.
    Pci = 2,
    /// I/O ports starting at `address`.
    PortIo = 3,
}

/// One device the VMM attached, as the program finds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// A [`DeviceKind`] value.
    pub kind: u32,
    /// A [`Transport`] value.
    pub transport: u32,
    /// Where the device is, in the transport's terms.
    pub address: u64,
    /// Length of the device's register window in bytes (0 where not applicable).
    pub size: u64,
    /// The GSI (interrupt line) the device raises, or `u32::MAX` for none.
    pub irq: u32,
    /// Device-specific flags (for virtio-blk: bit 0 set when the disk is read-only).
    pub flags: u32,
}

/// The boot-information block, at [`BOOT_INFO_ADDRESS`] and in `RDI` at entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`] of the VMM that wrote it.
    pub version: u32,
    /// `size_of::<BootInfo>()` of the VMM that wrote it.
    pub size: u32,
    /// Number of vCPUs, each started at the entry point.
    pub cpu_count: u32,
    /// I/O port of the serial console.
    pub serial_port: u16,
    /// I/O port of the exit device.
    pub exit_port: u16,
    /// Total bytes of guest RAM.
    pub ram_size: u64,
    /// First byte of RAM free for the program (page-aligned, after its image).
    pub free_memory_start: u64,
    /// End (exclusive) of the free RAM range (page-aligned, below the vCPU stacks).
    pub free_memory_end: u64,
    /// Number of valid entries in `memory_map`.
    pub memory_map_count: u32,
    /// Number of valid entries in `devices`.
    pub device_count: u32,
    /// The guest RAM ranges, in ascending order.
    pub memory_map: [MemoryRange; MAX_MEMORY_RANGES],
    /// The attached devices.
    pub devices: [DeviceInfo; MAX_DEVICES],
    /// Arguments for the program, a NUL-terminated string (like a kernel command line).
    pub args: [u8; ARGS_SIZE],
}

impl BootInfo {
    /// An empty block with the header fields filled in.
    pub const fn new() -> Self {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            size: core::mem::size_of::<BootInfo>() as u32,
            cpu_count: 0,
            serial_port: SERIAL_PORT,
            exit_port: EXIT_PORT,
            ram_size: 0,
            free_memory_start: 0,
            free_memory_end: 0,
            memory_map_count: 0,
            device_count: 0,
            memory_map: [MemoryRange { start: 0, size: 0 }; MAX_MEMORY_RANGES],
            devices: [DeviceInfo {
                kind: 0,
                transport: 0,
                address: 0,
                size: 0,
                irq: u32::MAX,
                flags: 0,
            }; MAX_DEVICES],
            args: [0; ARGS_SIZE],
        }
    }

    /// Whether the header identifies a block this crate can read.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC
            && self.version >= 1
            && self.size as usize >= core::mem::size_of::<BootInfo>()
    }

    /// The arguments up to their terminating NUL (all of them if there is none).
    pub fn args(&self) -> &[u8] {
        let end = self.args.iter().position(|&b| b == 0).unwrap_or(ARGS_SIZE);
        &self.args[..end]
    }

    /// The valid entries of the device table.
    pub fn devices(&self) -> &[DeviceInfo] {
        let count = (self.device_count as usize).min(MAX_DEVICES);
        &self.devices[..count]
    }

    /// The valid entries of the memory map.
    pub fn memory_map(&self) -> &[MemoryRange] {
        let count = (self.memory_map_count as usize).min(MAX_MEMORY_RANGES);
        &self.memory_map[..count]
    }
}

impl Default for BootInfo {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        // The layout is an interface to programs built elsewhere: changing it breaks them.
        assert_eq!(core::mem::size_of::<MemoryRange>(), 16);
        assert_eq!(core::mem::size_of::<DeviceInfo>(), 32);
        assert_eq!(core::mem::offset_of!(BootInfo, ram_size), 24);
        assert_eq!(core::mem::offset_of!(BootInfo, memory_map), 56);
        assert_eq!(core::mem::offset_of!(BootInfo, devices), 56 + 16 * 8);
        assert_eq!(
            core::mem::size_of::<BootInfo>(),
            56 + 16 * 8 + 32 * 32 + 256
        );
    }

    #[test]
    fn args_stop_at_nul_and_counts_are_clamped() {
        let mut info = BootInfo::new();
        info.args[..5].copy_from_slice(b"bench");
        assert_eq!(info.args(), b"bench");
        info.device_count = 1000;
        assert_eq!(info.devices().len(), MAX_DEVICES);
        assert!(info.is_valid());
        info.magic = 0;
        assert!(!info.is_valid());
    }
}
