//! The driver of the DMA test device ([`vmkit_guest_abi::testdev`]), a PCI function the VMM
//! passes through: for every such function on bus 0 (when `BootInfo` lists a PCI host
//! bridge) it enables the function, programs MSI-X, checks the directly mapped memory BAR,
//! and runs three DMAs: a write into guest memory, a read of it, and one outside guest RAM
//! that the device must refuse. One line per step; any failure ends the VM with
//! [`status::TESTDEV`].
//!
//! The guest takes no interrupts: it programs MSI-X vectors 0 and 1 to vCPU 0 (APIC vectors
//! 0x40 and 0x41) and every DMA raises vector 1, which the host checks (irqfd count or the
//! LAPIC's IRR). Completion is polled through `REG_COMPLETIONS` with a TSC bound.

use core::ptr;

use vmkit_guest_abi::testdev::{
    checksum, pattern_byte, COMMAND_READ_GUEST, COMMAND_WRITE_GUEST, DEVICE_ID, MEMORY_BAR,
    MEMORY_BAR_SIZE, MEMORY_SIGNATURE, MSIX_BAR, MSIX_BAR_SIZE, MSIX_VECTORS, REGISTER_BAR,
    REGISTER_BAR_SIZE, REGISTER_SIGNATURE, REG_COMMAND, REG_COMPLETIONS, REG_DMA_ADDR_HI,
    REG_DMA_ADDR_LO, REG_DMA_LEN, REG_ID, REG_IRQ_VECTOR, REG_PATTERN_SEED, REG_RESULT_HI,
    REG_RESULT_LO, REG_STATUS, STATUS_DONE, STATUS_ERROR, VENDOR_ID,
};
use vmkit_guest_abi::{BootInfo, DeviceKind, MemoryRange};

