//! Raw images: a regular file or a host block device, byte for byte the guest's disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::cache::CacheMode;
use crate::disk::{request_len, DiskInfo, DiskStats, SyncDisk, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::iobuf::{copy_from_iovecs, copy_into_iovecs, zero_iovecs, AlignedBuffer, IoBuf};
use crate::lock::{lock_image, LockError};

// Block-device ioctls from <linux/fs.h> that the libc crate does not define.
/// `_IOR(0x12, 114, size_t)`: the device size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)`: the logical block size.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `_IO(0x12, 123)`: the physical block size.
const BLKPBSZGET: libc::c_ulong = 0x127b;
/// `_IO(0x12, 119)`: discard a byte range given as `[u64; 2]`.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Bounce buffers are used in pieces of at most this size, so a guest's request size never
/// decides how much the VMM allocates.
const BOUNCE_CHUNK: usize = 1 << 20;

/// What the image is on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawKind {
    /// A regular file.
    File,
    /// A host block device.
    BlockDevice,
}

/// How to open a raw image.
#[derive(Clone, Copy, Debug)]
pub struct RawOptions {
    /// The cache mode.
    pub cache: CacheMode,
    /// Open read-only.
    pub read_only: bool,
    /// Let discard punch holes.
    pub discard: bool,
    /// Take QEMU-compatible image locks.
    pub locking: bool,
}

impl Default for RawOptions {
    fn default() -> Self {
        RawOptions {
            cache: CacheMode::default(),
            read_only: false,
            discard: true,
            locking: true,
        }
    }
}

#[derive(Default)]
struct Counters {
    fdatasyncs: AtomicU64,
    clean_flushes: AtomicU64,
    ignored_flushes: AtomicU64,
    durable_writes: AtomicU64,
    bounced_requests: AtomicU64,
    nowait_reads: AtomicU64,
}

/// A raw image: a regular file or a host block device.
pub struct RawDisk {
    file: File,
    path: PathBuf,
    kind: RawKind,
    info: DiskInfo,
    cache: CacheMode,
    write_cache: AtomicBool,
    /// Cleared when the host rejects `RWF_DSYNC`; durable writes then use `fdatasync`.
    dsync_flag_works: AtomicBool,
    /// Cleared when the host rejects `RWF_NOWAIT`.
    nowait_works: AtomicBool,
    /// Cleared when the host cannot do `FALLOC_FL_ZERO_RANGE` on this image.
    zero_range_works: AtomicBool,
    /// Bumped when a write, discard or write-zeroes completes.
    write_generation: AtomicU64,
    /// The write generation the last successful `fdatasync` covered: a flush with nothing
    /// written since has nothing to do (QEMU skips it too).
    synced_generation: AtomicU64,
    /// Serialises read-modify-write cycles of unaligned `O_DIRECT` writes.
    read_modify_write: Mutex<()>,
    counters: Counters,
}

impl std::fmt::Debug for RawDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDisk")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("info", &self.info)
            .field("cache", &self.cache)
            .finish()
    }
}

