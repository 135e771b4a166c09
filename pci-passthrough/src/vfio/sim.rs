//! A simulated device behind the [`VfioBackend`] trait, for tests: what the kernel's VFIO
//! would show of a real PCI function, without one.
//!
//! [`SimSpec::virtio_net`] is modelled on this build host's virtio-net function (Cloud
//! Hypervisor's, 1af4:1041): its configuration space is the host's dump
//! ([`VIRTIO_NET_CONFIG`]), and its one BAR is what that space declares: 512 KiB, 64-bit,
//! non-prefetchable memory, holding the virtio structures, the MSI-X table (3 vectors, at
//! 0x8000) and the PBA (at 0x48000). The BAR is memory-backed (a memfd) so
//! [`VfioBackend::map_region`] works, and its sparse-mmap areas leave out the MSI-X table and
//! PBA pages, as kernel VFIO does. [`SimSpec`] builders add INTx, MSI, other capabilities
//! and an expansion ROM ([`SimSpec::with_rom`]: region 6, read-only, holding
//! [`rom_image`]).
//!
//! Test hooks: [`SimulatedDevice::fire`] signals the eventfd the model gave for a vector,
//! [`SimulatedDevice::set_gone`] makes every call fail with [`BackendError::Gone`] (the
//! device vanished), and the device records configuration writes, `set_irqs` calls, resets,
//! trapped region accesses and DMA mappings.
//!
//! Like kernel VFIO, it refuses to enable an interrupt index while another one is enabled,
//! to unmask INTx through an eventfd while INTx is disabled, and overlapping DMA mappings.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::backend::{
    BackendError, BackendResult, DeviceInfo, DmaRegion, IrqInfo, MappedArea, RegionInfo,
    VfioBackend, CONFIG_REGION, INTX_IRQ, MSIX_IRQ, MSI_IRQ, PCI_REGIONS, ROM_REGION,
};
use crate::config::{command, reg, CONFIG_SPACE_SIZE, STATUS_CAPABILITIES_LIST};
use crate::msi::{MsiCapability, MSI_CAPABILITY_ID};
use crate::msix::MSIX_CAPABILITY_ID;

/// The configuration space of this build host's virtio-net function, read from
/// `/sys/bus/pci/devices/0000:00:03.0/config` (Cloud Hypervisor's virtio-net, 1af4:1041,
/// revision 1, class 02/00/00): BAR 0 is 64-bit memory (the host placed it at
/// 0x40_0010_0000); vendor capabilities at 0x40 (common config: BAR 0 + 0, 0x38 bytes),
/// 0x50 (ISR: + 0x2000), 0x60 (device config: + 0x4000), 0x70 (notifications: + 0x6000,
/// multiplier 4), 0x84 (PCI configuration access); MSI-X at 0x98 with 3 vectors, table at
/// BAR 0 + 0x8000, PBA at BAR 0 + 0x48000. It was taken while the host's driver ran it:
/// memory decoding, bus mastering and MSI-X are enabled in it.
pub const VIRTIO_NET_CONFIG: [u8; CONFIG_SPACE_SIZE] = [
    0xf4, 0x1a, 0x41, 0x10, 0x06, 0x04, 0x10, 0x00, 0x01, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00,
    0x04, 0x00, 0x10, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf4, 0x1a, 0x41, 0x10,
    0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x09, 0x50, 0x10, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x38, 0x00, 0x00, 0x00,
    0x09, 0x60, 0x10, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x09, 0x70, 0x10, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00,
    0x09, 0x84, 0x14, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x60, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00,
    0x04, 0x00, 0x00, 0x00, 0x09, 0x98, 0x14, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x11, 0x00, 0x02, 0x80, 0x00, 0x80, 0x00, 0x00,
    0x00, 0x80, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// Bytes of the virtio-net function's BAR 0 (the host's `resource` file: 0x80000).
pub const VIRTIO_NET_BAR_SIZE: u64 = 0x8_0000;
/// Offset of the MSI-X table in BAR 0.
pub const VIRTIO_NET_MSIX_TABLE: u64 = 0x8000;
/// Offset of the MSI-X PBA in BAR 0.
pub const VIRTIO_NET_MSIX_PBA: u64 = 0x4_8000;
/// MSI-X vectors of the virtio-net function.
pub const VIRTIO_NET_MSIX_VECTORS: u32 = 3;
/// Offset of the MSI-X capability.
const VIRTIO_NET_MSIX_CAPABILITY: usize = 0x98;

/// Pages are 4 KiB in the sparse areas the simulated device declares.
const PAGE: u64 = 0x1000;

/// The content of a simulated expansion ROM of `size` bytes: a PCI option ROM header's
/// signature (0x55 0xAA), its length in 512-byte units (saturating at 255), then a pattern
/// in which neighbouring bytes and 256-byte pages differ, so a misplaced read shows.
pub fn rom_image(size: u64) -> Vec<u8> {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    let blocks = u8::try_from(size / 512).unwrap_or(u8::MAX);
    let header = [0x55, 0xaa, blocks];
    (0..size)
        .map(|i| match header.get(i) {
            Some(&byte) => byte,
            None => (i as u8).wrapping_mul(7) ^ (i >> 8) as u8,
        })
        .collect()
}

/// One memory region (a BAR or the expansion ROM) of a simulated device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRegion {
    /// Region index (0-5: BARs, 6: expansion ROM).
    pub index: u32,
    /// Bytes.
    pub size: u64,
    /// May be mmapped.
    pub mmap: bool,
    /// The (offset, size) areas that may be mmapped; empty with `mmap`: all of it.
    pub sparse_mmap: Vec<(u64, u64)>,
    /// The MSI-X table and PBA may be mmapped too.
    pub msix_mappable: bool,
}

