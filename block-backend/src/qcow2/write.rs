//! The write path: cluster allocation with exact refcounts, copy-on-write, zero clusters.
//!
//! Refcounts are kept exact at all times (no lazy refcounts, so the dirty bit is never
//! set), and metadata is written through to the file, never cached dirty. New clusters are
//! only ever allocated at the end of the file and freed clusters are not reused while the
//! image is open, which keeps concurrent readers' host offsets valid (see `read_vectored`).
//!
//! Write order, so that a crash at any point leaves at worst leaked clusters, never a
//! cluster in use with a refcount too low or a table pointing at unwritten metadata:
//!
//! 1. the refcount of a new cluster is increased (a new refcount block is written in full
//!    and synced before the refcount table points at it);
//! 2. the new cluster's content is written (data, or a new L2 table);
//! 3. a barrier (`fdatasync`, except in cache mode unsafe);
//! 4. the L2 entry (or L1 entry) is written to point at it;
//! 5. the old cluster's refcount is decreased.

use super::error::Qcow2Error;
use super::{lock, Meta, Qcow2Disk, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::disk::{request_len, SyncDisk};
use crate::error::{Error, Result};
use crate::iobuf::{copy_from_iovecs, IoBuf};

/// Whether images may be opened read-write.
pub(super) const SUPPORTED: bool = true;

/// What a host cluster is about to be written as, for the overlap checks.
const DATA: &str = "data";
/// See [`DATA`].
const L2_TABLE: &str = "L2 table";
/// See [`DATA`].
const REFCOUNT_BLOCK: &str = "refcount block";

/// Clusters past the end of the file a crash may leave counted (one request's allocations,
/// with room to spare); a counted cluster further out is damage.
const MAX_TAIL_CLUSTERS: u64 = 64;
/// Refcount blocks past the end of the file that a read-write open scans at most.
const MAX_TAIL_REFCOUNT_BLOCKS: u32 = 64;

/// Header offsets of the incompatible and autoclear feature bits (version 3).
const INCOMPATIBLE_FEATURES_OFFSET: u64 = 72;
const AUTOCLEAR_FEATURES_OFFSET: u64 = 88;

/// Every subcluster allocated, none zero.
pub(super) const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// Every subcluster zero.
pub(super) const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// Where refcount entry `index` lies in its block for refcounts of `1 << order` bits: its
/// first byte, its length in bytes, and the shift and mask of the entry in the big-endian
/// number those bytes form.
pub(super) fn refcount_bits(order: u32, index: u64) -> (u64, usize, u32, u64) {
    let bit = index << order;
    let bytes = (1usize << order).div_ceil(8);
    // Sub-byte refcounts fill each byte from its least significant bit (QEMU's layout).
    let shift = if order < 3 { (bit % 8) as u32 } else { 0 };
    let mask = if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    };
    (bit / 8, bytes, shift, mask)
}

impl Qcow2Disk {
    /// Writes `data` at a host offset.
    fn write_host(&self, offset: u64, data: &[u8]) -> Result<()> {
        super::io::write(&self.raw, offset, data)?;
        self.raw.record_write();
        Ok(())
    }

