//! Per-vCPU register setup common to every boot state: CPUID, MSRs, FPU and LAPIC.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use crate::error::{Error, Result};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// LAPIC register offsets and delivery modes.
const APIC_SPURIOUS_VECTOR: usize = 0xf0;
const APIC_SOFTWARE_ENABLE: u32 = 1 << 8;
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x400;
const APIC_MODE_EXTINT: u32 = 0x700;

/// The MSRs a vCPU starts with: the syscall MSRs cleared, fast strings on, MTRRs on and
/// write-back by default (firmware would leave them so).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets CPUID, boot MSRs, a reset FPU (x87 control word 0x37f, MXCSR 0x1f80) and the LAPIC's
/// LINT0 (ExtINT, for the PIC) and LINT1 (NMI), as firmware leaves them.
pub fn configure(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<()> {
    let kvm = |operation| move |source| Error::Kvm { operation, source };
    vcpu.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::SetMsrs {
        set: 0,
        requested: entries.len(),
        first_refused: entries[0].index,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(Error::SetMsrs {
            set,
            requested: entries.len(),
            first_refused: entries[set].index,
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Reads a 32-bit LAPIC register from a `kvm_lapic_state`.
pub fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_register(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

/// Sets the spurious-interrupt vector register's APIC software enable bit (and the spurious
/// vector to 0xff), as an OS does when it takes over its local APIC.
pub(crate) fn software_enable_lapic(lapic: &mut kvm_lapic_state) {
    set_lapic_register(lapic, APIC_SPURIOUS_VECTOR, APIC_SOFTWARE_ENABLE | 0xff);
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let value = lapic_register(lapic, offset);
    set_lapic_register(lapic, offset, (value & !APIC_MODE_MASK) | mode);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_register(&mut lapic, APIC_LVT_LINT0, 0x0001_00ff);
        set_lvt_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        assert_eq!(lapic_register(&lapic, APIC_LVT_LINT0), 0x0001_07ff);
    }
}
