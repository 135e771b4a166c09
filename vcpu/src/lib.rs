//! vmkit-vcpu: a KVM virtual machine and its vCPU runner for x86-64.
//!
//! - [`Vm`] creates the VM: checks the KVM API and capabilities, sets up the in-kernel irqchip
//!   and PIT, registers guest memory from `vmkit-memory`, and creates configured vCPUs (CPUID
//!   with topology, MSRs, FPU, LAPIC).
//! - [`x86_64::boot`] sets a vCPU's boot state: a flat 64-bit program at CPL3
//!   ([`x86_64::boot::FlatBoot`], the contract of `vmkit-guest-abi`) or the Linux 64-bit boot
//!   protocol ([`x86_64::boot::LinuxBoot`]).
//! - [`RunningVm`] runs one thread per vCPU and dispatches port I/O and MMIO exits to devices on
//!   [`IoBuses`] ([`BusDevice`]); [`VmControl`] pauses, resumes and stops it from any thread.
//! - [`stats`] keeps per-vCPU statistics: exits by kind, time in `KVM_RUN`, time handling
//!   exits, and the guest time the host accounted to each vCPU thread.
//! - [`host_check`] tells whether this host can run VMs, and how to fix it if not.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmkit_memory::{GuestRam, MemoryConfig};
//! use vmkit_vcpu::{x86_64::boot::LinuxBoot, IoBuses, RunningVm, Vm};
//!
//! let ram = GuestRam::new(&MemoryConfig::new(256 << 20))?;
//! let vm = Vm::new(1)?;
//! let _slots = vm.register_memory(&ram, false)?;
//! let vcpus = vm.create_vcpus()?;
//! // ... load a kernel and its zero page into `ram` ...
//! let entry = LinuxBoot { entry: 0x100_0000, boot_params: 0x7000 }.write(ram.memory())?;
//! entry.apply(&vcpus[0].fd)?;
//! let running = RunningVm::start(vcpus, Arc::new(IoBuses::new()))?;
//! let outcome = running.wait();
//! println!("{:?}", outcome.end);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod bus;
pub mod error;
pub mod host_check;
pub mod runner;
pub mod stats;
pub mod vm;
pub mod x86_64;

pub use bus::{Bus, BusDevice, IoBuses};
pub use error::{Error, Result, VcpuError, VcpuSnapshot};
pub use runner::{RunningVm, SystemEvent, ThreadStartHook, VmControl, VmEnd, VmOutcome, VmRunner};
pub use stats::{ExitKind, VcpuStats};
pub use vm::{Vcpu, Vm};
pub use x86_64::cpuid::{CpuidError, CpuidPolicy};
