//! x86-64 vCPU setup: CPUID, MSRs, FPU, LAPIC, segments, page tables and the two boot states.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod paging;
pub mod regs;
