//! The boot parameters: the zero page (`struct boot_params`) of the Linux boot protocol, or the
//! `hvm_start_info` of PVH, each with the E820 memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmkit_memory::{E820Entry, E820Kind};

use super::loader::{Initrd, LoadedKernel, LOADFLAGS};
use super::{Error, Result, PVH_MEMMAP_ADDRESS, PVH_MODLIST_ADDRESS, PVH_START_INFO_ADDRESS};

/// The boot sector's signature, `boot_flag` in the setup header.
const BOOT_FLAG: u16 = 0xaa55;
/// `HdrS`.
const HEADER_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The alignment an ELF kernel is told it was loaded at (CONFIG_PHYSICAL_ALIGN's usual value).
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `heap_end_ptr`: the end of the real-mode setup heap, relative to the setup code, minus
/// 0x200 (boot.rst's example). The 64-bit entry never runs the real-mode code that uses it;
/// it is set because `CAN_USE_HEAP` says it is valid.
const HEAP_END_PTR: u16 = 0xe000 - 0x200;

/// `e820` with each of `reserved` (start, size) marked reserved: RAM entries overlapping a
/// range are split around it, and a reserved entry is added unless one already covers the
/// range. The result is sorted by address.
pub fn e820_with_reserved(e820: &[E820Entry], reserved: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = e820.to_vec();
    for &(start, size) in reserved {
        let end = start.saturating_add(size);
        if size == 0
            || map.iter().any(|e| {
                e.kind == E820Kind::Reserved
                    && e.addr <= start
                    && e.addr.saturating_add(e.size) >= end
            })
        {
            continue;
        }
        let mut next = Vec::with_capacity(map.len() + 2);
        for entry in map {
            let entry_end = entry.addr.saturating_add(entry.size);
            if entry.kind != E820Kind::Ram || entry_end <= start || entry.addr >= end {
                next.push(entry);
                continue;
            }
            if entry.addr < start {
                next.push(E820Entry {
                    size: start - entry.addr,
                    ..entry
                });
            }
            if entry_end > end {
                next.push(E820Entry {
                    addr: end,
                    size: entry_end - end,
                    kind: E820Kind::Ram,
                });
            }
        }
        next.push(E820Entry {
            addr: start,
            size,
            kind: E820Kind::Reserved,
        });
        map = next;
    }
    map.sort_by_key(|e| (e.addr, e.size));
    map
}

fn check_entry_count(count: usize) -> Result<()> {
    if count > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(Error::TooManyE820Entries {
            count,
            max: E820_MAX_ENTRIES_ZEROPAGE,
        });
    }
    Ok(())
}

/// The zero page for `kernel`: its setup header (a bzImage's own, or a minimal one for an ELF
/// kernel) completed with what the boot loader fills in (`type_of_loader` 0xff, `loadflags`
/// `LOADED_HIGH | CAN_USE_HEAP`, `heap_end_ptr`, the command line pointer, the initrd), and the
/// E820 map.
pub fn zero_page(
    kernel: &LoadedKernel,
    cmdline_address: u64,
    initrd: Option<Initrd>,
    e820: &[E820Entry],
) -> Result<boot_params> {
    check_entry_count(e820.len())?;
    let mut params = boot_params::default();
    // As Firecracker and Cloud Hypervisor do: a bzImage's header as the image has it (the
    // kernel reads fields the loader never touches, such as `kernel_alignment` or `init_size`);
    // for an ELF kernel the fields the 64-bit entry reads.
    let mut hdr = match kernel.setup_header {
        Some(hdr) => hdr,
        None => setup_header {
            boot_flag: BOOT_FLAG,
            header: HEADER_MAGIC,
            kernel_alignment: ELF_KERNEL_ALIGNMENT,
            cmdline_size: u32::try_from(kernel.cmdline_capacity.saturating_sub(1))
                .unwrap_or(u32::MAX),
            ..Default::default()
        },
    };
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADFLAGS;
    hdr.heap_end_ptr = HEAP_END_PTR;
    hdr.cmd_line_ptr = cmdline_address as u32;
    params.ext_cmd_line_ptr = (cmdline_address >> 32) as u32;
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.address as u32;
        params.ext_ramdisk_image = (initrd.address >> 32) as u32;
        hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    params.hdr = hdr;
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind.as_raw(),
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes the zero page at `address`.
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    params: &boot_params,
    address: u64,
) -> Result<()> {
    let boot = BootParams::new(params, GuestAddress(address));
    LinuxBootConfigurator::write_bootparams(&boot, mem)?;
    Ok(())
}