use crate::exit::{exit, status};
use crate::pci::{self, BarWindow, Function, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::{cpu, println};

/// Capability ID of MSI-X.
const MSIX_CAPABILITY_ID: u8 = 0x11;
/// MSI-X message control: MSI-X enable.
const MSIX_ENABLE: u16 = 1 << 15;
/// MSI-X message control: function mask.
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// MSI-X message control: table size minus one.
const MSIX_TABLE_SIZE_MASK: u16 = 0x7ff;
/// Bytes of an MSI-X table entry: address low, address high, data, vector control.
const MSIX_ENTRY_BYTES: u64 = 16;
/// MSI address of the LAPIC with ID 0 (vCPU 0): physical destination mode, no redirection.
const MSI_ADDRESS_VCPU0: u32 = 0xfee0_0000;
/// The APIC vector of MSI-X vector 0; vector `i` gets `FIRST_APIC_VECTOR + i`. The data is
/// just the vector: fixed delivery, edge-triggered.
const FIRST_APIC_VECTOR: u32 = 0x40;

/// Bytes of each DMA.
const DMA_LEN: u32 = 16 * 1024;
/// A page after the DMA buffer that a write DMA must leave alone.
const GUARD_BYTES: u64 = 4096;
/// What the buffer holds before the write DMA (and the guard page throughout).
const FILL_BYTE: u8 = 0xaa;
/// The seed of the pattern the write DMA asks for.
const PATTERN_SEED: u32 = 0x5eed_0001;
/// The MSI-X vector every DMA raises.
const DMA_IRQ_VECTOR: u32 = 1;
/// How long a DMA may take.
const TIMEOUT_SECONDS: u64 = 2;

/// What the memory BAR check writes at every dword but the signature: this `^ offset`.
const MEMORY_PATTERN: u32 = 0xa5a5_a5a5;

/// Prints `error: testdev BB:DD.F: ...` and ends the VM with [`status::TESTDEV`].
macro_rules! fail {
    ($function:expr, $($arg:tt)*) => {{
        println!("error: testdev {}: {}", $function, format_args!($($arg)*));
        exit(status::TESTDEV)
    }};
}

/// Checks every DMA test device on bus 0, if `BootInfo` lists a PCI host bridge; returns how
/// many were checked. Prints nothing when there is none, so a VM without one runs as before.
pub fn check_all(info: &BootInfo) -> u32 {
    let pci_bus = info
        .devices()
        .iter()
        .any(|device| device.kind == DeviceKind::PciHostBridge as u32);
    if !pci_bus {
        return 0;
    }
    let mut checked = 0;
    for function in pci::find_functions(VENDOR_ID, DEVICE_ID) {
        let Some(buffer) = dma_buffer(info) else {
            fail!(
                function,
                "no free memory for a {DMA_LEN}-byte DMA buffer and its guard page"
            );
        };
        TestDevice::probe(function, info.memory_map()).check(buffer, outside_ram(info));
        checked += 1;
    }
    if checked > 0 {
        let plural = if checked == 1 { "" } else { "s" };
        println!("testdev: {checked} device{plural} checked");
    }
    checked
}

/// The DMA buffer and its guard page, at the top of the free memory (as virtio-blk's rings
/// and buffers, whose disks are reset by now), above the `spin` counters at the bottom.
fn dma_buffer(info: &BootInfo) -> Option<u64> {
    let counters =
        (u64::from(info.cpu_count) * crate::workloads::SPIN_COUNTER_STRIDE).div_ceil(4096) * 4096;
    let low = info.free_memory_start.saturating_add(counters);
    let start = info
        .free_memory_end
        .checked_sub(u64::from(DMA_LEN) + GUARD_BYTES)?
        & !0xfff;
    (start >= low).then_some(start)
}

/// A page-aligned address just past the end of guest RAM, where no DMA may go.
fn outside_ram(info: &BootInfo) -> u64 {
    let ram_end = info
        .memory_map()
        .iter()
        .map(|range| range.start.saturating_add(range.size))
        .max()
        .unwrap_or(info.ram_size);
    ram_end.saturating_add(0xfff) & !0xfff
}

/// One test device, enabled, with its register BAR checked.
struct TestDevice<'a> {
    function: Function,
    registers: BarWindow,
    /// Guest RAM, where no BAR may lie.
    ram: &'a [MemoryRange],
}

