//! The VFIO device model against the simulated virtio-net function, on a PCI bus: BAR
//! placement and direct mapping, the expansion ROM, MSI-X through the backend, reset,
//! hostile guests and a device that vanishes, and (with /dev/kvm) a real guest touching a
//! passed-through BAR.

use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_pci_passthrough::vfio::backend::{MSIX_IRQ, MSI_IRQ, ROM_REGION};
use vmkit_pci_passthrough::vfio::sim::{
    rom_image, SimSpec, SimulatedDevice, VIRTIO_NET_MSIX_PBA, VIRTIO_NET_MSIX_TABLE,
};
use vmkit_pci_passthrough::vfio::{
    dma_map_guest_memory, DirectMapper, DirectMapping, VfioBackend, VfioError, VfioPciDevice,
    VfioPciOptions,
};
use vmkit_pci_passthrough::{
    AddressWindow, BarAccess, BarMapper, BarRegion, BarWindows, EventFdMsiAllocator, MsiAllocator,
    MsiKind, NoBarMapper, PciAddress, PciBus, PciConfigIo, PciConfigMmio, PciDevice, ROM_BAR_INDEX,
};

const MMIO64_BASE: u64 = 0x1_0000_0000;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records direct mappings; refuses overlapping ones, as KVM refuses overlapping slots.
#[derive(Default)]
struct RecordingMapper {
    next_id: Mutex<u32>,
    live: Mutex<Vec<(DirectMapping, usize)>>,
    unmaps: Mutex<usize>,
}

impl RecordingMapper {
    /// Live mappings as (guest address, size), sorted.
    fn live(&self) -> Vec<(u64, u64)> {
        let mut live: Vec<(u64, u64)> = lock(&self.live)
            .iter()
            .map(|(m, _)| (m.guest_address, m.size))
            .collect();
        live.sort();
        live
    }

    /// The host address behind the mapping at `guest_address`.
    fn host_address(&self, guest_address: u64) -> Option<usize> {
        lock(&self.live)
            .iter()
            .find(|(m, _)| m.guest_address == guest_address)
            .map(|&(_, host)| host)
    }
}

impl DirectMapper for RecordingMapper {
    unsafe fn map(
        &self,
        guest_address: u64,
        host_address: *mut u8,
        size: u64,
    ) -> Result<DirectMapping, VfioError> {
        let mut live = lock(&self.live);
        let end = guest_address + size;
        if live
            .iter()
            .any(|(m, _)| guest_address < m.guest_address + m.size && m.guest_address < end)
        {
            return Err(VfioError::Overlap {
                guest_address,
                size,
            });
        }
        let mut next_id = lock(&self.next_id);
        *next_id += 1;
        let mapping = DirectMapping {
            id: *next_id,
            guest_address,
            size,
        };
        live.push((mapping, host_address as usize));
        Ok(mapping)
    }

    fn unmap(&self, mapping: DirectMapping) {
        let mut live = lock(&self.live);
        let before = live.len();
        live.retain(|(m, _)| *m != mapping);
        assert_eq!(live.len() + 1, before, "unmap of an unknown mapping");
        *lock(&self.unmaps) += 1;
    }
}

/// Keeps the BAR accesses the bus hands out, like a VMM's MMIO bus.
#[derive(Default)]
struct MmioBus {
    bars: Mutex<Vec<(BarRegion, BarAccess)>>,
}

impl MmioBus {
    /// A read at `address`: whether a BAR is there (`data` untouched otherwise).
    fn read(&self, address: u64, data: &mut [u8]) -> bool {
        let bars = lock(&self.bars);
        let hit = bars
            .iter()
            .find(|(r, _)| r.base <= address && address < r.base + r.size);
        if let Some((region, access)) = hit {
            access.read(address - region.base, data);
        }
        hit.is_some()
    }

    /// The regions on the bus now, by BAR index.
    fn regions(&self) -> Vec<BarRegion> {
        let mut regions: Vec<BarRegion> = lock(&self.bars).iter().map(|(r, _)| *r).collect();
        regions.sort_by_key(|r| r.bar);
        regions
    }

    fn write(&self, address: u64, data: &[u8]) -> bool {
        let bars = lock(&self.bars);
        let hit = bars
            .iter()
            .find(|(r, _)| r.base <= address && address < r.base + r.size);
        if let Some((region, access)) = hit {
            access.write(address - region.base, data);
        }
        hit.is_some()
    }
}

