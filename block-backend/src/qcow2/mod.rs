//! qcow2 images: QEMU's copy-on-write format, as a [`SyncDisk`] over the image file.
//!
//! The image is hostile: every header field, table entry, offset and size is checked before
//! use, allocations are bounded by caps that do not depend on the image (the header's
//! tables are checked against the file size; L2 tables and compressed clusters are at most
//! a few clusters of 2 MiB at most), and a bad value is an error naming what is wrong, never
//! a panic.
//!
//! Backing files are opened only when the caller asks ([`Backing`]), with their format given
//! explicitly: by the caller, or by the image's backing format extension when the caller
//! asks to follow the image ([`Backing::FromImage`]); never probed. Chains are at most
//! [`MAX_BACKING_DEPTH`] images deep and loops are refused.
//!
//! The file is read and written with `pread`/`pwrite` at host offsets on a [`RawDisk`] that
//! carries the cache mode, the image locks, the write-cache state and flushes. With the
//! `O_DIRECT` cache modes (none, directsync) requests that do not meet the file's alignment
//! (table entries, refcounts, unaligned guest requests) are bounced through aligned buffers
//! (see `io`).
//!
//! Writes never land on the image's own metadata: before a cluster is used as data, or a
//! table is written, its host range is checked against the header, the L1 table, the
//! refcount table and blocks and the L2 tables the L1 table names (QEMU's
//! `overlap-check=cached`, with every L2 table rather than the cached ones). An overlap
//! fails the request and marks the image corrupt: it takes no more writes, and (version 3)
//! its header's corrupt bit is set, as QEMU sets it, so that no program opens it read-write
//! again until it is repaired.
//!
//! Both asynchronous engines run qcow2 disks. With io_uring, reads of allocated clusters
//! and in-place overwrites go into the ring at their host offsets ([`HostMapping`]); the
//! rest runs on the engine's helper threads through this driver.

pub mod check;
pub mod create;
pub mod error;
pub mod header;

mod compress;
mod io;
mod write;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use check::{check, map, read_header, CheckReport, MapExtent};
pub use create::create;
pub use error::Qcow2Error;
pub use header::{CompressionType, Header};

use crate::cache::CacheMode;
use crate::disk::{request_len, DiskInfo, DiskStats, SyncDisk};
use crate::engine::uring::HostMapping;
use crate::error::{Error, Result};
use crate::iobuf::{copy_into_iovecs, IoBuf};
use crate::raw::{RawDisk, RawOptions};
use crate::Format;

/// The longest backing chain followed, the top image included.
pub const MAX_BACKING_DEPTH: usize = 16;
/// Bytes of L2 tables kept in memory per image, at most (but always at least two tables).
pub const L2_CACHE_BYTES: u64 = 4 << 20;

/// The most bytes of adjacent data clusters read at once (the size of the bounce buffer).
const MAX_DATA_RUN: u64 = 1 << 20;
/// Offset bits 9-55 of L1 and L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits 9-63 of refcount table entries.
const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// The cluster's refcount is exactly 1: it may be written in place.
const COPIED: u64 = 1 << 63;
/// The L2 entry describes a compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeroes (version 3, standard L2 entries).
const ZERO: u64 = 1;

/// Which backing file an image reads its unallocated clusters from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// None: an image that names a backing file is refused, since reading it without its
    /// backing file would show wrong data.
    #[default]
    None,
    /// The backing file the image names, in the format its backing format extension gives
    /// (an image without one is refused: formats are never probed), and so on down the
    /// chain. Relative names are relative to the image's directory.
    FromImage,
    /// This file in this format; its own backing files, if any, are followed as with
    /// [`Backing::FromImage`].
    File {
        /// The backing file.
        path: PathBuf,
        /// Its format.
        format: Format,
    },
}

/// How to open a qcow2 image.
#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    /// How to open the image file: cache mode, read-only, discard, locking.
    pub raw: RawOptions,
    /// The backing file.
    pub backing: Backing,
}

/// Where a guest byte lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mapping {
    /// Not allocated in this image: the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// At this host offset.
    Data(u64),
    /// In the compressed cluster this L2 entry describes.
    Compressed(u64),
}

