//! The qcow2 header and its extensions: parsed and checked against the file they describe.
//!
//! Every field is untrusted. After [`Header::parse`] the tables the header names lie inside
//! the file, are cluster-aligned and have sizes bounded by what the file and the virtual size
//! allow, so the rest of the driver may size its allocations from them.

use super::error::Qcow2Error;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// The size of a version 2 header.
pub const V2_HEADER_LEN: usize = 72;
/// The size of a version 3 header without the compression type.
pub const V3_HEADER_LEN: usize = 104;
/// Smallest and largest cluster_bits (512 B to 2 MiB), as QEMU allows.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// The largest L1 table, in bytes (QEMU's `QCOW_MAX_L1_SIZE`).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table, in bytes (QEMU's `QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The longest backing file name (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image was found corrupt: it may be opened read-only only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// The data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The compression type field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// L2 entries have subcluster bitmaps.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (no zlib header), window of 4 KiB.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

/// A parsed and checked header.
#[derive(Clone, Debug)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits, 0..=6.
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// The compression type.
    pub compression: CompressionType,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing format from the header extension, if any.
    pub backing_format: Option<String>,
}

fn be32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = buf.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_be_bytes(b)
}

fn be64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = buf.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_be_bytes(b)
}

fn bad(field: &'static str, value: u64, reason: &'static str) -> Qcow2Error {
    Qcow2Error::BadField {
        field,
        value,
        reason,
    }
}

