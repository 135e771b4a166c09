//! The device configuration space: `struct virtio_blk_config` of virtio 1.2, section 5.2.4.

use vmkit_block_backend::{DiskInfo, SECTOR_SIZE};

use crate::features::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SEG_MAX, SIZE_MAX};

/// Bytes of the configuration space this device exposes: every field up to and including
/// `write_zeroes_may_unmap` and its padding. Secure erase and zoned fields are not offered.
pub const CONFIG_SIZE: usize = 60;

/// Offsets of the fields in the configuration space.
pub mod offset {
    /// `le64 capacity`, in 512-byte sectors.
    pub const CAPACITY: usize = 0;
    /// `le32 size_max`.
    pub const SIZE_MAX: usize = 8;
    /// `le32 seg_max`.
    pub const SEG_MAX: usize = 12;
    /// `geometry { le16 cylinders; u8 heads; u8 sectors }`.
    pub const GEOMETRY: usize = 16;
    /// `le32 blk_size`.
    pub const BLK_SIZE: usize = 20;
    /// `topology.physical_block_exp` (u8).
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    /// `topology.alignment_offset` (u8).
    pub const ALIGNMENT_OFFSET: usize = 25;
    /// `topology.min_io_size` (le16).
    pub const MIN_IO_SIZE: usize = 26;
    /// `topology.opt_io_size` (le32).
    pub const OPT_IO_SIZE: usize = 28;
    /// `u8 writeback`: the write cache enable, the only field a driver may write.
    pub const WRITEBACK: usize = 32;
    /// `le16 num_queues`.
    pub const NUM_QUEUES: usize = 34;
    /// `le32 max_discard_sectors`.
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// `le32 max_discard_seg`.
    pub const MAX_DISCARD_SEG: usize = 40;
    /// `le32 discard_sector_alignment`.
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    /// `le32 max_write_zeroes_sectors`.
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    /// `le32 max_write_zeroes_seg`.
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    /// `u8 write_zeroes_may_unmap`.
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// The fixed part of the configuration space, computed once from the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Number of request queues.
    pub num_queues: u16,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Whether write-zeroes with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: bool,
}

impl BlockConfig {
    /// The configuration of a device with `num_queues` queues over a disk described by `info`.
    pub fn new(info: &DiskInfo, num_queues: u16) -> Self {
        let logical = info.logical_block_size.max(SECTOR_SIZE as u32);
        let physical = info.physical_block_size.max(logical);
        let blocks_per_physical = physical / logical;
        BlockConfig {
            capacity: info.addressable_size() / SECTOR_SIZE,
            blk_size: logical,
            // Only a power of two is meaningful as an exponent; otherwise report 1:1.
            physical_block_exp: if blocks_per_physical.is_power_of_two() {
                blocks_per_physical.trailing_zeros() as u8
            } else {
                0
            },
            min_io_size: u16::try_from(blocks_per_physical).unwrap_or(1),
            num_queues,
            discard_sector_alignment: (physical / SECTOR_SIZE as u32).max(1),
            write_zeroes_may_unmap: info.discard && !info.read_only,
        }
    }

