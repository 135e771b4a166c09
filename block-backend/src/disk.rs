//! The traits at this crate's boundary: a synchronous disk and an asynchronous one.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::cache::CacheMode;
use crate::error::{Error, Result};
use crate::iobuf::IoBuf;

/// The sector size of the virtio-blk and QEMU world: disk sizes are counted in these.
pub const SECTOR_SIZE: u64 = 512;

/// The most buffers one request may carry (the kernel's `IOV_MAX`).
pub const MAX_BUFFERS: usize = 1024;

/// The total length of a request's buffers, checking their count against [`MAX_BUFFERS`]
/// and the sum against overflow.
pub(crate) fn request_len(bufs: &[IoBuf<'_>]) -> Result<u64> {
    if bufs.len() > MAX_BUFFERS {
        return Err(Error::TooManyBuffers {
            count: bufs.len(),
            max: MAX_BUFFERS,
        });
    }
    IoBuf::total_len(bufs).ok_or(Error::OutOfRange {
        offset: 0,
        len: u64::MAX,
        size: 0,
    })
}

/// What a disk is and what its requests must respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes.
    pub size: u64,
    /// The smallest unit requests should address, in bytes: what a device reports to its
    /// guest as the logical block size (virtio-blk `blk_size`).
    pub logical_block_size: u32,
    /// The host's preferred I/O unit (virtio-blk topology's physical block).
    pub physical_block_size: u32,
    /// Offsets and lengths that are multiples of this go to the host as they are; others go
    /// through a bounce buffer. 1 unless the disk is opened with `O_DIRECT`.
    pub request_alignment: u32,
    /// Buffer addresses that are multiples of this go to the host as they are; others go
    /// through a bounce buffer. 1 unless the disk is opened with `O_DIRECT`.
    pub memory_alignment: u32,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Discard requests punch holes; when false they fail with [`Error::DiscardDisabled`].
    pub discard: bool,
}

impl DiskInfo {
    /// The byte range requests may address: the size rounded up to whole sectors, as QEMU
    /// counts it; reads of the part past the end of the file return zeroes.
    pub fn addressable_size(&self) -> u64 {
        self.size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE
    }

    /// Checks that `len` bytes at `offset` lie inside the disk.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.addressable_size() => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Whether a request at `offset` over `bufs` can go to the host without a bounce buffer.
    pub fn is_aligned(&self, offset: u64, bufs: &[libc::iovec]) -> bool {
        let request_mask = u64::from(self.request_alignment.max(1)) - 1;
        let memory_mask = self.memory_alignment.max(1) as usize - 1;
        offset & request_mask == 0
            && bufs.iter().all(|iov| {
                iov.iov_base as usize & memory_mask == 0 && iov.iov_len as u64 & request_mask == 0
            })
    }
}

/// Counters that show what a disk really did, for tests and tools.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// `fdatasync` calls that reached the host (flushes and durable-write fallbacks).
    pub fdatasyncs: u64,
    /// Flushes with nothing to do: nothing written since the last sync, or no write cache.
    pub clean_flushes: u64,
    /// Flushes ignored because of the cache mode (`unsafe`).
    pub ignored_flushes: u64,
    /// Writes made durable at completion (`RWF_DSYNC`), because the write cache is off.
    pub durable_writes: u64,
    /// Requests that went through an aligned bounce buffer.
    pub bounced_requests: u64,
    /// Reads completed from the page cache without blocking, on the submitting thread.
    pub nowait_reads: u64,
}

/// A disk with blocking I/O: each call returns when the host has done the work.
///
/// Offsets and lengths are in bytes. Every method checks its range against the disk
/// ([`DiskInfo::check_range`]) and the read-only flag, so a caller passing a guest's values
/// straight through gets an error, never an access outside the image.
pub trait SyncDisk: Send + Sync {
    /// What the disk is.
    fn info(&self) -> DiskInfo;

    /// The cache mode the disk was opened with.
    fn cache_mode(&self) -> CacheMode;

    /// Whether the disk has a volatile write cache now: writes may be lost on a host crash
    /// until a flush. Starts as [`CacheMode::write_cache`].
    fn write_cache(&self) -> bool;

    /// Turns the volatile write cache on or off (virtio's `CONFIG_WCE`). Turning it off
    /// first makes everything written so far durable.
    fn set_write_cache(&self, enabled: bool) -> Result<()>;

    /// Reads into `bufs` from `offset`; returns the bytes read (all of them: the part past
    /// the end of the file reads as zeroes).
    fn read_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<usize>;

    /// Writes `bufs` at `offset`; returns the bytes written (all of them).
    fn write_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<usize>;

    /// Makes completed writes durable, as the cache mode defines it.
    fn flush(&self) -> Result<()>;

    /// Deallocates a range; it reads back as zeroes.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes a range read back as zeroes, deallocating it where the host can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// What the disk did so far.
    fn stats(&self) -> DiskStats {
        DiskStats::default()
    }