/// A small LRU of L2 tables, keyed by host offset. Extended L2 tables hold two words per
/// entry (the entry, then its subcluster bitmap).
struct L2Cache {
    tables: Vec<(u64, Vec<u64>, u64)>,
    capacity: usize,
    clock: u64,
}

impl L2Cache {
    fn new(cluster_size: u64) -> Self {
        let capacity = (L2_CACHE_BYTES / cluster_size).clamp(2, 32) as usize;
        L2Cache {
            tables: Vec::with_capacity(capacity),
            capacity,
            clock: 0,
        }
    }

    fn position(&mut self, offset: u64) -> Option<usize> {
        self.clock = self.clock.wrapping_add(1);
        let clock = self.clock;
        let index = self.tables.iter().position(|(o, _, _)| *o == offset)?;
        if let Some(entry) = self.tables.get_mut(index) {
            entry.2 = clock;
        }
        Some(index)
    }

    fn insert(&mut self, offset: u64, table: Vec<u64>) -> usize {
        if self.tables.len() >= self.capacity {
            if let Some(oldest) = self
                .tables
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(i, _)| i)
            {
                // Tables are written through on every change: dropping one loses nothing.
                self.tables.swap_remove(oldest);
            }
        }
        self.tables.push((offset, table, self.clock));
        self.tables.len() - 1
    }
}

/// The metadata held in memory, behind one lock.
struct Meta {
    /// The L1 table, as in the file.
    l1: Vec<u64>,
    l2_cache: L2Cache,
    /// The refcount table (loaded for read-write images only).
    reftable: Vec<u64>,
    /// Where the refcount table is (it moves when it grows).
    reftable_offset: u64,
    /// The size of the image file: new clusters go here.
    file_end: u64,
    /// Autoclear bits still to clear before the first write.
    header_dirty_autoclear: bool,
    /// Host clusters of the refcount blocks the refcount table names (read-write images).
    refblocks: HashSet<u64>,
    /// Host clusters of the L2 tables the L1 table names (read-write images).
    l2_tables: HashSet<u64>,
    /// Set when a write would have overwritten metadata: no more writes.
    corrupt: bool,
}

/// A qcow2 image.
pub struct Qcow2Disk {
    raw: Arc<RawDisk>,
    path: PathBuf,
    header: Header,
    info: DiskInfo,
    backing: Option<Arc<dyn SyncDisk>>,
    meta: Mutex<Meta>,
    /// The last compressed cluster read (its L2 entry and data), for sequential reads of
    /// pieces of one compressed cluster.
    last_compressed: Mutex<Option<(u64, Vec<u8>)>>,
    /// Whether the host supports `RWF_NOWAIT` reads.
    nowait_works: AtomicBool,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("info", &self.info)
            .field("backing", &self.backing.is_some())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Metadata is written through to the file before the in-memory copy changes, so a
    // panic elsewhere leaves nothing inconsistent behind the lock.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The host range of a compressed cluster's data in an image of `cluster_bits`: (offset,
/// length), length at most two clusters.
fn compressed_range(cluster_bits: u32, entry: u64) -> (u64, u64) {
    // The descriptor splits bits 0-61 at x = 62 - (cluster_bits - 8): the host offset
    // below x, the number of additional 512-byte sectors above.
    let x = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << x) - 1);
    let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// Big-endian 64-bit table entries.
fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        })
        .collect()
}

/// Zeroes `len` bytes of the buffers from `skip` on.
fn zero_range(iovecs: &[libc::iovec], skip: usize, len: usize) {
    static ZEROES: [u8; 4096] = [0; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROES.len());
        copy_into_iovecs(iovecs, skip + done, ZEROES.get(..n).unwrap_or(&[]));
        done += n;
    }
}

impl Qcow2Disk {
    /// Opens a qcow2 image and, if the options ask for it, its backing chain.
    pub fn open(path: &Path, options: &Qcow2Options) -> Result<Qcow2Disk> {
        Self::open_in_chain(path, options, &mut HashSet::new())
    }