/// Checks that a cluster-aligned table of `len` bytes at `offset` lies inside the file.
pub fn check_table(
    field: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_size: u64,
) -> Result<(), Qcow2Error> {
    if offset % cluster_size != 0 {
        return Err(Qcow2Error::Unaligned {
            field,
            offset,
            cluster_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_size && offset != 0 => Ok(()),
        _ => Err(Qcow2Error::PastEnd {
            field,
            offset,
            len,
            file_size,
        }),
    }
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries carry subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// log2 of the number of entries in one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2() { 4 } else { 3 }
    }

    /// Refcount entries per refcount block: cluster_size * 8 / refcount width.
    pub fn refcount_block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    /// Parses and checks a header. `buf` is the start of the file: at least its first
    /// cluster, or the whole file if it is shorter; `file_size` is the file's size.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header, Qcow2Error> {
        if buf.len() < V2_HEADER_LEN {
            return Err(Qcow2Error::TruncatedHeader {
                len: buf.len() as u64,
                needed: V2_HEADER_LEN as u64,
            });
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Qcow2Error::BadMagic(magic));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(
                "cluster_bits",
                cluster_bits.into(),
                "must be 9 to 21 (512 B to 2 MiB clusters)",
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let crypt_method = be32(buf, 32);
        if crypt_method != 0 {
            return Err(Qcow2Error::Encrypted(crypt_method));
        }

        let mut header = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
        };

        if version == 3 {
            if buf.len() < V3_HEADER_LEN {
                return Err(Qcow2Error::TruncatedHeader {
                    len: buf.len() as u64,
                    needed: V3_HEADER_LEN as u64,
                });
            }
            header.incompatible_features = be64(buf, 72);
            header.compatible_features = be64(buf, 80);
            header.autoclear_features = be64(buf, 88);
            header.refcount_order = be32(buf, 96);
            header.header_length = be32(buf, 100);
            if header.refcount_order > 6 {
                return Err(bad(
                    "refcount_order",
                    header.refcount_order.into(),
                    "must be 0 to 6 (1- to 64-bit refcounts)",
                ));
            }
            let header_length = u64::from(header.header_length);
            if header_length < V3_HEADER_LEN as u64 || header_length % 8 != 0 {
                return Err(bad(
                    "header_length",
                    header_length,
                    "must be a multiple of 8 and at least 104",
                ));
            }
            if header_length > cluster_size.min(buf.len() as u64) {
                return Err(bad(
                    "header_length",
                    header_length,
                    "the header must fit in the first cluster",
                ));
            }
            if header.incompatible_features & INCOMPAT_COMPRESSION != 0 {
                if header_length <= V3_HEADER_LEN as u64 {
                    return Err(bad(
                        "header_length",
                        header_length,
                        "the compression type bit is set but the header has no compression_type",
                    ));
                }
                header.compression = match buf.get(V3_HEADER_LEN).copied() {
                    Some(0) => CompressionType::Zlib,
                    Some(1) => CompressionType::Zstd,
                    other => {
                        return Err(Qcow2Error::UnsupportedCompressionType(
                            other.unwrap_or(0xff),
                        ))
                    }
                };
            }
        }

        // Extensions follow the header, up to the backing file name or the end of the
        // first cluster; read the feature name table first so that unknown bits get names.
        let backing_offset = be64(buf, 8);
        let backing_size = be32(buf, 16);
        let ext_end = if backing_offset != 0 {
            backing_offset.min(cluster_size)
        } else {
            cluster_size
        };
        let mut feature_names: Vec<(u8, u8, String)> = Vec::new();
        let mut data_file_ext = false;
        let mut pos = u64::from(header.header_length);
        // The list ends with an end marker, or (version 2 images) where there is no room
        // for another extension header.
        while let Some(after_head) = pos.checked_add(8).filter(|&e| e <= ext_end) {
            let ext_type = be32(buf, pos as usize);
            let ext_len = be32(buf, pos as usize + 4);
            if ext_type == EXT_END {
                break;
            }
            let padded = (u64::from(ext_len) + 7) & !7;
            let ext_stop = after_head
                .checked_add(padded)
                .filter(|&e| e <= ext_end && e <= buf.len() as u64)
                .ok_or(bad(
                    "header extension length",
                    ext_len.into(),
                    "reaches past the end of the header area (the first cluster)",
                ))?;
            let data = buf
                .get(after_head as usize..after_head as usize + ext_len as usize)
                .unwrap_or(&[]);
            match ext_type {
                EXT_BACKING_FORMAT => {
                    header.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name = entry.get(2..).unwrap_or(&[]);
                        let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        feature_names.push((
                            entry.first().copied().unwrap_or(0),
                            entry.get(1).copied().unwrap_or(0),
                            String::from_utf8_lossy(name.get(..name_len).unwrap_or(&[]))
                                .into_owned(),
                        ));
                    }
                }
                EXT_DATA_FILE => data_file_ext = true,
                // Bitmaps, encryption and unknown extensions: not needed to read the disk.
                _ => {}
            }
            pos = ext_stop;
        }

        let unknown = header.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|bit| unknown & (1u64 << bit) != 0)
                .map(|bit| {
                    feature_names
                        .iter()
                        .find(|(kind, b, _)| *kind == 0 && *b == bit)
                        .map(|(_, _, name)| format!("bit {bit}: {name}"))
                        .unwrap_or_else(|| format!("bit {bit}: unnamed"))
                })
                .collect();
            return Err(Qcow2Error::UnknownIncompatibleFeatures {
                bits: unknown,
                names: names.join(", "),
            });
        }
        if header.incompatible_features & INCOMPAT_DATA_FILE != 0 || data_file_ext {
            return Err(Qcow2Error::ExternalDataFile);
        }

        if backing_offset != 0 {
            if backing_size == 0 || backing_size > MAX_BACKING_NAME {
                return Err(bad(
                    "backing_file_size",
                    backing_size.into(),
                    "must be 1 to 1023 bytes",
                ));
            }
            let name = backing_offset
                .checked_add(backing_size.into())
                .filter(|&end| end <= cluster_size && end <= buf.len() as u64)
                .and_then(|end| buf.get(backing_offset as usize..end as usize))
                .ok_or(bad(
                    "backing_file_offset",
                    backing_offset,
                    "the backing file name must lie in the first cluster",
                ))?;
            header.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }

        header.check_tables(file_size)?;
        Ok(header)
    }

    /// Checks the L1 and refcount tables against the virtual size and the file.
    fn check_tables(&self, file_size: u64) -> Result<(), Qcow2Error> {
        let cluster_size = self.cluster_size();
        // Bytes one L1 entry maps: a cluster of L2 entries, each mapping a cluster.
        let l1_span = 1u64 << (self.cluster_bits + self.l2_bits());
        let needed = self.size.div_ceil(l1_span);
        if needed > MAX_L1_BYTES / 8 {
            return Err(bad(
                "size",
                self.size,
                "the virtual size needs an L1 table larger than 32 MiB",
            ));
        }
        let l1_size = u64::from(self.l1_size);
        if l1_size < needed {
            return Err(bad(
                "l1_size",
                l1_size,
                "the L1 table is too small for the virtual size",
            ));
        }
        if l1_size > MAX_L1_BYTES / 8 {
            return Err(bad(
                "l1_size",
                l1_size,
                "the L1 table would be larger than 32 MiB",
            ));
        }
        if l1_size > 0 {
            check_table(
                "l1_table_offset",
                self.l1_table_offset,
                l1_size * 8,
                cluster_size,
                file_size,
            )?;
        }
        let reftable_len = u64::from(self.refcount_table_clusters) * cluster_size;
        if self.refcount_table_clusters == 0 || reftable_len > MAX_REFTABLE_BYTES {
            return Err(bad(
                "refcount_table_clusters",
                self.refcount_table_clusters.into(),
                "the refcount table must have 1 cluster to 8 MiB",
            ));
        }
        check_table(
            "refcount_table_offset",
            self.refcount_table_offset,
            reftable_len,
            cluster_size,
            file_size,
        )
    }
}

