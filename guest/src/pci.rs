//! PCI configuration space through configuration mechanism #1 (address at 0xCF8, data at
//! 0xCFC-0xCFF), enumeration of bus 0, BAR decoding, the command register and the capability
//! list. Shared by the drivers of PCI functions (virtio-blk, the DMA test device).
//!
//! The VMM programs BAR addresses as firmware would, so BARs are read, never sized or moved.
//! Everything read from a function is treated as untrusted: absent functions read all-ones,
//! and a BAR or capability pointer may hold anything.

use core::arch::asm;
use core::fmt;

use vmkit_guest_abi::MemoryRange;

use crate::io::{inb, inl, outb, outl};

/// The configuration address port.
const CONFIG_ADDRESS: u16 = 0xcf8;
/// The configuration data port (0xCFC-0xCFF: the byte at `offset & 3` is at port 0xCFC + it).
const CONFIG_DATA: u16 = 0xcfc;

/// Configuration-space offsets of the type-0 header.
pub mod reg {
    /// Vendor ID (16 bits), then device ID (16 bits).
    pub const VENDOR_ID: u8 = 0x00;
    /// Command register (16 bits).
    pub const COMMAND: u8 = 0x04;
    /// Status register (16 bits).
    pub const STATUS: u8 = 0x06;
    /// Header type (8 bits); bit 7 marks a multi-function device.
    pub const HEADER_TYPE: u8 = 0x0e;
    /// BAR 0; BAR `n` is at `BAR0 + 4 * n`.
    pub const BAR0: u8 = 0x10;
    /// Capability pointer (8 bits).
    pub const CAPABILITIES: u8 = 0x34;
}

/// Command register: respond to memory-space accesses.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA, MSI-X writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Status register: the capability list is present.
const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Header type: the device has functions 1-7 too.
const HEADER_MULTI_FUNCTION: u8 = 0x80;
/// Capabilities start after the 64-byte header.
const FIRST_CAPABILITY: u8 = 0x40;
/// At most 48 capabilities fit in the 192 bytes after the header: the walk's loop bound.
const MAX_CAPABILITIES: usize = 48;
/// Where the identity map's MMIO part ends: BARs above it are not reachable by a flat program.
const FOUR_GIB: u64 = 1 << 32;

/// A PCI function: bus, device and function number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0-31.
    pub device: u8,
    /// Function number, 0-7.
    pub function: u8,
}

impl fmt::Display for Function {
    /// `BB:DD.F`, as `lspci` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

impl Function {
    /// The configuration address of `offset` (enable bit set, low two bits dropped).
    fn address(self, offset: u8) -> u32 {
        (1 << 31)
            | (u32::from(self.bus) << 16)
            | (u32::from(self.device & 0x1f) << 11)
            | (u32::from(self.function & 0x7) << 8)
            | u32::from(offset & 0xfc)
    }

    /// Reads the configuration dword at `offset` (rounded down to a multiple of 4).
    pub fn read32(self, offset: u8) -> u32 {
        // SAFETY: configuration mechanism #1: selecting an address and reading the data port
        // only reads configuration space (no register a driver reads here has read effects).
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            inl(CONFIG_DATA)
        }
    }