    fn open_in_chain(
        path: &Path,
        options: &Qcow2Options,
        chain: &mut HashSet<PathBuf>,
    ) -> Result<Qcow2Disk> {
        let q = |e: Qcow2Error| e.at(path);
        enter_chain(path, chain)?;
        let raw = RawDisk::open(path, options.raw)?;
        let file_size = raw.info().size;

        // The header, its extensions and the backing name lie in the first cluster, at
        // most 2 MiB.
        let mut first = vec![0u8; file_size.min(1 << header::MAX_CLUSTER_BITS) as usize];
        io::read(&raw, 0, &mut first)?;
        let header = Header::parse(&first, file_size).map_err(q)?;
        drop(first);
        let cluster_size = header.cluster_size();

        let read_only = options.raw.read_only;
        if !read_only {
            let refuse = if header.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
                Some(
                    "it is marked corrupt (incompatible bit 1): open it read-only, or repair \
                     it with qemu-img check -r all",
                )
            } else if header.incompatible_features & header::INCOMPAT_DIRTY != 0 {
                Some(
                    "it is dirty (lazy refcounts not written back): repair it with qemu-img \
                     check -r all",
                )
            } else if header.nb_snapshots != 0 {
                Some("it has internal snapshots, which writing does not support yet")
            } else if !write::SUPPORTED {
                Some("writing qcow2 images is not implemented yet")
            } else {
                None
            };
            if let Some(reason) = refuse {
                return Err(q(Qcow2Error::NotWritable(reason)));
            }
        }

        // Bounded by the header checks: at most 32 MiB, inside the file.
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        io::read(&raw, header.l1_table_offset, &mut l1_bytes)?;
        let l1 = decode_table(&l1_bytes);
        drop(l1_bytes);

        let reftable = if read_only {
            Vec::new()
        } else {
            // Bounded by the header checks: at most 8 MiB, inside the file.
            let mut bytes =
                vec![0u8; header.refcount_table_clusters as usize * cluster_size as usize];
            io::read(&raw, header.refcount_table_offset, &mut bytes)?;
            decode_table(&bytes)
        };

        let backing = open_backing(path, &header, options, chain)?;

        // The metadata clusters writes must not overwrite (only written images need them).
        let bits = header.cluster_bits;
        let refblocks = reftable
            .iter()
            .map(|&e| e & REFTABLE_OFFSET_MASK)
            .filter(|&b| b != 0)
            .map(|b| b >> bits)
            .collect();
        let l2_tables = if read_only {
            HashSet::new()
        } else {
            l1.iter()
                .map(|&e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| o >> bits)
                .collect()
        };

        let info = DiskInfo {
            // Whole sectors only, as QEMU counts them: a partial last sector would take
            // writes that the image cannot keep (its bytes past the virtual size).
            size: header.size / 512 * 512,
            logical_block_size: 512,
            physical_block_size: raw.info().physical_block_size,
            request_alignment: 1,
            memory_alignment: 1,
            read_only,
            discard: options.raw.discard,
        };
        let disk = Qcow2Disk {
            path: path.to_path_buf(),
            info,
            backing,
            meta: Mutex::new(Meta {
                l1,
                l2_cache: L2Cache::new(cluster_size),
                reftable,
                reftable_offset: header.refcount_table_offset,
                file_end: file_size
                    .div_ceil(cluster_size)
                    .saturating_mul(cluster_size),
                header_dirty_autoclear: header.autoclear_features != 0,
                refblocks,
                l2_tables,
                corrupt: false,
            }),
            last_compressed: Mutex::new(None),
            nowait_works: AtomicBool::new(true),
            header,
            raw: Arc::new(raw),
        };
        if !read_only {
            disk.skip_refcounted_tail(&mut lock(&disk.meta))?;
        }
        Ok(disk)
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing disk, if one was opened.
    pub fn backing(&self) -> Option<&Arc<dyn SyncDisk>> {
        self.backing.as_ref()
    }

    fn corrupt(&self, table: &'static str, index: u64, value: u64, reason: &'static str) -> Error {
        Qcow2Error::CorruptEntry {
            table,
            index,
            value,
            reason,
        }
        .at(&self.path)
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// L2 entries per table.
    fn l2_entries(&self) -> u64 {
        1 << self.header.l2_bits()
    }

    /// The host offset of the L2 table of L1 entry `l1_index`, 0 if unallocated, checked.
    fn l2_offset(&self, meta: &Meta, l1_index: u64) -> Result<u64> {
        let entry = usize::try_from(l1_index)
            .ok()
            .and_then(|i| meta.l1.get(i).copied())
            .unwrap_or(0);
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(0);
        }
        if offset % self.cluster_size() != 0 {
            return Err(self.corrupt("L1", l1_index, entry, "unaligned L2 table offset"));
        }
        if offset
            .checked_add(self.cluster_size())
            .is_none_or(|end| end > meta.file_end)
        {
            return Err(self.corrupt("L1", l1_index, entry, "L2 table past the end of the file"));
        }
        Ok(offset)
    }