    /// The configuration space as the driver sees it, with the current write cache state.
    pub fn to_bytes(&self, writeback: bool) -> [u8; CONFIG_SIZE] {
        let mut bytes = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, value: &[u8]| {
            // The offsets are constants inside CONFIG_SIZE; `get_mut` keeps this panic-free.
            if let Some(dst) = bytes.get_mut(at..at + value.len()) {
                dst.copy_from_slice(value);
            }
        };
        put(offset::CAPACITY, &self.capacity.to_le_bytes());
        put(offset::SIZE_MAX, &SIZE_MAX.to_le_bytes());
        put(offset::SEG_MAX, &SEG_MAX.to_le_bytes());
        put(offset::BLK_SIZE, &self.blk_size.to_le_bytes());
        put(offset::PHYSICAL_BLOCK_EXP, &[self.physical_block_exp]);
        put(offset::MIN_IO_SIZE, &self.min_io_size.to_le_bytes());
        put(offset::WRITEBACK, &[u8::from(writeback)]);
        put(offset::NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(
            offset::MAX_DISCARD_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(offset::MAX_DISCARD_SEG, &MAX_DISCARD_SEG.to_le_bytes());
        put(
            offset::DISCARD_SECTOR_ALIGNMENT,
            &self.discard_sector_alignment.to_le_bytes(),
        );
        put(
            offset::MAX_WRITE_ZEROES_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(offset::MAX_WRITE_ZEROES_SEG, &MAX_DISCARD_SEG.to_le_bytes());
        put(
            offset::WRITE_ZEROES_MAY_UNMAP,
            &[u8::from(self.write_zeroes_may_unmap)],
        );
        bytes
    }

    /// Reads `data.len()` bytes at `offset`; bytes outside the configuration space read as 0.
    pub fn read(&self, writeback: bool, offset: u64, data: &mut [u8]) {
        let bytes = self.to_bytes(writeback);
        for (i, out) in data.iter_mut().enumerate() {
            *out = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| bytes.get(at).copied())
                .unwrap_or(0);
        }
    }
}

/// The value a driver's write of `data` at `offset` gives the `writeback` field, if the
/// write covers it. Writes to every other field are ignored, as they are read-only.
pub fn written_writeback(offset: u64, data: &[u8]) -> Option<bool> {
    let index = (offset::WRITEBACK as u64).checked_sub(offset)?;
    let byte = data.get(usize::try_from(index).ok()?)?;
    Some(*byte != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DiskInfo {
        DiskInfo {
            size: 1000 * 512 + 1,
            logical_block_size: 512,
            physical_block_size: 4096,
            request_alignment: 1,
            memory_alignment: 1,
            read_only: false,
            discard: true,
        }
    }

    fn le32(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    }

    #[test]
    fn fields_sit_at_the_spec_offsets() {
        let config = BlockConfig::new(&info(), 3);
        let bytes = config.to_bytes(true);
        assert_eq!(
            u64::from_le_bytes(bytes[0..8].try_into().unwrap()),
            1001,
            "capacity rounds a partial sector up"
        );
        assert_eq!(le32(&bytes, offset::SIZE_MAX), SIZE_MAX);
        assert_eq!(le32(&bytes, offset::SEG_MAX), SEG_MAX);
        assert_eq!(le32(&bytes, offset::GEOMETRY), 0);
        assert_eq!(le32(&bytes, offset::BLK_SIZE), 512);
        assert_eq!(bytes[offset::PHYSICAL_BLOCK_EXP], 3);
        assert_eq!(bytes[offset::ALIGNMENT_OFFSET], 0);
        assert_eq!(
            u16::from_le_bytes([bytes[offset::MIN_IO_SIZE], bytes[offset::MIN_IO_SIZE + 1]]),
            8
        );
        assert_eq!(le32(&bytes, offset::OPT_IO_SIZE), 0);
        assert_eq!(bytes[offset::WRITEBACK], 1);
        assert_eq!(
            u16::from_le_bytes([bytes[offset::NUM_QUEUES], bytes[offset::NUM_QUEUES + 1]]),
            3
        );
        assert_eq!(
            le32(&bytes, offset::MAX_DISCARD_SECTORS),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(le32(&bytes, offset::MAX_DISCARD_SEG), 1);
        assert_eq!(le32(&bytes, offset::DISCARD_SECTOR_ALIGNMENT), 8);
        assert_eq!(
            le32(&bytes, offset::MAX_WRITE_ZEROES_SECTORS),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(le32(&bytes, offset::MAX_WRITE_ZEROES_SEG), 1);
        assert_eq!(bytes[offset::WRITE_ZEROES_MAY_UNMAP], 1);
        assert_eq!(config.to_bytes(false)[offset::WRITEBACK], 0);
    }

    #[test]
    fn reads_at_any_offset_and_width_never_panic() {
        let config = BlockConfig::new(&info(), 1);
        let full = config.to_bytes(false);
        let mut data = [0xffu8; 8];
        config.read(false, 56, &mut data);
        assert_eq!(&data[..4], &full[56..60]);
        assert_eq!(&data[4..], &[0; 4]);
        for offset in [60, 4096, u64::MAX - 2, u64::MAX] {
            let mut data = [0xffu8; 8];
            config.read(false, offset, &mut data);
            assert_eq!(data, [0; 8]);
        }
        config.read(false, 0, &mut []);
    }

    #[test]
    fn only_writes_covering_writeback_count() {
        assert_eq!(written_writeback(32, &[1]), Some(true));
        assert_eq!(written_writeback(32, &[0]), Some(false));
        assert_eq!(written_writeback(30, &[0, 0, 1, 0]), Some(true));
        assert_eq!(written_writeback(33, &[1]), None);
        assert_eq!(written_writeback(28, &[1, 1, 1, 1]), None);
        assert_eq!(written_writeback(u64::MAX, &[1]), None);
        assert_eq!(written_writeback(0, &[]), None);
    }
}
