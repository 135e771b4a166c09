//! Engines that run an [`AsyncDisk`](crate::AsyncDisk)'s requests: a pool of threads doing
//! blocking I/O, and io_uring.

pub mod pool;
pub mod uring;

use crate::disk::{request_len, DiskInfo, Request};
use crate::error::{Error, Result};
use crate::iobuf::IoBuf;

/// Checks a request against the disk before it is queued, so bad requests fail at push.
pub(crate) fn check_request(info: &DiskInfo, request: &Request<'_>) -> Result<()> {
    let (offset, len, writes) = match *request {
        Request::Read { offset, bufs } => (offset, request_len(bufs)?, false),
        Request::Write { offset, bufs } => (offset, request_len(bufs)?, true),
        Request::Flush => return Ok(()),
        Request::Discard { offset, len } => {
            if !info.discard && !info.read_only {
                return Err(Error::DiscardDisabled);
            }
            (offset, len, true)
        }
        Request::WriteZeroes { offset, len } => (offset, len, true),
    };
    if writes && info.read_only {
        return Err(Error::ReadOnly);
    }
    info.check_range(offset, len)
}

/// The buffers of a queued request, kept inline for the common short lists so queuing does
/// not allocate.
pub(crate) enum Iovecs {
    Inline(usize, [libc::iovec; 4]),
    Heap(Vec<libc::iovec>),
}

// SAFETY: the iovecs point into memory that `AsyncDisk::push`'s contract keeps valid until
// completion, on whichever thread runs the request.
unsafe impl Send for Iovecs {}

impl Iovecs {
    pub(crate) fn new(bufs: &[IoBuf<'_>]) -> Self {
        let iovecs = IoBuf::as_iovecs(bufs);
        if iovecs.len() <= 4 {
            let mut inline = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 4];
            inline[..iovecs.len()].copy_from_slice(iovecs);
            Iovecs::Inline(iovecs.len(), inline)
        } else {
            Iovecs::Heap(iovecs.to_vec())
        }
    }

    pub(crate) fn as_slice(&self) -> &[libc::iovec] {
        match self {
            Iovecs::Inline(len, inline) => &inline[..*len],
            Iovecs::Heap(vec) => vec,
        }
    }

    /// The buffers again, for the synchronous disk.
    pub(crate) fn as_bufs(&self) -> &[IoBuf<'static>] {
        let iovecs = self.as_slice();
        // SAFETY: IoBuf is repr(transparent) over iovec; the 'static lifetime is the push
        // contract's promise that the memory outlives the request.
        unsafe { std::slice::from_raw_parts(iovecs.as_ptr().cast(), iovecs.len()) }
    }
}
