//! Booting a Linux kernel: loading it, its boot parameters, the MP table and the ACPI tables.
//!
//! # Boot flow
//!
//! The VMM follows these steps, in this order, once guest RAM exists and before the vCPUs
//! start (everything below is written into guest memory, nothing touches KVM until the last
//! step):
//!
//! 1. **Load the kernel**: [`loader::load_kernel`] takes a bzImage or an ELF vmlinux (told
//!    apart by their first bytes) and returns a [`LoadedKernel`]: its entry points, its limits
//!    (command line length, `initrd_addr_max`) and where it lies. Nothing goes below 1 MiB.
//! 2. **Load the initrd**, if any: [`loader::load_initrd`] puts it at the top of the low RAM
//!    region, page-aligned, below the kernel's `initrd_addr_max` and above the kernel.
//! 3. **Build the command line**: the user's text plus what the VMM adds (for example
//!    `virtio_mmio.device=4K@0xd0000000:5` per virtio-mmio device, and `console=ttyS0`),
//!    checked against the kernel's limit by [`LoadedKernel::cmdline`].
//! 4. **Write the boot information**: [`configure`] writes the MP table ([`mptable`]), the
//!    ACPI tables ([`acpi`]), the command line, and either the zero page with its E820 map and
//!    the RSDP's address in `acpi_rsdp_addr` (Linux 64-bit boot protocol, [`boot_params`]) or
//!    the PVH start info with its memory map, the initrd as a module and the RSDP's address in
//!    `rsdp_paddr` (PVH), and returns the [`BootEntry`]. The E820 map is `GuestRam::e820()`
//!    from `vmkit-memory` with the MP table's and the ACPI tables' ranges reserved (they already
//!    are: they lie in the EBDA and BIOS area the map reserves).
//! 5. **Start the vCPUs**: vCPU 0 (the BSP) gets [`BootEntry::entry_state`]'s registers,
//!    applied with `EntryState::apply`: for the 64-bit protocol this is
//!    `vmkit_vcpu::x86_64::boot::LinuxBoot` (long mode, CPL0, `RSI` = zero page, identity-mapped
//!    low 4 GiB); for PVH it is [`pvh::PvhBoot`] (32-bit protected mode, paging off, `EBX` =
//!    start info). The other vCPUs get no entry state: KVM keeps application processors in
//!    wait-for-SIPI until the kernel starts them with INIT/SIPI, using the MADT's or the MP
//!    table's processor entries (APIC ID = vCPU index, as `vmkit-vcpu`'s CPUID topology sets
//!    them).
//!
//! The guest-physical layout below 1 MiB:
//!
//! | address | what |
//! |---|---|
//! | 0x500 | boot GDT (`LinuxBoot`, or [`pvh::PvhBoot`]) |
//! | 0x6000 | PVH start info ([`PVH_START_INFO_ADDRESS`]), module list at 0x6040 |
//! | 0x7000 | zero page ([`ZERO_PAGE_ADDRESS`]) or PVH memory map ([`PVH_MEMMAP_ADDRESS`]) |
//! | 0x8ff0 | `LinuxBoot`'s initial stack pointer (grows down) |
//! | 0x9000-0x10000 | `LinuxBoot`'s page tables |
//! | 0x20000 | command line ([`CMDLINE_ADDRESS`]) |
//! | 0x9fc00 | MP floating pointer and configuration table ([`mptable::MPTABLE_ADDRESS`]), in the EBDA area the E820 map reserves |
//! | 0xe0000 | ACPI tables: RSDP ([`acpi::RSDP_ADDRESS`]), XSDT, FADT, DSDT, MADT, in the BIOS area the E820 map reserves |
//!
//! A kernel built without `CONFIG_X86_MPPARSE` ignores the MP table: Debian's cloud kernel is
//! one. It finds its CPUs in the ACPI tables' MADT ("ACPI: Using ACPI (MADT) for SMP
//! configuration information", "smpboot: Allowing N CPUs"), and PCI devices below the DSDT's
//! host bridge. A kernel with both reads ACPI first.
//!
//! The example VM ends a guest that resets itself through the keyboard controller with
//! `crate::devices::i8042`, and one that triple-faults through the vCPU runner's shutdown exit.

pub mod acpi;
pub mod boot_params;
pub mod loader;
pub mod mptable;
pub mod pvh;

use linux_loader::cmdline::Cmdline;
use vm_memory::GuestMemoryBackend;
use vmkit_memory::E820Entry;
use vmkit_vcpu::x86_64::boot::{EntryState, LinuxBoot};

