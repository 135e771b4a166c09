//! Hostile images whose tables point guest data (or tables) at the image's own metadata: a
//! write must fail before it lands there, the metadata must stay intact, and the image must
//! take no more writes: it is marked corrupt in its header, as QEMU marks it.

mod qemu;
use qemu::serial;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use vmkit_block_backend::qcow2::create;
use vmkit_block_backend::{IoBuf, Qcow2Disk, Qcow2Options, SyncDisk};
use vmm_sys_util::tempdir::TempDir;

const CLUSTER: u64 = 4096;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn be64(file: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn set64(path: &Path, at: u64, value: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&value.to_be_bytes(), at).unwrap();
}

fn write(
    disk: &Qcow2Disk,
    offset: u64,
    byte: u8,
    len: usize,
) -> vmkit_block_backend::Result<usize> {
    let mut data = vec![byte; len];
    disk.write_vectored(offset, &[IoBuf::from_mut_slice(&mut data)])
}

/// Where the metadata of a fresh image is, after writes to guest clusters 0 and 512 (two
/// L2 tables: 4 KiB clusters map 2 MiB per table).
struct Layout {
    l1: u64,
    reftable: u64,
    refblock: u64,
    l2: [u64; 2],
}

fn make(path: &Path) -> Layout {
    create(path, 8 << 20, CLUSTER).unwrap();
    let disk = Qcow2Disk::open(path, &Qcow2Options::default()).unwrap();
    write(&disk, 0, 0x11, CLUSTER as usize).unwrap();
    write(&disk, 2 << 20, 0x22, CLUSTER as usize).unwrap();
    disk.flush().unwrap();
    drop(disk);
    let file = std::fs::File::open(path).unwrap();
    let l1 = be64(&file, 40);
    let reftable = be64(&file, 48);
    Layout {
        l1,
        reftable,
        refblock: be64(&file, reftable),
        l2: [
            be64(&file, l1) & OFFSET_MASK,
            be64(&file, l1 + 8) & OFFSET_MASK,
        ],
    }
}

/// `qemu-img check`'s report, if qemu-img is installed.
fn check(path: &Path) -> Option<String> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path.to_str().unwrap()])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Every metadata cluster, as bytes.
fn metadata_bytes(path: &Path, l: &Layout) -> Vec<Vec<u8>> {
    let file = std::fs::File::open(path).unwrap();
    [0, l.l1, l.reftable, l.refblock, l.l2[0], l.l2[1]]
        .iter()
        .map(|&at| {
            let mut b = vec![0u8; CLUSTER as usize];
            file.read_exact_at(&mut b, at).unwrap();
            b
        })
        .collect()
}

/// The header of an image whose write was refused for overlapping metadata carries the
/// corrupt bit (incompatible feature bit 1), as QEMU sets it, and no other metadata byte
/// changed; read-write opens are refused and read-only ones work. Clears the bit again, so
/// that `qemu-img check` can be compared with its report from before.
fn assert_marked_corrupt_and_unchanged(path: &Path, l: &Layout, before: &[Vec<u8>], what: &str) {
    const CORRUPT: u64 = 1 << 1;
    let mut after = metadata_bytes(path, l);
    let features = u64::from_be_bytes(after[0][72..80].try_into().unwrap());
    assert_eq!(features & CORRUPT, CORRUPT, "{what}: not marked corrupt");
    after[0][72..80].copy_from_slice(&(features & !CORRUPT).to_be_bytes());
    assert!(after == before, "{what}: metadata changed");
    let err = Qcow2Disk::open(path, &Qcow2Options::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("marked corrupt"), "{what}: {err}");
    let mut read_only = Qcow2Options::default();
    read_only.raw.read_only = true;
    Qcow2Disk::open(path, &read_only).unwrap();
    set64(path, 72, features & !CORRUPT);
}

