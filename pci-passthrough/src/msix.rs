//! MSI-X (PCI Local Bus 3.0, section 6.8.2): the capability, the vector table and the
//! pending bit array, and where the messages go.
//!
//! [`MsixConfig`] models the table and PBA as the guest sees them through a BAR. Whenever a
//! vector becomes deliverable (MSI-X enabled, function not masked, vector not masked) or
//! stops being so, or its message changes while deliverable, it tells its [`MsiRouting`]
//! sink, which updates the hypervisor's interrupt routing (for KVM: a GSI route and an
//! irqfd, see [`crate::kvm`]). [`MsixConfig::trigger`] raises a vector: through the sink
//! when deliverable, otherwise by setting its pending bit, delivered when the vector is
//! unmasked.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::Error;

/// Capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes of one table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// The most vectors a function can have.
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Offset of message control in the capability (from its ID byte).
pub const MSIX_CONTROL_OFFSET: usize = 2;
/// Vector control: the entry is masked.
const VECTOR_MASKED: u8 = 1;

/// One MSI message: the write a device does to interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (on x86, 0xfeexxxxx selects the destination APIC).
    pub address: u64,
    /// Message data (vector, delivery mode).
    pub data: u32,
}

/// Where MSI-X vectors go: the VMM's interrupt routing.
pub trait MsiRouting: Send + Sync {
    /// Vector `vector` now delivers `message`, or (with `None`) nothing: disabled or
    /// masked. Called with the [`MsixConfig`] locked by its owner, only on changes.
    fn update(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), Error>;
    /// Raises vector `vector` (for KVM: writes its irqfd). Called only when the vector is
    /// deliverable.
    fn signal(&self, vector: u16) -> std::io::Result<()>;
    /// The eventfd that raises vector `vector` once its route is set (for KVM: its irqfd),
    /// for a device that signals on its own: a VFIO device is handed these eventfds, so its
    /// interrupts reach the guest without passing through the VMM. `None`: the sink has no
    /// such eventfd, interrupts must go through [`MsiRouting::signal`].
    fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        let _ = vector;
        None
    }
}

/// Which message-signalled interrupt mechanism a routing sink serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsiKind {
    /// MSI (capability 0x05): up to 32 vectors sharing one address.
    Msi,
    /// MSI-X (capability 0x11): a table of up to 2048 vectors.
    MsiX,
}

/// Hands out routing sinks, one per function and mechanism: what a device model that learns
/// its vector count only from the device (VFIO passthrough) asks the VMM for.
pub trait MsiAllocator {
    /// A sink for `vectors` vectors of `kind`.
    fn allocate(&self, kind: MsiKind, vectors: u16) -> Result<Arc<dyn MsiRouting>, Error>;
}

/// An allocator of [`EventFdMsiRouting`] sinks that keeps what it handed out, so that tests
/// (or a VMM routing eventfds itself) can find the eventfds of a function's vectors.
#[derive(Debug, Default)]
pub struct EventFdMsiAllocator {
    allocated: Mutex<Vec<(MsiKind, Arc<EventFdMsiRouting>)>>,
}

impl EventFdMsiAllocator {
    /// An allocator that has handed out nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last sink handed out for `kind`.
    pub fn routing(&self, kind: MsiKind) -> Option<Arc<EventFdMsiRouting>> {
        let allocated = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        allocated
            .iter()
            .rev()
            .find(|(k, _)| *k == kind)
            .map(|(_, routing)| routing.clone())
    }
}

impl MsiAllocator for EventFdMsiAllocator {
    fn allocate(&self, kind: MsiKind, vectors: u16) -> Result<Arc<dyn MsiRouting>, Error> {
        let routing = Arc::new(EventFdMsiRouting::new(vectors)?);
        let mut allocated = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        allocated.push((kind, routing.clone()));
        Ok(routing)
    }
}

/// What [`MsixConfig::trigger`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The interrupt was signalled.
    Delivered,
    /// The vector or the function is masked: the pending bit is set, and the interrupt is
    /// signalled when it is unmasked.
    Pending,
    /// MSI-X is disabled: nothing was signalled (the device would use INTx).
    Disabled,
}

