//! Errors of VM creation, vCPU setup and the vCPU runner.

use std::fmt;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm: {0} (is the kvm module loaded, and may this user open /dev/kvm?)"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the stable one (12).
    #[error("KVM API version {0} is not supported (vmkit needs version 12)")]
    ApiVersion(i32),
    /// A KVM capability the VM needs is missing.
    #[error("KVM lacks the capability {name}, which vmkit needs: {hint}")]
    MissingCapability {
        /// Name of the capability.
        name: &'static str,
        /// What to do about it.
        hint: &'static str,
    },
    /// An ioctl on the VM failed.
    #[error("KVM {operation} failed: {source}")]
    Kvm {
        /// What was being done.
        operation: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU count is zero or larger than KVM allows.
    #[error("{requested} vCPUs requested; this host allows 1 to {max}")]
    VcpuCount {
        /// How many were asked for.
        requested: usize,
        /// The most KVM allows.
        max: usize,
    },
    /// KVM set fewer MSRs than asked.
    #[error(
        "KVM accepted only {set} of {requested} boot MSRs (first refused: {first_refused:#x})"
    )]
    SetMsrs {
        /// How many were set.
        set: usize,
        /// How many were asked for.
        requested: usize,
        /// Index of the first MSR KVM refused.
        first_refused: u32,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory at {address:#x}: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Guest-physical address.
        address: u64,
        /// The error from vm-memory.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The guest memory is too small or too large for the boot layout.
    #[error("boot layout does not fit: {0}")]
    BootLayout(String),
    /// Registering guest memory with KVM failed.
    #[error("cannot register guest memory with KVM: {0}")]
    Memory(#[from] vmkit_memory::Error),
    /// The CPUID policy cannot be applied (a required feature KVM does not offer).
    #[error("CPUID: {0}")]
    Cpuid(#[from] crate::x86_64::cpuid::CpuidError),
    /// A bus range overlaps one already registered, or is empty.
    #[error("bus range [{base:#x}, +{len:#x}) is empty or overlaps a registered device")]
    BusOverlap {
        /// Start of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
    /// Setting up the vCPU kick signal failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning a vCPU thread failed.
    #[error("cannot spawn the thread of vCPU {index}: {source}")]
    SpawnThread {
        /// vCPU index.
        index: usize,
        /// The error from the OS.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The register state of a vCPU at the moment something went wrong, for debugging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuSnapshot {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Flags.
    pub rflags: u64,
    /// Control register 0.
    pub cr0: u64,
    /// Page-fault address.
    pub cr2: u64,
    /// Page-table root.
    pub cr3: u64,
    /// Control register 4.
    pub cr4: u64,
    /// Extended feature enable register.
    pub efer: u64,
    /// Code segment selector (its low two bits are the privilege level).
    pub cs: u16,
}

impl fmt::Display for VcpuSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RIP={:#x} RSP={:#x} RFLAGS={:#x} CS={:#x} (CPL{}) CR0={:#x} CR2={:#x} CR3={:#x} CR4={:#x} EFER={:#x}",
            self.rip,
            self.rsp,
            self.rflags,
            self.cs,
            self.cs & 3,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer
        )
    }
}

/// Why a vCPU stopped with an error. Each variant carries the state needed to debug it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VcpuError {
    /// KVM could not handle an exit itself (`KVM_EXIT_INTERNAL_ERROR`), e.g. an instruction it
    /// cannot emulate.
    #[error("vCPU {index}: KVM internal error, suberror {suberror} ({}), data {data:x?}; {state}", suberror_name(*.suberror))]
    Internal {
        /// vCPU index.
        index: usize,
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// `kvm_run.internal.data[..ndata]`.
        data: Vec<u64>,
        /// Registers at the exit.
        state: VcpuSnapshot,
    },
    /// The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    #[error("vCPU {index}: VM entry failed, hardware reason {reason:#x} on host CPU {host_cpu}; {state}")]
    FailEntry {
        /// vCPU index.
        index: usize,
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// The host CPU it failed on.
        host_cpu: u32,
        /// Registers at the exit.
        state: VcpuSnapshot,
    },
    /// An exit this runner does not handle.
    #[error("vCPU {index}: unhandled exit {exit}; {state}")]
    UnhandledExit {
        /// vCPU index.
        index: usize,
        /// The exit, as text.
        exit: String,
        /// Registers at the exit.
        state: VcpuSnapshot,
    },
    /// The vCPU thread panicked (in a device handler); the VM was stopped.
    #[error("vCPU {index}: its thread panicked")]
    Panicked {
        /// vCPU index.
        index: usize,
    },
    /// The thread-start hook refused to run the vCPU (see [`crate::VmRunner::on_thread_start`]).
    #[error("vCPU {index}: thread set-up failed: {reason}")]
    ThreadSetup {
        /// vCPU index.
        index: usize,
        /// What the hook reported.
        reason: String,
    },
    /// `KVM_RUN` itself failed.
    #[error("vCPU {index}: KVM_RUN failed: {errno}")]
    Run {
        /// vCPU index.
        index: usize,
        /// The errno, as text.
        errno: String,
    },
}

/// The name of a `KVM_INTERNAL_ERROR_*` suberror.
pub fn suberror_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "exit while delivering an event",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown suberror",
    }
}
