//! The root complex: functions by bus/device/function, configuration access through the
//! 0xCF8/0xCFC port pair and through an ECAM window, and BAR placement and tracking.
//!
//! # BARs the guest moves
//!
//! The guest may write any value into a BAR (that is how it sizes and places them). The
//! configuration space always takes the value, as hardware does. After every configuration
//! write the bus recomputes where each BAR decodes: at its address when the command
//! register enables its address space, nowhere otherwise. When that changes it calls the
//! VMM's [`BarMapper`]: `unmap_bar` for the old place, then `map_bar` for the new one.
//! The bus itself refuses (does not map) a BAR that would overlap another function's mapped
//! BAR or wrap around the address space; the VMM's `map_bar` refuses what overlaps RAM or
//! its other devices (its MMIO bus refuses the insert). A refused BAR stays unmapped —
//! guest accesses to it reach nothing — until the guest writes an acceptable address. No
//! guest value panics or maps anything over something else.
//!
//! # Expansion ROMs
//!
//! A function with an expansion ROM says so in [`PciDevice::rom_size`]. The bus places the
//! ROM like a 32-bit memory BAR (after the function's BARs) and programs its address into
//! the ROM BAR at 0x30, disabled. It decodes only when both the ROM BAR's enable bit and the
//! command register's memory space bit are set; it is then mapped, moved and refused
//! exactly like a BAR, as BAR [`ROM_BAR_INDEX`] (6) of kind [`BarKind::Memory32`]. Its
//! [`BarAccess`] is read-only: guest reads reach [`PciDevice::bar_read`] with index 6,
//! guest writes are dropped.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::alloc::{AddressSpace, BarAllocator, BarWindows};
use crate::config::{
    command, is_valid_rom_size, reg, rom_decode_address, BarKind, ConfigSpace, PciBar, PciHeader,
    EXTENDED_CONFIG_SPACE_SIZE, NUM_BARS, ROM_BAR_INDEX,
};
use crate::Error;

/// A function's address: bus, device (0-31) and function (0-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    bus: u8,
    device: u8,
    function: u8,
}

