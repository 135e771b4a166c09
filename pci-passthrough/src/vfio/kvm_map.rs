//! [`DirectMapper`] for KVM: each direct mapping is a KVM memory slot
//! (`KVM_SET_USER_MEMORY_REGION`) taken from a range of slot numbers the VMM sets aside for
//! passthrough BARs (its RAM uses others).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use super::{DirectMapper, DirectMapping, VfioError};

/// Maps BAR memory into a KVM guest as memory slots numbered from a fixed range.
pub struct KvmDirectMapper {
    vm: Arc<VmFd>,
    slots: Range<u32>,
    /// Slots in use -> (guest address, size).
    used: Mutex<BTreeMap<u32, (u64, u64)>>,
}

impl std::fmt::Debug for KvmDirectMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmDirectMapper")
            .field("slots", &self.slots)
            .finish()
    }
}

impl KvmDirectMapper {
    /// A mapper for `vm` using memory slots `slots` (which nothing else of the VMM uses).
    pub fn new(vm: Arc<VmFd>, slots: Range<u32>) -> Self {
        KvmDirectMapper {
            vm,
            slots,
            used: Mutex::new(BTreeMap::new()),
        }
    }

    /// The mappings in place, as (slot, guest address, size).
    pub fn mappings(&self) -> Vec<DirectMapping> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.iter()
            .map(|(&id, &(guest_address, size))| DirectMapping {
                id,
                guest_address,
                size,
            })
            .collect()
    }
}

impl DirectMapper for KvmDirectMapper {
    unsafe fn map(
        &self,
        guest_address: u64,
        host_address: *mut u8,
        size: u64,
    ) -> Result<DirectMapping, VfioError> {
        let end =
            guest_address
                .checked_add(size)
                .filter(|_| size > 0)
                .ok_or(VfioError::Overlap {
                    guest_address,
                    size,
                })?;
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used
            .values()
            .any(|&(base, len)| guest_address < base.saturating_add(len) && base < end)
        {
            return Err(VfioError::Overlap {
                guest_address,
                size,
            });
        }
        let slot = self
            .slots
            .clone()
            .find(|slot| !used.contains_key(slot))
            .ok_or(VfioError::NoFreeSlot)?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_address,
            memory_size: size,
            userspace_addr: host_address as u64,
        };
        // SAFETY: the slot is ours (from the reserved range, not in use) and the caller
        // guarantees the memory stays mapped until `unmap` removes the slot; the guest only
        // ever sees this memory, nothing else of the process.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| VfioError::Pci(crate::Error::Kvm(e.errno())))?;
        used.insert(slot, (guest_address, size));
        Ok(DirectMapping {
            id: slot,
            guest_address,
            size,
        })
    }

    fn unmap(&self, mapping: DirectMapping) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.get(&mapping.id) != Some(&(mapping.guest_address, mapping.size)) {
            log::warn!("vfio: unmap of unknown direct mapping {mapping:?}");
            return;
        }
        // A zero-sized region deletes the slot.
        let region = kvm_userspace_memory_region {
            slot: mapping.id,
            flags: 0,
            guest_phys_addr: mapping.guest_address,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting a slot this mapper created; KVM stops using its memory.
        match unsafe { self.vm.set_user_memory_region(region) } {
            Ok(()) => {
                used.remove(&mapping.id);
            }
            // The slot stays (and so must its memory, which the caller will unmap anyway):
            // there is nothing better to do than to say so.
            Err(e) => log::error!("vfio: cannot delete KVM slot {}: {e}", mapping.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn slots_are_allocated_and_freed() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let file = crate::vfio::sim::memfd_file("kvm-map-test", 0x3000).unwrap();
        let memory = crate::vfio::MappedArea::mmap_fd(file.as_raw_fd(), 0, 0x3000).unwrap();
        let mapper = KvmDirectMapper::new(vm, 5..7);
        let host = memory.host_address();
        // SAFETY: `memory` outlives every mapping (all are unmapped below).
        let a = unsafe { mapper.map(0x1_0000_0000, host, 0x1000) }.unwrap();
        // SAFETY: as above.
        let b = unsafe { mapper.map(0x1_0000_2000, host, 0x1000) }.unwrap();
        assert_eq!((a.id, b.id), (5, 6));
        // SAFETY: as above (refused before KVM sees it).
        let overlap = unsafe { mapper.map(0x1_0000_0800, host, 0x1000) };
        assert!(matches!(overlap, Err(VfioError::Overlap { .. })));
        // SAFETY: as above.
        let full = unsafe { mapper.map(0x2_0000_0000, host, 0x1000) };
        assert!(matches!(full, Err(VfioError::NoFreeSlot)));
        // SAFETY: as above.
        let wraps = unsafe { mapper.map(u64::MAX - 0xfff, host, 0x2000) };
        assert!(matches!(wraps, Err(VfioError::Overlap { .. })));
        mapper.unmap(a);
        assert_eq!(mapper.mappings(), vec![b]);
        // KVM refuses a host address that is not page aligned.
        // SAFETY: as above.
        let unaligned = unsafe { mapper.map(0x3_0000_0000, host.wrapping_add(1), 0x1000) };
        assert!(matches!(
            unaligned,
            Err(VfioError::Pci(crate::Error::Kvm(_)))
        ));
        // SAFETY: as above.
        let again = unsafe { mapper.map(0x1_0000_0000, host, 0x1000) }.unwrap();
        assert_eq!(again.id, 5);
        mapper.unmap(again);
        mapper.unmap(b);
        mapper.unmap(b);
        assert!(mapper.mappings().is_empty());
    }
}
