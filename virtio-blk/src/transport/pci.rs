//! The virtio-pci modern transport (virtio 1.2, section 4.1) with MSI-X.
//!
//! The function is 1af4:1042 (0x1040 + the block device ID 2), revision 1 (a modern-only,
//! non-transitional device), class 01/00/00 (mass storage, SCSI — what QEMU reports for
//! virtio-blk; the Linux driver binds by vendor and device ID and ignores the class),
//! subsystem 1af4:0002, no INTx pin: interrupts are MSI-X only.
//!
//! One 64-bit non-prefetchable memory BAR (BAR 0, [`BAR_SIZE`] bytes) holds every region;
//! the virtio capabilities point into it:
//!
//! | offset             | region                                                     |
//! |--------------------|------------------------------------------------------------|
//! | [`COMMON_OFFSET`]  | `struct virtio_pci_common_cfg`                             |
//! | [`ISR_OFFSET`]     | ISR status (1 byte, cleared by reading)                    |
//! | [`DEVICE_OFFSET`]  | `struct virtio_blk_config`                                 |
//! | [`NOTIFY_OFFSET`]  | queue `i` notifies at `NOTIFY_OFFSET + 4 * i`              |
//! | [`MSIX_TABLE_OFFSET`] | MSI-X table: vector 0 for config changes, 1 + i for queue i (by convention; the driver chooses) |
//! | [`MSIX_PBA_OFFSET`]   | MSI-X pending bit array                                 |
//!
//! Wiring: [`VirtioPciTransport::notify_ioeventfds`] gives each queue's eventfd and its
//! offset in BAR 0: register it as a KVM ioeventfd at `bar0_base + offset` (any length, no
//! datamatch), and move it when the guest moves BAR 0 (the PCI bus's `BarMapper` is told).
//! Interrupts go through [`PciInterrupt`], which maps queue → `queue_msix_vector` → MSI-X
//! vector → [`MsiRouting`] (a KVM irqfd with [`vmkit_pci_passthrough::kvm`]).
//!
//! Lock order: the transport's state, then the MSI-X model. The device's I/O threads take
//! only the MSI-X model (through [`PciInterrupt`]), so a reset, which waits for them with
//! the state locked, cannot deadlock.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::GuestMemory;
use vmkit_block_backend::AsyncDisk;
use vmkit_pci_passthrough::config::CONFIG_SPACE_SIZE;
use vmkit_pci_passthrough::msix::{MSIX_CAPABILITY_ID, MSIX_CONTROL_OFFSET};
use vmkit_pci_passthrough::{
    BarKind, ConfigSpace, MsiRouting, MsixConfig, MsixLocation, PciBar, PciDevice, PciHeader,
};
use vmm_sys_util::eventfd::EventFd;

use crate::config::CONFIG_SIZE;
use crate::device::{BlockDevice, BlockOptions, QueueArea};
use crate::interrupt::InterruptSink;
use crate::VIRTIO_ID_BLOCK;

/// The virtio PCI vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern virtio-pci device IDs are 0x1040 + the virtio device ID.
pub const DEVICE_ID: u16 = 0x1040 + VIRTIO_ID_BLOCK as u16;
/// Revision 1: a modern-only device.
pub const REVISION_ID: u8 = 1;
/// The BAR holding every region.
pub const BAR: u8 = 0;
/// Bytes of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Common configuration.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Bytes of `struct virtio_pci_common_cfg` up to `queue_device` (no `queue_notify_data`
/// or `queue_reset`: those features are not offered).
pub const COMMON_SIZE: u64 = 0x38;
/// ISR status.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Notifications.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// `notify_off_multiplier`: queue `i` notifies at `NOTIFY_OFFSET + 4 * i`.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X pending bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Most queues this layout holds: one MSI-X vector per queue plus one for configuration
/// changes must fit the 4 KiB table region.
pub const MAX_QUEUES: u16 = 255;
/// `VIRTIO_MSI_NO_VECTOR`.
pub const NO_VECTOR: u16 = 0xffff;

