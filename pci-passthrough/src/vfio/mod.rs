//! VFIO passthrough: a [`PciDevice`](crate::PciDevice) whose function is a real device,
//! reached through a [`VfioBackend`]: the kernel's VFIO, a vfio-user server, or a simulated
//! device for tests.
//!
//! [`VfioPciDevice`] is the guest's view of the function: configuration space virtualized
//! over the device's own (BARs, MSI and MSI-X in a shadow, the rest passed through), BARs
//! trapped or mapped straight into the guest through a [`DirectMapper`], and interrupts
//! handed to the backend as the eventfds of the VMM's [`MsiRouting`](crate::MsiRouting)
//! sinks. DMA is the VMM's business: it gives the device guest RAM with
//! [`VfioBackend::dma_map`] ([`dma_map_guest_memory`] does it for a whole guest memory).

pub mod backend;
pub mod device;
pub mod kernel;
#[cfg(target_arch = "x86_64")]
pub mod kvm_map;
pub mod sim;
pub mod user;

pub use backend::{
    BackendError, BackendResult, DeviceInfo, DmaRegion, IrqInfo, MappedArea, RegionInfo,
    VfioBackend,
};
pub use device::{VfioPciDevice, VfioPciOptions, DEFAULT_PASSTHROUGH_CAPABILITIES};
#[cfg(target_arch = "x86_64")]
pub use kvm_map::KvmDirectMapper;
pub use sim::{SimRegion, SimSpec, SimulatedDevice};

use std::os::unix::io::AsRawFd;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Errors of the VFIO device model and its helpers.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The PCI layer failed (interrupt routing, KVM).
    #[error(transparent)]
    Pci(#[from] crate::Error),
    /// The function cannot be passed through (not a type-0 header, absent, ...).
    #[error("unsupported device: {0}")]
    Unsupported(String),
    /// Every memory slot of the mapper's range is in use.
    #[error("no free memory slot for a direct mapping")]
    NoFreeSlot,
    /// The mapping overlaps one the mapper already has, or wraps around.
    #[error("direct mapping at {guest_address:#x}+{size:#x} overlaps another one")]
    Overlap {
        /// Guest physical address.
        guest_address: u64,
        /// Bytes.
        size: u64,
    },
    /// Guest memory that cannot be handed to a device (no host address).
    #[error("guest memory at {0:#x} has no host mapping")]
    GuestMemory(u64),
}

/// A piece of host memory a [`DirectMapper`] put into the guest's physical address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectMapping {
    /// The mapper's handle (for KVM, the memory slot).
    pub id: u32,
    /// Guest physical address.
    pub guest_address: u64,
    /// Bytes.
    pub size: u64,
}

/// The VMM's side of direct BAR mapping: makes host memory (a device region mmapped by the
/// backend) appear in the guest's physical address space, so guest accesses there no longer
/// exit. For KVM, a memory slot ([`KvmDirectMapper`]). The VMM keeps the whole BAR on its
/// MMIO bus as well; where a mapping exists it takes precedence, elsewhere (the MSI-X table,
/// trapped registers) accesses still exit and reach the device model.
pub trait DirectMapper: Send + Sync {
    /// Maps `size` bytes of host memory at `host_address` at guest physical
    /// `guest_address`.
    ///
    /// # Safety
    /// `host_address..host_address + size` must stay mapped in this process until
    /// [`DirectMapper::unmap`] is called with the returned mapping: the guest reads and
    /// writes it until then.
    unsafe fn map(
        &self,
        guest_address: u64,
        host_address: *mut u8,
        size: u64,
    ) -> Result<DirectMapping, VfioError>;

    /// Removes `mapping` from the guest; afterwards guest accesses there exit again.
    fn unmap(&self, mapping: DirectMapping);
}

/// Hands every region of `memory` to the device for DMA ([`VfioBackend::dma_map`]), with
/// its file and offset when it has one (a vfio-user server maps the file; kernel VFIO pins
/// the pages at the host address). Returns the regions mapped; on an error the regions
/// already mapped are unmapped again.
pub fn dma_map_guest_memory<M: GuestMemoryBackend>(
    backend: &dyn VfioBackend,
    memory: &M,
) -> Result<Vec<DmaRegion>, VfioError> {
    let mut mapped: Vec<DmaRegion> = Vec::new();
    for region in memory.iter() {
        let iova = region.start_addr().0;
        let result = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| VfioError::GuestMemory(iova))
            .and_then(|host| {
                let dma = DmaRegion {
                    iova,
                    size: region.len(),
                    host_address: host as u64,
                    fd: region
                        .file_offset()
                        .map(|f| (f.file().as_raw_fd(), f.start())),
                };
                backend.dma_map(&dma)?;
                Ok(dma)
            });
        match result {
            Ok(dma) => mapped.push(dma),
            Err(e) => {
                for dma in &mapped {
                    let _ = backend.dma_unmap(dma.iova, dma.size);
                }
                return Err(e);
            }
        }
    }
    Ok(mapped)
}
