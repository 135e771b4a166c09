//! The transport-independent device: features, status, queue configuration, configuration
//! space and interrupt status, and the activation of the I/O threads on `DRIVER_OK`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};
use vmkit_block_backend::{AsyncDisk, DiskInfo, SyncDisk};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{written_writeback, BlockConfig};
use crate::features::{bit, offered_features};
use crate::interrupt::{InterruptSink, StatusInterrupt};
use crate::queue::BlockQueue;
use crate::spawner::{StdSpawner, ThreadSpawner};
use crate::worker::{self, NeedsReset, WorkerHandle};
use crate::Error;

/// Device status bits, as the status register holds them.
pub mod status {
    use super::*;
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    /// The driver is ready: the device runs.
    pub const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
}

/// Largest queue size virtio allows.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Settings of a block device.
#[derive(Clone)]
pub struct BlockOptions {
    /// The GET_ID answer; at most 20 bytes are used.
    pub serial: Vec<u8>,
    /// The largest queue size the driver may choose (a power of two, at most 32768).
    pub queue_size: u16,
    /// Starts the queues' I/O threads (see [`crate::spawner`]).
    pub spawner: Arc<dyn ThreadSpawner>,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions {
            serial: Vec::new(),
            queue_size: 256,
            spawner: Arc::new(StdSpawner),
        }
    }
}

impl std::fmt::Debug for BlockOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockOptions")
            .field("serial", &self.serial)
            .field("queue_size", &self.queue_size)
            .finish_non_exhaustive()
    }
}

/// One queue's configuration, as the driver sets it up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue size the driver chose (0 until it writes one, then as written).
    pub size: u32,
    /// The driver enabled the queue.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring ("driver area") address.
    pub driver: u64,
    /// Used ring ("device area") address.
    pub device: u64,
}

/// Which queue address a register writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueArea {
    /// The descriptor table.
    Desc,
    /// The available ring.
    Driver,
    /// The used ring.
    Device,
}

/// A virtio-blk device, independent of its transport.
///
/// The transport calls the register-level methods; guest values are checked here, so any
/// sequence of calls is safe. On `DRIVER_OK` each ready queue gets an I/O thread; writing 0
/// to the status (or dropping the device) stops them and waits for the disk's requests.
pub struct BlockDevice<M: GuestMemory + Send + Sync + 'static> {
    mem: Arc<M>,
    /// One disk per queue; `None` while the queue's worker holds it.
    disks: Vec<Option<Box<dyn AsyncDisk>>>,
    sync_disks: Vec<Arc<dyn SyncDisk>>,
    initial_write_cache: bool,
    config: BlockConfig,
    serial: Vec<u8>,
    queue_max_size: u16,
    avail_features: u64,
    acked_features: u64,
    status: u32,
    queues: Vec<QueueConfig>,
    notify: Vec<EventFd>,
    interrupt_status: Arc<AtomicU32>,
    interrupt: StatusInterrupt,
    needs_reset: Arc<NeedsReset>,
    config_generation: u32,
    spawner: Arc<dyn ThreadSpawner>,
    workers: Vec<(usize, WorkerHandle)>,
}

