//! The two boot states a vCPU can start in.
//!
//! - [`FlatBoot`]: a flat 64-bit program at CPL3, the contract of `vmkit-guest-abi` (the
//!   built-in guest, or any static ELF). Every vCPU starts at the entry point with its own stack.
//! - [`LinuxBoot`]: the Linux 64-bit boot protocol: CPL0, flat `__BOOT_CS`/`__BOOT_DS`, paging on
//!   with the low 4 GiB identity-mapped, `RSI` pointing at the zero page. Only vCPU 0 runs at
//!   entry; the kernel starts the others.
//!
//! Each writes its structures (GDT, TSS, page tables, boot information) into guest memory once
//! with `write`, then gives each vCPU its registers with [`EntryState::apply`].

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_segment, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmkit_guest_abi::{self as abi, BootInfo, DeviceInfo, MemoryRange};

use super::gdt::{self, descriptor, kvm_segment_for};
use super::paging::IdentityMap;
use crate::error::{Error, Result};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

const PAGE_SIZE: u64 = 4096;
const FOUR_GIB: u64 = 1 << 32;

/// Flat boot: GDT address.
pub const FLAT_GDT_ADDRESS: u64 = 0x1000;
/// Flat boot: TSS address. The TSS carries a full I/O permission bitmap (8 KiB), so it ends at
/// 0x6069, below the page tables.
pub const FLAT_TSS_ADDRESS: u64 = 0x4000;
/// Flat boot: first page of the page tables.
pub const FLAT_PAGE_TABLES: u64 = 0x10000;
/// Flat boot: end of the area the page tables may use (the legacy video/BIOS area starts here).
pub const FLAT_PAGE_TABLES_END: u64 = 0xa0000;
/// The 104-byte TSS, an I/O bitmap for all 65536 ports, and the terminating byte of all ones
/// the architecture requires after the bitmap.
const TSS_IO_BITMAP_OFFSET: usize = 0x68;
const TSS_SIZE: usize = TSS_IO_BITMAP_OFFSET + 65536 / 8 + 1;
const TSS_LIMIT: u32 = TSS_SIZE as u32 - 1;

/// Linux boot: GDT address (as Firecracker and Cloud Hypervisor place it).
pub const LINUX_GDT_ADDRESS: u64 = 0x500;
/// Linux boot: the initial stack pointer.
pub const LINUX_STACK_POINTER: u64 = 0x8ff0;
/// Linux boot: first page of the page tables.
pub const LINUX_PAGE_TABLES: u64 = 0x9000;
const LINUX_PAGE_TABLES_END: u64 = 0x10000;

/// The registers one vCPU starts with.
#[derive(Clone, Copy, Debug)]
pub struct EntryState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Code segment.
    pub cs: kvm_segment,
    /// Stack and data segments.
    pub data: kvm_segment,
    /// Task register.
    pub tr: kvm_segment,
    /// GDT base and limit.
    pub gdt: (u64, u16),
    /// CR0, CR3, CR4, EFER.
    pub control: (u64, u64, u64, u64),
    /// Make the vCPU runnable even if it is an application processor, which KVM otherwise
    /// holds until it receives INIT and SIPI.
    pub runnable: bool,
}

impl EntryState {
    /// Loads this state into `vcpu`, keeping the parts of its special registers not set here
    /// (APIC base, interrupt bitmap) as KVM initialised them.
    pub fn apply(&self, vcpu: &VcpuFd) -> Result<()> {
        let kvm = |operation| move |source| Error::Kvm { operation, source };
        let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        sregs.cs = self.cs;
        sregs.ds = self.data;
        sregs.es = self.data;
        sregs.fs = self.data;
        sregs.gs = self.data;
        sregs.ss = self.data;
        sregs.tr = self.tr;
        sregs.ldt = kvm_segment {
            unusable: 1,
            type_: 2,
            ..Default::default()
        };
        sregs.gdt.base = self.gdt.0;
        sregs.gdt.limit = self.gdt.1;
        // No IDT: an exception escalates to a triple fault, which the runner reports.
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) = self.control;
        vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        // A flat program cannot enable its local APIC (the SVR is CPL0's), and a disabled
        // APIC drops fixed interrupts: enable it, so an MSI sent to this vCPU is latched in
        // the IRR. With interrupts off the program never takes it; the host can see it.
        let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        super::regs::software_enable_lapic(&mut lapic);
        vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        if self.runnable {
            let state = kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            vcpu.set_mp_state(state).map_err(kvm("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }
}

fn write_bytes<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    address: u64,
    bytes: &[u8],
) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(address))
        .map_err(|source| Error::GuestMemory {
            what,
            address,
            source,
        })
}