/// What a simulated device looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimSpec {
    /// Configuration space after reset.
    pub config: [u8; CONFIG_SPACE_SIZE],
    /// BARs and expansion ROM (absent ones have size 0).
    pub regions: Vec<SimRegion>,
    /// The function has an INTx line.
    pub intx: bool,
    /// MSI vectors (0: no MSI).
    pub msi_vectors: u32,
    /// MSI-X vectors (0: no MSI-X).
    pub msix_vectors: u32,
    /// The device can be reset.
    pub reset: bool,
}

impl SimSpec {
    /// The host's virtio-net function ([`VIRTIO_NET_CONFIG`]) in its reset state: the dump
    /// with the command register cleared and MSI-X disabled, as a function level reset
    /// leaves them. BAR 0's sparse areas leave out the MSI-X table and PBA pages.
    pub fn virtio_net() -> Self {
        let mut config = VIRTIO_NET_CONFIG;
        config[reg::COMMAND] = 0;
        config[reg::COMMAND + 1] = 0;
        config[VIRTIO_NET_MSIX_CAPABILITY + 3] &= !0xc0;
        let table_end = VIRTIO_NET_MSIX_TABLE + PAGE;
        let pba_end = VIRTIO_NET_MSIX_PBA + PAGE;
        SimSpec {
            config,
            regions: vec![SimRegion {
                index: 0,
                size: VIRTIO_NET_BAR_SIZE,
                mmap: true,
                sparse_mmap: vec![
                    (0, VIRTIO_NET_MSIX_TABLE),
                    (table_end, VIRTIO_NET_MSIX_PBA - table_end),
                    (pba_end, VIRTIO_NET_BAR_SIZE - pba_end),
                ],
                msix_mappable: false,
            }],
            intx: false,
            msi_vectors: 0,
            msix_vectors: VIRTIO_NET_MSIX_VECTORS,
            reset: true,
        }
    }

    /// Adds a capability with ID `id` and `body` (after ID and next pointer) at `offset`,
    /// linked at the end of the list. The caller picks a free, dword-aligned `offset`.
    pub fn with_capability(mut self, offset: u8, id: u8, body: &[u8]) -> Self {
        let at = usize::from(offset);
        let last = capability_offsets(&self.config).last().copied();
        match last {
            Some(last) => self.config[last + 1] = offset,
            None => {
                self.config[reg::CAPABILITIES] = offset;
                self.config[reg::STATUS] |= STATUS_CAPABILITIES_LIST as u8;
            }
        }
        let bytes = [id, 0].into_iter().chain(body.iter().copied());
        for (i, byte) in bytes.enumerate() {
            if let Some(slot) = self.config.get_mut(at + i) {
                *slot = byte;
            }
        }
        self
    }

    /// Adds an MSI capability of shape `capability` at `offset`, with as many vectors.
    pub fn with_msi(mut self, offset: u8, capability: MsiCapability) -> Self {
        self.msi_vectors = u32::from(capability.max_vectors());
        let body = vec![0u8; capability.len() - 2];
        let mut spec = self.with_capability(offset, MSI_CAPABILITY_ID, &body);
        let control = capability.control().to_le_bytes();
        let at = usize::from(offset) + 2;
        if let Some(slot) = spec.config.get_mut(at..at + 2) {
            slot.copy_from_slice(&control);
        }
        spec
    }

    /// Gives the function an expansion ROM of `size` bytes: region 6, readable, not writable
    /// nor mmappable (like kernel VFIO's), holding [`rom_image`] (which a reset keeps).
    /// Replaces a ROM already there.
    pub fn with_rom(mut self, size: u64) -> Self {
        self.regions.retain(|r| r.index != ROM_REGION);
        self.regions.push(SimRegion {
            index: ROM_REGION,
            size,
            mmap: false,
            sparse_mmap: Vec::new(),
            msix_mappable: false,
        });
        self
    }

    /// Gives the function an INTx line on pin `pin` (1-4: INTA#-INTD#).
    pub fn with_intx(mut self, pin: u8) -> Self {
        self.intx = true;
        self.config[reg::INTERRUPT_PIN] = pin;
        self
    }

