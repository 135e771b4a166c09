//! Measuring how much host memory guest RAM and the VMM itself use.
//!
//! Everything here is measured from `/proc/self/smaps`, never estimated. Each VMA's
//! resident size is its `Rss` plus its `Private_Hugetlb` and `Shared_Hugetlb` (hugetlb pages
//! are not counted in `Rss`). A VMA that lies inside guest RAM counts as guest memory; a VMA
//! outside it counts as VMM memory; a VMA that straddles the boundary (which the kernel can
//! produce by merging adjacent compatible mappings) is split by asking `mincore(2)` which of
//! its guest pages are resident.

use std::fs::File;
use std::io::{self, BufRead, BufReader};

use crate::error::{Error, Result};
use crate::layout::PAGE_SIZE;

const SMAPS: &str = "/proc/self/smaps";

/// A measured report of the process's memory, split into guest RAM and VMM overhead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryAccounting {
    /// Bytes of guest RAM configured.
    pub guest_size: u64,
    /// Bytes of guest RAM resident in host memory, measured.
    pub guest_resident: u64,
    /// Resident bytes of the process excluding guest RAM: the VMM's own management memory
    /// (code, heap, stacks, device state), measured.
    pub vmm_resident: u64,
    /// Total resident bytes of the process (`guest_resident + vmm_resident`), including
    /// hugetlb pages, which the kernel's `VmRSS` leaves out.
    pub process_resident: u64,
}

/// Measures the process's memory; `guest` holds the host virtual ranges `(start, len)` of
/// guest RAM.
pub(crate) fn measure(guest: &[(u64, u64)], guest_size: u64) -> Result<MemoryAccounting> {
    let file = File::open(SMAPS).map_err(|source| Error::ProcRead {
        path: SMAPS,
        source,
    })?;
    let (process_resident, guest_resident) =
        parse_smaps(BufReader::new(file), guest, resident_by_mincore)?;
    Ok(MemoryAccounting {
        guest_size,
        guest_resident,
        vmm_resident: process_resident.saturating_sub(guest_resident),
        process_resident,
    })
}

/// One VMA being parsed.
struct Vma {
    start: u64,
    end: u64,
    resident: u64,
}

/// Streams smaps from `reader`, returning `(process_resident, guest_resident)` in bytes.
///
/// `partial` measures the resident bytes of a host range; it is used only for VMAs that
/// straddle the guest RAM boundary.
fn parse_smaps<R: BufRead>(
    mut reader: R,
    guest: &[(u64, u64)],
    partial: impl Fn(u64, u64) -> io::Result<u64>,
) -> Result<(u64, u64)> {
    let mut process = 0u64;
    let mut in_guest = 0u64;
    let mut current: Option<Vma> = None;
    let mut line = String::new();

    let mut finish = |vma: Vma| -> Result<()> {
        process += vma.resident;
        in_guest += guest_part(&vma, guest, &partial)?;
        Ok(())
    };

    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|source| Error::ProcRead {
                path: SMAPS,
                source,
            })?;
        if n == 0 {
            break;
        }
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some(key) = first.strip_suffix(':') {
            // A "Key: value [kB]" line of the current VMA.
            if !matches!(key, "Rss" | "Private_Hugetlb" | "Shared_Hugetlb") {
                continue;
            }
            let Some(vma) = current.as_mut() else {
                return Err(parse_error(&line, "field before the first VMA header"));
            };
            let kb: u64 = fields
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| parse_error(&line, "expected a size in kB"))?;
            vma.resident += kb * 1024;
        } else {
            // A VMA header: "start-end perms offset dev inode [path]".
            let (start, end) = first
                .split_once('-')
                .and_then(|(s, e)| {
                    Some((
                        u64::from_str_radix(s, 16).ok()?,
                        u64::from_str_radix(e, 16).ok()?,
                    ))
                })
                .ok_or_else(|| parse_error(&line, "expected a VMA header"))?;
            if let Some(vma) = current.take() {
                finish(vma)?;
            }
            current = Some(Vma {
                start,
                end,
                resident: 0,
            });
        }
    }
    if let Some(vma) = current.take() {
        finish(vma)?;
    }
    Ok((process, in_guest))
}

fn parse_error(line: &str, detail: &str) -> Error {
    Error::ProcParse {
        path: SMAPS,
        detail: format!("{detail}: {:?}", line.trim_end()),
    }
}