    /// The metadata in host cluster `cluster`, if any: the header, the L1 table, the
    /// refcount table, a refcount block, an L2 table; metadata of kind `own` (what is about
    /// to be written there) does not count.
    fn metadata_at(&self, meta: &Meta, cluster: u64, own: &'static str) -> Option<&'static str> {
        let bits = self.header.cluster_bits;
        let within = |offset: u64, bytes: u64| {
            bytes > 0 && (offset >> bits..(offset + bytes).div_ceil(1 << bits)).contains(&cluster)
        };
        if cluster == 0 {
            Some("header")
        } else if within(
            self.header.l1_table_offset,
            u64::from(self.header.l1_size) * 8,
        ) {
            Some("L1 table")
        } else if within(meta.reftable_offset, meta.reftable.len() as u64 * 8) {
            Some("refcount table")
        } else if own != REFCOUNT_BLOCK && meta.refblocks.contains(&cluster) {
            Some(REFCOUNT_BLOCK)
        } else if own != L2_TABLE && meta.l2_tables.contains(&cluster) {
            Some(L2_TABLE)
        } else {
            None
        }
    }

    /// Fails, and marks the image corrupt, if the host range `[offset, offset + len)` that
    /// entry `index` of `table` (value `value`) points at, to be written as `own`
    /// ([`DATA`], [`L2_TABLE`], [`REFCOUNT_BLOCK`]), overlaps other metadata.
    #[allow(clippy::too_many_arguments)]
    fn check_overlap(
        &self,
        meta: &mut Meta,
        table: &'static str,
        index: u64,
        value: u64,
        offset: u64,
        len: u64,
        own: &'static str,
    ) -> Result<()> {
        let bits = self.header.cluster_bits;
        let last = offset.saturating_add(len.max(1) - 1) >> bits;
        for cluster in offset >> bits..=last {
            if let Some(metadata) = self.metadata_at(meta, cluster, own) {
                meta.corrupt = true;
                self.mark_corrupt_on_disk();
                let err = Qcow2Error::MetadataOverlap {
                    table,
                    index,
                    value,
                    offset,
                    metadata,
                }
                .at(&self.path);
                log::error!("{err}");
                return Err(err);
            }
        }
        Ok(())
    }

    /// Sets the corrupt bit in the header (version 3 only; version 2 has no feature bits),
    /// as QEMU does when it finds corruption: no program then opens the image read-write
    /// until it is repaired. Failing that, the image is still refused writes for as long
    /// as this disk is open.
    fn mark_corrupt_on_disk(&self) {
        if self.header.version < 3 {
            return;
        }
        let features = self.header.incompatible_features | super::header::INCOMPAT_CORRUPT;
        let marked = self
            .write_host(INCOMPATIBLE_FEATURES_OFFSET, &features.to_be_bytes())
            .and_then(|()| self.barrier());
        if let Err(e) = marked {
            log::error!(
                "{}: cannot mark the image corrupt: {e}",
                self.path.display()
            );
        }
    }

    /// Checks that the host cluster(s) L2 entry `entry` of guest cluster `cluster` points at
    /// are not metadata, before they are written, copied from or freed.
    fn check_data_entry(&self, meta: &mut Meta, cluster: u64, entry: u64) -> Result<()> {
        let (offset, len) = if entry & COMPRESSED != 0 {
            self.compressed_range(entry)
        } else if entry & OFFSET_MASK == 0 {
            return Ok(());
        } else {
            (entry & OFFSET_MASK, self.cluster_size())
        };
        self.check_overlap(meta, "L2", cluster, entry, offset, len, DATA)
    }

    /// Orders the writes before it before the writes after it, on the disk.
    fn barrier(&self) -> Result<()> {
        if self.raw.cache_mode().ignores_flush() {
            return Ok(());
        }
        let generation = self.raw.write_generation();
        self.raw.file().sync_data()?;
        self.raw.record_sync(generation);
        Ok(())
    }

    /// Where the refcount of host cluster `cluster` lives: the refcount block's offset (0
    /// if unallocated) and the refcount table index; `None` past the end of the table.
    fn refcount_block(&self, meta: &Meta, cluster: u64) -> Result<Option<(u64, u64)>> {
        let table_index = cluster / self.header.refcount_block_entries();
        let Some(entry) = usize::try_from(table_index)
            .ok()
            .and_then(|i| meta.reftable.get(i).copied())
        else {
            return Ok(None);
        };
        // Refcount table entries have offset bits 9-63.
        let block = entry & !0x1ff;
        if block % self.cluster_size() != 0 {
            return Err(self.corrupt(
                "refcount table",
                table_index,
                entry,
                "unaligned refcount block offset",
            ));
        }
        if block != 0
            && block
                .checked_add(self.cluster_size())
                .is_none_or(|end| end > meta.file_end)
        {
            return Err(self.corrupt(
                "refcount table",
                table_index,
                entry,
                "refcount block past the end of the file",
            ));
        }
        Ok(Some((block, table_index)))
    }

    /// Sets refcount entry `index` of a refcount block held in memory.
    fn set_refcount_in(&self, block: &mut [u8], index: u64, value: u64) {
        let (byte, len, shift, mask) = self.refcount_bits(index);
        let Some(slot) = block.get_mut(byte as usize..byte as usize + len) else {
            return;
        };
        let word = slot.iter().fold(0u64, |w, &b| w << 8 | u64::from(b));
        let word = (word & !(mask << shift)) | ((value & mask) << shift);
        for (i, b) in slot.iter_mut().enumerate() {
            *b = (word >> (8 * (len - 1 - i))) as u8;
        }
    }

    /// The refcount of entry `index` of a refcount block's bytes.
    fn refcount_in(&self, block: &[u8], index: u64) -> u64 {
        let (byte, len, shift, mask) = self.refcount_bits(index);
        block
            .get(byte as usize..byte as usize + len)
            .map_or(0, |slot| {
                let word = slot.iter().fold(0u64, |w, &b| w << 8 | u64::from(b));
                (word >> shift) & mask
            })
    }

    /// Moves new allocations past any cluster beyond the end of the file that already has a
    /// refcount. A crash leaves such clusters behind: an allocation writes (and syncs) the
    /// refcount before the data or table that extends the file. They stay leaked, as QEMU
    /// leaves them; without this, the allocator, which takes clusters at the end of the
    /// file, would hand one out again and count it twice. Called once, at a read-write open.
    pub(super) fn skip_refcounted_tail(&self, meta: &mut Meta) -> Result<()> {
        let bits = self.header.cluster_bits;
        let per_block = self.header.refcount_block_entries();
        let end_cluster = meta.file_end >> bits;
        let mut block_bytes = vec![0u8; self.cluster_size() as usize];
        let mut scanned = 0;
        let mut last_counted = None;
        for index in 0..meta.reftable.len() as u64 {
            let first = index.saturating_mul(per_block);
            if first.saturating_add(per_block) <= end_cluster {
                continue;
            }
            let Some((block, _)) = self.refcount_block(meta, first)? else {
                break;
            };
            if block == 0 {
                continue;
            }
            // Only a crash right after tables grew leaves more than one or two blocks
            // here; a long run of them is a hostile image.
            scanned += 1;
            if scanned > MAX_TAIL_REFCOUNT_BLOCKS {
                return Err(Qcow2Error::Walk(format!(
                    "more than {MAX_TAIL_REFCOUNT_BLOCKS} refcount blocks count clusters past                      the end of the file: repair the image (qemu-img check -r all)"
                ))
                .at(&self.path));
            }
            super::io::read(&self.raw, block, &mut block_bytes)?;
            for k in end_cluster.saturating_sub(first)..per_block {
                if self.refcount_in(&block_bytes, k) != 0 {
                    last_counted = Some(first + k);
                }
            }
        }
        if let Some(cluster) = last_counted {
            // A crash leaves the few clusters of one allocation; counted clusters far past
            // the end are damage, and skipping to them would grow the file without bound.
            if cluster - end_cluster >= MAX_TAIL_CLUSTERS {
                return Err(Qcow2Error::Walk(format!(
                    "cluster {cluster} has a refcount but lies {} clusters past the end of the \
                     file: the refcounts are damaged; repair the image (qemu-img check -r all)",
                    cluster - end_cluster
                ))
                .at(&self.path));
            }
            log::warn!(
                "{}: clusters up to {cluster} past the end of the file have refcounts (left by                  a crash): they stay leaked",
                self.path.display()
            );
            meta.file_end = (cluster + 1) << bits;
        }
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the file, so that it has an
    /// entry `needed`. The new table comes with the refcount blocks that count its own
    /// clusters; the header switches to it only once both are on disk.
    fn grow_reftable(&self, meta: &mut Meta, needed: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        let bits = self.header.cluster_bits;
        let per_block = self.header.refcount_block_entries();
        let old_len = meta.reftable.len() as u64;
        let old_offset = meta.reftable_offset;
        let start = meta.file_end >> bits;
        let has_block = |meta: &Meta, i: u64| {
            usize::try_from(i)
                .ok()
                .and_then(|i| meta.reftable.get(i))
                .is_some_and(|&e| e != 0)
        };
        // A fixed point: the new table and blocks need refcounts in blocks of their own.
        let mut table_clusters = 0u64;
        let mut new_blocks: Vec<u64> = Vec::new();
        let mut new_len = needed.saturating_add(1).max(old_len.saturating_mul(2));
        for _ in 0..8 {
            table_clusters = new_len.saturating_mul(8).div_ceil(cluster_size);
            let end = start + table_clusters + new_blocks.len() as u64;
            new_blocks = (start / per_block..=(end - 1) / per_block)
                .filter(|&i| !has_block(meta, i))
                .collect();
            let end = start + table_clusters + new_blocks.len() as u64;
            new_len = new_len.max((end - 1) / per_block + 1);
        }
        let table_bytes = table_clusters.saturating_mul(cluster_size);
        if table_bytes > super::header::MAX_REFTABLE_BYTES
            || new_len > table_bytes / 8
            || new_blocks.iter().any(|&i| i >= new_len)
        {
            return Err(Qcow2Error::RefcountTableFull { entries: old_len }.at(&self.path));
        }
        let blocks_start = start + table_clusters;
        let end = blocks_start + new_blocks.len() as u64;

        // The new table and blocks, in memory, then on disk in one write.
        let mut table = meta.reftable.clone();
        table.resize((table_bytes / 8) as usize, 0);
        let mut area = vec![0u8; ((end - start) * cluster_size) as usize];
        for (k, &index) in new_blocks.iter().enumerate() {
            if let Some(e) = table.get_mut(index as usize) {
                *e = (blocks_start + k as u64) << bits;
            }
        }
        for (i, entry) in table.iter().enumerate() {
            if let Some(dst) = area.get_mut(i * 8..i * 8 + 8) {
                dst.copy_from_slice(&entry.to_be_bytes());
            }
        }
        let mut in_old_blocks = Vec::new();
        for cluster in start..end {
            let index = cluster / per_block;
            match new_blocks.iter().position(|&i| i == index) {
                Some(k) => {
                    let at = ((table_clusters + k as u64) * cluster_size) as usize;
                    if let Some(block) = area.get_mut(at..at + cluster_size as usize) {
                        self.set_refcount_in(block, cluster % per_block, 1);
                    }
                }
                None => in_old_blocks.push(cluster),
            }
        }
        meta.file_end = end << bits;
        self.write_host(start << bits, &area)?;
        for cluster in in_old_blocks {
            self.refcount_add(meta, cluster << bits, 1)?;
        }
        self.barrier()?;

        // Switch the header to the new table: offset and size in one 12-byte write.
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&(start << bits).to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.write_host(48, &fields)?;
        self.barrier()?;
        meta.reftable = table;
        meta.reftable_offset = start << bits;
        meta.refblocks
            .extend((0..new_blocks.len() as u64).map(|k| blocks_start + k));

        // The old table's clusters are free now.
        for k in 0..(old_len * 8).div_ceil(cluster_size) {
            if let Err(e) = self.refcount_add(meta, old_offset + k * cluster_size, -1) {
                log::warn!(
                    "{}: freeing the old refcount table: {e}",
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    /// See [`refcount_bits`].
    fn refcount_bits(&self, index: u64) -> (u64, usize, u32, u64) {
        refcount_bits(self.header.refcount_order, index)
    }

    /// Adds `delta` to the refcount of the host cluster at `host`, allocating a refcount
    /// block if needed.
    fn refcount_add(&self, meta: &mut Meta, host: u64, delta: i64) -> Result<()> {
        let cluster = host >> self.header.cluster_bits;
        let (mut block, table_index) = match self.refcount_block(meta, cluster)? {
            Some(found) => found,
            None if delta < 0 => {
                return Err(Qcow2Error::RefcountRange {
                    cluster,
                    what: "drop below zero",
                }
                .at(&self.path))
            }
            None => {
                self.grow_reftable(meta, cluster / self.header.refcount_block_entries())?;
                self.refcount_block(meta, cluster)?.ok_or_else(|| {
                    Qcow2Error::RefcountTableFull {
                        entries: meta.reftable.len() as u64,
                    }
                    .at(&self.path)
                })?
            }
        };
        let entries = self.header.refcount_block_entries();
        if block == 0 {
            if delta < 0 {
                return Err(Qcow2Error::RefcountRange {
                    cluster,
                    what: "drop below zero",
                }
                .at(&self.path));
            }
            block = self.new_refcount_block(meta, table_index)?;
        } else {
            let value = meta
                .reftable
                .get(table_index as usize)
                .copied()
                .unwrap_or(0);
            self.check_overlap(
                meta,
                "refcount table",
                table_index,
                value,
                block,
                self.cluster_size(),
                REFCOUNT_BLOCK,
            )?;
        }
        let (byte, len, shift, mask) = self.refcount_bits(cluster % entries);
        let at = block + byte;
        let mut bytes = [0u8; 8];
        let slot = bytes.get_mut(..len).unwrap_or(&mut []);
        super::io::read(&self.raw, at, slot)?;
        let word = slot.iter().fold(0u64, |w, &b| w << 8 | u64::from(b));
        let value = (word >> shift) & mask;
        let new = value
            .checked_add_signed(delta)
            .filter(|&v| v <= mask)
            .ok_or_else(|| {
                Qcow2Error::RefcountRange {
                    cluster,
                    what: if delta < 0 {
                        "drop below zero"
                    } else {
                        "overflow"
                    },
                }
                .at(&self.path)
            })?;
        let word = (word & !(mask << shift)) | (new << shift);
        for (i, b) in slot.iter_mut().enumerate() {
            *b = (word >> (8 * (len - 1 - i))) as u8;
        }
        self.write_host(at, slot)
    }

    /// Allocates a refcount block for refcount table entry `table_index` at the end of the
    /// file, with its own refcount counted.
    fn new_refcount_block(&self, meta: &mut Meta, table_index: u64) -> Result<u64> {
        let cluster_size = self.cluster_size();
        let block = meta.file_end;
        meta.file_end = block
            .checked_add(cluster_size)
            .ok_or(Error::Io(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
        let entries = self.header.refcount_block_entries();
        let block_cluster = block >> self.header.cluster_bits;
        let covers_itself = block_cluster / entries == table_index;
        let mut content = vec![0u8; cluster_size as usize];
        if covers_itself {
            self.set_refcount_in(&mut content, block_cluster % entries, 1);
        }
        self.write_host(block, &content)?;
        self.barrier()?;
        let entry_at = meta.reftable_offset + table_index * 8;
        self.write_host(entry_at, &block.to_be_bytes())?;
        if let Some(e) = meta.reftable.get_mut(table_index as usize) {
            *e = block;
        }
        meta.refblocks.insert(block >> self.header.cluster_bits);
        if !covers_itself {
            self.refcount_add(meta, block, 1)?;
        }
        Ok(block)
    }

    /// Allocates a cluster at the end of the file, its refcount 1.
    fn alloc_cluster(&self, meta: &mut Meta) -> Result<u64> {
        let host = meta.file_end;
        meta.file_end = host
            .checked_add(self.cluster_size())
            .filter(|&end| end <= OFFSET_MASK)
            .ok_or(Error::Io(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
        self.refcount_add(meta, host, 1)?;
        Ok(host)
    }

    /// Drops this image's reference to the cluster an L2 entry pointed at. The guest's data
    /// is already safe, so a refcount that cannot drop is logged, not returned.
    fn release(&self, meta: &mut Meta, entry: u64) {
        let cluster_bits = self.header.cluster_bits;
        let (first, last) = if entry & COMPRESSED != 0 {
            let (offset, len) = self.compressed_range(entry);
            (offset >> cluster_bits, (offset + len - 1) >> cluster_bits)
        } else {
            let host = entry & OFFSET_MASK;
            if host == 0 {
                return;
            }
            (host >> cluster_bits, host >> cluster_bits)
        };
        for cluster in first..=last {
            if let Err(e) = self.refcount_add(meta, cluster << cluster_bits, -1) {
                log::warn!("{}: freeing a cluster: {e}", self.path.display());
            }
        }
    }

    /// The cache slot and host offset of the L2 table of guest cluster `cluster`, allocating
    /// the table if needed.
    fn ensure_l2(&self, meta: &mut Meta, cluster: u64) -> Result<(usize, u64)> {
        let l1_index = cluster >> self.header.l2_bits();
        let l1_entry =
            meta.l1.get(l1_index as usize).copied().ok_or_else(|| {
                self.corrupt("L1", l1_index, 0, "index past the end of the L1 table")
            })?;
        let offset = self.l2_offset(meta, l1_index)?;
        if offset != 0 {
            if l1_entry & COPIED == 0 {
                return Err(self.corrupt(
                    "L1",
                    l1_index,
                    l1_entry,
                    "shared L2 table (no COPIED flag): writing it is not supported",
                ));
            }
            self.check_overlap(
                meta,
                "L1",
                l1_index,
                l1_entry,
                offset,
                self.cluster_size(),
                L2_TABLE,
            )?;
            return Ok((self.load_l2(meta, offset)?, offset));
        }
        let new = self.alloc_cluster(meta)?;
        let zeroes = vec![0u8; self.cluster_size() as usize];
        self.write_host(new, &zeroes)?;
        self.barrier()?;
        let entry = new | COPIED;
        self.write_host(
            self.header.l1_table_offset + l1_index * 8,
            &entry.to_be_bytes(),
        )?;
        if let Some(e) = meta.l1.get_mut(l1_index as usize) {
            *e = entry;
        }
        meta.l2_tables.insert(new >> self.header.cluster_bits);
        let words = (self.cluster_size() / 8) as usize;
        Ok((meta.l2_cache.insert(new, vec![0; words]), new))
    }

    /// Writes an L2 entry (and bitmap) to the file and the cache.
    fn set_l2_entry(
        &self,
        meta: &mut Meta,
        slot: usize,
        l2_offset: u64,
        cluster: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        let index = cluster & (self.l2_entries() - 1);
        let at = l2_offset + index * self.header.l2_entry_size();
        let table = meta.l2_cache.tables.get_mut(slot).map(|t| &mut t.1);
        if self.header.extended_l2() {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&entry.to_be_bytes());
            bytes[8..].copy_from_slice(&bitmap.to_be_bytes());
            self.write_host(at, &bytes)?;
            if let Some(t) = table {
                if let Some(w) = t.get_mut(index as usize * 2..index as usize * 2 + 2) {
                    w.copy_from_slice(&[entry, bitmap]);
                }
            }
        } else {
            self.write_host(at, &entry.to_be_bytes())?;
            if let Some(w) = table.and_then(|t| t.get_mut(index as usize)) {
                *w = entry;
            }
        }
        Ok(())
    }

    /// The L2 entry and bitmap in cache slot `slot` for guest cluster `cluster`.
    pub(super) fn cached_entry(&self, meta: &Meta, slot: usize, cluster: u64) -> (u64, u64) {
        let index = (cluster & (self.l2_entries() - 1)) as usize;
        let table = meta.l2_cache.tables.get(slot).map(|t| &t.1);
        let get = |i: usize| table.and_then(|t| t.get(i)).copied().unwrap_or(0);
        if self.header.extended_l2() {
            (get(index * 2), get(index * 2 + 1))
        } else {
            (get(index), 0)
        }
    }

    /// Reads guest cluster `cluster` as it is now into `buf` (one cluster).
    fn read_cluster(&self, meta: &mut Meta, cluster: u64, buf: &mut [u8]) -> Result<()> {
        let base = cluster << self.header.cluster_bits;
        let bufs = [IoBuf::from_mut_slice(buf)];
        let iovecs = IoBuf::as_iovecs(&bufs);
        let mut done = 0u64;
        let cluster_size = self.cluster_size();
        while done < cluster_size && base + done < self.header.size {
            let pos = base + done;
            let (mapping, run) = self.lookup(meta, pos)?;
            let n = run.min(cluster_size - done).min(self.header.size - pos);
            self.read_mapped(mapping, pos, iovecs, done as usize, n)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` into guest cluster `cluster` from byte `in_cluster` on.
    fn write_cluster(
        &self,
        meta: &mut Meta,
        cluster: u64,
        in_cluster: u64,
        data: &[u8],
    ) -> Result<()> {
        let (slot, l2_offset) = self.ensure_l2(meta, cluster)?;
        let (entry, bitmap) = self.cached_entry(meta, slot, cluster);
        // Whatever the entry points at is about to be written, copied or freed.
        self.check_data_entry(meta, cluster, entry)?;
        let host = entry & OFFSET_MASK;
        let in_place = entry & (COMPRESSED | ZERO) == 0
            && entry & COPIED != 0
            && host != 0
            && (!self.header.extended_l2() || bitmap == ALL_ALLOCATED);
        if in_place {
            // Checked like a read would (aligned), and inside the file: a hostile entry must
            // not make us write far past the end.
            self.decode_entry(cluster, entry, bitmap, in_cluster)?;
            if host
                .checked_add(self.cluster_size())
                .is_none_or(|end| end > meta.file_end)
            {
                return Err(self.corrupt(
                    "L2",
                    cluster,
                    entry,
                    "data cluster past the end of the file",
                ));
            }
            return self.write_host(host + in_cluster, data);
        }
        // Copy on write: the cluster's current content (backing file, zeroes, compressed
        // data, a shared cluster) with the new data over it, in a new cluster.
        let cluster_size = self.cluster_size() as usize;
        let mut content = vec![0u8; cluster_size];
        let start = in_cluster as usize;
        if data.len() != cluster_size {
            self.read_cluster(meta, cluster, &mut content)?;
        }
        if let Some(dst) = content.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
        let new = self.alloc_cluster(meta)?;
        self.write_host(new, &content)?;
        self.barrier()?;
        let new_bitmap = if self.header.extended_l2() {
            ALL_ALLOCATED
        } else {
            0
        };
        self.set_l2_entry(meta, slot, l2_offset, cluster, new | COPIED, new_bitmap)?;
        self.release(meta, entry);
        Ok(())
    }

    /// Makes guest cluster `cluster` read as zeroes by its L2 entry, if the format allows;
    /// returns false if zeroes must be written instead.
    fn zero_cluster(&self, meta: &mut Meta, cluster: u64) -> Result<bool> {
        let l1_index = cluster >> self.header.l2_bits();
        if self.backing.is_none() && self.l2_offset(meta, l1_index)? == 0 {
            // Unallocated without a backing file already reads as zeroes.
            return Ok(true);
        }
        let (entry, bitmap) = if self.header.extended_l2() {
            (0, ALL_ZERO)
        } else if self.header.version >= 3 {
            (ZERO, 0)
        } else if self.backing.is_none() {
            (0, 0)
        } else {
            return Ok(false);
        };
        let (slot, l2_offset) = self.ensure_l2(meta, cluster)?;
        let old = self.cached_entry(meta, slot, cluster);
        if old == (entry, bitmap) {
            return Ok(true);
        }
        self.check_data_entry(meta, cluster, old.0)?;
        self.set_l2_entry(meta, slot, l2_offset, cluster, entry, bitmap)?;
        self.release(meta, old.0);
        Ok(true)
    }

    /// Clears autoclear feature bits before the first change: this driver keeps none of
    /// the structures they vouch for (bitmaps, a raw external data file) up to date.
    fn prepare_write(&self, meta: &mut Meta) -> Result<()> {
        if meta.corrupt {
            return Err(Qcow2Error::FoundCorrupt.at(&self.path));
        }
        if meta.header_dirty_autoclear {
            self.write_host(AUTOCLEAR_FEATURES_OFFSET, &0u64.to_be_bytes())?;
            self.barrier()?;
            meta.header_dirty_autoclear = false;
        }
        Ok(())
    }

    /// After a request: durable now if the write cache is off.
    fn finish_write(&self) -> Result<()> {
        if !self.raw.write_cache() && !self.raw.cache_mode().ignores_flush() {
            let generation = self.raw.write_generation();
            self.raw.file().sync_data()?;
            self.raw.record_sync(generation);
            self.raw.record_durable_write();
        }
        Ok(())
    }

    pub(super) fn write_impl(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<usize> {
        if self.info.read_only {
            return Err(Error::ReadOnly);
        }
        let len = request_len(bufs)?;
        self.info.check_range(offset, len)?;
        let iovecs = IoBuf::as_iovecs(bufs);
        let cluster_size = self.cluster_size();
        let mut meta = lock(&self.meta);
        self.prepare_write(&mut meta)?;
        let mut data = Vec::new();
        let mut done = 0u64;
        // The sector-rounded tail past the virtual size is dropped.
        let end = (offset + len).min(self.header.size);
        while offset + done < end {
            let pos = offset + done;
            let in_cluster = pos & (cluster_size - 1);
            let n = (cluster_size - in_cluster).min(end - pos);
            if let Some(host) = self.in_place_target(&mut meta, pos >> self.header.cluster_bits)? {
                let at = host + in_cluster;
                if super::io::writes_directly(&self.raw, at, iovecs, done as usize, n as usize) {
                    // An allocated cluster of this image only (COPIED), overwritten in
                    // place: no metadata changes, so the data goes to the file without the
                    // lock, and writes to different clusters run in parallel. Clusters are
                    // never reused while the image is open, so the host range stays this
                    // image's even if a concurrent request moves the guest cluster. Writes
                    // that need a read-modify-write cycle keep the lock (they serialise).
                    drop(meta);
                    super::io::write_iovecs(&self.raw, at, iovecs, done as usize, n as usize)?;
                    self.raw.record_write();
                    done += n;
                    meta = lock(&self.meta);
                    continue;
                }
            }
            // At most one cluster (2 MiB) at a time, whatever the request's size.
            data.resize(n as usize, 0);
            copy_from_iovecs(iovecs, done as usize, &mut data);
            self.write_cluster(
                &mut meta,
                pos >> self.header.cluster_bits,
                in_cluster,
                &data,
            )?;
            done += n;
        }
        drop(meta);
        self.finish_write()?;
        Ok(len as usize)
    }

    /// The host cluster of guest cluster `cluster` if it may be overwritten in place: its
    /// L2 table and data cluster are allocated, this image's only (COPIED) and checked.
    pub(super) fn in_place_target(&self, meta: &mut Meta, cluster: u64) -> Result<Option<u64>> {
        let l1_index = cluster >> self.header.l2_bits();
        let l1_entry = meta.l1.get(l1_index as usize).copied().unwrap_or(0);
        if l1_entry & COPIED == 0 {
            return Ok(None);
        }
        let l2_offset = self.l2_offset(meta, l1_index)?;
        if l2_offset == 0 {
            return Ok(None);
        }
        self.check_overlap(
            meta,
            "L1",
            l1_index,
            l1_entry,
            l2_offset,
            self.cluster_size(),
            L2_TABLE,
        )?;
        let slot = self.load_l2(meta, l2_offset)?;
        let (entry, bitmap) = self.cached_entry(meta, slot, cluster);
        let host = entry & OFFSET_MASK;
        if entry & (COMPRESSED | ZERO) != 0
            || entry & COPIED == 0
            || host == 0
            || (self.header.extended_l2() && bitmap != ALL_ALLOCATED)
        {
            return Ok(None);
        }
        self.check_data_entry(meta, cluster, entry)?;
        self.decode_entry(cluster, entry, bitmap, 0)?;
        if host
            .checked_add(self.cluster_size())
            .is_none_or(|end| end > meta.file_end)
        {
            return Err(self.corrupt(
                "L2",
                cluster,
                entry,
                "data cluster past the end of the file",
            ));
        }
        Ok(Some(host))
    }

    pub(super) fn zero_impl(&self, offset: u64, len: u64) -> Result<()> {
        self.info.check_range(offset, len)?;
        let cluster_size = self.cluster_size();
        let mut meta = lock(&self.meta);
        self.prepare_write(&mut meta)?;
        let end = offset.saturating_add(len).min(self.header.size);
        let mut pos = offset;
        while pos < end {
            let in_cluster = pos & (cluster_size - 1);
            let n = (cluster_size - in_cluster).min(end - pos);
            let cluster = pos >> self.header.cluster_bits;
            // A whole cluster, or the part of the last one inside the virtual size.
            let whole = in_cluster == 0 && (n == cluster_size || pos + n == self.header.size);
            if !(whole && self.zero_cluster(&mut meta, cluster)?) {
                let zeroes = vec![0u8; n as usize];
                self.write_cluster(&mut meta, cluster, in_cluster, &zeroes)?;
            }
            pos += n;
        }
        drop(meta);
        self.finish_write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_follow_qemus_layout() {
        // 1-bit refcounts: entry 9 is bit 1 of byte 1.
        assert_eq!(refcount_bits(0, 9), (1, 1, 1, 1));
        // 2-bit: entry 5 is bits 2-3 of byte 1.
        assert_eq!(refcount_bits(1, 5), (1, 1, 2, 3));
        // 4-bit: entry 3 is the high nibble of byte 1.
        assert_eq!(refcount_bits(2, 3), (1, 1, 4, 15));
        assert_eq!(refcount_bits(3, 7), (7, 1, 0, 0xff));
        assert_eq!(refcount_bits(4, 7), (14, 2, 0, 0xffff));
        assert_eq!(refcount_bits(5, 2), (8, 4, 0, 0xffff_ffff));
        assert_eq!(refcount_bits(6, 2), (16, 8, 0, u64::MAX));
    }
}
