//! VM creation: the KVM VM with its in-kernel devices, guest memory, and configured vCPUs.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmkit_memory::{GuestRam, KvmSlots, SlotOptions};

use crate::error::{Error, Result};
use crate::x86_64::cpuid::CpuidPolicy;
use crate::x86_64::regs;

/// Where KVM puts the three pages of the real-mode TSS it needs on Intel hosts, at the top of
/// the 32-bit MMIO hole below the IOAPIC, where no RAM or device lives.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Where KVM puts the one-page identity map it needs on Intel hosts, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The KVM capabilities a vmkit VM needs, with what to do when one is missing.
pub const REQUIRED_CAPABILITIES: &[(Cap, &str, &str)] = &[
    (
        Cap::Irqchip,
        "KVM_CAP_IRQCHIP",
        "an in-kernel interrupt controller is needed; use a host kernel built with KVM's x86 irqchip",
    ),
    (
        Cap::Pit2,
        "KVM_CAP_PIT2",
        "an in-kernel PIT is needed; use a host kernel with KVM_CAP_PIT2",
    ),
    (
        Cap::Ioeventfd,
        "KVM_CAP_IOEVENTFD",
        "device notifications need ioeventfd; use a host kernel built with CONFIG_EVENTFD",
    ),
    (
        Cap::Irqfd,
        "KVM_CAP_IRQFD",
        "device interrupts need irqfd; use a host kernel built with CONFIG_HAVE_KVM_IRQFD",
    ),
    (
        Cap::UserMemory,
        "KVM_CAP_USER_MEMORY",
        "guest RAM needs user memory slots, present in every supported kernel",
    ),
    (
        Cap::SetTssAddr,
        "KVM_CAP_SET_TSS_ADDR",
        "needed on Intel hosts; update the host kernel",
    ),
    (
        Cap::SignalMsi,
        "KVM_CAP_SIGNAL_MSI",
        "MSI delivery is needed for PCI devices; use a host kernel with KVM_CAP_SIGNAL_MSI",
    ),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT",
        "pause and stop need immediate_exit (Linux 4.11 or later)",
    ),
    (
        Cap::ExtCpuid,
        "KVM_CAP_EXT_CPUID",
        "CPUID setup needs KVM_GET_SUPPORTED_CPUID",
    ),
];

/// A KVM virtual machine.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    vcpu_count: usize,
    supported_cpuid: CpuId,
}

impl Vm {
    /// Creates a VM for `vcpu_count` vCPUs: checks the API version and capabilities, then sets
    /// up the TSS and identity-map pages, the in-kernel irqchip (PIC, IOAPIC, LAPICs) and a PIT.
    pub fn new(vcpu_count: usize) -> Result<Vm> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(Error::ApiVersion(version));
        }
        for &(cap, name, hint) in REQUIRED_CAPABILITIES {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCapability { name, hint });
            }
        }
        let max = kvm.get_max_vcpus();
        if vcpu_count == 0 || vcpu_count > max {
            return Err(Error::VcpuCount {
                requested: vcpu_count,
                max,
            });
        }
        let kvm_err = |operation| move |source| Error::Kvm { operation, source };
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            vcpu_count,
            supported_cpuid,
        })
    }

    /// The VM file descriptor, for registering ioeventfds, irqfds and the like.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Number of vCPUs this VM was created for.
    pub fn vcpu_count(&self) -> usize {
        self.vcpu_count
    }

    /// The CPUID KVM supports on this host.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Registers guest RAM as KVM memory slots 0.. . `ram` must outlive the VM.
    pub fn register_memory(&self, ram: &GuestRam, dirty_log: bool) -> Result<KvmSlots> {
        Ok(ram.register_with_kvm(
            &self.fd,
            SlotOptions {
                first_slot: 0,
                dirty_log,
            },
        )?)
    }

    /// Creates every vCPU, each with its CPUID (KVM's supported set with the VM's topology),
    /// boot MSRs, FPU and LAPIC set. The boot state is set separately (see
    /// [`crate::x86_64::boot`]).
    pub fn create_vcpus(&self) -> Result<Vec<Vcpu>> {
        self.create_vcpus_with(&CpuidPolicy::default())
    }

    /// Like [`Vm::create_vcpus`], with the CPUID `policy` applied (features hidden, required
    /// features checked before any vCPU is created).
    pub fn create_vcpus_with(&self, policy: &CpuidPolicy) -> Result<Vec<Vcpu>> {
        let count = self.vcpu_count as u32;
        policy.check(&self.supported_cpuid, count)?;
        (0..self.vcpu_count)
            .map(|index| {
                let fd = self
                    .fd
                    .create_vcpu(index as u64)
                    .map_err(|source| Error::Kvm {
                        operation: "KVM_CREATE_VCPU",
                        source,
                    })?;
                let cpuid = policy.vcpu_cpuid(&self.supported_cpuid, index as u32, count)?;
                regs::configure(&fd, &cpuid)?;
                Ok(Vcpu { index, fd })
            })
            .collect()
    }
}

/// One vCPU: its index (which is also its APIC ID) and KVM file descriptor.
pub struct Vcpu {
    /// Index, `0..vcpu_count`.
    pub index: usize,
    /// The KVM vCPU.
    pub fd: VcpuFd,
}
