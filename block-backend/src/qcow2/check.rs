//! Checking and mapping a qcow2 image by walking its metadata straight from the file, like
//! `qemu-img check` and `qemu-img map`.
//!
//! The header is parsed with [`Header::parse`]; the L1, L2 and refcount tables are then
//! read with bounded reads (never past the end of the file, never more than 64 MiB), so a
//! hostile image gives a report or an error, never a panic or an unbounded allocation.
//! Nothing is written and the image is not locked.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::Qcow2Error;
use super::header::{Header, MAX_CLUSTER_BITS};
use super::write::{refcount_bits, ALL_ALLOCATED, ALL_ZERO};
use super::{
    compressed_range, decode_table, COMPRESSED, COPIED, OFFSET_MASK, REFTABLE_OFFSET_MASK, ZERO,
};

/// The most problems a [`CheckReport`] lists one by one.
pub const MAX_REPORTED: usize = 100;
/// The longest read of one table.
const MAX_READ: u64 = 64 << 20;

/// What [`check`] found, with the counts `qemu-img check` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions: references to clusters with a lower refcount (or past the end of the
    /// file), misaligned entries, unreadable tables, wrong COPIED flags.
    pub corruptions: u64,
    /// Leaked clusters: a refcount higher than the references to the cluster.
    pub leaks: u64,
    /// The problems, `ERROR ...` or `Leaked ...` as qemu-img words them; at most
    /// [`MAX_REPORTED`], then "(more problems not listed)".
    pub messages: Vec<String>,
    /// Guest clusters allocated in the image (data or compressed).
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
}

impl CheckReport {
    fn corrupt(&mut self, message: String) {
        self.corruptions += 1;
        self.note(format!("ERROR {message}"));
    }

    fn leak(&mut self, message: String) {
        self.leaks += 1;
        self.note(format!("Leaked {message}"));
    }

    fn note(&mut self, message: String) {
        if self.messages.len() < MAX_REPORTED {
            self.messages.push(message);
        } else if self.messages.len() == MAX_REPORTED {
            self.messages.push("(more problems not listed)".into());
        }
    }
}

/// One range of the guest's view of an image, as `qemu-img map --output=json` lists it
/// (with depth 0: the top image only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapExtent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Allocated (or zero) in this image.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Held in compressed clusters.
    pub compressed: bool,
    /// The host offset of a data range.
    pub offset: Option<u64>,
}

impl MapExtent {
    /// Appends `next` to `self` if they describe one contiguous range.
    fn merge(&mut self, next: &MapExtent) -> bool {
        let same = self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.start + self.length == next.start
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            };
        if same {
            self.length += next.length;
        }
        same
    }

    /// Appends `extent` to `extents`, merged into the last one if it continues it; an
    /// empty extent is dropped.
    pub fn push_merged(extents: &mut Vec<MapExtent>, extent: MapExtent) {
        if extent.length == 0 {
            return;
        }
        if let Some(last) = extents.last_mut() {
            if last.merge(&extent) {
                return;
            }
        }
        extents.push(extent);
    }
}

/// An image file and its parsed header.
struct Image {
    file: File,
    file_size: u64,
    header: Header,
}

impl Image {
    fn open(path: &Path) -> Result<Image, Qcow2Error> {
        let io = |what| move |source| Qcow2Error::Io { what, source };
        let file = File::open(path).map_err(io("open"))?;
        let file_size = file.metadata().map_err(io("stat"))?.len();
        // The header, its extensions and the backing name lie in the first cluster.
        let mut buf = vec![0u8; file_size.min(1 << MAX_CLUSTER_BITS) as usize];
        file.read_exact_at(&mut buf, 0).map_err(io("read"))?;
        let header = Header::parse(&buf, file_size)?;
        Ok(Image {
            file,
            file_size,
            header,
        })
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Reads `len` bytes at `offset`; an error if any of it lies past the end of the file.
    fn read(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.file_size && len <= MAX_READ => {}
            _ => {
                return Err(format!(
                    "{what} at {offset:#x} (+{len:#x}) lies past the end of the file ({:#x})",
                    self.file_size
                ))
            }
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| format!("cannot read {what} at {offset:#x}: {e}"))?;
        Ok(buf)
    }

