//! The guest's CPUID: what KVM supports, with this VM's topology filled in and, on request,
//! features hidden by name.
//!
//! [`CpuidPolicy`] turns `KVM_GET_SUPPORTED_CPUID` into the CPUID of each vCPU:
//!
//! - **Topology**: one socket of N cores, one thread each; vCPU `i` has APIC ID `i`. Leaves 1
//!   (initial APIC ID, logical processor count, HTT), 4 (cores per package, cache sharing),
//!   0xB and 0x1F (SMT and core levels, x2APIC ID), and on AMD 0x8000_0008 (core count, APIC ID
//!   size), 0x8000_001D (cache sharing) and 0x8000_001E (extended APIC ID, core ID).
//! - **Hidden features**: a feature named as Linux's `/proc/cpuinfo` names it (see
//!   [`FEATURES`]) is cleared together with every feature that depends on it, as Linux's
//!   `clearcpuid=` and QEMU's `-cpu host,-FEATURE` do. Hiding `xsave` also clears OSXSAVE and
//!   the whole of leaf 0xD; hiding a feature with XSAVE state (`avx`, `avx512f`, `mpx`, `pku`,
//!   `amx_tile`) removes its state components from leaf 0xD; hiding `xsaves` removes the
//!   supervisor state components (IA32_XSS).
//! - **Required features**: `+name` makes building the CPUID fail if the guest would not see
//!   `name` (KVM on this host does not offer it), like QEMU's `enforce`.
//!
//! The policy only ever clears feature bits of KVM's supported set. The exceptions are the bits
//! a VMM owns rather than the hardware: `hypervisor` (leaf 1 ECX bit 31, always set unless
//! hidden) and `ht` (leaf 1 EDX bit 28, set when the VM has more than one vCPU unless hidden),
//! and the topology fields listed above.
//!
//! ```
//! use vmkit_vcpu::CpuidPolicy;
//!
//! let policy: CpuidPolicy = "-cx16,-xsave".parse()?;
//! assert!(policy.hides("avx2")); // AVX needs XSAVE, AVX2 needs AVX
//! assert_eq!(policy.to_string(), "-cx16,-xsave");
//! assert!("-frobnicate".parse::<CpuidPolicy>().is_err());
//! # Ok::<(), vmkit_vcpu::CpuidError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_STRUCTURED_FEATURES: u32 = 0x7;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDENTIFIERS: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXTENDED_APIC_ID: u32 = 0x8000_001e;

const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CPUID.7.0:ECX.OSPKE, which mirrors the guest's CR4.PKE.
const ECX_OSPKE: u32 = 1 << 4;
/// `CPUID.0xB` level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
/// Size of the legacy XSAVE area (x87 and SSE state) plus the XSAVE header.
const XSAVE_LEGACY_SIZE: u32 = 576;

/// Bits needed to number `count` items (`ceil(log2(count))`).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Register {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl Register {
    /// This register's value in `entry`.
    pub fn get(self, entry: &kvm_cpuid_entry2) -> u32 {
        match self {
            Register::Eax => entry.eax,
            Register::Ebx => entry.ebx,
            Register::Ecx => entry.ecx,
            Register::Edx => entry.edx,
        }
    }

    fn get_mut(self, entry: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Register::Eax => &mut entry.eax,
            Register::Ebx => &mut entry.ebx,
            Register::Ecx => &mut entry.ecx,
            Register::Edx => &mut entry.edx,
        }
    }
}

/// A named CPU feature: one CPUID bit, with the features it depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// The name, as Linux's `/proc/cpuinfo` flags spell it.
    pub name: &'static str,
    /// CPUID leaf (EAX input).
    pub leaf: u32,
    /// CPUID subleaf (ECX input); 0 for leaves without subleaves.
    pub subleaf: u32,
    /// The output register holding the bit.
    pub register: Register,
    /// Bit number in the register, 0 to 31.
    pub bit: u8,
    /// Features this one needs: hiding any of them hides this one too.
    pub requires: &'static [&'static str],
    /// The XSAVE state components (bits of XCR0) that exist for this feature; hiding the
    /// feature removes them from leaf 0xD.
    pub xstate: u64,
}

impl Feature {
    /// The feature's bit as a mask of its register.
    pub fn mask(&self) -> u32 {
        1u32 << (self.bit & 31)
    }

    /// Whether `cpuid` has this feature's bit set.
    pub fn is_set(&self, cpuid: &CpuId) -> bool {
        cpuid.as_slice().iter().any(|entry| {
            entry.function == self.leaf
                && entry.index == self.subleaf
                && self.register.get(entry) & self.mask() != 0
        })
    }
}

const fn feat(
    name: &'static str,
    leaf: u32,
    subleaf: u32,
    register: Register,
    bit: u8,
    requires: &'static [&'static str],
) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        register,
        bit,
        requires,
        xstate: 0,
    }
}

const fn with_xstate(feature: Feature, xstate: u64) -> Feature {
    Feature { xstate, ..feature }
}

use Register::{Eax, Ebx, Ecx, Edx};

