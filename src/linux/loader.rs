//! Loading a Linux kernel, its initrd and its command line into guest memory.
//!
//! [`load_kernel`] recognises the image by its first bytes: a bzImage (the `HdrS` setup header
//! at 0x202) is loaded with linux-loader's `BzImage` at the kernel's preferred address, an ELF
//! `vmlinux` with linux-loader's `Elf` at the physical addresses of its program headers. Both
//! are checked here first, so that a truncated file, a file that is not a kernel, or a kernel
//! that does not fit in guest RAM ends in an error that says so, rather than in whatever
//! linux-loader reports half-way through copying. [`load_initrd`] puts an initrd at the top of
//! low RAM below the kernel's `initrd_addr_max`, and [`LoadedKernel::cmdline`] checks a command
//! line against the kernel's limit.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{setup_header, CAN_USE_HEAP, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile,
};

use super::{Error, Result, HIGH_MEMORY_START};

/// The page size initrds are aligned to.
const PAGE_SIZE: u64 = 4096;
/// Where the setup header starts in a bzImage (and in the zero page).
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// `HdrS`, the setup header's magic at 0x202.
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// The 64-bit entry point is this far into the protected-mode kernel of a bzImage
/// (Documentation/arch/x86/boot.rst, "64-bit boot protocol").
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
/// The oldest boot protocol that announces a 64-bit entry point (`XLF_KERNEL_64`, 2.12).
const MIN_BZIMAGE_PROTOCOL: u16 = 0x020c;
/// x86's `COMMAND_LINE_SIZE`: an ELF vmlinux carries no setup header to say its limit.
const ELF_CMDLINE_CAPACITY: usize = 2048;
/// x86-64's `initrd_addr_max` (arch/x86/boot/header.S), for an ELF vmlinux.
const ELF_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// Bytes read to recognise a kernel: the ELF header or the bzImage setup header.
const HEAD_SIZE: usize = 0x1000;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;

/// The kind of kernel image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage: setup code, then the compressed kernel with its decompressor.
    BzImage,
    /// An uncompressed ELF `vmlinux`.
    Elf,
}

/// One piece of the kernel as it sits in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSegment {
    /// Guest-physical address.
    pub address: u64,
    /// Bytes copied from the file.
    pub file_size: u64,
    /// Bytes the segment occupies in memory (at least `file_size`; the rest is zero).
    pub memory_size: u64,
}

/// A kernel loaded into guest memory, with what the boot protocols need to know about it.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// What the file was.
    pub format: KernelFormat,
    /// The lowest guest-physical address the kernel occupies.
    pub load_address: u64,
    /// End (exclusive) of what the kernel needs at boot: its segments for an ELF; for a
    /// bzImage the larger of its payload and `init_size` (the room it decompresses into).
    /// An initrd goes above this.
    pub end: u64,
    /// The 64-bit entry point (Linux 64-bit boot protocol, `RSI` = zero page): for a bzImage the
    /// load address + 0x200, for an ELF its entry (`phys_startup_64` for a vmlinux).
    pub entry_64: u64,
    /// The 32-bit PVH entry point, when the ELF has the Xen `PHYS32_ENTRY` note.
    pub pvh_entry: Option<u64>,
    /// A bzImage's setup header, as the image has it (with `code32_start` set to the load
    /// address); the zero page starts from it.
    pub setup_header: Option<setup_header>,
    /// The longest command line the kernel takes, counting the terminating NUL.
    pub cmdline_capacity: usize,
    /// The highest address the initrd may occupy (inclusive), from the kernel.
    pub initrd_addr_max: u64,
    /// Where the kernel landed.
    pub segments: Vec<KernelSegment>,
}

/// Where [`load_initrd`] put the initrd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initrd {
    /// Guest-physical address, page-aligned.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
}

fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn image_len<F: Seek>(image: &mut F, what: &'static str) -> Result<u64> {
    image.seek(SeekFrom::End(0)).map_err(io_error(what))
}

/// Reads up to `max` bytes from the start of `image`.
fn read_head<F: Read + Seek>(image: &mut F, len: u64, max: usize) -> Result<Vec<u8>> {
    let want = usize::try_from(len).map_or(max, |len| len.min(max));
    let mut head = vec![0u8; want];
    image
        .seek(SeekFrom::Start(0))
        .map_err(io_error("reading the kernel"))?;
    image
        .read_exact(&mut head)
        .map_err(io_error("reading the kernel"))?;
    Ok(head)
}

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    let b = bytes.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let b = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    let b = bytes.get(offset..offset.checked_add(8)?)?;
    let mut v = [0u8; 8];
    v.copy_from_slice(b);
    Some(u64::from_le_bytes(v))
}