    /// The index in the cache of the L2 table at `offset`, reading it if needed.
    fn load_l2(&self, meta: &mut Meta, offset: u64) -> Result<usize> {
        if let Some(index) = meta.l2_cache.position(offset) {
            return Ok(index);
        }
        let mut bytes = vec![0u8; self.cluster_size() as usize];
        io::read(&self.raw, offset, &mut bytes)?;
        Ok(meta.l2_cache.insert(offset, decode_table(&bytes)))
    }

    /// The L2 entry (and subcluster bitmap, 0 for standard entries) of guest cluster
    /// `cluster`, or `None` if its L2 table is unallocated.
    fn l2_entry(&self, meta: &mut Meta, cluster: u64) -> Result<Option<(u64, u64)>> {
        let l1_index = cluster >> self.header.l2_bits();
        let l2_offset = self.l2_offset(meta, l1_index)?;
        if l2_offset == 0 {
            return Ok(None);
        }
        let slot = self.load_l2(meta, l2_offset)?;
        Ok(Some(self.cached_entry(meta, slot, cluster)))
    }

    /// Where guest byte `pos` lives, and how many bytes from it share that mapping (up to
    /// the end of its cluster, or subcluster with extended L2 entries).
    fn lookup(&self, meta: &mut Meta, pos: u64) -> Result<(Mapping, u64)> {
        let cluster_bits = self.header.cluster_bits;
        let cluster = pos >> cluster_bits;
        let in_cluster = pos & (self.cluster_size() - 1);
        let to_cluster_end = self.cluster_size() - in_cluster;
        let Some((entry, bitmap)) = self.l2_entry(meta, cluster)? else {
            return Ok((Mapping::Unallocated, to_cluster_end));
        };
        self.decode_entry(cluster, entry, bitmap, in_cluster)
    }

    fn decode_entry(
        &self,
        cluster: u64,
        entry: u64,
        bitmap: u64,
        in_cluster: u64,
    ) -> Result<(Mapping, u64)> {
        let cluster_size = self.cluster_size();
        let to_cluster_end = cluster_size - in_cluster;
        if entry & COMPRESSED != 0 {
            return Ok((Mapping::Compressed(entry), to_cluster_end));
        }
        let host = entry & OFFSET_MASK;
        if host % cluster_size != 0 {
            return Err(self.corrupt("L2", cluster, entry, "unaligned data cluster offset"));
        }
        if !self.header.extended_l2() {
            let mapping = if entry & ZERO != 0 {
                if self.header.version < 3 {
                    return Err(self.corrupt(
                        "L2",
                        cluster,
                        entry,
                        "zero flag in a version 2 image",
                    ));
                }
                Mapping::Zero
            } else if host == 0 {
                Mapping::Unallocated
            } else {
                Mapping::Data(host + in_cluster)
            };
            return Ok((mapping, to_cluster_end));
        }
        // Extended L2: 32 subclusters, bit i allocated, bit 32 + i reads as zeroes.
        let sub_bits = self.header.cluster_bits - 5;
        let sub = in_cluster >> sub_bits;
        let to_sub_end = (1u64 << sub_bits) - (in_cluster & ((1 << sub_bits) - 1));
        let allocated = bitmap >> sub & 1 != 0;
        let zero = bitmap >> (32 + sub) & 1 != 0;
        let mapping = match (allocated, zero) {
            (true, true) => {
                return Err(self.corrupt(
                    "L2 bitmap",
                    cluster,
                    bitmap,
                    "a subcluster is both allocated and zero",
                ))
            }
            (true, false) if host == 0 => {
                return Err(self.corrupt(
                    "L2",
                    cluster,
                    entry,
                    "allocated subcluster without a host cluster",
                ))
            }
            (true, false) => Mapping::Data(host + in_cluster),
            (false, true) => Mapping::Zero,
            (false, false) => Mapping::Unallocated,
        };
        Ok((mapping, to_sub_end))
    }