impl PciAddress {
    /// Checks the device and function numbers.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, Error> {
        if device >= 32 || function >= 8 {
            return Err(Error::InvalidAddress { device, function });
        }
        Ok(PciAddress {
            bus,
            device,
            function,
        })
    }

    /// Bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }

    /// Device number.
    pub fn device(&self) -> u8 {
        self.device
    }

    /// Function number.
    pub fn function(&self) -> u8 {
        self.function
    }

    /// The offset of this function's configuration space in an ECAM window.
    pub fn ecam_offset(&self) -> u64 {
        u64::from(self.bus) << 20 | u64::from(self.device) << 15 | u64::from(self.function) << 12
    }

    /// The 0xCF8 address register value for register `register` of this function.
    pub fn cf8_address(&self, register: u8) -> u32 {
        0x8000_0000
            | u32::from(self.bus) << 16
            | u32::from(self.device) << 11
            | u32::from(self.function) << 8
            | u32::from(register & 0xfc)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// A PCI function as the bus sees it. Every method takes guest-controlled offsets and
/// data: implementations must accept any of them without panicking.
pub trait PciDevice: Send + Sync {
    /// Reads `data.len()` bytes of configuration space at `offset` (0-4095).
    fn read_config(&self, offset: u16, data: &mut [u8]);
    /// Writes `data` to configuration space at `offset` (0-4095).
    fn write_config(&self, offset: u16, data: &[u8]);
    /// The BARs the function declares (fixed for its lifetime).
    fn bars(&self) -> Vec<PciBar>;
    /// Size of the function's expansion ROM (a power of two, 2 KiB to 2 GiB), or `None`
    /// (the default) if it has none. Fixed for the function's lifetime: the bus asks once,
    /// in [`PciBus::add_device`]. A function with a ROM implements the ROM BAR at 0x30
    /// ([`ConfigSpace::add_rom`] does) and answers reads of BAR [`ROM_BAR_INDEX`].
    fn rom_size(&self) -> Option<u64> {
        None
    }
    /// A guest read of `data.len()` bytes at `offset` in BAR `bar` ([`ROM_BAR_INDEX`]: the
    /// expansion ROM).
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` in BAR `bar` (never the expansion ROM: the bus
    /// drops writes to it).
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]);
    /// BAR `bar` (or the expansion ROM, [`ROM_BAR_INDEX`]) now decodes at `base` (`None`:
    /// nowhere). Called after the VMM's [`BarMapper`] accepted the change; a passthrough
    /// device remaps here.
    fn bar_moved(&self, bar: u8, base: Option<u64>) {
        let _ = (bar, base);
    }
}

/// Where a BAR (or an expansion ROM) decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    /// BAR index; [`ROM_BAR_INDEX`] (6) for the expansion ROM, which is
    /// [`BarKind::Memory32`] and read-only.
    pub bar: u8,
    /// Address space and width.
    pub kind: BarKind,
    /// First address.
    pub base: u64,
    /// Bytes.
    pub size: u64,
    /// Prefetchable.
    pub prefetchable: bool,
}

impl BarRegion {
    /// Whether this is the expansion ROM (read-only memory: the VMM may map it as such).
    pub fn is_rom(&self) -> bool {
        self.bar == ROM_BAR_INDEX
    }

    fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }

    fn overlaps(&self, other: &BarRegion) -> bool {
        AddressSpace::from(self.kind) == AddressSpace::from(other.kind)
            && match (self.end(), other.end()) {
                (Some(a), Some(b)) => self.base < b && other.base < a,
                _ => true,
            }
    }
}

/// The VMM's side of BAR placement: puts a BAR's [`BarAccess`] on its MMIO or port bus and
/// moves the ioeventfds inside it.
pub trait BarMapper: Send + Sync {
    /// Function `device`'s BAR now decodes at `region`: insert `access` at `region.base`
    /// (and register the ioeventfds the BAR holds). Refuse (return an error) if it overlaps
    /// RAM or another device; the BAR then stays unmapped. Called with the bus locked: do
    /// not call back into the [`PciBus`].
    fn map_bar(
        &self,
        device: PciAddress,
        region: &BarRegion,
        access: BarAccess,
    ) -> Result<(), Error>;
    /// Function `device`'s BAR no longer decodes at `region` (it was mapped there).
    fn unmap_bar(&self, device: PciAddress, region: &BarRegion);
}

/// A mapper that accepts everything and does nothing (for buses whose BARs the VMM does
/// not dispatch, and tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBarMapper;

impl BarMapper for NoBarMapper {
    fn map_bar(
        &self,
        _device: PciAddress,
        _region: &BarRegion,
        _access: BarAccess,
    ) -> Result<(), Error> {
        Ok(())
    }

    fn unmap_bar(&self, _device: PciAddress, _region: &BarRegion) {}
}

/// One BAR of one function as a bus device: what a VMM inserts on its MMIO (or port) bus
/// at the BAR's base. Offsets are relative to the base. The expansion ROM
/// ([`ROM_BAR_INDEX`]) is read-only: writes to it are dropped here.
#[derive(Clone)]
pub struct BarAccess {
    device: Arc<dyn PciDevice>,
    bar: u8,
}

impl BarAccess {
    /// BAR `bar` of `device` ([`ROM_BAR_INDEX`]: its expansion ROM).
    pub fn new(device: Arc<dyn PciDevice>, bar: u8) -> Self {
        BarAccess { device, bar }
    }

    /// A guest read at `offset` from the BAR's base.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.device.bar_read(self.bar, offset, data);
    }

    /// A guest write at `offset` from the BAR's base; dropped for the expansion ROM (ROM is
    /// read-only, and a device model should not have to filter them).
    pub fn write(&self, offset: u64, data: &[u8]) {
        if self.bar != ROM_BAR_INDEX {
            self.device.bar_write(self.bar, offset, data);
        }
    }
}

/// Identity of the host bridge at 00:00.0: Intel's vendor ID with device ID 0x0d57, the
/// virtual host bridge Cloud Hypervisor also reports (no driver binds to it; Linux only
/// needs a class 06/00 function at 00:00.0 to be happy).
pub const HOST_BRIDGE: PciHeader = PciHeader {
    vendor_id: 0x8086,
    device_id: 0x0d57,
    revision_id: 0,
    class: 0x06,
    subclass: 0x00,
    prog_if: 0,
    subsystem_vendor_id: 0,
    subsystem_id: 0,
    interrupt_pin: 0,
    multi_function: false,
};

/// The host bridge function: a bare header, no BARs.
#[derive(Debug)]
pub struct HostBridge {
    config: Mutex<ConfigSpace>,
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: Mutex::new(ConfigSpace::new(&HOST_BRIDGE)),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config(&self, offset: u16, data: &mut [u8]) {
        lock(&self.config).read(usize::from(offset), data);
    }

    fn write_config(&self, offset: u16, data: &[u8]) {
        lock(&self.config).write(usize::from(offset), data);
    }

    fn bars(&self) -> Vec<PciBar> {
        Vec::new()
    }

    fn bar_read(&self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic on another thread must not make the bus unusable: the state stays consistent
    // because every update is a plain store.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

struct Slot {
    device: Arc<dyn PciDevice>,
    /// The BARs, then the expansion ROM if there is one, as a 32-bit memory BAR with index
    /// [`ROM_BAR_INDEX`] (see [`decoded_region`]).
    bars: Vec<PciBar>,
    /// Where each BAR of `bars` is mapped (accepted by the mapper).
    mapped: Vec<Option<BarRegion>>,
}

struct BusState {
    slots: BTreeMap<PciAddress, Slot>,
    allocator: BarAllocator,
}

/// The PCI root complex: a host bridge at 00:00.0 and the functions added to it.
pub struct PciBus {
    state: Mutex<BusState>,
    mapper: Arc<dyn BarMapper>,
}

impl PciBus {
    /// A bus placing BARs in `windows` and telling `mapper` where they decode.
    pub fn new(windows: BarWindows, mapper: Arc<dyn BarMapper>) -> Self {
        let bus = PciBus {
            state: Mutex::new(BusState {
                slots: BTreeMap::new(),
                allocator: BarAllocator::new(windows),
            }),
            mapper,
        };
        let host = PciAddress {
            bus: 0,
            device: 0,
            function: 0,
        };
        lock(&bus.state).slots.insert(
            host,
            Slot {
                device: Arc::new(HostBridge::default()),
                bars: Vec::new(),
                mapped: Vec::new(),
            },
        );
        bus
    }

    /// Adds `device` at `address`, places its BARs and its expansion ROM (naturally
    /// aligned, in the windows; the ROM in the 32-bit window) and programs their addresses,
    /// as firmware would, leaving the ROM disabled. Decoding stays off until the guest sets
    /// the command register (and for the ROM its enable bit); the mapper is called then.
    /// Returns the placed BARs, then the ROM (as BAR [`ROM_BAR_INDEX`]). Fails if a BAR or
    /// the ROM does not fit, or the ROM's size is not a power of two from 2 KiB to 2 GiB.
    pub fn add_device(
        &self,
        address: PciAddress,
        device: Arc<dyn PciDevice>,
    ) -> Result<Vec<BarRegion>, Error> {
        let mut state = lock(&self.state);
        if state.slots.contains_key(&address) {
            return Err(Error::SlotInUse(address));
        }
        let mut bars = device.bars();
        // Only BARs 0-5 have registers; here index 6 means the ROM, so a BAR claiming it
        // (or beyond) would be programmed over the registers after the BARs.
        bars.retain(|bar| {
            let exists = usize::from(bar.index) < NUM_BARS;
            if !exists {
                log::warn!("pci: {address} declares BAR {}; left out", bar.index);
            }
            exists
        });
        if let Some(size) = device.rom_size() {
            if !is_valid_rom_size(size) {
                return Err(Error::InvalidBarSize(size));
            }
            // Placed like a 32-bit BAR (the ROM BAR has no high half), after the BARs so
            // that adding a ROM does not move them.
            bars.push(PciBar {
                index: ROM_BAR_INDEX,
                kind: BarKind::Memory32,
                size,
                prefetchable: false,
            });
        }
        let mut regions = Vec::with_capacity(bars.len());
        for bar in &bars {
            match state.allocator.allocate(bar.kind, bar.size) {
                Ok(base) => regions.push(BarRegion {
                    bar: bar.index,
                    kind: bar.kind,
                    base,
                    size: bar.size,
                    prefetchable: bar.prefetchable,
                }),
                Err(e) => {
                    for region in &regions {
                        state
                            .allocator
                            .free(AddressSpace::from(region.kind), region.base);
                    }
                    return Err(e);
                }
            }
        }
        for region in &regions {
            if region.is_rom() {
                // Address only: the enable bit stays clear until the guest sets it.
                device.write_config(reg::ROM as u16, &(region.base as u32).to_le_bytes());
                continue;
            }
            let offset = reg::BAR0 as u16 + 4 * u16::from(region.bar);
            device.write_config(offset, &(region.base as u32).to_le_bytes());
            if region.kind == BarKind::Memory64 {
                device.write_config(offset + 4, &((region.base >> 32) as u32).to_le_bytes());
            }
        }
        let mapped = vec![None; bars.len()];
        state.slots.insert(
            address,
            Slot {
                device,
                bars,
                mapped,
            },
        );
        Ok(regions)
    }

    /// The function at `address`.
    pub fn device(&self, address: PciAddress) -> Option<Arc<dyn PciDevice>> {
        lock(&self.state)
            .slots
            .get(&address)
            .map(|s| s.device.clone())
    }

    /// Where the BARs (and expansion ROM, as BAR [`ROM_BAR_INDEX`]) of the function at
    /// `address` are mapped now.
    pub fn mapped_bars(&self, address: PciAddress) -> Vec<BarRegion> {
        lock(&self.state)
            .slots
            .get(&address)
            .map(|s| s.mapped.iter().flatten().copied().collect())
            .unwrap_or_default()
    }

    /// A configuration read; an absent function (or an offset past 4 KiB) reads all-ones.
    pub fn read_config(&self, address: PciAddress, offset: u16, data: &mut [u8]) {
        let state = lock(&self.state);
        match state.slots.get(&address) {
            Some(slot) if usize::from(offset) + data.len() <= EXTENDED_CONFIG_SPACE_SIZE => {
                slot.device.read_config(offset, data)
            }
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; ignored for absent functions. Then remaps the function's BARs
    /// if the write moved them or switched decoding (see the module documentation).
    pub fn write_config(&self, address: PciAddress, offset: u16, data: &[u8]) {
        // The lock is held throughout so that concurrent writes cannot interleave between
        // a write and the remapping it causes.
        let mut state = lock(&self.state);
        let Some(slot) = state.slots.get(&address) else {
            return;
        };
        if usize::from(offset) + data.len() > EXTENDED_CONFIG_SPACE_SIZE {
            return;
        }
        slot.device.write_config(offset, data);
        self.sync_bars(&mut state, address);
    }

    fn sync_bars(&self, state: &mut BusState, address: PciAddress) {
        let Some(slot) = state.slots.get(&address) else {
            return;
        };
        let device = slot.device.clone();
        let mut command_bytes = [0u8; 2];
        device.read_config(reg::COMMAND as u16, &mut command_bytes);
        let command = u16::from_le_bytes(command_bytes);
        let wanted: Vec<Option<BarRegion>> = slot
            .bars
            .iter()
            .map(|bar| decoded_region(device.as_ref(), bar, command))
            .collect();
        for (i, want) in wanted.into_iter().enumerate() {
            let current = state
                .slots
                .get(&address)
                .and_then(|s| s.mapped.get(i).copied().flatten());
            if current == want {
                continue;
            }
            if let Some(old) = current {
                self.mapper.unmap_bar(address, &old);
                set_mapped(state, address, i, None);
                device.bar_moved(old.bar, None);
            }
            let Some(new) = want else {
                continue;
            };
            let clash = state.slots.iter().find_map(|(other, s)| {
                s.mapped
                    .iter()
                    .flatten()
                    .any(|r| new.overlaps(r))
                    .then_some(*other)
            });
            if new.end().is_none() || clash.is_some() {
                log::warn!(
                    "pci: {address} {} at {:#x} overlaps {:?}; left unmapped",
                    bar_name(new.bar),
                    new.base,
                    clash
                );
                continue;
            }
            let access = BarAccess::new(device.clone(), new.bar);
            match self.mapper.map_bar(address, &new, access) {
                Ok(()) => {
                    set_mapped(state, address, i, Some(new));
                    device.bar_moved(new.bar, Some(new.base));
                }
                Err(e) => log::warn!(
                    "pci: {address} {} at {:#x} refused: {e}; left unmapped",
                    bar_name(new.bar),
                    new.base
                ),
            }
        }
    }
}

fn set_mapped(state: &mut BusState, address: PciAddress, index: usize, region: Option<BarRegion>) {
    if let Some(slot) = state
        .slots
        .get_mut(&address)
        .and_then(|s| s.mapped.get_mut(index))
    {
        *slot = region;
    }
}

/// "BAR n" or "expansion ROM", for messages.
fn bar_name(bar: u8) -> String {
    if bar == ROM_BAR_INDEX {
        "expansion ROM".to_string()
    } else {
        format!("BAR {bar}")
    }
}

/// Where `bar` decodes given the function's registers: its address, if its address space
/// is enabled in `command` (for the expansion ROM, [`ROM_BAR_INDEX`], also its enable bit).
fn decoded_region(device: &dyn PciDevice, bar: &PciBar, command: u16) -> Option<BarRegion> {
    if bar.index == ROM_BAR_INDEX {
        let mut register = [0u8; 4];
        device.read_config(reg::ROM as u16, &mut register);
        let base = rom_decode_address(u32::from_le_bytes(register), command, bar.size)?;
        return Some(BarRegion {
            bar: bar.index,
            kind: BarKind::Memory32,
            base,
            size: bar.size,
            prefetchable: false,
        });
    }
    let enable = if bar.kind.is_memory() {
        command::MEMORY
    } else {
        command::IO
    };
    if command & enable == 0 || !bar.size.is_power_of_two() {
        return None;
    }
    let offset = reg::BAR0 as u16 + 4 * u16::from(bar.index);
    let mut low = [0u8; 4];
    device.read_config(offset, &mut low);
    let mut base = u64::from(u32::from_le_bytes(low));
    if bar.kind == BarKind::Memory64 {
        let mut high = [0u8; 4];
        device.read_config(offset + 4, &mut high);
        base |= u64::from(u32::from_le_bytes(high)) << 32;
    }
    let flags = if bar.kind == BarKind::Io { 0x3 } else { 0xf };
    Some(BarRegion {
        bar: bar.index,
        kind: bar.kind,
        base: base & !(bar.size - 1) & !flags,
        size: bar.size,
        prefetchable: bar.prefetchable,
    })
}

/// Configuration mechanism #1: the address register at port 0xCF8 and the data window at
/// 0xCFC-0xCFF. Insert it on the port bus at 0xCF8 with length 8; offsets are relative to
/// 0xCF8. Only dword accesses reach the address register (0xCF9 alone is the reset control
/// register on real chipsets; here it reads all-ones and ignores writes).
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: AtomicU32,
}

impl PciConfigIo {
    /// The port pair of `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo {
            bus,
            address: AtomicU32::new(0),
        }
    }

    /// Decodes the address register and the data port offset: the function and register
    /// offset, if enabled and the access stays within the dword.
    fn target(&self, port_offset: u64, len: usize) -> Option<(PciAddress, u16)> {
        let within = port_offset.checked_sub(4)?;
        if within + len as u64 > 4 || !matches!(len, 1 | 2 | 4) {
            return None;
        }
        let address = self.address.load(Ordering::Acquire);
        if address & 0x8000_0000 == 0 {
            return None;
        }
        let function = PciAddress::new(
            (address >> 16) as u8,
            ((address >> 11) & 0x1f) as u8,
            ((address >> 8) & 0x7) as u8,
        )
        .ok()?;
        Some((function, (address & 0xfc) as u16 + within as u16))
    }

    /// A guest `in` of `data.len()` bytes at `offset` from 0xCF8.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.load(Ordering::Acquire).to_le_bytes());
            return;
        }
        match self.target(offset, data.len()) {
            Some((function, register)) => self.bus.read_config(function, register, data),
            None => data.fill(0xff),
        }
    }

    /// A guest `out` of `data` at `offset` from 0xCF8.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                // Reserved bits 30:24 and the low two bits read back as 0.
                let value = u32::from_le_bytes(bytes) & 0x80ff_fffc;
                self.address.store(value, Ordering::Release);
            }
            return;
        }
        if let Some((function, register)) = self.target(offset, data.len()) {
            self.bus.write_config(function, register, data);
        }
    }
}

