//! virtio-pci (modern, virtio 1.2 section 4.1) found by enumerating PCI bus 0 (see
//! [`crate::pci`] for configuration access).
//!
//! The driver walks the function's capability list for the virtio structures (common
//! configuration, notifications, device configuration) and reaches them in BAR memory,
//! which the VMM places below 4 GiB, inside the identity map. It polls: no MSI-X vector is
//! assigned (`NO_VECTOR`), so the device raises no interrupt the guest would have to take.

use core::arch::asm;

pub use crate::pci::Function;
use crate::pci::COMMAND_MEMORY;

/// Red Hat's virtio vendor ID.
pub const VENDOR_VIRTIO: u16 = 0x1af4;
/// virtio-pci modern block device: 0x1040 + device type 2.
pub const DEVICE_BLOCK: u16 = 0x1042;

/// `MSI-X` "no vector": the device raises no interrupt for this queue or event.
const NO_VECTOR: u16 = 0xffff;
/// The vendor-specific capability ID virtio uses for its structures.
const CAP_VENDOR: u8 = 0x09;

/// virtio capability types (`cfg_type`).
mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const DEVICE: u8 = 4;
}

/// Offsets in `struct virtio_pci_common_cfg`.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// The virtio-blk functions on bus 0, in device-number order.
pub fn block_functions() -> impl Iterator<Item = Function> {
    crate::pci::find_functions(VENDOR_VIRTIO, DEVICE_BLOCK)
}

/// Why a function could not be used.
pub enum PciError {
    /// BAR `0` is not a memory BAR, or not placed.
    Bar(u8),
    /// A virtio structure is missing from the capability list.
    Missing(&'static str),
    /// A structure lies outside its BAR or past 4 GiB.
    Outside(&'static str),
}

impl core::fmt::Display for PciError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PciError::Bar(bar) => write!(f, "BAR {bar} is not a placed memory BAR"),
            PciError::Missing(what) => write!(f, "no {what} capability"),
            PciError::Outside(what) => write!(f, "the {what} structure is not reachable"),
        }
    }
}

/// A virtio-pci function's structures, as guest-physical (identity-mapped) addresses.
#[derive(Clone, Copy)]
pub struct VirtioPci {
    common: u64,
    notify: u64,
    notify_multiplier: u32,
    device_config: u64,
}

/// The guest-physical base of memory BAR `bar`, if it is one and is placed below 4 GiB.
fn bar_base(function: Function, bar: u8) -> Result<u64, PciError> {
    match function.memory_bar(bar) {
        Ok(memory) if memory.base >> 32 == 0 => Ok(memory.base),
        _ => Err(PciError::Bar(bar)),
    }
}

impl VirtioPci {
    /// Finds the virtio structures of `function` and turns on memory decoding.
    pub fn probe(function: Function) -> Result<VirtioPci, PciError> {
        if !function.has_capabilities() {
            return Err(PciError::Missing("capability list"));
        }
        function.enable(COMMAND_MEMORY);

        let (mut common, mut notify, mut device_config) = (None, None, None);
        let mut notify_multiplier = 0;
        for capability in function.capabilities() {
            // A virtio capability is 16 bytes (20 for notifications); one that would run
            // past the end of configuration space is not one.
            let pointer = capability.offset;
            if capability.id != CAP_VENDOR || pointer > 0xff - 20 {
                continue;
            }
            let kind = function.read8(pointer + 3);
            let bar = function.read8(pointer + 4);
            let offset = function.read32(pointer + 8);
            let length = function.read32(pointer + 12);
            let place = |what| -> Result<u64, PciError> {
                let base = bar_base(function, bar)?;
                let start = base + u64::from(offset);
                if start + u64::from(length) > 1 << 32 {
                    return Err(PciError::Outside(what));
                }
                Ok(start)
            };
            match kind {
                cfg_type::COMMON if common.is_none() => common = Some(place("common")?),
                cfg_type::NOTIFY if notify.is_none() => {
                    notify = Some(place("notify")?);
                    notify_multiplier = function.read32(pointer + 16);
                }
                cfg_type::DEVICE if device_config.is_none() => {
                    device_config = Some(place("device configuration")?)
                }
                _ => {}
            }
        }
        Ok(VirtioPci {
            common: common.ok_or(PciError::Missing("common configuration"))?,
            notify: notify.ok_or(PciError::Missing("notification"))?,
            notify_multiplier,
            device_config: device_config.ok_or(PciError::Missing("device configuration"))?,
        })
    }

    /// Device status.
    pub fn status(&self) -> u32 {
        u32::from(read8(self.common + common::DEVICE_STATUS))
    }

