//! A vfio-user server for the DMA test device of [`vmkit_guest_abi::testdev`].
//!
//! ```sh
//! cargo run --release --example vfio-user-device -- SOCKET
//! ```
//!
//! It listens on the UNIX socket `SOCKET` (which must not exist yet), serves one VMM over
//! the vfio-user protocol and exits 0 when that VMM disconnects. It is what vmkit's
//! vfio-user passthrough is tested against: `tests/vfio_user.rs` drives it through
//! `VfioUserBackend`, and it is the device the example VM passes through to the built-in
//! guest, whose driver finds it on the PCI bus and runs DMAs. No hardware is involved: the
//! "device" is this process, and its DMA reaches guest RAM through the memfd the VMM hands
//! over with each DMA mapping.
//!
//! The device, as `testdev` specifies it:
//! - configuration space (region 7, 256 bytes): the IDs and class, a type-0 header whose
//!   BARs answer the sizing protocol, and one capability, MSI-X, with the table at offset 0
//!   of BAR 2 and the PBA at `MSIX_PBA_OFFSET`;
//! - BAR 0: the registers; BAR 2: the MSI-X table and PBA (the VMM emulates them, this
//!   server only stores what it is written); BAR 4: device memory in a memfd, offered for
//!   mmap so the guest reaches it without exits;
//! - interrupts: MSI-X only; a vector is raised by writing the eventfd the VMM gave for it.
//!
//! A DMA runs while the write of `REG_COMMAND` is being answered: when that write returns,
//! the status is final and the interrupt raised. It does not wait for the command
//! register's bus-master bit, which a VMM may keep virtual.
//!
//! Everything the VMM (or the guest behind it) sends is treated as hostile: register and
//! configuration writes of any offset, width and value, DMA ranges outside what was mapped.
//! None of them may stop the server. vfio_user 0.1.7's client cannot read error replies to
//! region accesses (it waits for a longer reply and hangs), so this server never fails a
//! region access: reads outside a region return all-ones and such writes are dropped. A DMA
//! problem shows in the device's `STATUS` register, as on real hardware, and DMA unmaps
//! always succeed (an error there would hang the client too). Regions offered for mmap
//! declare a sparse area covering them, because vfio_user only sends the region's fd along
//! with sparse areas.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::process::ExitCode;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{
    DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion, SparseArea,
};
use vmkit_guest_abi::testdev::{
    checksum, pattern_byte, CLASS_CODE, COMMAND_READ_GUEST, COMMAND_WRITE_GUEST, DEVICE_ID,
    MAX_DMA_LEN, MEMORY_BAR, MEMORY_BAR_SIZE, MEMORY_SIGNATURE, MSIX_BAR, MSIX_BAR_SIZE,
    MSIX_PBA_OFFSET, MSIX_VECTORS, REGISTER_BAR, REGISTER_BAR_SIZE, REGISTER_SIGNATURE,
    REG_COMMAND, REG_COMPLETIONS, REG_DMA_ADDR_HI, REG_DMA_ADDR_LO, REG_DMA_LEN, REG_ID,
    REG_IRQ_VECTOR, REG_PATTERN_SEED, REG_RESULT_HI, REG_RESULT_LO, REG_STATUS, STATUS_DONE,
    STATUS_ERROR, VENDOR_ID,
};
use vmkit_pci_passthrough::{BarKind, ConfigSpace, PciBar, PciHeader};

/// Bytes of configuration space (region 7).
const CONFIG_SIZE: u64 = 256;
/// The MSI-X capability ID.
const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes of one MSI-X table entry.
const MSIX_ENTRY_SIZE: usize = 16;
/// Bytes of the MSI-X table.
const MSIX_TABLE_SIZE: usize = MSIX_VECTORS as usize * MSIX_ENTRY_SIZE;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let usage = "usage: vfio-user-device SOCKET\n\
                 Serves vmkit's DMA test device over vfio-user on the UNIX socket SOCKET \
                 (which must not exist) until the client disconnects.";
    let socket = match args.as_slice() {
        [arg] if arg == "-h" || arg == "--help" => {
            println!("{usage}");
            return ExitCode::SUCCESS;
        }
        [socket] if !socket.is_empty() && !socket.to_string_lossy().starts_with('-') => socket,
        _ => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    match serve(Path::new(socket)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vfio-user-device: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Serves one client on `path`.
fn serve(path: &Path) -> Result<(), String> {
    let mut device = TestDevice::new()?;
    let server = Server::new(path, true, irq_infos(), device.server_regions()).map_err(
        |error| match error {
            vfio_user::Error::SocketPathExists => format!("{} already exists", path.display()),
            error => format!("cannot listen on {}: {error}", path.display()),
        },
    )?;
    eprintln!("vfio-user-device: listening on {}", path.display());
    server
        .run(&mut device)
        .map_err(|error| format!("serving {}: {error}", path.display()))
}

/// The interrupt indexes of a PCI function, as VFIO numbers them: only MSI-X has vectors.
fn irq_infos() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| {
            if index == VFIO_PCI_MSIX_IRQ_INDEX {
                IrqInfo {
                    index,
                    flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
                    count: u32::from(MSIX_VECTORS),
                }
            } else {
                IrqInfo {
                    index,
                    flags: 0,
                    count: 0,
                }
            }
        })
        .collect()
}