/// Builds a version 3 header (104 bytes plus the compression type, padded to 112) for
/// `create` and for tests.
#[allow(clippy::too_many_arguments)]
pub fn encode_v3(
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    incompatible_features: u64,
    refcount_order: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; 112];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = h.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(0, &MAGIC.to_be_bytes());
    put(4, &3u32.to_be_bytes());
    put(20, &cluster_bits.to_be_bytes());
    put(24, &size.to_be_bytes());
    put(36, &l1_size.to_be_bytes());
    put(40, &l1_table_offset.to_be_bytes());
    put(48, &refcount_table_offset.to_be_bytes());
    put(56, &refcount_table_clusters.to_be_bytes());
    put(72, &incompatible_features.to_be_bytes());
    put(96, &refcount_order.to_be_bytes());
    put(100, &112u32.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid header for a 1 MiB disk with 64 KiB clusters: header, refcount table,
    /// L1 table in clusters 0, 1 and 2, the file four clusters long.
    fn valid() -> (Vec<u8>, u64) {
        let mut buf = encode_v3(16, 1 << 20, 1, 0x20000, 0x10000, 1, 0, 4);
        buf.resize(1 << 16, 0);
        (buf, 4 << 16)
    }

    fn set32(buf: &mut [u8], at: usize, v: u32) {
        buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn set64(buf: &mut [u8], at: usize, v: u64) {
        buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn valid_header_parses() {
        let (buf, size) = valid();
        let h = Header::parse(&buf, size).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 20);
        assert_eq!(h.refcount_block_entries(), 32768);
        assert!(h.backing_file.is_none());
    }

    #[test]
    fn truncated_header_is_refused() {
        let (buf, size) = valid();
        assert!(matches!(
            Header::parse(&buf[..50], size),
            Err(Qcow2Error::TruncatedHeader { .. })
        ));
        assert!(matches!(
            Header::parse(&buf[..80], size),
            Err(Qcow2Error::TruncatedHeader { .. })
        ));
    }

    #[test]
    fn bad_fields_are_named() {
        type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Corrupt, &str)> = vec![
            (Box::new(|b| set32(b, 0, 0x1234)), "magic"),
            (Box::new(|b| set32(b, 4, 4)), "version"),
            (Box::new(|b| set32(b, 20, 8)), "cluster_bits"),
            (Box::new(|b| set32(b, 20, 22)), "cluster_bits"),
            (Box::new(|b| set32(b, 96, 7)), "refcount_order"),
            (Box::new(|b| set32(b, 100, 0xffff_fff8)), "header_length"),
            (Box::new(|b| set32(b, 100, 100)), "header_length"),
            (Box::new(|b| set32(b, 36, 0x0100_0000)), "l1_size"),
            (Box::new(|b| set32(b, 36, 0)), "l1_size"),
            (Box::new(|b| set64(b, 40, 0x20001)), "l1_table_offset"),
            (Box::new(|b| set64(b, 40, 0x1_0000_0000)), "l1_table_offset"),
            (Box::new(|b| set64(b, 48, !0xffff)), "refcount_table_offset"),
            (
                Box::new(|b| set32(b, 56, 0x1000)),
                "refcount_table_clusters",
            ),
            (Box::new(|b| set64(b, 24, u64::MAX)), "size"),
            (Box::new(|b| set64(b, 72, 1 << 40)), "unknown incompatible"),
            (
                Box::new(|b| set64(b, 72, INCOMPAT_DATA_FILE)),
                "external data file",
            ),
            (Box::new(|b| set32(b, 32, 1)), "encrypted"),
            (
                Box::new(|b| {
                    set64(b, 8, 0x200);
                    set32(b, 16, 5000);
                }),
                "backing_file_size",
            ),
            (
                Box::new(|b| {
                    set64(b, 8, 0xfffe);
                    set32(b, 16, 100);
                }),
                "backing_file_offset",
            ),
            // An extension whose length runs past the first cluster.
            (
                Box::new(|b| {
                    set32(b, 112, 0x1234);
                    set32(b, 116, 0xffff_ff00);
                }),
                "header extension length",
            ),
        ];
        for (corrupt, what) in cases {
            let (mut buf, size) = valid();
            corrupt(&mut buf);
            let err = Header::parse(&buf, size).unwrap_err().to_string();
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn unknown_features_are_named_from_the_table() {
        let (mut buf, size) = valid();
        set64(&mut buf, 72, 1 << 9);
        set32(&mut buf, 112, EXT_FEATURE_TABLE);
        set32(&mut buf, 116, 48);
        buf[120] = 0;
        buf[121] = 9;
        buf[122..126].copy_from_slice(b"warp");
        let err = Header::parse(&buf, size).unwrap_err().to_string();
        assert!(err.contains("bit 9: warp"), "{err}");
    }

    #[test]
    fn backing_name_and_format_are_read() {
        let (mut buf, size) = valid();
        set32(&mut buf, 112, EXT_BACKING_FORMAT);
        set32(&mut buf, 116, 5);
        buf[120..125].copy_from_slice(b"qcow2");
        set64(&mut buf, 8, 0x200);
        set32(&mut buf, 16, 8);
        buf[0x200..0x208].copy_from_slice(b"base.img");
        let h = Header::parse(&buf, size).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
    }
}