/// Every feature a policy can name, in CPUID order. Dependencies follow Linux's
/// `arch/x86/kernel/cpu/cpuid-deps.c`, plus a few that follow from the instruction encodings
/// (F16C, XOP and FMA4 are VEX-encoded and need AVX state; x2APIC and the TSC deadline timer
/// are modes of the local APIC).
pub const FEATURES: &[Feature] = &[
    // Leaf 1, EDX.
    feat("fpu", 0x1, 0, Edx, 0, &[]),
    feat("vme", 0x1, 0, Edx, 1, &[]),
    feat("de", 0x1, 0, Edx, 2, &[]),
    feat("pse", 0x1, 0, Edx, 3, &[]),
    feat("tsc", 0x1, 0, Edx, 4, &[]),
    feat("msr", 0x1, 0, Edx, 5, &[]),
    feat("pae", 0x1, 0, Edx, 6, &[]),
    feat("mce", 0x1, 0, Edx, 7, &[]),
    feat("cx8", 0x1, 0, Edx, 8, &[]),
    feat("apic", 0x1, 0, Edx, 9, &[]),
    feat("sep", 0x1, 0, Edx, 11, &[]),
    feat("mtrr", 0x1, 0, Edx, 12, &[]),
    feat("pge", 0x1, 0, Edx, 13, &[]),
    feat("mca", 0x1, 0, Edx, 14, &[]),
    feat("cmov", 0x1, 0, Edx, 15, &["fxsr"]),
    feat("pat", 0x1, 0, Edx, 16, &[]),
    feat("pse36", 0x1, 0, Edx, 17, &[]),
    feat("clflush", 0x1, 0, Edx, 19, &[]),
    feat("mmx", 0x1, 0, Edx, 23, &["fxsr"]),
    feat("fxsr", 0x1, 0, Edx, 24, &["fpu"]),
    feat("sse", 0x1, 0, Edx, 25, &["fxsr"]),
    feat("sse2", 0x1, 0, Edx, 26, &["sse"]),
    feat("ht", 0x1, 0, Edx, 28, &[]),
    // Leaf 1, ECX.
    feat("pni", 0x1, 0, Ecx, 0, &["sse2"]),
    feat("pclmulqdq", 0x1, 0, Ecx, 1, &["sse2"]),
    feat("monitor", 0x1, 0, Ecx, 3, &[]),
    feat("vmx", 0x1, 0, Ecx, 5, &[]),
    feat("ssse3", 0x1, 0, Ecx, 9, &["sse2"]),
    feat("fma", 0x1, 0, Ecx, 12, &["avx"]),
    feat("cx16", 0x1, 0, Ecx, 13, &[]),
    feat("pdcm", 0x1, 0, Ecx, 15, &[]),
    feat("pcid", 0x1, 0, Ecx, 17, &[]),
    feat("sse4_1", 0x1, 0, Ecx, 19, &["sse2"]),
    feat("sse4_2", 0x1, 0, Ecx, 20, &["sse2"]),
    feat("x2apic", 0x1, 0, Ecx, 21, &["apic"]),
    feat("movbe", 0x1, 0, Ecx, 22, &[]),
    feat("popcnt", 0x1, 0, Ecx, 23, &[]),
    feat("tsc_deadline_timer", 0x1, 0, Ecx, 24, &["apic"]),
    feat("aes", 0x1, 0, Ecx, 25, &["sse2"]),
    feat("xsave", 0x1, 0, Ecx, 26, &["fxsr"]),
    with_xstate(feat("avx", 0x1, 0, Ecx, 28, &["xsave"]), 1 << 2),
    feat("f16c", 0x1, 0, Ecx, 29, &["sse2", "avx"]),
    feat("rdrand", 0x1, 0, Ecx, 30, &[]),
    feat("hypervisor", 0x1, 0, Ecx, 31, &[]),
    // Leaf 6 (thermal and power), EAX.
    feat("arat", 0x6, 0, Eax, 2, &[]),
    // Leaf 7 subleaf 0, EBX.
    feat("fsgsbase", 0x7, 0, Ebx, 0, &[]),
    feat("tsc_adjust", 0x7, 0, Ebx, 1, &[]),
    feat("bmi1", 0x7, 0, Ebx, 3, &[]),
    feat("hle", 0x7, 0, Ebx, 4, &[]),
    feat("avx2", 0x7, 0, Ebx, 5, &["avx"]),
    feat("smep", 0x7, 0, Ebx, 7, &[]),
    feat("bmi2", 0x7, 0, Ebx, 8, &[]),
    feat("erms", 0x7, 0, Ebx, 9, &[]),
    feat("invpcid", 0x7, 0, Ebx, 10, &[]),
    feat("rtm", 0x7, 0, Ebx, 11, &[]),
    with_xstate(
        feat("mpx", 0x7, 0, Ebx, 14, &["xsave"]),
        (1 << 3) | (1 << 4),
    ),
    with_xstate(
        feat("avx512f", 0x7, 0, Ebx, 16, &["avx"]),
        (1 << 5) | (1 << 6) | (1 << 7),
    ),
    feat("avx512dq", 0x7, 0, Ebx, 17, &["avx512f"]),
    feat("rdseed", 0x7, 0, Ebx, 18, &[]),
    feat("adx", 0x7, 0, Ebx, 19, &[]),
    feat("smap", 0x7, 0, Ebx, 20, &[]),
    feat("avx512ifma", 0x7, 0, Ebx, 21, &["avx512f"]),
    feat("clflushopt", 0x7, 0, Ebx, 23, &[]),
    feat("clwb", 0x7, 0, Ebx, 24, &[]),
    feat("avx512pf", 0x7, 0, Ebx, 26, &["avx512f"]),
    feat("avx512er", 0x7, 0, Ebx, 27, &["avx512f"]),
    feat("avx512cd", 0x7, 0, Ebx, 28, &["avx512f"]),
    feat("sha_ni", 0x7, 0, Ebx, 29, &["sse2"]),
    feat("avx512bw", 0x7, 0, Ebx, 30, &["avx512f"]),
    feat("avx512vl", 0x7, 0, Ebx, 31, &["avx512f"]),
    // Leaf 7 subleaf 0, ECX.
    feat("avx512vbmi", 0x7, 0, Ecx, 1, &["avx512f"]),
    feat("umip", 0x7, 0, Ecx, 2, &[]),
    with_xstate(feat("pku", 0x7, 0, Ecx, 3, &["xsave"]), 1 << 9),
    feat("waitpkg", 0x7, 0, Ecx, 5, &[]),
    feat("avx512_vbmi2", 0x7, 0, Ecx, 6, &["avx512vl"]),
    feat("gfni", 0x7, 0, Ecx, 8, &["sse2"]),
    feat("vaes", 0x7, 0, Ecx, 9, &["avx"]),
    feat("vpclmulqdq", 0x7, 0, Ecx, 10, &["avx"]),
    feat("avx512_vnni", 0x7, 0, Ecx, 11, &["avx512vl"]),
    feat("avx512_bitalg", 0x7, 0, Ecx, 12, &["avx512vl"]),
    feat("avx512_vpopcntdq", 0x7, 0, Ecx, 14, &["avx512f"]),
    feat("la57", 0x7, 0, Ecx, 16, &[]),
    feat("rdpid", 0x7, 0, Ecx, 22, &[]),
    feat("cldemote", 0x7, 0, Ecx, 25, &[]),
    feat("movdiri", 0x7, 0, Ecx, 27, &[]),
    feat("movdir64b", 0x7, 0, Ecx, 28, &[]),
    // Leaf 7 subleaf 0, EDX.
    feat("avx512_4vnniw", 0x7, 0, Edx, 2, &["avx512f"]),
    feat("avx512_4fmaps", 0x7, 0, Edx, 3, &["avx512f"]),
    feat("fsrm", 0x7, 0, Edx, 4, &[]),
    feat("avx512_vp2intersect", 0x7, 0, Edx, 8, &["avx512vl"]),
    feat("md_clear", 0x7, 0, Edx, 10, &[]),
    feat("serialize", 0x7, 0, Edx, 14, &[]),
    feat("tsxldtrk", 0x7, 0, Edx, 16, &[]),
    feat("amx_bf16", 0x7, 0, Edx, 22, &["amx_tile"]),
    feat("avx512_fp16", 0x7, 0, Edx, 23, &["avx512bw"]),
    with_xstate(
        feat("amx_tile", 0x7, 0, Edx, 24, &["xfd"]),
        (1 << 17) | (1 << 18),
    ),
    feat("amx_int8", 0x7, 0, Edx, 25, &["amx_tile"]),
    feat("arch_capabilities", 0x7, 0, Edx, 29, &[]),
    // Leaf 7 subleaf 1, EAX.
    feat("avx_vnni", 0x7, 1, Eax, 4, &["avx"]),
    feat("avx512_bf16", 0x7, 1, Eax, 5, &["avx512vl"]),
    // Leaf 0xD subleaf 1 (XSAVE extensions), EAX.
    feat("xsaveopt", 0xd, 1, Eax, 0, &["xsave"]),
    feat("xsavec", 0xd, 1, Eax, 1, &["xsave"]),
    feat("xgetbv1", 0xd, 1, Eax, 2, &["xsave"]),
    feat("xsaves", 0xd, 1, Eax, 3, &["xsave"]),
    feat("xfd", 0xd, 1, Eax, 4, &["xsaves", "xgetbv1"]),
    // Leaf 0x8000_0001, ECX.
    feat("lahf_lm", 0x8000_0001, 0, Ecx, 0, &[]),
    feat("cmp_legacy", 0x8000_0001, 0, Ecx, 1, &[]),
    feat("svm", 0x8000_0001, 0, Ecx, 2, &[]),
    feat("cr8_legacy", 0x8000_0001, 0, Ecx, 4, &[]),
    feat("abm", 0x8000_0001, 0, Ecx, 5, &[]),
    feat("sse4a", 0x8000_0001, 0, Ecx, 6, &["sse2"]),
    feat("misalignsse", 0x8000_0001, 0, Ecx, 7, &["sse"]),
    feat("3dnowprefetch", 0x8000_0001, 0, Ecx, 8, &[]),
    feat("osvw", 0x8000_0001, 0, Ecx, 9, &[]),
    feat("xop", 0x8000_0001, 0, Ecx, 11, &["avx"]),
    feat("fma4", 0x8000_0001, 0, Ecx, 16, &["avx"]),
    feat("tbm", 0x8000_0001, 0, Ecx, 21, &[]),
    feat("topoext", 0x8000_0001, 0, Ecx, 22, &[]),
    feat("perfctr_core", 0x8000_0001, 0, Ecx, 23, &[]),
    // Leaf 0x8000_0001, EDX.
    feat("syscall", 0x8000_0001, 0, Edx, 11, &[]),
    feat("nx", 0x8000_0001, 0, Edx, 20, &[]),
    feat("mmxext", 0x8000_0001, 0, Edx, 22, &["mmx"]),
    feat("fxsr_opt", 0x8000_0001, 0, Edx, 25, &["fxsr"]),
    feat("pdpe1gb", 0x8000_0001, 0, Edx, 26, &[]),
    feat("rdtscp", 0x8000_0001, 0, Edx, 27, &[]),
    feat("lm", 0x8000_0001, 0, Edx, 29, &[]),
    // Leaf 0x8000_0008, EBX.
    feat("clzero", 0x8000_0008, 0, Ebx, 0, &[]),
    feat("wbnoinvd", 0x8000_0008, 0, Ebx, 9, &[]),
];