fn open_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// `ioctl` that returns a value through a pointer.
///
/// # Safety
///
/// `request` must be an ioctl that writes exactly one `T` through its argument.
unsafe fn ioctl_read<T: Default>(fd: RawFd, request: libc::c_ulong) -> io::Result<T> {
    let mut value = T::default();
    // SAFETY: the caller guarantees the ioctl writes one T; `value` is a valid T.
    let ret = unsafe { libc::ioctl(fd, request, &mut value as *mut T) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// `statx`'s direct-I/O alignments of an open file: (memory, offset), 0 when unknown.
fn direct_io_alignment(file: &File) -> (u32, u32) {
    // SAFETY: statx is plain data; all-zero is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH names the open fd; `stx` is a valid buffer.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret < 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return (0, 0);
    }
    (stx.stx_dio_mem_align, stx.stx_dio_offset_align)
}

impl RawDisk {
    /// Opens a raw image.
    pub fn open(path: &Path, options: RawOptions) -> Result<RawDisk> {
        let mut flags = libc::O_CLOEXEC;
        if options.cache.direct() {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(open_error(path))?;
        let metadata = file.metadata().map_err(open_error(path))?;
        let file_type = metadata.file_type();
        let kind = if file_type.is_file() {
            RawKind::File
        } else if file_type.is_block_device() {
            RawKind::BlockDevice
        } else {
            return Err(Error::NotADisk {
                path: path.to_path_buf(),
            });
        };

        if options.locking {
            lock_image(&file, options.read_only).map_err(|e| match e {
                LockError::Conflict(permission) => Error::Locked {
                    path: path.to_path_buf(),
                    permission,
                },
                LockError::Io(source) => Error::Open {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        }

        let fd = file.as_raw_fd();
        let (size, logical, physical) = match kind {
            RawKind::File => (
                metadata.len(),
                SECTOR_SIZE as u32,
                metadata_block_size(&metadata),
            ),
            RawKind::BlockDevice => {
                // SAFETY: BLKGETSIZE64 writes a u64; BLKSSZGET and BLKPBSZGET write an int.
                let size =
                    unsafe { ioctl_read::<u64>(fd, BLKGETSIZE64) }.map_err(open_error(path))?;
                // SAFETY: as above.
                let logical = unsafe { ioctl_read::<libc::c_int>(fd, BLKSSZGET) }
                    .map_err(open_error(path))?;
                // SAFETY: as above.
                let physical =
                    unsafe { ioctl_read::<libc::c_int>(fd, BLKPBSZGET) }.unwrap_or(logical);
                (
                    size,
                    logical.max(512) as u32,
                    physical.max(logical).max(512) as u32,
                )
            }
        };

        let (request_alignment, memory_alignment) = if options.cache.direct() {
            let (memory, offset) = direct_io_alignment(&file);
            let offset = if offset == 0 { logical } else { offset };
            let memory = if memory == 0 { 4096 } else { memory };
            (offset.max(1), memory.max(1))
        } else {
            (1, 1)
        };
        // A guest must not be told blocks smaller than what O_DIRECT can address.
        let logical = logical.max(request_alignment);

        Ok(RawDisk {
            file,
            path: path.to_path_buf(),
            kind,
            info: DiskInfo {
                size,
                logical_block_size: logical,
                physical_block_size: physical.max(logical),
                request_alignment,
                memory_alignment,
                read_only: options.read_only,
                discard: options.discard,
            },
            cache: options.cache,
            write_cache: AtomicBool::new(options.cache.write_cache()),
            dsync_flag_works: AtomicBool::new(true),
            nowait_works: AtomicBool::new(true),
            zero_range_works: AtomicBool::new(true),
            write_generation: AtomicU64::new(0),
            synced_generation: AtomicU64::new(0),
            read_modify_write: Mutex::new(()),
            counters: Counters::default(),
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image is a file or a block device.
    pub fn kind(&self) -> RawKind {
        self.kind
    }

    /// The open file, for engines that submit I/O on it themselves.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The `RWF_*` flags a write needs now: `RWF_DSYNC` while the write cache is off, when
    /// the host supports it.
    pub fn write_flags(&self) -> libc::c_int {
        if !self.write_cache.load(Ordering::Relaxed)
            && self.dsync_flag_works.load(Ordering::Relaxed)
        {
            libc::RWF_DSYNC
        } else {
            0
        }
    }

    /// Records work an engine did on the file itself, so [`SyncDisk::stats`] covers it.
    pub fn record_durable_write(&self) {
        self.counters.durable_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a write, discard or write-zeroes that an engine completed itself, so the
    /// next flush knows it has work.
    pub fn record_write(&self) {
        self.write_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The current write generation, to pass to [`record_sync`](Self::record_sync) when an
    /// engine's own `fdatasync` that started now completes.
    pub fn write_generation(&self) -> u64 {
        self.write_generation.load(Ordering::SeqCst)
    }

    /// Records an `fdatasync` an engine issued itself, started at write generation
    /// `generation`.
    pub fn record_sync(&self, generation: u64) {
        self.counters.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        self.synced_generation
            .fetch_max(generation, Ordering::SeqCst);
    }

    /// Records a flush that had nothing to do.
    pub fn record_clean_flush(&self) {
        self.counters.clean_flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a flush ignored because of the cache mode.
    pub fn record_ignored_flush(&self) {
        self.counters
            .ignored_flushes
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a flush must reach `fdatasync` now: the cache mode honours flushes, the
    /// write cache is on, and something was written since the last sync.
    pub fn flush_needs_sync(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed) && self.has_unsynced_writes()
    }

    /// Whether something was written since the last sync, in a mode that honours flushes.
    fn has_unsynced_writes(&self) -> bool {
        !self.cache.ignores_flush()
            && self.write_generation.load(Ordering::SeqCst)
                != self.synced_generation.load(Ordering::SeqCst)
    }

    fn check_writable(&self) -> Result<()> {
        if self.info.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    fn fdatasync(&self) -> Result<()> {
        let generation = self.write_generation();
        // SAFETY: fdatasync on an fd we own.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } < 0 {
            self.counters.fdatasyncs.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Io(io::Error::last_os_error()));
        }
        self.record_sync(generation);
        Ok(())
    }

    /// `preadv2` until `len` bytes are read or the file ends; the rest reads as zeroes.
    fn read_all(&self, offset: u64, iovecs: &[libc::iovec], len: usize) -> Result<usize> {
        let mut done = 0usize;
        let mut adjusted: Vec<libc::iovec> = Vec::new();
        while done < len {
            let current: &[libc::iovec] = if done == 0 { iovecs } else { &adjusted };
            // SAFETY: every iovec is valid for writes of its length (IoBuf's contract);
            // the count is at most MAX_BUFFERS.
            let ret = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    current.as_ptr(),
                    current.len() as libc::c_int,
                    (offset + done as u64) as libc::off_t,
                    0,
                )
            };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io(err));
            }
            if ret == 0 {
                zero_iovecs(iovecs, done);
                return Ok(len);
            }
            done += ret as usize;
            adjusted = advance(iovecs, done);
        }
        Ok(len)
    }

    /// `pwritev2` until all of `len` bytes are written.
    fn write_all(&self, offset: u64, iovecs: &[libc::iovec], len: usize) -> Result<usize> {
        let flags = self.write_flags();
        let mut done = 0usize;
        let mut adjusted: Vec<libc::iovec> = Vec::new();
        while done < len {
            let current: &[libc::iovec] = if done == 0 { iovecs } else { &adjusted };
            // SAFETY: every iovec is valid for reads of its length; the count is bounded.
            let ret = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    current.as_ptr(),
                    current.len() as libc::c_int,
                    (offset + done as u64) as libc::off_t,
                    flags,
                )
            };
            if ret < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) if flags & libc::RWF_DSYNC != 0 => {
                        log::warn!(
                            "{}: the host rejects RWF_DSYNC ({err}); durable writes use fdatasync",
                            self.path.display()
                        );
                        self.dsync_flag_works.store(false, Ordering::Relaxed);
                        return self.write_all(offset, iovecs, len);
                    }
                    _ => return Err(Error::Io(err)),
                }
            }
            if ret == 0 {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the host wrote nothing",
                )));
            }
            done += ret as usize;
            adjusted = advance(iovecs, done);
        }
        self.record_write();
        if !self.write_cache.load(Ordering::Relaxed) {
            self.counters.durable_writes.fetch_add(1, Ordering::Relaxed);
            if flags & libc::RWF_DSYNC == 0 {
                self.fdatasync()?;
            }
        }
        Ok(len)
    }

    /// The aligned range around a request, and a bounce buffer for one piece of it.
    fn bounce_plan(&self, offset: u64, len: usize) -> (u64, u64, AlignedBuffer) {
        let align = u64::from(self.info.request_alignment);
        let start = offset / align * align;
        let end = (offset + len as u64).div_ceil(align) * align;
        let chunk = ((end - start) as usize).min(BOUNCE_CHUNK);
        (
            start,
            end,
            AlignedBuffer::new(chunk, self.info.memory_alignment as usize),
        )
    }

    fn bounced_read(&self, offset: u64, iovecs: &[libc::iovec], len: usize) -> Result<usize> {
        self.counters
            .bounced_requests
            .fetch_add(1, Ordering::Relaxed);
        let (start, end, mut bounce) = self.bounce_plan(offset, len);
        let mut chunk_start = start;
        while chunk_start < end {
            let chunk_len = ((end - chunk_start) as usize).min(bounce.as_slice().len());
            let chunk = &mut bounce.as_mut_slice()[..chunk_len];
            let chunk_iov = [libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk_len,
            }];
            self.read_all(chunk_start, &chunk_iov, chunk_len)?;
            // The part of this chunk that the request wants.
            let want_start = offset.max(chunk_start);
            let want_end = (offset + len as u64).min(chunk_start + chunk_len as u64);
            let src =
                &chunk[(want_start - chunk_start) as usize..(want_end - chunk_start) as usize];
            copy_into_iovecs(iovecs, (want_start - offset) as usize, src);
            chunk_start += chunk_len as u64;
        }
        Ok(len)
    }

    fn bounced_write(&self, offset: u64, iovecs: &[libc::iovec], len: usize) -> Result<usize> {
        self.counters
            .bounced_requests
            .fetch_add(1, Ordering::Relaxed);
        let (start, end, mut bounce) = self.bounce_plan(offset, len);
        // Unaligned edges are read, patched and written back: serialise those cycles so
        // two of them on the same block cannot undo each other.
        let _rmw = self
            .read_modify_write
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut chunk_start = start;
        while chunk_start < end {
            let chunk_len = ((end - chunk_start) as usize).min(bounce.as_slice().len());
            let chunk_end = chunk_start + chunk_len as u64;
            let want_start = offset.max(chunk_start);
            let want_end = (offset + len as u64).min(chunk_end);
            let chunk = &mut bounce.as_mut_slice()[..chunk_len];
            let chunk_iov = [libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk_len,
            }];
            if want_start > chunk_start || want_end < chunk_end {
                self.read_all(chunk_start, &chunk_iov, chunk_len)?;
            }
            let dst =
                &mut chunk[(want_start - chunk_start) as usize..(want_end - chunk_start) as usize];
            copy_from_iovecs(iovecs, (want_start - offset) as usize, dst);
            self.write_all(chunk_start, &chunk_iov, chunk_len)?;
            chunk_start = chunk_end;
        }
        Ok(len)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        loop {
            // SAFETY: fallocate on an fd we own with plain integer arguments.
            let ret = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Writes zeroes the slow way, through aligned buffers.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = (len as usize).min(BOUNCE_CHUNK);
        let mut zeroes = AlignedBuffer::new(chunk, self.info.memory_alignment.max(4096) as usize);
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(chunk);
            let bufs = [IoBuf::from_mut_slice(&mut zeroes.as_mut_slice()[..n])];
            self.write_vectored(offset + done, &bufs)?;
            done += n as u64;
        }
        Ok(())
    }

    /// After a discard or write-zeroes: with the write cache off it must be durable too.
    fn sync_if_write_through(&self) -> Result<()> {
        self.record_write();
        if !self.write_cache.load(Ordering::Relaxed) {
            self.fdatasync()?;
        }
        Ok(())
    }
}

