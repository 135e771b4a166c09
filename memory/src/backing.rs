//! How guest RAM is backed on the host: the [`Backing`] choices, the host limits that
//! apply to them, and the code that maps, advises and prefaults the host memory.
//!
//! vm-memory owns every mapping made here ([`MmapRegionBuilder::build`] without a raw
//! pointer), so each mapping is unmapped exactly when the last `GuestRegionMmap` that
//! refers to it is dropped.

use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{FileOffset, MmapRegion};

use crate::error::{Error, Result};
use crate::layout::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// How guest RAM is backed by host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backing {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`), 4 KiB pages.
    /// Pages are allocated on first touch.
    #[default]
    Anonymous,
    /// A memfd mapped `MAP_SHARED`: the memory can be shared with another process through
    /// [`GuestRam::backing_fd`](crate::GuestRam::backing_fd) (vhost-user, vfio-user DMA).
    SharedMemfd,
    /// 2 MiB hugetlb pages from a `MFD_HUGETLB | MFD_HUGE_2MB` memfd mapped `MAP_SHARED`.
    /// The pages must be reserved beforehand in `/proc/sys/vm/nr_hugepages`; they are
    /// reserved for the guest when it is created, so a shortage is reported up front.
    HugeTlbfs,
    /// Private anonymous memory advised with `madvise(MADV_HUGEPAGE)`, so the kernel backs it
    /// with transparent huge pages when it can (see
    /// `/sys/kernel/mm/transparent_hugepage/enabled`).
    TransparentHugePages,
}

impl Backing {
    /// The size granularity this backing requires.
    pub fn alignment(self) -> u64 {
        match self {
            Backing::HugeTlbfs => HUGE_PAGE_SIZE,
            _ => PAGE_SIZE,
        }
    }

    /// Whether the backing is a file descriptor that can be shared with other processes.
    pub fn is_fd_backed(self) -> bool {
        matches!(self, Backing::SharedMemfd | Backing::HugeTlbfs)
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backing::Anonymous => "anonymous",
            Backing::SharedMemfd => "shared memfd",
            Backing::HugeTlbfs => "hugetlbfs",
            Backing::TransparentHugePages => "transparent huge pages",
        })
    }
}

const MEMINFO: &str = "/proc/meminfo";
const HP_FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
const HP_RESV: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages";
const HP_NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

/// The host's total memory in bytes (`MemTotal` in `/proc/meminfo`).
pub fn host_mem_total() -> Result<u64> {
    let text = std::fs::read_to_string(MEMINFO).map_err(|source| Error::ProcRead {
        path: MEMINFO,
        source,
    })?;
    parse_meminfo_kb(&text, "MemTotal:")
        .map(|kb| kb * 1024)
        .ok_or_else(|| Error::ProcParse {
            path: MEMINFO,
            detail: "no MemTotal line".to_string(),
        })
}

fn parse_meminfo_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn read_sys_u64(path: &'static str) -> Result<u64> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ProcRead { path, source })?;
    text.trim().parse().map_err(|_| Error::ProcParse {
        path,
        detail: format!("expected a number, found {:?}", text.trim()),
    })
}

/// The state of the host's 2 MiB hugetlb pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugePagePool {
    /// Pages configured (`nr_hugepages`).
    pub total: u64,
    /// Pages free (`free_hugepages`, includes reserved ones).
    pub free: u64,
    /// Free pages already reserved by existing mappings (`resv_hugepages`).
    pub reserved: u64,
}

impl HugePagePool {
    /// Reads the 2 MiB pool from sysfs. A host without 2 MiB hugetlb support reads as empty.
    pub fn read() -> Result<HugePagePool> {
        if std::fs::metadata(HP_NR).is_err() {
            return Ok(HugePagePool {
                total: 0,
                free: 0,
                reserved: 0,
            });
        }
        Ok(HugePagePool {
            total: read_sys_u64(HP_NR)?,
            free: read_sys_u64(HP_FREE)?,
            reserved: read_sys_u64(HP_RESV)?,
        })
    }

    /// Pages that a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// The error describing that `size` bytes do not fit in this pool.
    pub(crate) fn shortage(&self, size: u64) -> Error {
        let needed_pages = size.div_ceil(HUGE_PAGE_SIZE);
        let available_pages = self.available();
        Error::HugePagesUnavailable {
            needed_pages,
            available_pages,
            suggested_nr_hugepages: self.total + needed_pages.saturating_sub(available_pages),
        }
    }
}

/// Validates `size` for `backing` against the host's limits.
pub(crate) fn check_host_limits(size: u64, backing: Backing) -> Result<()> {
    let host_limit = host_mem_total()?;
    if size > host_limit {
        return Err(Error::TooLarge {
            requested: size,
            host_limit,
        });
    }
    if backing == Backing::HugeTlbfs {
        let pool = HugePagePool::read()?;
        if size.div_ceil(HUGE_PAGE_SIZE) > pool.available() {
            return Err(pool.shortage(size));
        }
    }
    Ok(())
}