/// The PVH boot information: the start info, the module list (the initrd) and the memory map,
/// laid out at [`PVH_START_INFO_ADDRESS`], [`PVH_MODLIST_ADDRESS`] and [`PVH_MEMMAP_ADDRESS`].
#[derive(Clone, Debug)]
pub struct PvhStartInfo {
    /// The `hvm_start_info`.
    pub start_info: hvm_start_info,
    /// The modules: the initrd, if any.
    pub modules: Vec<hvm_modlist_entry>,
    /// The memory map.
    pub memmap: Vec<hvm_memmap_table_entry>,
}

/// The PVH start info: version 1, the command line, the initrd as the first module (Linux takes
/// the first module as its initrd), the memory map from `e820`; the caller sets `rsdp_paddr`
/// to its ACPI tables (see [`super::acpi`]).
pub fn pvh_start_info(
    cmdline_address: u64,
    initrd: Option<Initrd>,
    e820: &[E820Entry],
) -> Result<PvhStartInfo> {
    // Linux copies the map into its zero page's table.
    check_entry_count(e820.len())?;
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            // The PVH memory map types are E820's.
            type_: e.kind.as_raw(),
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|i| hvm_modlist_entry {
            paddr: i.address,
            size: i.size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_ADDRESS
        },
        cmdline_paddr: cmdline_address,
        rsdp_paddr: 0,
        memmap_paddr: PVH_MEMMAP_ADDRESS,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    Ok(PvhStartInfo {
        start_info,
        modules,
        memmap,
    })
}