    fn l1(&self) -> Result<Vec<u64>, Qcow2Error> {
        let h = &self.header;
        let buf = self
            .read(h.l1_table_offset, u64::from(h.l1_size) * 8, "the L1 table")
            .map_err(Qcow2Error::Walk)?;
        Ok(decode_table(&buf))
    }
}

/// Reads and parses the header of the qcow2 image at `path` (without opening its backing
/// file or reading any table).
pub fn read_header(path: &Path) -> Result<Header, Qcow2Error> {
    Ok(Image::open(path)?.header)
}

/// The `index`th refcount of a refcount block with `1 << order`-bit entries (0 if the
/// block is too short).
fn refcount_at(block: &[u8], order: u32, index: u64) -> u64 {
    let (first, bytes, shift, mask) = refcount_bits(order, index);
    let start = first as usize;
    block.get(start..start + bytes).map_or(0, |b| {
        (b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)) >> shift) & mask
    })
}

/// References counted while walking the metadata, by cluster index.
struct Counter<'a> {
    image: &'a Image,
    refs: HashMap<u64, u64>,
}

impl Counter<'_> {
    /// Counts a reference to each cluster of `offset..offset + len`; says so if it lies
    /// past the end of the file (the refcount comparison then reports it too).
    fn add(&mut self, report: &mut CheckReport, offset: u64, len: u64, what: &str) {
        let cs = self.image.cluster_size();
        let Some(last) = offset.checked_add(len.max(1) - 1) else {
            report.corrupt(format!("{what} at {offset:#x}: offset overflows"));
            return;
        };
        if offset >= self.image.file_size {
            report.corrupt(format!(
                "{what} at {offset:#x} points past the end of the file ({:#x})",
                self.image.file_size
            ));
        }
        // Bound the work for absurd lengths: a table is at most 32 MiB.
        let clusters = (last / cs - offset / cs + 1).min(1 << 16);
        for k in offset / cs..offset / cs + clusters {
            *self.refs.entry(k).or_insert(0) += 1;
        }
    }

    /// Counts the one-cluster table at `offset` and reads it; a table that cannot be read
    /// is a corruption (and `None`).
    fn table(&mut self, report: &mut CheckReport, offset: u64, what: &str) -> Option<Vec<u8>> {
        let cs = self.image.cluster_size();
        self.add(report, offset, cs, what);
        self.image
            .read(offset, cs, what)
            .map_err(|e| report.corrupt(e))
            .ok()
    }
}