fn write_gdt<M: GuestMemory>(mem: &M, address: u64, entries: &[u64]) -> Result<(u64, u16)> {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    write_bytes(mem, "GDT", address, &bytes)?;
    Ok((address, (bytes.len() - 1) as u16))
}

/// A flat 64-bit program at CPL3 (see `vmkit-guest-abi` for the contract).
#[derive(Clone, Debug)]
pub struct FlatBoot {
    /// Entry point (guest-physical = virtual).
    pub entry: u64,
    /// End (exclusive) of the loaded image; free memory starts at the next page.
    pub image_end: u64,
    /// Number of vCPUs.
    pub cpu_count: u32,
    /// Guest RAM as `(start, size)` ranges, ascending; the first must start at 0.
    pub ram: Vec<(u64, u64)>,
    /// Devices to describe in the boot information.
    pub devices: Vec<DeviceInfo>,
    /// Program arguments (at most `ARGS_SIZE - 1` bytes).
    pub args: Vec<u8>,
}

/// What [`FlatBoot::write`] laid out.
#[derive(Clone, Copy, Debug)]
pub struct FlatBootLayout {
    entry: u64,
    cr3: u64,
    stacks_top: u64,
    /// The boot information as written to guest memory.
    pub boot_info: BootInfo,
}

impl FlatBoot {
    /// Writes the GDT, TSS, page tables and boot information into `mem`.
    pub fn write<M: GuestMemory>(&self, mem: &M) -> Result<FlatBootLayout> {
        let low_ram_end = match self.ram.first() {
            Some(&(0, size)) => size,
            _ => {
                return Err(Error::BootLayout(
                    "guest RAM must start at address 0".into(),
                ))
            }
        };
        if self.ram.len() > abi::MAX_MEMORY_RANGES {
            return Err(Error::BootLayout(format!(
                "{} RAM ranges; the boot information has room for {}",
                self.ram.len(),
                abi::MAX_MEMORY_RANGES
            )));
        }
        if self.devices.len() > abi::MAX_DEVICES {
            return Err(Error::BootLayout(format!(
                "{} devices; the boot information has room for {}",
                self.devices.len(),
                abi::MAX_DEVICES
            )));
        }
        if self.args.len() >= abi::ARGS_SIZE || self.args.contains(&0) {
            return Err(Error::BootLayout(format!(
                "program arguments must be at most {} bytes without NUL",
                abi::ARGS_SIZE - 1
            )));
        }
        if self.cpu_count == 0 {
            return Err(Error::BootLayout("no vCPUs".into()));
        }
        let stacks = u64::from(self.cpu_count) * abi::STACK_SIZE;
        let free_start = self.image_end.next_multiple_of(PAGE_SIZE);
        let free_end = low_ram_end.saturating_sub(stacks) & !(PAGE_SIZE - 1);
        if free_start > free_end || self.image_end < abi::PROGRAM_MIN_ADDRESS {
            return Err(Error::BootLayout(format!(
                "the program image ends at {:#x} and {} vCPU stacks need {:#x} bytes below {:#x}: \
                 give the VM more memory",
                self.image_end, self.cpu_count, stacks, low_ram_end
            )));
        }

        let tss = descriptor(gdt::TSS64_BUSY, FLAT_TSS_ADDRESS as u32, TSS_LIMIT);
        let gdt = [
            0,
            descriptor(gdt::CODE64_KERNEL, 0, 0xfffff),
            descriptor(gdt::DATA_KERNEL, 0, 0xfffff),
            descriptor(gdt::DATA_USER, 0, 0xfffff),
            descriptor(gdt::CODE64_USER, 0, 0xfffff),
            tss,
            0, // Upper half of the 16-byte TSS descriptor: base bits 63:32, all zero.
        ];
        write_gdt(mem, FLAT_GDT_ADDRESS, &gdt)?;

        // A TSS whose I/O bitmap allows every port. IOPL=3 alone should allow port I/O at CPL3,
        // but a paravirtual KVM (kvm_pvm) runs the guest with the real IOPL at 0, traps each
        // `in`/`out` and emulates it, and its emulator then consults this bitmap.
        let mut tss_bytes = vec![0u8; TSS_SIZE];
        tss_bytes[0x66..0x68].copy_from_slice(&(TSS_IO_BITMAP_OFFSET as u16).to_le_bytes());
        tss_bytes[TSS_SIZE - 1] = 0xff;
        write_bytes(mem, "TSS", FLAT_TSS_ADDRESS, &tss_bytes)?;

        let ram_end = self.ram.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
        let cr3 = IdentityMap {
            base: FLAT_PAGE_TABLES,
            area_end: FLAT_PAGE_TABLES_END,
            map_end: ram_end.max(FOUR_GIB),
            user: true,
        }
        .write(mem)?;

        let mut info = BootInfo::new();
        info.cpu_count = self.cpu_count;
        info.ram_size = self.ram.iter().map(|&(_, l)| l).sum();
        info.free_memory_start = free_start;
        info.free_memory_end = free_end;
        info.memory_map_count = self.ram.len() as u32;
        for (slot, &(start, size)) in info.memory_map.iter_mut().zip(&self.ram) {
            *slot = MemoryRange { start, size };
        }
        info.device_count = self.devices.len() as u32;
        info.devices[..self.devices.len()].copy_from_slice(&self.devices);
        info.args[..self.args.len()].copy_from_slice(&self.args);
        write_bytes(
            mem,
            "boot information",
            abi::BOOT_INFO_ADDRESS,
            boot_info_bytes(&info),
        )?;

        Ok(FlatBootLayout {
            entry: self.entry,
            cr3,
            stacks_top: low_ram_end & !(PAGE_SIZE - 1),
            boot_info: info,
        })
    }
}

