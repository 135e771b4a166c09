//! Dirty page bitmaps read from KVM.

/// The pages of one KVM memory slot that the guest wrote since the previous read.
///
/// Bit `i` of the bitmap (bit `i % 64` of word `i / 64`) stands for the page at
/// `guest_start + i * page_size`. KVM only logs writes made by the guest (vCPUs); writes the
/// VMM makes through its own mapping do not show here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The KVM slot the bitmap belongs to.
    pub slot: u32,
    /// Guest-physical address of the slot's first page.
    pub guest_start: u64,
    /// Bytes per bit (4096).
    pub page_size: u64,
    /// The bitmap, one bit per page, as KVM returned it.
    pub bits: Vec<u64>,
}

impl DirtyBitmap {
    /// The guest-physical addresses of the dirty pages, ascending.
    pub fn dirty_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits
            .iter()
            .enumerate()
            .flat_map(move |(word_idx, &word)| {
                let mut w = word;
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let bit = w.trailing_zeros() as u64;
                    w &= w - 1;
                    Some(word_idx as u64 * 64 + bit)
                })
            })
            .map(move |page| self.guest_start + page * self.page_size)
    }

    /// The number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterates_set_bits() {
        let b = DirtyBitmap {
            slot: 0,
            guest_start: 0x1_0000_0000,
            page_size: 4096,
            bits: vec![0b1001, 0, 1 << 63],
        };
        let pages: Vec<u64> = b.dirty_pages().collect();
        assert_eq!(
            pages,
            vec![
                0x1_0000_0000,
                0x1_0000_3000,
                0x1_0000_0000 + (2 * 64 + 63) * 4096
            ]
        );
        assert_eq!(b.count(), 3);
        assert!(!b.is_clean());
        let clean = DirtyBitmap {
            bits: vec![0; 4],
            ..b
        };
        assert!(clean.is_clean());
        assert_eq!(clean.dirty_pages().count(), 0);
    }
}