/// The configuration space after reset.
fn config_space() -> Result<ConfigSpace, vmkit_pci_passthrough::Error> {
    let [_, class, subclass, prog_if] = CLASS_CODE.to_be_bytes();
    let mut config = ConfigSpace::new(&PciHeader {
        vendor_id: VENDOR_ID,
        device_id: DEVICE_ID,
        class,
        subclass,
        prog_if,
        interrupt_pin: 0,
        ..PciHeader::default()
    });
    for (index, size, prefetchable) in [
        (REGISTER_BAR, REGISTER_BAR_SIZE, false),
        (MSIX_BAR, MSIX_BAR_SIZE, false),
        // Plain memory: reads have no side effects.
        (MEMORY_BAR, MEMORY_BAR_SIZE, true),
    ] {
        config.add_bar(PciBar {
            index,
            kind: BarKind::Memory32,
            size,
            prefetchable,
        })?;
    }
    // MSI-X: message control (table size - 1; enable and function mask writable), table
    // offset/BIR, PBA offset/BIR.
    let mut body = [0u8; 10];
    body[0..2].copy_from_slice(&(MSIX_VECTORS - 1).to_le_bytes());
    body[2..6].copy_from_slice(&u32::from(MSIX_BAR).to_le_bytes());
    body[6..10].copy_from_slice(&(MSIX_PBA_OFFSET | u32::from(MSIX_BAR)).to_le_bytes());
    let writable = [0, 0xc0];
    config.add_capability(MSIX_CAPABILITY_ID, &body, &writable)?;
    Ok(config)
}

/// A shared mapping of a file, unmapped on drop.
struct Mapping {
    address: *mut u8,
    size: usize,
}

impl Mapping {
    fn new(fd: RawFd, offset: u64, size: usize, protection: libc::c_int) -> std::io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new mapping at an address the kernel chooses; nothing existing changes.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                protection,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            address: address.cast(),
            size,
        })
    }

    /// Byte `offset`, if it is inside.
    fn read(&self, offset: u64) -> Option<u8> {
        let offset = usize::try_from(offset).ok().filter(|&o| o < self.size)?;
        // SAFETY: inside the mapping. Volatile: the VMM and guest change it concurrently.
        Some(unsafe { self.address.add(offset).read_volatile() })
    }

    /// Writes byte `offset` if it is inside (the mapping must be writable).
    fn write(&self, offset: u64, value: u8) {
        if let Some(offset) = usize::try_from(offset).ok().filter(|&o| o < self.size) {
            // SAFETY: inside the mapping, which the caller mapped writable.
            unsafe { self.address.add(offset).write_volatile(value) };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.address.cast(), self.size) };
    }
}

/// Guest RAM the VMM mapped for DMA.
struct DmaMapping {
    iova: u64,
    /// `iova + size`, checked when mapped.
    end: u64,
    readable: bool,
    writable: bool,
    memory: Mapping,
}

/// The registers of BAR 0.
#[derive(Default)]
struct Registers {
    dma_address: u64,
    dma_len: u32,
    pattern_seed: u32,
    status: u32,
    result: u64,
    irq_vector: u32,
    completions: u32,
}

/// The device's whole state.
struct TestDevice {
    reset_config: ConfigSpace,
    config: ConfigSpace,
    registers: Registers,
    msix_table: [u8; MSIX_TABLE_SIZE],
    /// BAR 4's memfd, shared with the client for mmap, and this process's mapping of it.
    memory_file: File,
    memory: Mapping,
    dma: Vec<DmaMapping>,
    /// The eventfd of each MSI-X vector, once the client set it.
    msix_eventfds: Vec<Option<File>>,
}

