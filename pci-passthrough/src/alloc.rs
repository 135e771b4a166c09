//! BAR placement: first-fit, naturally aligned allocation from the VMM's address windows.
//! Expansion ROMs are placed as 32-bit memory BARs (their BAR has no high half).

use std::collections::BTreeMap;

use crate::config::BarKind;
use crate::Error;

/// A range of guest physical addresses (or I/O ports) the VMM gives to PCI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressWindow {
    /// First address.
    pub base: u64,
    /// Bytes in the window.
    pub size: u64,
}

impl AddressWindow {
    /// One past the last address (saturating at `u64::MAX`).
    fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }
}

/// The windows BARs are placed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarWindows {
    /// 32-bit memory BARs and expansion ROMs, in the hole below 4 GiB (e.g. 0xe000_0000,
    /// 256 MiB).
    pub mmio32: AddressWindow,
    /// 64-bit memory BARs, above RAM; without it they go in `mmio32`.
    pub mmio64: Option<AddressWindow>,
    /// I/O BARs (e.g. 0xc000, 16 KiB); without it I/O BARs cannot be placed.
    pub io: Option<AddressWindow>,
}

/// The two address spaces BARs live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// Memory (MMIO).
    Memory,
    /// I/O ports.
    Io,
}

impl From<BarKind> for AddressSpace {
    fn from(kind: BarKind) -> Self {
        if kind.is_memory() {
            AddressSpace::Memory
        } else {
            AddressSpace::Io
        }
    }
}

/// Hands out BAR addresses: each BAR aligned to its size (as the sizing protocol requires),
/// never overlapping another allocation of the same address space.
#[derive(Clone, Debug)]
pub struct BarAllocator {
    windows: BarWindows,
    /// Start -> size, per address space.
    memory: BTreeMap<u64, u64>,
    io: BTreeMap<u64, u64>,
}

impl BarAllocator {
    /// An allocator over `windows`, all free.
    pub fn new(windows: BarWindows) -> Self {
        BarAllocator {
            windows,
            memory: BTreeMap::new(),
            io: BTreeMap::new(),
        }
    }

    /// The windows.
    pub fn windows(&self) -> &BarWindows {
        &self.windows
    }

    fn used(&self, space: AddressSpace) -> &BTreeMap<u64, u64> {
        match space {
            AddressSpace::Memory => &self.memory,
            AddressSpace::Io => &self.io,
        }
    }

    fn used_mut(&mut self, space: AddressSpace) -> &mut BTreeMap<u64, u64> {
        match space {
            AddressSpace::Memory => &mut self.memory,
            AddressSpace::Io => &mut self.io,
        }
    }

    /// Places a BAR of `kind` and `size` (a power of two): 64-bit BARs in the 64-bit window
    /// if there is one and it has room, else in the 32-bit window.
    pub fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, Error> {
        if !size.is_power_of_two() {
            return Err(Error::InvalidBarSize(size));
        }
        let space = AddressSpace::from(kind);
        let windows: Vec<AddressWindow> = match kind {
            BarKind::Io => self.windows.io.into_iter().collect(),
            BarKind::Memory32 => vec![self.windows.mmio32],
            BarKind::Memory64 => self
                .windows
                .mmio64
                .into_iter()
                .chain([self.windows.mmio32])
                .collect(),
        };
        for window in windows {
            if let Some(base) = self.first_fit(space, window, size) {
                self.used_mut(space).insert(base, size);
                return Ok(base);
            }
        }
        Err(Error::OutOfSpace { kind, size })
    }

    fn first_fit(&self, space: AddressSpace, window: AddressWindow, size: u64) -> Option<u64> {
        let mut candidate = window.base.checked_next_multiple_of(size)?;
        // Allocations are few (one per BAR): a linear scan in address order is enough.
        for (&start, &len) in self.used(space) {
            let end = start.saturating_add(len);
            if end <= candidate {
                continue;
            }
            if candidate.checked_add(size)? <= start {
                break;
            }
            candidate = end.checked_next_multiple_of(size)?;
        }
        (candidate.checked_add(size)? <= window.end()).then_some(candidate)
    }

    /// Marks `[base, base + size)` of `space` used (a BAR the VMM placed itself); refused if
    /// it overlaps an allocation or wraps around.
    pub fn reserve(&mut self, space: AddressSpace, base: u64, size: u64) -> Result<(), Error> {
        let overlap = Error::Overlap { base, size };
        let end = base
            .checked_add(size)
            .ok_or(Error::Overlap { base, size })?;
        if size == 0 || self.overlaps(space, base, end) {
            return Err(overlap);
        }
        self.used_mut(space).insert(base, size);
        Ok(())
    }

