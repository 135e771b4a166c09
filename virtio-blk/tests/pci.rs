//! The device as a guest driver sees it through virtio-pci: enumeration through 0xCF8/0xCFC,
//! BAR sizing and placement, the capability walk, MSI-X, and the queue, with its I/O threads.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use vmkit_pci_passthrough::config::command;
use vmkit_pci_passthrough::{
    AddressWindow, BarAccess, BarMapper, BarRegion, BarWindows, EventFdMsiRouting, PciAddress,
    PciBus, PciConfigIo,
};
use vmkit_virtio_blk::device::status;
use vmkit_virtio_blk::transport::pci::{common as cc, msix_vectors, VirtioPciTransport};
use vmkit_virtio_blk::BlockOptions;

const VERSION_1: u64 = 1 << 32;
const FLUSH: u64 = 1 << 9;
const SLOT: u8 = 3;

/// The VMM's MMIO bus, as far as BARs go: refuses overlaps with RAM and other regions.
#[derive(Default)]
struct MmioBus {
    regions: Mutex<Vec<(u64, u64, BarAccess)>>,
}

impl BarMapper for MmioBus {
    fn map_bar(
        &self,
        _device: PciAddress,
        region: &BarRegion,
        access: BarAccess,
    ) -> Result<(), vmkit_pci_passthrough::Error> {
        let mut regions = self.regions.lock().unwrap();
        let end = region.base + region.size;
        if region.base < MEM_SIZE as u64
            || regions
                .iter()
                .any(|&(b, s, _)| region.base < b + s && b < end)
        {
            return Err(vmkit_pci_passthrough::Error::MapRefused("overlap".into()));
        }
        regions.push((region.base, region.size, access));
        Ok(())
    }

    fn unmap_bar(&self, _device: PciAddress, region: &BarRegion) {
        self.regions
            .lock()
            .unwrap()
            .retain(|&(b, _, _)| b != region.base);
    }
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(u64, BarAccess)> {
        let regions = self.regions.lock().unwrap();
        regions
            .iter()
            .find(|&&(b, s, _)| addr >= b && addr < b + s)
            .map(|(b, _, a)| (addr - b, a.clone()))
    }

    fn read(&self, addr: u64, len: usize) -> u64 {
        let mut data = [0xffu8; 8];
        if let Some((offset, access)) = self.find(addr) {
            access.read(offset, &mut data[..len]);
        }
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(&data[..len]);
        u64::from_le_bytes(bytes)
    }

    fn write(&self, addr: u64, len: usize, value: u64) {
        if let Some((offset, access)) = self.find(addr) {
            access.write(offset, &value.to_le_bytes()[..len]);
        }
    }
}

/// A guest: config space through the port pair, BARs through the MMIO bus.
struct Guest {
    io: PciConfigIo,
    mmio: Arc<MmioBus>,
    function: PciAddress,
}

