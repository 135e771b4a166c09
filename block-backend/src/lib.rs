//! Disk backends for virtual machines: the disk under every virtual disk.
//!
//! `vmkit-block-backend` offers:
//!
//! - two traits at its boundary: [`SyncDisk`], blocking vectored I/O at byte offsets into
//!   guest memory ([`IoBuf`]), with flush, discard, write-zeroes, size, read-only and
//!   alignment; and [`AsyncDisk`], which keeps many requests in flight: push a batch with
//!   tokens, submit it at once, reap completions in any order, wait on an eventfd;
//! - raw images ([`RawDisk`]): regular files and host block devices, with holes punched on
//!   discard, `FALLOC_FL_ZERO_RANGE` for write-zeroes, and QEMU-compatible image locking (a
//!   second writer is refused, QEMU processes included);
//! - qcow2 images ([`Qcow2Disk`]): versions 2 and 3, compressed, zero and subclustered
//!   clusters, backing chains only when asked ([`Backing`]), crash-safe allocating writes;
//! - QEMU's cache modes ([`CacheMode`]) with their semantics, including the run-time switch
//!   of the write cache that virtio's `CONFIG_WCE` needs, and aligned bounce buffers so that
//!   `O_DIRECT` never fails a request for its alignment;
//! - two engines ([`EngineKind`]): a thread pool doing `preadv2`/`pwritev2`, which serves
//!   page-cache hits on the submitting thread, and io_uring, which falls back to the pool
//!   with a logged reason where the host has no io_uring. io_uring runs any disk whose data
//!   lies in a raw file ([`HostMapping`]): raw images, and qcow2's allocated clusters.
//!
//! The format is always given by the caller ([`Format`]), never guessed from the image's
//! content.
//!
//! # Example
//!
//! ```
//! use vmkit_block_backend::{open, CacheMode, Completion, EngineKind, IoBuf, OpenOptions, Request};
//!
//! # fn main() -> Result<(), vmkit_block_backend::Error> {
//! # let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmkit-doc").unwrap();
//! # let path = dir.as_path().join("disk.img");
//! # std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
//! let options = OpenOptions::new().cache(CacheMode::Writeback).engine(EngineKind::IoUring);
//! let mut disk = open(&path, &options)?;
//!
//! let mut data = vec![0xabu8; 4096];
//! let bufs = [IoBuf::from_mut_slice(&mut data)];
//! // SAFETY: `data` outlives the request: we reap its completion below.
//! unsafe { disk.push(1, Request::Write { offset: 8192, bufs: &bufs })? };
//! unsafe { disk.push(2, Request::Flush)? };
//! disk.submit()?;
//!
//! let mut completions: Vec<Completion> = Vec::new();
//! while completions.len() < 2 {
//!     if disk.reap(&mut completions) == 0 {
//!         let _ = disk.eventfd().read(); // a real loop polls the eventfd
//!     }
//! }
//! assert!(completions.iter().all(|c| c.result.is_ok()));
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod cache;
pub mod disk;
pub mod engine;
pub mod error;
pub mod iobuf;
mod lock;
pub mod qcow2;
pub mod raw;

use std::path::Path;
use std::sync::Arc;

pub use cache::CacheMode;
pub use disk::{
    AsyncDisk, Completion, DiskInfo, DiskStats, EngineKind, Request, SyncDisk, MAX_BUFFERS,
    SECTOR_SIZE,
};
pub use engine::pool::ThreadPoolEngine;
pub use engine::uring::{HostMapping, UringEngine};
pub use error::{Error, Result};
pub use iobuf::{AlignedBuffer, IoBuf};
pub use qcow2::{Backing, Qcow2Disk, Qcow2Options};
pub use raw::{RawDisk, RawKind, RawOptions};

/// An image format. Always given by the caller: probing a guest-writable image for its
/// format lets a guest choose how the host reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Format {
    /// The image is the disk, byte for byte.
    #[default]
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl Format {
    /// The format's name, as QEMU spells it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::UnknownName {
                kind: "format",
                value: s.to_string(),
                expected: "raw, qcow2",
            }),
        }
    }
}

