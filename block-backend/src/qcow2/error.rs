//! What can be wrong with a qcow2 image, each error naming the field or table at fault.

use std::path::PathBuf;

/// An image that this crate cannot or will not use, or metadata found to be corrupt
/// during I/O. Every value in a qcow2 image is untrusted: these errors are how a hostile or
/// damaged image is reported.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The file is shorter than the header it must start with.
    #[error("the header is truncated: the file has {len} bytes, the header needs {needed}")]
    TruncatedHeader {
        /// Bytes in the file.
        len: u64,
        /// Bytes the header needs.
        needed: u64,
    },
    /// The magic number is not `QFI\xfb`.
    #[error("not a qcow2 image: magic is {0:#010x}, expected 0x514649fb")]
    BadMagic(u32),
    /// A version other than 2 or 3.
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    UnsupportedVersion(u32),
    /// A header field or table entry with a value out of its range.
    #[error("header field {field} is {value}: {reason}")]
    BadField {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An offset into the image file that is not aligned to a cluster.
    #[error("{field} {offset:#x} is not aligned to the cluster size {cluster_size}")]
    Unaligned {
        /// The field or table.
        field: &'static str,
        /// The offset.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A range of the image file that reaches past the end of the file.
    #[error("{field} at {offset:#x} of {len} bytes reaches past the end of the file ({file_size} bytes)")]
    PastEnd {
        /// The field or table.
        field: &'static str,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the image file.
        file_size: u64,
    },
    /// Incompatible feature bits this crate does not know.
    #[error(
        "the image uses unknown incompatible features {bits:#x} ({names}); refusing to open it"
    )]
    UnknownIncompatibleFeatures {
        /// The unknown bits.
        bits: u64,
        /// Their names from the image's feature name table, or "unnamed".
        names: String,
    },
    /// The image keeps its data in an external file.
    #[error("images with an external data file are not supported")]
    ExternalDataFile,
    /// The image is encrypted.
    #[error("encrypted images are not supported (crypt_method {0})")]
    Encrypted(u32),
    /// A compression type other than zlib (0) and zstd (1).
    #[error("compression type {0} is not supported (only 0 = zlib and 1 = zstd)")]
    UnsupportedCompressionType(u8),
    /// The image cannot be opened for writing as it is.
    #[error("cannot open the image for writing: {0}")]
    NotWritable(&'static str),
    /// The image has a backing file and the caller did not ask for backing files.
    #[error(
        "the image has backing file {name:?}; ask for it explicitly (Backing::FromImage or \
         Backing::File)"
    )]
    BackingNotRequested {
        /// The backing file name in the image.
        name: String,
    },
    /// Backing::FromImage on an image that does not record its backing format.
    #[error(
        "the image's backing file {name:?} has no backing format extension; the format is \
         never probed: give it explicitly with Backing::File"
    )]
    BackingFormatMissing {
        /// The backing file name in the image.
        name: String,
    },
    /// A backing format other than raw and qcow2.
    #[error("backing format {0:?} is not supported (raw, qcow2)")]
    UnsupportedBackingFormat(String),
    /// The backing chain is too long.
    #[error("the backing chain is longer than {max} images")]
    BackingChainTooDeep {
        /// The limit.
        max: usize,
    },
    /// An image appears twice in its own backing chain.
    #[error("backing chain loop: {path} is its own backing file")]
    BackingLoop {
        /// The image met twice.
        path: PathBuf,
    },
    /// A table entry that cannot be valid.
    #[error("corrupt {table} entry {index}: {value:#018x}: {reason}")]
    CorruptEntry {
        /// The table ("L1", "L2", "refcount table", "refcount block").
        table: &'static str,
        /// The entry's index.
        index: u64,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A table entry that would make a write land on the image's own metadata; the image is
    /// marked corrupt (in memory) and takes no more writes.
    #[error(
        "corrupt {table} entry {index}: {value:#018x}: host offset {offset:#x} overlaps the \
         {metadata}; the image is marked corrupt and takes no more writes"
    )]
    MetadataOverlap {
        /// The table whose entry is at fault ("L1", "L2", "refcount table").
        table: &'static str,
        /// The entry's index.
        index: u64,
        /// Its value.
        value: u64,
        /// The host offset it points at.
        offset: u64,
        /// The metadata there ("header", "L1 table", "refcount table", "refcount block",
        /// "L2 table").
        metadata: &'static str,
    },
    /// Corruption was found earlier while the image was open: writes are refused.
    #[error("the image was found corrupt while open; it takes no more writes")]
    FoundCorrupt,
    /// A compressed cluster that does not decompress to a full cluster.
    #[error("compressed cluster at {offset:#x} is corrupt: {reason}")]
    Decompression {
        /// Host offset of the compressed data.
        offset: u64,
        /// What went wrong.
        reason: String,
    },
    /// The refcount table would have to grow past its limit (8 MiB).
    #[error("the refcount table is full ({entries} entries) and cannot grow past 8 MiB")]
    RefcountTableFull {
        /// Entries in the refcount table.
        entries: u64,
    },
    /// A refcount would overflow or underflow.
    #[error("refcount of host cluster {cluster} would {what}")]
    RefcountRange {
        /// The host cluster index.
        cluster: u64,
        /// "overflow" or "drop below zero".
        what: &'static str,
    },
    /// The image file could not be opened, examined or read by [`check`](super::check()),
    /// [`map`](super::map()) or [`read_header`](super::read_header), which read the file
    /// directly.
    #[error("cannot {what} the image: {source}")]
    Io {
        /// What was being done: "open", "stat" or "read".
        what: &'static str,
        /// The error from the host.
        source: std::io::Error,
    },
    /// Metadata that [`check`](super::check()) or [`map`](super::map()) cannot walk past: a
    /// table that cannot be read, or (for `check`) internal snapshots. The message says
    /// which.
    #[error("{0}")]
    Walk(String),
    /// An image size that `create` cannot make.
    #[error("cannot create an image of {size} bytes with {cluster_size}-byte clusters: {reason}")]
    BadCreateParameters {
        /// The virtual size.
        size: u64,
        /// The cluster size.
        cluster_size: u64,
        /// What is wrong.
        reason: &'static str,
    },
}

impl Qcow2Error {
    /// Attaches the image path, making a crate error.
    pub(crate) fn at(self, path: &std::path::Path) -> crate::Error {
        crate::Error::Qcow2 {
            path: path.to_path_buf(),
            source: self,
        }
    }
}