impl Guest {
    fn cfg_read(&self, function: PciAddress, register: u8, len: usize) -> u32 {
        self.io
            .write(0, &function.cf8_address(register).to_le_bytes());
        let mut data = [0u8; 4];
        self.io.read(4 + u64::from(register & 3), &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn cfg_write(&self, function: PciAddress, register: u8, len: usize, value: u32) {
        self.io
            .write(0, &function.cf8_address(register).to_le_bytes());
        self.io
            .write(4 + u64::from(register & 3), &value.to_le_bytes()[..len]);
    }

    fn r(&self, register: u8, len: usize) -> u32 {
        self.cfg_read(self.function, register, len)
    }

    fn w(&self, register: u8, len: usize, value: u32) {
        self.cfg_write(self.function, register, len, value)
    }
}

/// Where the virtio structures are, as the capability walk found them.
#[derive(Debug, Default)]
struct Layout {
    bar0: u64,
    common: u64,
    notify: u64,
    notify_multiplier: u32,
    isr: u64,
    device: u64,
    msix_cap: u8,
    msix_table: u64,
    msix_pba: u64,
    pci_cfg_cap: u8,
}

struct Setup {
    guest: Guest,
    routing: Arc<EventFdMsiRouting>,
    transport: Arc<VirtioPciTransport<Mem>>,
    driver: Driver,
    path: std::path::PathBuf,
}

fn setup(queues: usize) -> Setup {
    let mem = memory();
    let path = image(1 << 20, 0x5a);
    let disks = (0..queues).map(|_| open(&path, false)).collect();
    let routing = Arc::new(EventFdMsiRouting::new(msix_vectors(queues as u16)).unwrap());
    let options = BlockOptions {
        serial: b"pci".to_vec(),
        queue_size: 64,
        ..BlockOptions::default()
    };
    let transport =
        Arc::new(VirtioPciTransport::build(disks, mem.clone(), options, routing.clone()).unwrap());
    let mmio = Arc::new(MmioBus::default());
    let bus = Arc::new(PciBus::new(
        BarWindows {
            mmio32: AddressWindow {
                base: 0xe000_0000,
                size: 0x1000_0000,
            },
            mmio64: Some(AddressWindow {
                base: 0x10_0000_0000,
                size: 0x10_0000_0000,
            }),
            io: None,
        },
        mmio.clone(),
    ));
    let function = PciAddress::new(0, SLOT, 0).unwrap();
    bus.add_device(function, transport.clone()).unwrap();
    Setup {
        guest: Guest {
            io: PciConfigIo::new(bus),
            mmio,
            function,
        },
        routing,
        transport,
        driver: Driver::new(mem, 64),
        path,
    }
}

/// Enumerates bus 0, sizes and places BAR 0, enables decoding and walks the capabilities.
fn probe(guest: &Guest, bar0: u64) -> Layout {
    let found: Vec<u8> = (0..32)
        .filter(|&d| {
            let f = PciAddress::new(0, d, 0).unwrap();
            guest.cfg_read(f, 0, 4) != 0xffff_ffff
        })
        .collect();
    assert_eq!(found, vec![0, SLOT]);
    assert_eq!(
        guest.cfg_read(PciAddress::new(0, 0, 0).unwrap(), 0x0a, 2),
        0x0600
    );
    assert_eq!(guest.r(0, 4), 0x1042_1af4);
    assert_eq!(guest.r(8, 1), 1, "revision 1: modern only");
    assert_eq!(guest.r(0x2c, 4), 0x0002_1af4);

    // Size BAR 0 with decoding off, as Linux does.
    guest.w(4, 2, 0);
    let original = guest.r(0x10, 4);
    guest.w(0x10, 4, 0xffff_ffff);
    guest.w(0x14, 4, 0xffff_ffff);
    let low = guest.r(0x10, 4);
    let high = guest.r(0x14, 4);
    assert_eq!(low & 0x7, 0x4, "64-bit memory BAR");
    assert_eq!(low & 0x8, 0, "not prefetchable");
    let mask = u64::from(high) << 32 | u64::from(low & !0xf);
    let size = !mask + 1;
    assert_eq!(size, 0x8000);
    assert_eq!(original & !0xf, 0, "the bus placed it in the 64-bit window");
    guest.w(0x10, 4, bar0 as u32);
    guest.w(0x14, 4, (bar0 >> 32) as u32);
    guest.w(4, 2, u32::from(command::MEMORY | command::BUS_MASTER));
    assert_eq!(guest.mmio.regions.lock().unwrap().len(), 1);
    assert_eq!(guest.mmio.regions.lock().unwrap()[0].0, bar0);

    // Walk the capabilities.
    assert_ne!(guest.r(6, 2) & 0x10, 0, "capability list");
    let mut layout = Layout {
        bar0,
        ..Layout::default()
    };
    let mut pointer = guest.r(0x34, 1) as u8;
    let mut seen = 0;
    while pointer != 0 {
        seen += 1;
        assert!(seen < 48);
        let id = guest.r(pointer, 1);
        match id {
            0x11 => {
                layout.msix_cap = pointer;
                let table = guest.r(pointer + 4, 4);
                let pba = guest.r(pointer + 8, 4);
                assert_eq!(table & 7, 0);
                assert_eq!(pba & 7, 0);
                layout.msix_table = bar0 + u64::from(table & !7);
                layout.msix_pba = bar0 + u64::from(pba & !7);
            }
            0x09 => {
                let cfg_type = guest.r(pointer + 3, 1);
                assert_eq!(guest.r(pointer + 4, 1), 0, "BAR 0");
                let at = bar0 + u64::from(guest.r(pointer + 8, 4));
                match cfg_type {
                    1 => layout.common = at,
                    2 => {
                        layout.notify = at;
                        layout.notify_multiplier = guest.r(pointer + 16, 4);
                    }
                    3 => layout.isr = at,
                    4 => layout.device = at,
                    5 => layout.pci_cfg_cap = pointer,
                    other => panic!("unknown virtio capability {other}"),
                }
            }
            other => panic!("unexpected capability {other:#x}"),
        }
        pointer = guest.r(pointer + 1, 1) as u8;
    }
    assert!(layout.msix_cap != 0 && layout.pci_cfg_cap != 0 && layout.device != 0);
    layout
}

impl Layout {
    fn common_read(&self, guest: &Guest, reg: u64, len: usize) -> u64 {
        guest.mmio.read(self.common + reg, len)
    }

    fn common_write(&self, guest: &Guest, reg: u64, len: usize, value: u64) {
        guest.mmio.write(self.common + reg, len, value)
    }

    fn set_msix_entry(&self, guest: &Guest, vector: u64, masked: bool) {
        let entry = self.msix_table + 16 * vector;
        guest.mmio.write(entry, 4, 0xfee0_0000);
        guest.mmio.write(entry + 4, 4, 0);
        guest.mmio.write(entry + 8, 4, 0x40 + vector);
        guest.mmio.write(entry + 12, 4, u64::from(masked));
    }

    fn mask(&self, guest: &Guest, vector: u64, masked: bool) {
        guest
            .mmio
            .write(self.msix_table + 16 * vector + 12, 4, u64::from(masked));
    }
}

/// Feature negotiation, MSI-X vectors (config: 0, queue i: 1 + i), queue setup, DRIVER_OK.
fn initialise(setup: &Setup, layout: &Layout, queues: u16) {
    let guest = &setup.guest;
    let st = |value: u32| layout.common_write(guest, cc::DEVICE_STATUS, 1, u64::from(value));
    st(0);
    st(status::ACKNOWLEDGE);
    st(status::ACKNOWLEDGE | status::DRIVER);
    let mut offered = 0u64;
    for page in 0..2 {
        layout.common_write(guest, cc::DEVICE_FEATURE_SELECT, 4, page);
        offered |= layout.common_read(guest, cc::DEVICE_FEATURE, 4) << (32 * page);
    }
    assert_ne!(offered & VERSION_1, 0);
    let wanted = VERSION_1 | FLUSH;
    for page in 0..2 {
        layout.common_write(guest, cc::DRIVER_FEATURE_SELECT, 4, page);
        layout.common_write(
            guest,
            cc::DRIVER_FEATURE,
            4,
            (wanted >> (32 * page)) & 0xffff_ffff,
        );
    }
    st(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_ne!(
        layout.common_read(guest, cc::DEVICE_STATUS, 1) as u32 & status::FEATURES_OK,
        0
    );
    assert_eq!(
        layout.common_read(guest, cc::NUM_QUEUES, 2),
        u64::from(queues)
    );

    // MSI-X: enable, program one vector per queue plus the configuration's.
    let control = layout.msix_cap + 2;
    let table_size = (guest.r(control, 2) & 0x7ff) + 1;
    assert_eq!(table_size, u32::from(queues) + 1);
    guest.w(control, 2, 0x8000);
    for vector in 0..u64::from(table_size) {
        layout.set_msix_entry(guest, vector, false);
    }
    layout.common_write(guest, cc::CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(layout.common_read(guest, cc::CONFIG_MSIX_VECTOR, 2), 0);
    // A vector the function does not have is refused (reads back NO_VECTOR).
    layout.common_write(guest, cc::QUEUE_SELECT, 2, 0);
    layout.common_write(guest, cc::QUEUE_MSIX_VECTOR, 2, 100);
    assert_eq!(layout.common_read(guest, cc::QUEUE_MSIX_VECTOR, 2), 0xffff);

    for queue in 0..queues {
        layout.common_write(guest, cc::QUEUE_SELECT, 2, u64::from(queue));
        assert_eq!(layout.common_read(guest, cc::QUEUE_SIZE, 2), 64);
        layout.common_write(guest, cc::QUEUE_SIZE, 2, u64::from(setup.driver.size));
        layout.common_write(guest, cc::QUEUE_MSIX_VECTOR, 2, u64::from(queue) + 1);
        assert_eq!(
            layout.common_read(guest, cc::QUEUE_MSIX_VECTOR, 2),
            u64::from(queue) + 1
        );
        // Queue i's rings are 0x40000 apart.
        let shift = 0x40000 * u64::from(queue);
        for (reg, addr) in [
            (cc::QUEUE_DESC, setup.driver.desc + shift),
            (cc::QUEUE_DRIVER, setup.driver.avail + shift),
            (cc::QUEUE_DEVICE, setup.driver.used + shift),
        ] {
            // Linux writes the halves separately.
            layout.common_write(guest, reg, 4, addr & 0xffff_ffff);
            layout.common_write(guest, reg + 4, 4, addr >> 32);
            assert_eq!(layout.common_read(guest, reg, 8), addr);
        }
        layout.common_write(guest, cc::QUEUE_ENABLE, 2, 1);
        assert_eq!(layout.common_read(guest, cc::QUEUE_ENABLE, 2), 1);
        assert_eq!(
            layout.common_read(guest, cc::QUEUE_NOTIFY_OFF, 2),
            u64::from(queue)
        );
    }
    st(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    assert!(setup.transport.with_device(|d| d.is_activated()));
}

fn notify(guest: &Guest, layout: &Layout, queue: u16) {
    layout.common_write(guest, cc::QUEUE_SELECT, 2, u64::from(queue));
    let off = layout.common_read(guest, cc::QUEUE_NOTIFY_OFF, 2);
    let addr = layout.notify + off * u64::from(layout.notify_multiplier);
    guest.mmio.write(addr, 2, u64::from(queue));
}

fn fired(routing: &EventFdMsiRouting, vector: u16) -> bool {
    routing.eventfd(vector).unwrap().read().is_ok()
}

#[test]
fn a_driver_writes_and_reads_through_pci_with_msix() {
    let mut setup = setup(1);
    let layout = probe(&setup.guest, 0xe800_0000);
    let guest = &setup.guest;
    assert_eq!(layout.notify_multiplier, 4);

    // The device configuration: capacity in sectors.
    assert_eq!(guest.mmio.read(layout.device, 8), (1 << 20) / 512);

    initialise(&setup, &layout, 1);

    // The VMM's ioeventfd offsets agree with what the driver computed.
    let fds = setup.transport.notify_ioeventfds().unwrap();
    assert_eq!(fds.len(), 1);
    assert_eq!(layout.bar0 + fds[0].1, layout.notify);

    // A write: data lands in the file, the used ring advances, vector 1 fires.
    let buf = setup.driver.alloc(512);
    setup.driver.fill(buf, 512, 0xc3);
    let (_, st) = setup.driver.request(T_OUT, 1, &[(buf, 512, false)]);
    notify(guest, &layout, 0);
    wait_for(|| setup.driver.used_idx() == 1);
    assert_eq!(setup.driver.status(st), S_OK);
    wait_for(|| fired(&setup.routing, 1));
    assert!(!fired(&setup.routing, 0), "no configuration interrupt");
    let file = std::fs::read(&setup.path).unwrap();
    assert!(file[512..1024].iter().all(|&b| b == 0xc3));
    assert!(file[..512].iter().all(|&b| b == 0x5a));
    // The ISR says "used buffer" once, then reads 0.
    assert_eq!(guest.mmio.read(layout.isr, 1), 1);
    assert_eq!(guest.mmio.read(layout.isr, 1), 0);

    // Mask vector 1: a read completes without an interrupt, the PBA holds it.
    layout.mask(guest, 1, true);
    let buf = setup.driver.alloc(512);
    let (_, st) = setup.driver.request(T_IN, 1, &[(buf, 512, true)]);
    notify(guest, &layout, 0);
    wait_for(|| setup.driver.used_idx() == 2);
    wait_for(|| guest.mmio.read(layout.msix_pba, 8) & 0b10 != 0);
    assert!(!fired(&setup.routing, 1));
    assert_eq!(setup.driver.status(st), S_OK);
    assert_eq!(setup.driver.read(buf, 512), vec![0xc3; 512]);
    // Unmasking delivers it.
    layout.mask(guest, 1, false);
    assert!(fired(&setup.routing, 1));
    assert_eq!(guest.mmio.read(layout.msix_pba, 8), 0);

    // Function mask works the same way.
    guest.w(layout.msix_cap + 2, 2, 0xc000);
    let (_, _) = setup.driver.request(T_FLUSH, 0, &[]);
    notify(guest, &layout, 0);
    wait_for(|| setup.driver.used_idx() == 3);
    wait_for(|| guest.mmio.read(layout.msix_pba, 8) & 0b10 != 0);
    assert!(!fired(&setup.routing, 1));
    guest.w(layout.msix_cap + 2, 2, 0x8000);
    assert!(fired(&setup.routing, 1));

    // The PCI_CFG window reaches the same registers: read num_queues through it.
    let cap = layout.pci_cfg_cap;
    guest.w(cap + 4, 1, 0);
    guest.w(cap + 8, 4, cc::NUM_QUEUES as u32);
    guest.w(cap + 12, 4, 2);
    assert_eq!(guest.r(cap + 16, 2), 1);

    // Moving BAR 0 moves the regions: the VMM's bus follows through the mapper.
    guest.w(4, 2, 0);
    assert!(guest.mmio.regions.lock().unwrap().is_empty());
    guest.w(0x10, 4, 0xe900_0000);
    guest.w(4, 2, u32::from(command::MEMORY | command::BUS_MASTER));
    assert_eq!(guest.mmio.read(0xe900_0000 + cc::NUM_QUEUES, 2), 1);
    assert_eq!(
        guest.mmio.read(layout.common + cc::NUM_QUEUES, 2),
        u64::MAX >> 48
    );

    // A reset returns the vectors to NO_VECTOR.
    guest.mmio.write(0xe900_0000 + cc::DEVICE_STATUS, 1, 0);
    assert_eq!(
        guest.mmio.read(0xe900_0000 + cc::CONFIG_MSIX_VECTOR, 2),
        0xffff
    );
    assert!(!setup.transport.with_device(|d| d.is_activated()));
}

#[test]
fn two_queues_interrupt_their_own_vectors() {
    let mut setup = setup(2);
    let layout = probe(&setup.guest, 0x20_0000_0000);
    initialise(&setup, &layout, 2);
    let guest = &setup.guest;
    // Queue 1 through its own rings (0x40000 further), written by hand.
    let mut second = Driver::new(setup.driver.mem.clone(), 64);
    second.desc += 0x40000;
    second.avail += 0x40000;
    second.used += 0x40000;
    for _ in 0..8 {
        second.alloc(0x10000);
    }
    let (_, st) = second.request(T_GET_ID, 0, &[(second.desc + 0x8000, 20, true)]);
    notify(guest, &layout, 1);
    wait_for(|| second.used_idx() == 1);
    assert_eq!(second.status(st), S_OK);
    wait_for(|| fired(&setup.routing, 2));
    assert!(!fired(&setup.routing, 1), "queue 0's vector stays quiet");
    let (_, st) = setup.driver.request(T_FLUSH, 0, &[]);
    notify(guest, &layout, 0);
    wait_for(|| setup.driver.used_idx() == 1);
    assert_eq!(setup.driver.status(st), S_OK);
    wait_for(|| fired(&setup.routing, 1));
}

#[test]
fn hostile_config_and_bar_writes_do_not_panic() {
    let setup = setup(1);
    let guest = &setup.guest;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for register in 0..=255u8 {
        for len in [1usize, 2, 4] {
            guest.w(register, len, next() as u32);
            guest.r(register, len);
        }
    }
    // Identity and the capability chain survive.
    assert_eq!(guest.r(0, 4), 0x1042_1af4);
    assert_eq!(guest.r(0x34, 1), 0x40);
    assert_eq!(guest.r(0x40, 1), 0x11);
    // The BAR directly: every offset, hostile values, odd widths.
    let access = BarAccess::new(setup.transport.clone(), 0);
    for offset in (0..0x8000u64).step_by(3).chain([u64::MAX - 1, 0x7fff]) {
        for len in [1usize, 2, 4, 8] {
            let value = next().to_le_bytes();
            access.write(offset, &value[..len]);
            let mut out = [0u8; 8];
            access.read(offset, &mut out[..len]);
        }
    }
    let other = BarAccess::new(setup.transport.clone(), 2);
    other.write(0, &[1; 4]);
    let mut big = [0u8; 64];
    access.read(0, &mut big);
    access.write(0, &big);
    // Still a virtio-blk function.
    assert_eq!(guest.r(0, 4), 0x1042_1af4);
}
