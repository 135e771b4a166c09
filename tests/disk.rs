//! The example VM with `--disk`: the built-in guest's virtio-blk checks pass, and the host then
//! finds the guest's writes in the image.

mod common;
use common::{kvm_available, vm};

use std::path::{Path, PathBuf};
use std::process::Command;

const SECTOR: u64 = 512;
/// The guest writes the pattern to sectors 0..64, discards 64..128 and write-zeroes 128..192.
const REGION: u64 = 64 * SECTOR;
const IMAGE_SIZE: usize = 1 << 20;
/// What the images hold before the guest runs, so that zeroes written by the guest show.
const FILL: u8 = 0x77;

/// The guest's pattern byte at byte `offset` of virtio-blk disk `disk` (guest/src/virtio_blk).
fn pattern(disk: u32, offset: u64) -> u8 {
    ((offset % 251) as u8) ^ ((offset >> 9) as u8).wrapping_mul(3) ^ (disk as u8).wrapping_mul(0x41)
}

/// A fresh image of [`IMAGE_SIZE`] bytes of [`FILL`] on a real filesystem (O_DIRECT works).
fn image(name: &str) -> PathBuf {
    let path = common::scratch("disk-tests", &format!("{name}.img"));
    std::fs::write(&path, vec![FILL; IMAGE_SIZE]).unwrap();
    path
}

/// Runs the VM and checks it succeeded; returns its standard output.
fn run_ok(args: &[&str]) -> String {
    let output = vm(args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.ends_with("all tests passed\n"), "{stdout}");
    stdout
}

/// The image after a writable disk's checks: pattern, zeroes, zeroes, untouched.
fn assert_checked_image(path: &Path, disk: u32) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(data.len(), IMAGE_SIZE);
    for (offset, &byte) in data.iter().enumerate() {
        let offset = offset as u64;
        let expected = match offset {
            o if o < REGION => pattern(disk, o),
            o if o < 3 * REGION => 0,
            _ => FILL,
        };
        assert_eq!(
            byte,
            expected,
            "{}: byte {offset} (sector {})",
            path.display(),
            offset / SECTOR
        );
    }
}

fn assert_writable_disk_lines(stdout: &str, disk: u32) {
    for line in [
        format!("virtio-blk {disk}: 2048 sectors (1024 KiB)"),
        format!("virtio-blk {disk}: pattern write/flush/read OK (64 sectors"),
        format!("virtio-blk {disk}: discard OK (sectors 64..128 read back as zeroes)"),
        format!("virtio-blk {disk}: write-zeroes OK (sectors 128..192 read back as zeroes)"),
    ] {
        assert!(stdout.contains(&line), "{line:?} in {stdout}");
    }
}

