//! qcow2 images with the `O_DIRECT` cache modes (none, directsync): unaligned guest requests
//! and metadata updates are bounced through aligned buffers, and the image stays clean.

mod qemu;
use qemu::{qemu_tools, run, serial};

use std::path::Path;

use vmkit_block_backend::qcow2::create;
use vmkit_block_backend::{CacheMode, IoBuf, Qcow2Disk, Qcow2Options, RawOptions, SyncDisk};
use vmm_sys_util::tempdir::TempDir;

fn options(cache: CacheMode) -> Qcow2Options {
    Qcow2Options {
        raw: RawOptions {
            cache,
            discard: true,
            ..RawOptions::default()
        },
        ..Qcow2Options::default()
    }
}

/// Pseudo-random writes, write-zeroes and discards, aligned and not, each read back.
fn exercise(disk: &dyn SyncDisk, mirror: &mut [u8], seed: u64, ops: usize) {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let size = mirror.len() as u64;
    for i in 0..ops {
        let len = match next() % 4 {
            0 => next() % 700 + 1,
            1 => (next() % 16 + 1) * 4096,
            2 => next() % 200_000 + 1,
            _ => 65536,
        }
        .min(size);
        let offset = match next() % 2 {
            0 => next() % (size - len + 1) / 4096 * 4096,
            _ => next() % (size - len + 1),
        };
        let range = offset as usize..(offset + len) as usize;
        match next() % 8 {
            0 => {
                disk.write_zeroes(offset, len).unwrap();
                mirror[range.clone()].fill(0);
            }
            1 => {
                disk.discard(offset, len).unwrap();
                mirror[range.clone()].fill(0);
            }
            _ => {
                let byte = (i as u8).wrapping_mul(29).wrapping_add(3);
                let mut data: Vec<u8> = (0..len).map(|j| byte ^ (j as u8)).collect();
                mirror[range.clone()].copy_from_slice(&data);
                disk.write_vectored(offset, &[IoBuf::from_mut_slice(&mut data)])
                    .unwrap();
            }
        }
        // Read back at an odd offset into the buffer (unaligned memory).
        let mut back = vec![0u8; len as usize + 1];
        disk.read_vectored(offset, &[IoBuf::from_mut_slice(&mut back[1..])])
            .unwrap();
        assert!(back[1..] == mirror[range], "op {i}: read back differs");
    }
}

fn round_trip(cache: CacheMode, cluster_size: u64) {
    let dir = TempDir::new().unwrap();
    let image = dir.as_path().join("img.qcow2");
    let size = 6u64 << 20;
    create(&image, size, cluster_size).unwrap();
    let mut mirror = vec![0u8; size as usize];
    {
        let disk = Qcow2Disk::open(&image, &options(cache)).unwrap();
        assert!(disk.stats().bounced_requests == 0 || cache.direct());
        exercise(&disk, &mut mirror, cluster_size ^ cache as u64, 300);
        disk.flush().unwrap();
    }
    // Reopened, everything reads back.
    {
        let disk = Qcow2Disk::open(&image, &options(cache)).unwrap();
        let mut all = vec![0u8; size as usize];
        disk.read_vectored(0, &[IoBuf::from_mut_slice(&mut all)])
            .unwrap();
        assert!(all == mirror, "{cache:?}: content differs after reopening");
    }
    if qemu_tools() {
        let out = run(
            "qemu-img",
            &["check", "-f", "qcow2", image.to_str().unwrap()],
        );
        assert!(out.contains("No errors were found"), "{out}");
        let raw = dir.as_path().join("mirror.raw");
        std::fs::write(&raw, &mirror).unwrap();
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                image.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
    }
}

fn direct_io_works(dir: &Path) -> bool {
    let probe = dir.join("probe");
    std::fs::write(&probe, [0u8; 4096]).unwrap();
    let ok = vmkit_block_backend::RawDisk::open(
        &probe,
        RawOptions {
            cache: CacheMode::None,
            ..RawOptions::default()
        },
    )
    .is_ok();
    if !ok {
        eprintln!("SKIPPED: the temporary directory does not support O_DIRECT");
    }
    ok
}

#[test]
fn cache_none_round_trips() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    if !direct_io_works(dir.as_path()) {
        return;
    }
    round_trip(CacheMode::None, 65536);
    round_trip(CacheMode::None, 512);
}

#[test]
fn cache_directsync_round_trips() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    if !direct_io_works(dir.as_path()) {
        return;
    }
    round_trip(CacheMode::DirectSync, 65536);
    round_trip(CacheMode::DirectSync, 4096);
}

#[test]
fn qemu_images_with_compressed_clusters_read_with_cache_none() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    if !qemu_tools() || !direct_io_works(dir.as_path()) {
        return;
    }
    let raw = dir.as_path().join("src.raw");
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i / 1000) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let image = dir.as_path().join("img.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
    let disk = Qcow2Disk::open(&image, &options(CacheMode::None)).unwrap();
    let mut back = vec![0u8; data.len() + 7];
    disk.read_vectored(0, &[IoBuf::from_mut_slice(&mut back[7..])])
        .unwrap();
    assert!(back[7..] == data[..]);
    // A copy on write out of a compressed cluster.
    let mut patch = vec![0xabu8; 1000];
    disk.write_vectored(70_000, &[IoBuf::from_mut_slice(&mut patch)])
        .unwrap();
    drop(disk);
    let out = run(
        "qemu-img",
        &["check", "-f", "qcow2", image.to_str().unwrap()],
    );
    assert!(out.contains("No errors were found"), "{out}");
}