/// Checks the qcow2 image at `path` like `qemu-img check` (without repairing anything):
/// counts the references to each host cluster from the header, the L1, L2 and refcount
/// tables and the data clusters, and compares them with the stored refcounts and the
/// COPIED flags.
///
/// Problems in the image are in the report; an error means the image could not be opened,
/// its header is invalid ([`Header::parse`]), it has internal snapshots, or its L1 table or
/// refcount table cannot be read ([`Qcow2Error::Io`], [`Qcow2Error::Walk`]).
pub fn check(path: &Path) -> Result<CheckReport, Qcow2Error> {
    let image = Image::open(path)?;
    let h = &image.header;
    if h.nb_snapshots != 0 {
        return Err(Qcow2Error::Walk(
            "images with internal snapshots are not supported by this check".into(),
        ));
    }
    let cs = image.cluster_size();
    let mut report = CheckReport {
        total_clusters: h.size.div_ceil(cs),
        ..Default::default()
    };
    let mut counter = Counter {
        image: &image,
        refs: HashMap::new(),
    };
    counter.add(&mut report, 0, cs, "header");

    // L1 and L2 tables; remember the entries carrying COPIED to check against refcounts.
    let mut copied_checks: Vec<(u64, bool, String)> = Vec::new();
    let l1 = image.l1()?;
    counter.add(
        &mut report,
        h.l1_table_offset,
        u64::from(h.l1_size) * 8,
        "L1 table",
    );
    let entry_size = h.l2_entry_size();
    for (i, &l1_entry) in l1.iter().enumerate() {
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        if l2_offset % cs != 0 {
            report.corrupt(format!(
                "L1 entry {i}: L2 table offset {l2_offset:#x} is not cluster aligned"
            ));
            continue;
        }
        copied_checks.push((
            l2_offset,
            l1_entry & COPIED != 0,
            format!("L2 table at {l2_offset:#x}"),
        ));
        let Some(l2) = counter.table(&mut report, l2_offset, "L2 table") else {
            continue;
        };
        for (j, entry) in l2.chunks_exact(entry_size as usize).enumerate() {
            let entry = decode_table(entry).first().copied().unwrap_or(0);
            let guest = ((i as u64) << (h.l2_bits() + h.cluster_bits)) + ((j as u64) * cs);
            if entry & COMPRESSED != 0 {
                let (offset, len) = compressed_range(h.cluster_bits, entry);
                counter.add(&mut report, offset, len, "compressed cluster");
                report.allocated_clusters += 1;
                continue;
            }
            let offset = entry & OFFSET_MASK;
            if offset == 0 {
                continue;
            }
            if offset % cs != 0 {
                report.corrupt(format!(
                    "offset={offset:#x}: data cluster of guest offset {guest:#x} is not \
                     properly aligned; L2 entry corrupted"
                ));
                continue;
            }
            report.allocated_clusters += 1;
            counter.add(&mut report, offset, cs, "data cluster");
            copied_checks.push((
                offset,
                entry & COPIED != 0,
                format!("data cluster at {offset:#x} (guest offset {guest:#x})"),
            ));
        }
    }

    // The refcount table and blocks, and the stored refcounts.
    let reftable_len = u64::from(h.refcount_table_clusters) * cs;
    counter.add(
        &mut report,
        h.refcount_table_offset,
        reftable_len,
        "refcount table",
    );
    let reftable = decode_table(
        &image
            .read(h.refcount_table_offset, reftable_len, "refcount table")
            .map_err(Qcow2Error::Walk)?,
    );
    let entries = h.refcount_block_entries();
    let mut stored: HashMap<u64, u64> = HashMap::new();
    for (i, &e) in reftable.iter().enumerate() {
        let block = e & REFTABLE_OFFSET_MASK;
        if block == 0 {
            continue;
        }
        if block % cs != 0 {
            report.corrupt(format!(
                "refcount table entry {i}: refcount block offset {block:#x} is not aligned"
            ));
            continue;
        }
        let Some(data) = counter.table(&mut report, block, "refcount block") else {
            continue;
        };
        for k in 0..entries {
            let refcount = refcount_at(&data, h.refcount_order, k);
            if refcount != 0 {
                stored.insert(i as u64 * entries + k, refcount);
            }
        }
    }

    let refs = counter.refs;
    let mut clusters: Vec<u64> = refs.keys().chain(stored.keys()).copied().collect();
    clusters.sort_unstable();
    clusters.dedup();
    // Refcounts of clusters past the end of the file (a crash leaves them: the refcount is
    // written before the data that extends the file) are not leaks to qemu-img, which
    // compares refcounts only up to the file's end; nor here.
    let file_clusters = image.file_size.div_ceil(cs);
    for k in clusters {
        let have = stored.get(&k).copied().unwrap_or(0);
        let want = refs.get(&k).copied().unwrap_or(0);
        if have < want {
            report.corrupt(format!("cluster {k} refcount={have} reference={want}"));
        } else if have > want && k < file_clusters {
            report.leak(format!("cluster {k} refcount={have} reference={want}"));
        }
    }
    for (offset, copied, what) in copied_checks {
        let refcount = stored.get(&(offset / cs)).copied().unwrap_or(0);
        if (refcount == 1) != copied {
            report.corrupt(format!(
                "OFLAG_COPIED {what}: refcount={refcount}, COPIED flag {}",
                if copied { "set" } else { "clear" }
            ));
        }
    }
    Ok(report)
}