#[test]
fn l2_entries_pointing_at_metadata_fail_writes() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    let probe = make(&dir.as_path().join("probe.qcow2"));
    // Standard entries (COPIED, so writable in place), and a compressed one: cluster 0
    // can only be named by a compressed entry (offset 0 means unallocated otherwise).
    let targets = [
        ("header", COMPRESSED),
        ("L1 table", probe.l1 | COPIED),
        ("refcount table", probe.reftable | COPIED),
        ("refcount block", probe.refblock | COPIED),
        ("L2 table", probe.l2[1] | COPIED),
        ("L1 table", COMPRESSED | probe.l1),
    ];
    for (what, entry) in targets {
        for op in ["write", "partial write", "write zeroes", "discard"] {
            let path = dir.as_path().join(format!("{what}-{entry:x}-{op}.qcow2"));
            let l = make(&path);
            // Guest cluster 0 now claims the metadata cluster as its data.
            set64(&path, l.l2[0], entry);
            let before = metadata_bytes(&path, &l);
            let report = check(&path);

            let mut options = Qcow2Options::default();
            options.raw.discard = true;
            let disk = Qcow2Disk::open(&path, &options).unwrap();
            let result = match op {
                "write" => write(&disk, 0, 0xee, CLUSTER as usize).map(|_| ()),
                "partial write" => write(&disk, 512, 0xee, 512).map(|_| ()),
                "write zeroes" => disk.write_zeroes(0, CLUSTER),
                _ => disk.discard(0, CLUSTER),
            };
            let err = result.expect_err(&format!("{what}, {op}")).to_string();
            assert!(err.contains("overlaps the"), "{what}, {op}: {err}");
            assert!(err.contains(what), "{what}, {op}: {err}");
            // Reading is still fine (it shows the metadata, as QEMU would).
            let mut buf = vec![0u8; 512];
            disk.read_vectored(4 << 20, &[IoBuf::from_mut_slice(&mut buf)])
                .unwrap();
            // Marked corrupt: no more writes, even harmless ones.
            let err = write(&disk, 4 << 20, 0x33, 512).unwrap_err().to_string();
            assert!(err.contains("found corrupt"), "{what}, {op}: {err}");
            drop(disk);

            assert_marked_corrupt_and_unchanged(&path, &l, &before, &format!("{what}, {op}"));
            assert_eq!(check(&path), report, "{what}, {op}");
        }
    }
}

#[test]
fn l1_entries_pointing_at_metadata_fail_writes() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    let probe = make(&dir.as_path().join("probe.qcow2"));
    // (An L1 entry pointing at cluster 0 reads as unallocated.)
    for (what, target) in [
        ("L1 table", probe.l1),
        ("refcount table", probe.reftable),
        ("refcount block", probe.refblock),
    ] {
        let path = dir.as_path().join(format!("{what}.qcow2"));
        let l = make(&path);
        set64(&path, l.l1, target | COPIED);
        let before = metadata_bytes(&path, &l);
        let report = check(&path);
        let disk = Qcow2Disk::open(&path, &Qcow2Options::default()).unwrap();
        let err = write(&disk, 8192, 0xee, 512).unwrap_err().to_string();
        assert!(err.contains("corrupt L1 entry 0"), "{what}: {err}");
        assert!(err.contains(what), "{what}: {err}");
        drop(disk);
        assert_marked_corrupt_and_unchanged(&path, &l, &before, what);
        assert_eq!(check(&path), report, "{what}");
    }
}

#[test]
fn refcount_table_entries_pointing_at_metadata_fail_writes() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("img.qcow2");
    let l = make(&path);
    // The refcount block moves onto the L1 table.
    set64(&path, l.reftable, l.l1);
    let before = metadata_bytes(&path, &l);
    let disk = Qcow2Disk::open(&path, &Qcow2Options::default()).unwrap();
    // A write that allocates a cluster updates a refcount.
    let err = write(&disk, 6 << 20, 0xee, 512).unwrap_err().to_string();
    assert!(err.contains("corrupt refcount table entry 0"), "{err}");
    assert!(err.contains("L1 table"), "{err}");
    drop(disk);
    assert_marked_corrupt_and_unchanged(&path, &l, &before, "refcount table");
}

#[test]
fn good_images_still_take_writes_everywhere() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("img.qcow2");
    make(&path);
    let disk = Qcow2Disk::open(&path, &Qcow2Options::default()).unwrap();
    for i in 0..64u64 {
        write(&disk, i * 131_072 + 100, i as u8, 5000).unwrap();
    }
    disk.write_zeroes(0, 1 << 20).unwrap();
    drop(disk);
    if let Some(report) = check(&path) {
        assert!(report.contains("No errors were found"), "{report}");
    }
}
