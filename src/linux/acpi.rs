//! ACPI tables: how a kernel built without `CONFIG_X86_MPPARSE` (Debian's cloud kernel, for
//! one) finds its vCPUs, its interrupt controllers and the PCI host bridge.
//!
//! The tables are the few a hardware-reduced ACPI platform needs, as Firecracker and Cloud
//! Hypervisor write them for their microVMs, built with rust-vmm's `acpi_tables` crate:
//!
//! - the **RSDP** (revision 2) at [`RSDP_ADDRESS`] (0xe0000), on a 16-byte boundary of the BIOS
//!   area 0xe0000-0xfffff that Linux scans for `"RSD PTR "` when the boot protocol does not
//!   hand it the address (the 64-bit protocol's `boot_params.acpi_rsdp_addr`, PVH's
//!   `hvm_start_info.rsdp_paddr`); it points at the XSDT only (no RSDT);
//! - the **XSDT**, listing the FADT and the MADT;
//! - the **FADT** (revision 6.5) with the `HW_REDUCED_ACPI` flag (no PM timer, no SCI, no GPE or
//!   PM1 blocks: there is no ACPI hardware to emulate), the power and sleep buttons as control
//!   method devices (that is, none as fixed features), the reset register set to the i8042's
//!   command port 0x64 with value 0xfe (what [`crate::devices::I8042`] takes as a reset, so ACPI
//!   reboots work too), the IA-PC boot flags "legacy devices", "8042", "no VGA", "no ASPM" and
//!   "no CMOS RTC" (MSI is left supported: virtio-pci disks and VFIO devices use MSI-X), and
//!   the DSDT's address;
//! - the **DSDT** (revision 2: 64-bit AML integers) with one device, `\_SB.PCI0`, the PCI host
//!   bridge (`PNP0A03`, segment 0, bus 0) that `crate::devices::pci` emulates. Its `_CRS` gives
//!   bus 0, the configuration ports 0xcf8-0xcff, the I/O window 0xc000-0xffff
//!   ([`IO_WINDOW`]) and the 32-bit memory window 0xe0000000-0xefffffff ([`MMIO32_WINDOW`]).
//!   Linux with ACPI enumerates PCI only below the host bridges the DSDT declares, and places
//!   BARs inside their windows, which are the windows the VMM maps BARs in;
//! - the **MADT** (revision 5): the local APICs at 0xfee00000 and the `PCAT_COMPAT` flag (KVM's
//!   in-kernel irqchip has the two 8259s), then one Processor Local APIC entry per vCPU
//!   (ACPI processor UID and APIC ID = vCPU index, enabled), the I/O APIC (ID = the vCPU count,
//!   the first free APIC ID, as in the MP table; at 0xfec00000; GSI base 0), an interrupt source
//!   override for each ISA IRQ 1-15 to the GSI of the same number with the bus's polarity and
//!   trigger, and NMI on LINT1 of every processor.
//!
//! The overrides say what the MP table's I/O interrupt entries say (KVM routes GSI n to I/O
//! APIC pin n, and to the PIC for n < 16: there is no IRQ 0 to GSI 2 override as on PC
//! chipsets). They are needed: on a hardware-reduced platform Linux replaces the PIC with a
//! null one that has no legacy IRQs, so it does not fill in the identity mappings of IRQs
//! 0-15 that ACPI otherwise implies, and a driver asking for IRQ 4 (the serial port) would find
//! no I/O APIC pin behind it. IRQ 0 gets no override: Linux takes an override whose source is
//! the FADT's SCI interrupt (0 here: there is no SCI) as the SCI's, level-triggered and active
//! low, and a hardware-reduced Linux sets up no PIT timer on IRQ 0 anyway. GSIs 16-23 cannot
//! be described by overrides (ISA IRQs stop at 15): a device on them must be declared in the
//! DSDT. For PCI functions with an INTx line (passed-through devices), the host bridge's
//! `_PRT` does that: one entry per (device, pin) with the GSI the VMM wired the line to, which
//! Linux programs level-triggered and active low. Virtio-mmio devices are not declared (their
//! interrupts reach Linux through `virtio_mmio.device=`).
//!
//! Everything lies in 0xe0000-0xfffff, which `vmkit-memory`'s E820 map reserves (the whole
//! 0x9fc00-0xfffff legacy area is reserved; the MP table lies at its start), each table on a
//! 16-byte boundary, in the order RSDP, XSDT, FADT, DSDT, MADT. Every table's bytes add up to
//! zero, and the RSDP's first 20 bytes do too.

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace as GasAddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::mptable::{APIC_ADDRESS, IOAPIC_ADDRESS, MAX_CPUS};
use super::{Error, Result};
use crate::devices::pci::{CONFIG_PORT, CONFIG_PORT_COUNT, IO_WINDOW, MMIO32_WINDOW};
use crate::devices::I8042;