impl TestDevice {
    fn new() -> Result<Self, String> {
        let reset_config = config_space()
            .map_err(|error| format!("cannot build the configuration space: {error}"))?;
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd or -1.
        let fd =
            unsafe { libc::memfd_create(c"vfio-user-device-bar4".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a new fd that nothing else owns.
        let memory_file = unsafe { File::from_raw_fd(fd) };
        memory_file
            .set_len(MEMORY_BAR_SIZE)
            .map_err(|error| format!("cannot size the device memory: {error}"))?;
        let memory = Mapping::new(
            memory_file.as_raw_fd(),
            0,
            MEMORY_BAR_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
        )
        .map_err(|error| format!("cannot map the device memory: {error}"))?;
        let mut device = TestDevice {
            config: reset_config.clone(),
            reset_config,
            registers: Registers::default(),
            msix_table: [0; MSIX_TABLE_SIZE],
            memory_file,
            memory,
            dma: Vec::new(),
            msix_eventfds: (0..MSIX_VECTORS).map(|_| None).collect(),
        };
        device.reset_state();
        Ok(device)
    }

    /// The regions as the server describes them.
    fn server_regions(&self) -> Vec<ServerRegion> {
        let region = |index: u32, size: u64, flags: u32| ServerRegion {
            region_info: vfio_region_info {
                argsz: std::mem::size_of::<vfio_region_info>() as u32,
                flags,
                index,
                cap_offset: 0,
                size,
                offset: 0,
            },
            sparse_areas: Vec::new(),
            mmap_fd: None,
        };
        let read_write = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        (0..VFIO_PCI_NUM_REGIONS)
            .map(|index| match index {
                _ if index == u32::from(REGISTER_BAR) => {
                    region(index, REGISTER_BAR_SIZE, read_write)
                }
                _ if index == u32::from(MSIX_BAR) => region(index, MSIX_BAR_SIZE, read_write),
                _ if index == u32::from(MEMORY_BAR) => ServerRegion {
                    // vfio_user sends the fd only with sparse areas: declare the whole BAR.
                    sparse_areas: vec![SparseArea {
                        area: vfio_region_sparse_mmap_area {
                            offset: 0,
                            size: MEMORY_BAR_SIZE,
                        },
                    }],
                    mmap_fd: Some(self.memory_file.as_raw_fd()),
                    ..region(
                        index,
                        MEMORY_BAR_SIZE,
                        read_write | VFIO_REGION_INFO_FLAG_MMAP,
                    )
                },
                VFIO_PCI_CONFIG_REGION_INDEX => region(index, CONFIG_SIZE, read_write),
                _ => region(index, 0, 0),
            })
            .collect()
    }

    /// Registers, configuration space, MSI-X table and device memory as after reset. DMA
    /// mappings and eventfds belong to the VMM and stay.
    fn reset_state(&mut self) {
        self.config = self.reset_config.clone();
        self.registers = Registers::default();
        self.msix_table = [0; MSIX_TABLE_SIZE];
        // Every vector starts masked (vector control bit 0).
        for entry in self.msix_table.chunks_mut(MSIX_ENTRY_SIZE) {
            if let Some(control) = entry.get_mut(12) {
                *control = 1;
            }
        }
        for offset in 0..MEMORY_BAR_SIZE {
            self.memory.write(offset, 0);
        }
        for (offset, byte) in (0u64..).zip(MEMORY_SIGNATURE.to_le_bytes()) {
            self.memory.write(offset, byte);
        }
    }

    /// The 32-bit register at `offset` (a multiple of 4) as a read sees it.
    fn register(&self, offset: u64) -> u32 {
        let r = &self.registers;
        match offset {
            REG_ID => REGISTER_SIGNATURE,
            REG_DMA_ADDR_LO => r.dma_address as u32,
            REG_DMA_ADDR_HI => (r.dma_address >> 32) as u32,
            REG_DMA_LEN => r.dma_len,
            REG_PATTERN_SEED => r.pattern_seed,
            REG_STATUS => r.status,
            REG_RESULT_LO => r.result as u32,
            REG_RESULT_HI => (r.result >> 32) as u32,
            REG_IRQ_VECTOR => r.irq_vector,
            REG_COMPLETIONS => r.completions,
            // REG_COMMAND is write-only; unused offsets read 0.
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let r = &mut self.registers;
        match offset {
            REG_DMA_ADDR_LO => r.dma_address = (r.dma_address & !0xffff_ffff) | u64::from(value),
            REG_DMA_ADDR_HI => {
                r.dma_address = (r.dma_address & 0xffff_ffff) | u64::from(value) << 32
            }
            REG_DMA_LEN => r.dma_len = value,
            REG_PATTERN_SEED => r.pattern_seed = value,
            REG_IRQ_VECTOR => r.irq_vector = value,
            REG_COMMAND => self.run_command(value),
            // Read-only registers and unused offsets ignore writes.
            _ => {}
        }
    }

    /// Runs a DMA command to its end, then reports it: status, count, interrupt.
    fn run_command(&mut self, command: u32) {
        let done = match command {
            COMMAND_WRITE_GUEST => self.write_guest(),
            COMMAND_READ_GUEST => self.read_guest(),
            _ => false,
        };
        self.registers.status = if done { STATUS_DONE } else { STATUS_ERROR };
        self.registers.completions = self.registers.completions.wrapping_add(1);
        self.raise(self.registers.irq_vector);
    }

    /// The mapping that holds all of the current DMA range, and the range's offset in it.
    fn dma_target(&self, need_write: bool) -> Option<(&DmaMapping, u64)> {
        let address = self.registers.dma_address;
        let len = self.registers.dma_len;
        if len > MAX_DMA_LEN {
            return None;
        }
        let end = address.checked_add(u64::from(len))?;
        let mapping = self
            .dma
            .iter()
            .find(|m| m.iova <= address && end <= m.end)?;
        let allowed = if need_write {
            mapping.writable
        } else {
            mapping.readable
        };
        allowed.then_some((mapping, address - mapping.iova))
    }

    /// COMMAND_WRITE_GUEST: the pattern into guest memory. False if the range is refused.
    fn write_guest(&self) -> bool {
        let Some((mapping, start)) = self.dma_target(true) else {
            return false;
        };
        let seed = self.registers.pattern_seed;
        for i in 0..self.registers.dma_len {
            mapping
                .memory
                .write(start + u64::from(i), pattern_byte(seed, i));
        }
        true
    }

    /// COMMAND_READ_GUEST: the checksum of guest memory. False if the range is refused.
    fn read_guest(&mut self) -> bool {
        let Some((mapping, start)) = self.dma_target(false) else {
            return false;
        };
        // dma_target checked that every byte is inside the mapping.
        let data: Vec<u8> = (0..u64::from(self.registers.dma_len))
            .map(|i| mapping.memory.read(start + i).unwrap_or(0xff))
            .collect();
        self.registers.result = checksum(&data);
        true
    }

    /// Signals MSI-X vector `vector`'s eventfd, if the VMM set one.
    fn raise(&self, vector: u32) {
        let eventfd = usize::try_from(vector)
            .ok()
            .and_then(|v| self.msix_eventfds.get(v))
            .and_then(Option::as_ref);
        if let Some(mut eventfd) = eventfd {
            // Only fails when the counter is saturated: the interrupt is pending anyway.
            let _ = eventfd.write(&1u64.to_ne_bytes());
        }
    }

    /// Byte `offset` of region `region`; all-ones outside the device's regions.
    fn region_byte(&self, region: u32, offset: u64) -> u8 {
        match region {
            _ if region == u32::from(REGISTER_BAR) && offset < REGISTER_BAR_SIZE => {
                let shift = (offset % 4) * 8;
                (self.register(offset - offset % 4) >> shift) as u8
            }
            _ if region == u32::from(MSIX_BAR) && offset < MSIX_BAR_SIZE => {
                // The PBA reads 0: pending bits live in the VMM's emulation.
                usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.msix_table.get(o))
                    .copied()
                    .unwrap_or(0)
            }
            _ if region == u32::from(MEMORY_BAR) => self.memory.read(offset).unwrap_or(0xff),
            VFIO_PCI_CONFIG_REGION_INDEX if offset < CONFIG_SIZE => {
                // Below 256: fits.
                self.config.u8_at(offset as usize)
            }
            _ => 0xff,
        }
    }
}

/// The offsets of the bytes of an access at `offset`: `None` past the end of the 64-bit
/// space (a client may ask for any offset).
fn offsets(offset: u64) -> impl Iterator<Item = Option<u64>> {
    (0u64..).map(move |i| offset.checked_add(i))
}

impl ServerBackend for TestDevice {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        for (at, byte) in offsets(offset).zip(data.iter_mut()) {
            *byte = at.map_or(0xff, |at| self.region_byte(region, at));
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match region {
            _ if region == u32::from(REGISTER_BAR) => {
                // The registers take aligned 32-bit writes, and 64-bit ones as two of them
                // (low dword first); other widths are dropped.
                let aligned = offset % 4 == 0;
                if !aligned || !matches!(data.len(), 4 | 8) {
                    return Ok(());
                }
                for (at, dword) in offsets(offset).step_by(4).zip(data.chunks_exact(4)) {
                    let (Some(at), Ok(bytes)) = (at, <[u8; 4]>::try_from(dword)) else {
                        continue;
                    };
                    if at < REGISTER_BAR_SIZE {
                        self.write_register(at, u32::from_le_bytes(bytes));
                    }
                }
            }
            _ if region == u32::from(MSIX_BAR) => {
                for (at, &byte) in offsets(offset).zip(data) {
                    if let Some(entry) = at
                        .and_then(|at| usize::try_from(at).ok())
                        .and_then(|at| self.msix_table.get_mut(at))
                    {
                        *entry = byte;
                    }
                }
            }
            _ if region == u32::from(MEMORY_BAR) => {
                for (at, &byte) in offsets(offset).zip(data) {
                    if let Some(at) = at {
                        self.memory.write(at, byte);
                    }
                }
            }
            VFIO_PCI_CONFIG_REGION_INDEX => {
                if let Ok(offset) = usize::try_from(offset) {
                    self.config.write(offset, data);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let invalid = || std::io::Error::from_raw_os_error(libc::EINVAL);
        // vfio_user's client ignores this error; a refused range shows as STATUS_ERROR.
        let fd = fd.ok_or_else(invalid)?;
        let end = address.checked_add(size).ok_or_else(invalid)?;
        let length = usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(invalid)?;
        if self.dma.iter().any(|m| m.iova < end && address < m.end) {
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        let readable = flags.contains(DmaMapFlags::READ);
        let writable = flags.contains(DmaMapFlags::WRITE);
        let protection = match (readable, writable) {
            (true, true) => libc::PROT_READ | libc::PROT_WRITE,
            (true, false) => libc::PROT_READ,
            (false, true) => libc::PROT_WRITE,
            (false, false) => return Err(invalid()),
        };
        // Touching a mapping past the end of its file raises SIGBUS: refuse such ranges.
        // (A VMM that shrinks the file afterwards could still crash the server; it is the
        // VMM's own guest RAM, so that is a bug there.)
        let file_size = fd.metadata()?.len();
        if offset.checked_add(size).is_none_or(|end| end > file_size) {
            return Err(invalid());
        }
        let memory = Mapping::new(fd.as_raw_fd(), offset, length, protection)?;
        self.dma.push(DmaMapping {
            iova: address,
            end,
            readable,
            writable,
            memory,
        });
        Ok(())
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        // As VFIO does: unmap the mappings entirely inside the range. Never an error, which
        // vfio_user's client would wait on forever.
        if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            self.dma.clear();
        } else {
            let end = address.saturating_add(size);
            self.dma.retain(|m| !(address <= m.iova && m.end <= end));
        }
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.reset_state();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        let invalid = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let data = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            // Disabling an index the device does not have is harmless.
            return if data == VFIO_IRQ_SET_DATA_NONE && count == 0 {
                Ok(())
            } else {
                Err(invalid())
            };
        }
        if action != VFIO_IRQ_SET_ACTION_TRIGGER {
            // Masking MSI-X vectors is the VMM's job (it emulates the table).
            return Ok(());
        }
        let end = start
            .checked_add(count)
            .filter(|&end| end <= u32::from(MSIX_VECTORS))
            .ok_or_else(invalid)?;
        match data {
            VFIO_IRQ_SET_DATA_NONE if count == 0 => {
                self.msix_eventfds.iter_mut().for_each(|fd| *fd = None);
            }
            // Triggers the vectors, as a loopback test of the eventfds.
            VFIO_IRQ_SET_DATA_NONE => (start..end).for_each(|vector| self.raise(vector)),
            VFIO_IRQ_SET_DATA_EVENTFD if fds.len() == count as usize => {
                for (slot, fd) in self.msix_eventfds.iter_mut().skip(start as usize).zip(fds) {
                    *slot = Some(fd);
                }
            }
            _ => return Err(invalid()),
        }
        Ok(())
    }
}