    /// Reads the configuration word at `offset` (rounded down to a multiple of 2).
    pub fn read16(self, offset: u8) -> u16 {
        // SAFETY: as for `read32`; the data port offset keeps the word within the dword.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            inw(CONFIG_DATA + u16::from(offset & 2))
        }
    }

    /// Reads the configuration byte at `offset`.
    pub fn read8(self, offset: u8) -> u8 {
        // SAFETY: as for `read32`.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            inb(CONFIG_DATA + u16::from(offset & 3))
        }
    }

    /// Writes the configuration dword at `offset` (rounded down to a multiple of 4).
    #[allow(dead_code)] // The full set of widths, for drivers to come (BARs, MSI address).
    pub fn write32(self, offset: u8, value: u32) {
        // SAFETY: a configuration write changes only this function's configuration; the
        // driver that calls it owns the function.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            outl(CONFIG_DATA, value);
        }
    }

    /// Writes the configuration word at `offset` (rounded down to a multiple of 2).
    pub fn write16(self, offset: u8, value: u16) {
        // SAFETY: as for `write32`.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            outw(CONFIG_DATA + u16::from(offset & 2), value);
        }
    }

    /// Writes the configuration byte at `offset`.
    #[allow(dead_code)] // As for `write32`.
    pub fn write8(self, offset: u8, value: u8) {
        // SAFETY: as for `write32`.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            outb(CONFIG_DATA + u16::from(offset & 3), value);
        }
    }

    /// The vendor and device IDs, or `None` for an absent function (vendor 0xffff).
    pub fn ids(self) -> Option<(u16, u16)> {
        let id = self.read32(reg::VENDOR_ID);
        let vendor = id as u16;
        (vendor != 0xffff).then_some((vendor, (id >> 16) as u16))
    }

    /// Sets `bits` in the command register (with a 16-bit write, so that the status
    /// register's write-one-to-clear bits are left alone).
    pub fn enable(self, bits: u16) {
        let command = self.read16(reg::COMMAND);
        self.write16(reg::COMMAND, command | bits);
    }

    /// Memory BAR `index` as the VMM programmed it.
    pub fn memory_bar(self, index: u8) -> Result<MemoryBar, BarError> {
        if index > 5 {
            return Err(BarError::NoSuchBar(index));
        }
        let low = self.read32(reg::BAR0 + 4 * index);
        if low & 1 != 0 {
            return Err(BarError::NotMemory(index));
        }
        let high = match (low >> 1) & 0b11 {
            // 32-bit, or (0b01) the legacy below-1-MiB type, also 32 bits wide.
            0b00 | 0b01 => 0,
            0b10 if index < 5 => self.read32(reg::BAR0 + 4 * (index + 1)),
            _ => return Err(BarError::BadType(index)),
        };
        let base = (u64::from(high) << 32) | u64::from(low & !0xf);
        if base == 0 {
            return Err(BarError::Unplaced(index));
        }
        Ok(MemoryBar { index, base })
    }

    /// Whether the status register says the function has a capability list.
    pub fn has_capabilities(self) -> bool {
        self.read16(reg::STATUS) & STATUS_CAPABILITIES != 0
    }

    /// The capabilities in the list, in list order. Empty if the status register says there
    /// is no list; a list that loops or runs into the header ends the walk (after at most
    /// 48 entries, as many as fit).
    pub fn capabilities(self) -> impl Iterator<Item = Capability> {
        let mut pointer = if self.has_capabilities() {
            self.read8(reg::CAPABILITIES) & 0xfc
        } else {
            0
        };
        (0..MAX_CAPABILITIES).map_while(move |_| {
            if pointer < FIRST_CAPABILITY {
                return None;
            }
            let header = self.read16(pointer);
            let capability = Capability {
                offset: pointer,
                id: header as u8,
            };
            pointer = (header >> 8) as u8 & 0xfc;
            Some(capability)
        })
    }

    /// The first capability with ID `id`.
    pub fn find_capability(self, id: u8) -> Option<Capability> {
        self.capabilities().find(|capability| capability.id == id)
    }
}

/// The present functions of bus 0, in device then function order. Functions 1-7 of a device
/// are probed only when function 0 is present and marks itself multi-function.
pub fn bus0_functions() -> impl Iterator<Item = Function> {
    (0..32u8).flat_map(|device| {
        let first = Function {
            bus: 0,
            device,
            function: 0,
        };
        let functions = match first.ids() {
            None => 0,
            Some(_) if first.read8(reg::HEADER_TYPE) & HEADER_MULTI_FUNCTION != 0 => 8,
            Some(_) => 1,
        };
        (0..functions)
            .map(move |function| Function {
                bus: 0,
                device,
                function,
            })
            .filter(|function| function.ids().is_some())
    })
}

/// The functions of bus 0 with vendor `vendor` and device `device`, in order.
pub fn find_functions(vendor: u16, device: u16) -> impl Iterator<Item = Function> {
    bus0_functions().filter(move |function| function.ids() == Some((vendor, device)))
}

/// One entry of a capability list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Its offset in configuration space (at least 0x40, a multiple of 4).
    pub offset: u8,
    /// Its capability ID.
    pub id: u8,
}

/// A memory BAR's guest-physical base, as read from configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBar {
    /// The BAR's index, 0-5.
    pub index: u8,
    /// Its guest-physical base address.
    pub base: u64,
}

