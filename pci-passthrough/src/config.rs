//! The type-0 configuration space header (PCI Local Bus 3.0, section 6.1), its BARs and its
//! capability list.
//!
//! [`ConfigSpace`] stores the 256 bytes of conventional configuration space together with a
//! per-byte write mask: a guest write only changes the bits the mask allows, so read-only
//! fields (IDs, class, BAR type bits, capability headers...) stay read-only whatever the
//! offset, width or value. BAR sizing falls out of the masks: the writable bits of a BAR are
//! exactly its address bits, so writing all-ones reads back the size mask. The expansion ROM
//! BAR (0x30) works the same way: its writable bits are its address bits and the enable bit.

use crate::Error;

/// Bytes of conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Bytes of PCI Express (extended) configuration space per function, as ECAM maps it.
pub const EXTENDED_CONFIG_SPACE_SIZE: usize = 4096;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;
/// The BAR index the expansion ROM goes by where BARs are numbered ([`BarRegion::bar`],
/// [`PciDevice::bar_read`], [`PciDevice::bar_moved`]): 6, right after the six BARs, as VFIO
/// numbers its ROM region.
///
/// [`BarRegion::bar`]: crate::BarRegion::bar
/// [`PciDevice::bar_read`]: crate::PciDevice::bar_read
/// [`PciDevice::bar_moved`]: crate::PciDevice::bar_moved
pub const ROM_BAR_INDEX: u8 = 6;
/// Smallest expansion ROM: the ROM BAR's address field starts at bit 11.
pub const MIN_ROM_SIZE: u64 = 0x800;
/// Largest expansion ROM the 32-bit ROM BAR can describe.
pub const MAX_ROM_SIZE: u64 = 1 << 31;
/// The expansion ROM BAR's enable bit (bit 0); the ROM decodes only when it and the command
/// register's memory space bit are both set.
pub const ROM_ENABLE: u32 = 1;
/// The expansion ROM BAR's address field (bits 31:11); bits 10:1 are reserved (read 0).
pub const ROM_ADDRESS_MASK: u32 = 0xffff_f800;
/// Where the capability list starts: right after the type-0 header.
const FIRST_CAPABILITY: usize = 0x40;

/// Register offsets of the type-0 header.
pub mod reg {
    /// `Vendor ID` (u16, RO).
    pub const VENDOR_ID: usize = 0x00;
    /// `Device ID` (u16, RO).
    pub const DEVICE_ID: usize = 0x02;
    /// `Command` (u16).
    pub const COMMAND: usize = 0x04;
    /// `Status` (u16, RO here).
    pub const STATUS: usize = 0x06;
    /// `Revision ID` (u8, RO).
    pub const REVISION_ID: usize = 0x08;
    /// `Programming interface` (u8, RO).
    pub const PROG_IF: usize = 0x09;
    /// `Subclass` (u8, RO).
    pub const SUBCLASS: usize = 0x0a;
    /// `Class code` (u8, RO).
    pub const CLASS: usize = 0x0b;
    /// `Cache line size` (u8, RW).
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    /// `Header type` (u8, RO).
    pub const HEADER_TYPE: usize = 0x0e;
    /// `BAR0`; BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: usize = 0x10;
    /// `Subsystem vendor ID` (u16, RO).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// `Subsystem ID` (u16, RO).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// `Expansion ROM base address` (u32: address bits 31:11, enable bit 0; reads 0 without
    /// a ROM).
    pub const ROM: usize = 0x30;
    /// `Capabilities pointer` (u8, RO).
    pub const CAPABILITIES: usize = 0x34;
    /// `Interrupt line` (u8, RW: firmware's scratch byte).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// `Interrupt pin` (u8, RO).
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Bits of the command register.
pub mod command {
    /// I/O space decoding.
    pub const IO: u16 = 1 << 0;
    /// Memory space decoding.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus mastering (DMA, and MSI writes).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// The bits a guest may change.
    pub const WRITABLE: u16 = IO | MEMORY | BUS_MASTER | PARITY | SERR | INTX_DISABLE;
}

/// The status register's "capabilities list" bit.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// 32-bit memory space.
    Memory32,
    /// 64-bit memory space: the BAR and the next one form one address.
    Memory64,
    /// I/O port space.
    Io,
}

