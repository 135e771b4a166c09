//! The kernel's VFIO as a [`VfioBackend`], on vfio-ioctls.
//!
//! [`KernelVfio`] is one VM's IOMMU address space: a VFIO container (`/dev/vfio/vfio`, the
//! group API) or an iommufd IOAS (`/dev/iommu` with VFIO device cdevs,
//! `/dev/vfio/devices/vfioN`), plus the KVM VFIO pseudo-device that tells KVM which VFIO
//! files the VM uses. [`KernelVfio::new`] takes iommufd where the kernel has it (both
//! `/dev/iommu` and `/dev/vfio/devices` exist) and the container otherwise;
//! [`KernelVfio::with_interface`] forces one. [`KernelVfio::open`] checks a device in sysfs
//! (exists, is PCI, is bound to vfio-pci, has an IOMMU group) with an error naming the path
//! for each, then opens it as a [`KernelVfioBackend`].
//!
//! Binding a device to vfio-pci (as root):
//!
//! ```text
//! modprobe vfio-pci
//! echo 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind
//! echo vfio-pci > /sys/bus/pci/devices/0000:01:00.0/driver_override
//! echo 0000:01:00.0 > /sys/bus/pci/drivers_probe
//! ```
//!
//! Every device of the IOMMU group must be bound to vfio-pci (or to no driver), and an
//! IOMMU must be on (`intel_iommu=on` or `amd_iommu=on`): VFIO's no-IOMMU mode is not
//! supported.
//!
//! What vfio-ioctls does and what this does itself:
//! - vfio-ioctls opens the container or iommufd, attaches groups or cdevs, opens the device
//!   and maps DMA.
//! - Region and device information, region reads and writes, interrupt setup and reset go
//!   straight to the device fd (the ioctls, `pread`/`pwrite`), because vfio-ioctls logs
//!   those errors instead of returning them, enables interrupts only from vector 0, and
//!   trusts the kernel's capability chains without bounds checks.
//!
//! DMA mappings belong to the address space, which every device of the VM shares, while
//! [`VfioBackend::dma_map`] is called per device. The address space therefore counts
//! references per identical `(iova, size)` range: the first map reaches the kernel, later
//! ones with the same host address only count, and the last unmap (or the drop of the last
//! device that mapped it) unmaps it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::mem::{size_of, ManuallyDrop};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_set, vfio_region_info, VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError, VfioIommufd, VfioOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr};

use super::backend::{
    BackendError, BackendResult, DeviceInfo, DmaRegion, IrqInfo, MappedArea, RegionInfo,
    VfioBackend, INTX_IRQ, PCI_REGIONS,
};

/// The device ioctls issued here directly (the macro makes `pub fn`s; this keeps them out
/// of the crate's API).
mod ioctls {
    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};

    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);
}
use ioctls::{
    VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_RESET, VFIO_DEVICE_SET_IRQS,
};

/// Regions looked at past the PCI ones (device-specific regions: IGD OpRegion and the
/// like). The kernel's count is trusted only this far.
const MAX_REGIONS: u32 = 64;
/// Capability chains longer than this are cut off (the kernel's have a handful).
const MAX_REGION_CAPS: usize = 64;
/// A region information reply with capabilities is at most this big (a guard against a
/// nonsensical `argsz`; a sparse-mmap list of 4096 areas is 64 KiB).
const MAX_REGION_INFO_SIZE: u32 = 1 << 20;

/// Errors of opening the kernel's VFIO or a device through it.
#[derive(Debug, thiserror::Error)]
pub enum KernelVfioError {
    /// No VFIO container device node.
    #[error("no {}: load vfio-pci (modprobe vfio-pci) and bind the device to it", path.display())]
    NoVfio {
        /// The missing node (`/dev/vfio/vfio`).
        path: PathBuf,
    },
    /// iommufd was asked for but the kernel does not offer it.
    #[error(
        "no {}: the kernel has no iommufd (CONFIG_IOMMUFD) or no VFIO device cdevs \
         (CONFIG_VFIO_DEVICE_CDEV)",
        path.display()
    )]
    NoIommufd {
        /// The missing node (`/dev/iommu` or `/dev/vfio/devices`).
        path: PathBuf,
    },
    /// The KVM VFIO pseudo-device could not be created.
    #[error("cannot create the KVM VFIO device (KVM_CREATE_DEVICE): {0}")]
    KvmDevice(#[source] io::Error),
    /// The container has no usable IOMMU.
    #[error(
        "the VFIO container offers no Type1v2 IOMMU: load vfio_iommu_type1 and turn the IOMMU \
         on (intel_iommu=on or amd_iommu=on on the kernel command line); VFIO's no-IOMMU mode \
         is not supported"
    )]
    NoIommu,
    /// The container could not be opened.
    #[error("cannot open the VFIO container: {0}")]
    Container(#[source] VfioError),
    /// The iommufd or its IOAS could not be set up.
    #[error("cannot set up iommufd: {0}")]
    Iommufd(#[source] VfioError),
    /// Nothing at the sysfs path.
    #[error("no device at {}", path.display())]
    NoDevice {
        /// The sysfs path given.
        path: PathBuf,
    },
    /// The sysfs path is not a PCI device.
    #[error("{} is not a PCI device (its subsystem is not pci)", path.display())]
    NotPci {
        /// The sysfs path given.
        path: PathBuf,
    },
    /// The device is not bound to vfio-pci.
    #[error(
        "{} is {}, not to vfio-pci: unbind it, write vfio-pci to its driver_override and its \
         address to /sys/bus/pci/drivers_probe",
        path.display(),
        match driver { Some(driver) => format!("bound to {driver}"), None => "bound to no driver".into() }
    )]
    NotBound {
        /// The sysfs path given.
        path: PathBuf,
        /// The driver it is bound to, if any.
        driver: Option<String>,
    },
    /// The device has no IOMMU group.
    #[error(
        "{} has no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on)",
        path.display()
    )]
    NoIommuGroup {
        /// The sysfs path given.
        path: PathBuf,
    },
    /// The device has no VFIO cdev (iommufd needs one).
    #[error("{} has no VFIO device cdev (no vfio-dev directory)", path.display())]
    NoCdev {
        /// The sysfs path given.
        path: PathBuf,
    },
    /// The group's device node could not be opened.
    #[error("cannot open /dev/vfio/{group}, the VFIO group of {}: {source}", path.display())]
    GroupOpen {
        /// The sysfs path given.
        path: PathBuf,
        /// The IOMMU group.
        group: u32,
        /// Why.
        source: io::Error,
    },
    /// Another device of the group is bound to a host driver.
    #[error(
        "IOMMU group {group} of {} is not viable: bind every device of the group to vfio-pci \
         or to no driver (the group has: {members})",
        path.display()
    )]
    GroupNotViable {
        /// The sysfs path given.
        path: PathBuf,
        /// The IOMMU group.
        group: u32,
        /// The group's devices and their drivers.
        members: String,
    },
    /// VFIO refused to open the device.
    #[error("cannot open {} through VFIO: {source}", path.display())]
    Open {
        /// The sysfs path given.
        path: PathBuf,
        /// Why.
        source: VfioError,
    },
    /// The device's description could not be read or makes no sense.
    #[error("cannot describe {}: {source}", path.display())]
    Describe {
        /// The sysfs path given.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The kernel interface behind a VM's IOMMU address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuInterface {
    /// The VFIO container and groups (`/dev/vfio/vfio`, `/dev/vfio/N`).
    Container,
    /// iommufd and VFIO device cdevs (`/dev/iommu`, `/dev/vfio/devices/vfioN`).
    Iommufd,
}