    /// Whether `[base, end)` overlaps an allocation of `space`.
    pub fn overlaps(&self, space: AddressSpace, base: u64, end: u64) -> bool {
        self.used(space)
            .range(..end)
            .next_back()
            .is_some_and(|(&start, &len)| start.saturating_add(len) > base)
    }

    /// Frees the allocation starting at `base`; returns whether there was one.
    pub fn free(&mut self, space: AddressSpace, base: u64) -> bool {
        self.used_mut(space).remove(&base).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocator() -> BarAllocator {
        BarAllocator::new(BarWindows {
            mmio32: AddressWindow {
                base: 0xe000_0000,
                size: 0x1000_0000,
            },
            mmio64: Some(AddressWindow {
                base: 0x1_0000_0000,
                size: 0x1_0000_0000,
            }),
            io: Some(AddressWindow {
                base: 0xc000,
                size: 0x100,
            }),
        })
    }

    #[test]
    fn natural_alignment_and_no_overlap() {
        let mut a = allocator();
        let x = a.allocate(BarKind::Memory32, 0x1000).unwrap();
        let y = a.allocate(BarKind::Memory32, 0x10_0000).unwrap();
        let z = a.allocate(BarKind::Memory32, 0x1000).unwrap();
        assert_eq!(x, 0xe000_0000);
        assert_eq!(y, 0xe010_0000, "aligned to its size");
        assert_eq!(z, 0xe000_1000, "first fit fills the gap");
        let big = a.allocate(BarKind::Memory64, 0x4000_0000).unwrap();
        assert_eq!(big, 0x1_0000_0000);
        assert_eq!(big % 0x4000_0000, 0);
        let io = a.allocate(BarKind::Io, 0x20).unwrap();
        assert_eq!(io, 0xc000);
        assert_eq!(a.allocate(BarKind::Io, 0x20).unwrap(), 0xc020);
    }

    #[test]
    fn exhaustion_and_fallback() {
        let mut a = allocator();
        assert!(matches!(
            a.allocate(BarKind::Memory32, 0x2000_0000),
            Err(Error::OutOfSpace { .. })
        ));
        assert!(a.allocate(BarKind::Io, 0x200).is_err());
        assert!(a.allocate(BarKind::Memory32, 0x1001).is_err());
        // A 64-bit BAR too big for the 64-bit window falls back to nothing larger.
        assert!(a.allocate(BarKind::Memory64, 0x2_0000_0000).is_err());
        let mut no64 = BarAllocator::new(BarWindows {
            mmio64: None,
            io: None,
            ..*a.windows()
        });
        assert_eq!(
            no64.allocate(BarKind::Memory64, 0x1000).unwrap(),
            0xe000_0000
        );
        assert!(no64.allocate(BarKind::Io, 4).is_err());
        // Windows at the top of the address space do not overflow.
        let mut top = BarAllocator::new(BarWindows {
            mmio32: AddressWindow {
                base: u64::MAX - 0xfff,
                size: 0x1000,
            },
            mmio64: None,
            io: None,
        });
        assert!(top.allocate(BarKind::Memory32, 0x2000).is_err());
    }

    #[test]
    fn reserve_refuses_overlap() {
        let mut a = allocator();
        let x = a.allocate(BarKind::Memory32, 0x1000).unwrap();
        assert!(a.reserve(AddressSpace::Memory, x + 0xfff, 0x10).is_err());
        assert!(a.reserve(AddressSpace::Memory, x - 0x10, 0x11).is_err());
        assert!(a.reserve(AddressSpace::Memory, u64::MAX, 2).is_err());
        assert!(a.reserve(AddressSpace::Memory, x + 0x1000, 0).is_err());
        a.reserve(AddressSpace::Memory, x + 0x1000, 0x1000).unwrap();
        // Same addresses in I/O space are another space.
        a.reserve(AddressSpace::Io, x, 0x1000).unwrap();
        assert_eq!(a.allocate(BarKind::Memory32, 0x1000).unwrap(), 0xe000_2000);
        assert!(a.free(AddressSpace::Memory, x));
        assert!(!a.free(AddressSpace::Memory, x));
        assert_eq!(a.allocate(BarKind::Memory32, 0x1000).unwrap(), x);
    }
}