/// `cfg_type` values of the virtio PCI capabilities.
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access window.
    pub const PCI: u8 = 5;
}

/// Capability ID of vendor-specific capabilities (all virtio capabilities).
pub const VENDOR_CAPABILITY_ID: u8 = 0x09;

/// Register offsets of `struct virtio_pci_common_cfg`.
pub mod common {
    /// `le32 device_feature_select` (RW).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `le32 device_feature` (R).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `le32 driver_feature_select` (RW).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `le32 driver_feature` (RW).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `le16 config_msix_vector` (RW).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// `le16 num_queues` (R).
    pub const NUM_QUEUES: u64 = 0x12;
    /// `u8 device_status` (RW).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `u8 config_generation` (R).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `le16 queue_select` (RW).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `le16 queue_size` (RW).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `le16 queue_msix_vector` (RW).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `le16 queue_enable` (RW).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `le16 queue_notify_off` (R).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `le64 queue_desc` (RW).
    pub const QUEUE_DESC: u64 = 0x20;
    /// `le64 queue_driver` (RW).
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// `le64 queue_device` (RW).
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Errors of the PCI transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// More queues than the BAR layout holds.
    #[error("too many queues for virtio-pci: {0} (at most {MAX_QUEUES})")]
    TooManyQueues(u16),
    /// The interrupt sink was built for another number of queues.
    #[error("the interrupt sink has {sink} queues, the device {device}")]
    QueueCountMismatch {
        /// Queues of the sink.
        sink: usize,
        /// Queues of the device.
        device: u16,
    },
    /// The PCI layer refused the configuration (a bug in the layout).
    #[error("PCI configuration: {0}")]
    Pci(vmkit_pci_passthrough::Error),
    /// The block device could not be created.
    #[error("block device: {0}")]
    Device(crate::Error),
}

/// MSI-X vectors a device with `num_queues` queues uses: one per queue and one for
/// configuration changes. Give the [`MsiRouting`] sink at least that many.
pub fn msix_vectors(num_queues: u16) -> u16 {
    num_queues.saturating_add(1)
}

/// The MSI-X side of the transport, shared with the device's I/O threads: which vector
/// each queue and the configuration change use, and the MSI-X model.
pub struct PciInterrupt {
    msix: Mutex<MsixConfig>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl PciInterrupt {
    /// The interrupt side of a device with `num_queues` queues (at most [`MAX_QUEUES`]),
    /// routing [`msix_vectors`]`(num_queues)` vectors through `routing`.
    pub fn new(num_queues: u16, routing: Arc<dyn MsiRouting>) -> Result<Arc<Self>, Error> {
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(Error::TooManyQueues(num_queues));
        }
        let msix = MsixConfig::new(msix_vectors(num_queues), routing).map_err(Error::Pci)?;
        Ok(Arc::new(PciInterrupt {
            msix: Mutex::new(msix),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        }))
    }

    fn msix(&self) -> MutexGuard<'_, MsixConfig> {
        // Every MSI-X update is a plain store: the model stays usable after a panic.
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the MSI-X model (for status queries and tests).
    pub fn with_msix<T>(&self, f: impl FnOnce(&mut MsixConfig) -> T) -> T {
        f(&mut self.msix())
    }

    /// The vector queue `queue` uses (`NO_VECTOR`: none).
    pub fn queue_vector(&self, queue: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    /// The vector configuration changes use.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        if vector == NO_VECTOR {
            // The driver asked for no interrupt: it polls (or reads the ISR).
            return Ok(());
        }
        match self.msix().trigger(vector) {
            Ok(_) => Ok(()),
            Err(vmkit_pci_passthrough::Error::Signal(e)) => Err(e),
            // Vectors are checked when written; nothing else can fail.
            Err(_) => Ok(()),
        }
    }

    /// Sets the vector of `slot` (a queue's or the configuration's): one the function has,
    /// or `NO_VECTOR` when out of range, which the driver reads back as a refusal.
    fn store_vector(&self, slot: &AtomicU16, vector: u16) {
        let valid = vector < self.msix().num_vectors();
        slot.store(if valid { vector } else { NO_VECTOR }, Ordering::Release);
    }

    fn reset_vectors(&self) {
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }
}

