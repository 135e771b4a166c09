//! The example VM's PCI root complex: configuration space through ports 0xCF8-0xCFF, BARs
//! placed in a 32-bit window of the MMIO hole and dispatched on the VM's buses, MSI-X routed
//! through KVM's GSI routing table.
//!
//! Memory BARs go below 4 GiB (there is no 64-bit window) so that flat programs, whose page
//! tables map the first 4 GiB, can reach them; I/O BARs go in ports 0xC000-0xFFFF. When the guest moves a BAR, the mapper moves the
//! bus entry and the KVM ioeventfds inside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmkit_pci_passthrough::kvm::{KvmGsiRouter, LegacyRoutes};
use vmkit_pci_passthrough::{
    AddressWindow, BarAccess, BarKind, BarMapper, BarRegion, BarWindows, Error as PciError,
    PciAddress, PciBus, PciConfigIo,
};
use vmkit_vcpu::{BusDevice, IoBuses};
use vmm_sys_util::eventfd::EventFd;

/// The configuration ports (mechanism #1): address at 0xCF8, data at 0xCFC-0xCFF.
pub const CONFIG_PORT: u64 = 0xcf8;
/// Ports of the configuration mechanism.
pub const CONFIG_PORT_COUNT: u64 = 8;
/// Where memory BARs are placed: 256 MiB of the MMIO hole, above the virtio-mmio disks.
pub const MMIO32_WINDOW: AddressWindow = AddressWindow {
    base: 0xe000_0000,
    size: 0x1000_0000,
};

/// Where I/O BARs are placed: ports 0xC000-0xFFFF, as PC firmware does, clear of the legacy
/// devices (serial, PIT, the exit port and the configuration ports are all below 0x1000).
pub const IO_WINDOW: AddressWindow = AddressWindow {
    base: 0xc000,
    size: 0x4000,
};

/// One BAR on a VM bus.
struct BarDevice(BarAccess);

impl BusDevice for BarDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// The configuration ports on the port bus.
struct ConfigPorts(PciConfigIo);

impl BusDevice for ConfigPorts {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// An eventfd that KVM completes when the guest writes at `offset` in a function's BAR.
struct BarIoEvent {
    bar: u8,
    offset: u64,
    fd: EventFd,
}

/// Puts BARs on the VM's buses and keeps their ioeventfds where the BARs are.
struct VmBarMapper {
    vm: Arc<VmFd>,
    buses: Arc<IoBuses>,
    ioevents: Mutex<HashMap<PciAddress, Vec<BarIoEvent>>>,
}

impl VmBarMapper {
    fn ioevents(&self) -> MutexGuard<'_, HashMap<PciAddress, Vec<BarIoEvent>>> {
        self.ioevents.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BarMapper for VmBarMapper {
    fn map_bar(
        &self,
        device: PciAddress,
        region: &BarRegion,
        access: BarAccess,
    ) -> Result<(), PciError> {
        let bus = match region.kind {
            BarKind::Io => &self.buses.pio,
            // Memory BARs only inside the window: never over RAM or the VMM's other devices.
            BarKind::Memory32 | BarKind::Memory64 => {
                let inside = region.base >= MMIO32_WINDOW.base
                    && region
                        .base
                        .checked_add(region.size)
                        .is_some_and(|end| end <= MMIO32_WINDOW.base + MMIO32_WINDOW.size);
                if !inside {
                    return Err(PciError::MapRefused(format!(
                        "{device} BAR {} at {:#x} is outside the PCI window",
                        region.bar, region.base
                    )));
                }
                &self.buses.mmio
            }
        };
        bus.insert(region.base, region.size, Arc::new(BarDevice(access)))
            .map_err(|e| PciError::MapRefused(e.to_string()))?;
        for event in self.ioevents().get(&device).into_iter().flatten() {
            if event.bar != region.bar || region.kind == BarKind::Io {
                continue;
            }
            let address = IoEventAddress::Mmio(region.base + event.offset);
            if let Err(e) = self.vm.register_ioevent(&event.fd, &address, NoDatamatch) {
                // The BAR still works: notifications then reach the device by the bus.
                log::warn!(
                    "{device}: ioeventfd at {:#x}: {e}",
                    region.base + event.offset
                );
            }
        }
        Ok(())
    }

    fn unmap_bar(&self, device: PciAddress, region: &BarRegion) {
        let bus = match region.kind {
            BarKind::Io => &self.buses.pio,
            BarKind::Memory32 | BarKind::Memory64 => &self.buses.mmio,
        };
        bus.remove(region.base);
        for event in self.ioevents().get(&device).into_iter().flatten() {
            if event.bar == region.bar && region.kind != BarKind::Io {
                let address = IoEventAddress::Mmio(region.base + event.offset);
                let _ = self.vm.unregister_ioevent(&event.fd, &address, NoDatamatch);
            }
        }
    }
}

/// The VM's PCI root complex.
pub struct PciRoot {
    bus: Arc<PciBus>,
    mapper: Arc<VmBarMapper>,
    router: Arc<KvmGsiRouter>,
    next_device: u8,
}

impl PciRoot {
    /// A root complex with its host bridge, on the configuration ports of `buses`.
    pub fn new(vm: Arc<VmFd>, buses: Arc<IoBuses>) -> Result<PciRoot, String> {
        let mapper = Arc::new(VmBarMapper {
            vm: vm.clone(),
            buses: buses.clone(),
            ioevents: Mutex::new(HashMap::new()),
        });
        let windows = BarWindows {
            mmio32: MMIO32_WINDOW,
            mmio64: None,
            io: Some(IO_WINDOW),
        };
        let bus = Arc::new(PciBus::new(windows, mapper.clone()));
        buses
            .pio
            .insert(
                CONFIG_PORT,
                CONFIG_PORT_COUNT,
                Arc::new(ConfigPorts(PciConfigIo::new(bus.clone()))),
            )
            .map_err(|e| format!("PCI configuration ports: {e}"))?;
        Ok(PciRoot {
            bus,
            mapper,
            router: KvmGsiRouter::new(vm, LegacyRoutes::InKernelIrqchip),
            next_device: 1,
        })
    }