pub use loader::{Initrd, KernelFormat, KernelSegment, LoadedKernel};

/// Start of high memory (1 MiB): kernels load at or above it.
pub const HIGH_MEMORY_START: u64 = vmkit_memory::layout::HIGH_MEMORY_START;
/// Where the zero page (`struct boot_params`) goes (as Firecracker places it).
pub const ZERO_PAGE_ADDRESS: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE_ADDRESS: u64 = 0x2_0000;
/// The room for the command line: up to the MP table, NUL included.
pub const CMDLINE_AREA_SIZE: u64 = mptable::MPTABLE_ADDRESS - CMDLINE_ADDRESS;
/// Where the PVH `hvm_start_info` goes (as Cloud Hypervisor places it).
pub const PVH_START_INFO_ADDRESS: u64 = 0x6000;
/// Where the PVH module list (the initrd) goes, right after the start info.
pub const PVH_MODLIST_ADDRESS: u64 = 0x6040;
/// Where the PVH memory map goes.
pub const PVH_MEMMAP_ADDRESS: u64 = 0x7000;

/// Errors of loading and configuring a Linux guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is too short to hold a kernel's header.
    #[error("the kernel file is only {len} bytes: too short to be a kernel (truncated?)")]
    KernelTooShort {
        /// The file's length.
        len: u64,
    },
    /// The kernel file is neither an ELF file nor a bzImage.
    #[error(
        "not a kernel: neither an ELF vmlinux (no \\x7fELF magic) nor a bzImage (no \"HdrS\" \
         magic at offset 0x202)"
    )]
    NotAKernel,
    /// The file is a bzImage this loader cannot boot.
    #[error("bzImage: {0}")]
    BadBzImage(String),
    /// The file is an ELF file this loader cannot boot.
    #[error("ELF kernel: {0}")]
    BadElf(String),
    /// The kernel file ends before the end its headers give.
    #[error(
        "the kernel file is truncated: its headers need {expected} bytes, the file has {actual}"
    )]
    TruncatedKernel {
        /// The length the headers imply.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// Part of the kernel would lie outside guest RAM.
    #[error(
        "{what} needs guest memory {start:#x}..{end:#x}, which is not all RAM: give the VM more \
         memory"
    )]
    KernelOutsideRam {
        /// What did not fit.
        what: String,
        /// Start of the range.
        start: u64,
        /// End (exclusive) of the range.
        end: u64,
    },
    /// linux-loader failed while loading the kernel.
    #[error("loading the kernel: {0}")]
    Loader(#[from] linux_loader::loader::Error),
    /// The initrd file is empty.
    #[error("the initrd file is empty")]
    InitrdEmpty,
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "the initrd ({size} bytes) does not fit in guest memory: {available} bytes are free \
         between the kernel's end ({bottom:#x}) and {top:#x} (the end of low RAM or the kernel's \
         initrd_addr_max): give the VM more memory"
    )]
    InitrdDoesNotFit {
        /// The initrd's size.
        size: u64,
        /// The room there is.
        available: u64,
        /// Lowest address the initrd may start at.
        bottom: u64,
        /// Address the initrd must end below.
        top: u64,
    },
    /// The command line is longer than the kernel takes.
    #[error("the command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong {
        /// The command line's length.
        len: usize,
        /// The kernel's limit, without the NUL.
        max: usize,
    },
    /// The command line has characters the kernel does not take.
    #[error("invalid command line: {0}")]
    InvalidCmdline(String),
    /// Writing to guest memory failed.
    #[error("writing the {what} at {address:#x}: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Where.
        address: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The memory map has more entries than the boot protocol carries.
    #[error("the memory map has {count} entries; the boot protocol carries at most {max}")]
    TooManyE820Entries {
        /// Entries in the map.
        count: usize,
        /// The protocol's limit.
        max: usize,
    },
    /// The MP table cannot describe this many vCPUs.
    #[error("the MP table describes 1 to {max} vCPUs, not {count}")]
    CpuCount {
        /// vCPUs asked for.
        count: u32,
        /// The most an MP table with 8-bit APIC IDs (and the I/O APIC after them) describes.
        max: u32,
    },
    /// Writing the boot parameters failed (linux-loader's configurator).
    #[error("writing the boot parameters: {0}")]
    Configurator(#[from] linux_loader::configurator::Error),
    /// Setting up the boot vCPU's state failed.
    #[error("boot vCPU state: {0}")]
    Vcpu(#[from] vmkit_vcpu::Error),
}

/// The result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// The Linux 64-bit boot protocol: long mode, `RSI` = zero page.
    Linux64,
    /// The PVH boot protocol: 32-bit protected mode without paging, `EBX` = `hvm_start_info`.
    /// Only for an ELF kernel with the Xen PVH note.
    Pvh,
}