/// Recognises the image from its first bytes.
pub fn detect_format(head: &[u8]) -> Result<KernelFormat> {
    if head.starts_with(&ELF_MAGIC) {
        return Ok(KernelFormat::Elf);
    }
    match u32_at(head, 0x202) {
        Some(SETUP_HEADER_MAGIC) => Ok(KernelFormat::BzImage),
        Some(_) => Err(Error::NotAKernel),
        None => Err(Error::KernelTooShort {
            len: head.len() as u64,
        }),
    }
}

/// The end (exclusive) of the guest RAM region holding `address`, if any.
fn region_end<M: GuestMemoryBackend>(mem: &M, address: u64) -> Option<u64> {
    let region = mem.find_region(GuestAddress(address))?;
    region.start_addr().0.checked_add(region.len())
}

/// Checks that `[start, end)` is guest RAM, for a clear error before anything is copied.
fn check_in_ram<M: GuestMemoryBackend>(mem: &M, what: String, start: u64, end: u64) -> Result<()> {
    let fits = end > start
        && usize::try_from(end - start)
            .is_ok_and(|len| GuestMemoryBackend::check_range(mem, GuestAddress(start), len));
    if fits {
        Ok(())
    } else {
        Err(Error::KernelOutsideRam { what, start, end })
    }
}

/// Loads the kernel in `image` (a bzImage or an ELF vmlinux) into `mem`.
///
/// Nothing is written below 1 MiB, where the VMM keeps the zero page, the command line, the
/// boot page tables and the MP table. Fails with [`Error::KernelTooShort`],
/// [`Error::NotAKernel`], [`Error::BadBzImage`], [`Error::BadElf`], [`Error::TruncatedKernel`],
/// [`Error::KernelOutsideRam`] before writing anything, and with [`Error::Loader`] or
/// [`Error::Io`] if reading fails part-way.
pub fn load_kernel<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let len = image_len(image, "reading the kernel")?;
    let head = read_head(image, len, HEAD_SIZE)?;
    match detect_format(&head)? {
        KernelFormat::BzImage => load_bzimage(mem, image, &head, len),
        KernelFormat::Elf => load_elf(mem, image, &head, len),
    }
}

/// The setup header of a bzImage, from its first bytes.
pub fn parse_setup_header(head: &[u8]) -> Result<setup_header> {
    let size = std::mem::size_of::<setup_header>();
    let bytes = head
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)
        .ok_or(Error::KernelTooShort {
            len: head.len() as u64,
        })?;
    let mut header = setup_header::default();
    header.as_mut_slice().copy_from_slice(bytes);
    Ok(header)
}

fn load_bzimage<M, F>(mem: &M, image: &mut F, head: &[u8], len: u64) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let header = parse_setup_header(head)?;
    // Packed fields: copy each out before use.
    let version = header.version;
    let loadflags = header.loadflags;
    let xloadflags = header.xloadflags;
    if version < MIN_BZIMAGE_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::BadBzImage(format!(
            "boot protocol {}.{:02} without XLF_KERNEL_64 (xloadflags {xloadflags:#x}): no 64-bit \
             entry point (protocol 2.12 or later and a 64-bit kernel are needed)",
            version >> 8,
            version & 0xff
        )));
    }
    if loadflags & LOADED_HIGH == 0 {
        return Err(Error::BadBzImage(
            "a zImage (LOADED_HIGH clear), not a bzImage".into(),
        ));
    }
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    // syssize counts the protected-mode part in 16-byte paragraphs (protocol 2.04+): a shorter
    // file lost its end.
    let expected = setup_size + u64::from(header.syssize) * 16;
    if len < expected || len <= setup_size {
        return Err(Error::TruncatedKernel {
            expected: expected.max(setup_size + 1),
            actual: len,
        });
    }
    let payload = len - setup_size;

    // Load at the preferred address (protocol 2.10+): a relocatable kernel decompresses in place
    // there, a non-relocatable one moves itself there anyway.
    let pref_address = header.pref_address;
    let code32_start = u64::from(header.code32_start);
    let load_address = if pref_address >= HIGH_MEMORY_START {
        pref_address
    } else {
        code32_start
    };
    if load_address < HIGH_MEMORY_START {
        return Err(Error::BadBzImage(format!(
            "load address {load_address:#x} is below 1 MiB"
        )));
    }
    let needs = payload.max(u64::from(header.init_size));
    let end = load_address
        .checked_add(needs)
        .ok_or_else(|| Error::BadBzImage("init_size overflows".into()))?;
    check_in_ram(
        mem,
        format!("the bzImage ({payload} bytes, {needs} bytes to decompress in)"),
        load_address,
        end,
    )?;

    let result = BzImage::load(
        mem,
        Some(GuestAddress(load_address)),
        image,
        Some(GuestAddress(HIGH_MEMORY_START)),
    )?;
    let cmdline_size = header.cmdline_size;
    let cmdline_capacity = match usize::try_from(cmdline_size) {
        // The header's limit excludes the NUL; protocols before 2.06 said nothing (255).
        Ok(0) | Err(_) => 256,
        Ok(n) => n.saturating_add(1),
    };
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        load_address,
        end,
        entry_64: load_address + BZIMAGE_ENTRY_64_OFFSET,
        pvh_entry: None,
        setup_header: result.setup_header.or(Some(header)),
        cmdline_capacity,
        initrd_addr_max: u64::from(header.initrd_addr_max),
        segments: vec![KernelSegment {
            address: load_address,
            file_size: payload,
            memory_size: payload,
        }],
    })
}

