//! The backend trait a VFIO device model sits on, and the types it speaks.
//!
//! The numbering is VFIO's (`linux/vfio.h`): regions 0-5 are the BARs, 6 the expansion ROM,
//! 7 configuration space; interrupt indexes 0 INTx, 1 MSI, 2 MSI-X. Three backends implement
//! it: the kernel's VFIO (`kernel`), a vfio-user server (`user`), and a simulated device for
//! tests (`sim`).

use std::os::unix::io::RawFd;

use vmm_sys_util::eventfd::EventFd;

/// Region index of BAR 0 (BAR n is region n).
pub const BAR0_REGION: u32 = 0;
/// Region index of the expansion ROM.
pub const ROM_REGION: u32 = 6;
/// Region index of configuration space.
pub const CONFIG_REGION: u32 = 7;
/// Regions a PCI function has in VFIO's numbering (the VGA region, 8, is not used).
pub const PCI_REGIONS: u32 = 8;

/// Interrupt index of INTx.
pub const INTX_IRQ: u32 = 0;
/// Interrupt index of MSI.
pub const MSI_IRQ: u32 = 1;
/// Interrupt index of MSI-X.
pub const MSIX_IRQ: u32 = 2;

/// Errors of a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The host (kernel or server) refused an operation.
    #[error("{operation} failed: {source}")]
    Host {
        /// What was asked.
        operation: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The device or server answered something impossible (a region bigger than its BAR,
    /// a reply of the wrong size, an unknown index).
    #[error("invalid answer from the device: {0}")]
    Protocol(String),
    /// The device has no such region or interrupt index, or the access leaves the region.
    #[error("{0}")]
    OutOfRange(String),
    /// The device or server has gone away (closed socket, removed device).
    #[error("the device is gone: {0}")]
    Gone(String),
    /// The backend cannot do this (mmap of a region it has no fd for, say).
    #[error("not supported: {0}")]
    Unsupported(&'static str),
}

/// A result of a backend call.
pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// What a device has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Regions (at least [`PCI_REGIONS`] for a PCI function).
    pub num_regions: u32,
    /// Interrupt indexes.
    pub num_irqs: u32,
    /// The device can be reset ([`VfioBackend::reset`]).
    pub reset: bool,
}

/// One region: size, access, and which parts may be mapped into the guest directly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// Bytes (0: the region does not exist, a BAR the device does not implement).
    pub size: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// May be mmapped ([`VfioBackend::map_region`]).
    pub mmap: bool,
    /// The parts that may be mmapped, as (offset, size) pairs, when the backend says
    /// (VFIO's sparse-mmap capability); empty with `mmap` set means all of it.
    pub sparse_mmap: Vec<(u64, u64)>,
    /// The MSI-X table and PBA in this region may be mmapped too (VFIO's
    /// MSIX_MAPPABLE capability). The device model keeps trapping them regardless.
    pub msix_mappable: bool,
}

impl RegionInfo {
    /// The (offset, size) areas of the region that may be mmapped.
    pub fn mappable_areas(&self) -> Vec<(u64, u64)> {
        if !self.mmap || self.size == 0 {
            Vec::new()
        } else if self.sparse_mmap.is_empty() {
            vec![(0, self.size)]
        } else {
            self.sparse_mmap.clone()
        }
    }
}

/// One interrupt index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Interrupt index.
    pub index: u32,
    /// Vectors (0: the device does not have this kind of interrupt).
    pub count: u32,
    /// The backend signals through eventfds (VFIO_IRQ_INFO_EVENTFD).
    pub eventfd: bool,
    /// Level-triggered: the interrupt stays masked after it fires until unmasked
    /// (INTx; VFIO_IRQ_INFO_AUTOMASKED).
    pub automasked: bool,
}

/// Host memory mapped from a region, to be handed to KVM as a memory slot. It stays
/// mapped until dropped.
pub struct MappedArea {
    host_address: *mut u8,
    size: usize,
    unmap: Option<Box<dyn FnOnce(*mut u8, usize) + Send>>,
}

// SAFETY: the mapping is plain shared memory owned by this value; nothing in it is tied to
// the creating thread.
unsafe impl Send for MappedArea {}
// SAFETY: the value only hands out the address; accesses through it are the guest's (via
// KVM) or the caller's, who must synchronise them anyway.
unsafe impl Sync for MappedArea {}

