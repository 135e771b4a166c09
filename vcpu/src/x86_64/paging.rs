//! Identity-mapped 4-level page tables built in guest memory, with 2 MiB pages.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::error::{Error, Result};

const PAGE_SIZE: u64 = 4096;
const ENTRIES: u64 = 512;
const GIB: u64 = 1 << 30;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

/// Where page tables go and what they map.
#[derive(Clone, Copy, Debug)]
pub struct IdentityMap {
    /// Guest-physical address of the PML4; the PDPT and page directories follow it page by page.
    pub base: u64,
    /// End (exclusive) of the guest-physical area the tables may occupy.
    pub area_end: u64,
    /// Map `[0, map_end)`, rounded up to 1 GiB.
    pub map_end: u64,
    /// Set the user bit on every level so CPL3 code can use the mapping.
    pub user: bool,
}

impl IdentityMap {
    /// How many 4 KiB pages the tables take.
    pub fn table_pages(&self) -> u64 {
        2 + self.map_end.div_ceil(GIB)
    }

    /// Writes the tables into `mem` and returns the value for CR3.
    pub fn write<M: GuestMemory>(&self, mem: &M) -> Result<u64> {
        let directories = self.map_end.div_ceil(GIB);
        if directories > ENTRIES {
            return Err(Error::BootLayout(format!(
                "identity map of {:#x} bytes needs more than one PML4 entry (512 GiB)",
                self.map_end
            )));
        }
        let tables_end = self.base + self.table_pages() * PAGE_SIZE;
        if tables_end > self.area_end {
            return Err(Error::BootLayout(format!(
                "page tables for {} GiB do not fit in [{:#x}, {:#x})",
                directories, self.base, self.area_end
            )));
        }
        let flags = PRESENT | WRITABLE | if self.user { USER } else { 0 };
        let pml4 = self.base;
        let pdpt = pml4 + PAGE_SIZE;
        let first_pd = pdpt + PAGE_SIZE;

        let mut table = vec![0u64; ENTRIES as usize];
        table[0] = pdpt | flags;
        write_table(mem, pml4, &table)?;

        table.fill(0);
        for gib in 0..directories {
            table[gib as usize] = (first_pd + gib * PAGE_SIZE) | flags;
        }
        write_table(mem, pdpt, &table)?;

        for gib in 0..directories {
            for (entry, slot) in table.iter_mut().enumerate() {
                let address = gib * GIB + entry as u64 * (2 << 20);
                *slot = address | flags | HUGE;
            }
            write_table(mem, first_pd + gib * PAGE_SIZE, &table)?;
        }
        Ok(pml4)
    }
}

fn write_table<M: GuestMemory>(mem: &M, address: u64, table: &[u64]) -> Result<()> {
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(address))
        .map_err(|source| Error::GuestMemory {
            what: "page tables",
            address,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn read_u64(mem: &GuestMemoryMmap, address: u64) -> u64 {
        mem.read_obj(GuestAddress(address)).unwrap()
    }

    #[test]
    fn maps_every_2mib_page_identically_with_the_user_bit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = IdentityMap {
            base: 0x10000,
            area_end: 0xa0000,
            map_end: 5 * GIB,
            user: true,
        };
        assert_eq!(map.write(&mem).unwrap(), 0x10000);
        assert_eq!(read_u64(&mem, 0x10000), 0x11000 | 7);
        for gib in 0..5 {
            assert_eq!(
                read_u64(&mem, 0x11000 + gib * 8),
                (0x12000 + gib * 0x1000) | 7
            );
        }
        assert_eq!(read_u64(&mem, 0x11000 + 5 * 8), 0);
        // The last 2 MiB page of the 5th GiB.
        assert_eq!(
            read_u64(&mem, 0x16000 + 511 * 8),
            (5 * GIB - (2 << 20)) | 0x87
        );
    }

    #[test]
    fn refuses_tables_that_do_not_fit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = IdentityMap {
            base: 0x10000,
            area_end: 0x14000,
            map_end: 4 * GIB,
            user: false,
        };
        assert!(matches!(map.write(&mem), Err(Error::BootLayout(_))));
    }
}