    fn region(&self, index: u32) -> Option<&SimRegion> {
        self.regions.iter().find(|r| r.index == index && r.size > 0)
    }

    fn irq_count(&self, index: u32) -> u32 {
        match index {
            INTX_IRQ => u32::from(self.intx),
            MSI_IRQ => self.msi_vectors,
            MSIX_IRQ => self.msix_vectors,
            _ => 0,
        }
    }
}

/// The capability offsets of a configuration space, in list order (loop-safe).
fn capability_offsets(config: &[u8; CONFIG_SPACE_SIZE]) -> Vec<usize> {
    crate::config::capabilities(|at| config.get(at).copied().unwrap_or(0))
        .into_iter()
        .map(|(_, offset)| usize::from(offset))
        .collect()
}

/// A `set_irqs` call the simulated device received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqCall {
    /// Interrupt index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Eventfds given (0: the index was disabled).
    pub count: usize,
}

struct SimState {
    config: [u8; CONFIG_SPACE_SIZE],
    config_writes: Vec<(u64, Vec<u8>)>,
    /// Per interrupt index, the eventfd of each enabled vector (empty: index disabled).
    irqs: [Vec<EventFd>; 3],
    intx_unmask: Option<EventFd>,
    irq_calls: Vec<IrqCall>,
    dma: BTreeMap<u64, DmaRegion>,
}

/// A simulated PCI function behind [`VfioBackend`]; see the module documentation.
pub struct SimulatedDevice {
    spec: SimSpec,
    /// Guest write mask of configuration space (what the device's hardware would let
    /// change).
    config_writable: [u8; CONFIG_SPACE_SIZE],
    /// Memory of each region in `spec.regions`, by region index.
    memory: BTreeMap<u32, File>,
    state: Mutex<SimState>,
    gone: AtomicBool,
    resets: AtomicU32,
    trapped: AtomicU64,
}

impl std::fmt::Debug for SimulatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedDevice")
            .field("regions", &self.spec.regions)
            .field("gone", &self.gone)
            .field("resets", &self.resets)
            .finish()
    }
}

impl SimulatedDevice {
    /// A device as `spec` describes it, in its reset state.
    pub fn new(spec: SimSpec) -> std::io::Result<Self> {
        let mut memory = BTreeMap::new();
        for region in spec.regions.iter().filter(|r| r.size > 0) {
            let name = format!("vmkit-sim-region-{}", region.index);
            let file = memfd_file(&name, region.size)?;
            file.write_all_at(&initial_content(region.index, region.size), 0)?;
            memory.insert(region.index, file);
        }
        let config_writable = config_write_mask(&spec);
        Ok(SimulatedDevice {
            state: Mutex::new(SimState {
                config: spec.config,
                config_writes: Vec::new(),
                irqs: [Vec::new(), Vec::new(), Vec::new()],
                intx_unmask: None,
                irq_calls: Vec::new(),
                dma: BTreeMap::new(),
            }),
            config_writable,
            memory,
            spec,
            gone: AtomicBool::new(false),
            resets: AtomicU32::new(0),
            trapped: AtomicU64::new(0),
        })
    }

