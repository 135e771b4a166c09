//! The Intel MultiProcessor table (MP specification 1.4), which tells the kernel how many
//! processors there are and how interrupts reach them, without ACPI.
//!
//! The table sits at [`MPTABLE_ADDRESS`] (0x9fc00), the start of the last KiB of conventional
//! memory, which is one of the places Linux scans for the floating pointer (`smp_scan_config`,
//! "639 * 0x400"), and which `vmkit-memory`'s E820 map reserves. It holds:
//!
//! - the floating pointer structure (`_MP_`), pointing at the configuration table right after;
//! - the configuration table (`PCMP`) with the local APIC at 0xfee00000 and, in the order the
//!   specification asks: one processor entry per vCPU (APIC ID = vCPU index, the boot
//!   processor flag on vCPU 0); one bus, ISA; one I/O APIC (ID = the number of vCPUs, the first
//!   free APIC ID, at 0xfec00000); an I/O interrupt entry for each of the I/O APIC's 24 pins,
//!   ISA IRQ n to pin n with the bus's default polarity and trigger (edge, active high), which
//!   is KVM's default GSI routing (GSI n to pin n; IRQs 16-23 serve devices such as virtio-mmio
//!   that take an IRQ number from the VMM); and the local interrupts: ExtINT (the 8259 PIC) on
//!   LINT0 of the boot processor, NMI on LINT1 of every processor (virtual wire mode).
//!
//! Both structures carry checksums: the bytes of each add up to zero. Linux reads the table only
//! when built with `CONFIG_X86_MPPARSE` (and when ACPI does not describe the CPUs first).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{Error, Result};

/// Where the MP floating pointer goes; the configuration table follows it.
pub const MPTABLE_ADDRESS: u64 = 0x9_fc00;
/// The local APICs' address.
pub const APIC_ADDRESS: u32 = 0xfee0_0000;
/// The I/O APIC's address.
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// Pins of KVM's I/O APIC.
pub const IOAPIC_PINS: u8 = 24;
/// The most vCPUs the table describes: APIC IDs are 8 bits, 0xff is the broadcast ID, and the
/// I/O APIC takes the ID after the last vCPU.
pub const MAX_CPUS: u32 = 254;

const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const ENTRY_SIZE: usize = 8;
/// MP specification 1.4.
const SPEC_REVISION: u8 = 4;
const OEM_ID: &[u8; 8] = b"VMKIT   ";
const PRODUCT_ID: &[u8; 12] = b"VMKIT VM    ";

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// The local APIC version KVM's APIC reports (an integrated xAPIC).
const APIC_VERSION: u8 = 0x14;
/// The I/O APIC version KVM's I/O APIC reports.
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_USABLE: u8 = 1;
/// CPUID signature of a family 6 processor; Linux reads only the APIC fields.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX feature flags: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const BUS_ISA: u8 = 0;
const BUS_TYPE_ISA: &[u8; 6] = b"ISA   ";

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode as the source bus defines them.
const INT_FLAGS_CONFORMING: u16 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;

/// Where [`write_mptable`] put the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MpTableLayout {
    /// Guest-physical address of the floating pointer.
    pub address: u64,
    /// Bytes from the floating pointer to the end of the configuration table.
    pub size: u64,
    /// The I/O APIC's ID.
    pub ioapic_id: u8,
}

/// The two's complement of the byte sum, so that the bytes with it sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, &b| sum.wrapping_add(b))
        .wrapping_neg()
}

/// The MP floating pointer and configuration table for `cpu_count` vCPUs, as bytes to place at
/// guest-physical `address` (below 4 GiB).
pub fn mptable(cpu_count: u32, address: u32) -> Result<Vec<u8>> {
    if cpu_count == 0 || cpu_count > MAX_CPUS {
        return Err(Error::CpuCount {
            count: cpu_count,
            max: MAX_CPUS,
        });
    }
    // Fits in a u8: at most MAX_CPUS.
    let ioapic_id = cpu_count as u8;
    // Processors, then the bus, the I/O APIC, its pins and the two local interrupts.
    let mut entries = Vec::with_capacity(
        usize::from(ioapic_id) * PROCESSOR_ENTRY_SIZE + (4 + usize::from(IOAPIC_PINS)) * ENTRY_SIZE,
    );
    let mut count = 0u16;
    for cpu in 0..ioapic_id {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(BUS_TYPE_ISA);
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE]);
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[BUS_ISA, pin, ioapic_id, pin]);
        count += 1;
    }
    for (kind, apic, lint) in [(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, ALL_LOCAL_APICS, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[BUS_ISA, 0, apic, lint]);
        count += 1;
    }

    let table_address = address + FLOATING_POINTER_SIZE as u32;
    // At most 44 + 254 * 20 + 28 * 8 bytes: fits in the u16 length.
    let table_len = (HEADER_SIZE + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.extend_from_slice(&[SPEC_REVISION, 0]); // checksum below
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDRESS.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_SIZE + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_address.to_le_bytes());
    // Length in 16-byte units, revision, checksum (below), feature bytes: 0 = the
    // configuration table is present, and the IMCR is absent (virtual wire mode).
    out.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `cpu_count` vCPUs at [`MPTABLE_ADDRESS`].
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, cpu_count: u32) -> Result<MpTableLayout> {
    let bytes = mptable(cpu_count, MPTABLE_ADDRESS as u32)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDRESS))
        .map_err(|source| Error::GuestMemory {
            what: "MP table",
            address: MPTABLE_ADDRESS,
            source,
        })?;
    Ok(MpTableLayout {
        address: MPTABLE_ADDRESS,
        size: bytes.len() as u64,
        ioapic_id: cpu_count as u8,
    })
}