/// Maps the guest's view of the qcow2 image at `path` like `qemu-img map --output=json`,
/// for the top image only: clusters it does not allocate are `present: false` (and
/// `zero: true` unless it has a backing file). Adjacent clusters of the same kind (and
/// contiguous host offsets) are merged.
///
/// An error means the image could not be opened, its header is invalid, or its L1 table
/// or an L2 table cannot be read ([`Qcow2Error::Walk`]).
pub fn map(path: &Path) -> Result<Vec<MapExtent>, Qcow2Error> {
    let image = Image::open(path)?;
    let h = &image.header;
    let cs = image.cluster_size();
    let l2_span = cs << h.l2_bits();
    let l1 = image.l1()?;
    let mut extents = Vec::new();
    let unallocated = |start, length| MapExtent {
        start,
        length,
        present: false,
        zero: h.backing_file.is_none(),
        data: false,
        compressed: false,
        offset: None,
    };
    for (i, &l1_entry) in l1.iter().enumerate() {
        let base = i as u64 * l2_span;
        if base >= h.size {
            break;
        }
        let span = l2_span.min(h.size - base);
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            MapExtent::push_merged(&mut extents, unallocated(base, span));
            continue;
        }
        let l2 = image
            .read(l2_offset, cs, "L2 table")
            .map_err(Qcow2Error::Walk)?;
        for (j, entry) in l2.chunks_exact(h.l2_entry_size() as usize).enumerate() {
            let start = base + j as u64 * cs;
            if start >= h.size {
                break;
            }
            let length = cs.min(h.size - start);
            let words = decode_table(entry);
            let e = words.first().copied().unwrap_or(0);
            // Extended L2: a cluster with no allocated or zero subcluster is unallocated.
            let bitmap = words.get(1).copied();
            let extent = if e & COMPRESSED != 0 {
                MapExtent {
                    start,
                    length,
                    present: true,
                    zero: false,
                    data: true,
                    compressed: true,
                    offset: None,
                }
            } else if (bitmap.is_none() && e & ZERO != 0)
                || bitmap.is_some_and(|b| b & ALL_ZERO != 0 && b & ALL_ALLOCATED == 0)
            {
                MapExtent {
                    start,
                    length,
                    present: true,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: None,
                }
            } else if e & OFFSET_MASK != 0 && bitmap.is_none_or(|b| b & ALL_ALLOCATED != 0) {
                MapExtent {
                    start,
                    length,
                    present: true,
                    zero: false,
                    data: true,
                    compressed: false,
                    offset: Some(e & OFFSET_MASK),
                }
            } else {
                unallocated(start, length)
            };
            MapExtent::push_merged(&mut extents, extent);
        }
    }
    let mapped: u64 = extents.iter().map(|e| e.length).sum();
    if mapped < h.size {
        MapExtent::push_merged(&mut extents, unallocated(mapped, h.size - mapped));
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{open_sync, Format, IoBuf, OpenOptions};
    use std::path::PathBuf;
    use vmm_sys_util::tempdir::TempDir;

    /// An image path in a fresh temporary directory (removed when the guard drops).
    fn scratch() -> (TempDir, PathBuf) {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("image.qcow2");
        (dir, path)
    }

    /// A 16 MiB image with 64 KiB clusters and some data written through the library.
    fn written_image() -> (TempDir, PathBuf) {
        let (dir, path) = scratch();
        crate::qcow2::create(&path, 16 << 20, 65536).unwrap();
        let disk = open_sync(&path, &OpenOptions::new().format(Format::Qcow2)).unwrap();
        let mut data = vec![0x5au8; 200_000];
        disk.write_vectored(12_345 * 512, &[IoBuf::from_mut_slice(&mut data)])
            .unwrap();
        let mut data = vec![0xc3u8; 65536];
        disk.write_vectored(8 << 20, &[IoBuf::from_mut_slice(&mut data)])
            .unwrap();
        disk.flush().unwrap();
        drop(disk);
        (dir, path)
    }

    fn be64_at(file: &File, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, offset).unwrap();
        u64::from_be_bytes(b)
    }

    fn rw(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    /// Points the table entry at the offset `entry_at` finds past the end of the file.
    fn point_past_end(path: &Path, entry_at: fn(&File) -> u64) {
        let file = rw(path);
        let size = file.metadata().unwrap().len();
        let past_end = (size.div_ceil(65536) + 16) * 65536;
        file.write_all_at(&(COPIED | past_end).to_be_bytes(), entry_at(&file))
            .unwrap();
    }

    #[test]
    fn a_written_image_is_clean_and_maps_its_data() {
        let (_dir, path) = written_image();
        let report = check(&path).unwrap();
        assert_eq!(report.corruptions, 0, "{:?}", report.messages);
        assert_eq!(report.leaks, 0, "{:?}", report.messages);
        assert!(report.messages.is_empty(), "{:?}", report.messages);
        assert_eq!(report.total_clusters, 256);
        // 200,000 bytes at 12,345 * 512 touch 4 clusters; one more at 8 MiB.
        assert_eq!(report.allocated_clusters, 5);

        let extents = map(&path).unwrap();
        let total: u64 = extents.iter().map(|e| e.length).sum();
        assert_eq!(total, 16 << 20);
        let data: u64 = extents.iter().filter(|e| e.data).map(|e| e.length).sum();
        assert_eq!(data, 5 * 65536);
        assert!(extents.iter().all(|e| !e.data || e.offset.is_some()));
    }

    #[test]
    fn a_raised_refcount_is_a_leak() {
        let (_dir, path) = written_image();
        {
            let file = rw(&path);
            let reftable = be64_at(&file, 48);
            let refblock = be64_at(&file, reftable);
            // The header cluster's refcount (16 bits) from 1 to 2.
            file.write_all_at(&2u16.to_be_bytes(), refblock).unwrap();
        }
        let report = check(&path).unwrap();
        assert_eq!(report.leaks, 1, "{:?}", report.messages);
        assert_eq!(report.corruptions, 0, "{:?}", report.messages);
        assert_eq!(
            report.messages,
            ["Leaked cluster 0 refcount=2 reference=1"],
            "{:?}",
            report.messages
        );
    }

    #[test]
    fn an_entry_past_the_end_of_the_file_is_a_corruption() {
        let (_dir, path) = written_image();
        // The first L2 entry.
        point_past_end(&path, |file| be64_at(file, be64_at(file, 40)) & OFFSET_MASK);
        let report = check(&path).unwrap();
        assert!(report.corruptions > 0, "{:?}", report.messages);
        assert!(
            report
                .messages
                .iter()
                .any(|m| m.starts_with("ERROR data cluster at") && m.contains("past the end")),
            "{:?}",
            report.messages
        );
        // map still reports the entry (it does not read data clusters).
        assert!(map(&path).is_ok());
    }

    #[test]
    fn an_l2_table_past_the_end_of_the_file_is_reported_not_fatal() {
        let (_dir, path) = written_image();
        // The first L1 entry.
        point_past_end(&path, |file| be64_at(file, 40));
        let report = check(&path).unwrap();
        assert!(report.corruptions > 0, "{:?}", report.messages);
        assert!(
            report
                .messages
                .iter()
                .any(|m| m.starts_with("ERROR L2 table at") && m.contains("lies past the end")),
            "{:?}",
            report.messages
        );
        assert!(matches!(map(&path), Err(Qcow2Error::Walk(_))));
    }

    #[test]
    fn files_that_are_not_images_are_errors() {
        let (_dir, path) = scratch();
        assert!(matches!(
            check(&path),
            Err(Qcow2Error::Io { what: "open", .. })
        ));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        assert!(matches!(check(&path), Err(Qcow2Error::BadMagic(0))));
        assert!(matches!(map(&path), Err(Qcow2Error::BadMagic(0))));
        assert!(read_header(&path).is_err());
    }

    #[test]
    fn refcounts_of_every_width_are_read() {
        let block = [
            0b1001_0110u8,
            0x12,
            0x34,
            0x56,
            0x78,
            0x9a,
            0xbc,
            0xde,
            0xf0,
        ];
        assert_eq!(refcount_at(&block, 0, 1), 1);
        assert_eq!(refcount_at(&block, 0, 3), 0);
        assert_eq!(refcount_at(&block, 1, 1), 1);
        assert_eq!(refcount_at(&block, 2, 1), 9);
        assert_eq!(refcount_at(&block, 3, 1), 0x12);
        assert_eq!(refcount_at(&block, 4, 1), 0x3456);
        assert_eq!(refcount_at(&block, 5, 1), 0x789a_bcde);
        assert_eq!(refcount_at(&block, 6, 0), 0x9612_3456_789a_bcde);
        // Past the end of a short block: 0, no panic.
        assert_eq!(refcount_at(&block, 6, 1), 0);
    }
}