/// The enhanced configuration access mechanism: configuration spaces memory-mapped at
/// `bus << 20 | device << 15 | function << 12 | register` (PCI Express 4.0, section 7.2.2).
/// Insert it on the MMIO bus at the window's base with length [`PciConfigMmio::size`] and
/// describe it to the guest (ACPI MCFG, or the device tree's `pci-host-ecam-generic`).
/// Accesses of 1, 2 or 4 bytes, naturally aligned; others read all-ones and are ignored.
pub struct PciConfigMmio {
    bus: Arc<PciBus>,
    buses: u16,
}

impl PciConfigMmio {
    /// A window covering buses `0..buses` (1-256).
    pub fn new(bus: Arc<PciBus>, buses: u16) -> Self {
        PciConfigMmio {
            bus,
            buses: buses.clamp(1, 256),
        }
    }

    /// Bytes of the window: 1 MiB per bus.
    pub fn size(&self) -> u64 {
        u64::from(self.buses) << 20
    }

    fn target(&self, offset: u64, len: usize) -> Option<(PciAddress, u16)> {
        if !matches!(len, 1 | 2 | 4) || offset % len as u64 != 0 || offset >= self.size() {
            return None;
        }
        let function = PciAddress::new(
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
        )
        .ok()?;
        Some((function, (offset & 0xfff) as u16))
    }