fn boot_info_bytes(info: &BootInfo) -> &[u8] {
    // SAFETY: BootInfo is repr(C), made only of integers and arrays of repr(C) integer structs
    // with no padding (its layout test in vmkit-guest-abi pins the size), so all its bytes are
    // initialised; the slice borrows `info` and lives no longer.
    unsafe {
        std::slice::from_raw_parts(
            (info as *const BootInfo).cast::<u8>(),
            std::mem::size_of::<BootInfo>(),
        )
    }
}

impl FlatBootLayout {
    /// The registers of vCPU `index`.
    pub fn entry_state(&self, index: u32) -> EntryState {
        let stack_top = self.stacks_top - u64::from(index) * abi::STACK_SIZE;
        let regs = kvm_regs {
            rip: self.entry,
            // As after a `call`: RSP + 8 is 16-byte aligned, as the SysV ABI expects at entry.
            rsp: stack_top - 8,
            rdi: abi::BOOT_INFO_ADDRESS,
            rsi: u64::from(index),
            rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
            ..Default::default()
        };
        EntryState {
            regs,
            cs: kvm_segment_for(
                descriptor(gdt::CODE64_USER, 0, 0xfffff),
                abi::USER_CODE_SELECTOR,
            ),
            data: kvm_segment_for(
                descriptor(gdt::DATA_USER, 0, 0xfffff),
                abi::USER_DATA_SELECTOR,
            ),
            tr: kvm_segment_for(
                descriptor(gdt::TSS64_BUSY, FLAT_TSS_ADDRESS as u32, TSS_LIMIT),
                5 << 3,
            ),
            gdt: (FLAT_GDT_ADDRESS, 7 * 8 - 1),
            control: (
                CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
                self.cr3,
                CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
                EFER_LME | EFER_LMA,
            ),
            // Every vCPU starts at the entry point at once.
            runnable: true,
        }
    }
}

/// The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit boot protocol").
#[derive(Clone, Copy, Debug)]
pub struct LinuxBoot {
    /// The kernel's 64-bit entry point.
    pub entry: u64,
    /// Guest-physical address of the zero page (`struct boot_params`), passed in `RSI`.
    pub boot_params: u64,
}

