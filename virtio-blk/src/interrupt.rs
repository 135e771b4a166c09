//! How the device tells the driver that buffers were used or the configuration changed.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// The interrupt status bit for "a used buffer was added" (virtio-mmio `InterruptStatus`,
/// the PCI ISR).
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// The interrupt status bit for "the configuration changed".
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// Where the device's interrupts go: an irqfd, an MSI-X vector, a test counter.
pub trait InterruptSink: Send + Sync {
    /// Signals that queue `queue` has new used buffers.
    fn signal_used(&self, queue: u16) -> std::io::Result<()>;
    /// Signals that the configuration (or the device status) changed.
    fn signal_config(&self) -> std::io::Result<()>;
}

/// One interrupt line backed by an eventfd, to be registered as a KVM irqfd; every queue and
/// the configuration change share it, as on virtio-mmio.
#[derive(Debug)]
pub struct EventFdInterrupt {
    irqfd: EventFd,
}

impl EventFdInterrupt {
    /// Signals through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        EventFdInterrupt { irqfd }
    }

    /// The eventfd to register with KVM as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.irqfd
    }
}

impl InterruptSink for EventFdInterrupt {
    fn signal_used(&self, _queue: u16) -> std::io::Result<()> {
        self.irqfd.write(1)
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.irqfd.write(1)
    }
}

/// Counts interrupts instead of raising them, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    used: AtomicU64,
    config: AtomicU64,
}

impl CountingInterrupt {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Used-buffer interrupts so far.
    pub fn used_count(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Configuration-change interrupts so far.
    pub fn config_count(&self) -> u64 {
        self.config.load(Ordering::Acquire)
    }
}

impl InterruptSink for CountingInterrupt {
    fn signal_used(&self, _queue: u16) -> std::io::Result<()> {
        self.used.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.config.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// Sets the transport's interrupt status bit before passing the interrupt on, so that a
/// driver reading `InterruptStatus` in its handler sees why it was interrupted.
#[derive(Clone)]
pub(crate) struct StatusInterrupt {
    pub(crate) status: Arc<AtomicU32>,
    pub(crate) sink: Arc<dyn InterruptSink>,
}

impl InterruptSink for StatusInterrupt {
    fn signal_used(&self, queue: u16) -> std::io::Result<()> {
        self.status
            .fetch_or(INTERRUPT_USED_BUFFER, Ordering::AcqRel);
        self.sink.signal_used(queue)
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.status
            .fetch_or(INTERRUPT_CONFIG_CHANGE, Ordering::AcqRel);
        self.sink.signal_config()
    }
}