impl BarMapper for MmioBus {
    fn map_bar(
        &self,
        _device: PciAddress,
        region: &BarRegion,
        access: BarAccess,
    ) -> Result<(), vmkit_pci_passthrough::Error> {
        lock(&self.bars).push((*region, access));
        Ok(())
    }

    fn unmap_bar(&self, _device: PciAddress, region: &BarRegion) {
        lock(&self.bars).retain(|(r, _)| r != region);
    }
}

fn windows() -> BarWindows {
    BarWindows {
        mmio32: AddressWindow {
            base: 0xe000_0000,
            size: 0x1000_0000,
        },
        mmio64: Some(AddressWindow {
            base: MMIO64_BASE,
            size: 0x1_0000_0000,
        }),
        io: Some(AddressWindow {
            base: 0xc000,
            size: 0x1000,
        }),
    }
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

struct Rig {
    sim: Arc<SimulatedDevice>,
    device: Arc<VfioPciDevice>,
    mapper: Arc<RecordingMapper>,
    allocator: Arc<EventFdMsiAllocator>,
}

fn rig(spec: SimSpec) -> Rig {
    let sim = Arc::new(SimulatedDevice::new(spec).unwrap());
    let mapper = Arc::new(RecordingMapper::default());
    let allocator = Arc::new(EventFdMsiAllocator::new());
    let options = VfioPciOptions {
        interrupts: Some(allocator.as_ref()),
        direct_mapper: Some(mapper.clone()),
        ..VfioPciOptions::default()
    };
    let device = Arc::new(VfioPciDevice::new(sim.clone(), options).unwrap());
    Rig {
        sim,
        device,
        mapper,
        allocator,
    }
}

/// The direct mappings virtio-net's BAR 0 gets at `base`: everything but the pages of the
/// MSI-X table (0x8000) and PBA (0x48000).
fn expected_mappings(base: u64) -> Vec<(u64, u64)> {
    vec![
        (base, 0x8000),
        (base + 0x9000, 0x3_f000),
        (base + 0x4_9000, 0x3_7000),
    ]
}

#[test]
fn bars_are_placed_and_mapped_around_the_msix_pages() {
    let rig = rig(SimSpec::virtio_net());
    let bus = Arc::new(PciBus::new(windows(), Arc::new(NoBarMapper)));
    let regions = bus.add_device(addr(1), rig.device.clone()).unwrap();
    assert_eq!(regions.len(), 1);
    let base = regions[0].base;
    assert_eq!(base, MMIO64_BASE, "a 64-bit BAR goes in the 64-bit window");
    let io = PciConfigIo::new(bus.clone());
    assert_eq!(cf8_read(&io, addr(1), 0, 4), 0x1041_1af4);
    assert_eq!(cf8_read(&io, addr(1), 0x14, 4), 1);

    // Nothing is in the guest before memory decoding is on.
    assert!(rig.mapper.live().is_empty());
    // Mark the start of each mappable piece through trapped writes.
    for (i, offset) in [0u64, 0x9000, 0x4_9000].into_iter().enumerate() {
        rig.device.bar_write(0, offset, &[0xa0 + i as u8]);
    }
    cf8_write(&io, addr(1), 0x04, 0x0002, 2);
    assert_eq!(rig.mapper.live(), expected_mappings(base));
    assert_eq!(rig.device.direct_mappings().len(), 3);
    // Each mapping is the device's memory at the right offset.
    for (i, (guest, _)) in expected_mappings(base).into_iter().enumerate() {
        let host = rig.mapper.host_address(guest).unwrap() as *const u8;
        // SAFETY: the device (and so the mapping) is alive; one byte of it is read.
        let byte = unsafe { host.read_volatile() };
        assert_eq!(byte, 0xa0 + i as u8);
    }

    // The guest moves the BAR: unmapped at the old place, mapped at the new one.
    cf8_write(&io, addr(1), 0x10, 0x0080_0000, 4);
    assert_eq!(rig.mapper.live(), expected_mappings(base + 0x80_0000));
    // Sizing with decoding on unmaps (the BAR points at the top of the address space, which
    // the bus refuses), restoring maps again.
    cf8_write(&io, addr(1), 0x10, 0xffff_ffff, 4);
    cf8_write(&io, addr(1), 0x14, 0xffff_ffff, 4);
    assert!(rig.mapper.live().is_empty());
    cf8_write(&io, addr(1), 0x14, 0x1, 4);
    cf8_write(&io, addr(1), 0x10, 0, 4);
    assert_eq!(rig.mapper.live(), expected_mappings(base));
    // Memory decoding off: gone.
    cf8_write(&io, addr(1), 0x04, 0, 2);
    assert!(rig.mapper.live().is_empty());
    assert!(rig.device.direct_mappings().is_empty());
}

#[test]
fn the_model_leaves_out_msix_pages_even_when_the_backend_offers_them() {
    let mut spec = SimSpec::virtio_net();
    spec.regions[0].sparse_mmap.clear();
    spec.regions[0].msix_mappable = true;
    let rig = rig(spec);
    let bus = Arc::new(PciBus::new(windows(), Arc::new(NoBarMapper)));
    let base = bus.add_device(addr(1), rig.device.clone()).unwrap()[0].base;
    let io = PciConfigIo::new(bus.clone());
    cf8_write(&io, addr(1), 0x04, 0x0002, 2);
    assert_eq!(rig.mapper.live(), expected_mappings(base));
    // Without a mapper nothing is mapped and every access is trapped.
    let sim = Arc::new(SimulatedDevice::virtio_net().unwrap());
    let device = VfioPciDevice::new(sim.clone(), VfioPciOptions::default()).unwrap();
    device.bar_moved(0, Some(base));
    assert!(device.direct_mappings().is_empty());
    device.bar_write(0, 0x100, &[1, 2]);
    assert_eq!(sim.peek(0, 0x100, 2), vec![1, 2]);
}

#[test]
fn the_rom_is_placed_enabled_by_the_guest_and_read_through_the_bus() {
    let rig = rig(SimSpec::virtio_net().with_rom(0x1_0000));
    let mmio = Arc::new(MmioBus::default());
    let bus = Arc::new(PciBus::new(windows(), mmio.clone()));
    let regions = bus.add_device(addr(1), rig.device.clone()).unwrap();
    assert_eq!(regions.len(), 2);
    let (bar0, rom) = (regions[0], regions[1]);
    assert!(rom.is_rom() && rom.bar == ROM_BAR_INDEX);
    // The ROM goes in the 32-bit window (BAR 0 went in the 64-bit one), disabled.
    assert_eq!((rom.base, rom.size), (0xe000_0000, 0x1_0000));
    let io = PciConfigIo::new(bus.clone());
    assert_eq!(cf8_read(&io, addr(1), 0x30, 4), 0xe000_0000);
    // Memory decoding alone maps BAR 0, not the ROM.
    cf8_write(&io, addr(1), 0x04, 0x0002, 2);
    assert_eq!(mmio.regions(), vec![bar0]);
    // The ROM enable bit too: the ROM is on the MMIO bus, and only there (no direct
    // mapping: the KVM slots are BAR 0's).
    cf8_write(&io, addr(1), 0x30, 0xe000_0001, 4);
    assert_eq!(mmio.regions(), vec![bar0, rom]);
    assert_eq!(rig.mapper.live(), expected_mappings(bar0.base));
    // A guest reading the ROM through the bus gets the device's ROM image: the option ROM
    // signature first, then the pattern.
    let image = rom_image(0x1_0000);
    let mut signature = [0u8; 2];
    assert!(mmio.read(rom.base, &mut signature));
    assert_eq!(signature, [0x55, 0xaa]);
    let trapped = rig.sim.trapped_accesses();
    let mut copy = vec![0u8; 0x1_0000];
    for (i, dword) in copy.chunks_mut(4).enumerate() {
        assert!(mmio.read(rom.base + 4 * i as u64, dword));
    }
    assert_eq!(copy, image);
    assert_eq!(
        rig.sim.trapped_accesses(),
        trapped + 0x4000,
        "each read is trapped"
    );
    // Writes to the ROM are dropped: the backend never sees them.
    let trapped = rig.sim.trapped_accesses();
    assert!(mmio.write(rom.base, &[0; 4]));
    assert_eq!(rig.sim.trapped_accesses(), trapped);
    assert_eq!(rig.sim.peek(ROM_REGION, 0, 4), image[..4]);
    // Moved by the guest: off the old place, readable at the new one.
    cf8_write(&io, addr(1), 0x30, 0xe100_0001, 4);
    assert!(!mmio.read(rom.base, &mut signature));
    assert!(mmio.read(0xe100_0000, &mut signature));
    assert_eq!(signature, [0x55, 0xaa]);
    // ROM enable off: gone from the bus; BAR 0 stays.
    cf8_write(&io, addr(1), 0x30, 0xe100_0000, 4);
    assert_eq!(mmio.regions(), vec![bar0]);
    // The ROM BAR never reached the device's configuration space.
    assert!(rig
        .sim
        .config_writes()
        .iter()
        .all(|(offset, bytes)| { *offset >= 0x34 || offset + bytes.len() as u64 <= 0x30 }));
}

#[test]
fn without_a_rom_region_the_rom_bar_reads_0_and_nothing_is_placed() {
    let rig = rig(SimSpec::virtio_net());
    assert_eq!(rig.device.rom_size(), None);
    let mmio = Arc::new(MmioBus::default());
    let bus = Arc::new(PciBus::new(windows(), mmio.clone()));
    let regions = bus.add_device(addr(1), rig.device.clone()).unwrap();
    assert_eq!(regions.len(), 1);
    assert!(!regions[0].is_rom());
    let io = PciConfigIo::new(bus.clone());
    assert_eq!(cf8_read(&io, addr(1), 0x30, 4), 0);
    cf8_write(&io, addr(1), 0x04, 0x0002, 2);
    for value in [0xffff_ffff, 0xe000_0001, 0x0000_0001] {
        cf8_write(&io, addr(1), 0x30, value, 4);
        assert_eq!(cf8_read(&io, addr(1), 0x30, 4), 0);
    }
    assert_eq!(mmio.regions(), vec![regions[0]]);
    assert!(bus.mapped_bars(addr(1)).iter().all(|r| !r.is_rom()));
}

#[test]
fn msix_vectors_reach_the_routing_eventfds_and_masked_ones_pend() {
    let rig = rig(SimSpec::virtio_net());
    let bus = Arc::new(PciBus::new(windows(), Arc::new(NoBarMapper)));
    bus.add_device(addr(1), rig.device.clone()).unwrap();
    let io = PciConfigIo::new(bus.clone());
    assert_eq!(rig.device.msix_vectors(), Some(3));
    let routing = rig.allocator.routing(MsiKind::MsiX).unwrap();
    let fired = |vector: u16| routing.eventfd(vector).unwrap().read().unwrap_or(0);
    let table = |vector: u64, field: u64| VIRTIO_NET_MSIX_TABLE + 16 * vector + field;

    // Program the three vectors (trapped: the device's table never sees them).
    let trapped_before = rig.sim.trapped_accesses();
    for vector in 0..3u64 {
        rig.device
            .bar_write(0, table(vector, 0), &0xfee0_0000u32.to_le_bytes());
        rig.device
            .bar_write(0, table(vector, 8), &(0x40 + vector as u32).to_le_bytes());
        rig.device.bar_write(0, table(vector, 12), &[0]);
    }
    assert_eq!(rig.sim.trapped_accesses(), trapped_before);
    assert_eq!(rig.sim.peek(0, VIRTIO_NET_MSIX_TABLE, 16), vec![0; 16]);
    let mut data = [0u8; 4];
    rig.device.bar_read(0, table(2, 8), &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x42);

    // Enable MSI-X (capability at 0x98, control at 0x9a): one eventfd per vector.
    assert_eq!(rig.sim.enabled_vectors(MSIX_IRQ), 0);
    cf8_write(&io, addr(1), 0x9a, 0x8000, 2);
    assert_eq!(cf8_read(&io, addr(1), 0x9a, 2), 0x8002);
    assert_eq!(rig.sim.enabled_vectors(MSIX_IRQ), 3);
    let enable = rig.sim.irq_calls();
    assert_eq!(
        (enable[0].index, enable[0].start, enable[0].count),
        (MSIX_IRQ, 0, 3)
    );
    for vector in 0..3u16 {
        assert!(rig.sim.fire(MSIX_IRQ, u32::from(vector)));
        assert_eq!(fired(vector), 1, "vector {vector}");
    }

    // Mask vector 1: its interrupts park, the PBA shows them, unmasking delivers once.
    rig.device.bar_write(0, table(1, 12), &[1]);
    rig.sim.fire(MSIX_IRQ, 1);
    rig.sim.fire(MSIX_IRQ, 1);
    assert_eq!(fired(1), 0);
    let mut pba = [0u8; 8];
    rig.device.bar_read(0, VIRTIO_NET_MSIX_PBA, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0b010);
    rig.sim.fire(MSIX_IRQ, 0);
    assert_eq!(fired(0), 1, "other vectors are unaffected");
    rig.device.bar_write(0, table(1, 12), &[0]);
    assert_eq!(fired(1), 1);
    rig.device.bar_read(0, VIRTIO_NET_MSIX_PBA, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0);
    // A masked vector unmasked without a PBA read in between still delivers.
    rig.device.bar_write(0, table(2, 12), &[1]);
    rig.sim.fire(MSIX_IRQ, 2);
    rig.device.bar_write(0, table(2, 12), &[0]);
    assert_eq!(fired(2), 1);

    // The function mask parks every vector; clearing it delivers what came meanwhile.
    cf8_write(&io, addr(1), 0x9a, 0xc000, 2);
    rig.sim.fire(MSIX_IRQ, 0);
    rig.sim.fire(MSIX_IRQ, 2);
    assert_eq!((fired(0), fired(2)), (0, 0));
    cf8_write(&io, addr(1), 0x9a, 0x8000, 2);
    assert_eq!((fired(0), fired(1), fired(2)), (1, 0, 1));

    // A route change keeps the vector's eventfd (the sink re-routes the same irqfd).
    let calls = rig.sim.irq_calls().len();
    rig.device.bar_write(0, table(0, 8), &0x51u32.to_le_bytes());
    assert_eq!(rig.sim.irq_calls().len(), calls);
    assert_eq!(routing.route(0).map(|m| m.data), Some(0x51));

    // Disabling MSI-X disables the index; interrupts then go nowhere.
    cf8_write(&io, addr(1), 0x9a, 0, 2);
    assert_eq!(rig.sim.enabled_vectors(MSIX_IRQ), 0);
    assert!(!rig.sim.fire(MSIX_IRQ, 0));
    // The model never enabled MSI (the function has none).
    assert!(rig.sim.irq_calls().iter().all(|c| c.index != MSI_IRQ));
}

#[test]
fn reset_on_attach_and_on_drop() {
    let rig = rig(SimSpec::virtio_net());
    assert_eq!(rig.sim.resets(), 1);
    let bus = Arc::new(PciBus::new(windows(), Arc::new(NoBarMapper)));
    bus.add_device(addr(1), rig.device.clone()).unwrap();
    let io = PciConfigIo::new(bus.clone());
    cf8_write(&io, addr(1), 0x04, 0x0006, 2);
    cf8_write(&io, addr(1), 0x9a, 0x8000, 2);
    assert_eq!(rig.sim.enabled_vectors(MSIX_IRQ), 3);
    assert_eq!(rig.mapper.live().len(), 3);
    assert_eq!(rig.sim.config()[0x04], 0x06);
    let Rig {
        sim,
        device,
        mapper,
        allocator,
    } = rig;
    drop((io, bus, device, allocator));
    assert_eq!(sim.resets(), 2);
    assert!(mapper.live().is_empty(), "direct mappings removed");
    assert_eq!(sim.enabled_vectors(MSIX_IRQ), 0);
    assert_eq!(
        sim.config()[0x04],
        0,
        "the reset cleared the command register"
    );
    // A device that cannot be reset is attached and dropped without one.
    let mut spec = SimSpec::virtio_net();
    spec.reset = false;
    let sim = Arc::new(SimulatedDevice::new(spec).unwrap());
    drop(VfioPciDevice::new(sim.clone(), VfioPciOptions::default()).unwrap());
    assert_eq!(sim.resets(), 0);
}

/// xorshift64: deterministic "random" values.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn hostile_configuration_writes_everywhere() {
    let rig = rig(SimSpec::virtio_net().with_intx(1).with_rom(0x800));
    let bus = Arc::new(PciBus::new(windows(), Arc::new(NoBarMapper)));
    bus.add_device(addr(1), rig.device.clone()).unwrap();
    let ecam = PciConfigMmio::new(bus.clone(), 1);
    let mut seed = 0x0123_4567_89ab_cdefu64;
    for round in 0..2 {
        for offset in 0..0x1010u16 {
            for width in [1usize, 2, 3, 4, 8] {
                let value = if round == 0 {
                    next(&mut seed)
                } else {
                    u64::MAX
                };
                rig.device
                    .write_config(offset, &value.to_le_bytes()[..width]);
                let mut out = [0u8; 8];
                rig.device.read_config(offset, &mut out[..width]);
            }
        }
        for register in (0..0x1000u64).step_by(4) {
            let value = next(&mut seed);
            ecam.write(addr(1).ecam_offset() + register, &value.to_le_bytes()[..4]);
        }
    }
    rig.device.write_config(u16::MAX, &[0xff; 8]);
    // Still the same function, with its BAR's type bits and its capability list.
    let mut data = [0u8; 4];
    ecam.read(addr(1).ecam_offset(), &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x1041_1af4);
    ecam.read(addr(1).ecam_offset() + 0x10, &mut data);
    assert_eq!(data[0] & 0xf, 0x4);
    ecam.read(addr(1).ecam_offset() + 0x34, &mut data);
    assert_eq!(data[0], 0x40);
    // BAR and ROM writes never reached the device.
    assert!(rig.sim.config_writes().iter().all(|(offset, bytes)| {
        let end = offset + bytes.len() as u64;
        end <= 0x10 || (*offset >= 0x28 && end <= 0x30) || *offset >= 0x34
    }));
    // The ROM BAR kept its read-only bits, and the ROM its content.
    ecam.read(addr(1).ecam_offset() + 0x30, &mut data);
    assert_eq!(u32::from_le_bytes(data) & 0x7fe, 0);
    assert_eq!(rig.sim.peek(ROM_REGION, 0, 0x800), rom_image(0x800));
    // Whatever the guest left in MSI-X, switched off the device still works.
    ecam.write(addr(1).ecam_offset() + 0x98, &0u32.to_le_bytes());
    rig.device.bar_write(0, 0x10, &[7]);
    rig.device.bar_read(0, 0x10, &mut data[..1]);
    assert_eq!(data[0], 7);
    // Hostile BAR accesses: any offset, any width.
    for offset in [
        0,
        0x7ffe,
        0x8000,
        0x8ffc,
        0x4_7fff,
        0x4_8000,
        0x7_fffc,
        0x8_0000,
        u64::MAX,
    ] {
        for width in [1usize, 2, 4, 8, 3, 16] {
            let mut buf = [0x5au8; 16];
            rig.device.bar_write(0, offset, &buf[..width]);
            rig.device.bar_read(0, offset, &mut buf[..width]);
            rig.device.bar_read(9, offset, &mut buf[..width]);
            rig.device
                .bar_read(ROM_BAR_INDEX, offset, &mut buf[..width]);
            rig.device.bar_write(ROM_BAR_INDEX, offset, &buf[..width]);
        }
    }
}