    /// Reads without blocking if the host can (data already in the page cache). Returns
    /// `None` when the read would block or the disk cannot tell; the caller then does a
    /// normal read.
    fn try_read_nowait(&self, _offset: u64, _bufs: &[IoBuf<'_>]) -> Option<Result<usize>> {
        None
    }
}

/// One request to an [`AsyncDisk`].
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// Read into the buffers from a byte offset.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Where the data goes.
        bufs: &'a [IoBuf<'a>],
    },
    /// Write the buffers at a byte offset.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Where the data comes from.
        bufs: &'a [IoBuf<'a>],
    },
    /// Make completed writes durable.
    Flush,
    /// Deallocate a range.
    Discard {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make a range read back as zeroes.
    WriteZeroes {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The token given with the request.
    pub token: u64,
    /// Bytes transferred (0 for flush, discard and write-zeroes), or what went wrong.
    pub result: Result<usize>,
}

/// Which engine drives an [`AsyncDisk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// Blocking `preadv`/`pwritev` on a pool of worker threads (QEMU's "threads").
    Sync,
    /// io_uring: batched submission, completions in any order.
    IoUring,
}

impl EngineKind {
    /// The engine's name on command lines.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Sync => "sync",
            EngineKind::IoUring => "io_uring",
        }
    }
}

impl std::str::FromStr for EngineKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sync" | "threads" => Ok(EngineKind::Sync),
            "io_uring" | "io-uring" | "uring" => Ok(EngineKind::IoUring),
            _ => Err(Error::UnknownName {
                kind: "engine",
                value: s.to_string(),
                expected: "sync (or threads), io_uring",
            }),
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A disk that keeps many requests in flight: push a batch, submit it, reap completions in
/// any order, and wait on an eventfd in between.
///
/// The usual loop: [`push`](AsyncDisk::push) each request of a batch with a token,
/// [`submit`](AsyncDisk::submit) once, then [`reap`](AsyncDisk::reap) (some requests may
/// complete during `submit`, without signalling the eventfd); when the
/// [`eventfd`](AsyncDisk::eventfd) becomes readable, read it and then reap again.
///
/// Dropping the disk waits for the requests in flight, so the memory they use is never
/// touched after the engine is gone.
pub trait AsyncDisk: Send {
    /// What the disk is.
    fn info(&self) -> DiskInfo;

    /// The engine that runs the requests (it may differ from the one asked for when the
    /// host lacks io_uring).
    fn engine(&self) -> EngineKind;

    /// The synchronous disk underneath, for its cache settings and statistics.
    fn sync_disk(&self) -> &Arc<dyn SyncDisk>;

    /// How many requests may be in flight at once; [`push`](AsyncDisk::push) beyond it fails
    /// with [`Error::QueueFull`].
    fn max_in_flight(&self) -> usize;

    /// Requests pushed and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Queues a request; it starts at the next [`submit`](AsyncDisk::submit). Checks the
    /// request first: a range outside the disk, a write to a read-only disk or too many
    /// buffers is an error here and nothing is queued.
    ///
    /// # Safety
    ///
    /// The memory of every buffer in `request` must stay valid, and must not be accessed
    /// through Rust references, until the request's completion has been reaped or the disk
    /// has been dropped.
    unsafe fn push(&mut self, token: u64, request: Request<'_>) -> Result<()>;

    /// Starts every queued request.
    fn submit(&mut self) -> Result<()>;

    /// Moves finished requests into `completions`, without blocking; returns how many.
    fn reap(&mut self, completions: &mut Vec<Completion>) -> usize;

    /// Becomes readable when completions wait to be reaped.
    fn eventfd(&self) -> &EventFd;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(size: u64) -> DiskInfo {
        DiskInfo {
            size,
            logical_block_size: 512,
            physical_block_size: 4096,
            request_alignment: 512,
            memory_alignment: 512,
            read_only: false,
            discard: true,
        }
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        let disk = info(1000);
        assert_eq!(disk.addressable_size(), 1024);
        assert!(disk.check_range(0, 1024).is_ok());
        assert!(disk.check_range(1024, 0).is_ok());
        assert!(disk.check_range(512, 513).is_err());
        assert!(disk.check_range(u64::MAX, 2).is_err());
        assert!(disk.check_range(2048, 0).is_err());
    }

    #[test]
    fn alignment_covers_offset_address_and_length() {
        let disk = info(1 << 20);
        let buf = crate::iobuf::AlignedBuffer::new(4096, 4096);
        let base = buf.as_slice().as_ptr() as *mut libc::c_void;
        let iov = |offset: usize, len: usize| libc::iovec {
            // SAFETY: only the address is computed; nothing is dereferenced.
            iov_base: unsafe { base.add(offset) },
            iov_len: len,
        };
        assert!(disk.is_aligned(512, &[iov(0, 1024), iov(512, 512)]));
        assert!(!disk.is_aligned(100, &[iov(0, 512)]));
        assert!(!disk.is_aligned(0, &[iov(8, 512)]));
        assert!(!disk.is_aligned(0, &[iov(0, 100)]));
    }

    #[test]
    fn engine_names() {
        assert_eq!("threads".parse::<EngineKind>().unwrap(), EngineKind::Sync);
        assert_eq!(
            "io_uring".parse::<EngineKind>().unwrap(),
            EngineKind::IoUring
        );
        assert!("aio".parse::<EngineKind>().is_err());
    }
}
