//! MSI (PCI Local Bus 3.0, section 6.8.1): the capability's registers and where its messages
//! go.
//!
//! [`MsiConfig`] holds the registers of one MSI capability (message control, address, data,
//! and the mask and pending bits when the function has per-vector masking). Like
//! [`MsixConfig`](crate::MsixConfig) it tells an [`MsiRouting`] sink which message each
//! vector delivers (`Some` while deliverable), and [`MsiConfig::trigger`] raises a vector or
//! holds it pending while it is masked.
//!
//! With multiple messages enabled (`2^n` vectors), vector `v` writes the message data with
//! its low `n` bits replaced by `v`: that is how one address and data serve 32 vectors.

use std::sync::Arc;

use crate::msix::{Delivery, MsiMessage, MsiRouting};
use crate::Error;

/// Capability ID of MSI.
pub const MSI_CAPABILITY_ID: u8 = 0x05;
/// Offset of message control in the capability (from its ID byte).
pub const MSI_CONTROL_OFFSET: usize = 2;
/// Message control: MSI enable.
pub const MSI_ENABLE: u16 = 1 << 0;
/// Message control: the multiple message capable field (log2 of the vectors), bits 3:1.
const MULTIPLE_MESSAGE_CAPABLE_SHIFT: u16 = 1;
/// Message control: the multiple message enable field (log2 of the vectors), bits 6:4.
const MULTIPLE_MESSAGE_ENABLE_SHIFT: u16 = 4;
/// Message control: the function can send 64-bit message addresses.
pub const MSI_64BIT: u16 = 1 << 7;
/// Message control: the function has per-vector mask and pending bits.
pub const MSI_PER_VECTOR_MASK: u16 = 1 << 8;
/// The most vectors MSI has.
pub const MAX_MSI_VECTORS: u16 = 32;

/// The shape of an MSI capability: what its read-only control bits say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCapability {
    /// log2 of the vectors the function can use (0-5).
    pub vectors_log2: u8,
    /// 64-bit message address.
    pub address64: bool,
    /// Per-vector mask and pending bits.
    pub per_vector_mask: bool,
}

impl MsiCapability {
    /// The shape a message control value describes. The multiple message capable field's
    /// reserved values (6, 7) count as 32 vectors.
    pub fn from_control(control: u16) -> Self {
        let log2 = (control >> MULTIPLE_MESSAGE_CAPABLE_SHIFT) & 0x7;
        MsiCapability {
            vectors_log2: log2.min(5) as u8,
            address64: control & MSI_64BIT != 0,
            per_vector_mask: control & MSI_PER_VECTOR_MASK != 0,
        }
    }

    /// The read-only bits of message control.
    pub fn control(&self) -> u16 {
        (u16::from(self.vectors_log2.min(5)) << MULTIPLE_MESSAGE_CAPABLE_SHIFT)
            | if self.address64 { MSI_64BIT } else { 0 }
            | if self.per_vector_mask {
                MSI_PER_VECTOR_MASK
            } else {
                0
            }
    }

    /// Vectors the function can use.
    pub fn max_vectors(&self) -> u16 {
        1 << self.vectors_log2.min(5)
    }

    /// Bytes of the capability, ID byte included: 10, 14, 20 or 24.
    pub fn len(&self) -> usize {
        match (self.address64, self.per_vector_mask) {
            (false, false) => 0x0a,
            (true, false) => 0x0e,
            (false, true) => 0x14,
            (true, true) => 0x18,
        }
    }

    /// Never empty (the header alone is two bytes); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn data_offset(&self) -> usize {
        if self.address64 {
            0x0c
        } else {
            0x08
        }
    }

    fn mask_offset(&self) -> Option<usize> {
        self.per_vector_mask.then_some(self.data_offset() + 4)
    }
}

/// The registers of one MSI capability and the routes of its vectors.
pub struct MsiConfig {
    capability: MsiCapability,
    /// The capability's bytes as the guest sees them (ID and next pointer left 0: they
    /// belong to whoever places the capability in a configuration space).
    registers: [u8; 0x18],
    /// Guest write mask of `registers`.
    writable: [u8; 0x18],
    pending: u32,
    /// What the routing sink was last told, per vector.
    routed: Vec<Option<MsiMessage>>,
    routing: Arc<dyn MsiRouting>,
}

impl std::fmt::Debug for MsiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiConfig")
            .field("capability", &self.capability)
            .field("enabled", &self.is_enabled())
            .field("vectors", &self.enabled_vectors())
            .field("pending", &self.pending)
            .finish()
    }
}