impl LoadedKernel {
    /// The protocol to boot this kernel with: PVH when the kernel has a PVH entry, else the
    /// 64-bit protocol.
    pub fn default_protocol(&self) -> BootProtocol {
        if self.pvh_entry.is_some() {
            BootProtocol::Pvh
        } else {
            BootProtocol::Linux64
        }
    }
}

/// What [`configure`] needs besides guest memory.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    /// The kernel, as [`loader::load_kernel`] loaded it.
    pub kernel: &'a LoadedKernel,
    /// Its initrd, as [`loader::load_initrd`] loaded it.
    pub initrd: Option<Initrd>,
    /// The command line, from [`LoadedKernel::cmdline`].
    pub cmdline: &'a Cmdline,
    /// The E820 map of guest RAM (`vmkit_memory::GuestRam::e820()`).
    pub e820: &'a [E820Entry],
    /// Number of vCPUs.
    pub cpu_count: u32,
    /// The protocol (see [`LoadedKernel::default_protocol`]).
    pub protocol: BootProtocol,
    /// The INTx lines of PCI functions, for the DSDT's `_PRT`.
    pub pci_intx: &'a [acpi::PciIntxRoute],
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// The Linux 64-bit boot protocol.
    Linux64 {
        /// The 64-bit entry point.
        entry: u64,
        /// Guest-physical address of the zero page.
        zero_page: u64,
    },
    /// The PVH boot protocol.
    Pvh {
        /// The 32-bit PVH entry point.
        entry: u64,
        /// Guest-physical address of the `hvm_start_info`.
        start_info: u64,
    },
}

impl BootEntry {
    /// Writes the boot GDT (and, for the 64-bit protocol, the page tables) into `mem` and
    /// returns the boot vCPU's registers, for `EntryState::apply` on vCPU 0 only.
    pub fn entry_state<M: GuestMemoryBackend>(&self, mem: &M) -> Result<EntryState> {
        match *self {
            BootEntry::Linux64 { entry, zero_page } => Ok(LinuxBoot {
                entry,
                boot_params: zero_page,
            }
            .write(mem)?),
            BootEntry::Pvh { entry, start_info } => pvh::PvhBoot { entry, start_info }.write(mem),
        }
    }
}