/// Where the table or the PBA lives: a BAR index (BIR) and an offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLocation {
    /// BAR index (0-5).
    pub bar: u8,
    /// Offset in the BAR, 8-byte aligned.
    pub offset: u32,
}

/// The MSI-X table, PBA and control bits of one function.
pub struct MsixConfig {
    /// Entries as the guest wrote them: address low, address high, data, vector control.
    entries: Vec<[u8; 16]>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What the routing sink was last told, per vector.
    routed: Vec<Option<MsiMessage>>,
    routing: Arc<dyn MsiRouting>,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("pending", &self.pending)
            .finish()
    }
}

impl MsixConfig {
    /// `vectors` vectors (1 to 2048), all masked, MSI-X disabled, routed through `routing`.
    pub fn new(vectors: u16, routing: Arc<dyn MsiRouting>) -> Result<Self, Error> {
        if vectors == 0 || vectors > MAX_MSIX_VECTORS {
            return Err(Error::InvalidVectorCount(vectors));
        }
        let count = usize::from(vectors);
        let mut entry = [0u8; 16];
        entry[12] = VECTOR_MASKED;
        Ok(MsixConfig {
            entries: vec![entry; count],
            pending: vec![0; count.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routed: vec![None; count],
            routing,
        })
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        // `new` checked the count fits.
        self.entries.len() as u16
    }

    /// Bytes of the table in its BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes of the PBA in its BAR (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability's body (after ID and next pointer) and its write mask, for
    /// [`ConfigSpace::add_capability`](crate::ConfigSpace::add_capability). Only the enable
    /// and function mask bits are writable.
    pub fn capability(&self, table: MsixLocation, pba: MsixLocation) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        let control = self.num_vectors() - 1;
        body[0..2].copy_from_slice(&control.to_le_bytes());
        let table = (table.offset & !0x7) | u32::from(table.bar & 0x7);
        body[2..6].copy_from_slice(&table.to_le_bytes());
        let pba = (pba.offset & !0x7) | u32::from(pba.bar & 0x7);
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        let mut mask = [0u8; 10];
        mask[1] = ((MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8) as u8;
        (body, mask)
    }

    /// Whether MSI-X is enabled.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the whole function is masked.
    pub fn is_function_masked(&self) -> bool {
        self.function_masked
    }

    /// Whether vector `vector`'s own mask bit is set (`None`: no such vector).
    pub fn is_masked(&self, vector: u16) -> Option<bool> {
        let entry = self.entries.get(usize::from(vector))?;
        Some(entry[12] & VECTOR_MASKED != 0)
    }

    /// Whether vector `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        self.pending.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    /// Whether an interrupt on vector `vector` reaches the guest now: MSI-X enabled, neither
    /// the function nor the vector masked, and its route accepted by the sink.
    pub fn is_deliverable(&self, vector: u16) -> bool {
        self.routed_for(vector).is_some()
    }

    /// Vector `vector`'s message as the guest wrote it.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let entry = self.entries.get(usize::from(vector))?;
        let dword = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&entry[4 * i..4 * i + 4]);
            u32::from_le_bytes(b)
        };
        Some(MsiMessage {
            address: u64::from(dword(0)) | u64::from(dword(1)) << 32,
            data: dword(2),
        })
    }

    /// The guest wrote message control (the `MSIX_ENABLE` and `MSIX_FUNCTION_MASK` bits
    /// count; the table size bits are read-only).
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & MSIX_FUNCTION_MASK != 0;
        for vector in 0..self.num_vectors() {
            self.refresh(vector);
        }
    }

    /// A guest read of the table: any offset and width; bytes past the table read 0.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            *out = self.table_byte(offset.checked_add(i as u64)).unwrap_or(0);
        }
    }

    fn table_byte(&self, at: Option<u64>) -> Option<u8> {
        let at = at?;
        let entry = self
            .entries
            .get(usize::try_from(at / MSIX_TABLE_ENTRY_SIZE).ok()?)?;
        entry.get((at % MSIX_TABLE_ENTRY_SIZE) as usize).copied()
    }

    /// A guest write of the table: any offset and width; bytes past the table are ignored.
    /// The low two address bits and the reserved vector control bits are read-only.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched: Option<(u16, u16)> = None;
        for (i, &value) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            let Ok(index) = u16::try_from(at / MSIX_TABLE_ENTRY_SIZE) else {
                break;
            };
            let within = (at % MSIX_TABLE_ENTRY_SIZE) as usize;
            let Some(byte) = self
                .entries
                .get_mut(usize::from(index))
                .and_then(|e| e.get_mut(within))
            else {
                break;
            };
            *byte = match within {
                0 => value & !0x3,
                12 => value & VECTOR_MASKED,
                13..=15 => 0,
                _ => value,
            };
            touched = Some(touched.map_or((index, index), |(lo, _)| (lo, index)));
        }
        if let Some((first, last)) = touched {
            for vector in first..=last {
                self.refresh(vector);
            }
        }
    }

    /// A guest read of the PBA (read-only: writes are to be ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            *out = offset
                .checked_add(i as u64)
                .and_then(|at| {
                    let word = self.pending.get(usize::try_from(at / 8).ok()?)?;
                    Some((word >> (8 * (at % 8))) as u8)
                })
                .unwrap_or(0);
        }
    }

    /// Raises vector `vector`: signals it if deliverable, otherwise sets its pending bit
    /// (masked) or drops it (MSI-X disabled).
    pub fn trigger(&mut self, vector: u16) -> Result<Delivery, Error> {
        let masked = self.is_masked(vector).ok_or(Error::NoSuchVector(vector))?;
        if !self.enabled {
            return Ok(Delivery::Disabled);
        }
        if masked || self.function_masked || self.routed_for(vector).is_none() {
            self.set_pending(vector, true);
            return Ok(Delivery::Pending);
        }
        self.routing.signal(vector).map_err(Error::Signal)?;
        Ok(Delivery::Delivered)
    }

    /// Back to the reset state: disabled, every vector masked with no message, nothing
    /// pending, no routes.
    pub fn reset(&mut self) {
        for entry in &mut self.entries {
            *entry = [0; 16];
            entry[12] = VECTOR_MASKED;
        }
        self.pending.fill(0);
        self.enabled = false;
        self.function_masked = false;
        for vector in 0..self.num_vectors() {
            self.refresh(vector);
        }
    }

    fn routed_for(&self, vector: u16) -> Option<MsiMessage> {
        self.routed.get(usize::from(vector)).copied().flatten()
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        if let Some(w) = self.pending.get_mut(word) {
            if pending {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }

    /// Tells the routing sink about vector `vector` if what it should deliver changed, and
    /// delivers its pending interrupt once it is deliverable.
    fn refresh(&mut self, vector: u16) {
        let Some(masked) = self.is_masked(vector) else {
            return;
        };
        let wanted = if self.enabled && !self.function_masked && !masked {
            self.message(vector)
        } else {
            None
        };
        let index = usize::from(vector);
        if self.routed.get(index).copied().flatten() != wanted {
            match self.routing.update(vector, wanted) {
                Ok(()) => {
                    if let Some(slot) = self.routed.get_mut(index) {
                        *slot = wanted;
                    }
                }
                // The guest cannot be told; the vector stays undeliverable (interrupts
                // stay pending) until a later write succeeds.
                Err(e) => {
                    log::warn!("msix: cannot route vector {vector}: {e}");
                    if let Some(slot) = self.routed.get_mut(index) {
                        *slot = None;
                    }
                }
            }
        }
        if self.routed_for(vector).is_some() && self.is_pending(vector) {
            self.set_pending(vector, false);
            if let Err(e) = self.routing.signal(vector) {
                log::warn!("msix: cannot signal vector {vector}: {e}");
            }
        }
    }
}

/// A routing sink with one eventfd per vector and no hypervisor: it records the messages
/// and writes the vector's eventfd on [`MsiRouting::signal`]. For tests, and for VMMs that
/// route the eventfds themselves.
#[derive(Debug)]
pub struct EventFdMsiRouting {
    eventfds: Vec<EventFd>,
    routes: Mutex<Vec<Option<MsiMessage>>>,
}

impl EventFdMsiRouting {
    /// `vectors` non-blocking eventfds.
    pub fn new(vectors: u16) -> Result<Self, Error> {
        let eventfds = (0..vectors)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EventFdMsiRouting {
            eventfds,
            routes: Mutex::new(vec![None; usize::from(vectors)]),
        })
    }

    /// Vector `vector`'s eventfd.
    pub fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.eventfds.get(usize::from(vector))
    }

    /// Vector `vector`'s current route (`None`: not deliverable).
    pub fn route(&self, vector: u16) -> Option<MsiMessage> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.get(usize::from(vector)).copied().flatten()
    }
}

