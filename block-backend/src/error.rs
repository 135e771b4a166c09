//! Errors of the block backends.

use std::io;
use std::path::PathBuf;

/// Errors from opening a disk or doing I/O on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The image's path.
        path: PathBuf,
        /// The error from the host.
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk {
        /// The image's path.
        path: PathBuf,
    },
    /// Another process holds the image in a way that conflicts with this open (QEMU's
    /// image locking protocol, so QEMU processes count too).
    #[error(
        "{path} is in use: another process holds the {permission} permission this open \
         conflicts with (is another VM or qemu-img using the image?)"
    )]
    Locked {
        /// The image's path.
        path: PathBuf,
        /// The permission that conflicts, in QEMU's words ("write", "consistent read", ...).
        permission: &'static str,
    },
    /// The image format is not supported by this build.
    #[error("image format {0:?} is not supported")]
    UnsupportedFormat(String),
    /// A name that is not a cache mode, engine or format.
    #[error("unknown {kind} {value:?}; expected one of: {expected}")]
    UnknownName {
        /// What was being parsed ("cache mode", "engine", "format").
        kind: &'static str,
        /// The text given.
        value: String,
        /// The accepted names.
        expected: &'static str,
    },
    /// A request reaches past the end of the disk.
    #[error("request at offset {offset} of {len} bytes is outside the disk of {size} bytes")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the disk in bytes.
        size: u64,
    },
    /// A write, discard or write-zeroes request on a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// Discard was requested but is turned off for this disk.
    #[error("discard is turned off for this disk")]
    DiscardDisabled,
    /// More requests than the engine can keep in flight; reap completions and push again.
    #[error("the engine already has {0} requests in flight")]
    QueueFull(usize),
    /// Too many buffers in one request.
    #[error("a request has {count} buffers; at most {max} are allowed")]
    TooManyBuffers {
        /// Buffers in the request.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A qcow2 image that is invalid, corrupt or uses what this crate does not support.
    #[error("qcow2 image {path}: {source}")]
    Qcow2 {
        /// The image's path.
        path: PathBuf,
        /// What is wrong.
        source: crate::qcow2::Qcow2Error,
    },
    /// The host returned an error for an I/O request.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The io_uring engine could not be set up.
    #[error("io_uring setup failed: {0}")]
    UringSetup(io::Error),
    /// An engine worker thread could not be started.
    #[error("cannot start an I/O worker thread: {0}")]
    Thread(io::Error),
}

impl Error {
    /// The errno that best describes this error, for devices that report errors to a guest
    /// or to tools that speak errno.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) | Error::Open { source: e, .. } | Error::UringSetup(e) => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::ReadOnly => libc::EROFS,
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::DiscardDisabled => libc::EOPNOTSUPP,
            Error::QueueFull(_) => libc::EAGAIN,
            Error::Locked { .. } => libc::EAGAIN,
            _ => libc::EIO,
        }
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
