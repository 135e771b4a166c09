//! The PVH entry state: how the boot vCPU enters a kernel through its Xen PVH entry point.
//!
//! The PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h, "PVH ABI" in Xen's docs):
//! 32-bit protected mode with paging off, flat 4 GiB `CS` (execute/read) and `DS`/`ES`/`SS`
//! (read/write), a 32-bit TSS in `TR`, `EBX` = guest-physical address of the `hvm_start_info`,
//! `CR0` = PE (and ET), `CR4` = 0, `EFER` = 0, interrupts off. `vmkit-vcpu` offers the flat
//! and the 64-bit Linux states; this is the third, built from its `EntryState` and descriptor
//! helpers.

use kvm_bindings::kvm_regs;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmkit_vcpu::x86_64::boot::EntryState;
use vmkit_vcpu::x86_64::gdt::{descriptor, kvm_segment_for, DATA_KERNEL};

use super::{Error, Result};

/// Where the PVH boot GDT goes (the same place as `LinuxBoot`'s; a VM uses one or the other).
pub const PVH_GDT_ADDRESS: u64 = 0x500;
/// 32-bit code segment: present, DPL 0, execute/read, accessed; 4 KiB granularity, 32-bit.
const CODE32_KERNEL: u16 = 0xc09b;
/// 32-bit TSS, busy (type 0xb), present.
const TSS32_BUSY: u16 = 0x008b;
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;
const TSS_LIMIT: u32 = 0x67;
const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const RFLAGS_RESERVED: u64 = 1 << 1;

/// The PVH boot: where to enter and where the start info is.
#[derive(Clone, Copy, Debug)]
pub struct PvhBoot {
    /// The kernel's 32-bit PVH entry point (its `XEN_ELFNOTE_PHYS32_ENTRY`).
    pub entry: u64,
    /// Guest-physical address of the `hvm_start_info`, passed in `EBX`.
    pub start_info: u64,
}

impl PvhBoot {
    /// Writes the boot GDT into `mem` and returns the boot vCPU's registers.
    pub fn write<M: GuestMemoryBackend>(&self, mem: &M) -> Result<EntryState> {
        let code = descriptor(CODE32_KERNEL, 0, 0xfffff);
        let data = descriptor(DATA_KERNEL, 0, 0xfffff);
        let tss = descriptor(TSS32_BUSY, 0, TSS_LIMIT);
        let gdt = [0u64, 0, code, data, tss];
        let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(PVH_GDT_ADDRESS))
            .map_err(|source| Error::GuestMemory {
                what: "PVH boot GDT",
                address: PVH_GDT_ADDRESS,
                source,
            })?;
        let entry = u32::try_from(self.entry)
            .map_err(|_| Error::BadElf(format!("PVH entry {:#x} is above 4 GiB", self.entry)))?;
        Ok(EntryState {
            regs: kvm_regs {
                rip: u64::from(entry),
                rbx: self.start_info,
                rflags: RFLAGS_RESERVED,
                ..Default::default()
            },
            cs: kvm_segment_for(code, CODE_SELECTOR),
            data: kvm_segment_for(data, DATA_SELECTOR),
            tr: kvm_segment_for(tss, TSS_SELECTOR),
            gdt: (PVH_GDT_ADDRESS, (bytes.len() - 1) as u16),
            control: (CR0_PE | CR0_ET, 0, 0, 0),
            // The boot vCPU is runnable anyway; the kernel starts the others with INIT/SIPI.
            runnable: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::loader::tests::{memory, MIB};
    use super::*;

    #[test]
    fn pvh_state_is_32_bit_protected_mode_without_paging() {
        let mem = memory(4 * MIB);
        let state = PvhBoot {
            entry: 0x100_0850,
            start_info: 0x6000,
        }
        .write(&mem)
        .unwrap();
        assert_eq!(state.regs.rip, 0x100_0850);
        assert_eq!(state.regs.rbx, 0x6000);
        assert_eq!(state.regs.rflags, 2);
        // CR0.PE only (ET is fixed to 1), no paging, no PAE, no long mode.
        assert_eq!(state.control, (CR0_PE | CR0_ET, 0, 0, 0));
        // Flat 32-bit code, not 64-bit.
        let cs = state.cs;
        assert_eq!(
            (cs.l, cs.db, cs.dpl, cs.g, cs.base, cs.limit, cs.type_),
            (0, 1, 0, 1, 0, 0xffff_ffff, 0xb)
        );
        let ds = state.data;
        assert_eq!((ds.db, ds.limit, ds.type_, ds.s), (1, 0xffff_ffff, 3, 1));
        assert_eq!((state.tr.type_, state.tr.s), (0xb, 0));
        // The GDT in memory holds the descriptors the selectors name.
        let gdt: [u64; 5] = {
            let mut raw = [0u8; 40];
            mem.read_slice(&mut raw, GuestAddress(PVH_GDT_ADDRESS))
                .unwrap();
            std::array::from_fn(|i| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap()))
        };
        assert_eq!(gdt[usize::from(CODE_SELECTOR >> 3)], 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt[usize::from(DATA_SELECTOR >> 3)], 0x00cf_9300_0000_ffff);
        assert_eq!(state.gdt, (PVH_GDT_ADDRESS, 39));
    }
}
