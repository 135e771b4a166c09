//! The io_uring engine: reads, writes and flushes go to the kernel in one `io_uring_enter`
//! per batch and complete in any order; the kernel signals a registered eventfd.
//!
//! It runs any disk whose data lies in a raw file at host offsets ([`HostMapping`]): a raw
//! image, where host and guest offsets are the same, or a qcow2 image, whose allocated
//! clusters the ring reads and overwrites in place while everything that needs the format
//! driver (allocation, zero and unallocated clusters, backing files, compressed clusters,
//! an L2 table not yet cached) runs on the helper threads below through the driver's
//! [`SyncDisk`] methods.
//!
//! Some requests run on a thread pool that shares the eventfd instead:
//! - discard and write-zeroes, and buffers that need a bounce for `O_DIRECT`;
//! - writes through the page cache: where the filesystem cannot do a non-blocking buffered
//!   write (ext4 answers `RWF_NOWAIT` with EOPNOTSUPP), io_uring hands every such write to
//!   its own kernel workers, which measured slower than our pool (18K vs 34K writes/s at
//!   depth 1 on ext4). The pool has few threads: buffered writes to one file serialise on
//!   its inode lock, and at depth 32 four threads wrote 300K/s where 32 managed 175K.
//!
//! Reads that the page cache can serve complete during `push`, as in the pool engine.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::{AsyncDisk, Completion, DiskInfo, EngineKind, Request, SyncDisk};
use crate::engine::check_request;
use crate::engine::pool::ThreadPoolEngine;
use crate::error::{Error, Result};
use crate::iobuf::{zero_iovecs, IoBuf};
use crate::raw::RawDisk;

/// Threads for the requests that do not go through the ring (see the module docs).
const HELPER_THREADS: usize = 4;