    /// Like [`lookup`](Self::lookup), but only where the L2 table is already cached, so that
    /// no metadata I/O happens on a submitting thread: `None` where it is not.
    fn cached_lookup(&self, meta: &mut Meta, pos: u64) -> Option<Result<(Mapping, u64)>> {
        let cluster = pos >> self.header.cluster_bits;
        let l2_offset = match self.l2_offset(meta, cluster >> self.header.l2_bits()) {
            Ok(0) => return None,
            Ok(offset) => offset,
            Err(e) => return Some(Err(e)),
        };
        // One scan of the cache: this runs on the submitting thread for every page-cache hit.
        let slot = meta.l2_cache.position(l2_offset)?;
        let (entry, bitmap) = self.cached_entry(meta, slot, cluster);
        let in_cluster = pos & (self.cluster_size() - 1);
        Some(self.decode_entry(cluster, entry, bitmap, in_cluster))
    }

    /// Whether the L2 table that maps guest byte `pos` is allocated and cached.
    fn l2_is_cached(&self, meta: &mut Meta, pos: u64) -> Result<bool> {
        let cluster = pos >> self.header.cluster_bits;
        let l2_offset = self.l2_offset(meta, cluster >> self.header.l2_bits())?;
        Ok(l2_offset != 0 && meta.l2_cache.position(l2_offset).is_some())
    }

    /// See [`compressed_range`].
    fn compressed_range(&self, entry: u64) -> (u64, u64) {
        compressed_range(self.header.cluster_bits, entry)
    }

    /// Reads the decompressed compressed cluster of `entry` and passes it to `f`.
    fn with_compressed<T>(&self, entry: u64, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        let mut last = lock(&self.last_compressed);
        if let Some((cached, data)) = last.as_ref() {
            if *cached == entry {
                return Ok(f(data));
            }
        }
        let (offset, len) = self.compressed_range(entry);
        let mut input = vec![0u8; len as usize];
        io::read(&self.raw, offset, &mut input)?;
        let mut data = vec![0u8; self.cluster_size() as usize];
        compress::decompress(self.header.compression, &input, &mut data, offset)
            .map_err(|e| e.at(&self.path))?;
        let result = f(&data);
        *last = Some((entry, data));
        Ok(result)
    }

    /// Reads `len` bytes of the backing disk at `pos` into the buffers at `skip`; what lies
    /// past the backing disk's end (or everything, without one) reads as zeroes.
    fn read_backing(&self, pos: u64, iovecs: &[libc::iovec], skip: usize, len: u64) -> Result<()> {
        let from_backing = match &self.backing {
            Some(b) => b.info().size.saturating_sub(pos).min(len),
            None => 0,
        };
        if let (Some(backing), true) = (&self.backing, from_backing > 0) {
            let mut tmp = vec![0u8; from_backing as usize];
            backing.read_vectored(pos, &[IoBuf::from_mut_slice(&mut tmp)])?;
            copy_into_iovecs(iovecs, skip, &tmp);
        }
        zero_range(
            iovecs,
            skip + from_backing as usize,
            (len - from_backing) as usize,
        );
        Ok(())
    }

    /// Reads the guest range `[pos, pos + len)`, which lies in one (sub)cluster mapped by
    /// `mapping`, into the buffers at `skip`.
    fn read_mapped(
        &self,
        mapping: Mapping,
        pos: u64,
        iovecs: &[libc::iovec],
        skip: usize,
        len: u64,
    ) -> Result<()> {
        match mapping {
            Mapping::Unallocated => self.read_backing(pos, iovecs, skip, len)?,
            Mapping::Zero => zero_range(iovecs, skip, len as usize),
            Mapping::Data(host) => io::read_iovecs(&self.raw, host, iovecs, skip, len as usize)?,
            Mapping::Compressed(entry) => {
                let start = (pos & (self.cluster_size() - 1)) as usize;
                self.with_compressed(entry, |data| {
                    copy_into_iovecs(
                        iovecs,
                        skip,
                        data.get(start..start + len as usize).unwrap_or(&[]),
                    )
                })?;
            }
        }
        Ok(())
    }
}

