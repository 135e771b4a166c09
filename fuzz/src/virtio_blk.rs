//! The virtio-blk queue harness: one `BlockQueue` over 64 KiB of guest memory (two
//! regions, so buffers can straddle a region boundary) and an in-memory disk whose engine
//! completes requests inline, so that a run is deterministic.
//!
//! Input layout (missing bytes read as zero):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0-1 | queue size (little endian; the queue refuses sizes that are not powers of two) |
//! | 2 | flags: bit 0 EVENT_IDX, bit 1 read-only disk, bit 2 hold completions until the second pass, bit 3 discard on, bits 4-6 disk queue depth - 1 |
//! | 3 | unused |
//! | 4-5 | disk size in bytes |
//! | 6-7, 8-9, 10-11 | descriptor table, available ring, used ring addresses |
//! | 12-13 | added to the available index before the second pass |
//! | 14-15 | unused |
//! | 16.. | guest memory, from address 0 |
//!
//! Besides "no panic, no hang", the engine checks what the device hands the disk: buffers
//! inside guest RAM, ranges inside the disk, no writes to a read-only disk, no token pushed
//! twice while in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmkit_block_backend::{
    AsyncDisk, CacheMode, Completion, DiskInfo, EngineKind, Error, IoBuf, Request, SyncDisk,
    MAX_BUFFERS,
};
use vmkit_virtio_blk::{BlockQueue, CountingInterrupt};
use vmm_sys_util::eventfd::EventFd;

type Mem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Guest RAM: two regions of 32 KiB each.
const REGION: usize = 32 << 10;
/// Bytes before the guest memory image.
const HEADER: usize = 16;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A disk in a vector.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    info: DiskInfo,
}

impl MemDisk {
    /// Copies between the disk at `offset` and `bufs`, after the checks every disk makes.
    fn transfer(&self, offset: u64, bufs: &[IoBuf<'_>], write: bool) -> Result<usize, Error> {
        let total = IoBuf::total_len(bufs).ok_or(Error::OutOfRange {
            offset,
            len: u64::MAX,
            size: self.info.size,
        })?;
        self.info.check_range(offset, total)?;
        if write && self.info.read_only {
            return Err(Error::ReadOnly);
        }
        let mut data = lock(&self.data);
        let mut at = offset as usize;
        for buf in bufs {
            let len = buf.len();
            // `check_range` allows the sector-rounded size: the vector has that size.
            let Some(disk) = data.get_mut(at..at + len) else {
                return Err(Error::OutOfRange {
                    offset,
                    len: total,
                    size: self.info.size,
                });
            };
            // SAFETY: the caller's contract (`AsyncDisk::push`) keeps `buf`'s `len` bytes
            // valid and unaliased by references until completion; `disk` is a distinct
            // vector.
            unsafe {
                if write {
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), disk.as_mut_ptr(), len);
                } else {
                    std::ptr::copy_nonoverlapping(disk.as_ptr(), buf.as_ptr(), len);
                }
            }
            at += len;
        }
        Ok(total as usize)
    }

    fn fill(&self, offset: u64, len: u64, discard: bool) -> Result<(), Error> {
        self.info.check_range(offset, len)?;
        if self.info.read_only {
            return Err(Error::ReadOnly);
        }
        if discard && !self.info.discard {
            return Err(Error::DiscardDisabled);
        }
        let mut data = lock(&self.data);
        if let Some(range) = data.get_mut(offset as usize..(offset + len) as usize) {
            range.fill(0);
        }
        Ok(())
    }
}

