//! The hot path: one virtqueue's requests, from the available ring to the disk and back to
//! the used ring.
//!
//! [`BlockQueue`] is driven by two calls, so that an I/O thread, a test or a benchmark can
//! run it without threads: [`BlockQueue::process_queue`] when the driver notifies the queue,
//! and [`BlockQueue::handle_completions`] when the disk's eventfd becomes readable.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;
use vmkit_block_backend::{AsyncDisk, Completion, Error as DiskError, Request};

use crate::interrupt::InterruptSink;
use crate::request::{
    mark_guest_dirty, parse, write_guest, Limits, Parsed, RequestKind, Slot, ID_BYTES,
    STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use crate::Error;

/// One virtqueue of a block device with its disk.
///
/// Requests are pushed to the disk with their descriptor head index as token; each head has a
/// `Slot` that keeps the request's buffers until it completes, so the steady state does not
/// allocate.
pub struct BlockQueue<M: GuestMemory> {
    // Declared first so that it is dropped first: dropping the disk waits for its requests,
    // which use `mem`'s mappings.
    disk: Box<dyn AsyncDisk>,
    slots: Vec<Slot>,
    completions: Vec<Completion>,
    queue: Queue,
    mem: Arc<M>,
    index: u16,
    limits: Limits,
    interrupt: Arc<dyn InterruptSink>,
    /// The disk had no room: popping resumes when completions free some.
    throttled: bool,
    /// A fatal error happened: the queue does nothing more until the device is reset.
    broken: bool,
    /// Used entries were added since the last interrupt decision.
    used_pending: bool,
}

impl<M: GuestMemory> BlockQueue<M> {
    /// A queue with index `index` (for interrupts) over `queue`, whose requests go to `disk`.
    /// `serial` is the GET_ID answer (at most 20 bytes are used). Set the queue's event index
    /// mode (`Queue::set_event_idx`) to what was negotiated before calling this.
    pub fn new(
        index: u16,
        queue: Queue,
        mem: Arc<M>,
        disk: Box<dyn AsyncDisk>,
        interrupt: Arc<dyn InterruptSink>,
        serial: &[u8],
    ) -> Self {
        let info = disk.info();
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        let limits = Limits {
            capacity_bytes: info.addressable_size(),
            read_only: info.read_only,
            discard: info.discard && !info.read_only,
            serial: id,
        };
        let mut slots = Vec::new();
        slots.resize_with(usize::from(queue.size()), Slot::default);
        BlockQueue {
            completions: Vec::with_capacity(disk.max_in_flight()),
            disk,
            slots,
            queue,
            mem,
            index,
            limits,
            interrupt,
            throttled: false,
            broken: false,
            used_pending: false,
        }
    }

    /// The queue's index in the device.
    pub fn queue_index(&self) -> u16 {
        self.index
    }

    /// The virtqueue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The disk.
    pub fn disk(&self) -> &dyn AsyncDisk {
        self.disk.as_ref()
    }

    /// Requests the disk holds.
    pub fn in_flight(&self) -> usize {
        self.disk.in_flight()
    }

    /// Whether a fatal error stopped the queue (the device needs a reset).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Takes every available request: parses it, pushes it to the disk (or answers it at
    /// once when it is invalid or needs no I/O), submits the batch, completes what is already
    /// done and raises at most one interrupt.
    ///
    /// An error means the driver broke the queue (or guest memory vanished): the queue stops
    /// and the device should set `NEEDS_RESET`.
    pub fn process_queue(&mut self) -> Result<(), Error> {
        if self.broken {
            return Ok(());
        }
        let result = self.pop_and_submit();
        let result = result.and_then(|()| self.complete_ready());
        let result = result.and_then(|()| self.notify());
        self.fail_on_error(result)
    }

    /// Completes what the disk finished, takes what the driver made available meanwhile
    /// (whether or not it notified, and after a full disk), and raises at most one
    /// interrupt. Call it when the disk's eventfd is readable (after reading the eventfd).
    pub fn handle_completions(&mut self) -> Result<(), Error> {
        let mut result = self.complete_ready();
        // A driver at a steady queue depth refills as completions come in: picking that up
        // in the same wake-up keeps the disk's queue full without waiting for the
        // notification's own trip through the event loop.
        if result.is_ok() && !self.broken && self.disk.in_flight() < self.disk.max_in_flight() {
            result = self.pop_and_submit().and_then(|()| self.complete_ready());
        }
        let result = result.and_then(|()| self.notify());
        self.fail_on_error(result)
    }

    /// Stops the queue and waits until the disk holds no request; completions are dropped
    /// without touching guest memory. Used on device reset.
    pub fn quiesce(&mut self) {
        self.broken = true;
        while self.disk.in_flight() > 0 {
            self.completions.clear();
            if self.disk.reap(&mut self.completions) == 0 {
                wait_readable(self.disk.eventfd());
                let _ = self.disk.eventfd().read();
            }
        }
        self.completions.clear();
        for slot in &mut self.slots {
            slot.in_flight = false;
        }
    }

    /// Quiesces the queue and gives the disk back, for a later activation.
    pub fn into_disk(mut self) -> Box<dyn AsyncDisk> {
        self.quiesce();
        self.disk
    }

    fn fail_on_error(&mut self, result: Result<(), Error>) -> Result<(), Error> {
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn pop_and_submit(&mut self) -> Result<(), Error> {
        self.throttled = false;
        let mut pushed = false;
        // Rounds in a row that took nothing although the ring said there was more.
        let mut empty_rounds = 0;
        let result = loop {
            if let Err(e) = self.queue.disable_notification(self.mem.as_ref()) {
                break Err(Error::Queue(e));
            }
            let popped = match self.pop_batch(&mut pushed) {
                Ok(popped) => popped,
                Err(e) => break Err(e),
            };
            if self.throttled {
                break Ok(());
            }
            // Re-enabling notifications reports buffers that arrived meanwhile.
            match self.queue.enable_notification(self.mem.as_ref()) {
                Ok(true) => {
                    // A buffer made available between the two reads is taken in the next
                    // round; a ring that keeps saying "more" and yields nothing (its
                    // entries lie outside guest RAM) would keep this thread here forever.
                    empty_rounds = if popped == 0 { empty_rounds + 1 } else { 0 };
                    if empty_rounds > 1 {
                        break Err(Error::StalledRing);
                    }
                }
                Ok(false) => break Ok(()),
                Err(e) => break Err(Error::Queue(e)),
            }
        };
        // Submit what was pushed even after an error, so the disk can finish it.
        if pushed {
            self.disk.submit().map_err(Error::Disk)?;
        }
        result
    }

    /// Takes what the available ring holds, until it is empty or the disk is full; returns
    /// how many chains it took.
    fn pop_batch(&mut self, pushed: &mut bool) -> Result<usize, Error> {
        let mem = self.mem.as_ref();
        let mut popped = 0;
        loop {
            if self.disk.in_flight() >= self.disk.max_in_flight() {
                self.throttled = true;
                return Ok(popped);
            }
            let chain = match self.queue.iter(mem) {
                Ok(mut available) => available.next(),
                Err(e) => return Err(Error::Queue(e)),
            };
            let Some(chain) = chain else {
                return Ok(popped);
            };
            popped += 1;
            let head = chain.head_index();
            // A head outside the queue cannot even be returned in the used ring.
            let slot = self
                .slots
                .get_mut(usize::from(head))
                .ok_or(Error::InvalidHead(head))?;
            if slot.in_flight {
                return Err(Error::HeadInFlight(head));
            }
            match parse(chain, mem, &self.limits, slot) {
                Parsed::Submit => {}
                Parsed::Complete { status, written } => {
                    write_status(mem, slot, status)?;
                    let len = written.saturating_add(1);
                    add_used(&mut self.queue, mem, &mut self.used_pending, head, len)?;
                    continue;
                }
                Parsed::Unanswerable => return Err(Error::NoStatusByte(head)),
            }
            let request = match slot.kind {
                RequestKind::Read => Request::Read {
                    offset: slot.offset,
                    bufs: &slot.bufs,
                },
                RequestKind::Write => Request::Write {
                    offset: slot.offset,
                    bufs: &slot.bufs,
                },
                RequestKind::Flush => Request::Flush,
                RequestKind::Discard => Request::Discard {
                    offset: slot.offset,
                    len: slot.len,
                },
                RequestKind::WriteZeroes => Request::WriteZeroes {
                    offset: slot.offset,
                    len: slot.len,
                },
                // The parser answers these itself.
                RequestKind::GetId | RequestKind::Unsupported => Request::Flush,
            };
            // SAFETY: the buffers are guest RAM kept mapped by `self.mem`, which outlives
            // the request: completions are reaped before the slot is reused (`in_flight`),
            // and `quiesce` / the field order make the disk finish before `mem` is dropped.
            match unsafe { self.disk.push(u64::from(head), request) } {
                Ok(()) => {
                    slot.in_flight = true;
                    *pushed = true;
                }
                Err(DiskError::QueueFull(_)) => {
                    // Leave the chain on the ring; it is popped again when there is room.
                    self.queue.go_to_previous_position();
                    self.throttled = true;
                    return Ok(popped - 1);
                }
                Err(e) => {
                    write_status(mem, slot, status_of(&e))?;
                    add_used(&mut self.queue, mem, &mut self.used_pending, head, 1)?;
                }
            }
        }
    }

    fn complete_ready(&mut self) -> Result<(), Error> {
        loop {
            self.completions.clear();
            if self.disk.reap(&mut self.completions) == 0 {
                return Ok(());
            }
            let mut completions = std::mem::take(&mut self.completions);
            let result = completions
                .drain(..)
                .try_for_each(|completion| self.complete(completion));
            self.completions = completions;
            result?;
        }
    }

    fn complete(&mut self, completion: Completion) -> Result<(), Error> {
        let mem = self.mem.as_ref();
        // Tokens are head indexes this queue pushed; anything else is ignored.
        let Ok(head) = u16::try_from(completion.token) else {
            return Ok(());
        };
        let Some(slot) = self.slots.get_mut(usize::from(head)) else {
            return Ok(());
        };
        if !slot.in_flight {
            return Ok(());
        }
        slot.in_flight = false;
        if self.broken {
            return Ok(());
        }
        let (status, written) = match completion.result {
            Ok(_) if slot.kind == RequestKind::Read => {
                mark_dirty(mem, slot);
                // Reads fill every buffer; `len` is at most SIZE_MAX * SEG_MAX.
                (STATUS_OK, u32::try_from(slot.len).unwrap_or(u32::MAX))
            }
            Ok(_) => (STATUS_OK, 0),
            Err(e) => (status_of(&e), 0),
        };
        write_status(mem, slot, status)?;
        let len = written.saturating_add(1);
        add_used(&mut self.queue, mem, &mut self.used_pending, head, len)
    }

    fn notify(&mut self) -> Result<(), Error> {
        if !self.used_pending {
            return Ok(());
        }
        self.used_pending = false;
        if self
            .queue
            .needs_notification(self.mem.as_ref())
            .map_err(Error::Queue)?
        {
            self.interrupt
                .signal_used(self.index)
                .map_err(Error::Interrupt)?;
        }
        Ok(())
    }
}

fn add_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    used_pending: &mut bool,
    head: u16,
    len: u32,
) -> Result<(), Error> {
    queue.add_used(mem, head, len).map_err(Error::Queue)?;
    *used_pending = true;
    Ok(())
}

/// The status byte for a request the disk refused or failed.
fn status_of(error: &DiskError) -> u8 {
    match error {
        DiskError::DiscardDisabled => STATUS_UNSUPP,
        _ => STATUS_IOERR,
    }
}

fn write_status<M: GuestMemory>(mem: &M, slot: &Slot, status: u8) -> Result<(), Error> {
    write_guest(mem, status, slot.status_addr).map_err(Error::GuestMemory)
}

/// Marks the buffers a read filled as dirty: the disk wrote them behind the bitmap's back.
fn mark_dirty<M: GuestMemory>(mem: &M, slot: &Slot) {
    for (addr, buf) in slot.guest_addrs.iter().zip(&slot.bufs) {
        mark_guest_dirty(mem, *addr, buf.len());
    }
}

/// Waits (up to 100 ms, so that a lost wake-up costs little) for `fd` to become readable.
fn wait_readable(fd: &impl std::os::fd::AsRawFd) {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pollfd` is a valid, initialised pollfd and the count is 1.
    unsafe { libc::poll(&mut pollfd, 1, 100) };
}