#[test]
fn writable_disk_with_each_engine_and_cache_mode() {
    if !kvm_available() {
        return;
    }
    for engine in ["sync", "io_uring"] {
        for cache in ["none", "writeback"] {
            let path = image(&format!("rw-{engine}-{cache}"));
            let disk = format!("path={},engine={engine},cache={cache}", path.display());
            let stdout = run_ok(&["--disk", &disk]);
            assert_writable_disk_lines(&stdout, 0);
            assert!(stdout.contains("virtio-blk 0: GET_ID \"\" OK"), "{stdout}");
            assert_checked_image(&path, 0);
        }
    }
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    if !kvm_available() {
        return;
    }
    let path = image("ro");
    let before = std::fs::read(&path).unwrap();
    let disk = format!("path={},readonly=on", path.display());
    let stdout = run_ok(&["--disk", &disk]);
    assert!(stdout.contains("read-only, write cache"), "{stdout}");
    assert!(
        stdout.contains(
            "virtio-blk 0: read-only: write and write-zeroes refused with IOERR, data unchanged (64 sectors)"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("pattern write"), "{stdout}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn serial_is_the_get_id_answer_on_every_queue() {
    if !kvm_available() {
        return;
    }
    let path = image("serial-queues");
    let disk = format!("path={},serial=vmkit0,queues=2", path.display());
    let stdout = run_ok(&["--disk", &disk]);
    assert!(stdout.contains("2 of 2 queues"), "{stdout}");
    assert!(
        stdout.contains("virtio-blk 0: GET_ID \"vmkit0\" OK (on 2 queues)"),
        "{stdout}"
    );
    assert!(stdout.contains("4 reads, 2 queues)"), "{stdout}");
    assert_checked_image(&path, 0);
}

#[test]
fn two_disks_at_once() {
    if !kvm_available() {
        return;
    }
    let first = image("two-0");
    let second = image("two-1");
    let stdout = run_ok(&[
        "--cpus",
        "2",
        "--disk",
        &format!("path={},serial=first", first.display()),
        "--disk",
        &format!(
            "path={},serial=second,engine=sync,queues=3",
            second.display()
        ),
    ]);
    assert_writable_disk_lines(&stdout, 0);
    assert_writable_disk_lines(&stdout, 1);
    assert!(stdout.contains("virtio-blk 1: GET_ID \"second\" OK (on 3 queues)"));
    assert_checked_image(&first, 0);
    assert_checked_image(&second, 1);
}

#[test]
fn a_wrong_id_fails_the_guest_with_its_disk_status() {
    if !kvm_available() {
        return;
    }
    // serial0= in the arguments tells the guest which ID to expect; the disk has none.
    let path = image("wrong-id");
    let output = vm(&[
        "--disk",
        &format!("path={}", path.display()),
        "--args",
        "serial0=expected",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(6), "{stdout}");
    assert!(
        stdout.contains("error: virtio-blk 0: GET_ID on queue 0 gave \"\\x00"),
        "{stdout}"
    );
    assert!(stdout.contains("expected \"expected\""), "{stdout}");
}

#[test]
fn bad_disk_options_are_clear_errors_without_a_panic() {
    let path = image("bad-options");
    let path = path.display().to_string();
    let qcow2 = format!("path={path},format=qcow2");
    let with_path = |rest: &str| format!("path={path},{rest}");
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (vec!["--disk".into()], 2, "--disk needs a value"),
        (
            vec!["--disk".into(), "readonly=on".into()],
            2,
            "path=FILE is required",
        ),
        (
            vec!["--disk".into(), with_path("size=1G")],
            2,
            "unknown key 'size'",
        ),
        (
            vec!["--disk".into(), with_path("cache=fast")],
            2,
            "unknown cache mode \"fast\"",
        ),
        (
            vec!["--disk".into(), with_path("engine=aio")],
            2,
            "unknown engine \"aio\"",
        ),
        (
            vec!["--disk".into(), with_path("queues=0")],
            2,
            "queues=0: expected a number",
        ),
        (
            vec!["--disk".into(), with_path("readonly=1")],
            2,
            "expected on or off",
        ),
        (
            vec!["--disk".into(), with_path("serial=a b")],
            2,
            "serial=a b",
        ),
        (
            vec!["--transport".into(), "usb".into()],
            2,
            "not one of mmio, pci",
        ),
        (
            vec!["--disk".into(), qcow2],
            1,
            "not a qcow2 image: magic is 0x77777777",
        ),
        (
            vec!["--disk".into(), "path=/nonexistent/disk.img".into()],
            1,
            "cannot open /nonexistent/disk.img",
        ),
    ];
    for (args, code, expected) in cases {
        if code == 1 && !kvm_available() {
            continue;
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = vm(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn disks_over_virtio_pci() {
    if !kvm_available() {
        return;
    }
    let writable = image("pci-rw");
    let read_only = image("pci-ro");
    let before = std::fs::read(&read_only).unwrap();
    let first = format!(
        "path={},serial=pci0,queues=2,cache=none",
        writable.display()
    );
    let second = format!("path={},readonly=on", read_only.display());
    let stdout = run_ok(&["--transport", "pci", "--disk", &first, "--disk", &second]);
    // The guest found both functions by enumerating the PCI bus, in slot order.
    for disk in 0..2 {
        let probe = stdout
            .lines()
            .find(|l| l.starts_with(&format!("virtio-blk {disk}: 2048 sectors")))
            .unwrap_or_else(|| panic!("disk {disk} probed in {stdout}"));
        assert!(probe.ends_with(", virtio-pci"), "{probe}");
    }
    assert_writable_disk_lines(&stdout, 0);
    assert!(
        stdout.contains("virtio-blk 0: GET_ID \"pci0\" OK (on 2 queues)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("virtio-blk 1: read-only: write and write-zeroes refused with IOERR"),
        "{stdout}"
    );
    assert_checked_image(&writable, 0);
    assert_eq!(std::fs::read(&read_only).unwrap(), before);
}

#[test]
fn qcow2_disk() {
    if !kvm_available() {
        return;
    }
    use vmkit_block_backend::{open_sync, Format, IoBuf, OpenOptions};
    let path = common::scratch("disk-tests", "guest.qcow2");
    let _ = std::fs::remove_file(&path);
    vmkit_block_backend::qcow2::create(&path, IMAGE_SIZE as u64, 65536).unwrap();
    let disk = format!("path={},format=qcow2,serial=qcow", path.display());
    let stdout = run_ok(&["--disk", &disk]);
    assert_writable_disk_lines(&stdout, 0);

    // The guest's writes are in the image: the pattern, then zeroes over a fresh image.
    let image = open_sync(
        &path,
        &OpenOptions::new().format(Format::Qcow2).read_only(true),
    )
    .unwrap();
    let mut data = vec![0u8; IMAGE_SIZE];
    image
        .read_vectored(0, &[IoBuf::from_mut_slice(&mut data)])
        .unwrap();
    for (offset, &byte) in data.iter().enumerate() {
        let offset = offset as u64;
        let expected = if offset < REGION {
            pattern(0, offset)
        } else {
            0
        };
        assert_eq!(byte, expected, "byte {offset}");
    }
    drop(image);
    // QEMU agrees the image is consistent.
    if let Ok(output) = Command::new("qemu-img").arg("check").arg(&path).output() {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}
