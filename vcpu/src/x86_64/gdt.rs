//! Segment descriptors: the GDT entries written to guest memory and the matching `kvm_segment`
//! values loaded into the vCPU's hidden segment state.

use kvm_bindings::kvm_segment;

/// 64-bit code segment, DPL 0.
pub const CODE64_KERNEL: u16 = 0xa09b;
/// Data segment, DPL 0.
pub const DATA_KERNEL: u16 = 0xc093;
/// 64-bit code segment, DPL 3.
pub const CODE64_USER: u16 = 0xa0fb;
/// Data segment, DPL 3.
pub const DATA_USER: u16 = 0xc0f3;
/// Available-then-busy 64-bit TSS (type 0xb), present.
pub const TSS64_BUSY: u16 = 0x008b;

/// Encodes an 8-byte descriptor from its access/flags word (as in the Intel SDM layout, flags in
/// bits 12-15, access byte in bits 0-7), base and 20-bit limit.
pub fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// The `kvm_segment` matching a descriptor, for selector `selector`.
pub fn kvm_segment_for(descriptor: u64, selector: u16) -> kvm_segment {
    let base = ((descriptor >> 16) & 0x00ff_ffff) | ((descriptor >> 32) & 0xff00_0000);
    let raw_limit = ((descriptor >> 32) & 0x000f_0000) | (descriptor & 0xffff);
    let granular = (descriptor >> 55) & 1 == 1;
    // KVM wants the limit in bytes: with 4 KiB granularity the low 12 bits are all ones.
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((descriptor >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_flat_segments_like_the_sdm() {
        // Well-known encodings: Linux's __KERNEL_CS and __USER_CS (64-bit).
        assert_eq!(descriptor(CODE64_KERNEL, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(CODE64_USER, 0, 0xfffff), 0x00af_fb00_0000_ffff);
        assert_eq!(descriptor(DATA_USER, 0, 0xfffff), 0x00cf_f300_0000_ffff);
    }

    #[test]
    fn decodes_back_into_kvm_segments() {
        let cs = kvm_segment_for(descriptor(CODE64_USER, 0, 0xfffff), 0x23);
        assert_eq!(
            (cs.type_, cs.present, cs.dpl, cs.s, cs.l, cs.db, cs.g),
            (0xb, 1, 3, 1, 1, 0, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 0x23));

        let tss = kvm_segment_for(descriptor(TSS64_BUSY, 0x2000, 0x67), 0x28);
        assert_eq!((tss.type_, tss.present, tss.s, tss.g), (0xb, 1, 0, 0));
        assert_eq!((tss.base, tss.limit), (0x2000, 0x67));

        let base = kvm_segment_for(descriptor(DATA_KERNEL, 0x1234_5678, 0xfffff), 0x18);
        assert_eq!(base.base, 0x1234_5678);
    }
}
