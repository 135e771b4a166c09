//! Running QEMU's tools from the qcow2 tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// These tests start qemu-img while others open and close images. A process being
/// started holds copies of the parent's descriptors until it execs, and with them the
/// image locks of a disk that was just closed; so each binary's tests run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held for the whole of a test.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether qemu-img and qemu-io are installed; says SKIPPED otherwise.
pub fn qemu_tools() -> bool {
    let found = Command::new("qemu-img").arg("--version").output().is_ok()
        && Command::new("qemu-io").arg("--version").output().is_ok();
    if !found {
        eprintln!("SKIPPED: qemu-img/qemu-io are not installed");
    }
    found
}

/// Runs a tool, asserts it succeeded, and returns its standard output.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A path as a command-line argument.
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}