/// Records `path` in the chain being opened, refusing loops and chains too deep.
fn enter_chain(path: &Path, chain: &mut HashSet<PathBuf>) -> Result<()> {
    if chain.len() >= MAX_BACKING_DEPTH {
        return Err(Qcow2Error::BackingChainTooDeep {
            max: MAX_BACKING_DEPTH,
        }
        .at(path));
    }
    let canonical = std::fs::canonicalize(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if !chain.insert(canonical.clone()) {
        return Err(Qcow2Error::BackingLoop { path: canonical }.at(path));
    }
    Ok(())
}

/// Opens the backing disk the options and the header call for.
fn open_backing(
    path: &Path,
    header: &Header,
    options: &Qcow2Options,
    chain: &mut HashSet<PathBuf>,
) -> Result<Option<Arc<dyn SyncDisk>>> {
    let q = |e: Qcow2Error| e.at(path);
    let (backing_path, format) = match (&options.backing, &header.backing_file) {
        (Backing::File { path, format }, _) => (path.clone(), *format),
        (Backing::None, None) | (Backing::FromImage, None) => return Ok(None),
        (Backing::None, Some(name)) => {
            return Err(q(Qcow2Error::BackingNotRequested { name: name.clone() }))
        }
        (Backing::FromImage, Some(name)) => {
            let Some(format_name) = &header.backing_format else {
                return Err(q(Qcow2Error::BackingFormatMissing { name: name.clone() }));
            };
            let format = format_name
                .parse::<Format>()
                .map_err(|_| q(Qcow2Error::UnsupportedBackingFormat(format_name.clone())))?;
            // Relative names are relative to the image's directory, as QEMU reads them.
            let dir = path.parent().unwrap_or(Path::new("."));
            (dir.join(name), format)
        }
    };
    let raw = RawOptions {
        read_only: true,
        discard: false,
        ..options.raw
    };
    Ok(Some(match format {
        Format::Raw => {
            enter_chain(&backing_path, chain)?;
            Arc::new(RawDisk::open(&backing_path, raw)?)
        }
        Format::Qcow2 => Arc::new(Qcow2Disk::open_in_chain(
            &backing_path,
            &Qcow2Options {
                raw,
                backing: Backing::FromImage,
            },
            chain,
        )?),
    }))
}

impl SyncDisk for Qcow2Disk {
    fn info(&self) -> DiskInfo {
        self.info
    }

    fn cache_mode(&self) -> CacheMode {
        self.raw.cache_mode()
    }

    fn write_cache(&self) -> bool {
        self.raw.write_cache()
    }

    fn set_write_cache(&self, enabled: bool) -> Result<()> {
        self.raw.set_write_cache(enabled)
    }

    fn read_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<usize> {
        let len = request_len(bufs)?;
        self.info.check_range(offset, len)?;
        let iovecs = IoBuf::as_iovecs(bufs);
        // Data clusters that follow each other in the file are read in one go, up to
        // MAX_DATA_RUN bytes: (host offset, request offset, length).
        let mut run: Option<(u64, u64, u64)> = None;
        let flush_run = |run: &mut Option<(u64, u64, u64)>| -> Result<()> {
            if let Some((host, at, n)) = run.take() {
                self.read_mapped(Mapping::Data(host), 0, iovecs, at as usize, n)?;
            }
            Ok(())
        };
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            if pos >= self.header.size {
                // The sector-rounded tail past the virtual size.
                flush_run(&mut run)?;
                zero_range(iovecs, done as usize, (len - done) as usize);
                break;
            }
            // Look up under the lock, read without it: clusters are only ever allocated at
            // the end of the file and never reused while the disk is open, so the host
            // range stays valid for this read even if a write moves the guest cluster.
            let (mapping, span) = self.lookup(&mut lock(&self.meta), pos)?;
            let n = span.min(len - done).min(self.header.size - pos);
            match (mapping, &mut run) {
                (Mapping::Data(host), Some((start, _, run_len)))
                    if *start + *run_len == host && *run_len + n <= MAX_DATA_RUN =>
                {
                    *run_len += n;
                }
                (Mapping::Data(host), _) => {
                    flush_run(&mut run)?;
                    run = Some((host, done, n));
                }
                _ => {
                    flush_run(&mut run)?;
                    self.read_mapped(mapping, pos, iovecs, done as usize, n)?;
                }
            }
            done += n;
        }
        flush_run(&mut run)?;
        Ok(len as usize)
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<usize> {
        self.write_impl(offset, bufs)
    }

    fn flush(&self) -> Result<()> {
        // Metadata is written through, so the file's flush covers everything.
        self.raw.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.info.read_only {
            return Err(Error::ReadOnly);
        }
        if !self.info.discard {
            return Err(Error::DiscardDisabled);
        }
        self.zero_impl(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.info.read_only {
            return Err(Error::ReadOnly);
        }
        self.zero_impl(offset, len)
    }

    fn stats(&self) -> DiskStats {
        self.raw.stats()
    }

    fn try_read_nowait(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Option<Result<usize>> {
        if self.raw.cache_mode().direct() || !self.nowait_works.load(Ordering::Relaxed) {
            return None;
        }
        let len = match request_len(bufs).and_then(|len| {
            self.info.check_range(offset, len)?;
            Ok(len)
        }) {
            Ok(len) => len,
            Err(e) => return Some(Err(e)),
        };
        // Only a request inside one (sub)cluster whose L2 table is cached: no metadata
        // I/O here. Anything else takes the blocking path.
        if offset + len > self.header.size {
            return None;
        }
        let (mapping, span) = match self.cached_lookup(&mut lock(&self.meta), offset)? {
            Ok(found) => found,
            Err(e) => return Some(Err(e)),
        };
        if span < len {
            return None;
        }
        let iovecs = IoBuf::as_iovecs(bufs);
        match mapping {
            Mapping::Data(host) => {
                match io::read_nowait(&self.raw, host, iovecs, 0, len as usize) {
                    Some(true) => Some(Ok(len as usize)),
                    Some(false) => None,
                    None => {
                        self.nowait_works.store(false, Ordering::Relaxed);
                        None
                    }
                }
            }
            Mapping::Zero => {
                zero_range(iovecs, 0, len as usize);
                Some(Ok(len as usize))
            }
            Mapping::Unallocated | Mapping::Compressed(_) => None,
        }
    }
}

impl HostMapping for Qcow2Disk {
    fn host_file(&self) -> &RawDisk {
        &self.raw
    }

    fn map_read(&self, offset: u64, len: u64) -> Option<u64> {
        if offset.checked_add(len)? > self.header.size {
            return None;
        }
        // An error is left for the driver's own read to report.
        match self.cached_lookup(&mut lock(&self.meta), offset)? {
            Ok((Mapping::Data(host), span)) if span >= len => Some(host),
            _ => None,
        }
    }

    fn map_write(&self, offset: u64, len: u64) -> Option<u64> {
        let in_cluster = offset & (self.cluster_size() - 1);
        if self.info.read_only
            || offset.checked_add(len)? > self.header.size
            || in_cluster + len > self.cluster_size()
        {
            return None;
        }
        let mut meta = lock(&self.meta);
        // The first write clears autoclear bits, and a corrupt image takes no writes: both
        // are the driver's to do or report.
        if meta.corrupt || meta.header_dirty_autoclear {
            return None;
        }
        if !self.l2_is_cached(&mut meta, offset).ok()? {
            return None;
        }
        let host = self
            .in_place_target(&mut meta, offset >> self.header.cluster_bits)
            .ok()??;
        Some(host + in_cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_cache_is_bounded_and_keeps_recent_tables() {
        let mut cache = L2Cache::new(1 << 21);
        assert_eq!(cache.capacity, 2);
        cache.insert(1, vec![1]);
        cache.insert(2, vec![2]);
        assert!(cache.position(1).is_some());
        cache.insert(3, vec![3]);
        assert!(cache.position(2).is_none());
        assert!(cache.position(1).is_some());
        assert!(cache.position(3).is_some());
        assert_eq!(L2Cache::new(512).capacity, 32);
    }

    #[test]
    fn zero_range_zeroes_only_the_range() {
        let mut data = [0xffu8; 10000];
        let bufs = [IoBuf::from_mut_slice(&mut data)];
        zero_range(IoBuf::as_iovecs(&bufs), 3, 9000);
        assert_eq!(data[2], 0xff);
        assert!(data[3..9003].iter().all(|&b| b == 0));
        assert_eq!(data[9003], 0xff);
    }
}
