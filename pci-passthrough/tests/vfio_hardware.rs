//! Kernel VFIO against a real PCI function. Opt-in: it needs /dev/kvm, an IOMMU, a spare
//! device bound to vfio-pci and access to /dev/vfio (root). Without `VMKIT_VFIO_DEVICE` it
//! prints SKIPPED and passes.
//!
//! To run it on `DDDD:BB:DD.F` (as root; the device is reset, so not one the host needs):
//!
//! ```text
//! modprobe vfio-pci
//! echo DDDD:BB:DD.F > /sys/bus/pci/devices/DDDD:BB:DD.F/driver/unbind
//! echo vfio-pci > /sys/bus/pci/devices/DDDD:BB:DD.F/driver_override
//! echo DDDD:BB:DD.F > /sys/bus/pci/drivers_probe
//! VMKIT_VFIO_DEVICE=/sys/bus/pci/devices/DDDD:BB:DD.F \
//!     cargo test -p vmkit-pci-passthrough --test vfio_hardware -- --nocapture
//! ```
//!
//! Every device of the IOMMU group must be bound to vfio-pci (or to no driver). Undo with
//! `echo > .../driver_override`, unbind from vfio-pci and probe again.

use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;
use vmkit_pci_passthrough::vfio::backend::{
    BackendError, DmaRegion, VfioBackend, CONFIG_REGION, INTX_IRQ, MSIX_IRQ, PCI_REGIONS,
    ROM_REGION,
};
use vmkit_pci_passthrough::vfio::kernel::KernelVfio;
use vmm_sys_util::eventfd::EventFd;

const SKIP_MESSAGE: &str = "SKIPPED: set VMKIT_VFIO_DEVICE=/sys/bus/pci/devices/... to a \
                            device bound to vfio-pci to run the passthrough hardware test";

/// Guest RAM stand-in: a private anonymous mapping, unmapped on drop.
struct AnonymousMemory {
    address: *mut libc::c_void,
    size: usize,
}

impl AnonymousMemory {
    fn new(size: usize) -> Self {
        // SAFETY: a fresh private mapping at an address the kernel picks.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            address,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        AnonymousMemory { address, size }
    }
}

impl Drop for AnonymousMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.address, self.size) };
    }
}

/// A hexadecimal sysfs attribute such as `vendor` ("0x8086\n").
fn sysfs_hex(path: &Path, attribute: &str) -> u64 {
    let text = std::fs::read_to_string(path.join(attribute))
        .unwrap_or_else(|e| panic!("{}/{attribute}: {e}", path.display()));
    let text = text.trim();
    u64::from_str_radix(text.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("{}/{attribute} = {text:?}: {e}", path.display()))
}

/// The sizes of BARs 0-5 from sysfs's `resource` file ("start end flags" per line).
fn sysfs_bar_sizes(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path.join("resource")).expect("sysfs resource file");
    text.lines()
        .take(6)
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .map(|field| u64::from_str_radix(field.trim_start_matches("0x"), 16).unwrap())
                .collect();
            match fields.as_slice() {
                [start, end, _] if *end > *start => end - start + 1,
                _ => 0,
            }
        })
        .collect()
}