impl BarKind {
    /// Whether the BAR decodes memory (rather than I/O ports).
    pub fn is_memory(self) -> bool {
        self != BarKind::Io
    }
}

/// One BAR as the device declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBar {
    /// BAR register index (0-5; a 64-bit BAR also uses `index + 1`).
    pub index: u8,
    /// Address space and width.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 16 for memory and 4 for I/O.
    pub size: u64,
    /// Prefetchable (memory BARs only: reads have no side effects).
    pub prefetchable: bool,
}

impl PciBar {
    /// The low dword's read-only type bits.
    fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Memory32 => u32::from(self.prefetchable) << 3,
            BarKind::Memory64 => 0x4 | u32::from(self.prefetchable) << 3,
        }
    }

    /// The writable address bits, as one 64-bit mask (high half used by 64-bit BARs only).
    fn address_mask(&self) -> u64 {
        let low_flags = if self.kind == BarKind::Io { 0x3 } else { 0xf };
        let mask = !(self.size - 1) & !low_flags;
        if self.kind == BarKind::Memory64 {
            mask
        } else {
            mask & 0xffff_ffff
        }
    }
}

/// Whether `size` can be an expansion ROM's: a power of two from [`MIN_ROM_SIZE`] to
/// [`MAX_ROM_SIZE`].
pub fn is_valid_rom_size(size: u64) -> bool {
    size.is_power_of_two() && (MIN_ROM_SIZE..=MAX_ROM_SIZE).contains(&size)
}

/// The writable bits of the expansion ROM BAR of a ROM of `size` bytes (valid, see
/// [`is_valid_rom_size`]): the address bits at or above the size, and the enable bit.
/// Sizing (writing all-ones) reads them back.
pub fn rom_register_mask(size: u64) -> u32 {
    // A size past 32 bits would leave no address bits: clamp so that nothing overflows.
    let size = size.clamp(MIN_ROM_SIZE, MAX_ROM_SIZE);
    (!(size - 1) as u32 & ROM_ADDRESS_MASK) | ROM_ENABLE
}

/// Where an expansion ROM of `size` bytes whose BAR holds `register` decodes: its address,
/// if the register's enable bit and the memory space bit of `command` are both set (PCI
/// Local Bus 3.0, section 6.2.5.2), and `None` otherwise.
pub fn rom_decode_address(register: u32, command: u16, size: u64) -> Option<u64> {
    let enabled = register & ROM_ENABLE != 0 && command & command::MEMORY != 0;
    (enabled && is_valid_rom_size(size))
        .then(|| u64::from(register & rom_register_mask(size) & ROM_ADDRESS_MASK))
}

/// The identity of a function: what its type-0 header says about it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Base class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin (0: none, 1-4: INTA#-INTD#).
    pub interrupt_pin: u8,
    /// Whether this is function 0 of a multi-function device (header type bit 7).
    pub multi_function: bool,
}

/// A type-0 configuration space with write masks, BARs and a capability list.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    data: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: Vec<PciBar>,
    /// Size of the expansion ROM, if there is one.
    rom: Option<u64>,
    /// Offset of the last capability, whose `next` pointer the next one goes into.
    last_capability: Option<usize>,
    /// First free byte of the capability area.
    next_capability: usize,
}

