//! The crate's error type.

use std::io;

use crate::backing::Backing;

/// Everything that can go wrong while building, registering or measuring guest RAM.
///
/// Each message says what went wrong and, where there is one, how to fix it.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// The configured guest memory size is zero.
    #[error("guest memory size is 0 bytes; configure at least one 4 KiB page of guest RAM")]
    ZeroSize,

    /// The configured size is not a multiple of the backing's page size.
    #[error(
        "guest memory size {size:#x} is not a multiple of {alignment:#x} bytes, the page size \
         of {backing} backing; round it to {rounded_up:#x} (or down to a multiple of {alignment:#x})"
    )]
    UnalignedSize {
        /// The requested size in bytes.
        size: u64,
        /// The alignment the backing requires.
        alignment: u64,
        /// The requested backing.
        backing: Backing,
        /// `size` rounded up to the next multiple of `alignment`.
        rounded_up: u64,
    },

    /// The configured size is larger than the host's memory.
    #[error(
        "guest memory size of {requested} bytes exceeds what the host allows: {host_limit} bytes \
         (MemTotal in /proc/meminfo); configure a smaller guest or run on a host with more RAM"
    )]
    TooLarge {
        /// The requested size in bytes.
        requested: u64,
        /// The host limit in bytes.
        host_limit: u64,
    },

    /// The guest-physical layout would end beyond what x86-64 can address or the host can map.
    #[error(
        "guest RAM would end at guest-physical {end:#x}, beyond the limit {limit:#x}; \
         configure a smaller guest"
    )]
    AddressSpaceExceeded {
        /// The end (exclusive) of the layout.
        end: u64,
        /// The highest allowed end.
        limit: u64,
    },

    /// Not enough 2 MiB huge pages are available for hugetlbfs backing.
    #[error(
        "hugetlbfs backing needs {needed_pages} free 2 MiB huge pages but only {available_pages} \
         are available; reserve more as root with \
         `echo {suggested_nr_hugepages} > /proc/sys/vm/nr_hugepages` (or \
         /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages), or use \
         Backing::TransparentHugePages which needs no reservation"
    )]
    HugePagesUnavailable {
        /// How many 2 MiB pages the guest needs.
        needed_pages: u64,
        /// How many 2 MiB pages are free and not reserved by others.
        available_pages: u64,
        /// A value for `nr_hugepages` that would make the request fit.
        suggested_nr_hugepages: u64,
    },

    /// Mapping guest RAM into the process failed.
    #[error(
        "failed to mmap guest RAM: {0}; check the process's address-space and memory limits \
         (ulimit -v, overcommit settings)"
    )]
    Mmap(#[source] io::Error),

    /// Creating or sizing the memfd that backs guest RAM failed.
    #[error("failed to create or size the memfd backing guest RAM: {0}")]
    Memfd(#[source] io::Error),

    /// Applying `madvise` advice to guest RAM failed.
    #[error("madvise({advice}) on guest RAM failed: {source}")]
    Madvise {
        /// The advice that failed.
        advice: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Prefaulting guest RAM failed (usually: not enough host memory).
    #[error(
        "prefaulting guest RAM failed: {0}; the host may not have enough free memory for the \
         whole guest, configure a smaller guest or disable prefault"
    )]
    Prefault(#[source] io::Error),

    /// Assembling the regions into a `GuestMemoryMmap` failed.
    #[error("failed to assemble the guest memory regions: {0}")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),

    /// A KVM ioctl failed.
    #[error("KVM ioctl failed: {0}")]
    Kvm(#[source] kvm_ioctls::Error),

    /// Registering a memory slot with KVM failed.
    #[error(
        "KVM_SET_USER_MEMORY_REGION for slot {slot} (guest {guest_addr:#x}, {size:#x} bytes) \
         failed: {source}; the slot number may be in use or above the VM's KVM_CAP_NR_MEMSLOTS, \
         choose another SlotOptions::first_slot"
    )]
    SlotRegistration {
        /// The slot number.
        slot: u32,
        /// The slot's guest-physical start.
        guest_addr: u64,
        /// The slot's size in bytes.
        size: u64,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },

    /// The slot numbers would overflow `u32`.
    #[error("slot numbers starting at {first_slot} for {count} regions overflow u32; use a smaller SlotOptions::first_slot")]
    SlotOverflow {
        /// The first slot requested.
        first_slot: u32,
        /// The number of regions.
        count: usize,
    },

    /// Dirty bitmaps were requested for a slot registered without dirty logging.
    #[error(
        "slot {slot} was registered without dirty logging; register guest RAM with \
         SlotOptions {{ dirty_log: true, .. }} to read dirty bitmaps"
    )]
    DirtyLogNotEnabled {
        /// The slot number.
        slot: u32,
    },

    /// Reading a file under /proc or /sys failed.
    #[error("failed to read {path}: {source}")]
    ProcRead {
        /// The file that could not be read.
        path: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A file under /proc or /sys did not have the expected format.
    #[error("unexpected content in {path}: {detail}")]
    ProcParse {
        /// The file that could not be parsed.
        path: &'static str,
        /// What was unexpected.
        detail: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