fn metadata_block_size(metadata: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    (metadata.blksize() as u32).clamp(512, 1 << 20)
}

/// The iovecs that remain after `done` bytes.
fn advance(iovecs: &[libc::iovec], mut done: usize) -> Vec<libc::iovec> {
    let mut rest = Vec::with_capacity(iovecs.len());
    for iov in iovecs {
        if done >= iov.iov_len {
            done -= iov.iov_len;
            continue;
        }
        rest.push(libc::iovec {
            // SAFETY: done < iov_len, so the pointer stays inside the buffer.
            iov_base: unsafe { iov.iov_base.cast::<u8>().add(done).cast() },
            iov_len: iov.iov_len - done,
        });
        done = 0;
    }
    rest
}

impl SyncDisk for RawDisk {
    fn info(&self) -> DiskInfo {
        self.info
    }

    fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    fn set_write_cache(&self, enabled: bool) -> Result<()> {
        let was = self.write_cache.swap(enabled, Ordering::SeqCst);
        if was && !enabled && self.has_unsynced_writes() {
            // What was written into the cache must be durable before the guest is told
            // that writes now are.
            self.fdatasync()?;
        }
        Ok(())
    }

    fn read_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<usize> {
        let len = request_len(bufs)?;
        self.info.check_range(offset, len)?;
        let iovecs = IoBuf::as_iovecs(bufs);
        if self.info.is_aligned(offset, iovecs) {
            self.read_all(offset, iovecs, len as usize)
        } else {
            self.bounced_read(offset, iovecs, len as usize)
        }
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<usize> {
        self.check_writable()?;
        let len = request_len(bufs)?;
        self.info.check_range(offset, len)?;
        let iovecs = IoBuf::as_iovecs(bufs);
        if self.info.is_aligned(offset, iovecs) {
            self.write_all(offset, iovecs, len as usize)
        } else {
            self.bounced_write(offset, iovecs, len as usize)
        }
    }

    fn flush(&self) -> Result<()> {
        if self.cache.ignores_flush() {
            self.record_ignored_flush();
            return Ok(());
        }
        if !self.flush_needs_sync() {
            // Nothing written since the last sync, or every write was durable at its
            // completion: nothing is left to flush.
            self.record_clean_flush();
            return Ok(());
        }
        self.fdatasync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if !self.info.discard {
            return Err(Error::DiscardDisabled);
        }
        self.info.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.kind {
            RawKind::File => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                match self.fallocate(mode, offset, len) {
                    Ok(()) => {}
                    // Discard is a hint: a filesystem without holes keeps the data.
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
                    Err(e) => return Err(Error::Io(e)),
                }
            }
            RawKind::BlockDevice => {
                let block = u64::from(self.info.logical_block_size);
                // The device discards whole blocks only; partial blocks keep their data.
                let start = offset.div_ceil(block) * block;
                let end = (offset + len) / block * block;
                if end > start {
                    let range = [start, end - start];
                    // SAFETY: BLKDISCARD reads a [u64; 2] range from the pointer.
                    let ret =
                        unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
                    if ret < 0 {
                        let err = io::Error::last_os_error();
                        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                            return Err(Error::Io(err));
                        }
                    }
                }
            }
        }
        self.sync_if_write_through()
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.info.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let aligned = offset % u64::from(self.info.logical_block_size) == 0
            && len % u64::from(self.info.logical_block_size) == 0;
        if self.zero_range_works.load(Ordering::Relaxed) && (aligned || self.kind == RawKind::File)
        {
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len) {
                Ok(()) => return self.sync_if_write_through(),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                    ) =>
                {
                    log::info!(
                        "{}: FALLOC_FL_ZERO_RANGE is not supported here ({e}); writing zeroes",
                        self.path.display()
                    );
                    self.zero_range_works.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(Error::Io(e)),
            }
        }
        self.write_zero_buffers(offset, len)
    }

    fn stats(&self) -> DiskStats {
        let c = &self.counters;
        DiskStats {
            fdatasyncs: c.fdatasyncs.load(Ordering::Relaxed),
            clean_flushes: c.clean_flushes.load(Ordering::Relaxed),
            ignored_flushes: c.ignored_flushes.load(Ordering::Relaxed),
            durable_writes: c.durable_writes.load(Ordering::Relaxed),
            bounced_requests: c.bounced_requests.load(Ordering::Relaxed),
            nowait_reads: c.nowait_reads.load(Ordering::Relaxed),
        }
    }

    fn try_read_nowait(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Option<Result<usize>> {
        if self.cache.direct() || !self.nowait_works.load(Ordering::Relaxed) {
            return None;
        }
        let len = match request_len(bufs).and_then(|len| {
            self.info.check_range(offset, len)?;
            Ok(len)
        }) {
            Ok(len) => len as usize,
            Err(e) => return Some(Err(e)),
        };
        let iovecs = IoBuf::as_iovecs(bufs);
        // SAFETY: every iovec is valid for writes of its length; the count is bounded.
        let ret = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if ret < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                self.nowait_works.store(false, Ordering::Relaxed);
            }
            return None;
        }
        // A short read may be a partly cached range or the end of the file: the blocking
        // path sorts those out.
        if ret as usize != len {
            return None;
        }
        self.counters.nowait_reads.fetch_add(1, Ordering::Relaxed);
        Some(Ok(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_skips_whole_and_partial_buffers() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 4];
        let bufs = [IoBuf::from_mut_slice(&mut a), IoBuf::from_mut_slice(&mut b)];
        let rest = advance(IoBuf::as_iovecs(&bufs), 6);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].iov_len, 2);
        assert_eq!(rest[0].iov_base as usize, bufs[1].as_ptr() as usize + 2);
        assert!(advance(IoBuf::as_iovecs(&bufs), 8).is_empty());
    }
}
