//! A split virtqueue (virtio 1.2, section 2.7) driven by polling.
//!
//! The rings live in guest memory the driver owns and the device (a VMM thread) reads and
//! writes concurrently, so every ring access is volatile, and the spec's ordering points are
//! fences: descriptors and the ring entry before the available index, the available index
//! before the notification, the used index before the used entries and buffers.

use core::ptr;
use core::sync::atomic::{fence, Ordering};

use super::transport::VirtioTransport;

/// The largest queue size this driver uses.
pub const MAX_SIZE: u16 = 256;
/// Bytes of guest memory one queue needs: a page each for the descriptor table (16 bytes
/// per entry: 4096 at [`MAX_SIZE`]), the available ring (6 + 2 per entry) and the used ring
/// (6 + 8 per entry).
pub const MEMORY_BYTES: u64 = 3 * 4096;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: the driver polls and wants no interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VIRTQ_USED_F_NO_NOTIFY`: the device is processing the queue and needs no notification
/// (its hint when `VIRTIO_F_EVENT_IDX` is not negotiated).
const USED_F_NO_NOTIFY: u16 = 1;
/// A token slot with no request.
const NO_TOKEN: u16 = u16::MAX;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub device_writes: bool,
}

/// A completed chain: the token given to [`Virtqueue::add`] and the bytes the device wrote.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    pub token: u16,
    pub len: u32,
}

/// What the device put in the used ring that the driver never gave it.
#[derive(Clone, Copy, Debug)]
pub struct BadUsed {
    pub id: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One queue: its rings, the driver's indices and the tokens of the chains in flight.
pub struct Virtqueue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The next free descriptor. Chains are allocated in order and all descriptors are
    /// recycled at once when nothing is in flight ([`Virtqueue::recycle`]).
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    in_flight: u16,
    tokens: [u16; MAX_SIZE as usize],
}

impl Virtqueue {
    /// A queue of `size` entries (a power of two, at most [`MAX_SIZE`]) in the
    /// [`MEMORY_BYTES`] of zeroed, page-aligned memory at `memory`, which the queue owns.
    pub fn new(index: u16, size: u16, memory: u64) -> Self {
        let queue = Virtqueue {
            index,
            size,
            desc: memory,
            avail: memory + 4096,
            used: memory + 2 * 4096,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
            in_flight: 0,
            tokens: [NO_TOKEN; MAX_SIZE as usize],
        };
        // SAFETY: the available ring's flags, in memory the queue owns.
        unsafe { write16(queue.avail, AVAIL_F_NO_INTERRUPT) };
        queue
    }

    /// Tells the device where the rings are and enables the queue; returns whether the
    /// device accepted it (`QueueReady` reads 1).
    pub fn configure(&self, transport: &mut VirtioTransport) -> bool {
        transport.configure_queue(self.index, self.size, [self.desc, self.avail, self.used])
    }

    /// Descriptors still free for [`Virtqueue::add`].
    pub fn free_descriptors(&self) -> u16 {
        self.size - self.next_desc
    }

    /// Chains the device has not returned yet.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Makes every descriptor free again. Only when nothing is in flight.
    pub fn recycle(&mut self) {
        debug_assert_eq!(self.in_flight, 0);
        self.next_desc = 0;
    }

    /// Writes a chain of `segs` and puts it in the available ring (not yet visible to the
    /// device: see [`Virtqueue::kick`]). Returns false if there are not enough descriptors.
    pub fn add(&mut self, segs: &[Seg], token: u16) -> bool {
        let count = segs.len() as u16;
        if segs.is_empty() || count > self.free_descriptors() {
            return false;
        }
        let head = self.next_desc;
        self.write_chain(head, segs);
        self.next_desc += count;
        self.push(head, token);
        true
    }

    /// Writes `segs` as a chain into descriptors `head..head + segs.len()` (all below the
    /// queue size, none in flight). For drivers that keep fixed chains and resubmit them with
    /// [`Virtqueue::push`] rather than allocate with [`Virtqueue::add`] (do not mix the two
    /// between recycles).
    pub fn write_chain(&mut self, head: u16, segs: &[Seg]) {
        assert!(
            !segs.is_empty() && usize::from(head) + segs.len() <= usize::from(self.size),
            "chain outside the descriptor table"
        );
        for (i, seg) in segs.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == segs.len();
            let mut flags = if seg.device_writes { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            let desc = Desc {
                addr: seg.addr,
                len: seg.len,
                flags,
                next: if last { 0 } else { index + 1 },
            };
            let slot = ptr::with_exposed_provenance_mut::<Desc>(
                (self.desc + 16 * u64::from(index)) as usize,
            );
            // SAFETY: descriptor `index` < size lies in the table, which the queue owns; the
            // device does not read it before the chain is made available.
            unsafe { slot.write_volatile(desc) };
        }
    }

    /// Puts the chain at `head` (written by [`Virtqueue::write_chain`], not in flight) in the
    /// available ring with `token`; the device sees it after [`Virtqueue::publish`].
    pub fn push(&mut self, head: u16, token: u16) {
        debug_assert_eq!(self.tokens[usize::from(head)], NO_TOKEN);
        self.tokens[usize::from(head)] = token;
        let ring_slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        // SAFETY: an entry of the available ring, which the queue owns.
        unsafe { write16(ring_slot, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
    }

    /// Publishes the chains added since the last publication (writes the available index).
    pub fn publish(&mut self) {
        // The descriptors and ring entries before the index (virtio 1.2, 2.7.13.3).
        fence(Ordering::SeqCst);
        // SAFETY: the available ring's index, which the queue owns.
        unsafe { write16(self.avail + 2, self.avail_idx) };
        // The index before the notification, or before reading the used ring's flags
        // (2.7.13.4).
        fence(Ordering::SeqCst);
    }

    /// Notifies the device. After [`Virtqueue::publish`].
    pub fn notify(&self, transport: &VirtioTransport) {
        transport.notify(self.index);
    }

    /// Whether the device asks for notifications: its used ring's flags lack
    /// `VIRTQ_USED_F_NO_NOTIFY`. Read after [`Virtqueue::publish`] (whose fence orders the
    /// index before this read); a device that clears the flag re-checks the available ring.
    pub fn wants_notification(&self) -> bool {
        // SAFETY: the used ring's flags, in memory the queue owns and the device writes.
        unsafe { read16(self.used) & USED_F_NO_NOTIFY == 0 }
    }

    /// Publishes the chains added since the last kick and notifies the device.
    pub fn kick(&mut self, transport: &VirtioTransport) {
        self.publish();
        self.notify(transport);
    }

    /// The queue size (entries).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Used chains waiting to be popped.
    pub fn used_ready(&self) -> u16 {
        // SAFETY: the used ring's index, in memory the queue owns and the device writes.
        unsafe { read16(self.used + 2) }.wrapping_sub(self.last_used)
    }

    /// The next used chain, if the device returned one.
    pub fn pop(&mut self) -> Option<Result<Used, BadUsed>> {
        // SAFETY: the used ring's index, in memory the queue owns and the device writes.
        let used_idx = unsafe { read16(self.used + 2) };
        if used_idx == self.last_used {
            return None;
        }
        // The entries (and the buffers they describe) after the index.
        fence(Ordering::SeqCst);
        let entry = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: an entry of the used ring.
        let (id, len) = unsafe { (read32(entry), read32(entry + 4)) };
        self.last_used = self.last_used.wrapping_add(1);
        let token = usize::try_from(id)
            .ok()
            .filter(|&id| id < usize::from(self.size))
            .map(|id| core::mem::replace(&mut self.tokens[id], NO_TOKEN));
        match token {
            Some(token) if token != NO_TOKEN => {
                self.in_flight -= 1;
                Some(Ok(Used { token, len }))
            }
            _ => Some(Err(BadUsed { id })),
        }
    }
}

/// # Safety
/// `address` is identity-mapped memory the caller owns, 2-byte aligned.
unsafe fn write16(address: u64, value: u16) {
    // SAFETY: the caller's guarantee.
    unsafe { ptr::with_exposed_provenance_mut::<u16>(address as usize).write_volatile(value) };
}

/// # Safety
/// As for [`write16`].
unsafe fn read16(address: u64) -> u16 {
    // SAFETY: the caller's guarantee.
    unsafe { ptr::with_exposed_provenance::<u16>(address as usize).read_volatile() }
}

/// # Safety
/// As for [`write16`], 4-byte aligned.
unsafe fn read32(address: u64) -> u32 {
    // SAFETY: the caller's guarantee.
    unsafe { ptr::with_exposed_provenance::<u32>(address as usize).read_volatile() }
}