/// One ELF program header, the fields we use.
#[derive(Clone, Copy, Debug)]
struct ProgramHeader {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The ELF header fields we use, checked: 64-bit, little-endian, x86-64.
struct ElfHeader {
    entry: u64,
    phoff: u64,
    phnum: u16,
}

fn parse_elf_header(head: &[u8]) -> Result<ElfHeader> {
    if head.len() < ELF64_EHDR_SIZE {
        return Err(Error::KernelTooShort {
            len: head.len() as u64,
        });
    }
    let bad = |m: String| Err(Error::BadElf(m));
    if head[4] != ELFCLASS64 {
        return bad(format!(
            "ELF class {} is not ELFCLASS64: a 32-bit image, not an x86-64 kernel",
            head[4]
        ));
    }
    if head[5] != ELFDATA2LSB {
        return bad("big-endian ELF".into());
    }
    let machine = u16_at(head, 18).unwrap_or(0);
    if machine != EM_X86_64 {
        return bad(format!("machine {machine} is not x86-64 ({EM_X86_64})"));
    }
    let phentsize = u16_at(head, 54).unwrap_or(0);
    if usize::from(phentsize) != ELF64_PHDR_SIZE {
        return bad(format!("program header size {phentsize}, expected 56"));
    }
    let phnum = u16_at(head, 56).unwrap_or(0);
    if phnum == 0 {
        return bad("no program headers".into());
    }
    Ok(ElfHeader {
        entry: u64_at(head, 24).unwrap_or(0),
        phoff: u64_at(head, 32).unwrap_or(0),
        phnum,
    })
}

fn read_program_headers<F: Read + Seek>(
    image: &mut F,
    header: &ElfHeader,
    len: u64,
) -> Result<Vec<ProgramHeader>> {
    let table_len = u64::from(header.phnum) * ELF64_PHDR_SIZE as u64;
    let table_end = header
        .phoff
        .checked_add(table_len)
        .filter(|&end| end <= len)
        .ok_or(Error::TruncatedKernel {
            expected: header.phoff.saturating_add(table_len),
            actual: len,
        })?;
    if header.phoff < ELF64_EHDR_SIZE as u64 {
        return Err(Error::BadElf(format!(
            "program headers at {:#x}, inside the ELF header",
            header.phoff
        )));
    }
    let mut table = vec![0u8; (table_end - header.phoff) as usize];
    image
        .seek(SeekFrom::Start(header.phoff))
        .map_err(io_error("reading the kernel"))?;
    image
        .read_exact(&mut table)
        .map_err(io_error("reading the kernel"))?;
    Ok(table
        .chunks_exact(ELF64_PHDR_SIZE)
        .map(|ph| ProgramHeader {
            p_type: u32_at(ph, 0).unwrap_or(0),
            offset: u64_at(ph, 8).unwrap_or(0),
            vaddr: u64_at(ph, 16).unwrap_or(0),
            paddr: u64_at(ph, 24).unwrap_or(0),
            filesz: u64_at(ph, 32).unwrap_or(0),
            memsz: u64_at(ph, 40).unwrap_or(0),
        })
        .collect())
}

fn load_elf<M, F>(mem: &M, image: &mut F, head: &[u8], len: u64) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let header = parse_elf_header(head)?;
    let headers = read_program_headers(image, &header, len)?;
    // Every segment's contents (the notes too) must be in the file: a shorter file lost its end.
    for ph in &headers {
        if ph.offset.checked_add(ph.filesz).is_none_or(|end| end > len) {
            return Err(Error::TruncatedKernel {
                expected: ph.offset.saturating_add(ph.filesz),
                actual: len,
            });
        }
    }
    // linux-loader copies the PT_LOAD segments with file contents: check exactly those.
    let mut segments = Vec::new();
    for (index, ph) in headers.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.filesz == 0 {
            continue;
        }
        if ph.memsz < ph.filesz {
            return Err(Error::BadElf(format!(
                "segment {index}: memory size {:#x} is smaller than its file size {:#x}",
                ph.memsz, ph.filesz
            )));
        }
        if ph.paddr < HIGH_MEMORY_START {
            return Err(Error::BadElf(format!(
                "segment {index} loads at {:#x}, below 1 MiB where the boot structures live",
                ph.paddr
            )));
        }
        let end = ph
            .paddr
            .checked_add(ph.memsz)
            .ok_or_else(|| Error::BadElf(format!("segment {index}: address and size overflow")))?;
        check_in_ram(mem, format!("ELF segment {index}"), ph.paddr, end)?;
        segments.push((
            *ph,
            KernelSegment {
                address: ph.paddr,
                file_size: ph.filesz,
                memory_size: ph.memsz,
            },
        ));
    }
    if segments.is_empty() {
        return Err(Error::BadElf("no loadable segment".into()));
    }

    // A vmlinux's entry is physical (`ENTRY(phys_startup_64)` in vmlinux.lds.S), and that is
    // what linux-loader returns as `kernel_load`. Accept a virtual one too, translated through
    // the segment that holds it.
    let inside = |start: u64, size: u64, at: u64| at >= start && at - start < size;
    let entry_64 = if segments
        .iter()
        .any(|(ph, _)| inside(ph.paddr, ph.memsz, header.entry))
    {
        header.entry
    } else if let Some((ph, _)) = segments
        .iter()
        .find(|(ph, _)| inside(ph.vaddr, ph.memsz, header.entry))
    {
        header.entry - ph.vaddr + ph.paddr
    } else {
        return Err(Error::BadElf(format!(
            "entry point {:#x} is in no loadable segment",
            header.entry
        )));
    };

    let result = Elf::load(mem, None, image, Some(GuestAddress(HIGH_MEMORY_START)))?;
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(address) => Some(address.0),
        _ => None,
    };
    let load_address = segments
        .iter()
        .map(|(_, s)| s.address)
        .min()
        .unwrap_or(HIGH_MEMORY_START);
    let end = segments
        .iter()
        .map(|(_, s)| s.address + s.memory_size)
        .max()
        .unwrap_or(result.kernel_end);
    Ok(LoadedKernel {
        format: KernelFormat::Elf,
        load_address,
        end,
        entry_64,
        pvh_entry,
        setup_header: None,
        cmdline_capacity: ELF_CMDLINE_CAPACITY,
        initrd_addr_max: ELF_INITRD_ADDR_MAX,
        segments: segments.into_iter().map(|(_, s)| s).collect(),
    })
}

