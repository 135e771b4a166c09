//! Passed-through PCI devices: `--vfio SYSFS_PATH` (the kernel's VFIO) and `--vfio-user
//! SOCKET` (a vfio-user server), each a `VfioPciDevice` of `vmkit-pci-passthrough` on the
//! VM's PCI root complex.
//!
//! For each device the VMM lets it DMA into all of guest RAM (guest physical address =
//! I/O virtual address), routes its MSI/MSI-X vectors through KVM's GSI routing table, and
//! maps the mmap-able parts of its BARs into the guest as KVM memory slots, so the guest's
//! accesses there never exit. Everything else in the BARs (registers, the MSI-X table) is
//! trapped and forwarded.

use std::path::PathBuf;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmkit_memory::GuestRam;
use vmkit_pci_passthrough::kvm::KvmGsiRouter;
use vmkit_pci_passthrough::vfio::kernel::KernelVfio;
use vmkit_pci_passthrough::vfio::user::VfioUserBackend;
use vmkit_pci_passthrough::vfio::{
    dma_map_guest_memory, DmaRegion, KvmDirectMapper, VfioBackend, VfioPciDevice, VfioPciOptions,
};
use vmkit_pci_passthrough::PciAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::PciRoot;
use crate::linux::acpi::PciIntxRoute;

/// One device, as the command line names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VfioConfig {
    /// A host PCI device bound to vfio-pci, by its sysfs path.
    Kernel(PathBuf),
    /// A vfio-user server's socket.
    User(PathBuf),
}

impl VfioConfig {
    /// How the device is named in messages.
    pub fn describe(&self) -> String {
        match self {
            VfioConfig::Kernel(path) => format!("--vfio {}", path.display()),
            VfioConfig::User(path) => format!("--vfio-user {}", path.display()),
        }
    }
}

/// Configuration register of the interrupt line (the IOAPIC pin, for the guest's drivers).
const PCI_INTERRUPT_LINE: u16 = 0x3c;

/// KVM memory slots for BAR memory mapped into the guest (guest RAM uses the first few).
pub const BAR_SLOTS: std::ops::Range<u32> = 100..400;

/// The kernel's VFIO, opened once per VM (one container or iommufd for all its devices).
pub type KernelVfioContext = Option<KernelVfio>;

/// A passed-through device attached to the VM. Dropping it detaches the device: guest RAM
/// is unmapped for DMA, and the device model resets it and stops its interrupts.
pub struct AttachedVfio {
    // Field order is drop order: the device model (which resets the device and removes its
    // BAR mappings when its last reference goes) before the DMA mappings.
    device: Arc<VfioPciDevice>,
    _dma: DmaMappings,
    address: PciAddress,
    /// The INTx line's GSI and its irqfd and resample eventfd, if the device has one.
    intx: Option<(u32, EventFd, EventFd)>,
}

/// Guest RAM mapped for a device's DMA; unmapped when dropped.
struct DmaMappings {
    backend: Arc<dyn VfioBackend>,
    regions: Vec<DmaRegion>,
}

impl Drop for DmaMappings {
    fn drop(&mut self) {
        for dma in &self.regions {
            if let Err(e) = self.backend.dma_unmap(dma.iova, dma.size) {
                log::warn!("DMA unmap of guest RAM at {:#x}: {e}", dma.iova);
            }
        }
    }
}

impl AttachedVfio {
    /// Where the device sits on the VM's PCI bus.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The device model.
    pub fn device(&self) -> &Arc<VfioPciDevice> {
        &self.device
    }

    /// The device's INTx line and the GSI it is wired to, if it has one (for the DSDT).
    pub fn intx_route(&self) -> Option<PciIntxRoute> {
        self.intx.as_ref().map(|(gsi, _, _)| PciIntxRoute {
            device: self.address.device(),
            pin: self.device.interrupt_pin(),
            gsi: *gsi,
        })
    }
}

/// Opens the device `config` names, lets it DMA into all of `ram`, and plugs it into `root`
/// with its interrupts routed through KVM and its mappable BAR memory mapped into the guest.
/// A device with an INTx line gets it on IOAPIC pin `intx_gsi` (an error if there is none
/// left), which is written to its interrupt line register as firmware would.
pub fn attach(
    config: &VfioConfig,
    vm: &Arc<VmFd>,
    ram: &GuestRam,
    root: &mut PciRoot,
    kernel: &mut KernelVfioContext,
    mapper: &Arc<KvmDirectMapper>,
    intx_gsi: Option<u32>,
) -> Result<AttachedVfio, String> {
    let backend: Arc<dyn VfioBackend> = match config {
        VfioConfig::Kernel(path) => {
            if kernel.is_none() {
                *kernel = Some(KernelVfio::new(vm).map_err(|e| e.to_string())?);
            }
            let vfio = kernel.as_ref().ok_or("no kernel VFIO context")?;
            Arc::new(vfio.open(path).map_err(|e| e.to_string())?)
        }
        VfioConfig::User(socket) => Arc::new(
            VfioUserBackend::connect(socket)
                .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?,
        ),
    };
    let dma = DmaMappings {
        regions: dma_map_guest_memory(backend.as_ref(), ram.memory())
            .map_err(|e| format!("DMA mapping of guest RAM: {e}"))?,
        backend: backend.clone(),
    };
    let router: &Arc<KvmGsiRouter> = root.router();
    let device = VfioPciDevice::new(
        backend,
        VfioPciOptions {
            interrupts: Some(router),
            direct_mapper: Some(mapper.clone()),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let intx = if device.interrupt_pin() != 0 {
        let gsi = intx_gsi.ok_or("no IOAPIC pin left for its INTx line (too many devices)")?;
        Some(connect_intx(vm, &device, gsi)?)
    } else {
        None
    };
    let device = Arc::new(device);
    let address = root.add(device.clone(), Vec::new())?;
    Ok(AttachedVfio {
        device,
        _dma: dma,
        address,
        intx,
    })
}

/// Wires the device's INTx line to IOAPIC pin `gsi` through an irqfd with a resample
/// eventfd: KVM raises the pin when the device signals, and signals the resample eventfd
/// when the guest ends the interrupt, so the device unmasks its line (level-triggered).
fn connect_intx(
    vm: &VmFd,
    device: &VfioPciDevice,
    gsi: u32,
) -> Result<(u32, EventFd, EventFd), String> {
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"));
    let (trigger, resample) = (eventfd()?, eventfd()?);
    vm.register_irqfd_with_resample(&trigger, &resample, gsi)
        .map_err(|e| format!("INTx irqfd on GSI {gsi}: {e}"))?;
    device
        .connect_intx(&trigger, &resample)
        .map_err(|e| format!("INTx: {e}"))?;
    // The interrupt line register tells the guest the pin, as firmware would set it.
    vmkit_pci_passthrough::PciDevice::write_config(device, PCI_INTERRUPT_LINE, &[gsi as u8]);
    Ok((gsi, trigger, resample))
}