impl ConfigSpace {
    /// A header with `header`'s identity, no BARs and no capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut space = ConfigSpace {
            data: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: Vec::new(),
            rom: None,
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        space.set_u16(reg::VENDOR_ID, header.vendor_id);
        space.set_u16(reg::DEVICE_ID, header.device_id);
        space.set_u8(reg::REVISION_ID, header.revision_id);
        space.set_u8(reg::PROG_IF, header.prog_if);
        space.set_u8(reg::SUBCLASS, header.subclass);
        space.set_u8(reg::CLASS, header.class);
        space.set_u8(
            reg::HEADER_TYPE,
            if header.multi_function { 0x80 } else { 0 },
        );
        space.set_u16(reg::SUBSYSTEM_VENDOR_ID, header.subsystem_vendor_id);
        space.set_u16(reg::SUBSYSTEM_ID, header.subsystem_id);
        space.set_u8(reg::INTERRUPT_PIN, header.interrupt_pin);
        space.set_mask(reg::COMMAND, &command::WRITABLE.to_le_bytes());
        space.set_mask(reg::CACHE_LINE_SIZE, &[0xff]);
        space.set_mask(reg::INTERRUPT_LINE, &[0xff]);
        space
    }

    /// Declares a BAR. Its type bits become read-only and its address bits writable, so
    /// the sizing protocol works; it starts at address 0.
    pub fn add_bar(&mut self, bar: PciBar) -> Result<(), Error> {
        let index = usize::from(bar.index);
        let registers = if bar.kind == BarKind::Memory64 { 2 } else { 1 };
        if index + registers > NUM_BARS {
            return Err(Error::InvalidBar(bar.index));
        }
        let (min, max) = match bar.kind {
            BarKind::Io => (4, 256),
            BarKind::Memory32 => (16, 1 << 31),
            BarKind::Memory64 => (16, 1 << 63),
        };
        if !bar.size.is_power_of_two() || bar.size < min || bar.size > max {
            return Err(Error::InvalidBarSize(bar.size));
        }
        if bar.prefetchable && bar.kind == BarKind::Io {
            return Err(Error::InvalidBar(bar.index));
        }
        let uses = |b: &PciBar| {
            let n = if b.kind == BarKind::Memory64 { 2 } else { 1 };
            usize::from(b.index)..usize::from(b.index) + n
        };
        let new = index..index + registers;
        if self
            .bars
            .iter()
            .any(|b| uses(b).start < new.end && new.start < uses(b).end)
        {
            return Err(Error::BarInUse(bar.index));
        }
        let offset = reg::BAR0 + 4 * index;
        let mask = bar.address_mask();
        self.set_u32(offset, bar.flags());
        self.set_mask(offset, &(mask as u32).to_le_bytes());
        if bar.kind == BarKind::Memory64 {
            self.set_mask(offset + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars.push(bar);
        Ok(())
    }

    /// The declared BARs.
    pub fn bars(&self) -> &[PciBar] {
        &self.bars
    }

    /// The address BAR `index` holds now (type bits cleared), if it is declared.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let bar = self.bars.iter().find(|b| b.index == index)?;
        let offset = reg::BAR0 + 4 * usize::from(index);
        let mut value = u64::from(self.u32_at(offset));
        if bar.kind == BarKind::Memory64 {
            value |= u64::from(self.u32_at(offset + 4)) << 32;
        }
        Some(value & bar.address_mask())
    }

    /// Declares an expansion ROM of `size` bytes (a power of two, at least 2 KiB): the
    /// address bits of the ROM BAR (0x30) at or above the size and its enable bit become
    /// writable, so sizing works; it starts at address 0, disabled. Fails for a bad size or
    /// a second ROM.
    pub fn add_rom(&mut self, size: u64) -> Result<(), Error> {
        if !is_valid_rom_size(size) {
            return Err(Error::InvalidBarSize(size));
        }
        if self.rom.is_some() {
            return Err(Error::BarInUse(ROM_BAR_INDEX));
        }
        self.set_u32(reg::ROM, 0);
        self.set_mask(reg::ROM, &rom_register_mask(size).to_le_bytes());
        self.rom = Some(size);
        Ok(())
    }

    /// Size of the declared expansion ROM, if any.
    pub fn rom_size(&self) -> Option<u64> {
        self.rom
    }

    /// The address the expansion ROM BAR holds now (enable bit cleared), if a ROM is
    /// declared; whether it decodes there is [`ConfigSpace::rom_decode_address`].
    pub fn rom_address(&self) -> Option<u64> {
        self.rom
            .map(|_| u64::from(self.u32_at(reg::ROM) & ROM_ADDRESS_MASK))
    }

    /// Where the expansion ROM decodes now: its address if both its enable bit and the
    /// command register's memory space bit are set, `None` otherwise (or without a ROM).
    pub fn rom_decode_address(&self) -> Option<u64> {
        let size = self.rom?;
        rom_decode_address(self.u32_at(reg::ROM), self.command(), size)
    }

    /// Appends a capability with ID `id` and `body` (the bytes after the ID and next
    /// pointer); `writable` is the guest write mask of the body (missing bytes: read-only).
    /// Returns the offset of the capability's ID byte.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Result<u8, Error> {
        if writable.len() > body.len() {
            return Err(Error::InvalidCapability);
        }
        let offset = self.next_capability;
        let end = offset
            .checked_add(2 + body.len())
            .filter(|&end| end <= CONFIG_SPACE_SIZE)
            .ok_or(Error::CapabilitySpaceFull)?;
        self.set_u8(offset, id);
        self.set_u8(offset + 1, 0);
        self.data
            .get_mut(offset + 2..end)
            .ok_or(Error::CapabilitySpaceFull)?
            .copy_from_slice(body);
        self.set_mask(offset + 2, writable);
        // Capabilities are dword aligned (the low two bits of pointers are reserved).
        let pointer = offset as u8;
        match self.last_capability {
            Some(last) => self.set_u8(last + 1, pointer),
            None => {
                self.set_u8(reg::CAPABILITIES, pointer);
                let status = self.u16_at(reg::STATUS) | STATUS_CAPABILITIES_LIST;
                self.set_u16(reg::STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = end.next_multiple_of(4);
        Ok(pointer)
    }

    /// A guest read of `data.len()` bytes at `offset`; bytes past the conventional space
    /// read 0 (no extended capabilities).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            *out = offset
                .checked_add(i)
                .and_then(|at| self.data.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A guest write of `data` at `offset`: only writable bits change; bytes past the
    /// conventional space are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i) else {
                return;
            };
            if let (Some(byte), Some(&mask)) = (self.data.get_mut(at), self.writable.get(at)) {
                *byte = (*byte & !mask) | (value & mask);
            }
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(reg::COMMAND)
    }

    /// A byte, as the device sees it (0 outside the space).
    pub fn u8_at(&self, offset: usize) -> u8 {
        self.data.get(offset).copied().unwrap_or(0)
    }

    /// A little-endian u16, as the device sees it (0 bytes outside the space).
    pub fn u16_at(&self, offset: usize) -> u16 {
        let mut bytes = [0; 2];
        self.read(offset, &mut bytes);
        u16::from_le_bytes(bytes)
    }

    /// A little-endian u32, as the device sees it (0 bytes outside the space).
    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut bytes = [0; 4];
        self.read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    /// The device sets bytes regardless of the write mask (for device-owned fields such as
    /// a data window it fills before the guest reads it). Bytes outside the space are
    /// dropped.
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            if let Some(byte) = offset.checked_add(i).and_then(|at| self.data.get_mut(at)) {
                *byte = value;
            }
        }
    }

    fn set_u8(&mut self, offset: usize, value: u8) {
        self.set_bytes(offset, &[value]);
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    fn set_mask(&mut self, offset: usize, mask: &[u8]) {
        for (i, &value) in mask.iter().enumerate() {
            if let Some(byte) = offset
                .checked_add(i)
                .and_then(|at| self.writable.get_mut(at))
            {
                *byte = value;
            }
        }
    }
}