/// Other spellings accepted for a feature (QEMU's, or the instruction's), and the name they
/// stand for. Names are also matched case-insensitively with `-` and `.` read as `_`, so QEMU's
/// `sse4.1`, `lahf-lm` and `tsc-deadline` work.
pub const ALIASES: &[(&str, &str)] = &[
    ("lzcnt", "abm"),
    ("tsc_deadline", "tsc_deadline_timer"),
    ("sse3", "pni"),
    ("pclmul", "pclmulqdq"),
    ("sha", "sha_ni"),
    ("cmpxchg16b", "cx16"),
];

/// Errors of CPUID policies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuidError {
    /// A name that is not in [`FEATURES`] or [`ALIASES`].
    #[error(
        "unknown CPU feature \"{name}\" (names are Linux /proc/cpuinfo flags such as cx16, \
         xsave, avx2, x2apic)"
    )]
    UnknownFeature {
        /// The name as given.
        name: String,
    },
    /// An item of a feature list without `-` or `+`.
    #[error("CPU feature \"{item}\" needs a sign: \"-{item}\" hides it, \"+{item}\" requires it")]
    MissingSign {
        /// The item as given.
        item: String,
    },
    /// An empty item in a feature list.
    #[error("empty item in the CPU feature list \"{spec}\"")]
    EmptyItem {
        /// The whole list.
        spec: String,
    },
    /// A feature both required and hidden (itself, or through a feature it depends on).
    #[error(
        "CPU feature \"{required}\" cannot be both required and hidden (hiding \"{hidden}\" \
         hides it)"
    )]
    Conflict {
        /// The required feature.
        required: &'static str,
        /// The hidden feature that hides it.
        hidden: &'static str,
    },
    /// A required feature the guest would not have.
    #[error(
        "CPU feature \"{name}\" is required (+{name}) but the guest would not have it: KVM on \
         this host does not offer it"
    )]
    NotOffered {
        /// The feature.
        name: &'static str,
    },
    /// A vCPU index outside `0..count`, or no vCPUs.
    #[error("vCPU {index} of {count}: the index must be below the vCPU count")]
    Topology {
        /// The index asked for.
        index: u32,
        /// The vCPU count.
        count: u32,
    },
    /// The CPUID would have more entries than KVM accepts.
    #[error("the guest CPUID would have more than {max} entries")]
    TooManyEntries {
        /// The most KVM accepts.
        max: usize,
    },
}

/// Looks up a feature by name or alias (case-insensitive, `-` and `.` read as `_`).
pub fn feature(name: &str) -> Result<&'static Feature, CpuidError> {
    let normalized: String = name
        .trim()
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    let canonical = ALIASES
        .iter()
        .find(|(alias, _)| *alias == normalized)
        .map_or(normalized.as_str(), |(_, target)| *target);
    FEATURES
        .iter()
        .find(|f| f.name == canonical)
        .ok_or_else(|| CpuidError::UnknownFeature {
            name: name.trim().to_string(),
        })
}

/// The names of the features of [`FEATURES`] that `cpuid` has, in table order.
pub fn features_set(cpuid: &CpuId) -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|f| f.is_set(cpuid))
        .map(|f| f.name)
        .collect()
}

fn position(feature: &Feature) -> usize {
    // Every `&'static Feature` handed out comes from FEATURES, so the name is always found.
    FEATURES
        .iter()
        .position(|f| f.name == feature.name)
        .unwrap_or(0)
}

/// Marks in a table-sized mask `roots` and every feature depending on one of them, directly or
/// not. For each marked feature, `cause[i]` is the root that hid it.
fn closure(roots: &[&'static Feature]) -> Vec<Option<&'static str>> {
    let mut hidden: Vec<Option<&'static str>> = vec![None; FEATURES.len()];
    for root in roots {
        hidden[position(root)] = Some(root.name);
    }
    // The table is small; iterate until nothing changes, as Linux's do_clear_cpu_cap does.
    let mut changed = true;
    while changed {
        changed = false;
        for (i, f) in FEATURES.iter().enumerate() {
            if hidden[i].is_some() {
                continue;
            }
            let cause = f.requires.iter().find_map(|name| {
                FEATURES
                    .iter()
                    .position(|g| g.name == *name)
                    .and_then(|j| hidden[j])
            });
            if cause.is_some() {
                hidden[i] = cause;
                changed = true;
            }
        }
    }
    hidden
}

/// How the guest's CPUID is derived from KVM's supported CPUID: topology, hidden features and
/// required features.
///
/// The default policy hides nothing. Its text form is a comma-separated list of `-name` (hide
/// `name` and everything that depends on it) and `+name` (fail unless the guest has `name`);
/// a name without a sign is an error, so that a list never reads as enabling a feature KVM does
/// not offer. The policy never adds features to KVM's supported set: `+name` only checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuidPolicy {
    hidden: Vec<&'static Feature>,
    required: Vec<&'static Feature>,
}

impl CpuidPolicy {
    /// The policy that hides nothing: KVM's supported CPUID with the VM's topology.
    pub fn new() -> CpuidPolicy {
        CpuidPolicy::default()
    }

    /// Hides `name` and every feature that depends on it. Fails on an unknown name, or when a
    /// required feature would be hidden.
    pub fn hide(&mut self, name: &str) -> Result<&mut CpuidPolicy, CpuidError> {
        let feature = feature(name)?;
        if !self.hidden.contains(&feature) {
            self.hidden.push(feature);
        }
        if let Err(e) = self.check_conflicts() {
            self.hidden.retain(|f| f != &feature);
            return Err(e);
        }
        Ok(self)
    }

    /// Requires `name`: building a CPUID fails unless the guest has it. Fails on an unknown
    /// name, or when the feature is hidden.
    pub fn require(&mut self, name: &str) -> Result<&mut CpuidPolicy, CpuidError> {
        let feature = feature(name)?;
        let added = !self.required.contains(&feature);
        if added {
            self.required.push(feature);
        }
        if let Err(e) = self.check_conflicts() {
            if added {
                self.required.retain(|f| f != &feature);
            }
            return Err(e);
        }
        Ok(self)
    }

    fn check_conflicts(&self) -> Result<(), CpuidError> {
        let hidden = closure(&self.hidden);
        for required in &self.required {
            if let Some(hidden) = hidden[position(required)] {
                return Err(CpuidError::Conflict {
                    required: required.name,
                    hidden,
                });
            }
        }
        Ok(())
    }

    /// Whether nothing is hidden or required.
    pub fn is_empty(&self) -> bool {
        self.hidden.is_empty() && self.required.is_empty()
    }

    /// The features hidden as asked (without their dependents), in the order asked.
    pub fn hidden_names(&self) -> Vec<&'static str> {
        self.hidden.iter().map(|f| f.name).collect()
    }

    /// The features required, in the order asked.
    pub fn required_names(&self) -> Vec<&'static str> {
        self.required.iter().map(|f| f.name).collect()
    }

    /// Every feature this policy hides: those asked for and all that depend on them, in
    /// table order.
    pub fn hidden_features(&self) -> Vec<&'static Feature> {
        let hidden = closure(&self.hidden);
        FEATURES
            .iter()
            .zip(hidden)
            .filter(|(_, cause)| cause.is_some())
            .map(|(f, _)| f)
            .collect()
    }

    /// Whether this policy hides `name` (asked for, or as a dependent). False for unknown names.
    pub fn hides(&self, name: &str) -> bool {
        feature(name).is_ok_and(|f| closure(&self.hidden)[position(f)].is_some())
    }

    /// The hidden features that `effective` (a vCPU's CPUID read back with `KVM_GET_CPUID2`)
    /// still has. Empty when KVM applied the policy as given; the paravirtual nested KVM
    /// (`kvm_pvm`) replaces the bits that guest user mode can observe natively (SSE3 to SSE4.2,
    /// AES, XSAVE, AVX, F16C, FMA, RDRAND, MOVBE, POPCNT, leaf 7 and leaf 0xD) with the host's,
    /// whatever the VMM sets, so hiding those has no effect there.
    pub fn still_present(&self, effective: &CpuId) -> Vec<&'static str> {
        self.hidden_features()
            .into_iter()
            .filter(|f| f.is_set(effective))
            .map(|f| f.name)
            .collect()
    }

    /// Checks the required features against KVM's supported CPUID for a VM of `count` vCPUs,
    /// before any vCPU is created.
    pub fn check(&self, supported: &CpuId, count: u32) -> Result<(), CpuidError> {
        self.vcpu_cpuid(supported, 0, count).map(|_| ())
    }

    /// The CPUID of vCPU `index` of `count`, from KVM's supported CPUID: topology set, hidden
    /// features cleared, required features checked.
    pub fn vcpu_cpuid(
        &self,
        supported: &CpuId,
        index: u32,
        count: u32,
    ) -> Result<CpuId, CpuidError> {
        if index >= count {
            return Err(CpuidError::Topology { index, count });
        }
        let mut cpuid = supported.clone();
        add_topology_subleaves(&mut cpuid)?;
        for entry in cpuid.as_mut_slice() {
            patch_topology(entry, index, count);
        }
        hide(&mut cpuid, &closure(&self.hidden));
        if let Some(missing) = self.required.iter().find(|f| !f.is_set(&cpuid)) {
            return Err(CpuidError::NotOffered { name: missing.name });
        }
        Ok(cpuid)
    }
}