/// Where the RSDP goes: the start of the BIOS area Linux scans (0xe0000-0xfffff, on 16-byte
/// boundaries); the other tables follow it.
pub const RSDP_ADDRESS: u64 = 0xe_0000;
/// The end (exclusive) of the area the tables must fit in: 1 MiB, where the reserved legacy
/// area of the E820 map ends.
pub const ACPI_AREA_END: u64 = vmkit_memory::layout::HIGH_MEMORY_START;

/// "VMKIT ", the OEM ID of every table.
const OEM_ID: [u8; 6] = *b"VMKIT ";
/// The OEM table ID of every table (the same, as the MP table's product ID).
const OEM_TABLE_ID: [u8; 8] = *b"VMKIT VM";
const OEM_REVISION: u32 = 1;
/// Tables start on 16-byte boundaries, as firmware places them (nothing requires it).
const TABLE_ALIGNMENT: u64 = 16;

/// The length of a system description table header.
const HEADER_SIZE: usize = 36;
/// An XSDT with its two entries: the FADT and the MADT.
const XSDT_SIZE: usize = HEADER_SIZE + 2 * 8;
/// The DSDT revision: 2 and above make AML integers 64 bits wide.
const DSDT_REVISION: u8 = 2;

/// MADT revision 5 (ACPI 6.3 and 6.4: the revision from which Linux reads the Online Capable
/// flag, clear here; 6.5's revision 6 adds nothing used here).
const MADT_REVISION: u8 = 5;
/// The MADT's header: the table header, the local APIC address and the flags.
const MADT_HEADER_SIZE: u32 = 44;
/// MADT flag: the system also has PC-AT-compatible dual 8259s.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const LOCAL_APIC_SIZE: u8 = 8;
const IO_APIC_SIZE: u8 = 12;
const INTERRUPT_SOURCE_OVERRIDE_SIZE: u8 = 10;
const LOCAL_APIC_NMI_SIZE: u8 = 6;
/// Processor Local APIC flag: the processor is usable.
const LOCAL_APIC_ENABLED: u32 = 1;
/// Bus 0 of an interrupt source override: ISA.
const BUS_ISA: u8 = 0;
/// The ISA IRQs that get an override (see the module documentation for why not IRQ 0).
const OVERRIDDEN_ISA_IRQS: std::ops::Range<u8> = 1..16;
/// MPS INTI flags: polarity and trigger mode as the bus defines them (ISA: edge, active high).
const INTI_CONFORMING: u16 = 0;
/// ACPI processor UID 0xff in a Local APIC NMI entry: every processor.
const ALL_PROCESSORS: u8 = 0xff;
/// The local APIC pin NMIs arrive on (virtual wire mode, as in the MP table).
const NMI_LINT: u8 = 1;

/// IA-PC boot architecture flag: there are ISA/LPC devices (the serial port, the i8042) the
/// DSDT does not enumerate.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
/// IA-PC boot architecture flag: an 8042 is present (the reset-only [`I8042`]). Without it
/// Linux's i8042 driver would not probe the controller; a reboot through port 0x64 works either
/// way.
const IAPC_8042: u16 = 1 << 1;
/// IA-PC boot architecture flag: do not probe for VGA (there is none).
const IAPC_NO_VGA: u16 = 1 << 2;
/// IA-PC boot architecture flag: the OS must not enable PCIe ASPM (there is no link to save
/// power on).
const IAPC_NO_ASPM: u16 = 1 << 4;
/// IA-PC boot architecture flag: there is no CMOS RTC at ports 0x70-0x71.
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
/// The IA-PC boot architecture flags. Bit 3, "MSI not supported", stays clear: PCI devices
/// here interrupt through MSI-X only.
const IAPC_BOOT_ARCH: u16 =
    IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_NO_VGA | IAPC_NO_ASPM | IAPC_NO_CMOS_RTC;
/// The reset register: the i8042's command port (0x64) ...
const RESET_PORT: u64 = I8042::BASE_PORT as u64 + 4;
/// ... and the value written to it: "pulse the reset line", which ends the VM.
const RESET_VALUE: u8 = 0xfe;