#[test]
fn an_access_straddling_the_msix_table_is_split() {
    let rig = rig(SimSpec::virtio_net());
    // 8 bytes from 0x7ffc: 4 to the device, 4 to the table (vector 0's address).
    let data = [1, 2, 3, 4, 0x10, 0x00, 0xe0, 0xfe];
    rig.device.bar_write(0, VIRTIO_NET_MSIX_TABLE - 4, &data);
    assert_eq!(
        rig.sim.peek(0, VIRTIO_NET_MSIX_TABLE - 4, 8),
        vec![1, 2, 3, 4, 0, 0, 0, 0]
    );
    let mut back = [0u8; 8];
    rig.device.bar_read(0, VIRTIO_NET_MSIX_TABLE - 4, &mut back);
    assert_eq!(back, data);
}

#[test]
fn bars_placed_over_each_other_are_refused() {
    let a = rig(SimSpec::virtio_net());
    let b = rig(SimSpec::virtio_net());
    let bus = Arc::new(PciBus::new(windows(), Arc::new(NoBarMapper)));
    let base_a = bus.add_device(addr(1), a.device.clone()).unwrap()[0].base;
    let base_b = bus.add_device(addr(2), b.device.clone()).unwrap()[0].base;
    assert_ne!(base_a, base_b);
    let io = PciConfigIo::new(bus.clone());
    cf8_write(&io, addr(1), 0x04, 0x0002, 2);
    cf8_write(&io, addr(2), 0x04, 0x0002, 2);
    assert_eq!(b.mapper.live(), expected_mappings(base_b));
    // B's BAR over A's: the bus refuses, B's direct mappings go, A's stay.
    cf8_write(&io, addr(2), 0x14, (base_a >> 32) as u32, 4);
    cf8_write(&io, addr(2), 0x10, base_a as u32 + 0x4_0000, 4);
    assert!(bus.mapped_bars(addr(2)).is_empty());
    assert!(b.mapper.live().is_empty());
    assert_eq!(a.mapper.live(), expected_mappings(base_a));
    // Somewhere free again: mapped.
    cf8_write(&io, addr(2), 0x10, 0x0400_0000, 4);
    assert_eq!(b.mapper.live(), expected_mappings(base_a + 0x0400_0000));
}

