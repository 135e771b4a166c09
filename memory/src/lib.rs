//! Guest memory for KVM virtual machines on x86-64.
//!
//! `vmkit-memory` builds guest RAM and everything a VMM needs around it:
//!
//! - [`layout`]: the guest-physical layout (RAM from 0 up to the 32-bit MMIO hole at 3 GiB,
//!   the rest from 4 GiB) and the E820 map for boot loaders;
//! - [`Backing`]: private anonymous memory, a shared memfd, 2 MiB hugetlb pages or
//!   transparent huge pages, optionally prefaulted;
//! - [`GuestRam`]: the RAM itself as a [`vm_memory::GuestMemoryMmap`];
//! - KVM memory slots ([`GuestRam::register_with_kvm`]) and dirty-page logging
//!   ([`KvmSlots::dirty_bitmaps`]);
//! - [`MemoryAccounting`]: guest RAM resident vs. the VMM's own memory, measured from
//!   `/proc/self/smaps`.
//!
//! # Example
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::{Backing, GuestRam, MemoryConfig};
//!
//! # fn main() -> Result<(), vmkit_memory::Error> {
//! let config = MemoryConfig::new(64 << 20).with_backing(Backing::SharedMemfd);
//! let ram = GuestRam::new(&config)?;
//! ram.memory().write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
//! assert_eq!(ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
//! assert!(ram.backing_fd().is_some());
//!
//! let report = ram.accounting()?;
//! assert!(report.guest_resident >= 4096);
//!
//! // With a VM: one KVM slot per range, dirty logging on.
//! if let Ok(kvm) = kvm_ioctls::Kvm::new() {
//!     let vm = kvm.create_vm().map_err(vmkit_memory::Error::Kvm)?;
//!     let slots = ram.register_with_kvm(&vm, vmkit_memory::SlotOptions { first_slot: 0, dirty_log: true })?;
//!     assert_eq!(slots.slots().len(), 1);
//!     let dirty = slots.dirty_bitmaps(&vm)?;
//!     assert_eq!(dirty[0].count(), 0); // host writes are not logged, only the guest's
//! }
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod accounting;
pub mod backing;
pub mod dirty;
pub mod error;
pub mod kvm;
pub mod layout;
pub mod ram;

pub use accounting::MemoryAccounting;
pub use backing::{Backing, HugePagePool};
pub use dirty::DirtyBitmap;
pub use error::{Error, Result};
pub use kvm::{KvmSlot, KvmSlots, SlotOptions};
pub use layout::{E820Entry, E820Kind};
pub use ram::{GuestRam, MemoryConfig, RamRange};
