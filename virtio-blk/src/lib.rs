//! vmkit-virtio-blk: a virtio-blk device model (virtio 1.2, section 5.2) on `virtio-queue`,
//! independent of transport and of disk backend, with virtio-mmio and virtio-pci transports.
//!
//! - [`BlockQueue`] is the hot path of one virtqueue: it pops descriptor chains, checks them
//!   as hostile input ([`request`]), pushes them to a [`vmkit_block_backend::AsyncDisk`] in
//!   batches, completes them out of order and raises one interrupt per batch (suppressed
//!   with `EVENT_IDX`). It runs without threads, for tests and benchmarks.
//! - [`BlockDevice`] is the transport-independent device: features, status state machine,
//!   queue configuration, configuration space, interrupt status; on `DRIVER_OK` it starts
//!   one I/O thread per queue, each an `event-manager` loop over the queue's notification
//!   eventfd and the disk's completion eventfd; on reset it stops them and waits for the
//!   disk's requests in flight.
//! - [`transport::mmio::MmioTransport`] exposes the device as virtio-mmio version 2
//!   registers; [`transport::pci::VirtioPciTransport`] as a modern virtio-pci function
//!   (a `vmkit_pci_passthrough::PciDevice`) with MSI-X.
//!
//! The guest controls every descriptor, address, length and register value: none of them
//! can panic the VMM, reach outside guest RAM or make it allocate without bound. A bad
//! request gets an error status; a broken queue sets `NEEDS_RESET`.
#![deny(missing_docs)]

pub mod config;
pub mod device;
pub mod features;
pub mod interrupt;
pub mod queue;
pub mod request;
pub mod spawner;
pub mod transport;
mod worker;

pub use config::BlockConfig;
pub use device::{BlockDevice, BlockOptions, QueueConfig};
pub use interrupt::{CountingInterrupt, EventFdInterrupt, InterruptSink};
pub use queue::BlockQueue;
pub use spawner::{StdSpawner, ThreadSpawner};
pub use transport::mmio::MmioTransport;
pub use transport::pci::VirtioPciTransport;

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device needs at least one queue (one disk per queue).
    #[error("a block device needs at least one queue")]
    NoQueues,
    /// More queues than virtio can number.
    #[error("too many queues: {0}")]
    TooManyQueues(usize),
    /// The queue size limit is not a power of two between 1 and 32768.
    #[error("invalid maximum queue size {0}")]
    InvalidQueueSize(u16),
    /// The virtqueue is unusable (bad addresses, bad available index...).
    #[error("virtqueue error: {0}")]
    Queue(virtio_queue::Error),
    /// The driver offered a descriptor head outside the queue.
    #[error("descriptor head {0} is outside the queue")]
    InvalidHead(u16),
    /// The driver offered a descriptor head that is still in use by a request.
    #[error("descriptor head {0} was made available again while in flight")]
    HeadInFlight(u16),
    /// A chain with no status byte the device could write: the request can be neither
    /// answered nor failed, so the queue stops (`NEEDS_RESET`), as QEMU's device breaks,
    /// rather than hand the chain back and let the driver read a stale status as success.
    #[error("descriptor chain {0} has no writable status byte")]
    NoStatusByte(u16),
    /// The available ring keeps saying it holds buffers, but none can be read (its entries
    /// lie outside guest RAM).
    #[error("the available ring announces buffers that cannot be read")]
    StalledRing,
    /// Guest memory could not be written (a status byte, the used ring).
    #[error("guest memory access failed: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
    /// The disk failed as a whole (not one request).
    #[error("disk error: {0}")]
    Disk(vmkit_block_backend::Error),
    /// An interrupt could not be raised.
    #[error("cannot raise an interrupt: {0}")]
    Interrupt(std::io::Error),
    /// An eventfd or event loop could not be created.
    #[error("cannot set up an I/O thread: {0}")]
    Io(std::io::Error),
    /// The event manager failed.
    #[error("event manager: {0}")]
    EventManager(event_manager::Error),
}