    /// The VM's MSI routing table.
    pub fn router(&self) -> &Arc<KvmGsiRouter> {
        &self.router
    }

    /// Plugs `device` into the next free slot of bus 0, with `ioevents` (BAR, offset,
    /// eventfd) to register wherever the guest places those BARs.
    pub fn add(
        &mut self,
        device: Arc<dyn vmkit_pci_passthrough::PciDevice>,
        ioevents: Vec<(u8, u64, EventFd)>,
    ) -> Result<PciAddress, String> {
        let address = PciAddress::new(0, self.next_device, 0).map_err(|e| e.to_string())?;
        self.mapper.ioevents().insert(
            address,
            ioevents
                .into_iter()
                .map(|(bar, offset, fd)| BarIoEvent { bar, offset, fd })
                .collect(),
        );
        self.bus
            .add_device(address, device)
            .map_err(|e| format!("{address}: {e}"))?;
        self.next_device += 1;
        Ok(address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_pci_passthrough::vfio::{
        KvmDirectMapper, SimulatedDevice, VfioPciDevice, VfioPciOptions,
    };

    /// A configuration write through the ports, as a guest does it.
    fn config_write32(buses: &IoBuses, device: u8, register: u8, value: u32) {
        let address = 0x8000_0000 | (u32::from(device) << 11) | u32::from(register);
        buses.pio.write(CONFIG_PORT, &address.to_le_bytes());
        buses.pio.write(CONFIG_PORT + 4, &value.to_le_bytes());
    }

    #[test]
    fn a_bar_moved_over_ram_or_out_of_the_window_is_not_mapped() {
        let vm = match vmkit_vcpu::Vm::new(1) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("SKIPPED: no usable /dev/kvm here: {e}");
                return;
            }
        };
        let buses = Arc::new(IoBuses::new());
        let mut root = PciRoot::new(vm.fd().clone(), buses.clone()).unwrap();
        // The simulated virtio-net function: BAR 0 is 512 KiB, 64-bit, mostly mappable.
        let device = Arc::new(
            VfioPciDevice::new(
                Arc::new(SimulatedDevice::virtio_net().unwrap()),
                VfioPciOptions {
                    interrupts: Some(root.router()),
                    direct_mapper: Some(Arc::new(KvmDirectMapper::new(vm.fd().clone(), 100..110))),
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let address = root.add(device.clone(), Vec::new()).unwrap();
        assert_eq!(address, PciAddress::new(0, 1, 0).unwrap());
        // Memory decoding on: the BAR decodes where "firmware" placed it, in the window.
        config_write32(&buses, 1, 0x04, 0x2);
        let placed = device.direct_mappings();
        assert!(!placed.is_empty());
        let base = placed[0].guest_address;
        assert!(base >= MMIO32_WINDOW.base && buses.mmio.resolve(base).is_some());

        // Over guest RAM (1 MiB): refused, nothing decodes there and nothing is mapped.
        config_write32(&buses, 1, 0x10, 0x0010_0000);
        assert!(device.direct_mappings().is_empty());
        assert!(buses.mmio.resolve(0x0010_0000).is_none());
        assert!(buses.mmio.resolve(base).is_none());
        // Above 4 GiB, outside the window: refused as well.
        config_write32(&buses, 1, 0x14, 0x1);
        assert!(device.direct_mappings().is_empty());
        // Back into the window: mapped again, at the new place.
        let moved = MMIO32_WINDOW.base + 0x0100_0000;
        config_write32(&buses, 1, 0x14, 0);
        config_write32(&buses, 1, 0x10, moved as u32);
        assert!(buses.mmio.resolve(moved).is_some());
        assert!(device
            .direct_mappings()
            .iter()
            .all(|m| m.guest_address >= moved && m.guest_address < moved + 0x8_0000));
        assert!(!device.direct_mappings().is_empty());
    }
}