/// The PCI host bridge's configuration ports (0xcf8-0xcff), for the DSDT's 16-bit fields.
const PCI_CONFIG_PORT: u16 = {
    assert!(CONFIG_PORT + CONFIG_PORT_COUNT <= 0x1_0000);
    CONFIG_PORT as u16
};
const PCI_CONFIG_PORT_COUNT: u8 = {
    assert!(CONFIG_PORT_COUNT <= 0xff);
    CONFIG_PORT_COUNT as u8
};
/// The I/O window's first and last port.
const PCI_IO_FIRST: u16 = {
    assert!(IO_WINDOW.size > 0 && IO_WINDOW.base + IO_WINDOW.size <= 0x1_0000);
    IO_WINDOW.base as u16
};
const PCI_IO_LAST: u16 = (IO_WINDOW.base + IO_WINDOW.size - 1) as u16;
/// The 32-bit memory window's first and last address.
const PCI_MMIO_FIRST: u32 = {
    assert!(MMIO32_WINDOW.size > 0 && MMIO32_WINDOW.base + MMIO32_WINDOW.size <= 1 << 32);
    MMIO32_WINDOW.base as u32
};
const PCI_MMIO_LAST: u32 = (MMIO32_WINDOW.base + MMIO32_WINDOW.size - 1) as u32;

/// Where [`write_acpi_tables`] put the tables (guest-physical addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    /// The RSDP: what `boot_params.acpi_rsdp_addr` and `hvm_start_info.rsdp_paddr` take. The
    /// start of the tables.
    pub rsdp: u64,
    /// The XSDT.
    pub xsdt: u64,
    /// The FADT.
    pub fadt: u64,
    /// The DSDT.
    pub dsdt: u64,
    /// The MADT.
    pub madt: u64,
    /// Bytes from the RSDP to the end of the last table, padding included.
    pub size: u64,
    /// The I/O APIC's ID in the MADT.
    pub ioapic_id: u8,
}

/// The tables as bytes, and where they go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Everything from the RSDP to the end of the MADT, to be written at `layout.rsdp`.
    pub bytes: Vec<u8>,
    /// Where each table lies once written.
    pub layout: AcpiLayout,
}

/// `offset` rounded up to the table alignment.
fn align(offset: u64) -> u64 {
    offset.next_multiple_of(TABLE_ALIGNMENT)
}

/// The MADT for `cpu_count` vCPUs (already checked to be 1 to [`MAX_CPUS`], so that APIC IDs
/// and the I/O APIC's ID fit in 8 bits and below the broadcast ID).
fn madt(cpu_count: u8) -> Vec<u8> {
    let ioapic_id = cpu_count;
    let mut entries = Vec::with_capacity(
        usize::from(cpu_count) * usize::from(LOCAL_APIC_SIZE)
            + usize::from(IO_APIC_SIZE)
            + OVERRIDDEN_ISA_IRQS.len() * usize::from(INTERRUPT_SOURCE_OVERRIDE_SIZE)
            + usize::from(LOCAL_APIC_NMI_SIZE),
    );
    // Processors first: Linux numbers CPUs in the order it meets them, and the boot vCPU
    // (APIC ID 0) must be CPU 0.
    for cpu in 0..cpu_count {
        entries.extend_from_slice(&[MADT_LOCAL_APIC, LOCAL_APIC_SIZE, cpu, cpu]);
        entries.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
    }
    entries.extend_from_slice(&[MADT_IO_APIC, IO_APIC_SIZE, ioapic_id, 0]);
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes()); // GSI base: pin n is GSI n
    for irq in OVERRIDDEN_ISA_IRQS {
        entries.extend_from_slice(&[
            MADT_INTERRUPT_SOURCE_OVERRIDE,
            INTERRUPT_SOURCE_OVERRIDE_SIZE,
            BUS_ISA,
            irq,
        ]);
        entries.extend_from_slice(&u32::from(irq).to_le_bytes());
        entries.extend_from_slice(&INTI_CONFORMING.to_le_bytes());
    }
    entries.extend_from_slice(&[MADT_LOCAL_APIC_NMI, LOCAL_APIC_NMI_SIZE, ALL_PROCESSORS]);
    entries.extend_from_slice(&INTI_CONFORMING.to_le_bytes());
    entries.push(NMI_LINT);

    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_SIZE,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, APIC_ADDRESS);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    // Updates the length and the checksum.
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

/// A PCI function's INTx line and the GSI (I/O APIC pin) the VMM wired it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIntxRoute {
    /// The device number on bus 0.
    pub device: u8,
    /// The interrupt pin, as the configuration space says it: 1 (INTA#) to 4 (INTD#).
    pub pin: u8,
    /// The GSI.
    pub gsi: u32,
}