/// Whether this host can run the io_uring engine; the error says why not.
pub fn probe() -> Result<()> {
    IoUring::new(2).map(drop).map_err(Error::UringSetup)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Operation {
    Read,
    Write,
    Flush,
}

/// A disk whose guest data lies in a [`RawDisk`] at host offsets, so the ring can read and
/// overwrite allocated data itself. What else a request needs (allocation, zeroes, backing
/// files, metadata, and reporting errors) the disk's own [`SyncDisk`] methods do, on the
/// engine's helper threads.
pub trait HostMapping: SyncDisk {
    /// The file the data lies in.
    fn host_file(&self) -> &RawDisk;

    /// The host offset of guest bytes `[offset, offset + len)` if they lie contiguously in
    /// data the disk has allocated and finding that out needs no I/O; `None` sends the read
    /// to [`SyncDisk::read_vectored`].
    fn map_read(&self, offset: u64, len: u64) -> Option<u64>;

    /// The host offset of guest bytes `[offset, offset + len)` if they may be overwritten
    /// there without any metadata change and finding that out needs no I/O; `None` sends
    /// the write to [`SyncDisk::write_vectored`].
    fn map_write(&self, offset: u64, len: u64) -> Option<u64>;
}

impl HostMapping for RawDisk {
    fn host_file(&self) -> &RawDisk {
        self
    }

    fn map_read(&self, offset: u64, _len: u64) -> Option<u64> {
        Some(offset)
    }

    fn map_write(&self, offset: u64, _len: u64) -> Option<u64> {
        Some(offset)
    }
}

/// A request in the ring. Its buffers stay here until it completes, since the kernel may
/// look at them again when it retries.
struct Slot {
    token: u64,
    operation: Operation,
    /// The request's offset on the disk, for handing it to the helper threads.
    disk_offset: u64,
    /// The host offset still to transfer at (advanced after a short transfer).
    offset: u64,
    /// Buffers still to transfer (advanced after a short transfer).
    iovecs: Vec<libc::iovec>,
    /// Bytes still to transfer.
    remaining: usize,
    /// Bytes the request asked for.
    len: usize,
    rw_flags: i32,
}

// SAFETY: the iovecs point into memory that `AsyncDisk::push`'s contract keeps valid until
// completion; the engine, and with it the slots, may move between threads.
unsafe impl Send for Slot {}

/// An [`AsyncDisk`] on io_uring over a disk whose data lies in a raw file.
pub struct UringEngine {
    ring: IoUring,
    /// The disk, for mapping requests to the file (and for the file itself).
    mapped: Arc<dyn HostMapping>,
    /// The same disk, for the helper threads and [`AsyncDisk::sync_disk`].
    disk: Arc<dyn SyncDisk>,
    helper: ThreadPoolEngine,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    /// Completions known without the kernel (flushes with nothing to do).
    ready: Vec<Completion>,
    /// Buffer lists of finished requests, kept for reuse so pushing does not allocate.
    spare_iovecs: Vec<Vec<libc::iovec>>,
    /// Scratch lists for `reap`, kept for reuse.
    finished: Vec<(u32, i32)>,
    requeue: Vec<u32>,
    /// Entries pushed to the submission queue since the last `io_uring_enter`.
    unsubmitted: usize,
    in_ring: usize,
    max_in_flight: usize,
    /// Requests put in the ring (rather than on the helper threads), for tests and tools.
    ring_requests: u64,
}

// SAFETY: the engine's raw pointers are the buffers of requests in flight (kept valid by
// `AsyncDisk::push`'s contract, from any thread) and emptied lists kept for reuse.
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// An engine for `raw` with room for `max_in_flight` requests (at most 4096).
    pub fn new(raw: Arc<RawDisk>, max_in_flight: usize) -> Result<Self> {
        Self::for_disk(raw, max_in_flight)
    }

    /// An engine for a disk whose data lies in a raw file (a qcow2 image, say), with room for
    /// `max_in_flight` requests (at most 4096).
    pub fn for_disk<D: HostMapping + 'static>(disk: Arc<D>, max_in_flight: usize) -> Result<Self> {
        let mapped: Arc<dyn HostMapping> = disk.clone();
        let disk: Arc<dyn SyncDisk> = disk;
        let raw = mapped.host_file();
        let max_in_flight = max_in_flight.clamp(1, 4096);
        let ring = IoUring::builder()
            .setup_cqsize(2 * max_in_flight.next_power_of_two() as u32)
            .build(max_in_flight as u32)
            .map_err(Error::UringSetup)?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(Error::Io)?;
        let submitter = ring.submitter();
        submitter
            .register_files(&[raw.file().as_raw_fd()])
            .map_err(Error::UringSetup)?;
        submitter
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(Error::UringSetup)?;
        let helper_eventfd = eventfd.try_clone().map_err(Error::Io)?;
        let helper = ThreadPoolEngine::with_eventfd(
            disk.clone(),
            HELPER_THREADS,
            max_in_flight,
            helper_eventfd,
        );
        // The helper keeps our eventfd; we read it through the helper.
        drop(eventfd);
        Ok(UringEngine {
            ring,
            mapped,
            disk,
            helper,
            slots: (0..max_in_flight).map(|_| None).collect(),
            free_slots: (0..max_in_flight as u32).rev().collect(),
            ready: Vec::new(),
            spare_iovecs: Vec::new(),
            finished: Vec::new(),
            requeue: Vec::new(),
            unsubmitted: 0,
            in_ring: 0,
            max_in_flight,
            ring_requests: 0,
        })
    }

    /// How many requests went into the ring rather than to the helper threads (or completed
    /// at once).
    pub fn ring_requests(&self) -> u64 {
        self.ring_requests
    }

    fn entry(slot: &Slot, index: u32) -> squeue::Entry {
        let file = types::Fixed(0);
        let entry = match slot.operation {
            Operation::Read => {
                opcode::Readv::new(file, slot.iovecs.as_ptr(), slot.iovecs.len() as u32)
                    .offset(slot.offset)
                    .build()
            }
            Operation::Write => {
                opcode::Writev::new(file, slot.iovecs.as_ptr(), slot.iovecs.len() as u32)
                    .offset(slot.offset)
                    .rw_flags(slot.rw_flags)
                    .build()
            }
            Operation::Flush => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(u64::from(index))
    }

    /// Puts a slot's entry on the submission queue, entering the kernel first if it is full.
    fn queue_entry(&mut self, index: u32) -> Result<()> {
        let Some(slot) = self.slots[index as usize].as_ref() else {
            return Ok(());
        };
        let entry = Self::entry(slot, index);
        loop {
            // SAFETY: the entry's buffers (iovecs in the slot and the memory they point to)
            // stay valid until its completion is reaped: the slot is freed only then, and
            // the push contract covers the memory.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.enter(0)?;
        }
    }

    fn enter(&mut self, wait: usize) -> Result<()> {
        loop {
            match self.ring.submit_and_wait(wait) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: completions must be reaped first; the caller reaps and retries.
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    fn complete(&mut self, index: u32, result: Result<usize>, completions: &mut Vec<Completion>) {
        if let Some(mut slot) = self.slots[index as usize].take() {
            completions.push(Completion {
                token: slot.token,
                result,
            });
            slot.iovecs.clear();
            self.spare_iovecs.push(slot.iovecs);
            self.free_slots.push(index);
            self.in_ring -= 1;
        }
    }

    /// Hands a request that has not transferred anything yet to the thread pool.
    fn retry_on_helper(&mut self, index: u32, completions: &mut Vec<Completion>) {
        let Some(slot) = self.slots[index as usize].take() else {
            return;
        };
        self.free_slots.push(index);
        self.in_ring -= 1;
        // SAFETY: IoBuf is repr(transparent) over iovec; these are the request's own
        // buffers, which the push contract keeps valid until its completion.
        let bufs: &[IoBuf<'_>] =
            unsafe { std::slice::from_raw_parts(slot.iovecs.as_ptr().cast(), slot.iovecs.len()) };
        let request = match slot.operation {
            Operation::Read => Request::Read {
                offset: slot.disk_offset,
                bufs,
            },
            Operation::Write => Request::Write {
                offset: slot.disk_offset,
                bufs,
            },
            Operation::Flush => Request::Flush,
        };
        // SAFETY: as above.
        let pushed =
            unsafe { self.helper.push(slot.token, request) }.and_then(|()| self.helper.submit());
        if let Err(e) = pushed {
            completions.push(Completion {
                token: slot.token,
                result: Err(e),
            });
        }
    }

    /// Handles one completion entry: finishes the request, or queues the rest of a short
    /// transfer again. Returns whether something was queued.
    fn handle_cqe(&mut self, index: u32, res: i32, completions: &mut Vec<Completion>) -> bool {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            log::error!("io_uring completion for unknown slot {index}");
            return false;
        };
        if res < 0 {
            let errno = -res;
            if errno == libc::EAGAIN || errno == libc::EINTR {
                return true;
            }
            if slot.operation == Operation::Write
                && slot.rw_flags & libc::RWF_DSYNC != 0
                && slot.remaining == slot.len
                && matches!(errno, libc::EOPNOTSUPP | libc::EINVAL)
            {
                // The host lacks RWF_DSYNC here: the synchronous path learns that, falls
                // back to write + fdatasync, and completes the request.
                self.retry_on_helper(index, completions);
                return false;
            }
            let result = Err(Error::Io(io::Error::from_raw_os_error(errno)));
            self.complete(index, result, completions);
            return false;
        }
        let transferred = res as usize;
        let raw = self.mapped.host_file();
        match slot.operation {
            Operation::Flush => {
                // A flush slot's offset holds the write generation it started at.
                raw.record_sync(slot.offset);
                self.complete(index, Ok(0), completions);
                false
            }
            _ if transferred >= slot.remaining => {
                if slot.operation == Operation::Write {
                    raw.record_write();
                    if slot.rw_flags & libc::RWF_DSYNC != 0 {
                        raw.record_durable_write();
                    }
                }
                let len = slot.len;
                self.complete(index, Ok(len), completions);
                false
            }
            Operation::Read if transferred == 0 => {
                // The end of the file: the rest of the sector reads as zeroes.
                zero_iovecs(&slot.iovecs, 0);
                let len = slot.len;
                self.complete(index, Ok(len), completions);
                false
            }
            Operation::Write if transferred == 0 => {
                let error = io::Error::new(io::ErrorKind::WriteZero, "the host wrote nothing");
                self.complete(index, Err(Error::Io(error)), completions);
                false
            }
            _ => {
                // A short transfer: go on from where it stopped.
                slot.offset += transferred as u64;
                slot.remaining -= transferred;
                let mut skip = transferred;
                slot.iovecs.retain_mut(|iov| {
                    if skip >= iov.iov_len {
                        skip -= iov.iov_len;
                        return false;
                    }
                    // SAFETY: skip < iov_len keeps the pointer inside the buffer.
                    iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(skip).cast() };
                    iov.iov_len -= skip;
                    skip = 0;
                    true
                });
                true
            }
        }
    }
}

impl AsyncDisk for UringEngine {
    fn info(&self) -> DiskInfo {
        self.disk.info()
    }

    fn engine(&self) -> EngineKind {
        EngineKind::IoUring
    }

    fn sync_disk(&self) -> &Arc<dyn SyncDisk> {
        &self.disk
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    fn in_flight(&self) -> usize {
        self.in_ring + self.ready.len() + self.helper.in_flight()
    }

    unsafe fn push(&mut self, token: u64, request: Request<'_>) -> Result<()> {
        check_request(&self.disk.info(), &request)?;
        if self.in_flight() >= self.max_in_flight {
            return Err(Error::QueueFull(self.in_flight()));
        }
        let raw = self.mapped.host_file();
        // (operation, host offset, disk offset, buffers)
        let (operation, offset, disk_offset, bufs) = match request {
            Request::Read { offset, bufs } => {
                if let Some(result) = self.disk.try_read_nowait(offset, bufs) {
                    self.ready.push(Completion { token, result });
                    return Ok(());
                }
                let len = IoBuf::total_len(bufs).unwrap_or(0);
                match self.mapped.map_read(offset, len) {
                    Some(host) => (Operation::Read, host, offset, bufs),
                    // SAFETY: the caller's contract carries over unchanged.
                    None => return unsafe { self.helper.push(token, request) },
                }
            }
            Request::Write { .. } if !raw.cache_mode().direct() => {
                // SAFETY: the caller's contract carries over unchanged.
                return unsafe { self.helper.push(token, request) };
            }
            Request::Write { offset, bufs } => {
                let len = IoBuf::total_len(bufs).unwrap_or(0);
                match self.mapped.map_write(offset, len) {
                    Some(host) => (Operation::Write, host, offset, bufs),
                    // SAFETY: the caller's contract carries over unchanged.
                    None => return unsafe { self.helper.push(token, request) },
                }
            }
            Request::Flush => {
                // Format drivers write their metadata through to the file, so syncing the
                // file is their flush too.
                if !raw.flush_needs_sync() {
                    if raw.cache_mode().ignores_flush() {
                        raw.record_ignored_flush();
                    } else {
                        raw.record_clean_flush();
                    }
                    self.ready.push(Completion {
                        token,
                        result: Ok(0),
                    });
                    return Ok(());
                }
                // The flush covers what was written up to now.
                let generation = raw.write_generation();
                (Operation::Flush, generation, 0, &[][..])
            }
            Request::Discard { .. } | Request::WriteZeroes { .. } => {
                // SAFETY: the caller's contract carries over unchanged.
                return unsafe { self.helper.push(token, request) };
            }
        };
        let iovecs = IoBuf::as_iovecs(bufs);
        if operation != Operation::Flush && !raw.info().is_aligned(offset, iovecs) {
            // SAFETY: as above.
            return unsafe { self.helper.push(token, request) };
        }
        let Some(index) = self.free_slots.pop() else {
            return Err(Error::QueueFull(self.in_flight()));
        };
        let len = IoBuf::total_len(bufs).unwrap_or(0) as usize;
        let mut buffers = self.spare_iovecs.pop().unwrap_or_default();
        buffers.extend_from_slice(iovecs);
        let rw_flags = if operation == Operation::Write {
            raw.write_flags()
        } else {
            0
        };
        self.slots[index as usize] = Some(Slot {
            token,
            operation,
            disk_offset,
            offset,
            iovecs: buffers,
            remaining: len,
            len,
            rw_flags,
        });
        self.in_ring += 1;
        self.ring_requests += 1;
        self.queue_entry(index)
    }

    fn submit(&mut self) -> Result<()> {
        self.helper.submit()?;
        if self.unsubmitted > 0 {
            self.enter(0)?;
        }
        Ok(())
    }

    fn reap(&mut self, completions: &mut Vec<Completion>) -> usize {
        let before = completions.len();
        completions.append(&mut self.ready);
        self.helper.reap(completions);
        let mut finished = std::mem::take(&mut self.finished);
        let mut requeue = std::mem::take(&mut self.requeue);
        finished.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data() as u32, cqe.result())),
        );
        for &(index, res) in &finished {
            if self.handle_cqe(index, res, completions) {
                requeue.push(index);
            }
        }
        for &index in &requeue {
            if let Err(e) = self.queue_entry(index) {
                self.complete(index, Err(e), completions);
            }
        }
        finished.clear();
        requeue.clear();
        self.finished = finished;
        self.requeue = requeue;
        if self.unsubmitted > 0 {
            if let Err(e) = self.enter(0) {
                log::error!("io_uring resubmission failed: {e}");
            }
        }
        completions.len() - before
    }

    fn eventfd(&self) -> &EventFd {
        self.helper.eventfd()
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still write into the requests' buffers: wait for every one of them
        // before the memory's owner can go away.
        let mut sink = Vec::new();
        while self.in_ring > 0 {
            if self.enter(1).is_err() {
                break;
            }
            self.reap(&mut sink);
            sink.clear();
        }
        // The ring is torn down asynchronously after close, and until then a registered
        // file would stay open, and its image locks held. Unregistering waits for that.
        if let Err(e) = self.ring.submitter().unregister_files() {
            log::warn!("io_uring: cannot unregister the image file: {e}");
        }
    }
}