impl LoadedKernel {
    /// Checks `text` as this kernel's command line: printable ASCII, and at most
    /// `cmdline_capacity - 1` bytes (after trimming spaces at both ends). Build the whole line
    /// (the user's, plus `virtio_mmio.device=...` entries) before calling this.
    pub fn cmdline(&self, text: &str) -> Result<Cmdline> {
        let trimmed = text.trim();
        let max = self.cmdline_capacity.saturating_sub(1);
        if trimmed.len() > max {
            return Err(Error::CmdlineTooLong {
                len: trimmed.len(),
                max,
            });
        }
        let mut cmdline = Cmdline::new(self.cmdline_capacity)
            .map_err(|e| Error::InvalidCmdline(e.to_string()))?;
        cmdline
            .insert_str(trimmed)
            .map_err(|e| Error::InvalidCmdline(e.to_string()))?;
        Ok(cmdline)
    }

    /// Where an initrd of `size` bytes goes: the highest page-aligned address that keeps it
    /// inside the low RAM region (which ends at `low_ram_end`), below the kernel's
    /// `initrd_addr_max` and above the kernel.
    pub fn initrd_address(&self, size: u64, low_ram_end: u64) -> Result<u64> {
        let top = low_ram_end.min(self.initrd_addr_max.saturating_add(1));
        let bottom = self.end.next_multiple_of(PAGE_SIZE);
        let address = top
            .checked_sub(size)
            .map(|a| a & !(PAGE_SIZE - 1))
            .filter(|&a| a >= bottom && size > 0);
        address.ok_or(Error::InitrdDoesNotFit {
            size,
            available: top.saturating_sub(bottom),
            bottom,
            top,
        })
    }
}

/// Loads the initrd in `initrd` at the top of low RAM (see [`LoadedKernel::initrd_address`]).
///
/// Fails with [`Error::InitrdDoesNotFit`] (or an empty file) before writing anything.
pub fn load_initrd<M, F>(mem: &M, kernel: &LoadedKernel, initrd: &mut F) -> Result<Initrd>
where
    M: GuestMemoryBackend,
    F: ReadVolatile + Seek,
{
    let size = image_len(initrd, "reading the initrd")?;
    if size == 0 {
        return Err(Error::InitrdEmpty);
    }
    // The initrd shares the region the kernel is in (RAM from 0 to the 32-bit MMIO hole).
    let low_ram_end = region_end(mem, kernel.load_address).unwrap_or(0);
    let address = kernel.initrd_address(size, low_ram_end)?;
    let count = usize::try_from(size).map_err(|_| Error::InitrdDoesNotFit {
        size,
        available: 0,
        bottom: address,
        top: address,
    })?;
    initrd
        .seek(SeekFrom::Start(0))
        .map_err(io_error("reading the initrd"))?;
    mem.read_exact_volatile_from(GuestAddress(address), initrd, count)
        .map_err(|source| Error::GuestMemory {
            what: "initrd",
            address,
            source,
        })?;
    Ok(Initrd { address, size })
}