/// The resident bytes of `vma` that belong to guest RAM.
fn guest_part(
    vma: &Vma,
    guest: &[(u64, u64)],
    partial: &impl Fn(u64, u64) -> io::Result<u64>,
) -> Result<u64> {
    let overlaps: Vec<(u64, u64)> = guest
        .iter()
        .filter_map(|&(start, len)| {
            let s = start.max(vma.start);
            let e = (start + len).min(vma.end);
            (s < e).then_some((s, e))
        })
        .collect();
    let covered: u64 = overlaps.iter().map(|(s, e)| e - s).sum();
    if covered == 0 {
        return Ok(0);
    }
    if covered == vma.end - vma.start {
        return Ok(vma.resident);
    }
    let mut resident = 0;
    for (s, e) in overlaps {
        resident += partial(s, e - s).map_err(|source| Error::ProcRead {
            path: "mincore(2)",
            source,
        })?;
    }
    Ok(resident.min(vma.resident))
}

/// Resident bytes of the host range `[start, start + len)` as reported by `mincore(2)`.
fn resident_by_mincore(start: u64, len: u64) -> io::Result<u64> {
    const CHUNK_PAGES: usize = 4096;
    let mut vec = vec![0u8; CHUNK_PAGES];
    let mut resident = 0u64;
    let mut addr = start;
    let end = start + len;
    while addr < end {
        let chunk = (end - addr).min(CHUNK_PAGES as u64 * PAGE_SIZE);
        // SAFETY: `[addr, addr + chunk)` is page aligned and lies in a mapping of this
        // process (it came from /proc/self/smaps and guest RAM, both alive while we hold
        // `&GuestRam`); `vec` has room for one byte per page of the chunk. mincore only
        // writes into `vec`.
        let ret =
            unsafe { libc::mincore(addr as *mut libc::c_void, chunk as usize, vec.as_mut_ptr()) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        let pages = chunk.div_ceil(PAGE_SIZE) as usize;
        resident += vec[..pages].iter().filter(|b| **b & 1 != 0).count() as u64 * PAGE_SIZE;
        addr += chunk;
    }
    Ok(resident)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
00400000-00401000 r-xp 00000000 fd:01 123  /usr/bin/vmm
Size:                  4 kB
Rss:                   4 kB
Pss:                   4 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                1024 kB
Private_Hugetlb:       0 kB
VmFlags: rd wr mr mw me ac
7f0000400000-7f0000800000 rw-s 00000000 00:01 77  /memfd:vmkit-guest-ram-hugetlb (deleted)
Size:               4096 kB
Rss:                   0 kB
Shared_Hugetlb:     2048 kB
Private_Hugetlb:    2048 kB
7fff00000000-7fff00021000 rw-p 00000000 00:00 0  [stack]
Rss:                  16 kB
";

    fn no_partial(_: u64, _: u64) -> io::Result<u64> {
        panic!("no VMA straddles guest RAM in this sample")
    }

    #[test]
    fn sums_rss_and_hugetlb() {
        let guest = [(0x7f00_0000_0000, 0x40_0000), (0x7f00_0040_0000, 0x40_0000)];
        let (process, in_guest) = parse_smaps(SAMPLE.as_bytes(), &guest, no_partial).unwrap();
        assert_eq!(process, (4 + 1024 + 4096 + 16) * 1024);
        assert_eq!(in_guest, (1024 + 4096) * 1024);
    }

    #[test]
    fn vma_merged_across_guest_boundary_uses_partial() {
        // Guest RAM is only the first 2 MiB of the 4 MiB anonymous VMA.
        let guest = [(0x7f00_0000_0000, 0x20_0000)];
        let (process, in_guest) = parse_smaps(SAMPLE.as_bytes(), &guest, |start, len| {
            assert_eq!((start, len), (0x7f00_0000_0000, 0x20_0000));
            Ok(512 * 1024)
        })
        .unwrap();
        assert_eq!(process, (4 + 1024 + 4096 + 16) * 1024);
        assert_eq!(in_guest, 512 * 1024);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_smaps("Rss: 4 kB\n".as_bytes(), &[], no_partial).is_err());
        assert!(parse_smaps("zzz r-xp\n".as_bytes(), &[], no_partial).is_err());
    }

    #[test]
    fn mincore_counts_touched_pages() {
        let len = 64 * PAGE_SIZE as usize;
        // SAFETY: anonymous private mapping with valid arguments; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        for i in 0..5 {
            // SAFETY: in bounds of the mapping just created.
            unsafe { *(p as *mut u8).add(i * 3 * PAGE_SIZE as usize) = 1 };
        }
        let resident = resident_by_mincore(p as u64, len as u64).unwrap();
        // SAFETY: unmapping the mapping created above, not used afterwards.
        unsafe { libc::munmap(p, len) };
        assert_eq!(resident, 5 * PAGE_SIZE);
    }
}
