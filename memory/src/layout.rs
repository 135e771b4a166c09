//! The x86-64 guest-physical memory layout and the E820 map derived from it.
//!
//! Guest RAM starts at guest-physical 0 and runs up to the 32-bit MMIO hole
//! `[MMIO_HOLE_START, MMIO_HOLE_END)` (3 GiB to 4 GiB), where PCI BARs and other
//! MMIO devices live. Whatever does not fit below the hole continues at
//! [`HIGH_RAM_START`] (4 GiB).

/// Start of the 32-bit MMIO hole (3 GiB).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Where RAM that does not fit below the hole continues (4 GiB).
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// The base page size; every guest RAM size is a multiple of it.
pub const PAGE_SIZE: u64 = 0x1000;
/// The huge page size used by hugetlbfs and THP backings (2 MiB).
pub const HUGE_PAGE_SIZE: u64 = 0x20_0000;

/// Start of the Extended BIOS Data Area; conventional RAM ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of "high memory" above the legacy VGA/BIOS area (1 MiB).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Highest guest-physical address (exclusive) x86-64 can architecturally address (52 bits).
pub const MAX_GUEST_PHYS_ADDR: u64 = 1 << 52;

/// The guest-physical RAM ranges for `size` bytes of RAM, as `(start, len)` pairs.
///
/// RAM runs from 0 up to [`MMIO_HOLE_START`]; the rest continues at [`HIGH_RAM_START`].
/// Returns an empty vector for `size == 0`.
///
/// ```
/// use vmkit_memory::layout::{ram_ranges, HIGH_RAM_START, MMIO_HOLE_START};
/// assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
/// assert_eq!(
///     ram_ranges(4 << 30),
///     vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, 1 << 30)]
/// );
/// ```
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let mut ranges = Vec::with_capacity(2);
    let low = size.min(MMIO_HOLE_START);
    if low > 0 {
        ranges.push((0, low));
    }
    if size > low {
        ranges.push((HIGH_RAM_START, size - low));
    }
    ranges
}

/// The kind of an E820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum E820Kind {
    /// Usable RAM (E820 type 1).
    Ram,
    /// Reserved, not usable by the OS (E820 type 2).
    Reserved,
}

impl E820Kind {
    /// The numeric E820 type as boot protocols expect it (1 = RAM, 2 = reserved).
    pub fn as_raw(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }
}

/// One entry of the E820 memory map handed to a boot loader or kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct E820Entry {
    /// Guest-physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

impl E820Entry {
    /// Usable RAM at `addr`, `size` bytes.
    pub fn ram(addr: u64, size: u64) -> Self {
        E820Entry {
            addr,
            size,
            kind: E820Kind::Ram,
        }
    }

    /// A reserved range at `addr`, `size` bytes.
    pub fn reserved(addr: u64, size: u64) -> Self {
        E820Entry {
            addr,
            size,
            kind: E820Kind::Reserved,
        }
    }
}

