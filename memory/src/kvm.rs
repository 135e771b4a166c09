//! Registering guest RAM with KVM as memory slots and reading their dirty logs.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::dirty::DirtyBitmap;
use crate::error::{Error, Result};
use crate::layout::PAGE_SIZE;

/// How to register guest RAM with KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotOptions {
    /// The slot number of the first region; the others follow consecutively.
    pub first_slot: u32,
    /// Register the slots with `KVM_MEM_LOG_DIRTY_PAGES` so that
    /// [`KvmSlots::dirty_bitmaps`] works.
    pub dirty_log: bool,
}

/// One registered KVM memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmSlot {
    /// The KVM slot number.
    pub slot: u32,
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping backing the slot.
    pub host_addr: u64,
    /// Whether KVM logs dirty pages for this slot.
    pub dirty_log: bool,
}

/// The KVM memory slots guest RAM was registered as.
///
/// Holds a reference to the guest RAM mappings, so the host memory behind the slots stays
/// mapped for as long as this value lives, even if the [`GuestRam`](crate::GuestRam) is
/// dropped first.
pub struct KvmSlots {
    slots: Vec<KvmSlot>,
    // Keeps the mappings alive (the regions are reference counted).
    _memory: GuestMemoryMmap,
}

impl std::fmt::Debug for KvmSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmSlots")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

/// Registers each region of `memory` as one KVM slot.
pub(crate) fn register(
    memory: &GuestMemoryMmap,
    vm: &VmFd,
    options: SlotOptions,
) -> Result<KvmSlots> {
    let count = memory.num_regions();
    let last_slot = u32::try_from(count)
        .ok()
        .and_then(|n| options.first_slot.checked_add(n));
    if last_slot.is_none() {
        return Err(Error::SlotOverflow {
            first_slot: options.first_slot,
            count,
        });
    }
    let flags = if options.dirty_log {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    let mut slots = Vec::with_capacity(count);
    for (slot, region) in (options.first_slot..).zip(memory.iter()) {
        let kvm_slot = KvmSlot {
            slot,
            guest_addr: region.start_addr().0,
            size: region.len(),
            host_addr: region.as_ptr() as u64,
            dirty_log: options.dirty_log,
        };
        let mem_region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: kvm_slot.guest_addr,
            memory_size: kvm_slot.size,
            userspace_addr: kvm_slot.host_addr,
        };
        // SAFETY: `userspace_addr..+memory_size` is exactly one live read/write mapping owned
        // by `region`. The mapping outlives the VM's use of it because the returned `KvmSlots`
        // keeps a reference-counted handle to every region (`_memory`), and the caller is
        // required (see `GuestRam::register_with_kvm`) to keep the `GuestRam` or the
        // `KvmSlots` alive as long as the `VmFd`, or to call `KvmSlots::unregister` first.
        let ret = unsafe { vm.set_user_memory_region(mem_region) };
        if let Err(source) = ret {
            // Leave the VM as we found it: remove the slots registered so far.
            let partial = KvmSlots {
                slots,
                _memory: memory.clone(),
            };
            let _ = partial.unregister(vm);
            return Err(Error::SlotRegistration {
                slot,
                guest_addr: kvm_slot.guest_addr,
                size: kvm_slot.size,
                source,
            });
        }
        slots.push(kvm_slot);
    }
    Ok(KvmSlots {
        slots,
        _memory: memory.clone(),
    })
}

impl KvmSlots {
    /// The registered slots, in guest-physical order.
    pub fn slots(&self) -> &[KvmSlot] {
        &self.slots
    }

    /// Reads and clears the dirty log of every slot (`KVM_GET_DIRTY_LOG`).
    ///
    /// Returns one bitmap per slot, in the order of [`slots`](Self::slots). Only writes made
    /// by the guest are logged. Fails with [`Error::DirtyLogNotEnabled`] if the slots were
    /// registered without [`SlotOptions::dirty_log`].
    pub fn dirty_bitmaps(&self, vm: &VmFd) -> Result<Vec<DirtyBitmap>> {
        self.slots
            .iter()
            .map(|s| {
                if !s.dirty_log {
                    return Err(Error::DirtyLogNotEnabled { slot: s.slot });
                }
                let size = usize::try_from(s.size).map_err(|_| Error::AddressSpaceExceeded {
                    end: s.size,
                    limit: usize::MAX as u64,
                })?;
                let bits = vm.get_dirty_log(s.slot, size).map_err(Error::Kvm)?;
                Ok(DirtyBitmap {
                    slot: s.slot,
                    guest_start: s.guest_addr,
                    page_size: PAGE_SIZE,
                    bits,
                })
            })
            .collect()
    }

    /// Removes the slots from the VM (registers each with size 0).
    ///
    /// Afterwards the VM no longer refers to the guest RAM mappings.
    pub fn unregister(self, vm: &VmFd) -> Result<()> {
        let mut first_err = None;
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: 0,
                guest_phys_addr: s.guest_addr,
                memory_size: 0,
                userspace_addr: s.host_addr,
            };
            // SAFETY: a zero-sized region deletes the slot; KVM stops referring to the host
            // mapping, which is still alive because `self` holds it.
            if let Err(e) = unsafe { vm.set_user_memory_region(region) } {
                first_err.get_or_insert(Error::Kvm(e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