#[test]
fn a_device_that_vanishes_mid_way() {
    let rig = rig(SimSpec::virtio_net());
    let bus = Arc::new(PciBus::new(windows(), Arc::new(NoBarMapper)));
    let base = bus.add_device(addr(1), rig.device.clone()).unwrap()[0].base;
    let io = PciConfigIo::new(bus.clone());
    cf8_write(&io, addr(1), 0x04, 0x0006, 2);
    cf8_write(&io, addr(1), 0x9a, 0x8000, 2);
    rig.sim.set_gone(true);
    // Device-backed registers answer all-ones, the shadow still answers.
    assert_eq!(cf8_read(&io, addr(1), 0x00, 4), 0xffff_ffff);
    assert_eq!(cf8_read(&io, addr(1), 0x9a, 2), 0x8002);
    assert_eq!(cf8_read(&io, addr(1), 0x04, 2), 0x0006);
    let mut data = [0u8; 4];
    rig.device.bar_read(0, 0x100, &mut data);
    assert_eq!(data, [0xff; 4]);
    rig.device.bar_write(0, 0x100, &data);
    // Interrupt changes and moves fail in the backend, not in the guest.
    cf8_write(&io, addr(1), 0x9a, 0x0000, 2);
    cf8_write(&io, addr(1), 0x9a, 0x8000, 2);
    cf8_write(&io, addr(1), 0x10, 0x0100_0000, 4);
    assert_eq!(rig.mapper.live(), expected_mappings(base + 0x0100_0000));
    assert!(matches!(
        rig.device.backend().dma_unmap(0, 0x1000),
        Err(vmkit_pci_passthrough::vfio::BackendError::Gone(_))
    ));
    let sim = rig.sim.clone();
    drop(bus);
    drop(io);
    drop(rig);
    assert_eq!(sim.resets(), 1, "the reset on detach failed quietly");
}