/// How to open a disk.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// The image format.
    pub format: Format,
    /// The cache mode.
    pub cache: CacheMode,
    /// The engine for [`open`].
    pub engine: EngineKind,
    /// Open read-only.
    pub read_only: bool,
    /// Let discard requests punch holes (QEMU's `discard=unmap`).
    pub discard: bool,
    /// Take QEMU-compatible image locks (QEMU's `file.locking`).
    pub locking: bool,
    /// Requests an [`AsyncDisk`] keeps in flight at most (io_uring takes at most 4096).
    pub max_in_flight: usize,
    /// Worker threads of the sync engine at most. (The io_uring engine keeps a few of its
    /// own for the requests it does not put in the ring.)
    pub threads: usize,
    /// The backing file of a qcow2 image; none unless asked for ([`Backing`]).
    pub backing: Backing,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: Format::Raw,
            cache: CacheMode::Writeback,
            engine: EngineKind::IoUring,
            read_only: false,
            discard: true,
            locking: true,
            max_in_flight: 256,
            threads: engine::pool::DEFAULT_THREADS,
            backing: Backing::None,
        }
    }
}

impl OpenOptions {
    /// The defaults: raw, writeback, io_uring, read-write, discard on, locking on.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the format.
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Sets the cache mode.
    pub fn cache(mut self, cache: CacheMode) -> Self {
        self.cache = cache;
        self
    }

    /// Sets the engine.
    pub fn engine(mut self, engine: EngineKind) -> Self {
        self.engine = engine;
        self
    }

    /// Opens read-only or not.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Turns discard on or off.
    pub fn discard(mut self, discard: bool) -> Self {
        self.discard = discard;
        self
    }

    /// Turns image locking on or off.
    pub fn locking(mut self, locking: bool) -> Self {
        self.locking = locking;
        self
    }

    /// Sets how many requests may be in flight.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight;
        self
    }

    /// Sets the sync engine's thread limit.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Sets the backing file of a qcow2 image.
    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    fn raw_options(&self) -> RawOptions {
        RawOptions {
            cache: self.cache,
            read_only: self.read_only,
            discard: self.discard,
            locking: self.locking,
        }
    }
}

/// Opens a disk for blocking I/O.
pub fn open_sync(path: &Path, options: &OpenOptions) -> Result<Arc<dyn SyncDisk>> {
    match options.format {
        Format::Raw => Ok(open_raw(path, options)?),
        Format::Qcow2 => Ok(open_qcow2(path, options)?),
    }
}

/// Opens a disk for asynchronous I/O on the engine the options name. Where io_uring is
/// unavailable, the sync engine runs instead and the reason is logged; [`AsyncDisk::engine`]
/// tells which engine runs.
pub fn open(path: &Path, options: &OpenOptions) -> Result<Box<dyn AsyncDisk>> {
    match options.format {
        Format::Raw => engine_for(&open_raw(path, options)?, path, options),
        Format::Qcow2 => engine_for(&open_qcow2(path, options)?, path, options),
    }
}

/// Opens a disk once and gives `count` asynchronous disks on it, one per device queue: each
/// has its own engine (ring or pool) and its own requests in flight, while the open file, its
/// image locks and its write-cache state are shared.
pub fn open_queues(
    path: &Path,
    options: &OpenOptions,
    count: usize,
) -> Result<Vec<Box<dyn AsyncDisk>>> {
    if options.format == Format::Qcow2 {
        let disk = open_qcow2(path, options)?;
        return (0..count.max(1))
            .map(|_| engine_for(&disk, path, options))
            .collect();
    }
    let raw = open_raw(path, options)?;
    (0..count.max(1))
        .map(|_| engine_for(&raw, path, options))
        .collect()
}

fn open_qcow2(path: &Path, options: &OpenOptions) -> Result<Arc<Qcow2Disk>> {
    let qcow2 = Qcow2Options {
        raw: options.raw_options(),
        backing: options.backing.clone(),
    };
    Ok(Arc::new(Qcow2Disk::open(path, &qcow2)?))
}

fn open_raw(path: &Path, options: &OpenOptions) -> Result<Arc<RawDisk>> {
    match options.format {
        Format::Raw => Ok(Arc::new(RawDisk::open(path, options.raw_options())?)),
        Format::Qcow2 => Err(Error::UnsupportedFormat(
            "qcow2 images are not raw files (open_qcow2)".to_string(),
        )),
    }
}

fn engine_for<D: HostMapping + 'static>(
    disk: &Arc<D>,
    path: &Path,
    options: &OpenOptions,
) -> Result<Box<dyn AsyncDisk>> {
    if options.engine == EngineKind::IoUring {
        match UringEngine::for_disk(disk.clone(), options.max_in_flight) {
            Ok(engine) => return Ok(Box::new(engine)),
            Err(e) => log::warn!(
                "{}: io_uring is unavailable ({e}); using the sync engine",
                path.display()
            ),
        }
    }
    Ok(Box::new(ThreadPoolEngine::new(
        disk.clone(),
        options.threads,
        options.max_in_flight,
    )?))
}
