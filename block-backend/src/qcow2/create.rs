//! Creating empty qcow2 images.
//!
//! The layout: the header in cluster 0, then the refcount table, the refcount blocks for
//! the metadata, and the L1 table. The refcount table is sized so that the image can be
//! filled completely (every data cluster and L2 table, and the refcount blocks for them)
//! without having to grow it.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use super::error::Qcow2Error;
use super::header::{
    encode_v3, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS,
};
use crate::error::{Error, Result};

/// Refcounts of 16 bits, QEMU's default.
const REFCOUNT_ORDER: u32 = 4;

/// The layout of a new image, in clusters.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    cluster_bits: u32,
    l1_size: u64,
    reftable_clusters: u64,
    refblocks: u64,
    l1_clusters: u64,
}

fn layout(size: u64, cluster_size: u64) -> std::result::Result<Layout, Qcow2Error> {
    let bad = |reason| Qcow2Error::BadCreateParameters {
        size,
        cluster_size,
        reason,
    };
    if !cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_size.trailing_zeros())
    {
        return Err(bad(
            "the cluster size must be a power of two from 512 B to 2 MiB",
        ));
    }
    if size % 512 != 0 {
        return Err(bad("the size must be a multiple of 512"));
    }
    let cluster_bits = cluster_size.trailing_zeros();
    let l2_span = cluster_size * (cluster_size / 8);
    let l1_size = size.div_ceil(l2_span);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(bad("the L1 table would be larger than 32 MiB"));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cluster_size).max(1);
    let refblock_entries = (cluster_size * 8) >> REFCOUNT_ORDER;
    // Clusters of a full image besides refcount metadata, plus a margin for clusters a
    // copy on write frees and does not reuse.
    let data = size.div_ceil(cluster_size) + l1_size + l1_clusters + 1;
    let data = data + data / 8 + 16;
    let mut reftable_clusters = 1u64;
    let mut refblocks = 1u64;
    // A fixed point: the refcount metadata counts itself. Converges within a few rounds.
    for _ in 0..8 {
        let full = data + reftable_clusters + data.div_ceil(refblock_entries) + 1;
        let blocks = full.div_ceil(refblock_entries);
        reftable_clusters = (blocks * 8).div_ceil(cluster_size).max(1);
        let initial = 1 + reftable_clusters + refblocks + l1_clusters;
        refblocks = initial.div_ceil(refblock_entries).max(1);
    }
    if reftable_clusters * cluster_size > MAX_REFTABLE_BYTES {
        return Err(bad("the refcount table would be larger than 8 MiB"));
    }
    Ok(Layout {
        cluster_bits,
        l1_size,
        reftable_clusters,
        refblocks,
        l1_clusters,
    })
}

/// Creates an empty qcow2 image (version 3, 16-bit refcounts, no backing file) of `size`
/// bytes with clusters of `cluster_size` bytes. Refuses to overwrite an existing file.
pub fn create(path: &Path, size: u64, cluster_size: u64) -> Result<()> {
    let l = layout(size, cluster_size).map_err(|e| e.at(path))?;
    let cs = cluster_size;
    let reftable_offset = cs;
    let refblocks_offset = reftable_offset + l.reftable_clusters * cs;
    let l1_offset = refblocks_offset + l.refblocks * cs;
    let used = 1 + l.reftable_clusters + l.refblocks + l.l1_clusters;

    let mut header = encode_v3(
        l.cluster_bits,
        size,
        l.l1_size as u32,
        l1_offset,
        reftable_offset,
        l.reftable_clusters as u32,
        0,
        REFCOUNT_ORDER,
    );
    header.resize(cs as usize, 0);

    let mut reftable = vec![0u8; (l.reftable_clusters * cs) as usize];
    for (i, entry) in reftable
        .chunks_exact_mut(8)
        .take(l.refblocks as usize)
        .enumerate()
    {
        entry.copy_from_slice(&(refblocks_offset + i as u64 * cs).to_be_bytes());
    }
    let mut refblocks = vec![0u8; (l.refblocks * cs) as usize];
    for entry in refblocks.chunks_exact_mut(2).take(used as usize) {
        entry.copy_from_slice(&1u16.to_be_bytes());
    }
    let l1 = vec![0u8; (l.l1_clusters * cs) as usize];

    let open_error = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(open_error)?;
    for part in [&header, &reftable, &refblocks, &l1] {
        file.write_all(part)?;
    }
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_cover_a_full_image() {
        for (size, cs) in [
            (1u64 << 20, 512u64),
            (1 << 30, 512),
            (1 << 30, 65536),
            (1 << 40, 65536),
            (0, 4096),
            (100 << 30, 2 << 20),
        ] {
            let l = layout(size, cs).unwrap();
            let refblock_entries = cs * 8 / 16;
            let reftable_covers = l.reftable_clusters * cs / 8 * refblock_entries * cs;
            // Every data cluster, every L2 table and the refcount blocks fit.
            let full = size + l.l1_size * cs + (1 + l.reftable_clusters + l.l1_clusters) * cs;
            assert!(
                reftable_covers > full + full / refblock_entries,
                "{size} {cs}"
            );
            assert!(
                l.refblocks * refblock_entries
                    >= 1 + l.reftable_clusters + l.refblocks + l.l1_clusters
            );
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(layout(1 << 20, 1000).is_err());
        assert!(layout(1 << 20, 256).is_err());
        assert!(layout(1 << 20, 4 << 20).is_err());
        assert!(layout(1000, 4096).is_err());
        assert!(layout(!511, 512).is_err());
    }
}