#[test]
fn guest_memory_is_handed_to_the_device_for_dma() {
    let sim = Arc::new(SimulatedDevice::virtio_net().unwrap());
    let memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x1_0000_0000), 0x2_0000),
    ])
    .unwrap();
    let mapped = dma_map_guest_memory(sim.as_ref(), &memory).unwrap();
    assert_eq!(mapped.len(), 2);
    let recorded = sim.dma_mappings();
    assert_eq!(
        recorded
            .iter()
            .map(|m| (m.iova, m.size))
            .collect::<Vec<_>>(),
        vec![(0, 0x10_0000), (0x1_0000_0000, 0x2_0000)]
    );
    assert!(recorded
        .iter()
        .all(|m| m.host_address != 0 && m.fd.is_none()));
    for m in &mapped {
        sim.dma_unmap(m.iova, m.size).unwrap();
    }
    // A failure half-way undoes the regions already mapped.
    let blocker = vmkit_pci_passthrough::vfio::DmaRegion {
        iova: 0x1_0000_0000,
        size: 0x1000,
        host_address: 0x1000,
        fd: None,
    };
    sim.dma_map(&blocker).unwrap();
    assert!(dma_map_guest_memory(sim.as_ref(), &memory).is_err());
    assert_eq!(sim.dma_mappings().len(), 1);
}

