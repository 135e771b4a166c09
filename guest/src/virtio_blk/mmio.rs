//! virtio-mmio version 2 registers (virtio 1.2, section 4.2.2).
//!
//! Every access is one 32-bit `mov` in inline asm: a single access of the register's width
//! (what the device model requires), and, since the asm does not claim `nomem`, a compiler
//! barrier that keeps earlier memory writes (descriptors, buffers) before a notification.
//! x86 does not reorder stores with stores, and an MMIO access to an uncached or trapping
//! page is not reordered with memory accesses by the CPU. Each access exits to the VMM
//! (about 26 µs on the development host), except `QueueNotify`, which KVM completes through
//! an ioeventfd.

use core::arch::asm;

/// Register offsets.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// `MagicValue`: "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// The transport version the driver speaks.
pub const VERSION: u32 = 2;
/// The size of the register window the driver needs (registers and configuration space).
pub const MIN_WINDOW: u64 = 0x200;

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// One device's register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// The registers at `base`.
    ///
    /// # Safety
    /// `base` must be the identity-mapped register window of a virtio-mmio device that only
    /// this driver uses: register writes make the device read and write the guest memory the
    /// driver gives it.
    pub unsafe fn new(base: u64) -> Self {
        Mmio { base }
    }

    /// Reads the 32-bit register at `offset`.
    pub fn read(&self, offset: u64) -> u32 {
        let value: u32;
        // SAFETY: a 4-byte read inside the device's window (see `new`); reads have no effect
        // on memory.
        unsafe {
            asm!(
                "mov {value:e}, dword ptr [{address}]",
                address = in(reg) self.base + offset,
                value = out(reg) value,
                options(nostack, preserves_flags)
            )
        };
        value
    }

    /// Writes the 32-bit register at `offset`.
    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: a 4-byte write inside the device's window; `new`'s caller owns the device
        // and the memory it is given.
        unsafe {
            asm!(
                "mov dword ptr [{address}], {value:e}",
                address = in(reg) self.base + offset,
                value = in(reg) value,
                options(nostack, preserves_flags)
            )
        };
    }

    /// Reads 32 bits of the configuration space at `offset` (a multiple of 4).
    pub fn config32(&self, offset: u64) -> u32 {
        self.read(reg::CONFIG + offset)
    }

    /// Reads a 64-bit configuration field as two halves, retrying until the configuration
    /// generation shows no change in between (virtio 1.2, section 4.2.2.2).
    pub fn config64(&self, offset: u64) -> u64 {
        loop {
            let before = self.read(reg::CONFIG_GENERATION);
            let low = self.config32(offset);
            let high = self.config32(offset + 4);
            if self.read(reg::CONFIG_GENERATION) == before {
                return (u64::from(high) << 32) | u64::from(low);
            }
        }
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Writes the 64 feature bits the driver accepts.
    pub fn set_driver_features(&self, features: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Writes a 64-bit address as the low and high registers at `low` and `low + 4` (the
    /// `...High` registers follow their `...Low` ones).
    pub fn write_address(&self, low: u64, address: u64) {
        self.write(low, address as u32);
        self.write(low + 4, (address >> 32) as u32);
    }
}