#[cfg(test)]
mod tests {
    use super::super::loader::tests::{memory, sum, u16_at, u32_at, MIB};
    use super::*;

    /// The entries of a configuration table, as (type, bytes), walked as Linux walks them.
    fn entries(table: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let count = u16_at(table, 34);
        let mut offset = HEADER_SIZE;
        let mut out = Vec::new();
        for _ in 0..count {
            let kind = table[offset];
            let len = if kind == ENTRY_PROCESSOR {
                PROCESSOR_ENTRY_SIZE
            } else {
                ENTRY_SIZE
            };
            out.push((kind, table[offset..offset + len].to_vec()));
            offset += len;
        }
        assert_eq!(offset, table.len(), "entries fill the table exactly");
        out
    }

    /// Reads the table back from guest memory through the floating pointer, as Linux does.
    fn read_back(cpus: u32) -> (Vec<u8>, Vec<u8>) {
        let mem = memory(2 * MIB);
        let layout = write_mptable(&mem, cpus).unwrap();
        assert_eq!(layout.address, MPTABLE_ADDRESS);
        assert_eq!(layout.ioapic_id as u32, cpus);
        let mut fp = vec![0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_ADDRESS))
            .unwrap();
        let table_address = u64::from(u32_at(&fp, 4));
        let mut header = vec![0u8; HEADER_SIZE];
        mem.read_slice(&mut header, GuestAddress(table_address))
            .unwrap();
        let mut table = vec![0u8; usize::from(u16_at(&header, 4))];
        mem.read_slice(&mut table, GuestAddress(table_address))
            .unwrap();
        assert_eq!(layout.size, 16 + table.len() as u64);
        // Linux scans the last KiB of base memory: the pointer must be in it, the table in
        // the reserved area below 1 MiB.
        const { assert!(MPTABLE_ADDRESS >= 639 * 0x400 && MPTABLE_ADDRESS + 16 <= 640 * 0x400) };
        assert!(MPTABLE_ADDRESS + layout.size <= MIB);
        (fp, table)
    }

    fn check(cpus: u32) {
        let (fp, table) = read_back(cpus);
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!((fp[8], fp[9]), (1, 4), "16 bytes, spec 1.4");
        assert_eq!(sum(&fp), 0, "floating pointer checksum");
        assert_eq!(fp[11], 0, "the configuration table is present");
        assert_eq!(u32_at(&fp, 4), MPTABLE_ADDRESS as u32 + 16);

        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(table[6], 4);
        assert_eq!(sum(&table), 0, "configuration table checksum");
        assert_eq!(u32_at(&table, 36), APIC_ADDRESS);

        let entries = entries(&table);
        let processors: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(k, _)| *k == ENTRY_PROCESSOR)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(
            processors.len() as u32,
            cpus,
            "one processor entry per vCPU"
        );
        for (index, p) in processors.iter().enumerate() {
            assert_eq!(p[1] as usize, index, "APIC ID = vCPU index");
            assert_eq!(p[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(
                p[3] & CPU_BOOT_PROCESSOR != 0,
                index == 0,
                "BSP flag on 0 only"
            );
        }
        // Processors first, then bus, I/O APIC, I/O interrupts, local interrupts.
        let kinds: Vec<u8> = entries.iter().map(|(k, _)| *k).collect();
        assert!(kinds.windows(2).all(|w| w[0] <= w[1]), "{kinds:?}");

        let bus: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(k, _)| *k == ENTRY_BUS)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(bus.len(), 1);
        assert_eq!(&bus[0][2..8], b"ISA   ");

        let ioapic: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(k, _)| *k == ENTRY_IOAPIC)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(ioapic.len(), 1);
        assert_eq!(ioapic[0][1] as u32, cpus, "I/O APIC ID after the vCPUs");
        assert_eq!(ioapic[0][3] & 1, 1, "usable");
        assert_eq!(u32_at(ioapic[0], 4), IOAPIC_ADDRESS);

        let irqs: Vec<(u8, u8, u8, u8)> = entries
            .iter()
            .filter(|(k, _)| *k == ENTRY_IO_INTERRUPT)
            .map(|(_, e)| (e[1], e[5], e[6], e[7]))
            .collect();
        // Every ISA IRQ (and the rest of the pins), IRQ n to pin n of the I/O APIC.
        assert_eq!(irqs.len(), 24);
        for (irq, &(kind, source, apic, pin)) in irqs.iter().enumerate() {
            assert_eq!(
                (kind, source as usize, apic as u32, pin as usize),
                (0, irq, cpus, irq)
            );
        }

        let lints: Vec<(u8, u8, u8)> = entries
            .iter()
            .filter(|(k, _)| *k == ENTRY_LOCAL_INTERRUPT)
            .map(|(_, e)| (e[1], e[6], e[7]))
            .collect();
        assert_eq!(
            lints,
            vec![(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, 0xff, 1)],
            "ExtINT on LINT0 of the BSP, NMI on LINT1 of all"
        );
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
    fn the_most_vcpus_fit_below_1_mib() {
        check(MAX_CPUS);
    }

    #[test]
    fn refuses_zero_and_too_many_vcpus() {
        assert!(matches!(
            mptable(0, MPTABLE_ADDRESS as u32),
            Err(Error::CpuCount { count: 0, .. })
        ));
        assert!(matches!(
            mptable(MAX_CPUS + 1, MPTABLE_ADDRESS as u32),
            Err(Error::CpuCount {
                count: 255,
                max: 254
            })
        ));
    }

    #[test]
    fn guest_ram_below_the_table_is_an_error_not_a_panic() {
        let mem = memory(0x8_0000);
        assert!(matches!(
            write_mptable(&mem, 1),
            Err(Error::GuestMemory { .. })
        ));
    }
}