/// Writes `cmdline`, NUL-terminated, at `address`.
pub fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    address: u64,
    cmdline: &Cmdline,
) -> Result<()> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(address), cmdline)?;
    Ok(())
}

/// Bits the zero page's `loadflags` always gets from this loader: the kernel is loaded high,
/// and the heap pointer is valid.
pub const LOADFLAGS: u8 = LOADED_HIGH | CAN_USE_HEAP;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::GuestMemoryMmap;

    pub(crate) const MIB: u64 = 1 << 20;

    pub(crate) fn memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    /// The byte sum of `bytes`: 0 for a table with a right checksum.
    pub(crate) fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    /// Little-endian fields of a table under test (panics if out of range, as a test may).
    pub(crate) fn u16_at(b: &[u8], o: usize) -> u16 {
        super::u16_at(b, o).expect("in range")
    }

    pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
        super::u32_at(b, o).expect("in range")
    }

    pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
        super::u64_at(b, o).expect("in range")
    }

    /// A synthetic bzImage: `setup_sects` sectors of setup after the boot sector, a header as a
    /// 2.15 kernel has it, and `payload` bytes of "compressed kernel".
    pub(crate) fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let setup_size = (usize::from(setup_sects) + 1) * 512;
        let mut image = vec![0u8; setup_size];
        let header = setup_header {
            setup_sects,
            syssize: payload.len().div_ceil(16) as u32,
            boot_flag: 0xaa55,
            header: SETUP_HEADER_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: 0x7f,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size: 0x40_0000,
            ..Default::default()
        };
        image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + header.as_slice().len()]
            .copy_from_slice(header.as_slice());
        image.extend_from_slice(payload);
        // Pad to whole paragraphs, as the kernel's build tool does.
        image.resize(setup_size + payload.len().div_ceil(16) * 16, 0);
        image
    }

    fn set_u16(image: &mut [u8], offset: usize, value: u16) {
        image[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// One ELF segment for [`elf`]: type, physical address, virtual address, contents, extra
    /// zeroed memory.
    pub(crate) struct Seg<'a> {
        pub p_type: u32,
        pub paddr: u64,
        pub vaddr: u64,
        pub data: &'a [u8],
        pub bss: u64,
    }

    /// A minimal ELF64 x86-64 executable with `segments`, entry `entry`.
    pub(crate) fn elf(entry: u64, segments: &[Seg]) -> Vec<u8> {
        let phoff = ELF64_EHDR_SIZE;
        let mut offset = phoff + segments.len() * ELF64_PHDR_SIZE;
        let mut out = vec![0u8; ELF64_EHDR_SIZE];
        out[..4].copy_from_slice(&ELF_MAGIC);
        out[4] = ELFCLASS64;
        out[5] = ELFDATA2LSB;
        out[6] = 1; // EV_CURRENT
        out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[24..32].copy_from_slice(&entry.to_le_bytes());
        out[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        out[52..54].copy_from_slice(&(ELF64_EHDR_SIZE as u16).to_le_bytes());
        out[54..56].copy_from_slice(&(ELF64_PHDR_SIZE as u16).to_le_bytes());
        out[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut data = Vec::new();
        for seg in segments {
            let mut ph = [0u8; ELF64_PHDR_SIZE];
            ph[0..4].copy_from_slice(&seg.p_type.to_le_bytes());
            ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
            ph[8..16].copy_from_slice(&(offset as u64).to_le_bytes());
            ph[16..24].copy_from_slice(&seg.vaddr.to_le_bytes());
            ph[24..32].copy_from_slice(&seg.paddr.to_le_bytes());
            ph[32..40].copy_from_slice(&(seg.data.len() as u64).to_le_bytes());
            ph[40..48].copy_from_slice(&(seg.data.len() as u64 + seg.bss).to_le_bytes());
            ph[48..56].copy_from_slice(&4u64.to_le_bytes());
            out.extend_from_slice(&ph);
            data.extend_from_slice(seg.data);
            offset += seg.data.len();
        }
        out.extend_from_slice(&data);
        out
    }

    /// An ELF note: name, type, descriptor, each padded to 4 bytes.
    pub(crate) fn note(name: &[u8], n_type: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&n_type.to_le_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(desc);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    /// A vmlinux-like ELF: text at 16 MiB (linked high, loaded by physical address), data with a
    /// bss, and optionally a note segment with a build ID and the Xen PVH entry.
    pub(crate) fn vmlinux(pvh: bool) -> Vec<u8> {
        let mut notes = note(b"GNU\0", 3, &[0xab; 20]);
        if pvh {
            // Linux writes the PVH entry as a pointer-sized value (8 bytes on x86-64).
            notes.extend(note(b"Xen\0", 18, &0x100_0850u64.to_le_bytes()));
        }
        let text: Vec<u8> = (0..0x3000u32).map(|i| (i % 251) as u8).collect();
        elf(
            0x100_0000,
            &[
                Seg {
                    p_type: PT_LOAD,
                    paddr: 0x100_0000,
                    vaddr: 0xffff_ffff_8100_0000,
                    data: &text,
                    bss: 0,
                },
                Seg {
                    p_type: PT_LOAD,
                    paddr: 0x120_0000,
                    vaddr: 0xffff_ffff_8120_0000,
                    data: &[0x5a; 0x100],
                    bss: 0x2000,
                },
                Seg {
                    p_type: 4, // PT_NOTE
                    paddr: 0x100_2000,
                    vaddr: 0xffff_ffff_8100_2000,
                    data: &notes,
                    bss: 0,
                },
            ],
        )
    }

    #[test]
    fn bzimage_is_loaded_at_its_preferred_address_with_its_header() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mem = memory(64 * MIB);
        let kernel = load_kernel(&mem, &mut Cursor::new(bzimage(&payload))).unwrap();
        assert_eq!(kernel.format, KernelFormat::BzImage);
        assert_eq!(kernel.load_address, 0x100_0000);
        assert_eq!(kernel.entry_64, 0x100_0200);
        assert_eq!(kernel.pvh_entry, None);
        // The decompressor needs init_size bytes from the load address.
        assert_eq!(kernel.end, 0x100_0000 + 0x40_0000);
        assert_eq!(kernel.cmdline_capacity, 2048);
        assert_eq!(kernel.initrd_addr_max, 0x7fff_ffff);
        let header = kernel.setup_header.unwrap();
        let (magic, version, code32_start, setup_sects) = (
            header.header,
            header.version,
            header.code32_start,
            header.setup_sects,
        );
        assert_eq!(
            (magic, version, setup_sects),
            (SETUP_HEADER_MAGIC, 0x020f, 3)
        );
        assert_eq!(code32_start, 0x100_0000);
        // The protected-mode part (everything after the setup sectors) is at the load address.
        let mut loaded = vec![0u8; payload.len()];
        mem.read_slice(&mut loaded, GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(loaded, payload);
    }

    #[test]
    fn bzimage_errors_are_clear() {
        let mem = memory(64 * MIB);
        let good = bzimage(&[1; 4096]);

        // Truncated in the payload: syssize says more than the file has.
        let truncated = &good[..good.len() - 100];
        let err = load_kernel(&mem, &mut Cursor::new(truncated)).unwrap_err();
        assert!(
            matches!(err, Error::TruncatedKernel { expected, actual }
                if expected == good.len() as u64 && actual == truncated.len() as u64),
            "{err}"
        );
        // Truncated inside the header.
        let err = load_kernel(&mem, &mut Cursor::new(&good[..0x210])).unwrap_err();
        assert!(matches!(err, Error::KernelTooShort { len: 0x210 }), "{err}");
        // Wrong magic: not a kernel at all.
        let mut bad_magic = good.clone();
        bad_magic[0x202] = b'X';
        let err = load_kernel(&mem, &mut Cursor::new(&bad_magic)).unwrap_err();
        assert!(matches!(err, Error::NotAKernel), "{err}");
        assert!(err.to_string().contains("not a kernel"));
        // A few bytes of text.
        let err = load_kernel(&mem, &mut Cursor::new(b"hello")).unwrap_err();
        assert!(matches!(err, Error::KernelTooShort { len: 5 }), "{err}");
        // An old protocol without a 64-bit entry.
        let mut old = good.clone();
        set_u16(&mut old, 0x206, 0x020a);
        let err = load_kernel(&mem, &mut Cursor::new(&old)).unwrap_err();
        assert!(matches!(err, Error::BadBzImage(_)), "{err}");
        assert!(err.to_string().contains("64-bit"), "{err}");
        let mut no64 = good.clone();
        set_u16(&mut no64, 0x236, 0);
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(&no64)),
            Err(Error::BadBzImage(_))
        ));
        // A zImage.
        let mut zimage = good.clone();
        zimage[0x211] = 0;
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(&zimage)),
            Err(Error::BadBzImage(_))
        ));
        // Too little RAM for the kernel to decompress in.
        let small = memory(18 * MIB);
        let err = load_kernel(&small, &mut Cursor::new(&good)).unwrap_err();
        assert!(matches!(err, Error::KernelOutsideRam { .. }), "{err}");
    }

    #[test]
    fn elf_segments_land_at_their_physical_addresses() {
        let mem = memory(64 * MIB);
        let image = vmlinux(false);
        let kernel = load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
        assert_eq!(kernel.format, KernelFormat::Elf);
        assert_eq!(kernel.entry_64, 0x100_0000);
        assert_eq!(kernel.pvh_entry, None);
        assert_eq!(kernel.load_address, 0x100_0000);
        assert_eq!(kernel.end, 0x120_0000 + 0x100 + 0x2000);
        assert_eq!(kernel.cmdline_capacity, 2048);
        assert_eq!(
            kernel.segments,
            vec![
                KernelSegment {
                    address: 0x100_0000,
                    file_size: 0x3000,
                    memory_size: 0x3000
                },
                KernelSegment {
                    address: 0x120_0000,
                    file_size: 0x100,
                    memory_size: 0x2100
                },
            ]
        );
        let mut text = vec![0u8; 0x3000];
        mem.read_slice(&mut text, GuestAddress(0x100_0000)).unwrap();
        assert!(text.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        let mut data = [0u8; 0x100];
        mem.read_slice(&mut data, GuestAddress(0x120_0000)).unwrap();
        assert_eq!(data, [0x5a; 0x100]);
        // Nothing at the virtual addresses' low bits or below 1 MiB.
        let below: u64 = mem.read_obj(GuestAddress(0x8_1000)).unwrap();
        assert_eq!(below, 0);
    }

    #[test]
    fn elf_pvh_note_is_found() {
        let mem = memory(64 * MIB);
        let kernel = load_kernel(&mem, &mut Cursor::new(vmlinux(true))).unwrap();
        assert_eq!(kernel.pvh_entry, Some(0x100_0850));
        assert_eq!(kernel.entry_64, 0x100_0000);
    }

    #[test]
    fn elf_virtual_entry_is_translated() {
        let mem = memory(64 * MIB);
        let mut image = vmlinux(false);
        image[24..32].copy_from_slice(&0xffff_ffff_8100_0040u64.to_le_bytes());
        let kernel = load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
        assert_eq!(kernel.entry_64, 0x100_0040);
    }

    #[test]
    fn elf_errors_are_clear() {
        let mem = memory(64 * MIB);
        let good = vmlinux(true);

        let truncated = &good[..good.len() - 10];
        let err = load_kernel(&mem, &mut Cursor::new(truncated)).unwrap_err();
        assert!(matches!(err, Error::TruncatedKernel { .. }), "{err}");
        let err = load_kernel(&mem, &mut Cursor::new(&good[..100])).unwrap_err();
        assert!(matches!(err, Error::TruncatedKernel { .. }), "{err}");
        let err = load_kernel(&mem, &mut Cursor::new(&good[..40])).unwrap_err();
        assert!(matches!(err, Error::KernelTooShort { len: 40 }), "{err}");

        let mut elf32 = good.clone();
        elf32[4] = 1;
        let err = load_kernel(&mem, &mut Cursor::new(&elf32)).unwrap_err();
        assert!(err.to_string().contains("32-bit"), "{err}");
        let mut arm = good.clone();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(&arm)),
            Err(Error::BadElf(_))
        ));

        // A segment below 1 MiB would overwrite the boot structures.
        let low = elf(
            0x8000,
            &[Seg {
                p_type: PT_LOAD,
                paddr: 0x8000,
                vaddr: 0x8000,
                data: &[1; 16],
                bss: 0,
            }],
        );
        let err = load_kernel(&mem, &mut Cursor::new(&low)).unwrap_err();
        assert!(err.to_string().contains("below 1 MiB"), "{err}");
        // A segment past the end of RAM.
        let small = memory(17 * MIB);
        let err = load_kernel(&small, &mut Cursor::new(&good)).unwrap_err();
        assert!(matches!(err, Error::KernelOutsideRam { .. }), "{err}");
        // An entry outside every segment.
        let mut lost = good.clone();
        lost[24..32].copy_from_slice(&0x500_0000u64.to_le_bytes());
        let err = load_kernel(&mem, &mut Cursor::new(&lost)).unwrap_err();
        assert!(err.to_string().contains("entry point"), "{err}");
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let mem = memory(64 * MIB);
        let kernel = load_kernel(&mem, &mut Cursor::new(vmlinux(false))).unwrap();
        let data: Vec<u8> = (0..10_001u32).map(|i| (i % 13) as u8).collect();
        let initrd = load_initrd(&mem, &kernel, &mut Cursor::new(&data)).unwrap();
        assert_eq!(initrd.size, 10_001);
        assert_eq!(initrd.address % PAGE_SIZE, 0);
        assert_eq!(initrd.address, (64 * MIB - 10_001) & !(PAGE_SIZE - 1));
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(initrd.address))
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn initrd_stays_below_initrd_addr_max() {
        let mut kernel = load_kernel(&memory(64 * MIB), &mut Cursor::new(vmlinux(false))).unwrap();
        kernel.initrd_addr_max = 0x1ff_ffff; // 32 MiB - 1
        assert_eq!(
            kernel.initrd_address(0x1800, 64 * MIB).unwrap(),
            32 * MIB - 0x2000
        );
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let mem = memory(24 * MIB);
        let kernel = load_kernel(&mem, &mut Cursor::new(vmlinux(false))).unwrap();
        // Between the kernel's end (~18 MiB) and 24 MiB there are about 6 MiB.
        let big = vec![0u8; 7 << 20];
        let err = load_initrd(&mem, &kernel, &mut Cursor::new(&big)).unwrap_err();
        assert!(
            matches!(err, Error::InitrdDoesNotFit { size, top, .. }
                if size == 7 << 20 && top == 24 * MIB),
            "{err}"
        );
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = load_initrd(&mem, &kernel, &mut Cursor::new(Vec::<u8>::new())).unwrap_err();
        assert!(matches!(err, Error::InitrdEmpty), "{err}");
    }

    /// The Debian cloud kernel that `scripts/prepare-debian-guest.sh` prepares, when it is there
    /// (in `$VMKIT_DEBIAN_GUEST`, by default `target/debian-guest`): both forms load.
    #[test]
    fn debian_kernel_if_prepared() {
        let dir = std::env::var_os("VMKIT_DEBIAN_GUEST")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian-guest")
            });
        let (vmlinuz, vmlinux) = (dir.join("vmlinuz"), dir.join("vmlinux"));
        if !vmlinuz.is_file() || !vmlinux.is_file() {
            eprintln!("SKIPPED: no prepared Debian kernel in {}", dir.display());
            return;
        }
        let mem = memory(256 * MIB);
        let bz = load_kernel(&mem, &mut std::fs::File::open(&vmlinuz).unwrap()).unwrap();
        assert_eq!(bz.format, KernelFormat::BzImage);
        assert_eq!(bz.entry_64, bz.load_address + 0x200);
        assert!(bz.load_address >= 0x100_0000, "{:#x}", bz.load_address);
        assert_eq!(bz.cmdline_capacity, 2048);
        assert_eq!(bz.initrd_addr_max, 0x7fff_ffff);
        assert!(bz.end > bz.load_address + bz.segments[0].file_size);

        let mem = memory(256 * MIB);
        let elf = load_kernel(&mem, &mut std::fs::File::open(&vmlinux).unwrap()).unwrap();
        assert_eq!(elf.format, KernelFormat::Elf);
        let pvh = elf.pvh_entry.expect("Debian's vmlinux has the PVH note");
        for entry in [elf.entry_64, pvh] {
            assert!(
                elf.segments
                    .iter()
                    .any(|s| entry >= s.address && entry < s.address + s.memory_size),
                "{entry:#x} in a segment"
            );
            let code: u64 = mem.read_obj(GuestAddress(entry)).unwrap();
            assert_ne!(code, 0, "code at {entry:#x}");
        }
        eprintln!(
            "bzImage at {:#x}, entry {:#x}, needs up to {:#x}; vmlinux entry {:#x}, PVH entry \
             {pvh:#x}, ends at {:#x}",
            bz.load_address, bz.entry_64, bz.end, elf.entry_64, elf.end
        );
    }

    #[test]
    fn cmdline_is_checked_against_the_kernels_limit() {
        let mem = memory(64 * MIB);
        let kernel = load_kernel(&mem, &mut Cursor::new(bzimage(&[0; 64]))).unwrap();
        let ok = "a".repeat(2047);
        assert!(kernel.cmdline(&ok).is_ok());
        let long = "a".repeat(2048);
        let err = kernel.cmdline(&long).unwrap_err();
        assert!(
            matches!(
                err,
                Error::CmdlineTooLong {
                    len: 2048,
                    max: 2047
                }
            ),
            "{err}"
        );
        assert!(matches!(
            kernel.cmdline("console=ttyS0 \u{1}"),
            Err(Error::InvalidCmdline(_))
        ));

        let cmdline = kernel.cmdline("  console=ttyS0 -- init-arg ").unwrap();
        write_cmdline(&mem, 0x2_0000, &cmdline).unwrap();
        let mut back = [0u8; 30];
        mem.read_slice(&mut back, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(&back[..27], b"console=ttyS0 -- init-arg\0\0");
    }
}