#[test]
fn kernel_vfio_passthrough_on_real_hardware() {
    let Some(path) = std::env::var_os("VMKIT_VFIO_DEVICE") else {
        println!("{SKIP_MESSAGE}");
        return;
    };
    let path = PathBuf::from(path);
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create a KVM VM");
    let vfio = KernelVfio::new(&vm).unwrap_or_else(|e| panic!("{e}"));
    println!("IOMMU interface: {:?}", vfio.interface());
    let device = vfio.open(&path).unwrap_or_else(|e| panic!("{e}"));
    let info = device.device_info();
    println!("{info:?}");
    assert!(info.num_regions >= PCI_REGIONS);

    // Configuration space: the IDs match sysfs's, and reads past the end are refused.
    let mut ids = [0u8; 4];
    device.region_read(CONFIG_REGION, 0, &mut ids).unwrap();
    assert_eq!(
        u64::from(u16::from_le_bytes([ids[0], ids[1]])),
        sysfs_hex(&path, "vendor")
    );
    assert_eq!(
        u64::from(u16::from_le_bytes([ids[2], ids[3]])),
        sysfs_hex(&path, "device")
    );
    let config = device.region_info(CONFIG_REGION).unwrap();
    assert!(
        config.size >= 256 && config.read && config.write,
        "{config:?}"
    );
    assert!(matches!(
        device.region_read(CONFIG_REGION, config.size - 1, &mut ids),
        Err(BackendError::OutOfRange(_))
    ));

    // Regions: BAR sizes match sysfs's; map the first page of a mappable area.
    let bar_sizes = sysfs_bar_sizes(&path);
    let mut mapped = false;
    for index in 0..PCI_REGIONS {
        let region = device.region_info(index).unwrap();
        println!("{region:?}");
        if index < ROM_REGION {
            assert_eq!(region.size, bar_sizes[index as usize], "BAR {index}");
        }
        if let Some(&(offset, size)) = region.mappable_areas().first() {
            if !mapped && size >= 4096 {
                let area = device.map_region(index, offset, 4096).unwrap();
                assert_eq!(area.size(), 4096);
                assert!(!area.host_address().is_null());
                mapped = true;
            }
        }
    }
    assert!(matches!(
        device.region_info(info.num_regions.max(64)),
        Err(BackendError::OutOfRange(_))
    ));

    // Interrupts: connect and disconnect INTx (with its unmask eventfd) and MSI-X.
    for index in 0..info.num_irqs.min(3) {
        println!("{:?}", device.irq_info(index).unwrap());
    }
    let trigger = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    if device.irq_info(INTX_IRQ).unwrap().count == 1 {
        device.set_irqs(INTX_IRQ, 0, &[&trigger]).unwrap();
        device.set_intx_unmask(&resample).unwrap();
        device.set_irqs(INTX_IRQ, 0, &[]).unwrap();
    }
    let msix = device.irq_info(MSIX_IRQ).unwrap();
    if msix.count > 0 {
        device.set_irqs(MSIX_IRQ, 0, &[&trigger]).unwrap();
        if msix.count > 1 {
            // One vector at a time, not from 0 (kernels before 6.5 cannot grow an enabled
            // MSI-X index and say so with EINVAL).
            match device.set_irqs(MSIX_IRQ, 1, &[&trigger]) {
                Ok(()) => {}
                Err(BackendError::Host { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    println!("this kernel cannot add MSI-X vectors to an enabled index")
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(matches!(
            device.set_irqs(MSIX_IRQ, msix.count, &[&trigger]),
            Err(BackendError::OutOfRange(_))
        ));
        device.set_irqs(MSIX_IRQ, 0, &[]).unwrap();
    }

    // DMA: map "guest RAM" twice (as two devices sharing the address space would), unmap
    // it twice, and a third unmap has nothing left to unmap.
    let ram = AnonymousMemory::new(2 << 20);
    let region = DmaRegion {
        iova: 1 << 30,
        size: ram.size as u64,
        host_address: ram.address as u64,
        fd: None,
    };
    device.dma_map(&region).unwrap();
    device.dma_map(&region).unwrap();
    device.dma_unmap(region.iova, region.size).unwrap();
    device.dma_unmap(region.iova, region.size).unwrap();
    assert!(matches!(
        device.dma_unmap(region.iova, region.size),
        Err(BackendError::OutOfRange(_))
    ));

    // Reset, where the device can be reset; the device still answers afterwards.
    if info.reset {
        device.reset().unwrap();
    } else {
        assert!(matches!(device.reset(), Err(BackendError::Unsupported(_))));
    }
    let mut vendor = [0u8; 2];
    device.region_read(CONFIG_REGION, 0, &mut vendor).unwrap();
    assert_eq!(
        u64::from(u16::from_le_bytes(vendor)),
        sysfs_hex(&path, "vendor")
    );

    // The device closes and its group goes back before the memory it could DMA into.
    drop(device);
    drop(ram);
}