/// The DSDT: the PCI host bridge, `\_SB.PCI0`, with a `_PRT` for the INTx lines in `intx`.
fn dsdt(intx: &[PciIntxRoute]) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let segment = aml::Name::new("_SEG".into(), &aml::ZERO);
    let base_bus = aml::Name::new("_BBN".into(), &aml::ZERO);
    let bus = AddressSpace::new_bus_number(0u16, 0u16);
    // The configuration ports: consumed by the bridge itself, not a window.
    let config = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORT_COUNT);
    let io_window = AddressSpace::new_io(PCI_IO_FIRST, PCI_IO_LAST, None);
    let mmio_window = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_FIRST,
        PCI_MMIO_LAST,
        None,
    );
    let resources = aml::ResourceTemplate::new(vec![&bus, &config, &io_window, &mmio_window]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    // _PRT entries: Package { address (device << 16 | 0xffff: any function), pin (0 = INTA#),
    // source (0: the fourth field is a GSI), GSI }.
    let addresses: Vec<u32> = intx
        .iter()
        .map(|route| (u32::from(route.device) << 16) | 0xffff)
        .collect();
    let pins: Vec<u8> = intx
        .iter()
        .map(|route| route.pin.saturating_sub(1))
        .collect();
    let entries: Vec<aml::Package> = intx
        .iter()
        .zip(addresses.iter().zip(&pins))
        .map(|(route, (address, pin))| {
            aml::Package::new(vec![address, pin, &aml::ZERO, &route.gsi])
        })
        .collect();
    let entry_refs: Vec<&dyn Aml> = entries.iter().map(|entry| entry as &dyn Aml).collect();
    let routing = aml::Package::new(entry_refs);
    let prt = aml::Name::new("_PRT".into(), &routing);
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid, &segment, &base_bus, &crs];
    if !intx.is_empty() {
        children.push(&prt);
    }
    let pci0 = aml::Device::new("PCI0".into(), children);
    let system_bus = aml::Scope::new("\\_SB_".into(), vec![&pci0]);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_SIZE as u32,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let mut body = Vec::new();
    system_bus.to_aml_bytes(&mut body);
    // Updates the length and the checksum.
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// The FADT of a hardware-reduced platform, pointing at the DSDT at `dsdt_address`.
fn fadt(dsdt_address: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_address)
        .flag(Flags::HwReducedAcpi)
        // No fixed-feature buttons (there is no PM1 block to report them in).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    builder.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    builder.reset_reg = GAS::new(
        GasAddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        RESET_PORT,
    );
    builder.reset_value = RESET_VALUE;
    let mut bytes = Vec::with_capacity(FADT::len());
    // `finalize` sets the checksum.
    builder.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// The XSDT listing the FADT and the MADT.
fn xsdt(fadt_address: u64, madt_address: u64) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_address);
    xsdt.add_entry(madt_address);
    let mut bytes = Vec::with_capacity(XSDT_SIZE);
    xsdt.to_aml_bytes(&mut bytes);
    bytes
}

/// The ACPI tables for `cpu_count` vCPUs, as bytes to place at guest-physical `address` (the
/// RSDP's; Linux finds it by scanning only on a 16-byte boundary in 0xe0000-0xfffff).
///
/// `intx` lists the PCI functions' INTx lines for the host bridge's `_PRT`.
///
/// Fails with [`Error::CpuCount`] for 0 or more than [`MAX_CPUS`] vCPUs.
pub fn acpi_tables(cpu_count: u32, address: u64, intx: &[PciIntxRoute]) -> Result<AcpiTables> {
    let ioapic_id = match u8::try_from(cpu_count) {
        Ok(count) if (1..=MAX_CPUS).contains(&cpu_count) => count,
        _ => {
            return Err(Error::CpuCount {
                count: cpu_count,
                max: MAX_CPUS,
            })
        }
    };
    let madt = madt(ioapic_id);
    let dsdt = dsdt(intx);

    // Offsets from the RSDP; every table after it on a 16-byte boundary.
    let xsdt_offset = align(Rsdp::len() as u64);
    let fadt_offset = align(xsdt_offset + XSDT_SIZE as u64);
    let dsdt_offset = align(fadt_offset + FADT::len() as u64);
    let madt_offset = align(dsdt_offset + dsdt.len() as u64);
    let size = madt_offset + madt.len() as u64;

    let fadt = fadt(address + dsdt_offset);
    let xsdt = xsdt(address + fadt_offset, address + madt_offset);
    let rsdp = Rsdp::new(OEM_ID, address + xsdt_offset);

    // The size is at most a few KiB (at most MAX_CPUS local APIC entries), so it fits a usize.
    let mut bytes = vec![0u8; size as usize];
    for (offset, table) in [
        (0, rsdp_bytes(&rsdp)),
        (xsdt_offset, xsdt),
        (fadt_offset, fadt),
        (dsdt_offset, dsdt),
        (madt_offset, madt),
    ] {
        let start = offset as usize;
        bytes[start..start + table.len()].copy_from_slice(&table);
    }
    Ok(AcpiTables {
        bytes,
        layout: AcpiLayout {
            rsdp: address,
            xsdt: address + xsdt_offset,
            fadt: address + fadt_offset,
            dsdt: address + dsdt_offset,
            madt: address + madt_offset,
            size,
            ioapic_id,
        },
    })
}