    /// A guest read at `offset` from the window's base.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        match self.target(offset, data.len()) {
            Some((function, register)) => self.bus.read_config(function, register, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write at `offset` from the window's base.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if let Some((function, register)) = self.target(offset, data.len()) {
            self.bus.write_config(function, register, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::AddressWindow;

    /// A function with one 64-bit memory BAR and one I/O BAR (and optionally an expansion
    /// ROM); moves and BAR writes are recorded.
    struct TestDevice {
        config: Mutex<ConfigSpace>,
        moves: Mutex<Vec<(u8, Option<u64>)>>,
        writes: Mutex<Vec<u8>>,
        /// What `rom_size` answers (the config space's ROM, or a bad size).
        rom: Option<u64>,
    }

    impl TestDevice {
        fn new() -> Arc<Self> {
            Self::build(None)
        }

        /// With an expansion ROM of `size` bytes (declared in config space if valid).
        fn with_rom(size: u64) -> Arc<Self> {
            Self::build(Some(size))
        }

        fn build(rom: Option<u64>) -> Arc<Self> {
            let mut config = ConfigSpace::new(&PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1042,
                class: 0x01,
                ..PciHeader::default()
            });
            config
                .add_bar(PciBar {
                    index: 0,
                    kind: BarKind::Memory64,
                    size: 0x4000,
                    prefetchable: false,
                })
                .unwrap();
            config
                .add_bar(PciBar {
                    index: 2,
                    kind: BarKind::Io,
                    size: 0x10,
                    prefetchable: false,
                })
                .unwrap();
            if let Some(size) = rom {
                let _ = config.add_rom(size);
            }
            Arc::new(TestDevice {
                config: Mutex::new(config),
                moves: Mutex::new(Vec::new()),
                writes: Mutex::new(Vec::new()),
                rom,
            })
        }
    }

    impl PciDevice for TestDevice {
        fn read_config(&self, offset: u16, data: &mut [u8]) {
            lock(&self.config).read(usize::from(offset), data);
        }
        fn write_config(&self, offset: u16, data: &[u8]) {
            lock(&self.config).write(usize::from(offset), data);
        }
        fn bars(&self) -> Vec<PciBar> {
            lock(&self.config).bars().to_vec()
        }
        fn rom_size(&self) -> Option<u64> {
            self.rom
        }
        fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(bar.wrapping_add(offset as u8));
        }
        fn bar_write(&self, bar: u8, _offset: u64, _data: &[u8]) {
            lock(&self.writes).push(bar);
        }
        fn bar_moved(&self, bar: u8, base: Option<u64>) {
            lock(&self.moves).push((bar, base));
        }
    }