/// With /dev/kvm: a real-mode guest writes BAR 0 through its direct mapping (no exit, no
/// backend call) and programs the MSI-X table through an exit that the model traps; the
/// vector's route then reaches KVM's GSI routing table.
#[test]
fn a_kvm_guest_uses_the_direct_mapping_and_exits_only_for_the_msix_table() {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};
    use vmkit_pci_passthrough::kvm::{KvmGsiRouter, LegacyRoutes, Route};
    use vmkit_pci_passthrough::vfio::KvmDirectMapper;

    let Ok(kvm) = Kvm::new() else {
        eprintln!("no /dev/kvm: skipped");
        return;
    };
    // 64 KiB of RAM at 0 for the code; declared before the VM so that it outlives it.
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let ram_host = vm_memory::GuestMemoryBackend::get_host_address(&ram, GuestAddress(0)).unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let code: &[u8] = &[
        0xb8, 0x00, 0x80, // mov ax, 0x8000
        0x8e, 0xd8, // mov ds, ax            ; ds:0 = 0x80000, BAR 0
        0xc7, 0x06, 0x00, 0x00, 0xef, 0xbe, // mov word [0x0000], 0xbeef (mapped)
        0x66, 0xc7, 0x06, 0x00, 0x80, 0x00, 0x00, 0xe0,
        0xfe, // mov dword [0x8000], 0xfee00000 (MSI-X)
        0xa1, 0x10, 0x00, // mov ax, [0x0010] (mapped)
        0xe6, 0xf4, // out 0xf4, al: done (with an in-kernel irqchip, hlt would not exit)
    ];
    vm_memory::Bytes::write_slice(&ram, code, GuestAddress(0x1000)).unwrap();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0x1_0000,
        userspace_addr: ram_host as u64,
    };
    // SAFETY: `ram` is declared before every holder of the VM, so it is unmapped only after
    // the VM (and its slot) is gone.
    unsafe { vm.set_user_memory_region(slot) }.unwrap();

    let router = KvmGsiRouter::new(vm.clone(), LegacyRoutes::InKernelIrqchip);
    let sim = Arc::new(SimulatedDevice::virtio_net().unwrap());
    let mapper = Arc::new(KvmDirectMapper::new(vm.clone(), 10..20));
    let options = VfioPciOptions {
        interrupts: Some(&router as &dyn MsiAllocator),
        direct_mapper: Some(mapper.clone()),
        ..VfioPciOptions::default()
    };
    let device = Arc::new(VfioPciDevice::new(sim.clone(), options).unwrap());
    // A bus whose 32-bit window real mode can reach: BAR 0 lands at 0x80000.
    let mmio = Arc::new(MmioBus::default());
    let windows = BarWindows {
        mmio32: AddressWindow {
            base: 0x8_0000,
            size: 0x8_0000,
        },
        mmio64: None,
        io: None,
    };
    let bus = Arc::new(PciBus::new(windows, mmio.clone()));
    let base = bus.add_device(addr(1), device.clone()).unwrap()[0].base;
    assert_eq!(base, 0x8_0000);
    bus.write_config(addr(1), 0x04, &0x0002u16.to_le_bytes());
    assert_eq!(mapper.mappings().len(), 3);
    device.bar_write(0, 0x10, &0x1234u16.to_le_bytes());
    let trapped = sim.trapped_accesses();

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    let mut mmio_exits = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::MmioWrite(address, data) => {
                mmio_exits.push(address);
                assert!(
                    mmio.write(address, data),
                    "exit outside the BAR: {address:#x}"
                );
            }
            VcpuExit::IoOut(0xf4, _) => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(mmio_exits, vec![base + VIRTIO_NET_MSIX_TABLE]);
    assert_eq!(vcpu.get_regs().unwrap().rax & 0xffff, 0x1234);
    assert_eq!(sim.peek(0, 0, 2), vec![0xef, 0xbe]);
    assert_eq!(
        sim.trapped_accesses(),
        trapped,
        "no access reached the backend"
    );
    let mut entry = [0u8; 4];
    device.bar_read(0, VIRTIO_NET_MSIX_TABLE, &mut entry);
    assert_eq!(u32::from_le_bytes(entry), 0xfee0_0000);

    // Enable MSI-X and unmask vector 0: its route is in KVM's table, its irqfd with the
    // device.
    device.bar_write(0, VIRTIO_NET_MSIX_TABLE + 8, &0x31u32.to_le_bytes());
    device.bar_write(0, VIRTIO_NET_MSIX_TABLE + 12, &[0]);
    bus.write_config(addr(1), 0x9a, &0x8000u16.to_le_bytes());
    assert!(router.routes().iter().any(|(_, route)| matches!(
        route,
        Route::Msi(m) if m.address == 0xfee0_0000 && m.data == 0x31
    )));
    assert_eq!(sim.enabled_vectors(MSIX_IRQ), 3);
    assert!(sim.fire(MSIX_IRQ, 0));

    // Detaching removes the slots, once the last holder of the device lets go: the VMM's
    // MMIO bus holds it through the BAR accesses too.
    drop(bus);
    drop(device);
    assert_eq!(mapper.mappings().len(), 3);
    drop(mmio);
    assert!(mapper.mappings().is_empty());
}