fn rsdp_bytes(rsdp: &Rsdp) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(Rsdp::len());
    rsdp.to_aml_bytes(&mut bytes);
    bytes
}

/// Writes the ACPI tables for `cpu_count` vCPUs at [`RSDP_ADDRESS`] and returns where they
/// are; the RSDP's address goes in `boot_params.acpi_rsdp_addr` or
/// `hvm_start_info.rsdp_paddr`.
///
/// Fails with [`Error::CpuCount`], or [`Error::GuestMemory`] when guest RAM ends below 1 MiB.
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cpu_count: u32,
    intx: &[PciIntxRoute],
) -> Result<AcpiLayout> {
    let tables = acpi_tables(cpu_count, RSDP_ADDRESS, intx)?;
    // At most a few KiB for MAX_CPUS vCPUs (the tests check the most vCPUs fit): the tables
    // never reach the kernel at 1 MiB.
    debug_assert!(RSDP_ADDRESS + tables.layout.size <= ACPI_AREA_END);
    mem.write_slice(&tables.bytes, GuestAddress(RSDP_ADDRESS))
        .map_err(|source| Error::GuestMemory {
            what: "ACPI tables",
            address: RSDP_ADDRESS,
            source,
        })?;
    Ok(tables.layout)
}

#[cfg(test)]
mod tests {
    use super::super::loader::tests::{memory, sum, u16_at, u32_at, u64_at, MIB};
    use super::*;
    use vmkit_memory::layout::{e820_map, ram_ranges};
    use vmkit_memory::E820Kind;

    /// Reads a system description table at `address` through its header's length, checking
    /// its signature and checksum, as ACPICA does before it uses a table.
    fn table<M: GuestMemoryBackend>(mem: &M, address: u64, signature: &[u8; 4]) -> Vec<u8> {
        let mut header = [0u8; HEADER_SIZE];
        mem.read_slice(&mut header, GuestAddress(address)).unwrap();
        assert_eq!(&header[..4], signature, "signature at {address:#x}");
        let length = u32_at(&header, 4) as usize;
        assert!(length >= HEADER_SIZE, "{signature:?} length {length}");
        let mut bytes = vec![0u8; length];
        mem.read_slice(&mut bytes, GuestAddress(address)).unwrap();
        assert_eq!(sum(&bytes), 0, "{signature:?} checksum");
        assert_eq!(&bytes[10..16], b"VMKIT ", "{signature:?} OEM ID");
        assert_eq!(&bytes[16..24], b"VMKIT VM", "{signature:?} OEM table ID");
        bytes
    }

    /// Everything Linux reads, found the way it finds it: the RSDP, then the XSDT's entries,
    /// then the FADT's DSDT pointer.
    struct Found {
        layout: AcpiLayout,
        rsdp: Vec<u8>,
        xsdt: Vec<u8>,
        fadt: Vec<u8>,
        dsdt: Vec<u8>,
        madt: Vec<u8>,
    }