impl InterruptSink for PciInterrupt {
    fn signal_used(&self, queue: u16) -> std::io::Result<()> {
        self.trigger(self.queue_vector(queue))
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.trigger(self.config_vector())
    }
}

struct State<M: GuestMemory + Send + Sync + 'static> {
    device: BlockDevice<M>,
    config: ConfigSpace,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    msix_capability: usize,
    pci_cfg_capability: usize,
}

/// A virtio-blk device behind virtio-pci modern registers, as a [`PciDevice`].
pub struct VirtioPciTransport<M: GuestMemory + Send + Sync + 'static> {
    state: Mutex<State<M>>,
    interrupt: Arc<PciInterrupt>,
}

impl<M: GuestMemory + Send + Sync + 'static> VirtioPciTransport<M> {
    /// Puts `device` behind virtio-pci; `interrupt` must be the sink `device` was created
    /// with (see [`VirtioPciTransport::build`], which does both).
    pub fn new(device: BlockDevice<M>, interrupt: Arc<PciInterrupt>) -> Result<Self, Error> {
        let num_queues = device.num_queues();
        if interrupt.queue_vectors.len() != usize::from(num_queues) {
            return Err(Error::QueueCountMismatch {
                sink: interrupt.queue_vectors.len(),
                device: num_queues,
            });
        }
        let (config, msix_capability, pci_cfg_capability) =
            config_space(num_queues, &interrupt.msix()).map_err(Error::Pci)?;
        Ok(VirtioPciTransport {
            state: Mutex::new(State {
                device,
                config,
                device_feature_select: 0,
                driver_feature_select: 0,
                queue_select: 0,
                msix_capability,
                pci_cfg_capability,
            }),
            interrupt,
        })
    }

    /// A device over `disks` (one per queue) in `mem`, its interrupts routed through
    /// `routing` (which needs [`msix_vectors`]`(disks.len())` vectors), behind virtio-pci.
    pub fn build(
        disks: Vec<Box<dyn AsyncDisk>>,
        mem: Arc<M>,
        options: BlockOptions,
        routing: Arc<dyn MsiRouting>,
    ) -> Result<Self, Error> {
        let num_queues = u16::try_from(disks.len()).unwrap_or(u16::MAX);
        let interrupt = PciInterrupt::new(num_queues, routing)?;
        let device =
            BlockDevice::new(disks, mem, interrupt.clone(), options).map_err(Error::Device)?;
        Self::new(device, interrupt)
    }

    fn lock(&self) -> MutexGuard<'_, State<M>> {
        // A panic elsewhere must not take the device down with it: the state stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the device (for status queries and tests).
    pub fn with_device<T>(&self, f: impl FnOnce(&mut BlockDevice<M>) -> T) -> T {
        f(&mut self.lock().device)
    }

    /// The interrupt side (queue vectors, MSI-X model).
    pub fn interrupt(&self) -> &Arc<PciInterrupt> {
        &self.interrupt
    }

    /// Copies of the queues' notification eventfds with their queue index and their offset
    /// in BAR 0: register each as a KVM ioeventfd at `bar0_base + offset` (no datamatch,
    /// any length), and again at the new base whenever BAR 0 moves.
    pub fn notify_ioeventfds(&self) -> std::io::Result<Vec<(u16, u64, EventFd)>> {
        let state = self.lock();
        (0..state.device.num_queues())
            .filter_map(|q| state.device.notify_eventfd(u32::from(q)).map(|fd| (q, fd)))
            .map(|(q, fd)| Ok((q, notify_offset(q), fd.try_clone()?)))
            .collect()
    }
}