/// Creates the memfd for fd-backed backings, sized to `size` bytes.
pub(crate) fn create_backing_file(backing: Backing, size: u64) -> Result<Option<Arc<File>>> {
    let (name, flags): (&CStr, libc::c_uint) = match backing {
        Backing::SharedMemfd => (c"vmkit-guest-ram", libc::MFD_CLOEXEC),
        Backing::HugeTlbfs => (
            c"vmkit-guest-ram-hugetlb",
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        ),
        Backing::Anonymous | Backing::TransparentHugePages => return Ok(None),
    };
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid memfd flags;
    // the return value is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create, is valid and owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(Error::Memfd)?;
    Ok(Some(Arc::new(file)))
}

/// Maps `len` bytes of host memory for one guest RAM range.
///
/// `file` is the backing memfd and the offset of this range in it, for fd-backed backings.
pub(crate) fn map_range(
    backing: Backing,
    len: u64,
    file: Option<(&Arc<File>, u64)>,
) -> Result<MmapRegion> {
    let len_usize = usize::try_from(len).map_err(|_| Error::AddressSpaceExceeded {
        end: len,
        limit: usize::MAX as u64,
    })?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let builder = MmapRegionBuilder::new(len_usize).with_mmap_prot(prot);
    let builder = match (backing, file) {
        (Backing::Anonymous | Backing::TransparentHugePages, _) => {
            builder.with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        }
        (Backing::SharedMemfd, Some((file, offset))) => builder
            .with_file_offset(FileOffset::from_arc(Arc::clone(file), offset))
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE),
        // No MAP_NORESERVE: the huge pages are reserved now, so a shortage fails here
        // instead of as a SIGBUS on first touch.
        (Backing::HugeTlbfs, Some((file, offset))) => builder
            .with_file_offset(FileOffset::from_arc(Arc::clone(file), offset))
            .with_mmap_flags(libc::MAP_SHARED)
            .with_hugetlbfs(true),
        (Backing::SharedMemfd | Backing::HugeTlbfs, None) => {
            return Err(Error::Memfd(io::Error::other(
                "internal error: fd-backed backing without a backing file",
            )))
        }
    };
    let region = builder.build().map_err(|e| match e {
        MmapRegionError::Mmap(err) => {
            if backing == Backing::HugeTlbfs && err.raw_os_error() == Some(libc::ENOMEM) {
                match HugePagePool::read() {
                    Ok(pool) => pool.shortage(len),
                    Err(e) => e,
                }
            } else {
                Error::Mmap(err)
            }
        }
        other => Error::Mmap(io::Error::other(other.to_string())),
    })?;
    if backing == Backing::TransparentHugePages {
        madvise(&region, libc::MADV_HUGEPAGE).map_err(|source| Error::Madvise {
            advice: "MADV_HUGEPAGE",
            source,
        })?;
    }
    Ok(region)
}

fn madvise(region: &MmapRegion, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: the range is exactly a live mapping owned by `region`; the advice values used
    // in this crate (MADV_HUGEPAGE, MADV_POPULATE_WRITE) do not change its contents.
    let ret = unsafe { libc::madvise(region.as_ptr().cast(), region.size(), advice) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes every page of `region` resident.
///
/// Uses `madvise(MADV_POPULATE_WRITE)` (Linux 5.14+) and falls back to touching one byte per
/// page on older kernels. Must only be called before the memory is handed to anyone else,
/// because the fallback reads and writes back one byte per page.
pub(crate) fn prefault(region: &MmapRegion, page_size: u64) -> Result<()> {
    match madvise(region, libc::MADV_POPULATE_WRITE) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(Error::Prefault(e)),
    }
    let base = region.as_ptr();
    let mut offset = 0usize;
    let step = page_size as usize;
    while offset < region.size() {
        // SAFETY: `offset < region.size()`, so the byte lies in the live read/write mapping
        // owned by `region`; nobody else has access to it yet, and writing back the value just
        // read leaves the contents unchanged.
        unsafe {
            let p = base.add(offset);
            std::ptr::write_volatile(p, std::ptr::read_volatile(p));
        }
        offset += step;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       24684096 kB\nMemFree:        24528772 kB\n";
        assert_eq!(parse_meminfo_kb(text, "MemTotal:"), Some(24684096));
        assert_eq!(parse_meminfo_kb(text, "MemFree:"), Some(24528772));
        assert_eq!(parse_meminfo_kb(text, "Nope:"), None);
        assert!(host_mem_total().unwrap() > 0);
    }

    #[test]
    fn alignment_per_backing() {
        assert_eq!(Backing::Anonymous.alignment(), 4096);
        assert_eq!(Backing::SharedMemfd.alignment(), 4096);
        assert_eq!(Backing::TransparentHugePages.alignment(), 4096);
        assert_eq!(Backing::HugeTlbfs.alignment(), 2 << 20);
        assert_eq!(Backing::default(), Backing::Anonymous);
    }

    #[test]
    fn shortage_suggests_enough_pages() {
        let pool = HugePagePool {
            total: 10,
            free: 4,
            reserved: 1,
        };
        match pool.shortage(8 * HUGE_PAGE_SIZE) {
            Error::HugePagesUnavailable {
                needed_pages,
                available_pages,
                suggested_nr_hugepages,
            } => {
                assert_eq!(needed_pages, 8);
                assert_eq!(available_pages, 3);
                assert_eq!(suggested_nr_hugepages, 15);
            }
            e => panic!("unexpected {e}"),
        }
        let msg = pool.shortage(8 * HUGE_PAGE_SIZE).to_string();
        assert!(msg.contains("echo 15 > /proc/sys/vm/nr_hugepages"), "{msg}");
    }
}