    /// Records mappings and keeps the accesses of mapped BARs; refuses anything below
    /// 1 GiB ("RAM").
    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<(bool, PciAddress, BarRegion)>>,
        accesses: Mutex<Vec<(PciAddress, BarRegion, BarAccess)>>,
    }

    impl Recorder {
        /// The access mapped for `bar` of `device`, if it is mapped.
        fn access(&self, device: PciAddress, bar: u8) -> Option<BarAccess> {
            lock(&self.accesses)
                .iter()
                .find(|(d, r, _)| *d == device && r.bar == bar)
                .map(|(_, _, a)| a.clone())
        }
    }

    impl BarMapper for Recorder {
        fn map_bar(
            &self,
            device: PciAddress,
            region: &BarRegion,
            access: BarAccess,
        ) -> Result<(), Error> {
            if region.kind.is_memory() && region.base < 0x4000_0000 {
                return Err(Error::MapRefused("RAM".into()));
            }
            lock(&self.events).push((true, device, *region));
            lock(&self.accesses).push((device, *region, access));
            Ok(())
        }
        fn unmap_bar(&self, device: PciAddress, region: &BarRegion) {
            lock(&self.events).push((false, device, *region));
            lock(&self.accesses).retain(|(d, r, _)| !(*d == device && r == region));
        }
    }

    fn windows() -> BarWindows {
        BarWindows {
            mmio32: AddressWindow {
                base: 0xe000_0000,
                size: 0x1000_0000,
            },
            mmio64: None,
            io: Some(AddressWindow {
                base: 0xc000,
                size: 0x1000,
            }),
        }
    }

    fn bus() -> (Arc<PciBus>, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        (Arc::new(PciBus::new(windows(), recorder.clone())), recorder)
    }

    fn addr(device: u8) -> PciAddress {
        PciAddress::new(0, device, 0).unwrap()
    }

    fn cf8_read(io: &PciConfigIo, function: PciAddress, register: u8, len: usize) -> u32 {
        io.write(0, &function.cf8_address(register).to_le_bytes());
        let mut data = [0u8; 4];
        io.read(4 + u64::from(register & 3), &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn cf8_write(io: &PciConfigIo, function: PciAddress, register: u8, value: u32, len: usize) {
        io.write(0, &function.cf8_address(register).to_le_bytes());
        io.write(4 + u64::from(register & 3), &value.to_le_bytes()[..len]);
    }

    #[test]
    fn addresses() {
        assert!(PciAddress::new(0, 32, 0).is_err());
        assert!(PciAddress::new(0, 0, 8).is_err());
        let a = PciAddress::new(1, 2, 3).unwrap();
        assert_eq!(a.to_string(), "01:02.3");
        assert_eq!(a.ecam_offset(), 1 << 20 | 2 << 15 | 3 << 12);
        assert_eq!(a.cf8_address(0x13), 0x8001_1310);
    }

    #[test]
    fn cf8_cfc_addressing_and_absent_functions() {
        let (bus, _) = bus();
        bus.add_device(addr(3), TestDevice::new()).unwrap();
        let io = PciConfigIo::new(bus.clone());
        // Host bridge.
        assert_eq!(cf8_read(&io, addr(0), 0, 4), 0x0d57_8086);
        assert_eq!(cf8_read(&io, addr(0), 0x0b, 1), 0x06);
        // The device, by every width and byte lane.
        assert_eq!(cf8_read(&io, addr(3), 0, 4), 0x1042_1af4);
        assert_eq!(cf8_read(&io, addr(3), 2, 2), 0x1042);
        assert_eq!(cf8_read(&io, addr(3), 1, 1), 0x1a);
        assert_eq!(cf8_read(&io, addr(3), 3, 1), 0x10);
        // Absent devices, functions and buses read all-ones.
        assert_eq!(cf8_read(&io, addr(4), 0, 4), 0xffff_ffff);
        assert_eq!(
            cf8_read(&io, PciAddress::new(0, 3, 1).unwrap(), 0, 2),
            0xffff
        );
        assert_eq!(
            cf8_read(&io, PciAddress::new(1, 3, 0).unwrap(), 0, 4),
            0xffff_ffff
        );
        // Disabled address register: all-ones.
        io.write(0, &0x0000_1800u32.to_le_bytes());
        let mut data = [0u8; 4];
        io.read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
        // The address register reads back without reserved bits.
        io.write(0, &0xffff_ffffu32.to_le_bytes());
        io.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x80ff_fffc);
        // Odd accesses: a word straddling the dword, bytes at 0xCF9, 8 bytes.
        io.write(0, &addr(3).cf8_address(0).to_le_bytes());
        let mut two = [0u8; 2];
        io.read(7, &mut two);
        assert_eq!(two, [0xff; 2]);
        io.read(1, &mut two[..1]);
        assert_eq!(two[0], 0xff);
        io.write(1, &[0x06]);
        let mut eight = [0u8; 8];
        io.read(4, &mut eight);
        assert_eq!(eight, [0xff; 8]);
        io.write(u64::MAX, &[1, 2, 3, 4]);
        io.read(u64::MAX, &mut data);
    }

    #[test]
    fn ecam_addressing() {
        let (bus, _) = bus();
        let at = PciAddress::new(0, 31, 0).unwrap();
        bus.add_device(at, TestDevice::new()).unwrap();
        let ecam = PciConfigMmio::new(bus.clone(), 1);
        assert_eq!(ecam.size(), 1 << 20);
        let mut data = [0u8; 4];
        ecam.read(at.ecam_offset(), &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1042_1af4);
        ecam.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0d57_8086);
        // Extended space of a present function reads 0 (no extended capabilities).
        ecam.read(at.ecam_offset() + 0x100, &mut data);
        assert_eq!(data, [0; 4]);
        ecam.read(at.ecam_offset() + 0xffc, &mut data);
        assert_eq!(data, [0; 4]);
        // Absent function, unaligned access, out of the window.
        for (offset, len) in [
            (PciAddress::new(0, 30, 0).unwrap().ecam_offset(), 4),
            (at.ecam_offset() + 1, 2),
            (at.ecam_offset() + 2, 4),
            (1 << 20, 4),
            (u64::MAX, 1),
            (at.ecam_offset(), 8),
            (at.ecam_offset(), 3),
        ] {
            let mut buf = [0u8; 8];
            ecam.read(offset, &mut buf[..len]);
            assert!(buf[..len].iter().all(|&b| b == 0xff), "{offset:#x}/{len}");
            ecam.write(offset, &buf[..len]);
        }
        // Writes through ECAM.
        ecam.write(at.ecam_offset() + 0x10, &0xffff_ffffu32.to_le_bytes());
        ecam.read(at.ecam_offset() + 0x10, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xffff_c004);
    }

    #[test]
    fn bars_are_placed_and_mapped_on_decode_enable() {
        let (bus, recorder) = bus();
        let device = TestDevice::new();
        let regions = bus.add_device(addr(1), device.clone()).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].base, 0xe000_0000);
        assert_eq!(regions[1].base, 0xc000);
        let second = bus.add_device(addr(2), TestDevice::new()).unwrap();
        assert_eq!(second[0].base, 0xe000_4000);
        assert_eq!(second[1].base, 0xc010);
        assert!(matches!(
            bus.add_device(addr(2), TestDevice::new()),
            Err(Error::SlotInUse(_))
        ));
        // Nothing is mapped until the guest enables decoding.
        assert!(bus.mapped_bars(addr(1)).is_empty());
        let io = PciConfigIo::new(bus.clone());
        cf8_write(&io, addr(1), 4, u32::from(command::MEMORY), 2);
        assert_eq!(bus.mapped_bars(addr(1)), vec![regions[0]]);
        cf8_write(&io, addr(1), 4, u32::from(command::MEMORY | command::IO), 2);
        assert_eq!(bus.mapped_bars(addr(1)), regions);
        // Moving BAR 0 unmaps then maps it, and tells the device.
        cf8_write(&io, addr(1), 0x10, 0xe100_0000, 4);
        assert_eq!(bus.mapped_bars(addr(1))[0].base, 0xe100_0000);
        let events = lock(&recorder.events).clone();
        let n = events.len();
        assert!(!events[n - 2].0 && events[n - 2].2.base == 0xe000_0000);
        assert!(events[n - 1].0 && events[n - 1].2.base == 0xe100_0000);
        assert_eq!(
            lock(&device.moves).last().copied(),
            Some((0, Some(0xe100_0000)))
        );
        // Disabling decoding unmaps everything.
        cf8_write(&io, addr(1), 4, 0, 2);
        assert!(bus.mapped_bars(addr(1)).is_empty());
    }

    #[test]
    fn guest_moves_over_ram_or_another_device_are_refused() {
        let (bus, _) = bus();
        let a = bus.add_device(addr(1), TestDevice::new()).unwrap();
        bus.add_device(addr(2), TestDevice::new()).unwrap();
        let io = PciConfigIo::new(bus.clone());
        let enable = u32::from(command::MEMORY | command::IO);
        cf8_write(&io, addr(1), 4, enable, 2);
        cf8_write(&io, addr(2), 4, enable, 2);
        assert_eq!(bus.mapped_bars(addr(2)).len(), 2);
        // Device 2's BAR 0 over device 1's: the config space takes it, nothing is mapped.
        cf8_write(&io, addr(2), 0x10, a[0].base as u32 + 0x1000, 4);
        assert_eq!(cf8_read(&io, addr(2), 0x10, 4), 0xe000_0004);
        let mapped = bus.mapped_bars(addr(2));
        assert_eq!(mapped.len(), 1);
        assert_eq!(mapped[0].kind, BarKind::Io);
        // Over "RAM": the mapper refuses.
        cf8_write(&io, addr(2), 0x10, 0x1000_0000, 4);
        assert_eq!(bus.mapped_bars(addr(2)).len(), 1);
        // At the top of the address space (sizing with decode on): refused, no overflow.
        cf8_write(&io, addr(2), 0x10, 0xffff_ffff, 4);
        cf8_write(&io, addr(2), 0x14, 0xffff_ffff, 4);
        assert_eq!(bus.mapped_bars(addr(2)).len(), 1);
        // A free place works again.
        cf8_write(&io, addr(2), 0x14, 0, 4);
        cf8_write(&io, addr(2), 0x10, 0xe800_0000, 4);
        assert_eq!(bus.mapped_bars(addr(2)).len(), 2);
        // Device 1 untouched.
        assert_eq!(bus.mapped_bars(addr(1)), a);
    }

    #[test]
    fn hostile_config_writes_everywhere() {
        let (bus, _) = bus();
        bus.add_device(addr(1), TestDevice::new()).unwrap();
        bus.add_device(addr(3), TestDevice::with_rom(0x800))
            .unwrap();
        let io = PciConfigIo::new(bus.clone());
        let ecam = PciConfigMmio::new(bus.clone(), 256);
        let mut seed = 0x0123_4567_89ab_cdefu64;
        for function in [addr(0), addr(1), addr(2), addr(3)] {
            for register in 0..=255u8 {
                for len in [1usize, 2, 4] {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    cf8_write(&io, function, register, seed as u32, len);
                    cf8_read(&io, function, register, len);
                    let offset = function.ecam_offset() + u64::from(register) * 16;
                    ecam.write(offset, &seed.to_le_bytes()[..len]);
                }
            }
        }
        assert_eq!(cf8_read(&io, addr(0), 0, 4), 0x0d57_8086);
        assert_eq!(cf8_read(&io, addr(1), 0, 4), 0x1042_1af4);
        assert_eq!(cf8_read(&io, addr(1), 0x10, 4) & 0xf, 0x4);
        assert_eq!(
            cf8_read(&io, addr(3), 0x30, 4) & 0x7fe,
            0,
            "ROM reserved bits"
        );
        if let Some(rom) = mapped_rom(&bus, addr(3)) {
            assert_eq!((rom.base % 0x800, rom.size), (0, 0x800));
        }
    }

    /// The ROM region a function's mapped list holds, if mapped.
    fn mapped_rom(bus: &PciBus, function: PciAddress) -> Option<BarRegion> {
        bus.mapped_bars(function).into_iter().find(|r| r.is_rom())
    }

    #[test]
    fn rom_is_placed_after_the_bars_and_left_disabled() {
        let (bus, _) = bus();
        let device = TestDevice::with_rom(0x8000);
        let regions = bus.add_device(addr(1), device.clone()).unwrap();
        assert_eq!(regions.len(), 3);
        // BARs where they would be without a ROM; the ROM in the 32-bit window, aligned.
        assert_eq!((regions[0].base, regions[1].base), (0xe000_0000, 0xc000));
        assert_eq!(
            regions[2],
            BarRegion {
                bar: ROM_BAR_INDEX,
                kind: BarKind::Memory32,
                base: 0xe000_8000,
                size: 0x8000,
                prefetchable: false,
            }
        );
        assert!(regions[2].is_rom() && !regions[0].is_rom());
        let io = PciConfigIo::new(bus.clone());
        assert_eq!(
            cf8_read(&io, addr(1), 0x30, 4),
            0xe000_8000,
            "address, disabled"
        );
        // Sizing through the bus.
        cf8_write(&io, addr(1), 0x30, 0xffff_fffe, 4);
        assert_eq!(cf8_read(&io, addr(1), 0x30, 4), 0xffff_8000);
        // The next function's BARs go around it.
        let next = bus.add_device(addr(2), TestDevice::new()).unwrap();
        assert_eq!(next[0].base, 0xe000_4000);
        let after = bus
            .add_device(addr(3), TestDevice::with_rom(0x800))
            .unwrap();
        assert_eq!((after[0].base, after[2].base), (0xe001_0000, 0xe001_4000));
    }

    #[test]
    fn a_rom_that_cannot_be_placed_fails_the_device_and_frees_its_bars() {
        let (bus, _) = bus();
        for size in [0x1000 - 1, 0x400, 1 << 32] {
            assert!(matches!(
                bus.add_device(addr(1), TestDevice::with_rom(size)),
                Err(Error::InvalidBarSize(s)) if s == size
            ));
        }
        // Bigger than the window: out of space, BAR 0 freed again.
        assert!(matches!(
            bus.add_device(addr(1), TestDevice::with_rom(1 << 31)),
            Err(Error::OutOfSpace { .. })
        ));
        assert!(bus.device(addr(1)).is_none());
        let regions = bus.add_device(addr(1), TestDevice::new()).unwrap();
        assert_eq!((regions[0].base, regions[1].base), (0xe000_0000, 0xc000));
    }

    #[test]
    fn rom_maps_only_with_both_enable_bits_and_moves() {
        let (bus, recorder) = bus();
        let device = TestDevice::with_rom(0x8000);
        let regions = bus.add_device(addr(1), device.clone()).unwrap();
        let rom = regions[2];
        let io = PciConfigIo::new(bus.clone());
        // Memory decoding alone: the BAR maps, the ROM does not.
        cf8_write(&io, addr(1), 4, u32::from(command::MEMORY), 2);
        assert_eq!(bus.mapped_bars(addr(1)), vec![regions[0]]);
        // ROM enable (a byte write of bit 0): mapped where it was placed.
        cf8_write(&io, addr(1), 0x30, 0x01, 1);
        assert_eq!(mapped_rom(&bus, addr(1)), Some(rom));
        assert_eq!(
            lock(&device.moves).last().copied(),
            Some((6, Some(rom.base)))
        );
        // Reads reach the device as BAR 6; writes are dropped before the device.
        let access = recorder.access(addr(1), ROM_BAR_INDEX).unwrap();
        let mut data = [0u8; 4];
        access.read(0x10, &mut data);
        assert_eq!(data, [0x16; 4]);
        access.write(0, &[0xff; 4]);
        assert!(
            lock(&device.writes).is_empty(),
            "a ROM write reached the device"
        );
        recorder.access(addr(1), 0).unwrap().write(0, &[1]);
        assert_eq!(*lock(&device.writes), vec![0]);
        // Memory decoding off: unmapped, though its enable bit is still set.
        cf8_write(&io, addr(1), 4, 0, 2);
        assert!(bus.mapped_bars(addr(1)).is_empty());
        assert_eq!(cf8_read(&io, addr(1), 0x30, 4), 0xe000_8001);
        assert_eq!(lock(&device.moves).last().copied(), Some((6, None)));
        cf8_write(&io, addr(1), 4, u32::from(command::MEMORY), 2);
        assert_eq!(mapped_rom(&bus, addr(1)), Some(rom));
        // ROM enable off: unmapped, BAR 0 stays.
        cf8_write(&io, addr(1), 0x30, 0xe000_8000, 4);
        assert_eq!(bus.mapped_bars(addr(1)), vec![regions[0]]);
        assert!(recorder.access(addr(1), ROM_BAR_INDEX).is_none());
        // Moved and enabled in one write: mapped at the new place (low bits ignored).
        cf8_write(&io, addr(1), 0x30, 0xe010_07ff, 4);
        let moved = mapped_rom(&bus, addr(1)).unwrap();
        assert_eq!((moved.base, moved.size), (0xe010_0000, 0x8000));
        // Moved again while enabled: unmapped at the old place, then mapped at the new.
        cf8_write(&io, addr(1), 0x32, 0xe020, 2);
        let events = lock(&recorder.events).clone();
        let n = events.len();
        assert!(!events[n - 2].0 && events[n - 2].2.base == 0xe010_0000);
        assert!(events[n - 1].0 && events[n - 1].2.base == 0xe020_0000);
        assert!(events[n - 1].2.is_rom());
        assert_eq!(
            lock(&device.moves).last().copied(),
            Some((6, Some(0xe020_0000)))
        );
    }

    #[test]
    fn rom_overlaps_are_refused_like_bars() {
        let (bus, _) = bus();
        let a = bus
            .add_device(addr(1), TestDevice::with_rom(0x800))
            .unwrap();
        let b = bus.add_device(addr(2), TestDevice::new()).unwrap();
        assert_eq!(
            (a[0].base, a[2].base, b[0].base),
            (0xe000_0000, 0xe000_4000, 0xe000_8000)
        );
        let io = PciConfigIo::new(bus.clone());
        for function in [addr(1), addr(2)] {
            cf8_write(&io, function, 4, u32::from(command::MEMORY), 2);
        }
        cf8_write(&io, addr(1), 0x30, a[2].base as u32 | 1, 4);
        assert_eq!(mapped_rom(&bus, addr(1)), Some(a[2]));
        // Over its own BAR 0, over another function's BAR, over "RAM": left unmapped.
        for base in [a[0].base as u32, b[0].base as u32 + 0x1000, 0x1000_0000] {
            cf8_write(&io, addr(1), 0x30, base | 1, 4);
            assert_eq!(mapped_rom(&bus, addr(1)), None, "{base:#x}");
            assert_eq!(
                cf8_read(&io, addr(1), 0x30, 4),
                base | 1,
                "the register keeps it"
            );
        }
        assert_eq!(bus.mapped_bars(addr(2)), vec![b[0]]);
        // Somewhere free: mapped again.
        cf8_write(&io, addr(1), 0x30, 0xe800_0001, 4);
        assert_eq!(mapped_rom(&bus, addr(1)).map(|r| r.base), Some(0xe800_0000));
        // Another function's BAR moved over the mapped ROM is refused in turn.
        cf8_write(&io, addr(2), 0x10, 0xe800_0000, 4);
        assert!(bus.mapped_bars(addr(2)).is_empty());
        assert_eq!(mapped_rom(&bus, addr(1)).map(|r| r.base), Some(0xe800_0000));
        // I/O ports at the same numbers are another address space.
        cf8_write(&io, addr(1), 4, u32::from(command::MEMORY | command::IO), 2);
        cf8_write(&io, addr(1), 0x18, 0xe800_0000, 4);
        let mapped = bus.mapped_bars(addr(1));
        assert_eq!(mapped.len(), 3);
        assert!(mapped
            .iter()
            .any(|r| r.kind == BarKind::Io && r.base == 0xe800_0000));
    }

    #[test]
    fn bar_access_forwards() {
        let device = TestDevice::new();
        let access = BarAccess::new(device, 2);
        let mut data = [0u8; 2];
        access.read(3, &mut data);
        assert_eq!(data, [5, 5]);
        access.write(0, &data);
    }
}