impl MsiConfig {
    /// A disabled capability of shape `capability` whose vectors route through `routing`
    /// (a sink for at least [`MsiCapability::max_vectors`] vectors).
    pub fn new(capability: MsiCapability, routing: Arc<dyn MsiRouting>) -> Self {
        let mut config = MsiConfig {
            capability,
            registers: [0; 0x18],
            writable: [0; 0x18],
            pending: 0,
            routed: vec![None; usize::from(capability.max_vectors())],
            routing,
        };
        config.set_u16(MSI_CONTROL_OFFSET, capability.control());
        // Enable and multiple message enable; the address is dword aligned; the data is
        // 16 bits (extended message data is not offered).
        config.writable[MSI_CONTROL_OFFSET] = 0x71;
        config.writable[4..8].copy_from_slice(&[0xfc, 0xff, 0xff, 0xff]);
        if capability.address64 {
            config.writable[8..12].fill(0xff);
        }
        let data = capability.data_offset();
        config.writable[data..data + 2].fill(0xff);
        if let Some(mask) = capability.mask_offset() {
            let bits = low_bits(capability.max_vectors());
            config.writable[mask..mask + 4].copy_from_slice(&bits.to_le_bytes());
        }
        config
    }

    /// The capability's shape.
    pub fn capability(&self) -> MsiCapability {
        self.capability
    }

    /// Whether MSI is enabled.
    pub fn is_enabled(&self) -> bool {
        self.u16_at(MSI_CONTROL_OFFSET) & MSI_ENABLE != 0
    }

    /// Vectors enabled by the guest (multiple message enable, capped at what the function
    /// can do), whether or not MSI itself is enabled.
    pub fn enabled_vectors(&self) -> u16 {
        let log2 = (self.u16_at(MSI_CONTROL_OFFSET) >> MULTIPLE_MESSAGE_ENABLE_SHIFT) & 0x7;
        1 << log2.min(u16::from(self.capability.vectors_log2.min(5)))
    }

    /// Whether vector `vector`'s mask bit is set (always false without per-vector masking).
    pub fn is_masked(&self, vector: u16) -> bool {
        self.mask_bits() & bit(vector) != 0
    }

