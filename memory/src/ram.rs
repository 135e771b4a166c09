//! [`GuestRam`]: guest RAM built from a [`MemoryConfig`].

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use crate::accounting::{self, MemoryAccounting};
use crate::backing::{self, Backing};
use crate::error::{Error, Result};
use crate::kvm::{self, KvmSlots, SlotOptions};
use crate::layout::{self, E820Entry, HUGE_PAGE_SIZE, MAX_GUEST_PHYS_ADDR, PAGE_SIZE};

/// What guest RAM to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Guest RAM in bytes; a multiple of 4 KiB (2 MiB for [`Backing::HugeTlbfs`]).
    pub size: u64,
    /// How the RAM is backed on the host.
    pub backing: Backing,
    /// Make all of guest RAM resident up front instead of on first touch.
    pub prefault: bool,
}

impl MemoryConfig {
    /// `size` bytes of private anonymous RAM, not prefaulted.
    pub fn new(size: u64) -> Self {
        MemoryConfig {
            size,
            backing: Backing::default(),
            prefault: false,
        }
    }

    /// Sets the backing.
    pub fn with_backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    /// Sets whether to prefault.
    pub fn with_prefault(mut self, prefault: bool) -> Self {
        self.prefault = prefault;
        self
    }
}

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start address.
    pub start: GuestAddress,
    /// Size in bytes.
    pub size: u64,
    /// Offset of this range in [`GuestRam::backing_fd`] for fd-backed backings (`None`
    /// otherwise). The ranges are laid out back to back in the file in guest-physical order:
    /// the first at offset 0, the next at the size of the first, and so on.
    pub file_offset: Option<u64>,
}

/// Guest RAM: the host mappings, their guest-physical layout and the backing file.
///
/// Dropping it unmaps the memory once nothing else (e.g. a clone of
/// [`memory`](Self::memory) or a [`KvmSlots`]) refers to it.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    ranges: Vec<RamRange>,
    size: u64,
    backing: Backing,
    file: Option<Arc<File>>,
}

impl GuestRam {
    /// Builds guest RAM as described by `config`.
    ///
    /// Fails with [`Error::ZeroSize`], [`Error::UnalignedSize`], [`Error::TooLarge`] (larger
    /// than the host's `MemTotal`), [`Error::AddressSpaceExceeded`], or, for hugetlbfs,
    /// [`Error::HugePagesUnavailable`] before mapping anything; and with mapping, memfd,
    /// madvise or prefault errors after.
    pub fn new(config: &MemoryConfig) -> Result<GuestRam> {
        let MemoryConfig {
            size,
            backing,
            prefault,
        } = *config;
        validate(size, backing)?;
        backing::check_host_limits(size, backing)?;

        let file = backing::create_backing_file(backing, size)?;
        let page_size = if backing == Backing::HugeTlbfs {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };

        let mut regions = Vec::new();
        let mut ranges = Vec::new();
        let mut offset = 0u64;
        for (start, len) in layout::ram_ranges(size) {
            let file_offset = file.as_ref().map(|_| offset);
            let mapping = backing::map_range(backing, len, file.as_ref().map(|f| (f, offset)))?;
            if prefault {
                backing::prefault(&mapping, page_size)?;
            }
            let region = GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(
                Error::AddressSpaceExceeded {
                    end: start.saturating_add(len),
                    limit: u64::MAX,
                },
            )?;
            regions.push(region);
            ranges.push(RamRange {
                start: GuestAddress(start),
                size: len,
                file_offset,
            });
            offset += len;
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(Error::Regions)?;
        Ok(GuestRam {
            memory,
            ranges,
            size,
            backing,
            file,
        })
    }

    /// The guest memory regions, for device emulation and loaders.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The backing in use.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The guest-physical RAM ranges, ascending (see [`layout::ram_ranges`]).
    pub fn ranges(&self) -> Vec<RamRange> {
        self.ranges.clone()
    }

    /// The E820 map for boot loaders (see [`layout::e820_map`]).
    pub fn e820(&self) -> Vec<E820Entry> {
        let ranges: Vec<(u64, u64)> = self.ranges.iter().map(|r| (r.start.0, r.size)).collect();
        layout::e820_map(&ranges)
    }

    /// The file descriptor behind guest RAM, for sharing it with another process (vfio-user
    /// DMA, vhost-user).
    ///
    /// `Some` for [`Backing::SharedMemfd`] and [`Backing::HugeTlbfs`], `None` for the
    /// anonymous backings. Range `i` of [`ranges`](Self::ranges) lives at
    /// `ranges()[i].file_offset` in the file.
    pub fn backing_fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd())
    }

    /// Registers each region with the VM as one KVM memory slot
    /// (`KVM_SET_USER_MEMORY_REGION`), numbered from `options.first_slot`.
    ///
    /// The caller must keep this `GuestRam` (or the returned [`KvmSlots`], which holds a
    /// reference to the mappings) alive as long as the `VmFd`, or call
    /// [`KvmSlots::unregister`] first: KVM refers to the host mappings by address, and a guest
    /// running on unmapped (or, worse, re-used) host addresses would corrupt the VMM. If a
    /// registration fails, the slots registered so far are removed again.
    pub fn register_with_kvm(&self, vm: &VmFd, options: SlotOptions) -> Result<KvmSlots> {
        kvm::register(&self.memory, vm, options)
    }

    /// Measures guest and VMM memory from `/proc/self/smaps` (see [`crate::accounting`]).
    pub fn accounting(&self) -> Result<MemoryAccounting> {
        let host: Vec<(u64, u64)> = self
            .memory
            .iter()
            .map(|r| (r.as_ptr() as u64, r.size() as u64))
            .collect();
        accounting::measure(&host, self.size)
    }
}