/// Builds the E820 map for the RAM ranges `ranges` (as returned by [`ram_ranges`]).
///
/// The range starting at 0 is split around the legacy area: conventional RAM
/// `[0, EBDA_START)`, the EBDA/VGA/BIOS area `[EBDA_START, 1 MiB)` reserved, and RAM from
/// 1 MiB up to the end of the range. With less RAM, entries are clipped: RAM ending below
/// the EBDA gives a single RAM entry and no reserved area; RAM ending inside the legacy area
/// gives conventional RAM plus the whole reserved area; and so on. Every other range is
/// reported as RAM as is. The MMIO hole is not listed (a gap in the map means "not RAM").
pub fn e820_map(ranges: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = Vec::with_capacity(ranges.len() + 2);
    for &(start, len) in ranges {
        if len == 0 {
            continue;
        }
        let end = start + len;
        if start >= HIGH_MEMORY_START || end <= EBDA_START {
            map.push(E820Entry {
                addr: start,
                size: len,
                kind: E820Kind::Ram,
            });
            continue;
        }
        // The range overlaps the legacy area [EBDA_START, 1 MiB).
        if start < EBDA_START {
            map.push(E820Entry {
                addr: start,
                size: EBDA_START - start,
                kind: E820Kind::Ram,
            });
        }
        let reserved_start = start.max(EBDA_START);
        map.push(E820Entry {
            addr: reserved_start,
            size: HIGH_MEMORY_START - reserved_start,
            kind: E820Kind::Reserved,
        });
        if end > HIGH_MEMORY_START {
            map.push(E820Entry {
                addr: HIGH_MEMORY_START,
                size: end - HIGH_MEMORY_START,
                kind: E820Kind::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn ranges_below_hole() {
        assert_eq!(ram_ranges(0), vec![]);
        assert_eq!(ram_ranges(PAGE_SIZE), vec![(0, PAGE_SIZE)]);
        assert_eq!(ram_ranges(512 * MIB), vec![(0, 512 * MIB)]);
        assert_eq!(
            ram_ranges(MMIO_HOLE_START - PAGE_SIZE),
            vec![(0, MMIO_HOLE_START - PAGE_SIZE)]
        );
    }

    #[test]
    fn ranges_at_hole() {
        assert_eq!(ram_ranges(3 * GIB), vec![(0, MMIO_HOLE_START)]);
    }

    #[test]
    fn ranges_across_hole() {
        assert_eq!(
            ram_ranges(3 * GIB + PAGE_SIZE),
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, PAGE_SIZE)]
        );
        assert_eq!(
            ram_ranges(8 * GIB),
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, 5 * GIB)]
        );
        // Nothing ever lands inside the hole.
        for size in [GIB, 3 * GIB, 3 * GIB + 4096, 16 * GIB] {
            for (start, len) in ram_ranges(size) {
                let end = start + len;
                assert!(end <= MMIO_HOLE_START || start >= MMIO_HOLE_END);
            }
            assert_eq!(ram_ranges(size).iter().map(|r| r.1).sum::<u64>(), size);
        }
    }

    #[test]
    fn e820_typical() {
        assert_eq!(
            e820_map(&ram_ranges(512 * MIB)),
            vec![
                E820Entry::ram(0, EBDA_START),
                E820Entry::reserved(EBDA_START, HIGH_MEMORY_START - EBDA_START),
                E820Entry::ram(HIGH_MEMORY_START, 512 * MIB - HIGH_MEMORY_START),
            ]
        );
    }

    #[test]
    fn e820_across_hole() {
        assert_eq!(
            e820_map(&ram_ranges(6 * GIB)),
            vec![
                E820Entry::ram(0, EBDA_START),
                E820Entry::reserved(EBDA_START, HIGH_MEMORY_START - EBDA_START),
                E820Entry::ram(HIGH_MEMORY_START, MMIO_HOLE_START - HIGH_MEMORY_START),
                E820Entry::ram(HIGH_RAM_START, 3 * GIB),
            ]
        );
    }

    #[test]
    fn e820_small_sizes() {
        // Below the EBDA: just RAM.
        assert_eq!(
            e820_map(&ram_ranges(64 * 1024)),
            vec![E820Entry::ram(0, 64 * 1024)]
        );
        assert_eq!(
            e820_map(&ram_ranges(0x9f000)),
            vec![E820Entry::ram(0, 0x9f000)]
        );
        // Ending inside the legacy area: conventional RAM and the reserved area.
        assert_eq!(
            e820_map(&ram_ranges(0xa0000)),
            vec![
                E820Entry::ram(0, EBDA_START),
                E820Entry::reserved(EBDA_START, HIGH_MEMORY_START - EBDA_START)
            ]
        );
        // Exactly 1 MiB: no empty RAM entry above it.
        assert_eq!(
            e820_map(&ram_ranges(MIB)),
            vec![
                E820Entry::ram(0, EBDA_START),
                E820Entry::reserved(EBDA_START, HIGH_MEMORY_START - EBDA_START)
            ]
        );
        assert_eq!(e820_map(&[]), vec![]);
    }

    #[test]
    fn e820_raw_kinds() {
        assert_eq!(E820Kind::Ram.as_raw(), 1);
        assert_eq!(E820Kind::Reserved.as_raw(), 2);
    }
}
