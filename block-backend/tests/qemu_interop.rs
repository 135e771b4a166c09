//! vmkit and QEMU side by side on one image: the same open flags for every cache mode,
//! and image locks that each honours. These tests start QEMU's tools, so they live in their
//! own test binary: a fork in one test would otherwise hold another test's image open (and
//! locked) for a moment.

mod common;

use std::os::unix::io::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use vmkit_block_backend::{CacheMode, Error};

/// Serialises this file's tests (see the module comment).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn qemu_tools_installed() -> bool {
    let found = Command::new("qemu-img").arg("--version").output().is_ok()
        && Command::new("qemu-io").arg("--version").output().is_ok();
    if !found {
        eprintln!(
            "SKIPPED: qemu-img/qemu-io are not installed (scripts/test.sh installs qemu-utils)"
        );
    }
    found
}

/// The flags QEMU opens the image with for a cache mode, read from its /proc fdinfo.
fn qemu_open_flags(path: &std::path::Path, mode: CacheMode) -> Option<i32> {
    let mut child = Command::new("qemu-io")
        .args(["-f", "raw", "-t", mode.name(), "-c", "sleep 3000"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut flags = None;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        let Ok(entries) = std::fs::read_dir(format!("/proc/{}/fd", child.id())) else {
            continue;
        };
        for entry in entries.flatten() {
            if std::fs::read_link(entry.path()).ok().as_deref() == Some(path) {
                let fd: i32 = entry.file_name().to_string_lossy().parse().ok()?;
                let text =
                    std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", child.id())).ok()?;
                let line = text.lines().find(|l| l.starts_with("flags:"))?;
                flags = i32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok();
            }
        }
        if flags.is_some() {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    flags
}

#[test]
fn open_flags_match_a_running_qemu() {
    let _serial = serial();
    if !qemu_tools_installed() {
        return;
    }
    let dir = scratch_dir();
    let path = patterned_image(&dir, "qemu-flags.img", 1 << 20);
    for mode in CacheMode::ALL {
        let qemu = qemu_open_flags(&path, mode).expect("qemu-io opened the image");
        let ours = fd_flags(open_raw(&path, mode, false).unwrap().file().as_raw_fd());
        assert_eq!(
            ours & CACHE_FLAGS,
            qemu & CACHE_FLAGS,
            "{mode}: ours {ours:o}, QEMU's {qemu:o}"
        );
    }
}

/// Starts a QEMU writer on the image (qemu-img bench writing in a loop) and waits until it
/// holds its locks. The caller kills and waits for it.
#[allow(clippy::zombie_processes)]
fn start_qemu_writer(path: &std::path::Path) -> Child {
    let child = Command::new("qemu-img")
        .args([
            "bench",
            "-w",
            "-f",
            "raw",
            "-t",
            "writeback",
            "-d",
            "1",
            "-c",
            "1000000000",
        ])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-img starts");
    // Its lock on byte 101 ("write" held) shows in /proc/locks once it runs.
    for _ in 0..200 {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(path).unwrap().ino();
        if locks
            .lines()
            .any(|l| l.contains(&format!(":{inode} ")) && l.contains(" 100 101"))
        {
            return child;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("qemu-img bench did not lock the image");
}

#[test]
fn qemu_and_vmkit_refuse_each_others_second_writer() {
    let _serial = serial();
    if !qemu_tools_installed() {
        return;
    }
    let dir = scratch_dir();
    let path = patterned_image(&dir, "shared.img", 1 << 20);

    // vmkit writes: QEMU's writer is refused with its own locking message.
    let ours = open_raw(&path, CacheMode::Writeback, false).unwrap();
    let qemu = Command::new("qemu-img")
        .args(["bench", "-w", "-f", "raw", "-c", "1"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&qemu.stderr);
    assert!(!qemu.status.success(), "QEMU wrote an image vmkit holds");
    assert!(stderr.contains("lock"), "{stderr}");
    drop(ours);

    // QEMU writes: vmkit's writer and reader are refused, naming the permission.
    let mut qemu = start_qemu_writer(&path);
    let err = open_raw(&path, CacheMode::Writeback, false).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Locked {
                permission: "write",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("in use"), "{err}");
    assert!(open_raw(&path, CacheMode::None, true).is_err());
    let _ = qemu.kill();
    let _ = qemu.wait();

    // Once QEMU is gone, the image is free again.
    open_raw(&path, CacheMode::Writeback, false).unwrap();
}