impl<M: GuestMemory + Send + Sync + 'static> BlockDevice<M> {
    /// A device over `disks` (one per queue: open the same image once per queue, or build
    /// several engines over one `RawDisk`), in guest memory `mem`, raising interrupts through
    /// `interrupt`.
    pub fn new(
        disks: Vec<Box<dyn AsyncDisk>>,
        mem: Arc<M>,
        interrupt: Arc<dyn InterruptSink>,
        options: BlockOptions,
    ) -> Result<Self, Error> {
        let first = disks.first().ok_or(Error::NoQueues)?;
        let num_queues =
            u16::try_from(disks.len()).map_err(|_| Error::TooManyQueues(disks.len()))?;
        let queue_size = options.queue_size;
        if queue_size == 0 || queue_size > MAX_QUEUE_SIZE || !queue_size.is_power_of_two() {
            return Err(Error::InvalidQueueSize(queue_size));
        }
        let info: DiskInfo = first.info();
        let sync_disks: Vec<Arc<dyn SyncDisk>> =
            disks.iter().map(|d| d.sync_disk().clone()).collect();
        let initial_write_cache = first.sync_disk().write_cache();
        let notify = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io))
            .collect::<Result<Vec<_>, _>>()?;
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let interrupt = StatusInterrupt {
            status: interrupt_status.clone(),
            sink: interrupt,
        };
        let needs_reset = Arc::new(NeedsReset {
            flag: AtomicBool::new(false),
            interrupt: Arc::new(interrupt.clone()),
        });
        Ok(BlockDevice {
            mem,
            disks: disks.into_iter().map(Some).collect(),
            sync_disks,
            initial_write_cache,
            config: BlockConfig::new(&info, num_queues),
            serial: options.serial,
            queue_max_size: queue_size,
            avail_features: offered_features(&info, num_queues),
            acked_features: 0,
            status: 0,
            queues: vec![QueueConfig::default(); usize::from(num_queues)],
            notify,
            interrupt_status,
            interrupt,
            needs_reset,
            config_generation: 0,
            spawner: options.spawner,
            workers: Vec::new(),
        })
    }

    /// The 32 feature bits of page `page` (0: bits 0-31, 1: bits 32-63, others: 0).
    pub fn device_features(&self, page: u32) -> u32 {
        feature_page(self.avail_features, page)
    }

    /// All features the device offers.
    pub fn offered_features(&self) -> u64 {
        self.avail_features
    }

    /// The features the driver accepted so far.
    pub fn driver_features(&self) -> u64 {
        self.acked_features
    }

    /// The driver writes feature page `page`. Only allowed between `DRIVER` and
    /// `FEATURES_OK`; unoffered bits are kept, and make `FEATURES_OK` fail.
    pub fn set_driver_features(&mut self, page: u32, value: u32) {
        if self.status & (status::DRIVER | status::FEATURES_OK | status::FAILED) != status::DRIVER {
            return;
        }
        let shift = match page {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.acked_features =
            (self.acked_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
    }

    /// The device status, `NEEDS_RESET` included.
    pub fn status(&self) -> u32 {
        let mut status = self.status;
        if self.needs_reset.flag.load(Ordering::Acquire) {
            status |= status::NEEDS_RESET;
        }
        status
    }

    /// Whether the I/O threads run.
    pub fn is_activated(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    /// The driver writes the status. 0 resets the device; otherwise bits may only be added,
    /// in the order of the spec's initialisation sequence, and anything else is ignored.
    /// `FEATURES_OK` stays clear if the driver accepted features the device does not offer
    /// (or not `VERSION_1`); `DRIVER_OK` starts the device.
    pub fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET is the device's to set.
        let value = value & !status::NEEDS_RESET;
        let current = self.status;
        if value & current != current {
            // Clearing bits other than by a reset is not a valid transition.
            return;
        }
        let added = value & !current;
        if added & status::FAILED != 0 {
            self.status |= status::FAILED;
        }
        let sequence = [
            (status::ACKNOWLEDGE, 0),
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, requires) in sequence {
            if added & bit == 0 {
                continue;
            }
            if self.status & requires != requires || self.status & status::FAILED != 0 {
                return;
            }
            match bit {
                status::FEATURES_OK => {
                    if !self.features_acceptable() {
                        return;
                    }
                    self.apply_features();
                }
                status::DRIVER_OK => {
                    self.status |= bit;
                    self.activate();
                    continue;
                }
                _ => {}
            }
            self.status |= bit;
        }
    }

    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.avail_features == 0
            && self.acked_features & bit(VIRTIO_F_VERSION_1) != 0
    }

    fn apply_features(&mut self) {
        // Without FLUSH the driver cannot make writes durable, so the device must not cache.
        if self.acked_features & bit(VIRTIO_BLK_F_FLUSH) == 0 {
            self.set_write_cache(false);
        }
    }

    /// Whether queue configuration may be written now: after feature negotiation, before
    /// the device runs.
    fn queue_writable(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        // `new` checked that the count fits.
        self.queues.len() as u16
    }

    /// The largest queue size the driver may choose.
    pub fn queue_max_size(&self) -> u16 {
        self.queue_max_size
    }

    /// Queue `index`'s configuration, if it exists.
    pub fn queue_config(&self, index: u32) -> Option<&QueueConfig> {
        self.queues.get(usize::try_from(index).ok()?)
    }

    fn queue_config_mut(&mut self, index: u32) -> Option<&mut QueueConfig> {
        if !self.queue_writable() {
            return None;
        }
        self.queues.get_mut(usize::try_from(index).ok()?)
    }

    /// The driver sets queue `index`'s size. Checked when the queue is made ready.
    pub fn set_queue_size(&mut self, index: u32, size: u32) {
        if let Some(queue) = self.queue_config_mut(index) {
            if !queue.ready {
                queue.size = size;
            }
        }
    }

    /// The driver enables or disables queue `index`. Enabling is refused (the queue stays
    /// not ready) unless the size is a power of two no larger than the maximum.
    pub fn set_queue_ready(&mut self, index: u32, ready: bool) {
        let max = u32::from(self.queue_max_size);
        if let Some(queue) = self.queue_config_mut(index) {
            queue.ready =
                ready && queue.size != 0 && queue.size <= max && queue.size.is_power_of_two();
        }
    }

    /// The driver writes the low (`high == false`) or high half of a queue address.
    pub fn set_queue_address(&mut self, index: u32, area: QueueArea, high: bool, value: u32) {
        if let Some(queue) = self.queue_config_mut(index) {
            if queue.ready {
                return;
            }
            let field = match area {
                QueueArea::Desc => &mut queue.desc,
                QueueArea::Driver => &mut queue.driver,
                QueueArea::Device => &mut queue.device,
            };
            *field = if high {
                (*field & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (*field & !0xffff_ffff) | u64::from(value)
            };
        }
    }

    /// Queue `index`'s notification eventfd. The VMM registers it as an ioeventfd on the
    /// transport's notify address; the I/O thread watches it.
    pub fn notify_eventfd(&self, index: u32) -> Option<&EventFd> {
        self.notify.get(usize::try_from(index).ok()?)
    }

    /// The driver notified queue `index` through the register (no ioeventfd).
    pub fn notify_queue(&self, index: u32) {
        if let Some(eventfd) = self.notify_eventfd(index) {
            let _ = eventfd.write(1);
        }
    }

    /// The interrupt status bits (used buffer: 1, configuration change: 2).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::Acquire)
    }

    /// The driver acknowledges interrupt status bits.
    pub fn ack_interrupt(&self, bits: u32) {
        self.interrupt_status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The configuration generation: changes whenever the configuration space does.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Reads the configuration space; bytes past its end read as 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(self.write_cache(), offset, data);
    }

    /// Writes the configuration space: only `writeback` is writable, and switches the disk's
    /// write cache; every other byte is ignored.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(enabled) = written_writeback(offset, data) {
            self.set_write_cache(enabled);
            self.config_generation = self.config_generation.wrapping_add(1);
        }
    }

    fn write_cache(&self) -> bool {
        self.sync_disks.first().is_some_and(|d| d.write_cache())
    }

    fn set_write_cache(&self, enabled: bool) {
        for disk in &self.sync_disks {
            if let Err(e) = disk.set_write_cache(enabled) {
                log::error!("virtio-blk: cannot switch the write cache: {e}");
            }
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        for index in 0..self.queues.len() {
            let Some(config) = self.queues.get(index).copied() else {
                continue;
            };
            if !config.ready {
                continue;
            }
            let queue = match self.build_queue(&config, event_idx) {
                Ok(queue) => queue,
                Err(e) => {
                    log::error!("virtio-blk: queue {index} is unusable: {e}");
                    self.needs_reset.raise();
                    continue;
                }
            };
            let (Some(disk), Some(notify)) = (
                self.disks.get_mut(index).and_then(Option::take),
                self.notify.get(index).and_then(|fd| fd.try_clone().ok()),
            ) else {
                self.needs_reset.raise();
                continue;
            };
            let block_queue = BlockQueue::new(
                index as u16,
                queue,
                self.mem.clone(),
                disk,
                Arc::new(self.interrupt.clone()),
                &self.serial,
            );
            match worker::spawn(
                self.spawner.as_ref(),
                block_queue,
                notify,
                self.needs_reset.clone(),
            ) {
                Ok(handle) => self.workers.push((index, handle)),
                Err((e, disk)) => {
                    log::error!("virtio-blk: cannot start queue {index}: {e}");
                    if let Some(slot) = self.disks.get_mut(index) {
                        *slot = disk;
                    }
                    self.needs_reset.raise();
                }
            }
        }
    }

    fn build_queue(&self, config: &QueueConfig, event_idx: bool) -> Result<Queue, Error> {
        let mut queue = Queue::new(self.queue_max_size).map_err(Error::Queue)?;
        let size = u16::try_from(config.size)
            .map_err(|_| Error::Queue(virtio_queue::Error::InvalidSize))?;
        queue.try_set_size(size).map_err(Error::Queue)?;
        queue
            .try_set_desc_table_address(GuestAddress(config.desc))
            .map_err(Error::Queue)?;
        queue
            .try_set_avail_ring_address(GuestAddress(config.driver))
            .map_err(Error::Queue)?;
        queue
            .try_set_used_ring_address(GuestAddress(config.device))
            .map_err(Error::Queue)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(self.mem.as_ref()) {
            return Err(Error::Queue(virtio_queue::Error::QueueNotReady));
        }
        Ok(queue)
    }

    /// Resets the device: stops the I/O threads, waiting for the disk's requests in flight,
    /// and returns every register to its initial value.
    pub fn reset(&mut self) {
        for (index, handle) in self.workers.drain(..) {
            let disk = handle.stop();
            if disk.is_none() {
                log::error!("virtio-blk: queue {index}'s disk was lost; the device cannot restart");
            }
            if let Some(slot) = self.disks.get_mut(index) {
                *slot = disk;
            }
        }
        // Notifications sent before the reset must not wake the next activation.
        for eventfd in &self.notify {
            let _ = eventfd.read();
        }
        self.status = 0;
        self.acked_features = 0;
        self.queues.fill(QueueConfig::default());
        self.interrupt_status.store(0, Ordering::Release);
        self.needs_reset.flag.store(false, Ordering::Release);
        self.set_write_cache(self.initial_write_cache);
    }
}

impl<M: GuestMemory + Send + Sync + 'static> Drop for BlockDevice<M> {
    fn drop(&mut self) {
        // Stops the I/O threads so that nothing runs on freed guest memory.
        self.reset();
    }
}

fn feature_page(features: u64, page: u32) -> u32 {
    match page {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}