impl SyncDisk for MemDisk {
    fn info(&self) -> DiskInfo {
        self.info
    }
    fn cache_mode(&self) -> CacheMode {
        CacheMode::Unsafe
    }
    fn write_cache(&self) -> bool {
        true
    }
    fn set_write_cache(&self, _enabled: bool) -> Result<(), Error> {
        Ok(())
    }
    fn read_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<usize, Error> {
        self.transfer(offset, bufs, false)
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<usize, Error> {
        self.transfer(offset, bufs, true)
    }
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.fill(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.fill(offset, len, false)
    }
}

/// A request held between `push` and its completion, with its buffers as raw parts.
enum Held {
    Read(u64, Vec<(usize, usize)>),
    Write(u64, Vec<(usize, usize)>),
    Flush,
    Discard(u64, u64),
    WriteZeroes(u64, u64),
}

/// An engine that runs requests on the calling thread: at `submit`, or, while `hold` is
/// set, only once it is cleared (at the next `reap`).
struct InlineEngine {
    disk: Arc<MemDisk>,
    sync: Arc<dyn SyncDisk>,
    depth: usize,
    /// Host address ranges of guest RAM: every buffer must lie in one of them.
    ram: Vec<(usize, usize)>,
    /// Queue size: tokens are head indexes below it.
    queue_size: u64,
    queued: Vec<(u64, Held)>,
    submitted: Vec<(u64, Held)>,
    done: Vec<Completion>,
    hold: Arc<AtomicBool>,
    eventfd: EventFd,
}

impl InlineEngine {
    fn run(&self, held: &Held) -> Result<usize, Error> {
        let bufs = |parts: &[(usize, usize)]| -> Vec<IoBuf<'static>> {
            parts
                .iter()
                // SAFETY: `push` checked that each range lies in guest RAM, which outlives
                // the engine (the queue drops the disk first).
                .map(|&(ptr, len)| unsafe { IoBuf::from_raw_parts(ptr as *mut u8, len) })
                .collect()
        };
        match held {
            Held::Read(offset, parts) => self.disk.read_vectored(*offset, &bufs(parts)),
            Held::Write(offset, parts) => self.disk.write_vectored(*offset, &bufs(parts)),
            Held::Flush => self.disk.flush().map(|()| 0),
            Held::Discard(offset, len) => self.disk.discard(*offset, *len).map(|()| 0),
            Held::WriteZeroes(offset, len) => self.disk.write_zeroes(*offset, *len).map(|()| 0),
        }
    }

    fn check_bufs(&self, bufs: &[IoBuf<'_>]) -> Vec<(usize, usize)> {
        assert!(bufs.len() <= MAX_BUFFERS, "{} buffers", bufs.len());
        bufs.iter()
            .map(|buf| {
                let (start, len) = (buf.as_ptr() as usize, buf.len());
                assert!(
                    self.ram
                        .iter()
                        .any(|&(base, size)| start >= base && start + len <= base + size),
                    "buffer {start:#x}+{len:#x} is outside guest RAM {:x?}",
                    self.ram
                );
                (start, len)
            })
            .collect()
    }

    fn check_range(&self, offset: u64, len: u64) {
        assert!(
            self.disk.info.check_range(offset, len).is_ok(),
            "the device pushed {len} bytes at {offset} on a disk of {}",
            self.disk.info.size
        );
    }
}

impl AsyncDisk for InlineEngine {
    fn info(&self) -> DiskInfo {
        self.disk.info
    }
    fn engine(&self) -> EngineKind {
        EngineKind::Sync
    }
    fn sync_disk(&self) -> &Arc<dyn SyncDisk> {
        &self.sync
    }
    fn max_in_flight(&self) -> usize {
        self.depth
    }
    fn in_flight(&self) -> usize {
        self.queued.len() + self.submitted.len() + self.done.len()
    }

    unsafe fn push(&mut self, token: u64, request: Request<'_>) -> Result<(), Error> {
        if self.in_flight() >= self.depth {
            return Err(Error::QueueFull(self.depth));
        }
        assert!(token < self.queue_size, "token {token} is not a head index");
        let busy = self
            .queued
            .iter()
            .chain(&self.submitted)
            .map(|(t, _)| *t)
            .chain(self.done.iter().map(|c| c.token));
        for t in busy {
            assert_ne!(t, token, "head {token} pushed twice while in flight");
        }
        let read_only = self.disk.info.read_only;
        let held = match request {
            Request::Read { offset, bufs } => {
                self.check_range(offset, IoBuf::total_len(bufs).unwrap_or(u64::MAX));
                Held::Read(offset, self.check_bufs(bufs))
            }
            Request::Write { offset, bufs } => {
                assert!(!read_only, "a write reached a read-only disk");
                self.check_range(offset, IoBuf::total_len(bufs).unwrap_or(u64::MAX));
                Held::Write(offset, self.check_bufs(bufs))
            }
            Request::Flush => Held::Flush,
            Request::Discard { offset, len } => {
                assert!(!read_only, "a discard reached a read-only disk");
                self.check_range(offset, len);
                Held::Discard(offset, len)
            }
            Request::WriteZeroes { offset, len } => {
                assert!(!read_only, "write-zeroes reached a read-only disk");
                self.check_range(offset, len);
                Held::WriteZeroes(offset, len)
            }
        };
        self.queued.push((token, held));
        Ok(())
    }