/// Where the device nodes are (`/dev`, or a fake tree in tests).
struct DevNodes {
    vfio_dir: PathBuf,
    iommu: PathBuf,
}

impl DevNodes {
    fn host() -> Self {
        DevNodes {
            vfio_dir: PathBuf::from("/dev/vfio"),
            iommu: PathBuf::from("/dev/iommu"),
        }
    }

    /// The interface to use: `wanted`, or iommufd when the kernel has it and the container
    /// otherwise; an error naming the missing node when neither is there.
    fn choose(&self, wanted: Option<IommuInterface>) -> Result<IommuInterface, KernelVfioError> {
        let container = self.vfio_dir.join("vfio");
        let cdevs = self.vfio_dir.join("devices");
        let use_iommufd = match wanted {
            Some(IommuInterface::Iommufd) => {
                if !self.iommu.exists() {
                    return Err(KernelVfioError::NoIommufd {
                        path: self.iommu.clone(),
                    });
                }
                if !cdevs.is_dir() {
                    return Err(KernelVfioError::NoIommufd { path: cdevs });
                }
                true
            }
            Some(IommuInterface::Container) => false,
            None => self.iommu.exists() && cdevs.is_dir(),
        };
        if use_iommufd {
            Ok(IommuInterface::Iommufd)
        } else if container.exists() {
            Ok(IommuInterface::Container)
        } else {
            Err(KernelVfioError::NoVfio { path: container })
        }
    }
}

/// One VM's IOMMU address space in the kernel (a VFIO container or an iommufd IOAS) and
/// its KVM VFIO device. Open every kernel VFIO device of the VM through the same one.
pub struct KernelVfio {
    interface: IommuInterface,
    dma: Arc<DmaSpace>,
}

impl KernelVfio {
    /// The address space for `vm`: iommufd when the kernel has it, else a VFIO container.
    pub fn new(vm: &VmFd) -> Result<Self, KernelVfioError> {
        Self::open_interface(vm, &DevNodes::host(), None)
    }

    /// The address space for `vm` through `interface`.
    pub fn with_interface(vm: &VmFd, interface: IommuInterface) -> Result<Self, KernelVfioError> {
        Self::open_interface(vm, &DevNodes::host(), Some(interface))
    }

