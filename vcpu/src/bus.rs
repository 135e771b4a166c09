//! The buses that vCPU exits are dispatched on: port I/O and MMIO address ranges mapped to
//! device handlers.
//!
//! A device implements [`BusDevice`] and is inserted into a [`Bus`] at an address range. The
//! runner looks up the range for each `in`/`out` or MMIO exit and calls the device with the
//! offset into its range. Devices take `&self` and do their own locking, so several vCPUs can
//! reach different devices (or the same one) at once.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};

/// A device that handles accesses to an address range on a [`Bus`].
pub trait BusDevice: Send + Sync {
    /// A read of `data.len()` bytes at `offset` into the device's range. Fill `data`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the device's range.
    fn write(&self, offset: u64, data: &[u8]);
}

#[derive(Clone)]
struct Range {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A set of non-overlapping address ranges, each handled by one device.
#[derive(Default)]
pub struct Bus {
    // Keyed by range start; ranges never overlap, so the last range starting at or below an
    // address is the only one that can contain it.
    ranges: RwLock<BTreeMap<u64, Range>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`. Fails if the range is empty, wraps, or overlaps a
    /// range already mapped.
    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<()> {
        let overlap = Error::BusOverlap { base, len };
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::BusOverlap { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some((&start, range)) = ranges.range(..end).next_back() {
            if start + range.len > base {
                return Err(overlap);
            }
        }
        ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// Unmaps the range that starts at `base`, returning its device.
    pub fn remove(&self, base: u64) -> Option<Arc<dyn BusDevice>> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).map(|range| range.device)
    }

    /// The device whose range contains `address`, with the offset of `address` in that range.
    pub fn resolve(&self, address: u64) -> Option<(Arc<dyn BusDevice>, u64)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&start, range) = ranges.range(..=address).next_back()?;
        let offset = address - start;
        (offset < range.len).then(|| (range.device.clone(), offset))
    }

    /// Dispatches a read. Returns false, leaving `data` all ones as an open bus reads, when no
    /// device claims `address`.
    pub fn read(&self, address: u64, data: &mut [u8]) -> bool {
        match self.resolve(address) {
            Some((device, offset)) => {
                device.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns false, dropping the write, when no device claims `address`.
    pub fn write(&self, address: u64, data: &[u8]) -> bool {
        match self.resolve(address) {
            Some((device, offset)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// The two x86 buses a vCPU exit can land on.
#[derive(Default)]
pub struct IoBuses {
    /// Port I/O (`in`/`out`), 16-bit addresses.
    pub pio: Bus,
    /// Memory-mapped I/O outside guest RAM.
    pub mmio: Bus,
}

impl IoBuses {
    /// Two empty buses.
    pub fn new() -> Self {
        Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let bus = Bus::new();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        bus.insert(0x110, 0x8, b.clone()).unwrap();

        assert!(bus.write(0x10f, &[1]));
        assert!(bus.write(0x110, &[2, 3]));
        assert!(!bus.write(0x118, &[4]));
        assert_eq!(*a.writes.lock().unwrap(), vec![(0xf, vec![1])]);
        assert_eq!(*b.writes.lock().unwrap(), vec![(0, vec![2, 3])]);

        let mut data = [0u8; 2];
        assert!(bus.read(0x105, &mut data));
        assert_eq!(data, [5, 5]);
        assert!(!bus.read(0xff, &mut data));
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn refuses_overlaps_empty_and_wrapping_ranges() {
        let bus = Bus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x10f, 1, dev.clone()).is_err());
        assert!(bus.insert(0xf0, 0x11, dev.clone()).is_err());
        assert!(bus.insert(0x80, 0x100, dev.clone()).is_err());
        assert!(bus.insert(0x200, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0xf0, 0x10, dev.clone()).unwrap();
        assert!(bus.remove(0x100).is_some());
        bus.insert(0x100, 0x20, dev).unwrap();
    }
}