/// Writes the PVH start info, module list and memory map.
pub fn write_pvh<M: GuestMemoryBackend>(mem: &M, info: &PvhStartInfo) -> Result<()> {
    let mut boot = BootParams::new(&info.start_info, GuestAddress(PVH_START_INFO_ADDRESS));
    boot.set_sections(&info.memmap, GuestAddress(PVH_MEMMAP_ADDRESS));
    if !info.modules.is_empty() {
        boot.set_modules(&info.modules, GuestAddress(PVH_MODLIST_ADDRESS));
    }
    PvhBootConfigurator::write_bootparams(&boot, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::loader::load_kernel;
    use super::super::loader::tests::{bzimage, memory, vmlinux, MIB};
    use super::*;
    use linux_loader::loader::bootparam::{CAN_USE_HEAP, LOADED_HIGH};
    use std::io::Cursor;
    use vm_memory::{Bytes, GuestAddress};
    use vmkit_memory::layout::{e820_map, ram_ranges, EBDA_START, HIGH_RAM_START, MMIO_HOLE_START};

    const GIB: u64 = 1 << 30;

    #[test]
    fn reserving_a_range_already_reserved_changes_nothing() {
        let map = e820_map(&ram_ranges(512 * MIB));
        // The MP table lies in the EBDA area the map reserves.
        assert_eq!(e820_with_reserved(&map, &[(EBDA_START, 0x200)]), map);
    }

    #[test]
    fn reserving_inside_ram_splits_it() {
        let map = vec![E820Entry::ram(0, 0x9_0000)];
        assert_eq!(
            e820_with_reserved(&map, &[(0x8_0000, 0x1000)]),
            vec![
                E820Entry::ram(0, 0x8_0000),
                E820Entry::reserved(0x8_0000, 0x1000),
                E820Entry::ram(0x8_1000, 0xf000)
            ]
        );
        // At the end of a RAM entry and past it.
        assert_eq!(
            e820_with_reserved(&map, &[(0x8_f000, 0x2000)]),
            vec![
                E820Entry::ram(0, 0x8_f000),
                E820Entry::reserved(0x8_f000, 0x2000)
            ]
        );
    }

    #[test]
    fn zero_page_of_a_bzimage_keeps_its_header_and_adds_the_loaders_fields() {
        let mem = memory(64 * MIB);
        let kernel = load_kernel(&mem, &mut Cursor::new(bzimage(&[3; 512]))).unwrap();
        let e820 = e820_map(&ram_ranges(64 * MIB));
        let initrd = Initrd {
            address: 0x300_0000,
            size: 0x1234,
        };
        let params = zero_page(&kernel, 0x2_0000, Some(initrd), &e820).unwrap();
        let hdr = params.hdr;
        let fields = (
            hdr.header,
            hdr.boot_flag,
            hdr.version,
            hdr.type_of_loader,
            hdr.loadflags,
            hdr.cmd_line_ptr,
            hdr.ramdisk_image,
            hdr.ramdisk_size,
            hdr.kernel_alignment,
            hdr.code32_start,
            hdr.init_size,
            hdr.heap_end_ptr,
        );
        assert_eq!(
            fields,
            (
                HEADER_MAGIC,
                BOOT_FLAG,
                0x020f,
                0xff,
                LOADED_HIGH | CAN_USE_HEAP,
                0x2_0000,
                0x300_0000,
                0x1234,
                0x20_0000,
                0x100_0000,
                0x40_0000,
                0xde00
            )
        );
        let (ext_cmd, ext_image, ext_size) = (
            params.ext_cmd_line_ptr,
            params.ext_ramdisk_image,
            params.ext_ramdisk_size,
        );
        assert_eq!((ext_cmd, ext_image, ext_size), (0, 0, 0));

        // Written where asked, readable back by the kernel's layout.
        write_zero_page(&mem, &params, 0x7000).unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(0x7000)).unwrap();
        assert_eq!(back, params);
        // boot_params.hdr is at 0x1f1, its loadflags at 0x211, e820_entries at 0x1e8.
        let loadflags: u8 = mem.read_obj(GuestAddress(0x7000 + 0x211)).unwrap();
        assert_eq!(loadflags, LOADED_HIGH | CAN_USE_HEAP);
        let entries: u8 = mem.read_obj(GuestAddress(0x7000 + 0x1e8)).unwrap();
        assert_eq!(entries, 3);
    }

    #[test]
    fn zero_page_of_an_elf_kernel_has_a_minimal_header() {
        let mem = memory(64 * MIB);
        let kernel = load_kernel(&mem, &mut Cursor::new(vmlinux(true))).unwrap();
        let e820 = e820_map(&ram_ranges(64 * MIB));
        let params = zero_page(&kernel, 0x2_0000, None, &e820).unwrap();
        let hdr = params.hdr;
        let fields = (
            hdr.header,
            hdr.boot_flag,
            hdr.type_of_loader,
            hdr.loadflags,
            hdr.cmd_line_ptr,
            hdr.cmdline_size,
            hdr.ramdisk_image,
            hdr.ramdisk_size,
            hdr.kernel_alignment,
        );
        assert_eq!(
            fields,
            (
                HEADER_MAGIC,
                BOOT_FLAG,
                0xff,
                LOADED_HIGH | CAN_USE_HEAP,
                0x2_0000,
                2047,
                0,
                0,
                0x100_0000
            )
        );
    }

    #[test]
    fn zero_page_carries_the_e820_map() {
        let mem = memory(64 * MIB);
        let kernel = load_kernel(&mem, &mut Cursor::new(vmlinux(false))).unwrap();
        // 6 GiB of RAM: below the hole and above 4 GiB.
        let e820 = e820_map(&ram_ranges(6 * GIB));
        let params = zero_page(&kernel, 0x2_0000, None, &e820).unwrap();
        assert_eq!(params.e820_entries, 4);
        let table: Vec<(u64, u64, u32)> = params.e820_table[..4]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            table,
            vec![
                (0, EBDA_START, 1),
                (EBDA_START, MIB - EBDA_START, 2),
                (MIB, MMIO_HOLE_START - MIB, 1),
                (HIGH_RAM_START, 3 * GIB, 1),
            ]
        );
        let unused = params.e820_table[4];
        let (addr, size) = (unused.addr, unused.size);
        assert_eq!((addr, size), (0, 0));

        let too_many: Vec<E820Entry> = (0..129)
            .map(|i| E820Entry::ram(i * 0x10_0000, 0x1000))
            .collect();
        assert!(matches!(
            zero_page(&kernel, 0x2_0000, None, &too_many),
            Err(Error::TooManyE820Entries {
                count: 129,
                max: 128
            })
        ));
    }

    #[test]
    fn pvh_start_info_has_the_map_the_cmdline_and_the_initrd() {
        let mem = memory(64 * MIB);
        let e820 = e820_map(&ram_ranges(64 * MIB));
        let initrd = Initrd {
            address: 0x300_0000,
            size: 0x5000,
        };
        let info = pvh_start_info(0x2_0000, Some(initrd), &e820).unwrap();
        let si = info.start_info;
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.version, 1);
        assert_eq!((si.nr_modules, si.modlist_paddr), (1, PVH_MODLIST_ADDRESS));
        assert_eq!(si.cmdline_paddr, 0x2_0000);
        assert_eq!(
            (si.memmap_paddr, si.memmap_entries),
            (PVH_MEMMAP_ADDRESS, 3)
        );
        write_pvh(&mem, &info).unwrap();

        let back: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDRESS)).unwrap();
        assert_eq!(back, si);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDRESS)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x5000));
        let types: Vec<(u64, u64, u32)> = (0..3)
            .map(|i| {
                let e: hvm_memmap_table_entry = mem
                    .read_obj(GuestAddress(PVH_MEMMAP_ADDRESS + i * 24))
                    .unwrap();
                (e.addr, e.size, e.type_)
            })
            .collect();
        assert_eq!(
            types,
            vec![
                (0, EBDA_START, 1),
                (EBDA_START, MIB - EBDA_START, 2),
                (MIB, 63 * MIB, 1)
            ]
        );

        let none = pvh_start_info(0x2_0000, None, &e820).unwrap();
        assert_eq!(
            (none.start_info.nr_modules, none.start_info.modlist_paddr),
            (0, 0)
        );
    }
}