/// Checks `size` on its own (no host limits).
fn validate(size: u64, backing: Backing) -> Result<()> {
    if size == 0 {
        return Err(Error::ZeroSize);
    }
    let alignment = backing.alignment();
    if size % alignment != 0 {
        return Err(Error::UnalignedSize {
            size,
            alignment,
            backing,
            rounded_up: size.div_ceil(alignment).saturating_mul(alignment),
        });
    }
    let end = layout::ram_ranges(size)
        .last()
        .map_or(0, |&(start, len)| start.saturating_add(len));
    if end > MAX_GUEST_PHYS_ADDR {
        return Err(Error::AddressSpaceExceeded {
            end,
            limit: MAX_GUEST_PHYS_ADDR,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::{Mutex, MutexGuard};

    use vm_memory::{Bytes, GuestMemoryRegion};

    use super::*;
    use crate::backing::{host_mem_total, HugePagePool};
    use crate::layout::{HIGH_RAM_START, MMIO_HOLE_START};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// Tests that allocate or measure memory run one at a time, so that one test's guest RAM
    /// does not show up in another's VMM accounting.
    static MEMORY_TESTS: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        MEMORY_TESTS.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_read_back(ram: &GuestRam) {
        for r in ram.ranges() {
            let first = r.start;
            let last = GuestAddress(r.start.0 + r.size - 8);
            ram.memory()
                .write_obj(0x1122_3344_5566_7788u64, first)
                .unwrap();
            ram.memory()
                .write_obj(!0x1122_3344_5566_7788u64, last)
                .unwrap();
            assert_eq!(
                ram.memory().read_obj::<u64>(first).unwrap(),
                0x1122_3344_5566_7788
            );
            assert_eq!(
                ram.memory().read_obj::<u64>(last).unwrap(),
                !0x1122_3344_5566_7788
            );
        }
    }

    /// The VmFlags of the VMA containing `addr` in /proc/self/smaps.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((s, e)) = first.split_once('-') {
                if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                    inside = s <= addr && addr < e;
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.to_string();
                }
            }
        }
        panic!("no VMA contains {addr:#x}");
    }

    #[test]
    fn zero_size() {
        assert!(matches!(
            GuestRam::new(&MemoryConfig::new(0)),
            Err(Error::ZeroSize)
        ));
    }

    #[test]
    fn unaligned_sizes() {
        match GuestRam::new(&MemoryConfig::new(4096 + 1)) {
            Err(Error::UnalignedSize {
                alignment,
                rounded_up,
                ..
            }) => {
                assert_eq!(alignment, 4096);
                assert_eq!(rounded_up, 8192);
            }
            other => panic!("expected UnalignedSize, got {other:?}"),
        }
        let hugetlb = MemoryConfig::new(3 * MIB).with_backing(Backing::HugeTlbfs);
        match GuestRam::new(&hugetlb) {
            Err(e @ Error::UnalignedSize { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("0x200000") && msg.contains("hugetlbfs"),
                    "{msg}"
                );
            }
            other => panic!("expected UnalignedSize, got {other:?}"),
        }
    }

    #[test]
    fn too_large() {
        let total = host_mem_total().unwrap();
        let size = (total / PAGE_SIZE + 1) * PAGE_SIZE;
        match GuestRam::new(&MemoryConfig::new(size)) {
            Err(e @ Error::TooLarge { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&size.to_string()), "{msg}");
                assert!(msg.contains(&total.to_string()), "{msg}");
                assert!(msg.contains("exceeds what the host allows"), "{msg}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn address_space_exceeded() {
        assert!(matches!(
            validate(MAX_GUEST_PHYS_ADDR, Backing::Anonymous),
            Err(Error::AddressSpaceExceeded { .. })
        ));
        assert!(validate(MAX_GUEST_PHYS_ADDR - GIB, Backing::Anonymous).is_ok());
    }

    #[test]
    fn anonymous_works() {
        let _g = serial();
        let ram = GuestRam::new(&MemoryConfig::new(16 * MIB)).unwrap();
        assert_eq!(ram.size(), 16 * MIB);
        assert_eq!(ram.backing(), Backing::Anonymous);
        assert!(ram.backing_fd().is_none());
        assert_eq!(
            ram.ranges(),
            vec![RamRange {
                start: GuestAddress(0),
                size: 16 * MIB,
                file_offset: None
            }]
        );
        write_read_back(&ram);
        assert_eq!(ram.e820().len(), 3);
    }

    #[test]
    fn anonymous_across_the_hole() {
        let _g = serial();
        // MAP_NORESERVE: 3 GiB + 2 MiB costs nothing until touched.
        let ram = GuestRam::new(&MemoryConfig::new(3 * GIB + 2 * MIB)).unwrap();
        let ranges = ram.ranges();
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].start, GuestAddress(0));
        assert_eq!(ranges[0].size, MMIO_HOLE_START);
        assert_eq!(ranges[1].start, GuestAddress(HIGH_RAM_START));
        assert_eq!(ranges[1].size, 2 * MIB);
        assert_eq!(ram.memory().num_regions(), 2);
        write_read_back(&ram);
        // The hole is not guest RAM.
        assert!(ram
            .memory()
            .read_obj::<u8>(GuestAddress(MMIO_HOLE_START))
            .is_err());
        let acc = ram.accounting().unwrap();
        assert!(acc.guest_resident < 64 * MIB, "{acc:?}");
    }

    #[test]
    fn shared_memfd_is_shared() {
        let _g = serial();
        let size = 3 * GIB + 4 * MIB;
        let ram =
            GuestRam::new(&MemoryConfig::new(size).with_backing(Backing::SharedMemfd)).unwrap();
        write_read_back(&ram);
        let ranges = ram.ranges();
        assert_eq!(ranges[0].file_offset, Some(0));
        assert_eq!(ranges[1].file_offset, Some(MMIO_HOLE_START));

        let fd = ram.backing_fd().expect("memfd backing has an fd");
        // Map the low range a second time through the fd and see the guest's writes.
        let len = 16 * MIB as usize;
        // SAFETY: a fresh shared mapping of the memfd; checked below, unmapped at the end.
        let second = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(second, libc::MAP_FAILED);
        ram.memory()
            .write_obj(0xabcd_u16, GuestAddress(0x5000))
            .unwrap();
        // SAFETY: offset 0x5000 lies within the `len`-byte mapping created above.
        let seen =
            unsafe { std::ptr::read_volatile((second as *const u8).add(0x5000).cast::<u16>()) };
        assert_eq!(seen, 0xabcd);
        // And the other way round.
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile((second as *mut u8).add(0x6000).cast::<u32>(), 77) };
        assert_eq!(
            ram.memory().read_obj::<u32>(GuestAddress(0x6000)).unwrap(),
            77
        );
        // SAFETY: unmapping the mapping created above; not used afterwards.
        unsafe { libc::munmap(second, len) };

        // High RAM lives at its documented file offset.
        ram.memory()
            .write_slice(b"high", GuestAddress(HIGH_RAM_START + 0x10))
            .unwrap();
        // SAFETY: dup returns a new fd we own (checked below).
        let dup = unsafe { libc::dup(fd.as_raw_fd()) };
        assert!(dup >= 0);
        // SAFETY: `dup` is a valid fd owned by nobody else.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(dup) });
        file.seek(SeekFrom::Start(ranges[1].file_offset.unwrap() + 0x10))
            .unwrap();
        let mut buf = [0u8; 4];
        file.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"high");
        file.seek(SeekFrom::Start(0x20)).unwrap();
        file.write_all(b"low").unwrap();
        let mut back = [0u8; 3];
        ram.memory()
            .read_slice(&mut back, GuestAddress(0x20))
            .unwrap();
        assert_eq!(&back, b"low");

        // Shared memfd pages count as guest RAM.
        let acc = ram.accounting().unwrap();
        assert!(acc.guest_resident >= 3 * PAGE_SIZE, "{acc:?}");
    }

    #[test]
    fn transparent_huge_pages_are_advised() {
        let _g = serial();
        let ram =
            GuestRam::new(&MemoryConfig::new(64 * MIB).with_backing(Backing::TransparentHugePages))
                .unwrap();
        write_read_back(&ram);
        for region in ram.memory().iter() {
            let flags = vm_flags(region.as_ptr() as u64);
            assert!(
                flags.split_whitespace().any(|f| f == "hg"),
                "MADV_HUGEPAGE not applied: VmFlags {flags}"
            );
        }
        // Whether the kernel actually used huge pages is up to it; don't assert that.
    }

    /// Restores `nr_hugepages` when dropped.
    struct HugePageReservation {
        original: Option<u64>,
    }

    const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

    impl HugePageReservation {
        /// Makes sure at least `pages` 2 MiB pages are available, reserving them if needed.
        fn ensure(pages: u64) -> std::result::Result<Self, String> {
            let pool = HugePagePool::read().map_err(|e| e.to_string())?;
            if pool.available() >= pages {
                return Ok(HugePageReservation { original: None });
            }
            let want = pool.total + pages - pool.available();
            std::fs::write(NR_HUGEPAGES, want.to_string())
                .map_err(|e| format!("cannot write {NR_HUGEPAGES} (need root): {e}"))?;
            let guard = HugePageReservation {
                original: Some(pool.total),
            };
            let after = HugePagePool::read().map_err(|e| e.to_string())?;
            if after.available() < pages {
                return Err(format!(
                    "asked the kernel for {want} huge pages but only {} are available \
                     (memory too fragmented?)",
                    after.available()
                ));
            }
            Ok(guard)
        }
    }

    impl Drop for HugePageReservation {
        fn drop(&mut self) {
            if let Some(n) = self.original {
                if let Err(e) = std::fs::write(NR_HUGEPAGES, n.to_string()) {
                    eprintln!("could not restore {NR_HUGEPAGES} to {n}: {e}");
                }
            }
        }
    }

    #[test]
    fn hugetlbfs_works() {
        let _g = serial();
        let size = 16 * MIB;
        let pages = size / HUGE_PAGE_SIZE;
        let _reservation = match HugePageReservation::ensure(pages) {
            Ok(r) => r,
            Err(why) => {
                eprintln!("SKIPPED hugetlbfs_works: no {pages} free 2 MiB huge pages: {why}");
                return;
            }
        };
        let ram = GuestRam::new(&MemoryConfig::new(size).with_backing(Backing::HugeTlbfs))
            .expect("hugetlbfs guest RAM");
        assert!(ram.backing_fd().is_some());
        assert_eq!(
            ram.memory().iter().next().unwrap().is_hugetlbfs(),
            Some(true)
        );
        // The pages were reserved by the mapping.
        let pool = HugePagePool::read().unwrap();
        assert!(pool.reserved >= pages, "{pool:?}");
        write_read_back(&ram);
        // Two huge pages touched (first and last).
        let acc = ram.accounting().unwrap();
        assert_eq!(acc.guest_resident, 2 * HUGE_PAGE_SIZE, "{acc:?}");
        drop(ram);

        // Prefaulted, all of it is resident.
        let ram = GuestRam::new(
            &MemoryConfig::new(size)
                .with_backing(Backing::HugeTlbfs)
                .with_prefault(true),
        )
        .expect("prefaulted hugetlbfs guest RAM");
        let acc = ram.accounting().unwrap();
        assert_eq!(acc.guest_resident, size, "{acc:?}");
        assert_eq!(acc.process_resident, acc.guest_resident + acc.vmm_resident);
    }

    #[test]
    fn hugetlbfs_shortage_is_reported() {
        let _g = serial();
        let pool = HugePagePool::read().unwrap();
        let size = (pool.available() + 1) * HUGE_PAGE_SIZE;
        if size > host_mem_total().unwrap() {
            eprintln!("SKIPPED hugetlbfs_shortage_is_reported: the pool is as large as RAM");
            return;
        }
        match GuestRam::new(&MemoryConfig::new(size).with_backing(Backing::HugeTlbfs)) {
            Err(e @ Error::HugePagesUnavailable { .. }) => {
                assert!(e.to_string().contains("/proc/sys/vm/nr_hugepages"), "{e}");
            }
            other => panic!("expected HugePagesUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn accounting_splits_guest_and_vmm() {
        let _g = serial();
        let ram = GuestRam::new(&MemoryConfig::new(64 * MIB)).unwrap();
        let before = ram.accounting().unwrap();
        assert_eq!(before.guest_size, 64 * MIB);
        assert!(before.guest_resident < MIB, "{before:?}");

        let touched = 16 * MIB;
        let mut addr = 0;
        while addr < touched {
            ram.memory().write_obj(1u8, GuestAddress(addr)).unwrap();
            addr += PAGE_SIZE;
        }
        let after = ram.accounting().unwrap();
        assert!(after.guest_resident >= touched, "{after:?}");
        assert!(after.guest_resident < touched + 4 * MIB, "{after:?}");
        assert_eq!(
            after.process_resident,
            after.guest_resident + after.vmm_resident
        );
        assert!(after.vmm_resident > 0);
        // The 16 MiB went to the guest, not to the VMM.
        assert!(
            after.vmm_resident < before.vmm_resident + 4 * MIB,
            "before {before:?} after {after:?}"
        );
    }

    #[test]
    fn prefault_makes_everything_resident() {
        let _g = serial();
        for backing in [
            Backing::Anonymous,
            Backing::SharedMemfd,
            Backing::TransparentHugePages,
        ] {
            let size = 32 * MIB;
            let ram = GuestRam::new(
                &MemoryConfig::new(size)
                    .with_backing(backing)
                    .with_prefault(true),
            )
            .unwrap();
            let acc = ram.accounting().unwrap();
            assert_eq!(acc.guest_resident, size, "{backing}: {acc:?}");
            write_read_back(&ram);
        }
    }

    #[test]
    fn guest_ram_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<GuestRam>();
        check::<KvmSlots>();
    }
}