impl<'a> TestDevice<'a> {
    /// Finds the register BAR, enables memory space and bus mastering, and checks `REG_ID`.
    fn probe(function: Function, ram: &'a [MemoryRange]) -> TestDevice<'a> {
        let registers = bar_window(function, REGISTER_BAR, REGISTER_BAR_SIZE, ram);
        function.enable(COMMAND_MEMORY | COMMAND_BUS_MASTER);
        let command = function.read16(pci::reg::COMMAND);
        if command & (COMMAND_MEMORY | COMMAND_BUS_MASTER) != COMMAND_MEMORY | COMMAND_BUS_MASTER {
            fail!(
                function,
                "memory space and bus master enable did not stick (command {command:#06x})"
            );
        }
        let id = registers.read32(REG_ID);
        if id != REGISTER_SIGNATURE {
            fail!(
                function,
                "REG_ID reads {id:#010x}, expected {REGISTER_SIGNATURE:#010x}"
            );
        }
        println!(
            "testdev {function}: memory space and bus master enabled, registers at {:#x}, REG_ID {id:#010x} OK",
            registers.base()
        );
        TestDevice {
            function,
            registers,
            ram,
        }
    }

    /// Runs the remaining checks, with `buffer` (DMA buffer and guard page in free memory)
    /// and `outside` (an address outside guest RAM).
    fn check(&self, buffer: u64, outside: u64) {
        self.check_msix();
        self.check_memory_bar();
        let before = self.registers.read32(REG_COMPLETIONS);
        let mut completions = before;
        self.check_dma_write(buffer, &mut completions);
        self.check_dma_read(buffer, &mut completions);
        self.check_dma_outside(outside, &mut completions);
        println!(
            "testdev {}: REG_COMPLETIONS counted the 3 DMAs ({before} -> {completions})",
            self.function
        );
        println!("testdev {}: ok", self.function);
    }

    /// Programs MSI-X vectors 0 and 1 to vCPU 0, unmasked, and enables MSI-X with the
    /// function unmasked; reads everything back.
    fn check_msix(&self) {
        let function = self.function;
        let Some(capability) = function.find_capability(MSIX_CAPABILITY_ID) else {
            fail!(function, "no MSI-X capability");
        };
        // The capability is 12 bytes: control at +2, table at +4, PBA at +8.
        if capability.offset > 0xff - 12 {
            fail!(
                function,
                "the MSI-X capability at {:#x} runs past configuration space",
                capability.offset
            );
        }
        let control_field = capability.offset + 2;
        let control = function.read16(control_field);
        let vectors = (control & MSIX_TABLE_SIZE_MASK) + 1;
        if vectors < MSIX_VECTORS {
            fail!(
                function,
                "MSI-X has {vectors} vectors, expected at least {MSIX_VECTORS}"
            );
        }
        let table_field = function.read32(capability.offset + 4);
        let table_bar = (table_field & 0x7) as u8;
        let table_offset = u64::from(table_field & !0x7);
        let Some(bar_size) = spec_bar_size(table_bar) else {
            fail!(
                function,
                "the MSI-X table is in BAR {table_bar}, which the device does not have"
            );
        };
        let table_end = table_offset + u64::from(MSIX_VECTORS) * MSIX_ENTRY_BYTES;
        if table_end > bar_size {
            fail!(
                function,
                "the MSI-X table at offset {table_offset:#x} does not fit in BAR {table_bar} ({bar_size:#x} bytes)"
            );
        }
        let table = bar_window(function, table_bar, bar_size, self.ram);

        let entries = (0..u32::from(MSIX_VECTORS)).map(|vector| {
            let entry = table_offset + u64::from(vector) * MSIX_ENTRY_BYTES;
            // Address low, address high, data, vector control (0: unmasked).
            let words = [MSI_ADDRESS_VCPU0, 0, FIRST_APIC_VECTOR + vector, 0];
            (vector, entry, words)
        });
        for (_, entry, words) in entries.clone() {
            for (word, value) in (0..).zip(words) {
                table.write32(entry + 4 * word, value);
            }
        }
        function.write16(control_field, (control & !MSIX_FUNCTION_MASK) | MSIX_ENABLE);

        let control = function.read16(control_field);
        if control & (MSIX_ENABLE | MSIX_FUNCTION_MASK) != MSIX_ENABLE {
            fail!(
                function,
                "MSI-X control reads {control:#06x} after enabling (expected enable set, function mask clear)"
            );
        }
        for (vector, entry, words) in entries {
            for (word, value) in (0..).zip(words) {
                let read = table.read32(entry + 4 * word);
                if read != value {
                    fail!(
                        function,
                        "MSI-X table entry {vector} dword {word} reads {read:#010x}, wrote {value:#010x}"
                    );
                }
            }
        }
        println!(
            "testdev {function}: MSI-X enabled ({vectors} vectors, table in BAR {table_bar} at {table_offset:#x}): vectors 0-{} to vCPU 0 as APIC vectors {FIRST_APIC_VECTOR:#x}-{:#x}",
            MSIX_VECTORS - 1,
            FIRST_APIC_VECTOR + u32::from(MSIX_VECTORS) - 1
        );
    }

    /// The memory BAR: the signature, then a pattern written to every other dword and read
    /// back.
    fn check_memory_bar(&self) {
        let function = self.function;
        let memory = bar_window(function, MEMORY_BAR, MEMORY_BAR_SIZE, self.ram);
        let signature = memory.read32(0);
        if signature != MEMORY_SIGNATURE {
            fail!(
                function,
                "memory BAR {MEMORY_BAR} starts with {signature:#010x}, expected {MEMORY_SIGNATURE:#010x}"
            );
        }
        // Every dword after the signature, so that the host can tell a mapped BAR (no exits)
        // from a trapped one (two exits per dword). All writes first, then all reads: a BAR
        // that aliased its dwords would fail.
        let offsets = (4..MEMORY_BAR_SIZE).step_by(4);
        for offset in offsets.clone() {
            memory.write32(offset, MEMORY_PATTERN ^ offset as u32);
        }
        for offset in offsets.clone() {
            let want = MEMORY_PATTERN ^ offset as u32;
            let read = memory.read32(offset);
            if read != want {
                fail!(
                    function,
                    "memory BAR {MEMORY_BAR} offset {offset:#x} reads {read:#010x}, wrote {want:#010x}"
                );
            }
        }
        println!(
            "testdev {function}: memory BAR {MEMORY_BAR} at {:#x}: signature {signature:#010x} OK, {} dwords written and read back",
            memory.base(),
            MEMORY_BAR_SIZE / 4 - 1
        );
    }

    /// A write DMA of the pattern into `buffer`: every byte must match, the guard page after
    /// it must be untouched.
    fn check_dma_write(&self, buffer: u64, completions: &mut u32) {
        let function = self.function;
        fill(buffer, (u64::from(DMA_LEN) + GUARD_BYTES) as usize, |_| {
            FILL_BYTE
        });
        self.registers.write32(REG_PATTERN_SEED, PATTERN_SEED);
        self.registers.write32(REG_IRQ_VECTOR, DMA_IRQ_VECTOR);
        let status = self.dma(COMMAND_WRITE_GUEST, buffer, "write DMA", completions);
        if status != STATUS_DONE {
            fail!(
                function,
                "write DMA to {buffer:#x}: status {status}, expected {STATUS_DONE}"
            );
        }
        for i in 0..DMA_LEN {
            let want = pattern_byte(PATTERN_SEED, i);
            let got = read_byte(buffer + u64::from(i));
            if got != want {
                fail!(
                    function,
                    "write DMA: byte {i} is {got:#04x}, expected {want:#04x}"
                );
            }
        }
        for i in 0..GUARD_BYTES {
            let got = read_byte(buffer + u64::from(DMA_LEN) + i);
            if got != FILL_BYTE {
                fail!(
                    function,
                    "write DMA: byte {} past the buffer changed to {got:#04x}",
                    i
                );
            }
        }
        println!(
            "testdev {function}: DMA write of {DMA_LEN} bytes to {buffer:#x} OK (pattern seed {PATTERN_SEED:#x}, MSI-X vector {DMA_IRQ_VECTOR})"
        );
    }

    /// A read DMA of `buffer` filled with known bytes: the device's checksum must match.
    fn check_dma_read(&self, buffer: u64, completions: &mut u32) {
        let function = self.function;
        fill(buffer, DMA_LEN as usize, |i| {
            (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ 0x3c
        });
        // SAFETY: the buffer is free RAM this program owns (`dma_buffer`), just written, and
        // no DMA is in flight (the write DMA completed).
        let data = unsafe {
            core::slice::from_raw_parts(
                ptr::with_exposed_provenance::<u8>(buffer as usize),
                DMA_LEN as usize,
            )
        };
        let want = checksum(data);
        let status = self.dma(COMMAND_READ_GUEST, buffer, "read DMA", completions);
        if status != STATUS_DONE {
            fail!(
                function,
                "read DMA from {buffer:#x}: status {status}, expected {STATUS_DONE}"
            );
        }
        let got = u64::from(self.registers.read32(REG_RESULT_LO))
            | u64::from(self.registers.read32(REG_RESULT_HI)) << 32;
        if got != want {
            fail!(
                function,
                "read DMA: checksum {got:#018x}, expected {want:#018x}"
            );
        }
        println!(
            "testdev {function}: DMA read of {DMA_LEN} bytes from {buffer:#x} OK (checksum {got:#018x})"
        );
    }

    /// A write DMA to `outside`, past the end of guest RAM: the device must refuse it.
    fn check_dma_outside(&self, outside: u64, completions: &mut u32) {
        let function = self.function;
        let status = self.dma(
            COMMAND_WRITE_GUEST,
            outside,
            "DMA outside guest RAM",
            completions,
        );
        if status != STATUS_ERROR {
            fail!(
                function,
                "DMA to {outside:#x}, outside guest RAM: status {status}, expected {STATUS_ERROR} (error)"
            );
        }
        println!(
            "testdev {function}: DMA to {outside:#x}, outside guest RAM, refused (status {status})"
        );
    }

    /// Runs one DMA of [`DMA_LEN`] bytes at `address` and returns `REG_STATUS`. Completion is
    /// `REG_COMPLETIONS` reaching `completions + 1` (then updated): `REG_STATUS` alone would
    /// still show the previous DMA's outcome until this one ends.
    fn dma(&self, command: u32, address: u64, what: &str, completions: &mut u32) -> u32 {
        let registers = &self.registers;
        registers.write32(REG_DMA_ADDR_LO, address as u32);
        registers.write32(REG_DMA_ADDR_HI, (address >> 32) as u32);
        registers.write32(REG_DMA_LEN, DMA_LEN);
        // The register writes are compiler barriers and x86 keeps stores in order: the
        // buffer is in memory before the device sees the command.
        registers.write32(REG_COMMAND, command);
        let expected = completions.wrapping_add(1);
        let done = cpu::wait_until(cpu::ticks_for_seconds(TIMEOUT_SECONDS), || {
            registers.read32(REG_COMPLETIONS) == expected
        });
        if !done {
            fail!(
                self.function,
                "{what}: not completed within {TIMEOUT_SECONDS} s (REG_COMPLETIONS {}, expected {expected}; REG_STATUS {})",
                registers.read32(REG_COMPLETIONS),
                registers.read32(REG_STATUS)
            );
        }
        *completions = expected;
        registers.read32(REG_STATUS)
    }
}

/// Bytes of BAR `bar` according to the device's specification, if it has that BAR.
fn spec_bar_size(bar: u8) -> Option<u64> {
    match bar {
        REGISTER_BAR => Some(REGISTER_BAR_SIZE),
        MSIX_BAR => Some(MSIX_BAR_SIZE),
        MEMORY_BAR => Some(MEMORY_BAR_SIZE),
        _ => None,
    }
}

/// The first `size` bytes of memory BAR `bar`, or the end of the VM if it is not usable.
fn bar_window(function: Function, bar: u8, size: u64, ram: &[MemoryRange]) -> BarWindow {
    match function
        .memory_bar(bar)
        .and_then(|bar| bar.window(size, ram))
    {
        Ok(window) => window,
        Err(error) => fail!(function, "{error}"),
    }
}

/// Writes `len` bytes at `address` with `byte(i)` (volatile: the device reads them).
fn fill(address: u64, len: usize, byte: impl Fn(usize) -> u8) {
    for i in 0..len {
        let p = ptr::with_exposed_provenance_mut::<u8>(address as usize + i);
        // SAFETY: `address..address + len` lies in the DMA buffer and guard page, free RAM
        // this program owns (`dma_buffer`).
        unsafe { p.write_volatile(byte(i)) };
    }
}

/// Reads the byte at `address` (volatile: the device writes it).
fn read_byte(address: u64) -> u8 {
    // SAFETY: callers pass addresses in the DMA buffer and guard page (`dma_buffer`).
    unsafe { ptr::with_exposed_provenance::<u8>(address as usize).read_volatile() }
}