/// Where queue `queue` notifies, from the start of BAR 0.
pub fn notify_offset(queue: u16) -> u64 {
    NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * u64::from(queue)
}

/// The body of a `struct virtio_pci_cap` after `cap_vndr` and `cap_next`.
fn virtio_cap(cfg: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut body = vec![cap_len, cfg, BAR, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

/// The configuration space: header, BAR 0, MSI-X and the virtio capabilities. Returns it
/// with the offsets of the MSI-X and PCI_CFG capabilities.
fn config_space(
    num_queues: u16,
    msix: &MsixConfig,
) -> Result<(ConfigSpace, usize, usize), vmkit_pci_passthrough::Error> {
    let mut config = ConfigSpace::new(&PciHeader {
        vendor_id: VENDOR_ID,
        device_id: DEVICE_ID,
        revision_id: REVISION_ID,
        class: 0x01,
        subclass: 0x00,
        prog_if: 0x00,
        subsystem_vendor_id: VENDOR_ID,
        subsystem_id: VIRTIO_ID_BLOCK as u16,
        interrupt_pin: 0,
        multi_function: false,
    });
    config.add_bar(PciBar {
        index: BAR,
        kind: BarKind::Memory64,
        size: BAR_SIZE,
        prefetchable: false,
    })?;
    let (body, mask) = msix.capability(
        MsixLocation {
            bar: BAR,
            offset: MSIX_TABLE_OFFSET as u32,
        },
        MsixLocation {
            bar: BAR,
            offset: MSIX_PBA_OFFSET as u32,
        },
    );
    let msix_capability = config.add_capability(MSIX_CAPABILITY_ID, &body, &mask)?;
    let notify_length = u64::from(NOTIFY_MULTIPLIER) * u64::from(num_queues);
    for body in [
        virtio_cap(cfg_type::COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
        virtio_cap(
            cfg_type::NOTIFY,
            NOTIFY_OFFSET,
            notify_length,
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        ),
        virtio_cap(cfg_type::ISR, ISR_OFFSET, 1, &[]),
        virtio_cap(cfg_type::DEVICE, DEVICE_OFFSET, CONFIG_SIZE as u64, &[]),
    ] {
        config.add_capability(VENDOR_CAPABILITY_ID, &body, &[])?;
    }
    // virtio_pci_cfg_cap: the driver writes bar, offset and length, then accesses
    // pci_cfg_data to reach the BAR through configuration space.
    let body = virtio_cap(cfg_type::PCI, 0, 0, &[0; 4]);
    let mut mask = vec![0u8; body.len()];
    // bar (body offset 2), offset and length (6..14), pci_cfg_data (14..18).
    mask[2] = 0xff;
    mask[6..18].fill(0xff);
    let pci_cfg_capability = config.add_capability(VENDOR_CAPABILITY_ID, &body, &mask)?;
    Ok((
        config,
        usize::from(msix_capability),
        usize::from(pci_cfg_capability),
    ))
}

/// Whether `[offset, offset + len)` and `[start, start + size)` overlap.
fn touches(offset: usize, len: usize, start: usize, size: usize) -> bool {
    offset < start + size && start < offset.saturating_add(len)
}

impl<M: GuestMemory + Send + Sync + 'static> State<M> {
    /// The PCI_CFG window: `(bar, offset, length)` as the driver set it, if usable.
    fn pci_cfg_target(&self) -> Option<(u8, u64, usize)> {
        let cap = self.pci_cfg_capability;
        let bar = self.config.u8_at(cap + 4);
        let offset = u64::from(self.config.u32_at(cap + 8));
        let length = self.config.u32_at(cap + 12) as usize;
        let aligned = matches!(length, 1 | 2 | 4) && offset % length as u64 == 0;
        (bar == BAR && aligned).then_some((bar, offset, length))
    }

    fn read_config(&mut self, interrupt: &PciInterrupt, offset: usize, data: &mut [u8]) {
        let data_at = self.pci_cfg_capability + 16;
        if touches(offset, data.len(), data_at, 4) {
            if let Some((_, bar_offset, length)) = self.pci_cfg_target() {
                let mut window = [0u8; 4];
                if let Some(bytes) = window.get_mut(..length) {
                    self.bar_read(interrupt, bar_offset, bytes);
                }
                self.config.set_bytes(data_at, &window);
            }
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, interrupt: &PciInterrupt, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let control = self.msix_capability + MSIX_CONTROL_OFFSET;
        if touches(offset, data.len(), control, 2) {
            let value = self.config.u16_at(control);
            interrupt.msix().set_control(value);
        }
        let data_at = self.pci_cfg_capability + 16;
        if touches(offset, data.len(), data_at, 4) {
            if let Some((_, bar_offset, length)) = self.pci_cfg_target() {
                let mut window = [0u8; 4];
                self.config.read(data_at, &mut window);
                if let Some(bytes) = window.get(..length) {
                    self.bar_write(interrupt, bar_offset, bytes);
                }
            }
        }
    }

    fn bar_read(&mut self, interrupt: &PciInterrupt, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < ISR_OFFSET => self.read_common(interrupt, o, data),
            ISR_OFFSET => {
                if let Some(byte) = data.first_mut() {
                    // Reading the ISR acknowledges it (virtio 1.2, 4.1.4.5).
                    let status = self.device.interrupt_status();
                    self.device.ack_interrupt(status);
                    *byte = status as u8;
                }
            }
            o if o < DEVICE_OFFSET => {}
            o if o < NOTIFY_OFFSET => self.device.read_config(o - DEVICE_OFFSET, data),
            o if o < MSIX_TABLE_OFFSET => {}
            o if o < MSIX_PBA_OFFSET => interrupt.msix().read_table(o - MSIX_TABLE_OFFSET, data),
            o if o < BAR_SIZE => interrupt.msix().read_pba(o - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, interrupt: &PciInterrupt, offset: u64, data: &[u8]) {
        match offset {
            o if o < ISR_OFFSET => self.write_common(interrupt, o, data),
            o if o < DEVICE_OFFSET => {}
            o if o < NOTIFY_OFFSET => self.device.write_config(o - DEVICE_OFFSET, data),
            o if o < MSIX_TABLE_OFFSET => {
                let within = o - NOTIFY_OFFSET;
                if within % u64::from(NOTIFY_MULTIPLIER) == 0 {
                    let queue = within / u64::from(NOTIFY_MULTIPLIER);
                    // Out-of-range queues are ignored by the device.
                    self.device.notify_queue(queue as u32);
                }
            }
            o if o < MSIX_PBA_OFFSET => {
                interrupt.msix().write_table(o - MSIX_TABLE_OFFSET, data);
            }
            // The PBA is read-only.
            _ => {}
        }
    }

    fn read_common(&self, interrupt: &PciInterrupt, offset: u64, data: &mut [u8]) {
        let device = &self.device;
        let queue = device.queue_config(u32::from(self.queue_select));
        let value: u64 = match (offset, data.len()) {
            (common::DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (common::DEVICE_FEATURE, 4) => {
                u64::from(device.device_features(self.device_feature_select))
            }
            (common::DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (common::DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => device.driver_features() & 0xffff_ffff,
                1 => device.driver_features() >> 32,
                _ => 0,
            },
            (common::CONFIG_MSIX_VECTOR, 2) => u64::from(interrupt.config_vector()),
            (common::NUM_QUEUES, 2) => u64::from(device.num_queues()),
            (common::DEVICE_STATUS, 1) => u64::from(device.status() as u8),
            (common::CONFIG_GENERATION, 1) => u64::from(device.config_generation() as u8),
            (common::QUEUE_SELECT, 2) => u64::from(self.queue_select),
            // Until the driver writes a size, the register holds the maximum.
            (common::QUEUE_SIZE, 2) => queue.map_or(0, |q| match q.size {
                0 => u64::from(device.queue_max_size()),
                size => u64::from(size),
            }),
            (common::QUEUE_MSIX_VECTOR, 2) => u64::from(interrupt.queue_vector(self.queue_select)),
            (common::QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(q.ready)),
            (common::QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| u64::from(self.queue_select)),
            (o, len) => match (queue_area(o), len) {
                (Some((area, high)), 4) => {
                    let value = queue.map_or(0, |q| area_value(q, area));
                    if high {
                        value >> 32
                    } else {
                        value & 0xffff_ffff
                    }
                }
                (Some((area, false)), 8) if o % 8 == 0 => queue.map_or(0, |q| area_value(q, area)),
                _ => 0,
            },
        };
        let bytes = value.to_le_bytes();
        for (out, byte) in data.iter_mut().zip(bytes) {
            *out = byte;
        }
    }

    fn write_common(&mut self, interrupt: &PciInterrupt, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let Some(prefix) = bytes.get_mut(..data.len()) else {
            return;
        };
        prefix.copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let queue = u32::from(self.queue_select);
        let device = &mut self.device;
        match (offset, data.len()) {
            (common::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (common::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (common::DRIVER_FEATURE, 4) => {
                device.set_driver_features(self.driver_feature_select, value as u32)
            }
            (common::CONFIG_MSIX_VECTOR, 2) => {
                interrupt.store_vector(&interrupt.config_vector, value as u16)
            }
            (common::DEVICE_STATUS, 1) => {
                device.set_status(value as u32);
                if value == 0 {
                    // A device reset returns the virtio registers, vectors included, to
                    // their initial values; the MSI-X table is PCI state and stays.
                    self.device_feature_select = 0;
                    self.driver_feature_select = 0;
                    self.queue_select = 0;
                    interrupt.reset_vectors();
                }
            }
            // Out-of-range selections are kept: every queue access then does nothing.
            (common::QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (common::QUEUE_SIZE, 2) => device.set_queue_size(queue, value as u32),
            (common::QUEUE_MSIX_VECTOR, 2) => {
                if let Some(slot) = interrupt.queue_vectors.get(usize::from(self.queue_select)) {
                    interrupt.store_vector(slot, value as u16);
                }
            }
            (common::QUEUE_ENABLE, 2) => {
                // Writing 0 is not allowed to the driver (no queue reset): ignored.
                if value == 1 {
                    if device.queue_config(queue).is_some_and(|q| q.size == 0) {
                        // The driver kept the maximum size the register showed.
                        let max = u32::from(device.queue_max_size());
                        device.set_queue_size(queue, max);
                    }
                    device.set_queue_ready(queue, true);
                }
            }
            (o, len) => match (queue_area(o), len) {
                (Some((area, high)), 4) => {
                    device.set_queue_address(queue, area, high, value as u32)
                }
                (Some((area, false)), 8) if o % 8 == 0 => {
                    device.set_queue_address(queue, area, false, value as u32);
                    device.set_queue_address(queue, area, true, (value >> 32) as u32);
                }
                _ => {}
            },
        }
    }
}

/// Which queue address a common configuration offset is (and whether the high half).
fn queue_area(offset: u64) -> Option<(QueueArea, bool)> {
    let area = match offset & !0x7 {
        common::QUEUE_DESC => QueueArea::Desc,
        common::QUEUE_DRIVER => QueueArea::Driver,
        common::QUEUE_DEVICE => QueueArea::Device,
        _ => return None,
    };
    match offset % 8 {
        0 => Some((area, false)),
        4 => Some((area, true)),
        _ => None,
    }
}

fn area_value(queue: &crate::device::QueueConfig, area: QueueArea) -> u64 {
    match area {
        QueueArea::Desc => queue.desc,
        QueueArea::Driver => queue.driver,
        QueueArea::Device => queue.device,
    }
}

impl<M: GuestMemory + Send + Sync + 'static> PciDevice for VirtioPciTransport<M> {
    fn read_config(&self, offset: u16, data: &mut [u8]) {
        if usize::from(offset) >= CONFIG_SPACE_SIZE {
            data.fill(0);
            return;
        }
        self.lock()
            .read_config(&self.interrupt, usize::from(offset), data);
    }

    fn write_config(&self, offset: u16, data: &[u8]) {
        if usize::from(offset) >= CONFIG_SPACE_SIZE {
            return;
        }
        self.lock()
            .write_config(&self.interrupt, usize::from(offset), data);
    }

    fn bars(&self) -> Vec<PciBar> {
        self.lock().config.bars().to_vec()
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != BAR || data.len() > 8 {
            data.fill(0);
            return;
        }
        self.lock().bar_read(&self.interrupt, offset, data);
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if bar != BAR || data.len() > 8 {
            return;
        }
        self.lock().bar_write(&self.interrupt, offset, data);
    }
}

// Compile-time checks of the layout: the regions do not overlap and fit the BAR.
const _: () = {
    assert!(COMMON_SIZE <= ISR_OFFSET);
    assert!(DEVICE_OFFSET + CONFIG_SIZE as u64 <= NOTIFY_OFFSET);
    assert!(NOTIFY_OFFSET + NOTIFY_MULTIPLIER as u64 * MAX_QUEUES as u64 <= MSIX_TABLE_OFFSET);
    assert!(MSIX_TABLE_OFFSET + 16 * (MAX_QUEUES as u64 + 1) <= MSIX_PBA_OFFSET);
    assert!(MSIX_PBA_OFFSET + (MAX_QUEUES as u64 + 1).div_ceil(64) * 8 <= BAR_SIZE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_areas() {
        assert_eq!(queue_area(0x20), Some((QueueArea::Desc, false)));
        assert_eq!(queue_area(0x24), Some((QueueArea::Desc, true)));
        assert_eq!(queue_area(0x2c), Some((QueueArea::Driver, true)));
        assert_eq!(queue_area(0x30), Some((QueueArea::Device, false)));
        assert_eq!(queue_area(0x22), None);
        assert_eq!(queue_area(0x38), None);
        assert_eq!(queue_area(0x1c), None);
    }

    #[test]
    fn capability_layout() {
        let routing =
            Arc::new(vmkit_pci_passthrough::EventFdMsiRouting::new(msix_vectors(2)).unwrap());
        let msix = MsixConfig::new(msix_vectors(2), routing).unwrap();
        let (config, msix_cap, pci_cfg) = config_space(2, &msix).unwrap();
        let caps = vmkit_pci_passthrough::config::capabilities(|at| config.u8_at(at));
        assert_eq!(caps.len(), 6);
        assert_eq!(caps[0], (MSIX_CAPABILITY_ID, msix_cap as u8));
        let types: Vec<u8> = caps[1..]
            .iter()
            .map(|&(_, at)| config.u8_at(usize::from(at) + 3))
            .collect();
        assert_eq!(types, vec![1, 2, 3, 4, 5]);
        assert_eq!(caps[5].1 as usize, pci_cfg);
        // Table size field: 3 vectors.
        assert_eq!(config.u16_at(msix_cap + 2) & 0x7ff, 2);
        // The notify capability is 20 bytes with the multiplier last.
        let notify = usize::from(caps[2].1);
        assert_eq!(config.u8_at(notify + 2), 20);
        assert_eq!(config.u32_at(notify + 16), NOTIFY_MULTIPLIER);
        assert_eq!(config.u32_at(notify + 12), 8);
    }

    #[test]
    fn queue_limits() {
        let routing = Arc::new(vmkit_pci_passthrough::EventFdMsiRouting::new(1).unwrap());
        assert!(PciInterrupt::new(0, routing.clone()).is_err());
        assert!(PciInterrupt::new(MAX_QUEUES + 1, routing.clone()).is_err());
        assert!(PciInterrupt::new(MAX_QUEUES, routing).is_ok());
    }
}