    /// The virtio-net function ([`SimSpec::virtio_net`]).
    pub fn virtio_net() -> std::io::Result<Self> {
        Self::new(SimSpec::virtio_net())
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_present(&self) -> BackendResult<()> {
        if self.gone.load(Ordering::Acquire) {
            Err(BackendError::Gone(
                "the simulated device was removed".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Fault injection: with `true`, every backend call fails with [`BackendError::Gone`]
    /// (except `device_info`, which cannot fail), as when a device is unplugged or a
    /// vfio-user server dies.
    pub fn set_gone(&self, gone: bool) {
        self.gone.store(gone, Ordering::Release);
    }

    /// Resets done ([`VfioBackend::reset`] calls that succeeded).
    pub fn resets(&self) -> u32 {
        self.resets.load(Ordering::Acquire)
    }

    /// The configuration space as the device has it now.
    pub fn config(&self) -> [u8; CONFIG_SPACE_SIZE] {
        self.lock().config
    }

    /// Every configuration write that reached the device, as (offset, bytes).
    pub fn config_writes(&self) -> Vec<(u64, Vec<u8>)> {
        self.lock().config_writes.clone()
    }

    /// Every `set_irqs` call, accepted or refused, in order.
    pub fn irq_calls(&self) -> Vec<IrqCall> {
        self.lock().irq_calls.clone()
    }

    /// Vectors of interrupt index `index` connected to an eventfd (0: disabled).
    pub fn enabled_vectors(&self, index: u32) -> usize {
        self.lock()
            .irqs
            .get(index as usize)
            .map_or(0, |vectors| vectors.len())
    }

    /// Whether INTx has an unmask (resample) eventfd.
    pub fn has_intx_unmask(&self) -> bool {
        self.lock().intx_unmask.is_some()
    }

    /// The device raises vector `vector` of interrupt index `index`: writes the eventfd it
    /// was given. Returns whether there was one.
    pub fn fire(&self, index: u32, vector: u32) -> bool {
        let state = self.lock();
        let fd = state
            .irqs
            .get(index as usize)
            .and_then(|vectors| vectors.get(vector as usize));
        match fd {
            Some(fd) => fd.write(1).is_ok(),
            None => false,
        }
    }

    /// Guest RAM the device may DMA to now.
    pub fn dma_mappings(&self) -> Vec<DmaRegion> {
        self.lock().dma.values().copied().collect()
    }

    /// Trapped accesses to BARs and the ROM (`region_read` and `region_write` calls), not
    /// counting configuration space.
    pub fn trapped_accesses(&self) -> u64 {
        self.trapped.load(Ordering::Acquire)
    }

    /// Reads region `index`'s memory directly, whatever the guest mapped or trapped (and
    /// even when the device is "gone"). Bytes past the region read 0.
    pub fn peek(&self, index: u32, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        if let Some(file) = self.memory.get(&index) {
            let _ = file.read_at(&mut data, offset);
        }
        data
    }

    fn region_memory(&self, index: u32, offset: u64, len: usize) -> BackendResult<&File> {
        let region = self
            .spec
            .region(index)
            .ok_or_else(|| BackendError::OutOfRange(format!("no region {index}")))?;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > region.size) {
            return Err(BackendError::OutOfRange(format!(
                "{len} bytes at {offset:#x} leave region {index} ({:#x} bytes)",
                region.size
            )));
        }
        self.memory
            .get(&index)
            .ok_or_else(|| BackendError::OutOfRange(format!("no region {index}")))
    }

    fn write_config(&self, offset: u64, data: &[u8]) -> BackendResult<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if start
            .checked_add(data.len())
            .is_none_or(|end| end > CONFIG_SPACE_SIZE)
        {
            return Err(BackendError::OutOfRange(format!(
                "{} bytes at {offset:#x} leave configuration space",
                data.len()
            )));
        }
        let mut state = self.lock();
        state.config_writes.push((offset, data.to_vec()));
        for (i, &value) in data.iter().enumerate() {
            let at = start + i;
            let mask = self.config_writable.get(at).copied().unwrap_or(0);
            if let Some(byte) = state.config.get_mut(at) {
                *byte = (*byte & !mask) | (value & mask);
            }
        }
        Ok(())
    }
}

/// What the simulated hardware lets a configuration write change: the command register,
/// cache line size, latency timer and interrupt line; the BARs' address bits; capability
/// bodies, except MSI-X's table size, table and PBA fields.
fn config_write_mask(spec: &SimSpec) -> [u8; CONFIG_SPACE_SIZE] {
    let mut mask = [0u8; CONFIG_SPACE_SIZE];
    mask[reg::COMMAND..reg::COMMAND + 2].copy_from_slice(&command::WRITABLE.to_le_bytes());
    mask[reg::CACHE_LINE_SIZE] = 0xff;
    mask[reg::CACHE_LINE_SIZE + 1] = 0xff;
    mask[reg::INTERRUPT_LINE] = 0xff;
    let mut index = 0;
    while index < 6 {
        let at = reg::BAR0 + 4 * index;
        let low = u32::from_le_bytes([
            spec.config[at],
            spec.config[at + 1],
            spec.config[at + 2],
            spec.config[at + 3],
        ]);
        let io = low & 1 != 0;
        let wide = !io && (low >> 1) & 0x3 == 0x2;
        if let Some(region) = spec.region(index as u32) {
            let flags = if io { 0x3 } else { 0xf };
            let address = !(region.size.next_power_of_two().wrapping_sub(1)) & !flags;
            mask[at..at + 4].copy_from_slice(&(address as u32).to_le_bytes());
            if wide && index < 5 {
                mask[at + 4..at + 8].copy_from_slice(&((address >> 32) as u32).to_le_bytes());
            }
        }
        index += if wide { 2 } else { 1 };
    }
    mask[0x40..].fill(0xff);
    for offset in capability_offsets(&spec.config) {
        mask[offset] = 0;
        mask[offset + 1] = 0;
        if spec.config[offset] == MSIX_CAPABILITY_ID {
            for (i, byte) in mask.iter_mut().skip(offset + 2).take(10).enumerate() {
                *byte = if i == 1 { 0xc0 } else { 0 };
            }
        }
    }
    mask
}

/// What region `index` of `size` bytes holds after reset: the ROM image for the ROM,
/// zeroes for a BAR.
fn initial_content(index: u32, size: u64) -> Vec<u8> {
    if index == ROM_REGION {
        rom_image(size)
    } else {
        vec![0; usize::try_from(size).unwrap_or(0)]
    }
}

/// A memfd of `size` bytes (zeroes), for memory a test maps like a device's.
pub(crate) fn memfd_file(name: &str, size: u64) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: a new anonymous file with a NUL-terminated name; the fd is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    // Whole pages, so that the last page can be mmapped.
    file.set_len(size.next_multiple_of(PAGE))?;
    Ok(file)
}

fn einval(operation: &'static str) -> BackendError {
    BackendError::Host {
        operation,
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    }
}

impl VfioBackend for SimulatedDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            // Like vfio-pci: the VGA region (8) exists, empty.
            num_regions: PCI_REGIONS + 1,
            num_irqs: 3,
            reset: self.spec.reset,
        }
    }

    fn region_info(&self, index: u32) -> BackendResult<RegionInfo> {
        self.check_present()?;
        if index > PCI_REGIONS {
            return Err(BackendError::OutOfRange(format!("no region {index}")));
        }
        if index == CONFIG_REGION {
            return Ok(RegionInfo {
                index,
                size: CONFIG_SPACE_SIZE as u64,
                read: true,
                write: true,
                ..RegionInfo::default()
            });
        }
        Ok(match self.spec.region(index) {
            Some(region) => RegionInfo {
                index,
                size: region.size,
                read: true,
                write: index != ROM_REGION,
                mmap: region.mmap,
                sparse_mmap: region.sparse_mmap.clone(),
                msix_mappable: region.msix_mappable,
            },
            None => RegionInfo {
                index,
                ..RegionInfo::default()
            },
        })
    }

    fn irq_info(&self, index: u32) -> BackendResult<IrqInfo> {
        self.check_present()?;
        if index > MSIX_IRQ {
            return Err(BackendError::OutOfRange(format!(
                "no interrupt index {index}"
            )));
        }
        Ok(IrqInfo {
            index,
            count: self.spec.irq_count(index),
            eventfd: true,
            automasked: index == INTX_IRQ,
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> BackendResult<()> {
        self.check_present()?;
        if index == CONFIG_REGION {
            let config = self.lock().config;
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let bytes = start
                .checked_add(data.len())
                .and_then(|end| config.get(start..end))
                .ok_or_else(|| {
                    BackendError::OutOfRange(format!(
                        "{} bytes at {offset:#x} leave configuration space",
                        data.len()
                    ))
                })?;
            data.copy_from_slice(bytes);
            return Ok(());
        }
        self.trapped.fetch_add(1, Ordering::AcqRel);
        let file = self.region_memory(index, offset, data.len())?;
        file.read_exact_at(data, offset)
            .map_err(|source| BackendError::Host {
                operation: "region read",
                source,
            })
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> BackendResult<()> {
        self.check_present()?;
        if index == CONFIG_REGION {
            return self.write_config(offset, data);
        }
        self.trapped.fetch_add(1, Ordering::AcqRel);
        if index == ROM_REGION {
            return Err(BackendError::OutOfRange(
                "the expansion ROM is read-only".into(),
            ));
        }
        let file = self.region_memory(index, offset, data.len())?;
        file.write_all_at(data, offset)
            .map_err(|source| BackendError::Host {
                operation: "region write",
                source,
            })
    }

    fn map_region(&self, index: u32, offset: u64, size: u64) -> BackendResult<MappedArea> {
        self.check_present()?;
        let region = self
            .spec
            .region(index)
            .ok_or_else(|| BackendError::OutOfRange(format!("no region {index}")))?;
        if !region.mmap {
            return Err(BackendError::Unsupported("the region cannot be mmapped"));
        }
        let areas = if region.sparse_mmap.is_empty() {
            vec![(0, region.size)]
        } else {
            region.sparse_mmap.clone()
        };
        let end = offset.checked_add(size);
        let inside = areas.iter().any(|&(start, len)| {
            offset >= start && end.is_some_and(|end| end <= start.saturating_add(len))
        });
        if size == 0 || offset % PAGE != 0 || size % PAGE != 0 || !inside {
            return Err(einval("region mmap"));
        }
        let file = self
            .memory
            .get(&index)
            .ok_or_else(|| BackendError::OutOfRange(format!("no region {index}")))?;
        let size = usize::try_from(size).map_err(|_| einval("region mmap"))?;
        MappedArea::mmap_fd(file.as_raw_fd(), offset, size).map_err(|source| BackendError::Host {
            operation: "region mmap",
            source,
        })
    }

    fn set_irqs(&self, index: u32, start: u32, eventfds: &[&EventFd]) -> BackendResult<()> {
        self.check_present()?;
        let count = self.spec.irq_count(index);
        if count == 0 {
            return Err(BackendError::OutOfRange(format!(
                "no interrupt index {index}"
            )));
        }
        let slot = index as usize;
        let mut state = self.lock();
        state.irq_calls.push(IrqCall {
            index,
            start,
            count: eventfds.len(),
        });
        if eventfds.is_empty() {
            if let Some(vectors) = state.irqs.get_mut(slot) {
                vectors.clear();
            }
            if index == INTX_IRQ {
                state.intx_unmask = None;
            }
            return Ok(());
        }
        let others_enabled = state
            .irqs
            .iter()
            .enumerate()
            .any(|(i, vectors)| i != slot && !vectors.is_empty());
        if others_enabled {
            // Kernel VFIO: one interrupt type at a time.
            return Err(einval("set_irqs: another interrupt index is enabled"));
        }
        let clones = eventfds
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| BackendError::Host {
                operation: "set_irqs",
                source,
            })?;
        let vectors = state
            .irqs
            .get_mut(slot)
            .ok_or_else(|| BackendError::OutOfRange(format!("no interrupt index {index}")))?;
        let first = start as usize;
        if vectors.is_empty() {
            // Enabling: from vector 0, at most the device's count.
            if start != 0 || clones.len() > count as usize {
                return Err(einval("set_irqs"));
            }
            *vectors = clones;
        } else {
            // Changing vectors of an enabled index: only those it was enabled with.
            let end = first.checked_add(clones.len());
            let Some(targets) = end.and_then(|end| vectors.get_mut(first..end)) else {
                return Err(einval("set_irqs"));
            };
            for (target, fd) in targets.iter_mut().zip(clones) {
                *target = fd;
            }
        }
        Ok(())
    }

    fn set_intx_unmask(&self, resample: &EventFd) -> BackendResult<()> {
        self.check_present()?;
        let mut state = self.lock();
        if state.irqs[INTX_IRQ as usize].is_empty() {
            return Err(einval("set_irqs: INTx unmask while INTx is disabled"));
        }
        state.intx_unmask = Some(resample.try_clone().map_err(|source| BackendError::Host {
            operation: "set_irqs",
            source,
        })?);
        Ok(())
    }

    fn reset(&self) -> BackendResult<()> {
        self.check_present()?;
        if !self.spec.reset {
            return Err(BackendError::Unsupported("the device cannot be reset"));
        }
        let mut state = self.lock();
        state.config = self.spec.config;
        for vectors in &mut state.irqs {
            vectors.clear();
        }
        state.intx_unmask = None;
        for (index, file) in &self.memory {
            let size = self.spec.region(*index).map_or(0, |r| r.size);
            // In place: the model's mappings of the memory stay valid. The ROM keeps its
            // image (it is read-only memory), BARs go back to zeroes.
            file.write_all_at(&initial_content(*index, size), 0)
                .map_err(|source| BackendError::Host {
                    operation: "reset",
                    source,
                })?;
        }
        self.resets.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn dma_map(&self, region: &DmaRegion) -> BackendResult<()> {
        self.check_present()?;
        let end = region
            .iova
            .checked_add(region.size)
            .filter(|_| region.size > 0)
            .ok_or_else(|| einval("dma map"))?;
        let mut state = self.lock();
        let overlaps = state
            .dma
            .values()
            .any(|m| region.iova < m.iova.saturating_add(m.size) && m.iova < end);
        if overlaps {
            return Err(BackendError::Host {
                operation: "dma map",
                source: std::io::Error::from_raw_os_error(libc::EEXIST),
            });
        }
        state.dma.insert(region.iova, *region);
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> BackendResult<()> {
        self.check_present()?;
        let end = iova
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or_else(|| einval("dma unmap"))?;
        let mut state = self.lock();
        let touched: Vec<DmaRegion> = state
            .dma
            .values()
            .filter(|m| iova < m.iova.saturating_add(m.size) && m.iova < end)
            .copied()
            .collect();
        // Like VFIO type1: a mapping is unmapped whole or not at all.
        if touched
            .iter()
            .any(|m| m.iova < iova || m.iova.saturating_add(m.size) > end)
        {
            return Err(einval("dma unmap: the range splits a mapping"));
        }
        for m in touched {
            state.dma.remove(&m.iova);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dma(iova: u64, size: u64) -> DmaRegion {
        DmaRegion {
            iova,
            size,
            host_address: 0x7f00_0000_0000,
            fd: None,
        }
    }

    #[test]
    fn virtio_net_shape() {
        let sim = SimulatedDevice::virtio_net().unwrap();
        let config = sim.config();
        assert_eq!(&config[0..4], &[0xf4, 0x1a, 0x41, 0x10]);
        assert_eq!(config[reg::COMMAND], 0, "reset state: decoding off");
        assert_eq!(config[VIRTIO_NET_MSIX_CAPABILITY], MSIX_CAPABILITY_ID);
        assert_eq!(
            config[VIRTIO_NET_MSIX_CAPABILITY + 3] & 0x80,
            0,
            "MSI-X off"
        );
        // The capability list the dump declares: five virtio capabilities, then MSI-X.
        assert_eq!(
            capability_offsets(&config),
            vec![0x40, 0x50, 0x60, 0x70, 0x84, 0x98]
        );
        let bar = sim.region_info(0).unwrap();
        assert_eq!(bar.size, VIRTIO_NET_BAR_SIZE);
        let areas = bar.mappable_areas();
        assert!(areas.iter().all(|&(offset, size)| {
            let end = offset + size;
            !(offset..end).contains(&VIRTIO_NET_MSIX_TABLE)
                && !(offset..end).contains(&VIRTIO_NET_MSIX_PBA)
        }));
        assert_eq!(areas.iter().map(|a| a.1).sum::<u64>(), 0x8_0000 - 0x2000);
        assert_eq!(sim.region_info(1).unwrap().size, 0);
        assert_eq!(sim.region_info(CONFIG_REGION).unwrap().size, 256);
        assert!(sim.region_info(9).is_err());
        assert_eq!(sim.irq_info(MSIX_IRQ).unwrap().count, 3);
        assert_eq!(sim.irq_info(INTX_IRQ).unwrap().count, 0);
        assert!(sim.irq_info(3).is_err());
    }

    #[test]
    fn regions_are_memory_shared_with_mappings() {
        let sim = SimulatedDevice::virtio_net().unwrap();
        sim.region_write(0, 0x10, &[1, 2, 3, 4]).unwrap();
        let mut data = [0u8; 4];
        sim.region_read(0, 0x10, &mut data).unwrap();
        assert_eq!(data, [1, 2, 3, 4]);
        assert_eq!(sim.trapped_accesses(), 2);
        // A mapping sees the same memory, and writes through it reach the device.
        let area = sim.map_region(0, 0, 0x1000).unwrap();
        // SAFETY: the area is 0x1000 bytes of this test's mapping, alive until dropped.
        let mapped = unsafe { std::slice::from_raw_parts_mut(area.host_address(), 0x1000) };
        assert_eq!(&mapped[0x10..0x14], &[1, 2, 3, 4]);
        mapped[0x20] = 0xaa;
        assert_eq!(sim.peek(0, 0x20, 1), vec![0xaa]);
        // Mappings must stay inside a sparse area, page aligned.
        assert!(sim.map_region(0, VIRTIO_NET_MSIX_TABLE, 0x1000).is_err());
        assert!(sim.map_region(0, 0x7000, 0x2000).is_err());
        assert!(sim.map_region(0, 0x800, 0x1000).is_err());
        assert!(sim.map_region(0, 0x9000, 0x3f000).is_ok());
        assert!(sim.map_region(1, 0, 0x1000).is_err());
        // Accesses leaving the region fail.
        assert!(sim
            .region_read(0, VIRTIO_NET_BAR_SIZE - 2, &mut data)
            .is_err());
        assert!(sim.region_write(0, u64::MAX, &data).is_err());
        // Reset zeroes the memory in place.
        sim.reset().unwrap();
        assert_eq!(mapped[0x20], 0);
        assert_eq!(sim.resets(), 1);
        drop(area);
    }

    #[test]
    fn the_rom_is_read_only_memory_with_a_known_image() {
        assert!(SimulatedDevice::virtio_net()
            .unwrap()
            .region_info(ROM_REGION)
            .is_ok_and(|r| r.size == 0));
        let sim = SimulatedDevice::new(SimSpec::virtio_net().with_rom(0x1000)).unwrap();
        let info = sim.region_info(ROM_REGION).unwrap();
        assert_eq!(
            (info.size, info.read, info.write, info.mmap),
            (0x1000, true, false, false)
        );
        let image = rom_image(0x1000);
        assert_eq!(image.len(), 0x1000);
        assert_eq!(&image[..3], &[0x55, 0xaa, 8]);
        assert_ne!(image[0x10..0x20], image[0x110..0x120], "pages differ");
        let mut data = vec![0u8; 0x1000];
        sim.region_read(ROM_REGION, 0, &mut data).unwrap();
        assert_eq!(data, image);
        // Writes and mappings are refused; nothing changes.
        assert!(sim.region_write(ROM_REGION, 0, &[0; 4]).is_err());
        assert!(sim.map_region(ROM_REGION, 0, 0x1000).is_err());
        assert!(sim.region_read(ROM_REGION, 0xffe, &mut data[..4]).is_err());
        // A reset keeps the image (BARs go back to zeroes).
        sim.region_write(0, 0, &[9]).unwrap();
        sim.reset().unwrap();
        assert_eq!(sim.peek(ROM_REGION, 0, 0x1000), image);
        assert_eq!(sim.peek(0, 0, 1), vec![0]);
        // A second ROM replaces the first; big ROMs saturate the length byte.
        let spec = SimSpec::virtio_net().with_rom(0x800).with_rom(0x4_0000);
        assert_eq!(
            spec.regions
                .iter()
                .filter(|r| r.index == ROM_REGION)
                .count(),
            1
        );
        assert_eq!(rom_image(0x4_0000)[2], 0xff);
        assert!(rom_image(0).is_empty());
    }

    #[test]
    fn config_writes_follow_the_hardware_mask_and_are_recorded() {
        let sim = SimulatedDevice::virtio_net().unwrap();
        sim.region_write(CONFIG_REGION, 0, &[0xff; 4]).unwrap();
        sim.region_write(CONFIG_REGION, 0x10, &[0xff; 8]).unwrap();
        sim.region_write(CONFIG_REGION, 0x9a, &[0xff, 0xff])
            .unwrap();
        let config = sim.config();
        assert_eq!(&config[0..4], &[0xf4, 0x1a, 0x41, 0x10]);
        // 512 KiB 64-bit BAR sizing, as the hardware answers.
        assert_eq!(
            &config[0x10..0x18],
            &[0x04, 0, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        // MSI-X table size stays, enable and mask change.
        assert_eq!(&config[0x9a..0x9c], &[0x02, 0xc0]);
        assert_eq!(sim.config_writes().len(), 3);
        assert!(sim.region_write(CONFIG_REGION, 0xff, &[0; 2]).is_err());
        let mut data = [0; 4];
        assert!(sim.region_read(CONFIG_REGION, 0xfe, &mut data).is_err());
        sim.reset().unwrap();
        assert_eq!(sim.config(), SimSpec::virtio_net().config);
    }

    #[test]
    fn interrupt_indexes_one_at_a_time() {
        let spec = SimSpec::virtio_net()
            .with_intx(1)
            .with_msi(0xa4, MsiCapability::from_control(0));
        let sim = SimulatedDevice::new(spec).unwrap();
        let fds: Vec<EventFd> = (0..3).map(|_| EventFd::new(0).unwrap()).collect();
        let refs: Vec<&EventFd> = fds.iter().collect();
        // INTx unmask needs INTx enabled.
        assert!(sim.set_intx_unmask(&fds[0]).is_err());
        sim.set_irqs(INTX_IRQ, 0, &refs[..1]).unwrap();
        sim.set_intx_unmask(&fds[1]).unwrap();
        assert!(sim.has_intx_unmask());
        // MSI-X while INTx is on: refused.
        assert!(sim.set_irqs(MSIX_IRQ, 0, &refs).is_err());
        sim.set_irqs(INTX_IRQ, 0, &[]).unwrap();
        assert!(!sim.has_intx_unmask());
        // More vectors than the device has, or enabling from vector 1: refused.
        assert!(sim.set_irqs(MSI_IRQ, 0, &refs[..2]).is_err());
        assert!(sim.set_irqs(MSIX_IRQ, 1, &refs[..1]).is_err());
        sim.set_irqs(MSIX_IRQ, 0, &refs).unwrap();
        assert_eq!(sim.enabled_vectors(MSIX_IRQ), 3);
        assert!(sim.fire(MSIX_IRQ, 2));
        assert_eq!(fds[2].read().unwrap(), 1);
        assert!(!sim.fire(MSIX_IRQ, 3));
        assert!(!sim.fire(MSI_IRQ, 0));
        // One vector re-pointed.
        sim.set_irqs(MSIX_IRQ, 2, &refs[..1]).unwrap();
        assert!(sim.fire(MSIX_IRQ, 2));
        assert_eq!(fds[0].read().unwrap(), 1);
        assert!(sim.set_irqs(MSIX_IRQ, 2, &refs[..2]).is_err());
        assert_eq!(sim.irq_calls().len(), 8);
        sim.reset().unwrap();
        assert_eq!(sim.enabled_vectors(MSIX_IRQ), 0);
    }

    #[test]
    fn dma_mappings_refuse_overlaps() {
        let sim = SimulatedDevice::virtio_net().unwrap();
        sim.dma_map(&dma(0, 0x10_0000)).unwrap();
        sim.dma_map(&dma(0x10_0000, 0x1000)).unwrap();
        assert!(sim.dma_map(&dma(0xf_f000, 0x2000)).is_err());
        assert!(sim.dma_map(&dma(u64::MAX, 2)).is_err());
        assert!(sim.dma_map(&dma(0x20_0000, 0)).is_err());
        // Unmapping part of a mapping is refused; whole ones go.
        assert!(sim.dma_unmap(0, 0x1000).is_err());
        sim.dma_unmap(0, 0x10_0000).unwrap();
        assert_eq!(sim.dma_mappings().len(), 1);
        sim.set_gone(true);
        assert!(matches!(
            sim.dma_map(&dma(0, 0x1000)),
            Err(BackendError::Gone(_))
        ));
        assert!(matches!(sim.reset(), Err(BackendError::Gone(_))));
        let mut data = [0u8; 4];
        assert!(matches!(
            sim.region_read(CONFIG_REGION, 0, &mut data),
            Err(BackendError::Gone(_))
        ));
        sim.set_gone(false);
        sim.region_read(CONFIG_REGION, 0, &mut data).unwrap();
    }
}