    /// Sets the device status (0 resets the device).
    pub fn set_status(&self, status: u32) {
        write8(self.common + common::DEVICE_STATUS, status as u8);
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        write32(self.common + common::DEVICE_FEATURE_SELECT, 0);
        let low = read32(self.common + common::DEVICE_FEATURE);
        write32(self.common + common::DEVICE_FEATURE_SELECT, 1);
        let high = read32(self.common + common::DEVICE_FEATURE);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Writes the 64 feature bits the driver accepts, and asks for no configuration
    /// interrupts.
    pub fn set_driver_features(&self, features: u64) {
        write32(self.common + common::DRIVER_FEATURE_SELECT, 0);
        write32(self.common + common::DRIVER_FEATURE, features as u32);
        write32(self.common + common::DRIVER_FEATURE_SELECT, 1);
        write32(
            self.common + common::DRIVER_FEATURE,
            (features >> 32) as u32,
        );
        write16(self.common + common::CONFIG_MSIX_VECTOR, NO_VECTOR);
    }

    /// 32 bits of the device configuration at `offset` (a multiple of 4).
    pub fn config32(&self, offset: u64) -> u32 {
        read32(self.device_config + offset)
    }

    /// A 64-bit configuration field, read until the configuration generation is stable.
    pub fn config64(&self, offset: u64) -> u64 {
        loop {
            let before = read8(self.common + common::CONFIG_GENERATION);
            let low = self.config32(offset);
            let high = self.config32(offset + 4);
            if read8(self.common + common::CONFIG_GENERATION) == before {
                return (u64::from(high) << 32) | u64::from(low);
            }
        }
    }

    /// The largest size of queue `queue` (0: no such queue).
    pub fn queue_max(&self, queue: u16) -> u32 {
        write16(self.common + common::QUEUE_SELECT, queue);
        u32::from(read16(self.common + common::QUEUE_SIZE))
    }

    /// Whether queue `queue` is enabled.
    pub fn queue_ready(&self, queue: u16) -> bool {
        write16(self.common + common::QUEUE_SELECT, queue);
        read16(self.common + common::QUEUE_ENABLE) != 0
    }

    /// Sets queue `queue` up with its rings and enables it; says whether it took.
    pub fn configure_queue(&self, queue: u16, size: u16, desc: u64, avail: u64, used: u64) -> bool {
        write16(self.common + common::QUEUE_SELECT, queue);
        write16(self.common + common::QUEUE_SIZE, size);
        write16(self.common + common::QUEUE_MSIX_VECTOR, NO_VECTOR);
        write64(self.common + common::QUEUE_DESC, desc);
        write64(self.common + common::QUEUE_DRIVER, avail);
        write64(self.common + common::QUEUE_DEVICE, used);
        write16(self.common + common::QUEUE_ENABLE, 1);
        read16(self.common + common::QUEUE_ENABLE) == 1
    }

    /// Where queue `queue`'s notifications go.
    pub fn notify_address(&self, queue: u16) -> u64 {
        write16(self.common + common::QUEUE_SELECT, queue);
        let offset = read16(self.common + common::QUEUE_NOTIFY_OFF);
        self.notify + u64::from(offset) * u64::from(self.notify_multiplier)
    }
}

// Single accesses of the register's width (what the device model expects). The asm does not
// claim `nomem`, so each is a compiler barrier, like the MMIO transport's accesses.

fn read8(address: u64) -> u8 {
    let value: u8;
    // SAFETY: `address` is inside a BAR structure this driver owns (see `probe`).
    unsafe {
        asm!("mov {v}, byte ptr [{a}]", a = in(reg) address, v = out(reg_byte) value,
             options(nostack, preserves_flags))
    };
    value
}

fn read16(address: u64) -> u16 {
    let value: u16;
    // SAFETY: as for `read8`.
    unsafe {
        asm!("mov {v:x}, word ptr [{a}]", a = in(reg) address, v = out(reg) value,
             options(nostack, preserves_flags))
    };
    value
}

fn read32(address: u64) -> u32 {
    let value: u32;
    // SAFETY: as for `read8`.
    unsafe {
        asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) address, v = out(reg) value,
             options(nostack, preserves_flags))
    };
    value
}

fn write8(address: u64, value: u8) {
    // SAFETY: as for `read8`; the driver owns the device and the memory it hands it.
    unsafe {
        asm!("mov byte ptr [{a}], {v}", a = in(reg) address, v = in(reg_byte) value,
             options(nostack, preserves_flags))
    };
}

fn write16(address: u64, value: u16) {
    // SAFETY: as for `write8`.
    unsafe {
        asm!("mov word ptr [{a}], {v:x}", a = in(reg) address, v = in(reg) value,
             options(nostack, preserves_flags))
    };
}

fn write32(address: u64, value: u32) {
    // SAFETY: as for `write8`.
    unsafe {
        asm!("mov dword ptr [{a}], {v:e}", a = in(reg) address, v = in(reg) value,
             options(nostack, preserves_flags))
    };
}

/// A 64-bit field as two 32-bit writes, low half first (the spec allows either width).
fn write64(address: u64, value: u64) {
    write32(address, value as u32);
    write32(address + 4, (value >> 32) as u32);
}

/// Writes a queue's notification (the queue index, 16 bits).
pub fn notify(address: u64, queue: u16) {
    write16(address, queue);
}