    fn open_interface(
        vm: &VmFd,
        nodes: &DevNodes,
        wanted: Option<IommuInterface>,
    ) -> Result<Self, KernelVfioError> {
        // Check the nodes first: without VFIO, that is the error worth reporting.
        let interface = nodes.choose(wanted)?;
        let mut create = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_device = vm
            .create_device(&mut create)
            .map_err(|e| KernelVfioError::KvmDevice(io::Error::from_raw_os_error(e.errno())))?;
        let kvm_device = Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_device)));
        let ops: Arc<dyn VfioOps> = match interface {
            IommuInterface::Container => {
                Arc::new(VfioContainer::new(kvm_device).map_err(|e| match e {
                    VfioError::VfioExtension => KernelVfioError::NoIommu,
                    e => KernelVfioError::Container(e),
                })?)
            }
            IommuInterface::Iommufd => {
                let iommufd = iommufd_ioctls::IommuFd::new()
                    .map_err(|e| KernelVfioError::Iommufd(VfioError::NewVfioIommufd(e)))?;
                Arc::new(
                    VfioIommufd::new(Arc::new(iommufd), None, kvm_device)
                        .map_err(KernelVfioError::Iommufd)?,
                )
            }
        };
        Ok(KernelVfio {
            interface,
            dma: Arc::new(DmaSpace {
                ops,
                mappings: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Which kernel interface this uses.
    pub fn interface(&self) -> IommuInterface {
        self.interface
    }

    /// Opens the PCI function at `sysfs_path` (`/sys/bus/pci/devices/DDDD:BB:DD.F`), which
    /// must be bound to vfio-pci. The device may outlive `self`.
    pub fn open(&self, sysfs_path: impl AsRef<Path>) -> Result<KernelVfioBackend, KernelVfioError> {
        let path = sysfs_path.as_ref();
        let sysfs = check_sysfs_device(path)?;
        if self.interface == IommuInterface::Iommufd && !sysfs.has_cdev {
            return Err(KernelVfioError::NoCdev { path: path.into() });
        }
        let device = VfioDevice::new(path, self.dma.ops.clone(), true).map_err(|e| match e {
            VfioError::OpenGroup(source, _) => KernelVfioError::GroupOpen {
                path: path.into(),
                group: sysfs.group,
                source,
            },
            VfioError::GroupViable => KernelVfioError::GroupNotViable {
                path: path.into(),
                group: sysfs.group,
                members: describe_group(path),
            },
            source => KernelVfioError::Open {
                path: path.into(),
                source,
            },
        })?;
        let describe = |source| KernelVfioError::Describe {
            path: path.into(),
            source,
        };
        let raw_info = query_device_info(&device).map_err(describe)?;
        if raw_info.flags & VFIO_DEVICE_FLAGS_PCI == 0 || raw_info.num_regions < PCI_REGIONS {
            return Err(describe(io::Error::other(format!(
                "not a VFIO PCI device (flags {:#x}, {} regions)",
                raw_info.flags, raw_info.num_regions
            ))));
        }
        let mut regions = Vec::new();
        for index in 0..raw_info.num_regions.min(MAX_REGIONS) {
            match query_region(&device, index) {
                Ok(region) => regions.push(Some(region)),
                // Regions past the PCI ones are optional (the VGA region is EINVAL on
                // everything that is not a VGA device).
                Err(e) if index >= PCI_REGIONS => {
                    log::debug!("{}: no region {index}: {e}", path.display());
                    regions.push(None);
                }
                Err(e) => return Err(describe(e)),
            }
        }
        Ok(KernelVfioBackend {
            path: path.into(),
            info: DeviceInfo {
                num_regions: raw_info.num_regions,
                num_irqs: raw_info.num_irqs,
                reset: raw_info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
            },
            regions,
            interface: self.interface,
            dma: self.dma.clone(),
            dma_refs: Mutex::new(Vec::new()),
            device: ManuallyDrop::new(device),
        })
    }
}

impl std::fmt::Debug for KernelVfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelVfio")
            .field("interface", &self.interface)
            .finish()
    }
}

/// Locks, ignoring poisoning: the guarded maps change in single steps that leave them
/// consistent even if a thread panicked in between.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The IOMMU address space shared by the VM's devices, with its mappings counted.
struct DmaSpace {
    ops: Arc<dyn VfioOps>,
    /// `(iova, size)` -> (host address, references).
    mappings: Mutex<HashMap<(u64, u64), (u64, usize)>>,
}

impl DmaSpace {
    fn map(&self, iova: u64, size: u64, host_address: u64) -> BackendResult<()> {
        let mut mappings = lock(&self.mappings);
        if let Some((mapped_address, references)) = mappings.get_mut(&(iova, size)) {
            if *mapped_address != host_address {
                return Err(BackendError::OutOfRange(format!(
                    "IOVA {iova:#x}+{size:#x} is already mapped to host address \
                     {mapped_address:#x}, not {host_address:#x}"
                )));
            }
            *references += 1;
            return Ok(());
        }
        let length = usize::try_from(size)
            .map_err(|_| BackendError::OutOfRange(format!("DMA size {size:#x} too big")))?;
        let user_address = usize::try_from(host_address).map_err(|_| {
            BackendError::OutOfRange(format!("host address {host_address:#x} too big"))
        })? as *mut u8;
        // SAFETY: the caller hands guest RAM that stays mapped while it is mapped for DMA
        // (the `DmaRegion` contract) and that Rust code reaches only through volatile or
        // guest-memory accessors, since the guest writes it at any time anyway. The kernel
        // pins the pages, so even an early munmap cannot let the device reach reused memory.
        unsafe { self.ops.vfio_dma_map(iova, length, user_address) }
            .map_err(|e| host_error("VFIO DMA map", vfio_io_error(e)))?;
        mappings.insert((iova, size), (host_address, 1));
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> BackendResult<()> {
        let mut mappings = lock(&self.mappings);
        let Some((_, references)) = mappings.get_mut(&(iova, size)) else {
            return Err(BackendError::OutOfRange(format!(
                "IOVA {iova:#x}+{size:#x} is not mapped"
            )));
        };
        if *references > 1 {
            *references -= 1;
            return Ok(());
        }
        // The map succeeded with this size, so it fits in usize.
        let length = usize::try_from(size).unwrap_or(usize::MAX);
        // Forgotten only once the kernel let go of it, so a failed unmap can be retried.
        self.ops
            .vfio_dma_unmap(iova, length)
            .map_err(|e| host_error("VFIO DMA unmap", vfio_io_error(e)))?;
        mappings.remove(&(iova, size));
        Ok(())
    }
}

/// The errno inside a vfio-ioctls error where there is one.
fn vfio_io_error(error: VfioError) -> io::Error {
    use iommufd_ioctls::IommufdError;
    match error {
        VfioError::IommuDmaMap(e) | VfioError::IommuDmaUnmap(e) => {
            io::Error::from_raw_os_error(e.errno())
        }
        VfioError::IommufdIoctlError(
            IommufdError::IommuIoasMap(e) | IommufdError::IommuIoasUnmap(e),
        ) => io::Error::from_raw_os_error(e.errno()),
        other => io::Error::other(other),
    }
}

/// A failed host call; ENODEV (the device was removed) becomes [`BackendError::Gone`].
fn host_error(operation: &'static str, source: io::Error) -> BackendError {
    if source.raw_os_error() == Some(libc::ENODEV) {
        BackendError::Gone(format!("{operation}: {source}"))
    } else {
        BackendError::Host { operation, source }
    }
}

/// A region as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KernelRegion {
    info: RegionInfo,
    /// Where the region starts in the device fd (for pread, pwrite and mmap).
    fd_offset: u64,
}

/// A PCI function opened through the kernel's VFIO.
///
/// Interrupts: [`VfioBackend::set_irqs`] issues `VFIO_DEVICE_SET_IRQS` for exactly the
/// vectors given (`start` included), so the device model can connect MSI-X vectors one at a
/// time; the kernel enables the index with `start + len` vectors the first time.
pub struct KernelVfioBackend {
    path: PathBuf,
    info: DeviceInfo,
    /// By region index; `None` where the kernel has no such region.
    regions: Vec<Option<KernelRegion>>,
    interface: IommuInterface,
    dma: Arc<DmaSpace>,
    /// The `(iova, size)` mappings this device holds references to (one entry each).
    dma_refs: Mutex<Vec<(u64, u64)>>,
    /// Dropped by hand: see `Drop`.
    device: ManuallyDrop<VfioDevice>,
}

impl KernelVfioBackend {
    /// The sysfs path the device was opened from.
    pub fn sysfs_path(&self) -> &Path {
        &self.path
    }

    /// The device fd as a `File` for positioned reads and writes, without taking it over.
    fn device_file(&self) -> ManuallyDrop<File> {
        // SAFETY: the fd belongs to `self.device`, open for as long as `self`; ManuallyDrop
        // keeps this `File` from closing it.
        ManuallyDrop::new(unsafe { File::from_raw_fd(self.device.as_raw_fd()) })
    }

    fn region(&self, index: u32) -> BackendResult<&KernelRegion> {
        self.regions
            .get(index as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| BackendError::OutOfRange(format!("no region {index}")))
    }

    /// Checks that `[offset, offset + len)` lies inside the region.
    fn check_range(region: &KernelRegion, offset: u64, len: usize) -> BackendResult<u64> {
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len));
        match end {
            Some(end) if end <= region.info.size => region
                .fd_offset
                .checked_add(offset)
                .ok_or_else(|| BackendError::OutOfRange("region offset overflows".into())),
            _ => Err(BackendError::OutOfRange(format!(
                "{len} bytes at {offset:#x} leave region {} ({:#x} bytes)",
                region.info.index, region.info.size
            ))),
        }
    }

    fn irq(&self, index: u32) -> BackendResult<vfio_ioctls::VfioIrq> {
        if index >= self.info.num_irqs {
            return Err(BackendError::OutOfRange(format!(
                "no interrupt index {index}"
            )));
        }
        self.device
            .get_irq_info(index)
            .copied()
            .ok_or_else(|| BackendError::OutOfRange(format!("no interrupt index {index}")))
    }

    /// `VFIO_DEVICE_SET_IRQS` with `fds` as the data (eventfds), or none.
    fn set_irqs_ioctl(&self, flags: u32, index: u32, start: u32, fds: &[RawFd]) -> io::Result<()> {
        const HEADER_WORDS: usize = size_of::<vfio_irq_set>() / size_of::<u32>();
        const _: () = assert!(size_of::<vfio_irq_set>() == 5 * size_of::<u32>());
        let too_many = || io::Error::from_raw_os_error(libc::EINVAL);
        let count = u32::try_from(fds.len()).map_err(|_| too_many())?;
        let argsz =
            u32::try_from((HEADER_WORDS + fds.len()) * size_of::<u32>()).map_err(|_| too_many())?;
        // vfio_irq_set is five u32 fields followed by the data: here `count` s32 fds.
        let mut words = Vec::with_capacity(HEADER_WORDS + fds.len());
        words.extend_from_slice(&[argsz, flags, index, start, count]);
        words.extend(fds.iter().map(|&fd| fd as u32));
        // SAFETY: `words` is a vfio_irq_set of `argsz` bytes (header plus `count` fds, as
        // flags say), u32-aligned; the kernel only reads it, and checks the fds itself.
        let ret = unsafe {
            ioctl_with_ptr(
                &*self.device,
                VFIO_DEVICE_SET_IRQS(),
                words.as_ptr().cast::<vfio_irq_set>(),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl VfioBackend for KernelVfioBackend {
    fn device_info(&self) -> DeviceInfo {
        self.info
    }

    fn region_info(&self, index: u32) -> BackendResult<RegionInfo> {
        Ok(self.region(index)?.info.clone())
    }

    fn irq_info(&self, index: u32) -> BackendResult<IrqInfo> {
        let irq = self.irq(index)?;
        Ok(IrqInfo {
            index,
            count: irq.count,
            eventfd: irq.flags & VFIO_IRQ_INFO_EVENTFD != 0,
            automasked: irq.flags & VFIO_IRQ_INFO_AUTOMASKED != 0,
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> BackendResult<()> {
        let region = self.region(index)?;
        if !region.info.read {
            return Err(BackendError::Unsupported(
                "reading a region that is not readable",
            ));
        }
        let position = Self::check_range(region, offset, data.len())?;
        self.device_file()
            .read_exact_at(data, position)
            .map_err(|e| host_error("VFIO region read", e))
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> BackendResult<()> {
        let region = self.region(index)?;
        if !region.info.write {
            return Err(BackendError::Unsupported(
                "writing a region that is not writable",
            ));
        }
        let position = Self::check_range(region, offset, data.len())?;
        self.device_file()
            .write_all_at(data, position)
            .map_err(|e| host_error("VFIO region write", e))
    }

    fn map_region(&self, index: u32, offset: u64, size: u64) -> BackendResult<MappedArea> {
        let region = self.region(index)?;
        let length = check_map_request(&region.info, offset, size, page_size())?;
        let position = Self::check_range(region, offset, length)?;
        MappedArea::mmap_fd(self.device.as_raw_fd(), position, length)
            .map_err(|e| host_error("mmap of a VFIO region", e))
    }

    fn set_irqs(&self, index: u32, start: u32, eventfds: &[&EventFd]) -> BackendResult<()> {
        let irq = self.irq(index)?;
        if eventfds.is_empty() {
            return self
                .set_irqs_ioctl(
                    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                    index,
                    0,
                    &[],
                )
                .map_err(|e| host_error("VFIO_DEVICE_SET_IRQS (disable)", e));
        }
        check_vectors(&irq, start, eventfds.len())?;
        let fds: Vec<RawFd> = eventfds.iter().map(|fd| fd.as_raw_fd()).collect();
        self.set_irqs_ioctl(
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            &fds,
        )
        .map_err(|e| host_error("VFIO_DEVICE_SET_IRQS", e))
    }

    fn set_intx_unmask(&self, resample: &EventFd) -> BackendResult<()> {
        if self.irq(INTX_IRQ)?.count == 0 {
            return Err(BackendError::OutOfRange("the device has no INTx".into()));
        }
        self.set_irqs_ioctl(
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
            INTX_IRQ,
            0,
            &[resample.as_raw_fd()],
        )
        .map_err(|e| host_error("VFIO_DEVICE_SET_IRQS (INTx unmask)", e))
    }

    fn reset(&self) -> BackendResult<()> {
        if !self.info.reset {
            return Err(BackendError::Unsupported(
                "the device cannot be reset (no VFIO_DEVICE_FLAGS_RESET)",
            ));
        }
        // SAFETY: VFIO_DEVICE_RESET on the device fd takes no argument.
        let ret = unsafe { ioctl(&*self.device, VFIO_DEVICE_RESET()) };
        if ret < 0 {
            return Err(host_error("VFIO_DEVICE_RESET", io::Error::last_os_error()));
        }
        Ok(())
    }

    fn dma_map(&self, region: &DmaRegion) -> BackendResult<()> {
        if region.size == 0 || region.iova.checked_add(region.size).is_none() {
            return Err(BackendError::OutOfRange(format!(
                "invalid DMA range {:#x}+{:#x}",
                region.iova, region.size
            )));
        }
        if region.host_address == 0 {
            return Err(BackendError::OutOfRange("DMA host address 0".into()));
        }
        let mut refs = lock(&self.dma_refs);
        self.dma
            .map(region.iova, region.size, region.host_address)?;
        refs.push((region.iova, region.size));
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> BackendResult<()> {
        let mut refs = lock(&self.dma_refs);
        let Some(position) = refs.iter().position(|&r| r == (iova, size)) else {
            return Err(BackendError::OutOfRange(format!(
                "IOVA {iova:#x}+{size:#x} is not mapped by this device"
            )));
        };
        self.dma.unmap(iova, size)?;
        refs.swap_remove(position);
        Ok(())
    }
}

impl Drop for KernelVfioBackend {
    fn drop(&mut self) {
        for (iova, size) in lock(&self.dma_refs).drain(..) {
            if let Err(e) = self.dma.unmap(iova, size) {
                log::warn!(
                    "{}: DMA unmap of {iova:#x}+{size:#x}: {e}",
                    self.path.display()
                );
            }
        }
        // vfio-ioctls re-reads the sysfs iommu_group link when a container device is
        // dropped and panics if it is gone (the device was removed from the host). Leak the
        // device then (its fd and group stay open until exit) rather than panic.
        if self.interface == IommuInterface::Container
            && self.path.join("iommu_group").read_link().is_err()
        {
            log::error!(
                "{}: gone from sysfs, leaving its VFIO device open",
                self.path.display()
            );
            return;
        }
        // SAFETY: dropped once, here, and not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.device) };
    }
}

impl std::fmt::Debug for KernelVfioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelVfioBackend")
            .field("path", &self.path)
            .field("interface", &self.interface)
            .field("info", &self.info)
            .finish()
    }
}

/// Checks a [`VfioBackend::map_region`] request against the region: a non-empty,
/// page-aligned part of one mappable area. Returns the size as usize.
fn check_map_request(info: &RegionInfo, offset: u64, size: u64, page: u64) -> BackendResult<usize> {
    let end = offset.checked_add(size);
    let inside_an_area = info
        .mappable_areas()
        .iter()
        .any(|&(area_offset, area_size)| {
            offset >= area_offset
                && end.is_some_and(|end| Some(end) <= area_offset.checked_add(area_size))
        });
    if size == 0 || !inside_an_area {
        return Err(BackendError::OutOfRange(format!(
            "{size:#x} bytes at {offset:#x} of region {} are not inside a mappable area",
            info.index
        )));
    }
    if offset % page != 0 {
        return Err(BackendError::OutOfRange(format!(
            "mmap offset {offset:#x} is not page-aligned"
        )));
    }
    usize::try_from(size)
        .map_err(|_| BackendError::OutOfRange(format!("mmap size {size:#x} too big")))
}

/// Checks that vectors `start..start + len` exist in `irq`.
fn check_vectors(irq: &vfio_ioctls::VfioIrq, start: u32, len: usize) -> BackendResult<()> {
    let end = u32::try_from(len)
        .ok()
        .and_then(|len| start.checked_add(len));
    if end.is_some_and(|end| end <= irq.count) {
        Ok(())
    } else {
        Err(BackendError::OutOfRange(format!(
            "vectors {start}..{start}+{len} of interrupt index {}, which has {}",
            irq.index, irq.count
        )))
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096).max(1)
}

/// VFIO_DEVICE_GET_INFO.
fn query_device_info(device: &VfioDevice) -> io::Result<vfio_device_info> {
    let mut info = vfio_device_info {
        argsz: size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most `argsz` bytes into `info`, which is that big.
    let ret = unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// VFIO_DEVICE_GET_REGION_INFO for `index`, with its capabilities.
fn query_region(device: &VfioDevice, index: u32) -> io::Result<KernelRegion> {
    const HEADER_SIZE: u32 = size_of::<vfio_region_info>() as u32;
    let mut raw = vfio_region_info {
        argsz: HEADER_SIZE,
        index,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most `argsz` bytes into `raw`, which is that big.
    if unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_REGION_INFO(), &mut raw) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut caps = RegionCaps::default();
    if raw.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && raw.argsz > HEADER_SIZE {
        // The kernel said how big the reply with its capability chain is: ask again with
        // that much room (u64 words, for the alignment of vfio_region_info).
        let argsz = raw.argsz.min(MAX_REGION_INFO_SIZE);
        let mut buffer = vec![0u64; (argsz as usize).div_ceil(size_of::<u64>())];
        let request = vfio_region_info {
            argsz,
            index,
            ..Default::default()
        };
        let header = buffer.as_mut_ptr().cast::<vfio_region_info>();
        // SAFETY: the buffer holds at least HEADER_SIZE bytes and is 8-byte aligned.
        unsafe { header.write(request) };
        // SAFETY: the kernel writes at most `argsz` bytes, the size of the buffer.
        if unsafe { ioctl_with_mut_ptr(device, VFIO_DEVICE_GET_REGION_INFO(), header) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; the kernel filled in the header.
        raw = unsafe { header.read() };
        let bytes: Vec<u8> = buffer.iter().flat_map(|word| word.to_ne_bytes()).collect();
        caps = parse_region_caps(&bytes, raw.cap_offset);
    }
    if raw.offset.checked_add(raw.size).is_none() {
        return Err(io::Error::other(format!(
            "region {index} at {:#x}+{:#x} overflows",
            raw.offset, raw.size
        )));
    }
    Ok(KernelRegion {
        info: region_info(index, raw.flags, raw.size, caps),
        fd_offset: raw.offset,
    })
}

/// What the capability chain of a region says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RegionCaps {
    /// The sparse-mmap areas, if the capability is there (`Some(empty)`: nothing may be
    /// mapped).
    sparse_mmap: Option<Vec<(u64, u64)>>,
    msix_mappable: bool,
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Walks the capability chain of a region information reply (`bytes`, starting with the
/// vfio_region_info header) from `first`. Each capability starts with a
/// vfio_info_cap_header (u16 id, u16 version, u32 next). The chain must move forward and
/// stay inside the reply; where it does not, the walk stops, and a sparse-mmap list that
/// does not fit counts as "nothing mappable" (trapping is always safe).
fn parse_region_caps(bytes: &[u8], first: u32) -> RegionCaps {
    const HEADER_SIZE: usize = size_of::<vfio_region_info>();
    // vfio_region_info_cap_sparse_mmap: header, u32 nr_areas, u32 reserved, then the areas
    // of two u64 (offset, size) each.
    const SPARSE_AREAS_AT: usize = 16;
    const SPARSE_AREA_SIZE: usize = 16;
    let mut caps = RegionCaps::default();
    let mut at = first as usize;
    for _ in 0..MAX_REGION_CAPS {
        if at < HEADER_SIZE {
            break;
        }
        let (Some(id), Some(next)) = (read_u16(bytes, at), read_u32(bytes, at + 4)) else {
            break;
        };
        match u32::from(id) {
            VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                let areas = read_u32(bytes, at + 8).and_then(|count| {
                    (0..count as usize)
                        .map(|i| {
                            let area = at + SPARSE_AREAS_AT + i.checked_mul(SPARSE_AREA_SIZE)?;
                            Some((read_u64(bytes, area)?, read_u64(bytes, area + 8)?))
                        })
                        .collect::<Option<Vec<_>>>()
                });
                caps.sparse_mmap = Some(areas.unwrap_or_default());
            }
            VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => caps.msix_mappable = true,
            _ => {}
        }
        if next as usize <= at {
            break;
        }
        at = next as usize;
    }
    caps
}

/// The backend's view of a region from the kernel's flags, size and capabilities. Sparse
/// areas that are empty or leave the region make the whole region trapped: better slow
/// than mapping what the kernel did not offer.
fn region_info(index: u32, flags: u32, size: u64, caps: RegionCaps) -> RegionInfo {
    let mut mmap = flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && size > 0;
    let mut sparse_mmap = Vec::new();
    if let Some(areas) = caps.sparse_mmap {
        let valid = |&(offset, length): &(u64, u64)| {
            length > 0 && offset.checked_add(length).is_some_and(|end| end <= size)
        };
        if areas.is_empty() || !areas.iter().all(valid) {
            mmap = false;
        } else if mmap {
            sparse_mmap = areas;
        }
    }
    RegionInfo {
        index,
        size,
        read: flags & VFIO_REGION_INFO_FLAG_READ != 0,
        write: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
        mmap,
        sparse_mmap,
        msix_mappable: caps.msix_mappable,
    }
}

/// What sysfs says about a device that may be opened.
#[derive(Debug, PartialEq, Eq)]
struct SysfsDevice {
    group: u32,
    has_cdev: bool,
}

/// The last component of a symlink's target (a driver's or a group's name).
fn link_name(link: &Path) -> Option<String> {
    let target = link.read_link().ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// vfio-pci itself, or a vendor variant of it built on vfio-pci-core (mlx5_vfio_pci...).
fn is_vfio_pci_driver(driver: &str) -> bool {
    driver == "vfio-pci" || driver.ends_with("_vfio_pci")
}

/// Checks that `path` is a PCI device bound to vfio-pci with an IOMMU group.
fn check_sysfs_device(path: &Path) -> Result<SysfsDevice, KernelVfioError> {
    if !path.is_dir() {
        return Err(KernelVfioError::NoDevice { path: path.into() });
    }
    if link_name(&path.join("subsystem")).as_deref() != Some("pci") {
        return Err(KernelVfioError::NotPci { path: path.into() });
    }
    let driver = link_name(&path.join("driver"));
    if !driver.as_deref().is_some_and(is_vfio_pci_driver) {
        return Err(KernelVfioError::NotBound {
            path: path.into(),
            driver,
        });
    }
    let group = link_name(&path.join("iommu_group"))
        .and_then(|name| name.parse().ok())
        .ok_or_else(|| KernelVfioError::NoIommuGroup { path: path.into() })?;
    let has_cdev = path
        .join("vfio-dev")
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some());
    Ok(SysfsDevice { group, has_cdev })
}

/// "0000:01:00.0 (vfio-pci), 0000:01:00.1 (snd_hda_intel)": the devices of the IOMMU group
/// of `path` and their drivers, sorted.
fn describe_group(path: &Path) -> String {
    let Ok(entries) = path.join("iommu_group").join("devices").read_dir() else {
        return "unknown devices".into();
    };
    let mut members: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|entry| {
            let driver = link_name(&entry.path().join("driver"));
            format!(
                "{} ({})",
                entry.file_name().to_string_lossy(),
                driver.as_deref().unwrap_or("no driver")
            )
        })
        .collect();
    members.sort();
    members.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory under the system's temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "vmkit-kernel-vfio-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A sysfs-like tree: `bus/pci/drivers/*`, `kernel/iommu_groups/*/devices/*` and
    /// `devices/<bdf>` with the links the checks follow.
    struct FakeSysfs {
        root: TempDir,
    }

    impl FakeSysfs {
        fn new() -> Self {
            let root = TempDir::new();
            std::fs::create_dir_all(root.0.join("bus/pci/drivers")).unwrap();
            std::fs::create_dir_all(root.0.join("bus/usb")).unwrap();
            FakeSysfs { root }
        }

        /// A device `bdf` on `subsystem`, bound to `driver`, in `group`, with a cdev or not.
        fn device(
            &self,
            bdf: &str,
            subsystem: &str,
            driver: Option<&str>,
            group: Option<u32>,
            cdev: bool,
        ) -> PathBuf {
            let root = &self.root.0;
            let device = root.join("devices").join(bdf);
            std::fs::create_dir_all(&device).unwrap();
            symlink(root.join("bus").join(subsystem), device.join("subsystem")).unwrap();
            if let Some(driver) = driver {
                let driver_dir = root.join("bus/pci/drivers").join(driver);
                std::fs::create_dir_all(&driver_dir).unwrap();
                symlink(driver_dir, device.join("driver")).unwrap();
            }
            if let Some(group) = group {
                let group_dir = root.join("kernel/iommu_groups").join(group.to_string());
                std::fs::create_dir_all(group_dir.join("devices")).unwrap();
                symlink(&device, group_dir.join("devices").join(bdf)).unwrap();
                symlink(group_dir, device.join("iommu_group")).unwrap();
            }
            if cdev {
                std::fs::create_dir_all(device.join("vfio-dev/vfio3")).unwrap();
            }
            device
        }
    }

    #[test]
    fn missing_path_is_no_device() {
        let sysfs = FakeSysfs::new();
        let path = sysfs.root.0.join("devices/0000:09:00.0");
        let error = check_sysfs_device(&path).unwrap_err();
        assert!(matches!(error, KernelVfioError::NoDevice { .. }), "{error}");
        assert!(error.to_string().contains("0000:09:00.0"), "{error}");
    }

    #[test]
    fn non_pci_device_is_refused() {
        let sysfs = FakeSysfs::new();
        let path = sysfs.device("1-1", "usb", None, None, false);
        let error = check_sysfs_device(&path).unwrap_err();
        assert!(matches!(error, KernelVfioError::NotPci { .. }), "{error}");
        assert!(
            error.to_string().contains("1-1 is not a PCI device"),
            "{error}"
        );
    }

    #[test]
    fn device_bound_elsewhere_names_its_driver() {
        let sysfs = FakeSysfs::new();
        let path = sysfs.device("0000:01:00.0", "pci", Some("nvme"), Some(3), false);
        let error = check_sysfs_device(&path).unwrap_err();
        match &error {
            KernelVfioError::NotBound { driver, .. } => assert_eq!(driver.as_deref(), Some("nvme")),
            other => panic!("unexpected error {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("0000:01:00.0 is bound to nvme, not to vfio-pci"),
            "{message}"
        );
    }

    #[test]
    fn unbound_device_is_refused() {
        let sysfs = FakeSysfs::new();
        let path = sysfs.device("0000:01:00.0", "pci", None, Some(3), false);
        let error = check_sysfs_device(&path).unwrap_err();
        assert!(
            matches!(error, KernelVfioError::NotBound { driver: None, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("bound to no driver"), "{error}");
    }

    #[test]
    fn device_without_iommu_group_is_refused() {
        let sysfs = FakeSysfs::new();
        let path = sysfs.device("0000:01:00.0", "pci", Some("vfio-pci"), None, false);
        let error = check_sysfs_device(&path).unwrap_err();
        assert!(
            matches!(error, KernelVfioError::NoIommuGroup { .. }),
            "{error}"
        );
    }

    #[test]
    fn vfio_pci_device_passes_with_its_group_and_cdev() {
        let sysfs = FakeSysfs::new();
        let path = sysfs.device("0000:01:00.0", "pci", Some("vfio-pci"), Some(12), true);
        assert_eq!(
            check_sysfs_device(&path).unwrap(),
            SysfsDevice {
                group: 12,
                has_cdev: true
            }
        );
        // A vendor variant driver of vfio-pci works too; no vfio-dev means no cdev.
        let path = sysfs.device(
            "0000:02:00.0",
            "pci",
            Some("mlx5_vfio_pci"),
            Some(13),
            false,
        );
        assert_eq!(
            check_sysfs_device(&path).unwrap(),
            SysfsDevice {
                group: 13,
                has_cdev: false
            }
        );
    }

    #[test]
    fn group_description_lists_members_and_drivers() {
        let sysfs = FakeSysfs::new();
        let path = sysfs.device("0000:01:00.0", "pci", Some("vfio-pci"), Some(5), false);
        sysfs.device("0000:01:00.1", "pci", Some("snd_hda_intel"), Some(5), false);
        sysfs.device("0000:01:00.2", "pci", None, Some(5), false);
        assert_eq!(
            describe_group(&path),
            "0000:01:00.0 (vfio-pci), 0000:01:00.1 (snd_hda_intel), 0000:01:00.2 (no driver)"
        );
    }

    #[test]
    fn real_sysfs_device_not_bound_to_vfio_is_refused() {
        // Whatever PCI device this host has that is not bound to vfio-pci.
        let Ok(entries) = Path::new("/sys/bus/pci/devices").read_dir() else {
            eprintln!("no /sys/bus/pci/devices here");
            return;
        };
        let candidate = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|path| {
                !link_name(&path.join("driver")).is_some_and(|driver| is_vfio_pci_driver(&driver))
            });
        let Some(path) = candidate else {
            eprintln!("every PCI device here is bound to vfio-pci");
            return;
        };
        let expected_driver = link_name(&path.join("driver"));
        match check_sysfs_device(&path) {
            Err(KernelVfioError::NotBound { driver, .. }) => assert_eq!(driver, expected_driver),
            other => panic!("{}: unexpected {other:?}", path.display()),
        }
    }

    fn dev_nodes(dir: &TempDir, container: bool, iommu: bool, cdevs: bool) -> DevNodes {
        let vfio_dir = dir.0.join("vfio");
        std::fs::create_dir_all(&vfio_dir).unwrap();
        if container {
            std::fs::write(vfio_dir.join("vfio"), b"").unwrap();
        }
        if cdevs {
            std::fs::create_dir_all(vfio_dir.join("devices")).unwrap();
        }
        if iommu {
            std::fs::write(dir.0.join("iommu"), b"").unwrap();
        }
        DevNodes {
            vfio_dir,
            iommu: dir.0.join("iommu"),
        }
    }

    #[test]
    fn missing_dev_vfio_gives_the_clear_error() {
        let dir = TempDir::new();
        let nodes = dev_nodes(&dir, false, false, false);
        let error = nodes.choose(None).unwrap_err();
        assert!(matches!(error, KernelVfioError::NoVfio { .. }), "{error}");
        let message = error.to_string();
        assert!(message.starts_with("no "), "{message}");
        assert!(
            message.ends_with(
                "vfio/vfio: load vfio-pci (modprobe vfio-pci) and bind the device to it"
            ),
            "{message}"
        );
        // Forcing the container does not help; forcing iommufd names the missing node.
        assert!(matches!(
            nodes.choose(Some(IommuInterface::Container)),
            Err(KernelVfioError::NoVfio { .. })
        ));
        match nodes.choose(Some(IommuInterface::Iommufd)) {
            Err(KernelVfioError::NoIommufd { path }) => assert_eq!(path, dir.0.join("iommu")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn interface_choice_prefers_iommufd_where_the_kernel_has_it() {
        let dir = TempDir::new();
        let nodes = dev_nodes(&dir, true, false, false);
        assert_eq!(nodes.choose(None).unwrap(), IommuInterface::Container);

        let dir = TempDir::new();
        // /dev/iommu without device cdevs is not enough.
        let nodes = dev_nodes(&dir, true, true, false);
        assert_eq!(nodes.choose(None).unwrap(), IommuInterface::Container);
        match nodes.choose(Some(IommuInterface::Iommufd)) {
            Err(KernelVfioError::NoIommufd { path }) => {
                assert_eq!(path, dir.0.join("vfio/devices"))
            }
            other => panic!("unexpected {other:?}"),
        }

        let dir = TempDir::new();
        let nodes = dev_nodes(&dir, true, true, true);
        assert_eq!(nodes.choose(None).unwrap(), IommuInterface::Iommufd);
        assert_eq!(
            nodes.choose(Some(IommuInterface::Container)).unwrap(),
            IommuInterface::Container
        );

        // A kernel with iommufd and cdevs but without the container module.
        let dir = TempDir::new();
        let nodes = dev_nodes(&dir, false, true, true);
        assert_eq!(nodes.choose(None).unwrap(), IommuInterface::Iommufd);
        assert!(matches!(
            nodes.choose(Some(IommuInterface::Container)),
            Err(KernelVfioError::NoVfio { .. })
        ));
    }

    #[test]
    fn kernel_vfio_on_a_host_without_vfio_says_so() {
        if Path::new("/dev/vfio").exists() || Path::new("/dev/iommu").exists() {
            eprintln!("this host has VFIO or iommufd; nothing to check");
            return;
        }
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm here");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let error = KernelVfio::new(&vm).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no /dev/vfio/vfio: load vfio-pci (modprobe vfio-pci) and bind the device to it"
        );
    }

    /// A region information reply: the 32-byte header, then `caps` at their offsets.
    fn reply(caps: &[(usize, Vec<u8>)]) -> Vec<u8> {
        let mut bytes = vec![0u8; 32];
        for (at, cap) in caps {
            if bytes.len() < at + cap.len() {
                bytes.resize(at + cap.len(), 0);
            }
            bytes[*at..at + cap.len()].copy_from_slice(cap);
        }
        bytes
    }

    fn cap_header(id: u32, next: u32) -> Vec<u8> {
        let mut bytes = (id as u16).to_ne_bytes().to_vec();
        bytes.extend(1u16.to_ne_bytes());
        bytes.extend(next.to_ne_bytes());
        bytes
    }

    fn sparse_cap(next: u32, areas: &[(u64, u64)], claimed: u32) -> Vec<u8> {
        let mut bytes = cap_header(VFIO_REGION_INFO_CAP_SPARSE_MMAP, next);
        bytes.extend(claimed.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        for (offset, size) in areas {
            bytes.extend(offset.to_ne_bytes());
            bytes.extend(size.to_ne_bytes());
        }
        bytes
    }

    #[test]
    fn capability_chain_yields_sparse_areas_and_msix_mappable() {
        let sparse = sparse_cap(80, &[(0, 0x1000), (0x3000, 0x1000)], 2);
        let bytes = reply(&[
            (32, sparse),
            (80, cap_header(VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 0)),
        ]);
        assert_eq!(
            parse_region_caps(&bytes, 32),
            RegionCaps {
                sparse_mmap: Some(vec![(0, 0x1000), (0x3000, 0x1000)]),
                msix_mappable: true,
            }
        );
    }

    #[test]
    fn broken_capability_chains_end_safely() {
        // A sparse list claiming more areas than the reply holds: nothing mappable.
        let bytes = reply(&[(32, sparse_cap(0, &[(0, 0x1000)], 1000))]);
        assert_eq!(parse_region_caps(&bytes, 32).sparse_mmap, Some(Vec::new()));
        // A chain pointing back to itself stops after one visit.
        let bytes = reply(&[(32, cap_header(VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 32))]);
        assert!(parse_region_caps(&bytes, 32).msix_mappable);
        // Offsets inside the header or past the end are ignored.
        assert_eq!(parse_region_caps(&bytes, 8), RegionCaps::default());
        assert_eq!(parse_region_caps(&bytes, 4096), RegionCaps::default());
        // A chain with an unknown capability continues past it.
        let bytes = reply(&[
            (32, cap_header(99, 40)),
            (40, cap_header(VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 0)),
        ]);
        assert!(parse_region_caps(&bytes, 32).msix_mappable);
    }

    #[test]
    fn region_info_keeps_only_sparse_areas_inside_the_region() {
        let flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let mappable = flags | VFIO_REGION_INFO_FLAG_MMAP;
        // Plain mappable region: all of it.
        let info = region_info(2, mappable, 0x4000, RegionCaps::default());
        assert!(info.read && info.write && info.mmap);
        assert_eq!(info.mappable_areas(), vec![(0, 0x4000)]);
        // Not mappable.
        let info = region_info(7, flags, 0x100, RegionCaps::default());
        assert!(!info.mmap);
        assert!(info.mappable_areas().is_empty());
        // Sparse areas inside the region.
        let caps = RegionCaps {
            sparse_mmap: Some(vec![(0x1000, 0x3000)]),
            msix_mappable: true,
        };
        let info = region_info(0, mappable, 0x4000, caps);
        assert_eq!(info.mappable_areas(), vec![(0x1000, 0x3000)]);
        assert!(info.msix_mappable);
        // An area leaving the region, an empty area or no areas at all: trap everything.
        for areas in [
            vec![(0x1000, 0x4000)],
            vec![(0, 0)],
            vec![],
            vec![(u64::MAX, 2)],
        ] {
            let caps = RegionCaps {
                sparse_mmap: Some(areas.clone()),
                msix_mappable: false,
            };
            let info = region_info(0, mappable, 0x4000, caps);
            assert!(info.mappable_areas().is_empty(), "{areas:?}");
        }
        // Absent BAR: size 0 is never mappable.
        assert!(!region_info(1, mappable, 0, RegionCaps::default()).mmap);
    }

    #[test]
    fn map_requests_stay_inside_page_aligned_mappable_areas() {
        let flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP;
        let caps = RegionCaps {
            sparse_mmap: Some(vec![(0, 0x2000), (0x4000, 0x4000)]),
            msix_mappable: false,
        };
        let info = region_info(0, flags, 0x8000, caps);
        assert_eq!(check_map_request(&info, 0, 0x2000, 0x1000).unwrap(), 0x2000);
        assert_eq!(
            check_map_request(&info, 0x5000, 0x3000, 0x1000).unwrap(),
            0x3000
        );
        for (offset, size) in [
            (0, 0),             // empty
            (0x1000, 0x2000),   // runs past the first area
            (0x2000, 0x1000),   // the hole between the areas (the MSI-X table, say)
            (0x4800, 0x1000),   // not page-aligned
            (0x4000, u64::MAX), // wraps around
            (u64::MAX, 2),      // wraps around
        ] {
            assert!(
                matches!(
                    check_map_request(&info, offset, size, 0x1000),
                    Err(BackendError::OutOfRange(_))
                ),
                "{offset:#x}+{size:#x}"
            );
        }
        let trapped = region_info(7, VFIO_REGION_INFO_FLAG_READ, 0x100, RegionCaps::default());
        assert!(check_map_request(&trapped, 0, 0x100, 0x1000).is_err());
    }

    #[test]
    fn vector_ranges_must_exist() {
        let irq = vfio_ioctls::VfioIrq {
            flags: VFIO_IRQ_INFO_EVENTFD,
            index: 2,
            count: 8,
        };
        assert!(check_vectors(&irq, 0, 8).is_ok());
        assert!(check_vectors(&irq, 7, 1).is_ok());
        assert!(check_vectors(&irq, 7, 2).is_err());
        assert!(check_vectors(&irq, u32::MAX, 1).is_err());
        assert!(check_vectors(&irq, 0, usize::MAX).is_err());
    }

    #[test]
    fn accesses_stay_inside_the_region() {
        let region = KernelRegion {
            info: region_info(7, VFIO_REGION_INFO_FLAG_READ, 0x100, RegionCaps::default()),
            fd_offset: 7 << 40,
        };
        assert_eq!(
            KernelVfioBackend::check_range(&region, 0xfc, 4).unwrap(),
            (7 << 40) + 0xfc
        );
        assert!(KernelVfioBackend::check_range(&region, 0xfd, 4).is_err());
        assert!(KernelVfioBackend::check_range(&region, u64::MAX, 1).is_err());
        assert_eq!(
            KernelVfioBackend::check_range(&region, 0x100, 0).unwrap(),
            (7 << 40) + 0x100
        );
    }

    /// VfioOps that records calls instead of reaching the kernel.
    #[derive(Default)]
    struct RecordingOps {
        calls: Mutex<Vec<(&'static str, u64, usize)>>,
        fail_map: bool,
    }

    impl VfioOps for RecordingOps {
        unsafe fn vfio_dma_map(
            &self,
            iova: u64,
            size: usize,
            _: *mut u8,
        ) -> vfio_ioctls::Result<()> {
            if self.fail_map {
                return Err(VfioError::IommuDmaMap(vmm_sys_util::errno::Error::new(
                    libc::EFAULT,
                )));
            }
            lock(&self.calls).push(("map", iova, size));
            Ok(())
        }

        fn vfio_dma_unmap(&self, iova: u64, size: usize) -> vfio_ioctls::Result<()> {
            lock(&self.calls).push(("unmap", iova, size));
            Ok(())
        }

        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    #[test]
    fn shared_dma_mappings_are_counted() {
        let ops = Arc::new(RecordingOps::default());
        let space = DmaSpace {
            ops: ops.clone(),
            mappings: Mutex::new(HashMap::new()),
        };
        space.map(0x1000_0000, 0x20_0000, 0x7f00_0000_0000).unwrap();
        // A second device mapping the same RAM only takes a reference.
        space.map(0x1000_0000, 0x20_0000, 0x7f00_0000_0000).unwrap();
        // The same IOVA range for other host memory is refused.
        assert!(matches!(
            space.map(0x1000_0000, 0x20_0000, 0x7f00_1000_0000),
            Err(BackendError::OutOfRange(_))
        ));
        space.unmap(0x1000_0000, 0x20_0000).unwrap();
        assert_eq!(lock(&ops.calls).len(), 1, "still referenced: no unmap yet");
        space.unmap(0x1000_0000, 0x20_0000).unwrap();
        assert_eq!(
            *lock(&ops.calls),
            vec![
                ("map", 0x1000_0000, 0x20_0000),
                ("unmap", 0x1000_0000, 0x20_0000)
            ]
        );
        // Unmapping what is not mapped is an error, not a kernel call.
        assert!(matches!(
            space.unmap(0x1000_0000, 0x20_0000),
            Err(BackendError::OutOfRange(_))
        ));
        assert_eq!(lock(&ops.calls).len(), 2);
    }

    #[test]
    fn failed_dma_map_reports_the_errno_and_records_nothing() {
        let ops = Arc::new(RecordingOps {
            fail_map: true,
            ..Default::default()
        });
        let space = DmaSpace {
            ops,
            mappings: Mutex::new(HashMap::new()),
        };
        match space.map(0x1000, 0x1000, 0x7f00_0000_0000) {
            Err(BackendError::Host { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EFAULT))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(lock(&space.mappings).is_empty());
    }

    #[test]
    fn enodev_means_the_device_is_gone() {
        let error = host_error("x", io::Error::from_raw_os_error(libc::ENODEV));
        assert!(matches!(error, BackendError::Gone(_)), "{error}");
        let error = host_error("x", io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(error, BackendError::Host { .. }), "{error}");
    }
}