    /// Whether vector `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.pending & bit(vector) != 0
    }

    /// Whether an interrupt on vector `vector` reaches the guest now: MSI enabled, the
    /// vector among the enabled ones and unmasked, and its route accepted by the sink.
    pub fn is_deliverable(&self, vector: u16) -> bool {
        self.routed_for(vector).is_some()
    }

    /// The message vector `vector` sends (`None`: not an enabled vector).
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let vectors = self.enabled_vectors();
        if vector >= vectors {
            return None;
        }
        let low = u64::from(self.u32_at(4));
        let high = if self.capability.address64 {
            u64::from(self.u32_at(8))
        } else {
            0
        };
        let data = u32::from(self.u16_at(self.capability.data_offset()));
        let vector_bits = u32::from(vectors - 1);
        Some(MsiMessage {
            address: low | high << 32,
            data: (data & !vector_bits) | u32::from(vector),
        })
    }

    /// A guest read at `offset` from the capability's ID byte: any offset and width; bytes
    /// past the capability, and its ID and next pointer, read 0.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let pending_offset = self.capability.mask_offset().map(|mask| mask + 4);
        for (i, out) in data.iter_mut().enumerate() {
            let Some(at) = offset.checked_add(i) else {
                *out = 0;
                continue;
            };
            *out = match pending_offset {
                Some(p) if (p..p + 4).contains(&at) => (self.pending >> (8 * (at - p))) as u8,
                _ if at < self.capability.len() => self.registers.get(at).copied().unwrap_or(0),
                _ => 0,
            };
        }
    }

    /// A guest write at `offset` from the capability's ID byte: only writable bits change
    /// (read-only ones and bytes past the capability are ignored); routes follow.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i) else {
                break;
            };
            if let (Some(byte), Some(&mask)) = (self.registers.get_mut(at), self.writable.get(at)) {
                *byte = (*byte & !mask) | (value & mask);
            }
        }
        self.refresh_all();
    }

    /// Raises vector `vector`: signals it if deliverable, holds it pending if masked (or
    /// unrouted), drops it if MSI is disabled or the vector is not enabled.
    pub fn trigger(&mut self, vector: u16) -> Result<Delivery, Error> {
        if vector >= self.capability.max_vectors() {
            return Err(Error::NoSuchVector(vector));
        }
        if !self.is_enabled() || vector >= self.enabled_vectors() {
            return Ok(Delivery::Disabled);
        }
        if self.routed_for(vector).is_none() {
            self.pending |= bit(vector);
            return Ok(Delivery::Pending);
        }
        self.routing.signal(vector).map_err(Error::Signal)?;
        Ok(Delivery::Delivered)
    }

    /// Back to the reset state: disabled, one vector, no message, nothing masked or
    /// pending, no routes.
    pub fn reset(&mut self) {
        let writable = self.writable;
        for (byte, mask) in self.registers.iter_mut().zip(writable) {
            *byte &= !mask;
        }
        self.pending = 0;
        self.refresh_all();
    }

    fn routed_for(&self, vector: u16) -> Option<MsiMessage> {
        self.routed.get(usize::from(vector)).copied().flatten()
    }

    fn mask_bits(&self) -> u32 {
        self.capability
            .mask_offset()
            .map_or(0, |offset| self.u32_at(offset))
    }

    /// Tells the sink about every vector whose message changed, and delivers pending
    /// interrupts of vectors that became deliverable.
    fn refresh_all(&mut self) {
        for vector in 0..self.capability.max_vectors() {
            let wanted = if self.is_enabled() && !self.is_masked(vector) {
                self.message(vector)
            } else {
                None
            };
            let index = usize::from(vector);
            if self.routed_for(vector) != wanted {
                let accepted = match self.routing.update(vector, wanted) {
                    Ok(()) => wanted,
                    // The vector stays undeliverable (interrupts pend) until a later write
                    // routes it.
                    Err(e) => {
                        log::warn!("msi: cannot route vector {vector}: {e}");
                        None
                    }
                };
                if let Some(slot) = self.routed.get_mut(index) {
                    *slot = accepted;
                }
            }
            if self.routed_for(vector).is_some() && self.is_pending(vector) {
                self.pending &= !bit(vector);
                if let Err(e) = self.routing.signal(vector) {
                    log::warn!("msi: cannot signal vector {vector}: {e}");
                }
            }
        }
    }

    fn u16_at(&self, offset: usize) -> u16 {
        let mut bytes = [0; 2];
        self.read(offset, &mut bytes);
        u16::from_le_bytes(bytes)
    }

    fn u32_at(&self, offset: usize) -> u32 {
        let mut bytes = [0; 4];
        self.read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        if let Some(bytes) = self.registers.get_mut(offset..offset + 2) {
            bytes.copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// Bit `vector` of a 32-bit mask or pending register (0 for vectors past 31).
fn bit(vector: u16) -> u32 {
    1u32.checked_shl(u32::from(vector)).unwrap_or(0)
}

/// A mask of the low `count` bits (count up to 32).
fn low_bits(count: u16) -> u32 {
    1u32.checked_shl(u32::from(count))
        .unwrap_or(0)
        .wrapping_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msix::EventFdMsiRouting;

    fn setup(capability: MsiCapability) -> (MsiConfig, Arc<EventFdMsiRouting>) {
        let routing = Arc::new(EventFdMsiRouting::new(capability.max_vectors()).unwrap());
        (MsiConfig::new(capability, routing.clone()), routing)
    }

    fn fired(routing: &EventFdMsiRouting, vector: u16) -> u64 {
        routing.eventfd(vector).unwrap().read().unwrap_or(0)
    }

    fn write32(msi: &mut MsiConfig, offset: usize, value: u32) {
        msi.write(offset, &value.to_le_bytes());
    }

    fn read32(msi: &MsiConfig, offset: usize) -> u32 {
        let mut bytes = [0; 4];
        msi.read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    const FULL: MsiCapability = MsiCapability {
        vectors_log2: 2,
        address64: true,
        per_vector_mask: true,
    };

    #[test]
    fn shapes() {
        let plain = MsiCapability::from_control(0);
        assert_eq!((plain.max_vectors(), plain.len()), (1, 10));
        assert_eq!(MsiCapability::from_control(MSI_64BIT).len(), 14);
        assert_eq!(MsiCapability::from_control(MSI_PER_VECTOR_MASK).len(), 20);
        let full = MsiCapability::from_control(0x0184 | MSI_ENABLE);
        assert_eq!(full, FULL);
        assert_eq!(full.len(), 24);
        assert_eq!(full.control(), 0x0184);
        // Reserved capable values are capped at 32 vectors.
        assert_eq!(MsiCapability::from_control(0x000e).max_vectors(), 32);
    }

    #[test]
    fn enable_routes_each_enabled_vector() {
        let (mut msi, routing) = setup(FULL);
        write32(&mut msi, 4, 0xfee0_1003);
        write32(&mut msi, 8, 0);
        msi.write(0x0c, &0x4041u16.to_le_bytes());
        assert_eq!(routing.route(0), None, "MSI is disabled");
        // Enable with 2 of 4 vectors (multiple message enable = 1).
        msi.write(MSI_CONTROL_OFFSET, &(MSI_ENABLE | 1 << 4).to_le_bytes());
        assert!(msi.is_enabled());
        assert_eq!(msi.enabled_vectors(), 2);
        let expect = |data| {
            Some(MsiMessage {
                address: 0xfee0_1000,
                data,
            })
        };
        assert_eq!(routing.route(0), expect(0x4040));
        assert_eq!(routing.route(1), expect(0x4041));
        assert_eq!(routing.route(2), None);
        // Read-only control bits stay; the low address bits read 0.
        msi.write(MSI_CONTROL_OFFSET, &[0xff, 0xff]);
        assert_eq!(read32(&msi, 0) >> 16, 0x01f5);
        assert_eq!(read32(&msi, 4), 0xfee0_1000);
        assert_eq!(
            msi.enabled_vectors(),
            4,
            "capped at what the function can do"
        );
        // Disable: every route goes away.
        msi.write(MSI_CONTROL_OFFSET, &[0]);
        assert_eq!((routing.route(0), routing.route(3)), (None, None));
    }

    #[test]
    fn masked_vectors_pend_and_deliver_on_unmask() {
        let (mut msi, routing) = setup(FULL);
        write32(&mut msi, 4, 0xfee0_0000);
        msi.write(MSI_CONTROL_OFFSET, &[0x21]);
        assert_eq!(msi.trigger(3).unwrap(), Delivery::Delivered);
        assert_eq!(fired(&routing, 3), 1);
        assert!(matches!(msi.trigger(4), Err(Error::NoSuchVector(4))));
        // Mask vector 3: held in the pending bits.
        write32(&mut msi, 0x10, 1 << 3);
        assert!(msi.is_masked(3) && !msi.is_deliverable(3));
        assert_eq!(msi.trigger(3).unwrap(), Delivery::Pending);
        assert_eq!(fired(&routing, 3), 0);
        assert_eq!(read32(&msi, 0x14), 1 << 3);
        // The pending register is read-only, and mask bits past the vectors too.
        write32(&mut msi, 0x14, 0);
        write32(&mut msi, 0x10, u32::MAX);
        assert_eq!(read32(&msi, 0x14), 1 << 3);
        assert_eq!(read32(&msi, 0x10), 0xf);
        write32(&mut msi, 0x10, 0);
        assert_eq!(fired(&routing, 3), 1);
        assert_eq!(read32(&msi, 0x14), 0);
        // Disabled: dropped.
        msi.write(MSI_CONTROL_OFFSET, &[0]);
        assert_eq!(msi.trigger(0).unwrap(), Delivery::Disabled);
    }

    #[test]
    fn plain_capability_and_hostile_accesses() {
        let (mut msi, routing) = setup(MsiCapability::from_control(0));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for offset in 0..40 {
            for width in [1usize, 2, 4, 8, 3] {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                msi.write(offset, &seed.to_le_bytes()[..width]);
                let mut out = [0u8; 8];
                msi.read(offset, &mut out[..width]);
            }
        }
        msi.write(usize::MAX - 1, &[0xff; 4]);
        let mut out = [0xff; 4];
        msi.read(usize::MAX - 1, &mut out);
        assert_eq!(out, [0; 4]);
        // A 32-bit address capability: data at 8, nothing past 10.
        msi.reset();
        assert!(!msi.is_enabled());
        write32(&mut msi, 4, 0xfee0_0000);
        write32(&mut msi, 8, 0xffff_0031);
        assert_eq!(read32(&msi, 8), 0x0031);
        msi.write(MSI_CONTROL_OFFSET, &[MSI_ENABLE as u8]);
        assert_eq!(
            routing.route(0),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x31
            })
        );
        assert!(!msi.is_masked(0));
        assert_eq!(msi.trigger(0).unwrap(), Delivery::Delivered);
    }
}