impl LinuxBoot {
    /// Writes the boot GDT and page tables identity-mapping the low 4 GiB into `mem`, and returns
    /// the boot vCPU's registers.
    pub fn write<M: GuestMemory>(&self, mem: &M) -> Result<EntryState> {
        // The protocol asks for flat __BOOT_CS (0x10) and __BOOT_DS (0x18).
        let code = descriptor(gdt::CODE64_KERNEL, 0, 0xfffff);
        let data = descriptor(gdt::DATA_KERNEL, 0, 0xfffff);
        let tss = descriptor(gdt::TSS64_BUSY, 0, 0xfffff);
        let gdt = write_gdt(mem, LINUX_GDT_ADDRESS, &[0, 0, code, data, tss])?;
        let cr3 = IdentityMap {
            base: LINUX_PAGE_TABLES,
            area_end: LINUX_PAGE_TABLES_END,
            map_end: FOUR_GIB,
            user: false,
        }
        .write(mem)?;
        Ok(EntryState {
            regs: kvm_regs {
                rip: self.entry,
                rsp: LINUX_STACK_POINTER,
                rbp: LINUX_STACK_POINTER,
                rsi: self.boot_params,
                rflags: RFLAGS_RESERVED,
                ..Default::default()
            },
            cs: kvm_segment_for(code, 0x10),
            data: kvm_segment_for(data, 0x18),
            tr: kvm_segment_for(tss, 0x20),
            gdt,
            control: (
                CR0_PE | CR0_ET | CR0_NE | CR0_PG,
                cr3,
                CR4_PAE,
                EFER_LME | EFER_LMA,
            ),
            // The boot vCPU is runnable anyway; the kernel starts the others with INIT/SIPI.
            runnable: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;

    fn flat(cpu_count: u32, ram: u64) -> FlatBoot {
        FlatBoot {
            entry: 0x20_0000,
            image_end: 0x20_3001,
            cpu_count,
            ram: vec![(0, ram)],
            devices: vec![],
            args: b"touch=1".to_vec(),
        }
    }

    #[test]
    fn flat_layout_gives_each_vcpu_its_stack() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let layout = flat(4, 16 * MIB).write(&mem).unwrap();
        let info: [u8; 8] = mem.read_obj(GuestAddress(abi::BOOT_INFO_ADDRESS)).unwrap();
        assert_eq!(u64::from_le_bytes(info), abi::BOOT_INFO_MAGIC);
        assert_eq!(layout.boot_info.free_memory_start, 0x20_4000);
        assert_eq!(
            layout.boot_info.free_memory_end,
            16 * MIB - 4 * abi::STACK_SIZE
        );
        assert_eq!(layout.boot_info.args(), b"touch=1");
        assert_eq!(layout.boot_info.ram_size, 16 * MIB);

        let cpu0 = layout.entry_state(0);
        let cpu3 = layout.entry_state(3);
        assert_eq!(cpu0.regs.rsp, 16 * MIB - 8);
        assert_eq!(cpu3.regs.rsp, 16 * MIB - 3 * abi::STACK_SIZE - 8);
        assert_eq!((cpu3.regs.rsi, cpu3.regs.rdi), (3, abi::BOOT_INFO_ADDRESS));
        assert_eq!(cpu0.cs.dpl, 3);
        assert_eq!(cpu0.cs.selector & 3, 3);
        assert_eq!(cpu0.regs.rflags & RFLAGS_IOPL3, RFLAGS_IOPL3);
    }

    #[test]
    fn flat_layout_refuses_what_does_not_fit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        // 64 stacks of 64 KiB do not fit between a 2 MiB image and 4 MiB.
        assert!(matches!(
            flat(64, 4 * MIB).write(&mem),
            Err(Error::BootLayout(_))
        ));
        let mut bad_args = flat(1, 4 * MIB);
        bad_args.args = vec![b'a'; abi::ARGS_SIZE];
        assert!(matches!(bad_args.write(&mem), Err(Error::BootLayout(_))));
        let mut low_image = flat(1, 4 * MIB);
        low_image.image_end = 0x8000;
        assert!(matches!(low_image.write(&mem), Err(Error::BootLayout(_))));
    }

    #[test]
    fn linux_state_follows_the_boot_protocol() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let state = LinuxBoot {
            entry: 0x100_0000,
            boot_params: 0x7000,
        }
        .write(&mem)
        .unwrap();
        assert_eq!((state.cs.selector, state.data.selector), (0x10, 0x18));
        assert_eq!((state.cs.l, state.cs.dpl), (1, 0));
        assert_eq!(state.regs.rsi, 0x7000);
        assert_eq!(state.control.1, LINUX_PAGE_TABLES);
    }
}