impl MsiRouting for EventFdMsiRouting {
    fn update(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), Error> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let slot = routes
            .get_mut(usize::from(vector))
            .ok_or(Error::NoSuchVector(vector))?;
        *slot = message;
        Ok(())
    }

    fn signal(&self, vector: u16) -> std::io::Result<()> {
        match self.eventfds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.eventfds.get(usize::from(vector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(vectors: u16) -> (MsixConfig, Arc<EventFdMsiRouting>) {
        let routing = Arc::new(EventFdMsiRouting::new(vectors).unwrap());
        (MsixConfig::new(vectors, routing.clone()).unwrap(), routing)
    }

    fn program(msix: &mut MsixConfig, vector: u64, address: u64, data: u32, masked: bool) {
        let base = vector * 16;
        msix.write_table(base, &(address as u32).to_le_bytes());
        msix.write_table(base + 4, &((address >> 32) as u32).to_le_bytes());
        msix.write_table(base + 8, &data.to_le_bytes());
        msix.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn fired(routing: &EventFdMsiRouting, vector: u16) -> u64 {
        routing.eventfd(vector).unwrap().read().unwrap_or(0)
    }

    #[test]
    fn vector_counts() {
        let routing = Arc::new(EventFdMsiRouting::new(1).unwrap());
        assert!(MsixConfig::new(0, routing.clone()).is_err());
        assert!(MsixConfig::new(2049, routing.clone()).is_err());
        let msix = MsixConfig::new(2048, routing).unwrap();
        assert_eq!(msix.table_size(), 2048 * 16);
        assert_eq!(msix.pba_size(), 256);
    }

    #[test]
    fn capability_body() {
        let (msix, _) = setup(5);
        let (body, mask) = msix.capability(
            MsixLocation {
                bar: 0,
                offset: 0x4000,
            },
            MsixLocation {
                bar: 2,
                offset: 0x5000,
            },
        );
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 4);
        assert_eq!(&body[2..6], &0x4000u32.to_le_bytes());
        assert_eq!(&body[6..10], &0x5002u32.to_le_bytes());
        assert_eq!(mask[1], 0xc0);
    }

    #[test]
    fn table_writes_route_and_mask() {
        let (mut msix, routing) = setup(4);
        // Entries start masked.
        let mut control = [0u8; 4];
        msix.read_table(12, &mut control);
        assert_eq!(control, [1, 0, 0, 0]);
        program(&mut msix, 1, 0xfee0_1000, 0x41, false);
        assert_eq!(routing.route(1), None, "MSI-X is disabled");
        msix.set_control(MSIX_ENABLE);
        let message = MsiMessage {
            address: 0xfee0_1000,
            data: 0x41,
        };
        assert_eq!(routing.route(1), Some(message));
        assert_eq!(routing.route(0), None, "vector 0 is masked");
        // A 64-bit read of the address.
        let mut address = [0u8; 8];
        msix.read_table(16, &mut address);
        assert_eq!(u64::from_le_bytes(address), 0xfee0_1000);
        // Read-only bits: low address bits, reserved control bits.
        msix.write_table(16, &[0xff]);
        msix.write_table(28, &[0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(msix.message(1).unwrap().address & 3, 0);
        msix.read_table(28, &mut control);
        assert_eq!(control, [0, 0, 0, 0]);
        // Function mask removes every route.
        msix.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert_eq!(routing.route(1), None);
        msix.set_control(MSIX_ENABLE);
        assert!(routing.route(1).is_some());
    }

    #[test]
    fn trigger_masked_sets_pending_and_unmask_delivers() {
        let (mut msix, routing) = setup(66);
        assert!(matches!(msix.trigger(66), Err(Error::NoSuchVector(66))));
        assert_eq!(msix.trigger(65).unwrap(), Delivery::Disabled);
        msix.set_control(MSIX_ENABLE);
        program(&mut msix, 65, 0xfee0_0000, 0x30, false);
        assert_eq!(msix.trigger(65).unwrap(), Delivery::Delivered);
        assert_eq!(fired(&routing, 65), 1);
        // Mask the vector: the interrupt is held in the PBA.
        msix.write_table(65 * 16 + 12, &[1]);
        assert_eq!(msix.trigger(65).unwrap(), Delivery::Pending);
        assert_eq!(fired(&routing, 65), 0);
        let mut pba = [0u8; 16];
        msix.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba[8..16].try_into().unwrap()), 1 << 1);
        assert!(msix.is_pending(65));
        // Unmasking delivers it and clears the bit.
        msix.write_table(65 * 16 + 12, &[0]);
        assert_eq!(fired(&routing, 65), 1);
        assert!(!msix.is_pending(65));
        // Same through the function mask.
        msix.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert_eq!(msix.trigger(65).unwrap(), Delivery::Pending);
        msix.set_control(MSIX_ENABLE);
        assert_eq!(fired(&routing, 65), 1);
    }

    #[test]
    fn deliverable_follows_enable_and_masks() {
        let (mut msix, routing) = setup(2);
        program(&mut msix, 0, 0xfee0_0000, 0x30, false);
        assert!(!msix.is_deliverable(0), "MSI-X is disabled");
        msix.set_control(MSIX_ENABLE);
        assert!(msix.is_deliverable(0));
        assert!(!msix.is_deliverable(1), "vector 1 is masked");
        assert!(!msix.is_deliverable(2), "no vector 2");
        msix.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert!(!msix.is_deliverable(0));
        // The trait's eventfd is the vector's own.
        let sink: &dyn MsiRouting = routing.as_ref();
        sink.signal(1).unwrap();
        assert_eq!(sink.eventfd(1).unwrap().read().unwrap(), 1);
        assert!(sink.eventfd(2).is_none());
    }

    #[test]
    fn allocator_keeps_the_sinks_it_hands_out() {
        let allocator = EventFdMsiAllocator::new();
        assert!(allocator.routing(MsiKind::MsiX).is_none());
        let msix = allocator.allocate(MsiKind::MsiX, 3).unwrap();
        let msi = allocator.allocate(MsiKind::Msi, 1).unwrap();
        msix.signal(2).unwrap();
        let kept = allocator.routing(MsiKind::MsiX).unwrap();
        assert_eq!(fired(&kept, 2), 1);
        assert!(allocator
            .routing(MsiKind::Msi)
            .unwrap()
            .eventfd(1)
            .is_none());
        assert!(msi.eventfd(0).is_some());
    }

    #[test]
    fn hostile_accesses() {
        let (mut msix, _) = setup(3);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for offset in 0..64u64 {
            for width in [1usize, 2, 4, 8, 3] {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                msix.write_table(offset, &seed.to_le_bytes()[..width]);
                let mut out = [0u8; 8];
                msix.read_table(offset, &mut out[..width]);
                msix.read_pba(offset, &mut out[..width]);
            }
        }
        msix.write_table(u64::MAX - 2, &[0xff; 8]);
        let mut out = [0xffu8; 8];
        msix.read_table(u64::MAX - 2, &mut out);
        assert_eq!(out, [0; 8]);
        msix.read_pba(u64::MAX - 2, &mut out);
        assert_eq!(out, [0; 8]);
        msix.reset();
        assert_eq!(msix.is_masked(2), Some(true));
        assert!(!msix.is_enabled());
    }
}
