//! The two ways the driver reaches a device: virtio-mmio registers, or the virtio-pci
//! structures in a PCI BAR. Everything above this module is the same for both.

use vmkit_guest_abi::DeviceInfo;

use super::mmio::{self, reg, Mmio};
use super::pci::{Function, PciError, VirtioPci};
use super::MAX_QUEUES;

/// A device's transport.
#[derive(Clone, Copy)]
pub enum VirtioTransport {
    /// virtio-mmio version 2.
    Mmio(Mmio),
    /// virtio-pci (modern), with each queue's notification address found at setup.
    Pci(VirtioPci, [u64; MAX_QUEUES]),
}

impl VirtioTransport {
    /// The virtio-mmio device `device` describes, checked to be a version 2 block device.
    pub fn mmio(device: &DeviceInfo) -> Result<VirtioTransport, &'static str> {
        if device.size < mmio::MIN_WINDOW {
            return Err("register window too small");
        }
        // SAFETY: the VMM describes a virtio-mmio device at this identity-mapped address,
        // and this driver is the only user of it.
        let registers = unsafe { Mmio::new(device.address) };
        let magic = registers.read(reg::MAGIC_VALUE);
        let version = registers.read(reg::VERSION);
        let device_id = registers.read(reg::DEVICE_ID);
        if magic != mmio::MAGIC || version != mmio::VERSION || device_id != 2 {
            return Err("not a virtio-mmio version 2 block device");
        }
        Ok(VirtioTransport::Mmio(registers))
    }

    /// The virtio-pci block function `function`.
    pub fn pci(function: Function) -> Result<VirtioTransport, PciError> {
        Ok(VirtioTransport::Pci(
            VirtioPci::probe(function)?,
            [0; MAX_QUEUES],
        ))
    }

    /// The transport's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            VirtioTransport::Mmio(_) => "virtio-mmio",
            VirtioTransport::Pci(..) => "virtio-pci",
        }
    }

    /// Device status.
    pub fn status(&self) -> u32 {
        match self {
            VirtioTransport::Mmio(m) => m.read(reg::STATUS),
            VirtioTransport::Pci(p, _) => p.status(),
        }
    }

    /// Sets the device status (0 resets the device).
    pub fn set_status(&self, status: u32) {
        match self {
            VirtioTransport::Mmio(m) => m.write(reg::STATUS, status),
            VirtioTransport::Pci(p, _) => p.set_status(status),
        }
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        match self {
            VirtioTransport::Mmio(m) => m.device_features(),
            VirtioTransport::Pci(p, _) => p.device_features(),
        }
    }

    /// Writes the feature bits the driver accepts.
    pub fn set_driver_features(&self, features: u64) {
        match self {
            VirtioTransport::Mmio(m) => m.set_driver_features(features),
            VirtioTransport::Pci(p, _) => p.set_driver_features(features),
        }
    }

    /// 32 bits of the device configuration at `offset` (a multiple of 4).
    pub fn config32(&self, offset: u64) -> u32 {
        match self {
            VirtioTransport::Mmio(m) => m.config32(offset),
            VirtioTransport::Pci(p, _) => p.config32(offset),
        }
    }

    /// A 64-bit configuration field, read consistently.
    pub fn config64(&self, offset: u64) -> u64 {
        match self {
            VirtioTransport::Mmio(m) => m.config64(offset),
            VirtioTransport::Pci(p, _) => p.config64(offset),
        }
    }

    /// Whether queue `queue` is enabled already, and its largest size (0: no such queue).
    pub fn queue_state(&self, queue: u16) -> (bool, u32) {
        match self {
            VirtioTransport::Mmio(m) => {
                m.write(reg::QUEUE_SEL, u32::from(queue));
                (m.read(reg::QUEUE_READY) != 0, m.read(reg::QUEUE_NUM_MAX))
            }
            VirtioTransport::Pci(p, _) => (p.queue_ready(queue), p.queue_max(queue)),
        }
    }

    /// Sets queue `queue` up with its rings and enables it; says whether the device took it.
    pub fn configure_queue(&mut self, queue: u16, size: u16, rings: [u64; 3]) -> bool {
        let [desc, avail, used] = rings;
        match self {
            VirtioTransport::Mmio(m) => {
                m.write(reg::QUEUE_SEL, u32::from(queue));
                m.write(reg::QUEUE_NUM, u32::from(size));
                m.write_address(reg::QUEUE_DESC_LOW, desc);
                m.write_address(reg::QUEUE_DRIVER_LOW, avail);
                m.write_address(reg::QUEUE_DEVICE_LOW, used);
                m.write(reg::QUEUE_READY, 1);
                m.read(reg::QUEUE_READY) == 1
            }
            VirtioTransport::Pci(p, notify) => {
                let Some(address) = notify.get_mut(usize::from(queue)) else {
                    return false;
                };
                *address = p.notify_address(queue);
                p.configure_queue(queue, size, desc, avail, used)
            }
        }
    }

    /// Notifies queue `queue` (KVM completes it through an ioeventfd on both transports).
    pub fn notify(&self, queue: u16) {
        match self {
            VirtioTransport::Mmio(m) => m.write(reg::QUEUE_NOTIFY, u32::from(queue)),
            VirtioTransport::Pci(_, notify) => {
                if let Some(&address) = notify.get(usize::from(queue)) {
                    super::pci::notify(address, queue);
                }
            }
        }
    }
}
