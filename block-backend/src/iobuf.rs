//! Buffers that requests read into and write from, and aligned bounce buffers.

use std::alloc::{self, Layout};
use std::marker::PhantomData;
use std::ptr::NonNull;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// One contiguous buffer of a request: a host address range that the disk reads into or
/// writes from, usually a piece of guest memory.
///
/// It has the layout of a `struct iovec`, so a slice of them goes to `preadv` and io_uring
/// as it is. The lifetime ties it to the memory it borrows for synchronous calls; the
/// asynchronous engines take them in `unsafe` calls whose contract keeps the memory alive
/// until completion.
///
/// Reading from the disk into a buffer of guest memory does not mark the guest memory's
/// dirty bitmap: the caller marks the range when the request completes.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct IoBuf<'a> {
    iov: libc::iovec,
    _memory: PhantomData<&'a mut [u8]>,
}

// SAFETY: an IoBuf is a borrow of plain memory (like `&mut [u8]`); the pointer carries no
// thread affinity.
unsafe impl Send for IoBuf<'_> {}
// SAFETY: as above; shared references to it only read the address and length.
unsafe impl Sync for IoBuf<'_> {}

impl<'a> IoBuf<'a> {
    /// A buffer over a mutable byte slice.
    pub fn from_mut_slice(slice: &'a mut [u8]) -> Self {
        IoBuf {
            iov: libc::iovec {
                iov_base: slice.as_mut_ptr().cast(),
                iov_len: slice.len(),
            },
            _memory: PhantomData,
        }
    }

    /// A buffer over a slice of guest memory.
    pub fn from_volatile_slice<B: BitmapSlice>(slice: &VolatileSlice<'a, B>) -> Self {
        IoBuf {
            iov: libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            },
            _memory: PhantomData,
        }
    }

    /// A buffer over raw memory.
    ///
    /// # Safety
    ///
    /// `ptr` must point to `len` bytes that stay valid for reads and writes, and that
    /// nothing else accesses through a Rust reference, for the lifetime `'a`.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Self {
        IoBuf {
            iov: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            _memory: PhantomData,
        }
    }

    /// The buffer's start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.iov.iov_base.cast()
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.iov.iov_len == 0
    }

    /// The buffers as the `iovec` array system calls take.
    pub fn as_iovecs<'s>(bufs: &'s [IoBuf<'_>]) -> &'s [libc::iovec] {
        // SAFETY: IoBuf is repr(transparent) over libc::iovec, so the layouts are equal.
        unsafe { std::slice::from_raw_parts(bufs.as_ptr().cast(), bufs.len()) }
    }

    /// Total length of a list of buffers, or `None` if it overflows.
    pub fn total_len(bufs: &[IoBuf<'_>]) -> Option<u64> {
        bufs.iter()
            .try_fold(0u64, |sum, buf| sum.checked_add(buf.len() as u64))
    }
}

/// Copies `src` into the buffers, starting `skip` bytes into them. Returns the bytes copied.
pub(crate) fn copy_into_iovecs(iovecs: &[libc::iovec], mut skip: usize, src: &[u8]) -> usize {
    let mut copied = 0;
    for iov in iovecs {
        if copied == src.len() {
            break;
        }
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        let n = (iov.iov_len - skip).min(src.len() - copied);
        // SAFETY: the caller's contract (IoBuf) makes every iovec valid for writes of its
        // length; `skip + n <= iov_len` and `copied + n <= src.len()`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(copied),
                iov.iov_base.cast::<u8>().add(skip),
                n,
            );
        }
        copied += n;
        skip = 0;
    }
    copied
}

/// Copies from the buffers, starting `skip` bytes into them, into `dst`. Returns the bytes
/// copied.
pub(crate) fn copy_from_iovecs(iovecs: &[libc::iovec], mut skip: usize, dst: &mut [u8]) -> usize {
    let mut copied = 0;
    for iov in iovecs {
        if copied == dst.len() {
            break;
        }
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        let n = (iov.iov_len - skip).min(dst.len() - copied);
        // SAFETY: every iovec is valid for reads of its length (IoBuf's contract);
        // `skip + n <= iov_len` and `copied + n <= dst.len()`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                iov.iov_base.cast::<u8>().add(skip),
                dst.as_mut_ptr().add(copied),
                n,
            );
        }
        copied += n;
        skip = 0;
    }
    copied
}

/// Fills the buffers with zeroes from `skip` bytes on.
pub(crate) fn zero_iovecs(iovecs: &[libc::iovec], mut skip: usize) {
    for iov in iovecs {
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        // SAFETY: every iovec is valid for writes of its length; `skip < iov_len`.
        unsafe {
            std::ptr::write_bytes(iov.iov_base.cast::<u8>().add(skip), 0, iov.iov_len - skip);
        }
        skip = 0;
    }
}

/// A zeroed heap buffer with a chosen alignment, for `O_DIRECT` I/O of requests whose
/// buffers or offsets are not aligned.
pub struct AlignedBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuffer owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared access only reads through `&self`.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    /// A zeroed buffer of `len` bytes (at least 1) aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .expect("bounce buffer sizes and alignments are bounded by the crate");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuffer { ptr, layout }
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The buffer's bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout in `new`.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_cross_buffer_boundaries() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let bufs = [IoBuf::from_mut_slice(&mut a), IoBuf::from_mut_slice(&mut b)];
        let iovecs = IoBuf::as_iovecs(&bufs);
        assert_eq!(copy_into_iovecs(iovecs, 2, &[1, 2, 3, 4]), 4);
        let mut out = [0u8; 8];
        assert_eq!(copy_from_iovecs(iovecs, 0, &mut out), 8);
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0]);
        zero_iovecs(iovecs, 3);
        assert_eq!(copy_from_iovecs(iovecs, 0, &mut out), 8);
        assert_eq!(out, [0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(IoBuf::total_len(&bufs), Some(8));
    }

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        let buf = AlignedBuffer::new(8192, 4096);
        assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
    }
}