impl FromStr for CpuidPolicy {
    type Err = CpuidError;

    /// Parses `-name,+name,...`; an empty or all-blank string is the default policy.
    fn from_str(spec: &str) -> Result<CpuidPolicy, CpuidError> {
        let mut policy = CpuidPolicy::new();
        if spec.trim().is_empty() {
            return Ok(policy);
        }
        for item in spec.split(',').map(str::trim) {
            if let Some(name) = item.strip_prefix('-') {
                policy.hide(name)?;
            } else if let Some(name) = item.strip_prefix('+') {
                policy.require(name)?;
            } else if item.is_empty() {
                return Err(CpuidError::EmptyItem {
                    spec: spec.to_string(),
                });
            } else {
                // Say "unknown" first when the name is unknown anyway.
                feature(item)?;
                return Err(CpuidError::MissingSign {
                    item: item.to_string(),
                });
            }
        }
        Ok(policy)
    }
}

impl fmt::Display for CpuidPolicy {
    /// The canonical text form: hidden features, then required ones, by their table names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items = self
            .hidden
            .iter()
            .map(|h| format!("-{}", h.name))
            .chain(self.required.iter().map(|r| format!("+{}", r.name)));
        for (i, item) in items.enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&item)?;
        }
        Ok(())
    }
}

/// Adds the core level (subleaf 1) of leaves 0xB and 0x1F when KVM reports the leaf without it
/// (AMD hosts report only subleaf 0), so the guest sees one package of N cores rather than N
/// packages.
fn add_topology_subleaves(cpuid: &mut CpuId) -> Result<(), CpuidError> {
    for leaf in [LEAF_EXTENDED_TOPOLOGY, LEAF_V2_EXTENDED_TOPOLOGY] {
        let has = |index| {
            cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == leaf && e.index == index)
        };
        if !has(0) {
            continue;
        }
        if !has(1) {
            cpuid
                .push(kvm_cpuid_entry2 {
                    function: leaf,
                    index: 1,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                })
                .map_err(|_| CpuidError::TooManyEntries {
                    max: kvm_bindings::KVM_MAX_CPUID_ENTRIES,
                })?;
        }
    }
    Ok(())
}

