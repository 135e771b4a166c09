//! The VFIO harness: the simulated virtio-net function ([`SimulatedDevice`]) behind a
//! [`VfioPciDevice`] on a PCI bus, driven by a sequence of guest accesses.
//!
//! Input layout: byte 0 picks the device's shape (bit 0: expansion ROM, bit 1: MSI
//! capability, bit 2: INTx pin, bit 3: a direct BAR mapper, bit 4: an MSI allocator); then
//! 12-byte operations, `kind, width, bar, _, offset (u32 LE), value (u32 LE)`:
//!
//! | kind % 8 | operation |
//! |---|---|
//! | 0, 1 | configuration read, write on the device (offset % 4096, any width 0-8) |
//! | 2, 3 | BAR read, write on the device (bar % 7, any offset and width 0-8) |
//! | 4, 5 | ECAM read, write (offset % 1 MiB: the device, the host bridge, empty slots) |
//! | 6 | CF8/CFC write of `value` at port `offset % 8` (a read when bit 7 of kind is set) |
//! | 7 | the backend fires interrupt `value % 4`, vector `offset % 64`, or (bit 7 of kind) the device vanishes or comes back |

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmkit_pci_passthrough::vfio::sim::{SimSpec, SimulatedDevice};
use vmkit_pci_passthrough::vfio::{
    DirectMapper, DirectMapping, VfioError, VfioPciDevice, VfioPciOptions,
};
use vmkit_pci_passthrough::{
    AddressWindow, BarWindows, EventFdMsiAllocator, MsiCapability, NoBarMapper, PciAddress, PciBus,
    PciConfigIo, PciConfigMmio, PciDevice,
};

/// Bytes of one operation.
const OP: usize = 12;
/// Operations per input at most, so that one input stays fast.
const MAX_OPS: usize = 4096;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the live direct mappings and checks that none overlap, as KVM refuses
/// overlapping memory slots.
#[derive(Default)]
struct Mapper {
    next: AtomicU32,
    live: Mutex<Vec<DirectMapping>>,
}

impl DirectMapper for Mapper {
    unsafe fn map(
        &self,
        guest_address: u64,
        _host_address: *mut u8,
        size: u64,
    ) -> Result<DirectMapping, VfioError> {
        let mapping = DirectMapping {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            guest_address,
            size,
        };
        let end = guest_address.saturating_add(size);
        let mut live = lock(&self.live);
        for m in live.iter() {
            assert!(
                end <= m.guest_address || m.guest_address.saturating_add(m.size) <= guest_address,
                "direct mapping {guest_address:#x}+{size:#x} overlaps {m:x?}"
            );
        }
        live.push(mapping);
        Ok(mapping)
    }

    fn unmap(&self, mapping: DirectMapping) {
        let mut live = lock(&self.live);
        let before = live.len();
        live.retain(|m| m.id != mapping.id);
        assert_eq!(
            live.len() + 1,
            before,
            "unmap of unknown mapping {mapping:x?}"
        );
    }
}

fn windows() -> BarWindows {
    BarWindows {
        mmio32: AddressWindow {
            base: 0xe000_0000,
            size: 0x1000_0000,
        },
        mmio64: Some(AddressWindow {
            base: 1 << 32,
            size: 1 << 32,
        }),
        io: Some(AddressWindow {
            base: 0xc000,
            size: 0x1000,
        }),
    }
}

fn width(byte: u8) -> usize {
    usize::from(byte % 9)
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) {
    let shape = data.first().copied().unwrap_or(0);
    let mut spec = SimSpec::virtio_net();
    if shape & 1 != 0 {
        spec = spec.with_rom(0x800);
    }
    if shape & 2 != 0 {
        spec = spec.with_msi(0xa4, MsiCapability::from_control(0x018a));
    }
    if shape & 4 != 0 {
        spec = spec.with_intx(1);
    }
    let Ok(sim) = SimulatedDevice::new(spec) else {
        return;
    };
    let sim = Arc::new(sim);
    let mapper = Arc::new(Mapper::default());
    let allocator = EventFdMsiAllocator::new();
    let options = VfioPciOptions {
        interrupts: (shape & 16 != 0).then_some(&allocator as _),
        direct_mapper: (shape & 8 != 0).then(|| mapper.clone() as Arc<dyn DirectMapper>),
        ..VfioPciOptions::default()
    };
    let device = match VfioPciDevice::new(sim.clone(), options) {
        Ok(device) => Arc::new(device),
        Err(e) => panic!("the simulated device does not attach: {e}"),
    };
    let bus = Arc::new(PciBus::new(windows(), Arc::new(NoBarMapper)));
    let Ok(function) = PciAddress::new(0, 1, 0) else {
        return;
    };
    if let Err(e) = bus.add_device(function, device.clone()) {
        panic!("the device does not fit on the bus: {e}");
    }
    let ecam = PciConfigMmio::new(bus.clone(), 1);
    let io = PciConfigIo::new(bus.clone());

    let mut buf = [0u8; 8];
    for op in data.get(1..).unwrap_or(&[]).chunks_exact(OP).take(MAX_OPS) {
        let &[kind, w, bar, _, o0, o1, o2, o3, v0, v1, v2, v3] = op else {
            continue;
        };
        let offset = u32::from_le_bytes([o0, o1, o2, o3]);
        let value = u32::from_le_bytes([v0, v1, v2, v3]);
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&value.to_le_bytes());
        bytes[4..].copy_from_slice(&value.to_le_bytes());
        let len = width(w);
        let data = &mut buf[..len];
        match kind % 8 {
            0 => device.read_config((offset % 4096) as u16, data),
            1 => device.write_config((offset % 4096) as u16, &bytes[..len]),
            2 => device.bar_read(bar % 7, u64::from(offset), data),
            3 => device.bar_write(bar % 7, u64::from(offset), &bytes[..len]),
            4 => ecam.read(u64::from(offset) % ecam.size(), data),
            5 => ecam.write(u64::from(offset) % ecam.size(), &bytes[..len]),
            6 if kind & 0x80 != 0 => io.read(u64::from(offset % 8), data),
            6 => io.write(u64::from(offset % 8), &bytes[..len]),
            _ if kind & 0x80 != 0 => sim.set_gone(value & 1 != 0),
            _ => {
                let _ = sim.fire(value % 4, offset % 64);
            }
        }
    }
    // Whatever the guest did, the device still answers with its identity.
    sim.set_gone(false);
    let mut id = [0u8; 4];
    device.read_config(0, &mut id);
    assert_eq!(&id[..2], &sim.config()[..2], "the vendor ID changed");
    // The bus and its config windows hold the device too.
    drop((ecam, io, bus, device));
    assert!(
        lock(&mapper.live).is_empty(),
        "direct mappings outlive the device"
    );
}
