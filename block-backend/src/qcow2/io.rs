//! Host I/O on the image file, aligned for `O_DIRECT` when the cache mode asks for it.
//!
//! Without `O_DIRECT` these are plain `pread`/`pwrite` loops. With it, a request whose
//! offset, length and buffers meet the file's `request_alignment` and `memory_alignment`
//! goes straight to the file; anything else (8-byte table entries, refcounts, unaligned
//! guest requests) is bounced through an aligned buffer, writes by read-modify-write of
//! the edge blocks. Every write happens under the metadata lock, so two read-modify-write
//! cycles on one block cannot undo each other.

use std::borrow::Cow;
use std::io;
use std::os::unix::io::AsRawFd;

use crate::iobuf::{copy_from_iovecs, copy_into_iovecs, AlignedBuffer};
use crate::raw::RawDisk;
use crate::SyncDisk;

/// The alignments direct I/O needs: (offset and length, memory); (1, 1) without it.
fn alignment(raw: &RawDisk) -> (u64, usize) {
    let info = raw.info();
    (
        u64::from(info.request_alignment.max(1)),
        info.memory_alignment.max(1) as usize,
    )
}

/// The iovecs covering `len` bytes of `iovecs` from byte `skip` on.
pub(super) fn sub_iovecs(
    iovecs: &[libc::iovec],
    mut skip: usize,
    len: usize,
) -> Cow<'_, [libc::iovec]> {
    if skip == 0 && iovecs.iter().map(|v| v.iov_len).sum::<usize>() == len {
        return Cow::Borrowed(iovecs);
    }
    let mut out = Vec::with_capacity(iovecs.len());
    let mut left = len;
    for iov in iovecs {
        if left == 0 {
            break;
        }
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        let n = (iov.iov_len - skip).min(left);
        out.push(libc::iovec {
            // SAFETY: skip < iov_len, so the pointer stays inside the buffer.
            iov_base: unsafe { iov.iov_base.cast::<u8>().add(skip).cast() },
            iov_len: n,
        });
        left -= n;
        skip = 0;
    }
    Cow::Owned(out)
}

fn aligned(iovecs: &[libc::iovec], offset: u64, align: u64, mem: usize) -> bool {
    let len: usize = iovecs.iter().map(|v| v.iov_len).sum();
    offset % align == 0
        && len as u64 % align == 0
        && iovecs
            .iter()
            .all(|v| v.iov_base as usize % mem == 0 && v.iov_len as u64 % align == 0)
}

