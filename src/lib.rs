//! vmkit: the example VMM, assembled from the vmkit crates.
//!
//! [`vmm::Vmm`] builds a VM from a [`vmm::VmConfig`]: guest RAM from `vmkit-memory`, the KVM VM
//! and vCPU threads from `vmkit-vcpu`, a program loaded as a flat 64-bit ELF at CPL3 (the
//! [`builtin_guest`] unless another is given), and the legacy [`devices`]: a 16550A serial
//! console and the exit port. [`seccomp`] confines each of its threads. [`cli`] is the command
//! line of `examples/vm`.
#![deny(missing_docs)]

pub mod builtin_guest;
pub mod cli;
pub mod definition;
pub mod devices;
pub mod linux;
pub mod program;
pub mod seccomp;
pub mod vmm;

pub use vmm::{RunReport, VmConfig, Vmm};
