//! Hostile and damaged qcow2 images: clear errors, never a panic, bounded allocation.

mod qemu;
use qemu::{p, qemu_tools, run, serial};

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmkit_block_backend::qcow2::Qcow2Error;
use vmkit_block_backend::{Backing, Error, IoBuf, Qcow2Disk, Qcow2Options, RawOptions, SyncDisk};
use vmm_sys_util::tempdir::TempDir;

fn options(read_only: bool, backing: Backing) -> Qcow2Options {
    Qcow2Options {
        raw: RawOptions {
            read_only,
            locking: false,
            ..RawOptions::default()
        },
        backing,
    }
}

fn open(image: &Path, backing: Backing) -> Result<Qcow2Disk, Error> {
    Qcow2Disk::open(image, &options(true, backing))
}

fn qcow2_error(result: Result<Qcow2Disk, Error>) -> Qcow2Error {
    match result {
        Err(Error::Qcow2 { source, .. }) => source,
        Err(other) => panic!("not a qcow2 error: {other}"),
        Ok(_) => panic!("a bad image was opened"),
    }
}

/// A small image with data, made by QEMU: 512-byte clusters, so that the metadata spans
/// many clusters.
fn small_image(dir: &Path, name: &str) -> PathBuf {
    image_with_clusters(dir, name, 512)
}

fn image_with_clusters(dir: &Path, name: &str, cluster_size: u32) -> PathBuf {
    let image = dir.join(name);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster_size}"),
            p(&image),
            "1M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 8k",
            "-c",
            "write -z 64k 4k",
            "-c",
            "write -P 0xcd 200k 1k",
            p(&image),
        ],
    );
    image
}

fn be64_at(file: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

fn put(file: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Reads the whole disk; the first error ends the read.
fn read_everything(disk: &dyn SyncDisk) -> Result<(), Error> {
    // Damaged sizes can be huge: the first 4 MiB show enough.
    let size = disk.info().size.min(4 << 20);
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0;
    while pos < size {
        let len = (size - pos).min(buf.len() as u64) as usize;
        disk.read_vectored(pos, &[IoBuf::from_mut_slice(&mut buf[..len])])?;
        pos += len as u64;
    }
    Ok(())
}

#[test]
fn truncated_and_foreign_files_are_refused() {
    let _serial = serial();
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-bad").unwrap();
    let image = dir.as_path().join("short");
    std::fs::write(&image, b"QFI\xfb\0\0\0\x03").unwrap();
    assert!(matches!(
        qcow2_error(open(&image, Backing::None)),
        Qcow2Error::TruncatedHeader { .. }
    ));
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    assert!(matches!(
        qcow2_error(open(&image, Backing::None)),
        Qcow2Error::BadMagic(0)
    ));
    // A header alone, whose tables lie past the end of the file.
    let mut header =
        vmkit_block_backend::qcow2::header::encode_v3(16, 1 << 30, 16, 0x30000, 0x10000, 1, 0, 4);
    header.resize(4096, 0);
    std::fs::write(&image, &header).unwrap();
    let err = qcow2_error(open(&image, Backing::None)).to_string();
    assert!(
        err.contains("l1_table_offset") && err.contains("past the end"),
        "{err}"
    );
}

#[test]
fn corrupt_table_entries_are_errors_at_read_time() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-bad").unwrap();
    let dir = dir.as_path();
    let image = image_with_clusters(dir, "a.qcow2", 4096);
    let l1_offset = be64_at(&image, 40);
    let l1_entry = be64_at(&image, l1_offset);
    let l2_offset = l1_entry & 0x00ff_ffff_ffff_fe00;

    for (at, value, what) in [
        (
            l1_offset,
            (1u64 << 63) | 0x00ff_0000_0000_0000,
            "L2 table past the end",
        ),
        (
            l1_offset,
            (1u64 << 63) | (l2_offset + 0x200),
            "unaligned L2 table offset",
        ),
        (l2_offset, (1u64 << 63) | 0x10_0000, "past the end"),
        (
            l2_offset,
            (1u64 << 63) | 0x1_0000_0200,
            "unaligned data cluster offset",
        ),
        (l2_offset, (1u64 << 62) | 0x3000, "compressed cluster"),
    ] {
        let copy = dir.join("corrupt.qcow2");
        std::fs::copy(&image, &copy).unwrap();
        put(&copy, at, &value.to_be_bytes());
        let disk = open(&copy, Backing::None).unwrap();
        let result = read_everything(&disk);
        if what == "past the end" {
            // A data cluster past the end of the file reads as zeroes, as QEMU reads it.
            result.unwrap();
            continue;
        }
        let err = result.unwrap_err().to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
}

#[test]
fn bad_backing_chains_are_refused() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-bad").unwrap();
    let dir = dir.as_path();
    let a = small_image(dir, "a.qcow2");
    let b = dir.join("b.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            p(&b),
        ],
    );
    // a -> b -> a.
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            p(&a),
        ],
    );
    assert!(matches!(
        qcow2_error(open(&b, Backing::FromImage)),
        Qcow2Error::BackingLoop { .. }
    ));

    // A chain of 20 images, deeper than the limit.
    let mut prev = small_image(dir, "c0.qcow2");
    for i in 1..20 {
        let next = dir.join(format!("c{i}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                p(&prev),
                "-F",
                "qcow2",
                p(&next),
            ],
        );
        prev = next;
    }
    assert!(matches!(
        qcow2_error(open(&prev, Backing::FromImage)),
        Qcow2Error::BackingChainTooDeep { max: 16 }
    ));

    // No backing format extension: the format is never probed.
    let c1 = dir.join("c1.qcow2");
    let header = std::fs::read(&c1).unwrap();
    let at = header
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    put(&c1, at as u64, &0x1234_5678u32.to_be_bytes());
    assert!(matches!(
        qcow2_error(open(&c1, Backing::FromImage)),
        Qcow2Error::BackingFormatMissing { .. }
    ));
}