    fn submit(&mut self) -> Result<(), Error> {
        self.submitted.append(&mut self.queued);
        if !self.hold.load(Ordering::Relaxed) {
            self.finish();
        }
        Ok(())
    }

    fn reap(&mut self, completions: &mut Vec<Completion>) -> usize {
        if !self.hold.load(Ordering::Relaxed) {
            self.finish();
        }
        let n = self.done.len();
        completions.append(&mut self.done);
        n
    }

    fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

impl InlineEngine {
    fn finish(&mut self) {
        for (token, held) in std::mem::take(&mut self.submitted) {
            let result = self.run(&held);
            self.done.push(Completion { token, result });
        }
    }
}

fn u16_at(data: &[u8], at: usize) -> u16 {
    let lo = data.get(at).copied().unwrap_or(0);
    let hi = data.get(at + 1).copied().unwrap_or(0);
    u16::from_le_bytes([lo, hi])
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) {
    let queue_size = u16_at(data, 0);
    let flags = data.get(2).copied().unwrap_or(0);
    let event_idx = flags & 1 != 0;
    let read_only = flags & 2 != 0;
    let hold_first_pass = flags & 4 != 0;
    let discard = flags & 8 != 0;
    let depth = usize::from((flags >> 4) & 7) + 1;
    let disk_size = u64::from(u16_at(data, 4));
    let desc = u64::from(u16_at(data, 6));
    let avail = u64::from(u16_at(data, 8));
    let used = u64::from(u16_at(data, 10));
    let bump = u16_at(data, 12);

    let Ok(mem) = Mem::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64), REGION),
    ]) else {
        return;
    };
    let image = data.get(HEADER..).unwrap_or(&[]);
    let image = image.get(..2 * REGION).unwrap_or(image);
    if mem.write_slice(image, GuestAddress(0)).is_err() {
        return;
    }
    let mem = Arc::new(mem);
    let ram = mem
        .iter()
        .filter_map(|region| {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .ok()?;
            Some((host as usize, region.len() as usize))
        })
        .collect();

    let info = DiskInfo {
        size: disk_size,
        logical_block_size: 512,
        physical_block_size: 512,
        request_alignment: 1,
        memory_alignment: 1,
        read_only,
        discard,
    };
    let disk = Arc::new(MemDisk {
        data: Mutex::new(vec![0x5a; info.addressable_size() as usize]),
        info,
    });
    let hold = Arc::new(AtomicBool::new(hold_first_pass));
    let Ok(eventfd) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let Ok(mut queue) = Queue::new(256) else {
        return;
    };
    queue.set_size(queue_size);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    let engine = InlineEngine {
        sync: disk.clone(),
        disk,
        depth,
        ram,
        queue_size: u64::from(queue.size()),
        queued: Vec::new(),
        submitted: Vec::new(),
        done: Vec::new(),
        hold: hold.clone(),
        eventfd,
    };

    let interrupt = Arc::new(CountingInterrupt::new());
    let mut block = BlockQueue::new(0, queue, mem.clone(), Box::new(engine), interrupt, b"fuzz");

    // The errors are the device's answer to a broken queue; only panics and hangs count.
    let _ = block.process_queue();
    if hold_first_pass {
        // More of the same ring while requests are in flight: reused heads, a jumping index.
        let idx_at = GuestAddress(avail.wrapping_add(2));
        if let Ok(idx) = mem.read_obj::<u16>(idx_at) {
            let _ = mem.write_obj(idx.wrapping_add(bump), idx_at);
        }
        let _ = block.process_queue();
        hold.store(false, Ordering::Relaxed);
    }
    let _ = block.handle_completions();
    let _ = block.process_queue();
    // A pass that breaks the queue leaves what it submitted to the next wake-up.
    let _ = block.handle_completions();
    assert_eq!(block.in_flight(), 0, "requests left in flight");
}