/// Writes the MP table, the ACPI tables, the command line and the boot parameters of `config`
/// (see the module documentation for the layout), and returns where the boot vCPU starts.
///
/// Fails with [`Error::CpuCount`], [`Error::TooManyE820Entries`], [`Error::CmdlineTooLong`]
/// (a command line longer than the room below the MP table), [`Error::BadElf`] (PVH asked for
/// a kernel without a PVH entry), or a memory error (guest RAM smaller than 1 MiB).
pub fn configure<M: GuestMemoryBackend>(mem: &M, config: &BootConfig) -> Result<BootEntry> {
    let mptable = mptable::write_mptable(mem, config.cpu_count)?;
    let acpi = acpi::write_acpi_tables(mem, config.cpu_count, config.pci_intx)?;
    let e820 = boot_params::e820_with_reserved(
        config.e820,
        &[(mptable.address, mptable.size), (acpi.rsdp, acpi.size)],
    );

    let cmdline_bytes = config
        .cmdline
        .as_cstring()
        .map_err(|e| Error::InvalidCmdline(e.to_string()))?;
    let cmdline_len = cmdline_bytes.as_bytes().len();
    if cmdline_len as u64 >= CMDLINE_AREA_SIZE {
        return Err(Error::CmdlineTooLong {
            len: cmdline_len,
            max: CMDLINE_AREA_SIZE as usize - 1,
        });
    }
    loader::write_cmdline(mem, CMDLINE_ADDRESS, config.cmdline)?;

    match config.protocol {
        BootProtocol::Linux64 => {
            let mut params =
                boot_params::zero_page(config.kernel, CMDLINE_ADDRESS, config.initrd, &e820)?;
            params.acpi_rsdp_addr = acpi.rsdp;
            boot_params::write_zero_page(mem, &params, ZERO_PAGE_ADDRESS)?;
            Ok(BootEntry::Linux64 {
                entry: config.kernel.entry_64,
                zero_page: ZERO_PAGE_ADDRESS,
            })
        }
        BootProtocol::Pvh => {
            let entry = config.kernel.pvh_entry.ok_or_else(|| {
                Error::BadElf("PVH boot asked for, but the kernel has no PVH entry note".into())
            })?;
            let mut info = boot_params::pvh_start_info(CMDLINE_ADDRESS, config.initrd, &e820)?;
            info.start_info.rsdp_paddr = acpi.rsdp;
            boot_params::write_pvh(mem, &info)?;
            Ok(BootEntry::Pvh {
                entry,
                start_info: PVH_START_INFO_ADDRESS,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::loader::tests::{bzimage, memory, vmlinux, MIB};
    use super::*;
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::hvm_start_info;
    use std::io::Cursor;
    use vm_memory::{Bytes, GuestAddress};
    use vmkit_memory::layout::{e820_map, ram_ranges};

    #[test]
    fn configure_linux64_writes_everything_the_kernel_reads() {
        let mem = memory(128 * MIB);
        let kernel = loader::load_kernel(&mem, &mut Cursor::new(bzimage(&[7; 4096]))).unwrap();
        let initrd = loader::load_initrd(&mem, &kernel, &mut Cursor::new(vec![1u8; 5000])).unwrap();
        let cmdline = kernel.cmdline("console=ttyS0 reboot=k").unwrap();
        let e820 = e820_map(&ram_ranges(128 * MIB));
        let entry = configure(
            &mem,
            &BootConfig {
                kernel: &kernel,
                initrd: Some(initrd),
                cmdline: &cmdline,
                e820: &e820,
                cpu_count: 2,
                protocol: kernel.default_protocol(),
                pci_intx: &[],
            },
        )
        .unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: 0x100_0200,
                zero_page: ZERO_PAGE_ADDRESS
            }
        );
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDRESS)).unwrap();
        let (ptr, image, size) = (
            params.hdr.cmd_line_ptr,
            params.hdr.ramdisk_image,
            params.hdr.ramdisk_size,
        );
        assert_eq!(u64::from(ptr), CMDLINE_ADDRESS);
        let rsdp = params.acpi_rsdp_addr;
        assert_eq!(rsdp, acpi::RSDP_ADDRESS);
        assert_eq!((u64::from(image), size), (initrd.address, 5000));
        let mut line = [0u8; 23];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDRESS))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 reboot=k\0");
        let signature: [u8; 4] = mem
            .read_obj(GuestAddress(mptable::MPTABLE_ADDRESS))
            .unwrap();
        assert_eq!(&signature, b"_MP_");
        let signature: [u8; 8] = mem.read_obj(GuestAddress(acpi::RSDP_ADDRESS)).unwrap();
        assert_eq!(&signature, b"RSD PTR ");

        let state = entry.entry_state(&mem).unwrap();
        assert_eq!(state.regs.rip, 0x100_0200);
        assert_eq!(state.regs.rsi, ZERO_PAGE_ADDRESS);
        assert_eq!(state.cs.l, 1);
    }

    #[test]
    fn configure_pvh_writes_the_start_info() {
        let mem = memory(128 * MIB);
        let kernel = loader::load_kernel(&mem, &mut Cursor::new(vmlinux(true))).unwrap();
        assert_eq!(kernel.default_protocol(), BootProtocol::Pvh);
        let cmdline = kernel.cmdline("console=ttyS0").unwrap();
        let e820 = e820_map(&ram_ranges(128 * MIB));
        let entry = configure(
            &mem,
            &BootConfig {
                kernel: &kernel,
                initrd: None,
                cmdline: &cmdline,
                e820: &e820,
                cpu_count: 1,
                protocol: BootProtocol::Pvh,
                pci_intx: &[],
            },
        )
        .unwrap();
        assert_eq!(
            entry,
            BootEntry::Pvh {
                entry: 0x100_0850,
                start_info: PVH_START_INFO_ADDRESS
            }
        );
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDRESS)).unwrap();
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDRESS);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.rsdp_paddr, acpi::RSDP_ADDRESS);
        let state = entry.entry_state(&mem).unwrap();
        assert_eq!(state.regs.rbx, PVH_START_INFO_ADDRESS);
        assert_eq!(state.regs.rip, 0x100_0850);

        // A kernel without the note cannot boot through PVH.
        let plain = loader::load_kernel(&mem, &mut Cursor::new(vmlinux(false))).unwrap();
        assert_eq!(plain.default_protocol(), BootProtocol::Linux64);
        let err = configure(
            &mem,
            &BootConfig {
                kernel: &plain,
                initrd: None,
                cmdline: &cmdline,
                e820: &e820,
                cpu_count: 1,
                protocol: BootProtocol::Pvh,
                pci_intx: &[],
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("PVH"), "{err}");
    }
}