#[test]
fn corrupt_and_dirty_images_open_read_only_only() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-bad").unwrap();
    let image = small_image(dir.as_path(), "a.qcow2");
    for bit in [1u64, 2] {
        put(&image, 72, &bit.to_be_bytes());
        assert!(matches!(
            qcow2_error(Qcow2Disk::open(&image, &options(false, Backing::None))),
            Qcow2Error::NotWritable(_)
        ));
        read_everything(&open(&image, Backing::None).unwrap()).unwrap();
    }
}

/// Random damage to the metadata of a real image: every open and read either works or
/// fails with an error, never panics.
#[test]
fn random_metadata_damage_never_panics() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-bad").unwrap();
    let dir = dir.as_path();
    let image = small_image(dir, "a.qcow2");
    let compressed = dir.join("c.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096,compression_type=zstd",
            p(&image),
            p(&compressed),
        ],
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for source in [&image, &compressed] {
        let original = std::fs::read(source).unwrap();
        // The metadata lies in the first clusters of these small images.
        let span = original.len().min(16 << 10);
        for _ in 0..300 {
            let mut bytes = original.clone();
            for _ in 0..(1 + next() % 8) {
                let at = (next() % span as u64) as usize;
                bytes[at] = next() as u8;
            }
            let damaged = dir.join("damaged.qcow2");
            std::fs::write(&damaged, &bytes).unwrap();
            if let Ok(disk) = open(&damaged, Backing::None) {
                let _ = read_everything(&disk);
            }
            // Writes too: errors, no panic, and the file grows by a bounded amount.
            let mut write_options = options(false, Backing::None);
            write_options.raw.cache = vmkit_block_backend::CacheMode::Unsafe;
            if let Ok(disk) = Qcow2Disk::open(&damaged, &write_options) {
                let mut data = vec![0x5au8; 9000];
                for offset in [0u64, 70_000, 500_000] {
                    let _ = disk.write_vectored(offset, &[IoBuf::from_mut_slice(&mut data)]);
                    let _ = disk.write_zeroes(offset + 4096, 8192);
                }
                let _ = read_everything(&disk);
                drop(disk);
                let grown = std::fs::metadata(&damaged).unwrap().len();
                assert!(grown < bytes.len() as u64 + (16 << 20), "{grown}");
            }
        }
    }
}