    fn read_back(cpus: u32) -> Found {
        let mem = memory(2 * MIB);
        let layout = write_acpi_tables(&mem, cpus, &[]).unwrap();
        assert_eq!(layout.rsdp, RSDP_ADDRESS);
        assert_eq!(u32::from(layout.ioapic_id), cpus);

        let mut rsdp = vec![0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(layout.rsdp))
            .unwrap();
        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), HEADER_SIZE + 16, "two entries");
        let fadt = table(&mem, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&mem, u64_at(&xsdt, 44), b"APIC");
        let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");
        Found {
            layout,
            rsdp,
            xsdt,
            fadt,
            dsdt,
            madt,
        }
    }

    /// The MADT's entries as (type, bytes), walked by their lengths as Linux walks them.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut offset = MADT_HEADER_SIZE as usize;
        let mut out = Vec::new();
        while offset < madt.len() {
            let (kind, len) = (madt[offset], usize::from(madt[offset + 1]));
            assert!(len >= 2, "entry at {offset} has length {len}");
            out.push((kind, madt[offset..offset + len].to_vec()));
            offset += len;
        }
        assert_eq!(offset, madt.len(), "entries fill the table exactly");
        out
    }

    fn check(cpus: u32) {
        let found = read_back(cpus);
        let layout = found.layout;

        // RSDP: signature, revision 2, both checksums, the XSDT pointer and no RSDT.
        let rsdp = &found.rsdp;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum (ACPI 1.0 part)");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(&rsdp[9..15], b"VMKIT ");
        assert_eq!(rsdp[15], 2, "revision 2: the XSDT address is valid");
        assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
        assert_eq!(u32_at(rsdp, 20), 36, "length");
        assert_eq!(u64_at(rsdp, 24), layout.xsdt);
        assert_eq!(
            layout.rsdp % 16,
            0,
            "on a 16-byte boundary, where Linux scans"
        );

        // XSDT: the FADT and the MADT (the DSDT is the FADT's).
        assert_eq!(u64_at(&found.xsdt, 36), layout.fadt);
        assert_eq!(u64_at(&found.xsdt, 44), layout.madt);
        assert_eq!(found.xsdt[8], 1, "XSDT revision");

        // FADT: revision 6.5, 276 bytes, hardware-reduced, the DSDT only as a 64-bit pointer,
        // the boot flags, the reset register.
        let fadt = &found.fadt;
        assert_eq!(fadt.len(), 276);
        assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT 6.5");
        assert_eq!(u32_at(fadt, 40), 0, "no 32-bit DSDT pointer");
        assert_eq!(u64_at(fadt, 140), layout.dsdt, "X_DSDT");
        assert_eq!((u32_at(fadt, 36), u64_at(fadt, 132)), (0, 0), "no FACS");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(
            flags & ((1 << 4) | (1 << 5)),
            (1 << 4) | (1 << 5),
            "no fixed buttons"
        );
        let boot_arch = u16_at(fadt, 109);
        assert_ne!(boot_arch & (1 << 1), 0, "8042 present");
        assert_ne!(boot_arch & (1 << 2), 0, "no VGA");
        assert_eq!(boot_arch & (1 << 3), 0, "MSI supported");
        // Reset register: system I/O, 8 bits, port 0x64; value 0xfe.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 120), 0x64);
        assert_eq!(fadt[128], 0xfe);

        // DSDT: a valid header around AML; revision 2 for 64-bit integers.
        assert_eq!(found.dsdt[8], 2);
        assert!(found.dsdt.len() > HEADER_SIZE);

        // MADT: revision, local APIC address, PCAT_COMPAT.
        let madt = &found.madt;
        assert_eq!(madt[8], 5, "MADT revision");
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
        let entries = madt_entries(madt);
        let expected = cpus as usize + 1 + 15 + 1;
        assert_eq!(entries.len(), expected, "CPUs, I/O APIC, 15 overrides, NMI");

        let lapics: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(k, _)| *k == 0)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(lapics.len() as u32, cpus, "one local APIC per vCPU");
        for (index, entry) in lapics.iter().enumerate() {
            assert_eq!(entry.len(), 8);
            assert_eq!(entry[2] as usize, index, "processor UID = vCPU index");
            assert_eq!(entry[3] as usize, index, "APIC ID = vCPU index");
            assert_eq!(u32_at(entry, 4), 1, "enabled");
        }
        // The boot vCPU's entry first: Linux makes the first one CPU 0.
        assert_eq!(entries[0].0, 0);
        assert_eq!(entries[0].1[3], 0);

        let ioapics: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(k, _)| *k == 1)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0].len(), 12);
        assert_eq!(
            u32::from(ioapics[0][2]),
            cpus,
            "I/O APIC ID after the vCPUs"
        );
        assert_eq!(u32_at(ioapics[0], 4), 0xfec0_0000);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");

        let overrides: Vec<(u8, u8, u32, u16)> = entries
            .iter()
            .filter(|(k, _)| *k == 2)
            .map(|(_, e)| {
                assert_eq!(e.len(), 10);
                (e[2], e[3], u32_at(e, 4), u16_at(e, 8))
            })
            .collect();
        let identity: Vec<(u8, u8, u32, u16)> =
            (1..16).map(|irq| (0, irq, irq as u32, 0)).collect();
        assert_eq!(
            overrides, identity,
            "ISA IRQ n to GSI n, conforming, for IRQs 1-15"
        );

        let nmis: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(k, _)| *k == 4)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(
            nmis,
            vec![&vec![4u8, 6, 0xff, 0, 0, 1]],
            "NMI on LINT1 of all"
        );

        // Everything in the BIOS area, which the E820 map reserves.
        assert!(layout.rsdp >= 0xe_0000 && layout.rsdp + layout.size <= ACPI_AREA_END);
        let e820 = e820_map(&ram_ranges(512 * MIB));
        assert!(
            e820.iter().any(|e| e.kind == E820Kind::Reserved
                && e.addr <= layout.rsdp
                && e.addr + e.size >= layout.rsdp + layout.size),
            "{e820:?}"
        );
        // The tables do not overlap, in the documented order, each on a 16-byte boundary.
        let spans = [
            (layout.rsdp, 36),
            (layout.xsdt, found.xsdt.len() as u64),
            (layout.fadt, found.fadt.len() as u64),
            (layout.dsdt, found.dsdt.len() as u64),
            (layout.madt, found.madt.len() as u64),
        ];
        for pair in spans.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{spans:x?}");
            assert_eq!(pair[1].0 % 16, 0);
        }
        assert_eq!(
            layout.madt + found.madt.len() as u64,
            layout.rsdp + layout.size
        );
        // And clear of the MP table at the start of the reserved area.
        let mp_end = super::super::mptable::MPTABLE_ADDRESS
            + super::super::mptable::mptable(cpus, 0).unwrap().len() as u64;
        assert!(mp_end <= layout.rsdp);
    }

    #[test]
    fn one_vcpu() {
        check(1);
    }

    #[test]
    fn two_vcpus() {
        check(2);
    }

    #[test]
    fn sixty_four_vcpus() {
        check(64);
    }

    #[test]
    fn the_most_vcpus_fit_in_the_bios_area() {
        check(MAX_CPUS);
        let tables = acpi_tables(MAX_CPUS, RSDP_ADDRESS, &[]).unwrap();
        assert!(RSDP_ADDRESS + tables.layout.size <= ACPI_AREA_END);
    }

    #[test]
    fn refuses_zero_and_too_many_vcpus() {
        for count in [0, MAX_CPUS + 1, 256, u32::MAX] {
            assert!(
                matches!(
                    acpi_tables(count, RSDP_ADDRESS, &[]),
                    Err(Error::CpuCount { count: c, max: 254 }) if c == count
                ),
                "{count}"
            );
        }
    }

    #[test]
    fn guest_ram_below_the_tables_is_an_error_not_a_panic() {
        let mem = memory(0x8_0000);
        assert!(matches!(
            write_acpi_tables(&mem, 1, &[]),
            Err(Error::GuestMemory { .. })
        ));
    }

    #[test]
    fn the_tables_are_placed_where_asked() {
        let tables = acpi_tables(2, 0xf_0000, &[]).unwrap();
        assert_eq!(tables.layout.rsdp, 0xf_0000);
        assert_eq!(u64_at(&tables.bytes, 24), tables.layout.xsdt);
        assert!(tables.layout.xsdt > 0xf_0000);
        assert_eq!(tables.bytes.len() as u64, tables.layout.size);
    }

    /// The resource descriptors of the buffer that follows `Name(_CRS, ...)` in `aml`: (tag,
    /// body) pairs up to the end tag.
    fn crs_descriptors(aml: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let name = aml.windows(5).position(|w| w == b"\x08_CRS").unwrap();
        let mut at = name + 5;
        assert_eq!(aml[at], 0x11, "a Buffer");
        at += 1;
        // PkgLength: the top two bits of the lead byte say how many bytes follow.
        at += 1 + usize::from(aml[at] >> 6);
        // The buffer size, as an AML integer.
        at += match aml[at] {
            0x0a => 2,
            0x0b => 3,
            other => panic!("buffer size opcode {other:#x}"),
        };
        let mut out = Vec::new();
        loop {
            let tag = aml[at];
            if tag & 0x80 != 0 {
                let len = usize::from(u16_at(aml, at + 1));
                out.push((tag, aml[at + 3..at + 3 + len].to_vec()));
                at += 3 + len;
            } else {
                let len = usize::from(tag & 7);
                out.push((tag & 0x78, aml[at + 1..at + 1 + len].to_vec()));
                at += 1 + len;
                if tag & 0x78 == 0x78 {
                    return out;
                }
            }
        }
    }

    #[test]
    fn the_dsdt_declares_the_pci_host_bridge_and_its_windows() {
        let dsdt = dsdt(&[]);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(u32_at(&dsdt, 4) as usize, dsdt.len());
        assert_eq!(sum(&dsdt), 0);
        let aml = &dsdt[HEADER_SIZE..];
        // Scope (\_SB) { Device (PCI0) { ... } }
        assert_eq!(aml[0], 0x10, "ScopeOp");
        assert!(aml.windows(5).any(|w| w == b"\\_SB_"));
        let device = aml.windows(2).position(|w| w == [0x5b, 0x82]).unwrap();
        assert!(aml[device..].windows(4).any(|w| w == b"PCI0"));
        // Name (_HID, EisaId ("PNP0A03")): the compressed ID 0x030ad041.
        assert!(aml
            .windows(10)
            .any(|w| w == b"\x08_HID\x0c\x41\xd0\x0a\x03"));
        for name in [b"_UID", b"_SEG", b"_BBN"] {
            let at = aml.windows(4).position(|w| w == name).unwrap();
            assert_eq!(
                (aml[at - 1], aml[at + 4]),
                (0x08, 0x00),
                "Name ({name:?}, Zero)"
            );
        }

        let descriptors = crs_descriptors(aml);
        assert_eq!(descriptors.len(), 5, "{descriptors:x?}");
        // WordBusNumber: resource type 2, bus 0 to 0, length 1.
        let (tag, bus) = &descriptors[0];
        assert_eq!((*tag, bus[0]), (0x88, 2));
        assert_eq!((u16_at(bus, 5), u16_at(bus, 7), u16_at(bus, 11)), (0, 0, 1));
        // IO (Decode16, 0xcf8, 0xcf8, 1, 8).
        assert_eq!(
            descriptors[1],
            (0x40, vec![1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8])
        );
        // WordIO: resource type 1, 0xc000-0xffff.
        let (tag, io) = &descriptors[2];
        assert_eq!((*tag, io[0]), (0x88, 1));
        assert_eq!(
            (u16_at(io, 5), u16_at(io, 7), u16_at(io, 11)),
            (0xc000, 0xffff, 0x4000)
        );
        // DWordMemory: resource type 0, read-write, 0xe0000000-0xefffffff.
        let (tag, mem) = &descriptors[3];
        assert_eq!((*tag, mem[0], mem[2] & 1), (0x87, 0, 1));
        assert_eq!(
            (u32_at(mem, 7), u32_at(mem, 11), u32_at(mem, 19)),
            (0xe000_0000, 0xefff_ffff, 0x1000_0000)
        );
        // The end tag.
        assert_eq!(descriptors[4].0, 0x78);
    }

    #[test]
    fn the_dsdt_routes_pci_intx_lines_to_their_gsis() {
        assert!(
            !dsdt(&[]).windows(4).any(|w| w == b"_PRT"),
            "no _PRT without INTx lines"
        );
        let routes = [
            PciIntxRoute {
                device: 3,
                pin: 1,
                gsi: 23,
            },
            PciIntxRoute {
                device: 31,
                pin: 4,
                gsi: 300,
            },
        ];
        let dsdt = dsdt(&routes);
        assert_eq!(u32_at(&dsdt, 4) as usize, dsdt.len());
        assert_eq!(sum(&dsdt), 0);
        let aml = &dsdt[HEADER_SIZE..];
        // Name (_PRT, Package (2) { ... }) inside Device (PCI0).
        let device = aml.windows(2).position(|w| w == [0x5b, 0x82]).unwrap();
        let prt = aml.windows(5).position(|w| w == b"\x08_PRT").unwrap();
        assert!(prt > device);
        assert_eq!(aml[prt + 5], 0x12, "PackageOp");
        // Each entry: Package (4) { DWord address, pin (0 = INTA#), Zero (a GSI), the GSI }.
        let first: &[u8] = &[0x04, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x00, 0x00, 0x0a, 23];
        let second: &[u8] = &[
            0x04, 0x0c, 0xff, 0xff, 0x1f, 0x00, 0x0a, 0x03, 0x00, 0x0b, 0x2c, 0x01,
        ];
        for entry in [first, second] {
            assert!(
                aml[prt..].windows(entry.len()).any(|w| w == entry),
                "{entry:x?} in {:x?}",
                &aml[prt..]
            );
        }
    }
}
