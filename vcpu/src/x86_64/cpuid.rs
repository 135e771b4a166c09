//! The guest's CPUID: what KVM supports, with the topology of this VM filled in.
//!
//! The VM is one socket of N cores, one thread each; vCPU `i` has APIC ID `i`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDENTIFIERS: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// `CPUID.0xB` level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` items (`ceil(log2(count))`).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// The CPUID of vCPU `index` of `count`, derived from KVM's supported set.
pub fn vcpu_cpuid(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, index, count);
    }
    cpuid
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, index: u32, count: u32) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC ID, EBX[23:16] addressable logical processor IDs.
            entry.ebx = (entry.ebx & 0x0000_ffff)
                | (index << 24)
                | ((1u32 << id_bits(count)).min(255) << 16);
            entry.ecx |= ECX_HYPERVISOR;
            entry.edx |= EDX_HTT;
        }
        LEAF_CACHE_TOPOLOGY => {
            // EAX[31:26]: addressable core IDs in the package, minus one; EAX[25:14]: logical
            // processors sharing this cache, minus one (one thread per core: only itself, except
            // caches shared by the whole package, level 3).
            let cores = (1u32 << id_bits(count)) - 1;
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { cores } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | (cores.min(63) << 26) | (sharing.min(0xfff) << 14);
        }
        LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
            let (shift, processors, level_type) = match entry.index {
                0 => (0, 1, LEVEL_SMT),
                1 => (id_bits(count), count, LEVEL_CORE),
                _ => (0, 0, 0),
            };
            entry.eax = shift;
            entry.ebx = processors;
            entry.ecx = (level_type << 8) | (entry.index & 0xff);
            entry.edx = index;
        }
        LEAF_AMD_SIZE_IDENTIFIERS => {
            // ECX[15:12] APIC ID size, ECX[7:0] number of cores minus one.
            entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1).min(255);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn topology_of_four_vcpus() {
        let supported = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                ebx: 0xabcd,
                ..entry(1, 0)
            },
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        let cpuid = vcpu_cpuid(&supported, 2, 4);
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0xabcd);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);

        let smt = find(&cpuid, 0xb, 0);
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 2));
        assert_eq!(find(&cpuid, 0x8000_0008, 0).ecx & 0xff, 3);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
