//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! [`MmioTransport::read`] and [`MmioTransport::write`] take `&self` so that a VMM's MMIO
//! bus can call them from any vCPU thread. Registers are 32 bits wide: other widths and
//! unknown offsets are ignored (reads return 0). The configuration space at 0x100 takes any
//! width.
//!
//! Wiring: register [`MmioTransport::ioeventfds`] as KVM ioeventfds at
//! `base + QUEUE_NOTIFY` (4 bytes, datamatch = queue index), and the
//! [`EventFdInterrupt`](crate::EventFdInterrupt) given to the device as a KVM irqfd on the
//! device's interrupt line.

use std::sync::{Mutex, MutexGuard};

use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{BlockDevice, QueueArea};
use crate::VIRTIO_ID_BLOCK;

/// `MagicValue`: "virt".
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version this implements.
pub const VERSION: u32 = 2;
/// The vendor ID reported ("QEMU"'s value is 0x554d4551; this reports "vmkt").
pub const VENDOR_ID: u32 = 0x746b_6d76;

/// Register offsets.
pub mod reg {
    /// `MagicValue` (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// `Version` (R).
    pub const VERSION: u64 = 0x004;
    /// `DeviceID` (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID` (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures` (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel` (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures` (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel` (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel` (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax` (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum` (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady` (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify` (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `InterruptStatus` (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptACK` (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status` (RW).
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow` (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh` (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow` (W).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QueueDriverHigh` (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QueueDeviceLow` (W).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh` (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `ConfigGeneration` (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Bytes of MMIO space the device occupies.
pub const MMIO_SIZE: u64 = 0x1000;

struct State<M: GuestMemory + Send + Sync + 'static> {
    device: BlockDevice<M>,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
}

/// A virtio-mmio (version 2) device around a [`BlockDevice`].
pub struct MmioTransport<M: GuestMemory + Send + Sync + 'static> {
    state: Mutex<State<M>>,
}

impl<M: GuestMemory + Send + Sync + 'static> MmioTransport<M> {
    /// Puts `device` behind virtio-mmio registers.
    pub fn new(device: BlockDevice<M>) -> Self {
        MmioTransport {
            state: Mutex::new(State {
                device,
                device_features_sel: 0,
                driver_features_sel: 0,
                queue_sel: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<M>> {
        // A panic elsewhere must not take the device down with it: the state stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the device (for status queries and tests).
    pub fn with_device<T>(&self, f: impl FnOnce(&mut BlockDevice<M>) -> T) -> T {
        f(&mut self.lock().device)
    }

    /// Copies of the queues' notification eventfds with their queue index: register each as
    /// a KVM ioeventfd at `base + reg::QUEUE_NOTIFY`, 4 bytes, datamatch = the index.
    pub fn ioeventfds(&self) -> std::io::Result<Vec<(u32, EventFd)>> {
        let state = self.lock();
        (0..u32::from(state.device.num_queues()))
            .filter_map(|index| state.device.notify_eventfd(index).map(|fd| (index, fd)))
            .map(|(index, fd)| Ok((index, fd.try_clone()?)))
            .collect()
    }

    /// A driver read of `data.len()` bytes at `offset` from the device's base.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let state = self.lock();
        if offset >= reg::CONFIG {
            state.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let value = if data.len() == 4 {
            state.read_register(offset)
        } else {
            0
        };
        let bytes = value.to_le_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A driver write of `data` at `offset` from the device's base.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let mut state = self.lock();
        if offset >= reg::CONFIG {
            state.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        state.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl<M: GuestMemory + Send + Sync + 'static> State<M> {
    fn read_register(&self, offset: u64) -> u32 {
        let device = &self.device;
        let queue = device.queue_config(self.queue_sel);
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => VIRTIO_ID_BLOCK,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => device.device_features(self.device_features_sel),
            reg::QUEUE_NUM_MAX => {
                // A queue that does not exist reports 0, which tells the driver so.
                queue.map_or(0, |_| u32::from(device.queue_max_size()))
            }
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => device.interrupt_status(),
            reg::STATUS => device.status(),
            reg::CONFIG_GENERATION => device.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let queue = self.queue_sel;
        let device = &mut self.device;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => device.set_driver_features(self.driver_features_sel, value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Out-of-range selections are kept: every queue access then does nothing.
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => device.set_queue_size(queue, value),
            reg::QUEUE_READY => device.set_queue_ready(queue, value == 1),
            reg::QUEUE_NOTIFY => device.notify_queue(value),
            reg::INTERRUPT_ACK => device.ack_interrupt(value),
            reg::STATUS => device.set_status(value),
            reg::QUEUE_DESC_LOW => device.set_queue_address(queue, QueueArea::Desc, false, value),
            reg::QUEUE_DESC_HIGH => device.set_queue_address(queue, QueueArea::Desc, true, value),
            reg::QUEUE_DRIVER_LOW => {
                device.set_queue_address(queue, QueueArea::Driver, false, value)
            }
            reg::QUEUE_DRIVER_HIGH => {
                device.set_queue_address(queue, QueueArea::Driver, true, value)
            }
            reg::QUEUE_DEVICE_LOW => {
                device.set_queue_address(queue, QueueArea::Device, false, value)
            }
            reg::QUEUE_DEVICE_HIGH => {
                device.set_queue_address(queue, QueueArea::Device, true, value)
            }
            _ => {}
        }
    }
}
