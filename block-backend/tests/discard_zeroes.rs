//! Discard punches holes in the image; write-zeroes reads back as zeroes.

mod common;

use common::*;
use vmkit_block_backend::{open, CacheMode, Error, OpenOptions, Request};

const MIB: u64 = 1 << 20;

#[test]
fn discard_punches_holes() {
    let dir = scratch_dir();
    for (mode, engine) in every_mode_and_engine() {
        let path = patterned_image(
            &dir,
            &format!("discard-{mode}-{engine}.img"),
            4 * MIB as usize,
        );
        let mut disk = open(&path, &OpenOptions::new().cache(mode).engine(engine)).unwrap();
        run_one(disk.as_mut(), Request::Flush).unwrap();
        let before = allocated_bytes(&path);
        assert!(before >= 4 * MIB, "the image starts fully allocated");

        run_one(
            disk.as_mut(),
            Request::Discard {
                offset: MIB,
                len: 2 * MIB,
            },
        )
        .unwrap();
        let after = allocated_bytes(&path);
        // Splitting an extent may cost the filesystem a metadata block or two.
        assert!(
            after + 2 * MIB - (64 << 10) <= before,
            "{mode}/{engine}: st_blocks {before} -> {after}"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4 * MIB,
            "the size is kept"
        );
        assert!(read(disk.as_mut(), MIB, 4096).iter().all(|&b| b == 0));
        // Data around the hole is intact.
        assert_eq!(
            read(disk.as_mut(), MIB - 4096, 4096),
            pattern(MIB - 4096, 4096, 0)
        );
        assert_eq!(
            read(disk.as_mut(), 3 * MIB, 4096),
            pattern(3 * MIB, 4096, 0)
        );
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn discard_can_be_turned_off() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "no-discard.img", MIB as usize);
    for engine in ENGINES {
        let mut disk = open(&path, &OpenOptions::new().engine(engine).discard(false)).unwrap();
        // SAFETY: the push fails; no buffers are involved.
        let err = unsafe {
            disk.push(
                1,
                Request::Discard {
                    offset: 0,
                    len: 4096,
                },
            )
        }
        .unwrap_err();
        assert!(matches!(err, Error::DiscardDisabled), "{err}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), pattern(0, MIB as usize, 0));
}

#[test]
fn write_zeroes_reads_back_zeroes() {
    let dir = scratch_dir();
    for (mode, engine) in every_mode_and_engine() {
        let path = patterned_image(
            &dir,
            &format!("zeroes-{mode}-{engine}.img"),
            4 * MIB as usize,
        );
        let mut disk = open(&path, &OpenOptions::new().cache(mode).engine(engine)).unwrap();
        // Aligned, and unaligned at both ends.
        for (offset, len) in [(MIB, MIB), (3 * MIB + 100, 5000)] {
            run_one(disk.as_mut(), Request::WriteZeroes { offset, len }).unwrap();
            let data = read(disk.as_mut(), offset - 512, len as usize + 1024);
            assert_eq!(
                &data[..512],
                &pattern(offset - 512, 512, 0)[..],
                "{mode}/{engine}"
            );
            assert!(
                data[512..512 + len as usize].iter().all(|&b| b == 0),
                "{mode}/{engine}"
            );
            let end = offset + len;
            assert_eq!(
                &data[512 + len as usize..],
                &pattern(end, 512, 0)[..],
                "{mode}/{engine}"
            );
        }
        drop(disk);
        let file = std::fs::read(&path).unwrap();
        assert!(file[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn write_zeroes_in_writethrough_is_durable() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "zeroes-wt.img", MIB as usize);
    let mut disk = open(&path, &OpenOptions::new().cache(CacheMode::Writethrough)).unwrap();
    let before = disk.sync_disk().stats().fdatasyncs;
    run_one(
        disk.as_mut(),
        Request::WriteZeroes {
            offset: 0,
            len: 65536,
        },
    )
    .unwrap();
    run_one(
        disk.as_mut(),
        Request::Discard {
            offset: 65536,
            len: 65536,
        },
    )
    .unwrap();
    assert_eq!(disk.sync_disk().stats().fdatasyncs, before + 2);
}