impl MemoryBar {
    /// The first `size` bytes of the BAR as a window this program can access: they must lie
    /// below 4 GiB (where the identity map covers the MMIO hole) and outside `ram`, so that a
    /// garbage BAR cannot make the driver write over the program's own memory.
    pub fn window(self, size: u64, ram: &[MemoryRange]) -> Result<BarWindow, BarError> {
        let end = self.base.saturating_add(size);
        if end > FOUR_GIB {
            return Err(BarError::Unreachable(self.index, self.base));
        }
        let in_ram = ram.iter().any(|range| {
            let range_end = range.start.saturating_add(range.size);
            self.base < range_end && range.start < end
        });
        if in_ram {
            return Err(BarError::InRam(self.index, self.base));
        }
        Ok(BarWindow {
            base: self.base,
            size,
        })
    }
}

/// Why a BAR cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarError {
    /// There is no BAR with this index (above 5).
    NoSuchBar(u8),
    /// The BAR is an I/O BAR.
    NotMemory(u8),
    /// The BAR's type bits are reserved, or it is a 64-bit BAR in the last slot.
    BadType(u8),
    /// The BAR's address is 0: it was not placed.
    Unplaced(u8),
    /// The BAR lies above 4 GiB, outside the identity map.
    Unreachable(u8, u64),
    /// The BAR overlaps guest RAM.
    InRam(u8, u64),
}

impl fmt::Display for BarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BarError::NoSuchBar(bar) => write!(f, "there is no BAR {bar}"),
            BarError::NotMemory(bar) => write!(f, "BAR {bar} is not a memory BAR"),
            BarError::BadType(bar) => write!(f, "BAR {bar} has an invalid memory type"),
            BarError::Unplaced(bar) => write!(f, "BAR {bar} is not placed (address 0)"),
            BarError::Unreachable(bar, base) => {
                write!(f, "BAR {bar} at {base:#x} does not fit below 4 GiB")
            }
            BarError::InRam(bar, base) => write!(f, "BAR {bar} at {base:#x} overlaps guest RAM"),
        }
    }
}

/// A checked range of a memory BAR, accessed with single 32-bit `mov`s (a register's width).
/// The asm does not claim `nomem`, so each access is a compiler barrier: buffer writes before
/// a register write that starts a DMA stay before it.
#[derive(Clone, Copy, Debug)]
pub struct BarWindow {
    base: u64,
    size: u64,
}

impl BarWindow {
    /// The window's guest-physical base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The address of the dword at `offset`, if it lies inside the window and is aligned.
    fn dword(&self, offset: u64) -> Option<u64> {
        (offset % 4 == 0 && offset.checked_add(4)? <= self.size).then_some(self.base + offset)
    }

    /// Reads the dword at `offset`; all-ones (what an unclaimed address reads) if `offset` is
    /// outside the window or misaligned.
    pub fn read32(&self, offset: u64) -> u32 {
        let Some(address) = self.dword(offset) else {
            return u32::MAX;
        };
        let value: u32;
        // SAFETY: `address` is an aligned dword of a BAR that `MemoryBar::window` checked to
        // lie below 4 GiB (identity-mapped) and outside RAM, so the access reaches the device
        // (or nothing) and cannot touch the program's memory.
        unsafe {
            asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) address, v = out(reg) value,
                 options(nostack, preserves_flags))
        };
        value
    }

    /// Writes the dword at `offset`; dropped if `offset` is outside the window or misaligned.
    pub fn write32(&self, offset: u64, value: u32) {
        let Some(address) = self.dword(offset) else {
            return;
        };
        // SAFETY: as for `read32`; the driver owns the device behind the window.
        unsafe {
            asm!("mov dword ptr [{a}], {v:e}", a = in(reg) address, v = in(reg) value,
                 options(nostack, preserves_flags))
        };
    }
}

/// Reads a 16-bit value from an I/O port.
///
/// # Safety
/// As for [`crate::io::inb`]: reads can have side effects on devices.
unsafe fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: `in` has no memory operands; the caller vouches for the device effect. Not
    // `nomem`, like the other port accesses (see io.rs).
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") value, options(nostack, preserves_flags)) };
    value
}

/// Writes a 16-bit value to an I/O port.
///
/// # Safety
/// As for [`crate::io::outb`]: writes can make devices act.
unsafe fn outw(port: u16, value: u16) {
    // SAFETY: `out` has no memory operands; the caller vouches for the device effect.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nostack, preserves_flags)) };
}
