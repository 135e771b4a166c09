//! The feature bits the device offers, and the limits it advertises with them.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vmkit_block_backend::DiskInfo;

/// Data segments one request may carry at most (`seg_max`).
pub const SEG_MAX: u32 = 128;

/// Bytes one data segment may hold at most (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;

/// Sectors one discard or write-zeroes segment may cover at most. Kept so that the byte
/// length (`sectors * 512`) fits in 32 bits, like the kernel's own limit.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;

/// Discard and write-zeroes segments per request (`max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_DISCARD_SEG: u32 = 1;

/// A feature bit as a mask.
pub const fn bit(feature: u32) -> u64 {
    1u64 << feature
}

/// The features a device with `num_queues` queues over a disk described by `info` offers.
///
/// `FLUSH` and `CONFIG_WCE` are always offered: the backend can switch its write cache at run
/// time, so even a disk opened write-through may gain a cache the guest must flush.
pub fn offered_features(info: &DiskInfo, num_queues: u16) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    if info.read_only {
        features |= bit(VIRTIO_BLK_F_RO);
    } else if info.discard {
        features |= bit(VIRTIO_BLK_F_DISCARD);
    }
    if num_queues > 1 {
        features |= bit(VIRTIO_BLK_F_MQ);
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(read_only: bool, discard: bool) -> DiskInfo {
        DiskInfo {
            size: 1 << 20,
            logical_block_size: 512,
            physical_block_size: 4096,
            request_alignment: 1,
            memory_alignment: 1,
            read_only,
            discard,
        }
    }

    #[test]
    fn read_only_disks_offer_ro_and_no_discard() {
        let features = offered_features(&info(true, true), 1);
        assert_ne!(features & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(features & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(features & bit(VIRTIO_BLK_F_MQ), 0);
    }

    #[test]
    fn writable_disks_offer_discard_and_mq_follows_queue_count() {
        let features = offered_features(&info(false, true), 4);
        assert_eq!(features & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(features & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(features & bit(VIRTIO_BLK_F_MQ), 0);
        assert_ne!(features & bit(VIRTIO_F_VERSION_1), 0);
        let no_discard = offered_features(&info(false, false), 1);
        assert_eq!(no_discard & bit(VIRTIO_BLK_F_DISCARD), 0);
    }
}