/// Walks the capability list of a configuration space read through `read` (one byte at a
/// time): returns `(id, offset)` pairs. Stops at loops and bad pointers, so it also works on
/// a hostile device's list.
pub fn capabilities(mut read: impl FnMut(usize) -> u8) -> Vec<(u8, u8)> {
    let mut found = Vec::new();
    let status = u16::from(read(reg::STATUS)) | u16::from(read(reg::STATUS + 1)) << 8;
    if status & STATUS_CAPABILITIES_LIST == 0 {
        return found;
    }
    let mut pointer = read(reg::CAPABILITIES) & !0x3;
    // At most 48 capabilities fit in 192 bytes: more means a loop.
    while pointer >= FIRST_CAPABILITY as u8 && found.len() < 48 {
        found.push((read(usize::from(pointer)), pointer));
        pointer = read(usize::from(pointer) + 1) & !0x3;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            revision_id: 3,
            class: 0x01,
            subclass: 0x80,
            prog_if: 0x00,
            subsystem_vendor_id: 0xabcd,
            subsystem_id: 0xef01,
            interrupt_pin: 1,
            multi_function: false,
        }
    }

    fn space() -> ConfigSpace {
        let mut space = ConfigSpace::new(&header());
        space
            .add_bar(PciBar {
                index: 0,
                kind: BarKind::Memory64,
                size: 0x4000,
                prefetchable: true,
            })
            .unwrap();
        space
            .add_bar(PciBar {
                index: 2,
                kind: BarKind::Memory32,
                size: 0x1000,
                prefetchable: false,
            })
            .unwrap();
        space
            .add_bar(PciBar {
                index: 3,
                kind: BarKind::Io,
                size: 0x20,
                prefetchable: false,
            })
            .unwrap();
        space.add_capability(0x09, &[4, 1, 2], &[0, 0xff]).unwrap();
        space
    }

    fn r32(space: &ConfigSpace, offset: usize) -> u32 {
        let mut data = [0; 4];
        space.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn w32(space: &mut ConfigSpace, offset: usize, value: u32) {
        space.write(offset, &value.to_le_bytes());
    }

    /// A small xorshift: deterministic "random" values without a dependency.
    fn rng(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn header_fields() {
        let space = space();
        assert_eq!(r32(&space, 0), 0x5678_1234);
        assert_eq!(r32(&space, 8), 0x0180_0003);
        assert_eq!(r32(&space, 0x2c), 0xef01_abcd);
        assert_eq!(space.u8_at(reg::INTERRUPT_PIN), 1);
        assert_ne!(space.u16_at(reg::STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(space.u8_at(reg::CAPABILITIES), 0x40);
    }

    #[test]
    fn every_offset_and_width_keeps_read_only_fields() {
        let mut space = space();
        let before = space.clone();
        let mut seed = 0x1234_5678_9abc_def0;
        for offset in 0..CONFIG_SPACE_SIZE + 8 {
            for width in [1usize, 2, 4] {
                let value = rng(&mut seed).to_le_bytes();
                space.write(offset, &value[..width]);
                let mut out = [0; 4];
                space.read(offset, &mut out[..width]);
            }
        }
        space.write(usize::MAX - 1, &[0xff; 4]);
        let mut out = [0xff; 4];
        space.read(usize::MAX - 1, &mut out);
        assert_eq!(out, [0; 4]);
        for offset in 0..CONFIG_SPACE_SIZE {
            let mask = before.writable[offset];
            assert_eq!(
                space.data[offset] & !mask,
                before.data[offset] & !mask,
                "read-only bits changed at {offset:#x}"
            );
        }
        // Identity, type bits and the capability list survive.
        assert_eq!(r32(&space, 0), 0x5678_1234);
        assert_eq!(r32(&space, 0x10) & 0xf, 0xc);
        assert_eq!(r32(&space, 0x18) & 0xf, 0x0);
        assert_eq!(r32(&space, 0x1c) & 0x3, 0x1);
        assert_eq!(capabilities(|at| space.u8_at(at)), vec![(0x09, 0x40)]);
    }

    #[test]
    fn bar_sizing() {
        let mut space = space();
        // 64-bit prefetchable, 16 KiB.
        w32(&mut space, 0x10, 0xffff_ffff);
        w32(&mut space, 0x14, 0xffff_ffff);
        assert_eq!(r32(&space, 0x10), 0xffff_c00c);
        assert_eq!(r32(&space, 0x14), 0xffff_ffff);
        w32(&mut space, 0x10, 0x1234_5678);
        w32(&mut space, 0x14, 0x1);
        assert_eq!(space.bar_address(0), Some(0x1_1234_4000));
        // 32-bit, 4 KiB.
        w32(&mut space, 0x18, 0xffff_ffff);
        assert_eq!(r32(&space, 0x18), 0xffff_f000);
        // I/O, 32 ports.
        w32(&mut space, 0x1c, 0xffff_ffff);
        assert_eq!(r32(&space, 0x1c), 0xffff_ffe1);
        w32(&mut space, 0x1c, 0xc040);
        assert_eq!(space.bar_address(3), Some(0xc040));
        // Undeclared BARs and the ROM BAR read 0 whatever is written.
        w32(&mut space, 0x20, 0xffff_ffff);
        assert_eq!(r32(&space, 0x20), 0);
        w32(&mut space, reg::ROM, 0xffff_ffff);
        assert_eq!(r32(&space, reg::ROM), 0);
        assert_eq!(space.bar_address(4), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut space = space();
        let bar = |index, kind, size| PciBar {
            index,
            kind,
            size,
            prefetchable: false,
        };
        assert!(space.add_bar(bar(1, BarKind::Memory32, 0x1000)).is_err());
        assert!(space.add_bar(bar(5, BarKind::Memory64, 0x1000)).is_err());
        assert!(space.add_bar(bar(4, BarKind::Memory32, 0x1001)).is_err());
        assert!(space.add_bar(bar(4, BarKind::Memory32, 8)).is_err());
        assert!(space.add_bar(bar(4, BarKind::Io, 512)).is_err());
        assert!(space.add_bar(bar(6, BarKind::Io, 4)).is_err());
        assert!(space.add_bar(bar(4, BarKind::Io, 4)).is_ok());
    }

    #[test]
    fn capability_list() {
        let mut space = ConfigSpace::new(&header());
        assert!(capabilities(|at| space.u8_at(at)).is_empty());
        let a = space.add_capability(0x11, &[0; 10], &[]).unwrap();
        let b = space.add_capability(0x09, &[0; 3], &[]).unwrap();
        let c = space.add_capability(0x05, &[0; 12], &[]).unwrap();
        assert_eq!((a, b, c), (0x40, 0x4c, 0x54));
        assert_eq!(
            capabilities(|at| space.u8_at(at)),
            vec![(0x11, 0x40), (0x09, 0x4c), (0x05, 0x54)]
        );
        // Headers are read-only.
        space.write(0x40, &[0xff, 0xff]);
        assert_eq!(space.u16_at(0x40), 0x4c11);
        // The list ends where the space does.
        while space.add_capability(0x09, &[0; 14], &[]).is_ok() {}
        assert!(matches!(
            space.add_capability(0x09, &[0; 14], &[]),
            Err(Error::CapabilitySpaceFull)
        ));
        assert!(capabilities(|at| space.u8_at(at)).len() > 3);
    }

    #[test]
    fn capability_walk_survives_loops() {
        let mut bytes = [0u8; 256];
        bytes[reg::STATUS] = STATUS_CAPABILITIES_LIST as u8;
        bytes[reg::CAPABILITIES] = 0x40;
        bytes[0x41] = 0x40;
        let found = capabilities(|at| bytes.get(at).copied().unwrap_or(0));
        assert_eq!(found.len(), 48);
    }

    #[test]
    fn rom_bar_sizing_and_enable() {
        let mut space = space();
        assert_eq!(space.rom_size(), None);
        assert_eq!(space.rom_address(), None);
        space.add_rom(0x1_0000).unwrap();
        assert_eq!(space.rom_size(), Some(0x1_0000));
        assert_eq!((r32(&space, reg::ROM), space.rom_address()), (0, Some(0)));
        // Sizing: the address bits of a 64 KiB ROM and the enable bit read back; bits 10:1
        // and the address bits below the size stay 0.
        w32(&mut space, reg::ROM, 0xffff_ffff);
        assert_eq!(r32(&space, reg::ROM), 0xffff_0001);
        w32(&mut space, reg::ROM, 0xffff_fffe);
        assert_eq!(r32(&space, reg::ROM), 0xffff_0000);
        // An address, without and with the enable bit.
        w32(&mut space, reg::ROM, 0xe012_37fe);
        assert_eq!(r32(&space, reg::ROM), 0xe012_0000);
        assert_eq!(space.rom_address(), Some(0xe012_0000));
        assert_eq!(space.rom_decode_address(), None, "ROM enable off");
        w32(&mut space, reg::ROM, 0xe012_0001);
        assert_eq!(space.rom_decode_address(), None, "memory decoding off");
        space.write(reg::COMMAND, &command::MEMORY.to_le_bytes());
        assert_eq!(space.rom_decode_address(), Some(0xe012_0000));
        // The enable bit alone, by a byte write; then memory decoding alone.
        space.write(reg::ROM, &[0]);
        assert_eq!(space.rom_decode_address(), None);
        assert_eq!(space.rom_address(), Some(0xe012_0000));
        space.write(reg::ROM, &[1]);
        assert_eq!(space.rom_decode_address(), Some(0xe012_0000));
        space.write(reg::COMMAND, &[0, 0]);
        assert_eq!(space.rom_decode_address(), None);
        // The smallest ROM implements every address bit.
        let mut small = ConfigSpace::new(&header());
        small.add_rom(MIN_ROM_SIZE).unwrap();
        w32(&mut small, reg::ROM, 0xffff_ffff);
        assert_eq!(r32(&small, reg::ROM), 0xffff_f801);
        // BARs are untouched by ROM writes.
        assert_eq!(r32(&space, 0x10) & 0xf, 0xc);
    }

    #[test]
    fn bad_roms_are_refused() {
        let mut space = space();
        for size in [0, 1, 0x400, 0x7ff, 0x1800, MAX_ROM_SIZE * 2, u64::MAX] {
            assert!(
                matches!(space.add_rom(size), Err(Error::InvalidBarSize(s)) if s == size),
                "{size:#x}"
            );
        }
        assert_eq!(space.rom_size(), None);
        w32(&mut space, reg::ROM, 0xffff_ffff);
        assert_eq!(r32(&space, reg::ROM), 0, "no ROM: the register stays 0");
        space.add_rom(MAX_ROM_SIZE).unwrap();
        assert!(matches!(
            space.add_rom(0x800),
            Err(Error::BarInUse(ROM_BAR_INDEX))
        ));
        assert_eq!(space.rom_size(), Some(MAX_ROM_SIZE));
        w32(&mut space, reg::ROM, 0xffff_ffff);
        assert_eq!(r32(&space, reg::ROM), 0x8000_0001);
    }

    #[test]
    fn rom_bar_survives_hostile_writes_of_any_width() {
        let mut space = space();
        space.add_rom(0x8000).unwrap();
        let mut seed = 0x0fed_cba9_8765_4321;
        // Every width at every offset that touches the ROM BAR, including straddling ones.
        for _ in 0..64 {
            for offset in reg::ROM - 7..reg::ROM + 4 {
                for width in [1usize, 2, 3, 4, 8] {
                    let value = rng(&mut seed).to_le_bytes();
                    space.write(offset, &value[..width]);
                    let register = r32(&space, reg::ROM);
                    assert_eq!(register & !0xffff_8001, 0, "read-only bits: {register:#x}");
                    if let Some(address) = space.rom_address() {
                        assert_eq!(address % 0x8000, 0);
                    }
                }
            }
        }
        // The neighbours keep their read-only fields.
        assert_eq!(r32(&space, 0x2c), 0xef01_abcd);
        assert_eq!(space.u8_at(reg::CAPABILITIES), 0x40);
        // Sizing still answers after all that.
        w32(&mut space, reg::ROM, 0xffff_ffff);
        assert_eq!(r32(&space, reg::ROM), 0xffff_8001);
    }

    #[test]
    fn rom_helpers() {
        assert!(is_valid_rom_size(MIN_ROM_SIZE));
        assert!(!is_valid_rom_size(MIN_ROM_SIZE / 2));
        assert_eq!(rom_register_mask(0x800), 0xffff_f801);
        assert_eq!(rom_register_mask(0x2_0000), 0xfffe_0001);
        // Out-of-range sizes are clamped rather than overflowing.
        assert_eq!(rom_register_mask(0), 0xffff_f801);
        assert_eq!(rom_register_mask(u64::MAX), 0x8000_0001);
        let memory = command::MEMORY;
        assert_eq!(
            rom_decode_address(0xe000_0001, memory, 0x800),
            Some(0xe000_0000)
        );
        // Address bits below the size are not decoded.
        assert_eq!(
            rom_decode_address(0xe000_f801, memory, 0x1_0000),
            Some(0xe000_0000)
        );
        assert_eq!(rom_decode_address(0xe000_0000, memory, 0x800), None);
        assert_eq!(rom_decode_address(0xe000_0001, command::IO, 0x800), None);
        assert_eq!(rom_decode_address(0xe000_0001, memory, 0x801), None);
    }

    #[test]
    fn command_register_mask() {
        let mut space = space();
        space.write(reg::COMMAND, &[0xff, 0xff]);
        assert_eq!(space.command(), command::WRITABLE);
        space.write(reg::STATUS, &[0xff, 0xff]);
        assert_eq!(space.u16_at(reg::STATUS), STATUS_CAPABILITIES_LIST);
    }
}