/// `preadv` of exactly the bytes `iovecs` cover, which meet the alignment; what lies past
/// the end of the file reads as zeroes.
fn preadv_full(raw: &RawDisk, offset: u64, iovecs: &[libc::iovec], align: u64) -> io::Result<()> {
    let len: usize = iovecs.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    while done < len {
        let rest = sub_iovecs(iovecs, done, len - done);
        // SAFETY: the iovecs are valid for writes of their lengths (IoBuf's contract, or
        // slices of our own buffers); at most as many as the caller passed.
        let ret = unsafe {
            libc::preadv(
                raw.file().as_raw_fd(),
                rest.as_ptr(),
                rest.len().min(libc::c_int::MAX as usize) as libc::c_int,
                (offset + done as u64) as libc::off_t,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let n = ret as usize;
        done += n;
        // End of file; with O_DIRECT a short read that leaves an unaligned offset is the
        // end of the file too (the next read could not be issued).
        if n == 0 || (align > 1 && (done as u64) % align != 0) {
            super::zero_range(iovecs, done, len - done);
            return Ok(());
        }
    }
    Ok(())
}

/// `pwritev` of all the bytes `iovecs` cover.
fn pwritev_full(raw: &RawDisk, offset: u64, iovecs: &[libc::iovec]) -> io::Result<()> {
    let len: usize = iovecs.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    while done < len {
        let rest = sub_iovecs(iovecs, done, len - done);
        // SAFETY: the iovecs are valid for reads of their lengths.
        let ret = unsafe {
            libc::pwritev(
                raw.file().as_raw_fd(),
                rest.as_ptr(),
                rest.len().min(libc::c_int::MAX as usize) as libc::c_int,
                (offset + done as u64) as libc::off_t,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ret == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the host wrote nothing",
            ));
        }
        done += ret as usize;
    }
    Ok(())
}

/// Whether writing `len` bytes of `iovecs` from byte `skip` on at host `offset` goes
/// straight to the file, without a read-modify-write cycle through a bounce buffer.
pub(super) fn writes_directly(
    raw: &RawDisk,
    offset: u64,
    iovecs: &[libc::iovec],
    skip: usize,
    len: usize,
) -> bool {
    let (align, mem) = alignment(raw);
    align == 1 && mem == 1 || aligned(&sub_iovecs(iovecs, skip, len), offset, align, mem)
}

/// One `preadv2(RWF_NOWAIT)` of `len` bytes at host `offset` into `iovecs` from byte `skip`
/// on: `Some(true)` if it read them all, `Some(false)` if it would block or read short,
/// `None` if the host does not support `RWF_NOWAIT`.
pub(super) fn read_nowait(
    raw: &RawDisk,
    offset: u64,
    iovecs: &[libc::iovec],
    skip: usize,
    len: usize,
) -> Option<bool> {
    let target = sub_iovecs(iovecs, skip, len);
    // SAFETY: the iovecs are valid for writes of their lengths; at most as many as the
    // caller passed.
    let ret = unsafe {
        libc::preadv2(
            raw.file().as_raw_fd(),
            target.as_ptr(),
            target.len().min(libc::c_int::MAX as usize) as libc::c_int,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if ret < 0 {
        return (io::Error::last_os_error().raw_os_error() != Some(libc::EOPNOTSUPP))
            .then_some(false);
    }
    Some(ret as usize == len)
}

/// Reads `len` bytes at host `offset` into `iovecs` from byte `skip` on.
pub(super) fn read_iovecs(
    raw: &RawDisk,
    offset: u64,
    iovecs: &[libc::iovec],
    skip: usize,
    len: usize,
) -> io::Result<()> {
    let target = sub_iovecs(iovecs, skip, len);
    let (align, mem) = alignment(raw);
    if align == 1 && mem == 1 || aligned(&target, offset, align, mem) {
        return preadv_full(raw, offset, &target, align);
    }
    let start = offset / align * align;
    let end = (offset + len as u64).div_ceil(align) * align;
    let mut bounce = AlignedBuffer::new((end - start) as usize, mem);
    let slice = bounce.as_mut_slice();
    let iov = [libc::iovec {
        iov_base: slice.as_mut_ptr().cast(),
        iov_len: slice.len(),
    }];
    preadv_full(raw, start, &iov, align)?;
    let from = (offset - start) as usize;
    copy_into_iovecs(&target, 0, slice.get(from..from + len).unwrap_or(&[]));
    Ok(())
}

/// Reads `buf.len()` bytes at host `offset`; what lies past the end of the file reads as
/// zeroes.
pub(super) fn read(raw: &RawDisk, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    read_iovecs(raw, offset, &iov, 0, buf.len())
}

/// Writes `len` bytes from `iovecs` (from byte `skip` on) at host `offset`. The caller
/// holds the metadata lock.
pub(super) fn write_iovecs(
    raw: &RawDisk,
    offset: u64,
    iovecs: &[libc::iovec],
    skip: usize,
    len: usize,
) -> io::Result<()> {
    let source = sub_iovecs(iovecs, skip, len);
    let (align, mem) = alignment(raw);
    if align == 1 && mem == 1 || aligned(&source, offset, align, mem) {
        return pwritev_full(raw, offset, &source);
    }
    let start = offset / align * align;
    let end = (offset + len as u64).div_ceil(align) * align;
    let mut bounce = AlignedBuffer::new((end - start) as usize, mem);
    let slice = bounce.as_mut_slice();
    let whole = slice.len();
    // The edge blocks keep what lies around the request.
    let edges = [
        (start, offset != start),
        (end - align, offset + len as u64 != end),
    ];
    for (at, partial) in edges {
        if partial {
            let from = (at - start) as usize;
            if let Some(block) = slice.get_mut(from..from + align as usize) {
                let iov = [libc::iovec {
                    iov_base: block.as_mut_ptr().cast(),
                    iov_len: block.len(),
                }];
                preadv_full(raw, at, &iov, align)?;
            }
        }
    }
    let from = (offset - start) as usize;
    if let Some(dst) = slice.get_mut(from..from + len) {
        copy_from_iovecs(&source, 0, dst);
    }
    let iov = [libc::iovec {
        iov_base: slice.as_mut_ptr().cast(),
        iov_len: whole,
    }];
    pwritev_full(raw, start, &iov)
}

/// Writes `data` at host `offset`. The caller holds the metadata lock.
pub(super) fn write(raw: &RawDisk, offset: u64, data: &[u8]) -> io::Result<()> {
    let iov = [libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    }];
    write_iovecs(raw, offset, &iov, 0, data.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_iovecs_cut_across_buffers() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 10];
        let iovecs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 10,
            },
        ];
        let sub = sub_iovecs(&iovecs, 7, 6);
        assert_eq!(sub.len(), 2);
        assert_eq!(sub[0].iov_len, 3);
        assert_eq!(sub[0].iov_base as usize, a.as_ptr() as usize + 7);
        assert_eq!(sub[1].iov_len, 3);
        assert_eq!(sub[1].iov_base as usize, b.as_ptr() as usize);
    }
}