fn patch_topology(entry: &mut kvm_cpuid_entry2, index: u32, count: u32) {
    // APIC IDs are the vCPU indices; the ID space of the cores rounds up to a power of two.
    let core_ids = 1u32 << id_bits(count);
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC ID (x2APIC IDs above 255 are in leaf 0xB),
            // EBX[23:16] addressable logical processor IDs.
            entry.ebx =
                (entry.ebx & 0x0000_ffff) | ((index & 0xff) << 24) | (core_ids.min(255) << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        // A null cache type ends the list of caches: nothing to describe.
        LEAF_CACHE_TOPOLOGY | LEAF_AMD_CACHE_TOPOLOGY if entry.eax & 0x1f == 0 => {}
        LEAF_CACHE_TOPOLOGY => {
            // EAX[31:26]: addressable core IDs in the package, minus one; EAX[25:14]: logical
            // processors sharing this cache, minus one (one thread per core: only itself, except
            // caches shared by the whole package, level 3).
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { core_ids - 1 } else { 0 };
            entry.eax =
                (entry.eax & 0x3fff) | ((core_ids - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
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
        LEAF_AMD_CACHE_TOPOLOGY => {
            // EAX[25:14]: logical processors sharing this cache, minus one, as in leaf 4.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { core_ids - 1 } else { 0 };
            entry.eax = (entry.eax & !(0xfff << 14)) | (sharing.min(0xfff) << 14);
        }
        LEAF_AMD_EXTENDED_APIC_ID => {
            // EAX extended APIC ID; EBX[7:0] core ID, EBX[15:8] threads per core minus one;
            // ECX[7:0] node ID, ECX[10:8] nodes per package minus one: one node.
            entry.eax = index;
            entry.ebx = index & 0xff;
            entry.ecx = 0;
            entry.edx = 0;
        }
        _ => {}
    }
}

/// Clears the bits of every hidden feature, with what goes with them in leaves 1, 7 and 0xD.
fn hide(cpuid: &mut CpuId, hidden: &[Option<&'static str>]) {
    let is_hidden = |name: &str| {
        FEATURES
            .iter()
            .zip(hidden)
            .any(|(f, cause)| f.name == name && cause.is_some())
    };
    let mut xcr0_gone = 0u64;
    for (f, _) in FEATURES.iter().zip(hidden).filter(|(_, c)| c.is_some()) {
        for entry in cpuid.as_mut_slice() {
            if entry.function == f.leaf && entry.index == f.subleaf {
                *f.register.get_mut(entry) &= !f.mask();
            }
        }
        xcr0_gone |= f.xstate;
    }
    let no_xsave = is_hidden("xsave");
    let no_xsaves = is_hidden("xsaves");
    let no_pku = is_hidden("pku");
    for entry in cpuid.as_mut_slice() {
        match (entry.function, entry.index) {
            // OSXSAVE and OSPKE mirror CR4 bits the guest cannot set without the feature.
            (LEAF_FEATURES, _) if no_xsave => entry.ecx &= !ECX_OSXSAVE,
            (LEAF_STRUCTURED_FEATURES, 0) if no_pku => entry.ecx &= !ECX_OSPKE,
            // Without XSAVE, leaf 0xD reads as zeroes, as QEMU makes it.
            (LEAF_XSAVE, _) if no_xsave => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
    if !no_xsave && (xcr0_gone != 0 || no_xsaves) {
        drop_xstate(cpuid, xcr0_gone, no_xsaves);
    }
}

/// Removes XSAVE state components from leaf 0xD: the user components `xcr0_gone` from subleaf
/// 0 (XCR0) and, with `no_xss`, every supervisor component from subleaf 1 (IA32_XSS); zeroes
/// their subleaves and recomputes the largest XSAVE area size (subleaf 0 ECX).
fn drop_xstate(cpuid: &mut CpuId, xcr0_gone: u64, no_xss: bool) {
    let mut xss_gone = 0u64;
    if no_xss {
        for entry in cpuid.as_mut_slice() {
            if entry.function == LEAF_XSAVE && entry.index == 1 {
                xss_gone = (u64::from(entry.edx) << 32) | u64::from(entry.ecx);
                entry.ecx = 0;
                entry.edx = 0;
            }
        }
    }
    let gone = xcr0_gone | xss_gone;
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_XSAVE
            && (2..64).contains(&entry.index)
            && gone & (1u64 << entry.index) != 0
        {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
    }
    let Some(xcr0) = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_XSAVE && e.index == 0)
        .map(|e| ((u64::from(e.edx) << 32) | u64::from(e.eax)) & !xcr0_gone)
    else {
        return;
    };
    // The standard-format area ends after the furthest user component left: its offset (EBX)
    // plus its size (EAX) in its own subleaf.
    let max_size = cpuid
        .as_slice()
        .iter()
        .filter(|e| {
            e.function == LEAF_XSAVE && (2..64).contains(&e.index) && xcr0 & (1u64 << e.index) != 0
        })
        .map(|e| e.ebx.saturating_add(e.eax))
        .fold(XSAVE_LEGACY_SIZE, u32::max);
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_XSAVE && entry.index == 0 {
            entry.eax = xcr0 as u32;
            entry.edx = (xcr0 >> 32) as u32;
            entry.ecx = max_size;
            // EBX is the size for the XCR0 the guest has enabled; KVM keeps it current.
            entry.ebx = entry.ebx.min(max_size);
        }
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

    fn regs(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
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

    /// XSAVE state components of an AVX-512 host, with their (size, offset): AVX 256 at 576,
    /// MPX 64 at 960 and 64 at 1024, AVX-512 64 at 1088, 512 at 1152, 1024 at 1664, PKRU 8 at
    /// 2688; supervisor components 11 and 12 (CET) in IA32_XSS.
    fn xsave_leaves() -> Vec<kvm_cpuid_entry2> {
        vec![
            regs(0xd, 0, 0x2ff, 0x240, 2696, 0),
            regs(0xd, 1, 0x1f, 0x240, (1 << 11) | (1 << 12), 0),
            regs(0xd, 2, 256, 576, 0, 0),
            regs(0xd, 3, 64, 960, 0, 0),
            regs(0xd, 4, 64, 1024, 0, 0),
            regs(0xd, 5, 64, 1088, 0, 0),
            regs(0xd, 6, 512, 1152, 0, 0),
            regs(0xd, 7, 1024, 1664, 0, 0),
            regs(0xd, 9, 8, 2688, 0, 0),
            regs(0xd, 11, 16, 0, 1, 0),
            regs(0xd, 12, 24, 0, 1, 0),
        ]
    }

    /// A supported set where every feature bit of every leaf is set, with a cache hierarchy
    /// (levels 1, 1, 2, 3 in leaves 4 and 0x8000_001D) and realistic leaf 0xD.
    fn everything() -> CpuId {
        let ones = u32::MAX;
        let mut entries = vec![
            regs(0x1, 0, 0x00a1_0f11, 0x0002_0800, ones, ones),
            regs(0x4, 0, 0x21, 0, 0, 0),
            regs(0x4, 1, 0x22, 0, 0, 0),
            regs(0x4, 2, 0x43, 0, 0, 0),
            regs(0x4, 3, 0x63, 0, 0, 0),
            entry(0x4, 4),
            regs(0x6, 0, ones, 0, 0, 0),
            regs(0x7, 0, 1, ones, ones, ones),
            regs(0x7, 1, ones, ones, ones, ones),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x1f, 0),
            entry(0x1f, 1),
            entry(0x1f, 2),
            regs(0x8000_0001, 0, 0, 0, ones, ones),
            regs(0x8000_0008, 0, 0x3030, ones, 0x7001, 0),
            regs(0x8000_001d, 0, 0x121, 0, 0, 0),
            regs(0x8000_001d, 1, 0x122, 0, 0, 0),
            regs(0x8000_001d, 2, 0x143, 0, 0, 0),
            regs(0x8000_001d, 3, 0x4163, 0, 0, 0),
            entry(0x8000_001e, 0),
        ];
        entries.extend(xsave_leaves());
        CpuId::from_entries(&entries).unwrap()
    }

    fn policy(spec: &str) -> CpuidPolicy {
        spec.parse().unwrap()
    }

    #[test]
    fn table_is_consistent() {
        for (i, f) in FEATURES.iter().enumerate() {
            assert!(f.bit < 32, "{}", f.name);
            for g in &FEATURES[i + 1..] {
                assert_ne!(f.name, g.name);
                assert!(
                    (f.leaf, f.subleaf, f.register, f.bit)
                        != (g.leaf, g.subleaf, g.register, g.bit),
                    "{} and {} share a bit",
                    f.name,
                    g.name
                );
            }
            for r in f.requires {
                assert!(
                    FEATURES.iter().any(|g| g.name == *r),
                    "{} requires {r}",
                    f.name
                );
            }
        }
        for (alias, target) in ALIASES {
            assert!(
                FEATURES.iter().all(|f| f.name != *alias),
                "{alias} shadows a name"
            );
            assert_eq!(feature(alias).unwrap().name, *target);
        }
        // The names the policy code treats specially exist.
        for name in ["xsave", "xsaves", "pku", "hypervisor", "ht"] {
            assert!(feature(name).is_ok(), "{name}");
        }
        // What the issue lists, by the names users type.
        for name in [
            "cx16",
            "xsave",
            "xsaveopt",
            "xsavec",
            "xsaves",
            "avx",
            "avx2",
            "avx512f",
            "fma",
            "f16c",
            "aes",
            "pclmulqdq",
            "movbe",
            "popcnt",
            "sse4_1",
            "sse4_2",
            "ssse3",
            "x2apic",
            "tsc_deadline",
            "rdrand",
            "rdseed",
            "smep",
            "smap",
            "pku",
            "la57",
            "umip",
            "fsgsbase",
            "bmi1",
            "bmi2",
            "erms",
            "invpcid",
            "rtm",
            "hle",
            "mpx",
            "sha_ni",
            "vmx",
            "svm",
            "hypervisor",
            "pdpe1gb",
            "rdtscp",
            "lm",
            "nx",
            "syscall",
            "lahf_lm",
            "abm",
            "lzcnt",
            "monitor",
            "pcid",
            "arat",
        ] {
            assert!(feature(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn names_are_matched_loosely() {
        assert_eq!(feature("SSE4.1").unwrap().name, "sse4_1");
        assert_eq!(feature("lahf-lm").unwrap().name, "lahf_lm");
        assert_eq!(feature("tsc-deadline").unwrap().name, "tsc_deadline_timer");
        assert_eq!(feature("LZCNT").unwrap().name, "abm");
        assert_eq!(feature(" cx16 ").unwrap().name, "cx16");
    }

    /// Expected topology values for `count` vCPUs: (APIC ID bits, leaf 1 EBX[23:16]).
    fn expected_bits(count: u32) -> (u32, u32) {
        match count {
            1 => (0, 1),
            2 => (1, 2),
            4 => (2, 4),
            6 => (3, 8),
            _ => unreachable!(),
        }
    }

    #[test]
    fn topology_of_1_2_4_and_6_vcpus() {
        let supported = everything();
        for count in [1u32, 2, 4, 6] {
            let (bits, logical) = expected_bits(count);
            for index in 0..count {
                let cpuid = CpuidPolicy::new()
                    .vcpu_cpuid(&supported, index, count)
                    .unwrap();
                let what = format!("vCPU {index} of {count}");
                let leaf1 = find(&cpuid, 1, 0);
                assert_eq!(leaf1.ebx >> 24, index, "{what}: initial APIC ID");
                assert_eq!((leaf1.ebx >> 16) & 0xff, logical, "{what}: logical count");
                assert_eq!(leaf1.ebx & 0xffff, 0x0800, "{what}: CLFLUSH size kept");
                assert_eq!(leaf1.edx & EDX_HTT != 0, count > 1, "{what}: HTT");
                assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0, "{what}: hypervisor");

                for (sub, shared) in [(0, 0), (1, 0), (2, 0), (3, logical - 1)] {
                    let l4 = find(&cpuid, 4, sub);
                    assert_eq!(l4.eax >> 26, logical - 1, "{what}: leaf 4.{sub} cores");
                    assert_eq!(
                        (l4.eax >> 14) & 0xfff,
                        shared,
                        "{what}: leaf 4.{sub} sharing"
                    );
                    assert_eq!(l4.eax & 0x3fff, find(&supported, 4, sub).eax, "{what}");
                    let amd = find(&cpuid, 0x8000_001d, sub);
                    assert_eq!((amd.eax >> 14) & 0xfff, shared, "{what}: 0x8000001d.{sub}");
                }

                for leaf in [0xb, 0x1f] {
                    let smt = find(&cpuid, leaf, 0);
                    let core = find(&cpuid, leaf, 1);
                    assert_eq!(
                        (smt.eax, smt.ebx, smt.ecx, smt.edx),
                        (0, 1, LEVEL_SMT << 8, index),
                        "{what}: leaf {leaf:#x}.0"
                    );
                    assert_eq!(
                        (core.eax, core.ebx, core.ecx, core.edx),
                        (bits, count, (LEVEL_CORE << 8) | 1, index),
                        "{what}: leaf {leaf:#x}.1"
                    );
                }
                let end = find(&cpuid, 0x1f, 2);
                assert_eq!((end.eax, end.ebx, end.ecx >> 8, end.edx), (0, 0, 0, index));

                assert_eq!(
                    find(&cpuid, 4, 4).eax,
                    0,
                    "{what}: the null cache stays null"
                );

                let sizes = find(&cpuid, 0x8000_0008, 0);
                assert_eq!(sizes.ecx & 0xff, count - 1, "{what}: NC");
                assert_eq!((sizes.ecx >> 12) & 0xf, bits, "{what}: APIC ID size");
                let ext = find(&cpuid, 0x8000_001e, 0);
                assert_eq!((ext.eax, ext.ebx, ext.ecx), (index, index, 0), "{what}");
            }
        }
    }

    #[test]
    fn missing_core_level_is_added() {
        // What an AMD host's KVM reports: leaf 0xB with subleaf 0 only, no leaf 0x1F.
        let supported = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0)]).unwrap();
        let cpuid = CpuidPolicy::new().vcpu_cpuid(&supported, 3, 4).unwrap();
        let core = find(&cpuid, 0xb, 1);
        assert_eq!(core.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (2, 4, LEVEL_CORE, 3)
        );
        assert!(!cpuid.as_slice().iter().any(|e| e.function == 0x1f));
    }

    #[test]
    fn bad_topology_is_an_error() {
        let supported = everything();
        let p = CpuidPolicy::new();
        assert_eq!(
            p.vcpu_cpuid(&supported, 0, 0).unwrap_err(),
            CpuidError::Topology { index: 0, count: 0 }
        );
        assert!(p.vcpu_cpuid(&supported, 4, 4).is_err());
    }

    /// The bits (leaf, subleaf, register, mask) of the named features in `cpuid`.
    fn named_bits(cpuid: &CpuId) -> Vec<bool> {
        FEATURES.iter().map(|f| f.is_set(cpuid)).collect()
    }

    /// Every register of every entry, for comparing whole CPUIDs.
    fn all_regs(cpuid: &CpuId) -> Vec<(u32, u32, Register, u32)> {
        let mut out = Vec::new();
        for e in cpuid.as_slice() {
            for r in [Eax, Ebx, Ecx, Edx] {
                out.push((e.function, e.index, r, r.get(e)));
            }
        }
        out
    }

    #[test]
    fn hiding_each_feature_clears_exactly_it_and_its_dependents() {
        let supported = everything();
        let base = CpuidPolicy::new().vcpu_cpuid(&supported, 1, 2).unwrap();
        assert!(
            named_bits(&base).iter().all(|&set| set),
            "the baseline has everything"
        );
        for f in FEATURES {
            let p = policy(&format!("-{}", f.name));
            let hidden: Vec<&str> = p.hidden_features().iter().map(|h| h.name).collect();
            let cpuid = p.vcpu_cpuid(&supported, 1, 2).unwrap();
            // Named bits: exactly the closure is gone.
            for (g, set) in FEATURES.iter().zip(named_bits(&cpuid)) {
                assert_eq!(set, !hidden.contains(&g.name), "-{}: {}", f.name, g.name);
            }
            // Every other bit: unchanged, except what goes with XSAVE state and PKU.
            let mut expected = base.clone();
            for g in p.hidden_features() {
                for e in expected.as_mut_slice() {
                    if e.function == g.leaf && e.index == g.subleaf {
                        *g.register.get_mut(e) &= !g.mask();
                    }
                }
            }
            let touches_leaf_d = hidden
                .iter()
                .any(|n| ["xsave", "xsaves"].contains(n) || feature(n).unwrap().xstate != 0);
            for ((fe, ie, re, ve), (fa, ia, ra, va)) in
                all_regs(&expected).into_iter().zip(all_regs(&cpuid))
            {
                assert_eq!((fe, ie, re), (fa, ia, ra));
                let special = (fe == 0xd && touches_leaf_d)
                    || (fe == 1 && re == Ecx && hidden.contains(&"xsave"))
                    || (fe == 7 && ie == 0 && re == Ecx && hidden.contains(&"pku"));
                if !special {
                    assert_eq!(va, ve, "-{}: leaf {fe:#x}.{ie} {re:?}", f.name);
                }
            }
        }
    }

    #[test]
    fn dependents_follow_linux() {
        let p = policy("-xsave");
        for name in [
            "xsave",
            "xsaveopt",
            "xsavec",
            "xsaves",
            "xgetbv1",
            "xfd",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
            "avx512_bf16",
            "avx512_fp16",
            "pku",
            "mpx",
            "amx_tile",
            "amx_int8",
            "vaes",
            "vpclmulqdq",
            "avx_vnni",
            "xop",
            "fma4",
        ] {
            assert!(p.hides(name), "-xsave hides {name}");
        }
        for name in [
            "sse",
            "sse2",
            "sse4_2",
            "aes",
            "pclmulqdq",
            "cx16",
            "fxsr",
            "gfni",
        ] {
            assert!(!p.hides(name), "-xsave keeps {name}");
        }
        let avx = policy("-avx");
        for name in [
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512dq",
            "avx512_vbmi2",
            "vaes",
        ] {
            assert!(avx.hides(name), "-avx hides {name}");
        }
        assert!(!avx.hides("xsave"));
        assert!(!avx.hides("aes"));
        let sse2 = policy("-sse2");
        assert!(sse2.hides("sse4_1") && sse2.hides("pni") && sse2.hides("f16c"));
        assert!(!sse2.hides("sse"));
        assert!(policy("-apic").hides("x2apic"));
        assert!(policy("-apic").hides("tsc_deadline"));
        assert!(!policy("-cx16").hides("cx8"));
        assert_eq!(policy("-cx16").hidden_features().len(), 1);
    }

    #[test]
    fn hiding_xsave_empties_leaf_d_and_osxsave() {
        let mut supported = everything();
        for e in supported.as_mut_slice() {
            if e.function == 1 {
                e.ecx |= ECX_OSXSAVE;
            }
        }
        let cpuid = policy("-xsave").vcpu_cpuid(&supported, 0, 1).unwrap();
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ecx & (ECX_OSXSAVE | (1 << 26) | (1 << 28)), 0);
        let leaf_d: Vec<_> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == 0xd)
            .collect();
        assert_eq!(leaf_d.len(), xsave_leaves().len(), "entries stay, zeroed");
        for e in leaf_d {
            assert_eq!(
                (e.eax, e.ebx, e.ecx, e.edx),
                (0, 0, 0, 0),
                "0xd.{}",
                e.index
            );
        }
        // Leaf 7: AVX2, AVX-512, MPX, PKU and OSPKE gone; the rest kept.
        let l7 = find(&cpuid, 7, 0);
        assert_eq!(l7.ebx & ((1 << 5) | (1 << 14) | (1 << 16) | (1 << 31)), 0);
        assert_eq!(l7.ecx & ((1 << 3) | ECX_OSPKE), 0);
        assert_ne!(l7.ebx & (1 << 3), 0, "bmi1 kept");
        assert_ne!(leaf1.ecx & (1 << 13), 0, "cx16 kept");
    }

    #[test]
    fn hiding_avx_drops_its_xsave_state() {
        let supported = everything();
        let cpuid = policy("-avx").vcpu_cpuid(&supported, 0, 1).unwrap();
        let d0 = find(&cpuid, 0xd, 0);
        // Left: x87, SSE, MPX (3, 4) and PKRU (9); the area ends after PKRU at 2696.
        assert_eq!(d0.eax, 0x21b);
        assert_eq!(d0.ecx, 2696);
        for sub in [2, 5, 6, 7] {
            let e = find(&cpuid, 0xd, sub);
            assert_eq!((e.eax, e.ebx), (0, 0), "0xd.{sub}");
        }
        assert_eq!(find(&cpuid, 0xd, 9).eax, 8);
        assert_eq!(find(&cpuid, 0xd, 1).eax, 0x1f, "XSAVE extensions kept");

        let cpuid = policy("-avx512f,-pku,-mpx")
            .vcpu_cpuid(&supported, 0, 1)
            .unwrap();
        let d0 = find(&cpuid, 0xd, 0);
        assert_eq!(d0.eax, 0x7, "x87, SSE, AVX");
        assert_eq!(d0.ecx, 576 + 256);
        assert_eq!(find(&cpuid, 0xd, 2).eax, 256);

        let cpuid = policy("-avx,-mpx,-pku")
            .vcpu_cpuid(&supported, 0, 1)
            .unwrap();
        assert_eq!(find(&cpuid, 0xd, 0).ecx, XSAVE_LEGACY_SIZE);
    }

    #[test]
    fn hiding_xsaves_drops_supervisor_state() {
        let cpuid = policy("-xsaves").vcpu_cpuid(&everything(), 0, 1).unwrap();
        let d1 = find(&cpuid, 0xd, 1);
        assert_eq!(
            d1.eax, 0x7,
            "xsaveopt, xsavec, xgetbv1 kept; xsaves, xfd gone"
        );
        assert_eq!((d1.ecx, d1.edx), (0, 0));
        for sub in [11, 12] {
            assert_eq!(find(&cpuid, 0xd, sub).eax, 0);
        }
        // AMX needs XFD, which needs XSAVES: its state goes too (none here), AVX's stays.
        assert_eq!(find(&cpuid, 0xd, 0).eax, 0x2ff);
        assert_eq!(find(&cpuid, 0xd, 0).ecx, 2696);
    }

    #[test]
    fn unknown_names_and_bad_lists_are_errors() {
        assert_eq!(
            "-cx16,-frobnicate".parse::<CpuidPolicy>().unwrap_err(),
            CpuidError::UnknownFeature {
                name: "frobnicate".into()
            }
        );
        let err = "+nosuch".parse::<CpuidPolicy>().unwrap_err();
        assert!(err.to_string().contains("\"nosuch\""), "{err}");
        assert_eq!(
            "cx16".parse::<CpuidPolicy>().unwrap_err(),
            CpuidError::MissingSign {
                item: "cx16".into()
            }
        );
        assert!(matches!(
            "bogus".parse::<CpuidPolicy>().unwrap_err(),
            CpuidError::UnknownFeature { .. }
        ));
        for spec in ["-cx16,", ",-cx16", "-cx16,,-xsave"] {
            assert!(
                matches!(
                    spec.parse::<CpuidPolicy>(),
                    Err(CpuidError::EmptyItem { .. })
                ),
                "{spec}"
            );
        }
        assert!(matches!(
            "-".parse::<CpuidPolicy>(),
            Err(CpuidError::UnknownFeature { .. })
        ));
        assert_eq!(CpuidPolicy::new().hide("nope").unwrap_err().to_string(),
            "unknown CPU feature \"nope\" (names are Linux /proc/cpuinfo flags such as cx16, xsave, avx2, x2apic)");
    }

    #[test]
    fn required_and_hidden_conflict() {
        assert_eq!(
            "-avx,+avx2".parse::<CpuidPolicy>().unwrap_err(),
            CpuidError::Conflict {
                required: "avx2",
                hidden: "avx"
            }
        );
        assert_eq!(
            "+fma,-xsave".parse::<CpuidPolicy>().unwrap_err(),
            CpuidError::Conflict {
                required: "fma",
                hidden: "xsave"
            }
        );
        // A refused change leaves the policy as it was.
        let mut p = policy("+avx2");
        assert!(p.hide("avx").is_err());
        assert_eq!(p, policy("+avx2"));
        let mut p = policy("-avx");
        assert!(p.require("avx2").is_err());
        assert_eq!(p, policy("-avx"));
    }

    #[test]
    fn text_form_round_trips() {
        assert_eq!(policy("").to_string(), "");
        assert!(policy("  ").is_empty());
        let p = policy(" -CX16 , -xsave,+x2apic,-cx16, +sse4.2 ");
        assert_eq!(p.to_string(), "-cx16,-xsave,+x2apic,+sse4_2");
        assert_eq!(p.hidden_names(), ["cx16", "xsave"]);
        assert_eq!(p.required_names(), ["x2apic", "sse4_2"]);
        assert_eq!(policy(&p.to_string()), p);
    }

    #[test]
    fn required_features_must_be_offered() {
        let mut supported = everything();
        for e in supported.as_mut_slice() {
            if e.function == 7 && e.index == 0 {
                e.ebx &= !(1 << 5); // no AVX2
            }
        }
        let err = policy("+avx2").check(&supported, 2).unwrap_err();
        assert_eq!(err, CpuidError::NotOffered { name: "avx2" });
        assert!(err.to_string().contains("+avx2"), "{err}");
        assert!(policy("+avx,+cx16,+hypervisor")
            .check(&supported, 2)
            .is_ok());
        // HTT is the VMM's: present with more than one vCPU only.
        assert!(policy("+ht").check(&supported, 2).is_ok());
        assert!(policy("+ht").check(&supported, 1).is_err());
    }

    /// A deterministic pseudo-random sequence (xorshift), for the property test below.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// The bits a policy may set that KVM did not: the topology fields, `hypervisor` and `ht`.
    fn vmm_owned(function: u32, register: Register) -> u32 {
        match (function, register) {
            (0x1, Ebx) => 0xffff_0000,
            (0x1, Ecx) => ECX_HYPERVISOR,
            (0x1, Edx) => EDX_HTT,
            (0x4, Eax) | (0x8000_001d, Eax) => 0xffff_c000,
            (0xb, _) | (0x1f, _) | (0x8000_001e, _) => u32::MAX,
            (0x8000_0008, Ecx) => 0xf0ff,
            _ => 0,
        }
    }

    #[test]
    fn never_sets_a_bit_kvm_does_not_support() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            // Random supported bits everywhere the table looks, on top of the usual leaves.
            let mut supported = everything();
            for e in supported.as_mut_slice() {
                if e.function != 0xd {
                    e.eax &= xorshift(&mut state) as u32;
                    e.ebx &= xorshift(&mut state) as u32;
                    e.ecx &= xorshift(&mut state) as u32;
                    e.edx &= xorshift(&mut state) as u32;
                }
            }
            // A random policy: each feature hidden with probability 1/16.
            let mut p = CpuidPolicy::new();
            for f in FEATURES {
                if xorshift(&mut state) % 16 == 0 {
                    p.hide(f.name).unwrap();
                }
            }
            let count = 1 + (round % 8);
            for index in 0..count {
                let cpuid = p.vcpu_cpuid(&supported, index, count).unwrap();
                for e in cpuid.as_slice() {
                    let s = supported
                        .as_slice()
                        .iter()
                        .find(|s| s.function == e.function && s.index == e.index);
                    for r in [Eax, Ebx, Ecx, Edx] {
                        let before = s.map_or(0, |s| r.get(s));
                        if e.function == 0xd && e.index == 0 && matches!(r, Ebx | Ecx) {
                            // Sizes of the XSAVE area, not bits: they may only shrink.
                            assert!(r.get(e) <= before, "policy {p}: 0xd.0 {r:?} grew");
                            continue;
                        }
                        let added = r.get(e) & !before & !vmm_owned(e.function, r);
                        assert_eq!(
                            added, 0,
                            "policy {p}: leaf {:#x}.{} {r:?} gained {added:#x}",
                            e.function, e.index
                        );
                    }
                }
                for f in p.hidden_features() {
                    assert!(!f.is_set(&cpuid), "policy {p}: {} still set", f.name);
                }
            }
        }
    }

    #[test]
    fn features_set_lists_names() {
        let supported = CpuId::from_entries(&[regs(1, 0, 0, 0, 1 << 13, 1 << 26)]).unwrap();
        assert_eq!(features_set(&supported), ["sse2", "cx16"]);
    }

    fn kvm_available() -> bool {
        let ok = kvm_ioctls::Kvm::new().is_ok();
        if !ok {
            eprintln!("SKIPPED: /dev/kvm is not available on this host");
        }
        ok
    }

    /// On the real /dev/kvm: the policy applied to KVM's supported CPUID is accepted by
    /// `KVM_SET_CPUID2`, and the vCPU's CPUID read back has cx16 (leaf 1 ECX bit 13) hidden.
    #[test]
    fn kvm_accepts_the_policy() {
        if !kvm_available() {
            return;
        }
        let pvm = crate::host_check::virtualization()
            == crate::host_check::Virtualization::ParavirtualNested;
        for spec in ["-cx16", "-cx16,-xsave", "-avx", "-x2apic,-hypervisor", ""] {
            let p = policy(spec);
            let vm = crate::vm::Vm::new(2).unwrap();
            let supported = vm.supported_cpuid().clone();
            let offered = feature("cx16").unwrap().is_set(&supported);
            if !offered {
                eprintln!("note: KVM on this host does not offer cx16; checking it stays absent");
            }
            let vcpus = vm.create_vcpus_with(&p).unwrap();
            for vcpu in &vcpus {
                let got = vcpu
                    .fd
                    .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .unwrap();
                let leaf1 = find(&got, 1, 0);
                assert_eq!(leaf1.ebx >> 24, vcpu.index as u32, "{spec}: APIC ID");
                assert_eq!(
                    leaf1.ecx & (1 << 13) != 0,
                    !p.hides("cx16") && offered,
                    "{spec}: leaf 1 ECX bit 13 (cx16)"
                );
                let left = p.still_present(&got);
                if pvm {
                    if !left.is_empty() && vcpu.index == 0 {
                        eprintln!("note: {spec}: kvm_pvm keeps {left:?} whatever the CPUID says");
                    }
                    for name in ["cx16", "x2apic", "hypervisor"] {
                        assert!(!left.contains(&name), "{spec}: {name} not hidden");
                    }
                } else {
                    assert!(left.is_empty(), "{spec}: KVM kept {left:?}");
                }
            }
        }
    }

    /// What the guest itself reads with CPUID at CPL0 is what the policy asked for: cx16
    /// hidden, the APIC ID and core count of the topology.
    #[test]
    fn guest_reads_the_policy_cpuid() {
        use std::sync::{Arc, Mutex};
        use vm_memory::{Bytes, GuestAddress};
        use vmkit_memory::{GuestRam, MemoryConfig};

        use crate::x86_64::boot::LinuxBoot;
        use crate::{BusDevice, IoBuses, VmControl, VmEnd, VmRunner};

        #[derive(Default)]
        struct Reports {
            values: Mutex<Vec<u32>>,
            control: Mutex<Option<VmControl>>,
        }
        impl BusDevice for Reports {
            fn read(&self, _offset: u64, data: &mut [u8]) {
                data.fill(0);
            }
            fn write(&self, offset: u64, data: &[u8]) {
                if offset == 0 {
                    let mut bytes = [0u8; 4];
                    let n = data.len().min(4);
                    bytes[..n].copy_from_slice(&data[..n]);
                    self.values.lock().unwrap().push(u32::from_le_bytes(bytes));
                } else if let Some(control) = &*self.control.lock().unwrap() {
                    control.stop();
                }
            }
        }

        if !kvm_available() {
            return;
        }
        let ram = GuestRam::new(&MemoryConfig::new(64 << 20)).unwrap();
        let vm = crate::vm::Vm::new(2).unwrap();
        let _slots = vm.register_memory(&ram, false).unwrap();
        #[rustfmt::skip]
        let code = [
            0xb8, 1, 0, 0, 0,       // mov eax, 1
            0x31, 0xc9,             // xor ecx, ecx
            0x0f, 0xa2,             // cpuid
            0x89, 0xd6,             // mov esi, edx
            0x89, 0xdf,             // mov edi, ebx
            0x89, 0xc8,             // mov eax, ecx
            0x66, 0xba, 0x80, 0,    // mov dx, 0x80
            0xef,                   // out dx, eax  (leaf 1 ECX)
            0x89, 0xf0,             // mov eax, esi
            0xef,                   // out dx, eax  (leaf 1 EDX)
            0x89, 0xf8,             // mov eax, edi
            0xef,                   // out dx, eax  (leaf 1 EBX)
            0xb8, 0xb, 0, 0, 0,     // mov eax, 0xb
            0xb9, 1, 0, 0, 0,       // mov ecx, 1
            0x0f, 0xa2,             // cpuid
            0x89, 0xd8,             // mov eax, ebx
            0x66, 0xba, 0x80, 0,    // mov dx, 0x80
            0xef,                   // out dx, eax  (leaf 0xB.1 EBX: cores)
            0x66, 0xba, 0x81, 0,    // mov dx, 0x81
            0xef,                   // out dx, eax  (stop)
            0xeb, 0xfe,             // jmp $
        ];
        let kernel = 0x100_0000;
        ram.memory()
            .write_slice(&code, GuestAddress(kernel))
            .unwrap();
        let entry = LinuxBoot {
            entry: kernel,
            boot_params: 0x7000,
        }
        .write(ram.memory())
        .unwrap();
        let p = policy("-cx16");
        let vcpus = vm.create_vcpus_with(&p).unwrap();
        let expected = vcpus[0]
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        // Only the boot vCPU runs; the other waits for an INIT/SIPI that never comes.
        entry.apply(&vcpus[0].fd).unwrap();
        let reports = Arc::new(Reports::default());
        let buses = IoBuses::new();
        buses.pio.insert(0x80, 2, reports.clone()).unwrap();
        // The control is in place before the guest runs: it reaches the stop port within
        // a few dozen instructions.
        let runner = VmRunner::new(vcpus, Arc::new(buses));
        *reports.control.lock().unwrap() = Some(runner.control());
        let running = runner.start().unwrap();
        assert_eq!(running.wait().end, VmEnd::Stopped);
        let values = reports.values.lock().unwrap().clone();
        let [ecx, edx, ebx, cores] = values[..] else {
            panic!("the guest reported {values:?}");
        };
        let seen = CpuId::from_entries(&[regs(1, 0, 0, ebx, ecx, edx)]).unwrap();
        eprintln!("guest sees leaf 1 features: {:?}", features_set(&seen));
        assert_eq!(ecx & (1 << 13), 0, "cx16 hidden from the guest");
        assert_eq!(ebx >> 24, 0, "APIC ID of vCPU 0");
        assert_eq!(cores, 2, "two cores in leaf 0xB");
        // OSXSAVE (bit 27) follows the guest's CR4; everything else is KVM's table.
        let table = find(&expected, 1, 0);
        assert_eq!(ecx & !ECX_OSXSAVE, table.ecx & !ECX_OSXSAVE);
    }
}