impl MappedArea {
    /// A mapping at `host_address` of `size` bytes, released by `unmap` when dropped
    /// (`None`: not released, the owner of the memory does that).
    ///
    /// # Safety
    /// `host_address` must point to `size` bytes that stay mapped until `unmap` runs (or,
    /// without it, for the life of this value).
    pub unsafe fn new(
        host_address: *mut u8,
        size: usize,
        unmap: Option<Box<dyn FnOnce(*mut u8, usize) + Send>>,
    ) -> Self {
        MappedArea {
            host_address,
            size,
            unmap,
        }
    }

    /// Maps `size` bytes of `fd` from `offset` shared and read-write, unmapped on drop.
    pub fn mmap_fd(fd: RawFd, offset: u64, size: usize) -> std::io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh shared mapping of the caller's fd at an address the kernel picks;
        // nothing else is affected.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let unmap = Box::new(|address: *mut u8, size: usize| {
            // SAFETY: the mapping made above, unmapped once, when its owner is dropped.
            unsafe { libc::munmap(address.cast(), size) };
        });
        // SAFETY: the mapping is `size` bytes and lives until `unmap` runs.
        Ok(unsafe { MappedArea::new(address.cast(), size, Some(unmap)) })
    }

    /// The mapping's first byte.
    pub fn host_address(&self) -> *mut u8 {
        self.host_address
    }

    /// Its size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for MappedArea {
    fn drop(&mut self) {
        if let Some(unmap) = self.unmap.take() {
            unmap(self.host_address, self.size);
        }
    }
}

impl std::fmt::Debug for MappedArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedArea")
            .field("host_address", &self.host_address)
            .field("size", &self.size)
            .finish()
    }
}

/// Guest RAM handed to a device for DMA: where it is in this process, and the file it is
/// a mapping of (a vfio-user server maps the file itself; kernel VFIO pins the pages at the
/// address).
#[derive(Clone, Copy, Debug)]
pub struct DmaRegion {
    /// The guest physical address (the device's I/O virtual address).
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// Where the memory is mapped in this process.
    pub host_address: u64,
    /// The file behind it and the offset of `iova` in it, if it is shareable (memfd).
    pub fd: Option<(RawFd, u64)>,
}

/// The device side of VFIO passthrough: what the device model needs from the kernel's
/// VFIO, a vfio-user server, or a simulation. Calls may come from several threads (vCPUs
/// and the VMM's) at once.
pub trait VfioBackend: Send + Sync {
    /// What the device has.
    fn device_info(&self) -> DeviceInfo;

    /// Region `index`.
    fn region_info(&self, index: u32) -> BackendResult<RegionInfo>;

    /// Interrupt index `index`.
    fn irq_info(&self, index: u32) -> BackendResult<IrqInfo>;

    /// Reads `data.len()` bytes of region `index` at `offset`.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> BackendResult<()>;

    /// Writes `data` to region `index` at `offset`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> BackendResult<()>;

    /// Maps `size` bytes of region `index` from `offset` (a page-aligned part of one of its
    /// [`RegionInfo::mappable_areas`]) into this process.
    fn map_region(&self, index: u32, offset: u64, size: u64) -> BackendResult<MappedArea>;

    /// Connects vectors `start..start + eventfds.len()` of interrupt index `index` to
    /// `eventfds`: the device signals them. An empty list disables the whole index.
    fn set_irqs(&self, index: u32, start: u32, eventfds: &[&EventFd]) -> BackendResult<()>;

    /// For INTx: the device unmasks its line when `resample` is signalled (KVM signals it
    /// when the guest ends the interrupt).
    fn set_intx_unmask(&self, resample: &EventFd) -> BackendResult<()>;

    /// Resets the device (VFIO_DEVICE_RESET).
    fn reset(&self) -> BackendResult<()>;

    /// Lets the device read and write `region` of guest RAM.
    fn dma_map(&self, region: &DmaRegion) -> BackendResult<()>;

    /// Takes `[iova, iova + size)` away from the device again.
    fn dma_unmap(&self, iova: u64, size: u64) -> BackendResult<()>;
}
