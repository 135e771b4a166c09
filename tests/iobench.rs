//! The built-in guest's `iobench=` mode through the example VM: it reports its IOPS, leaves a
//! disk it only reads untouched (no disk checks run), writes only when asked, and refuses to
//! write a read-only disk.

mod common;
use common::{kvm_available, vm};

use std::path::PathBuf;

const IMAGE_SIZE: usize = 1 << 20;
const FILL: u8 = 0x77;

fn image(name: &str) -> PathBuf {
    let path = common::scratch("iobench-tests", &format!("{name}.img"));
    std::fs::write(&path, vec![FILL; IMAGE_SIZE]).unwrap();
    path
}

/// Runs the VM on `disk` with `args`; returns its exit code and standard output.
fn run(disk: &str, args: &str) -> (Option<i32>, String) {
    let output = vm(&["--disk", disk, "--args", args]);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The IOPS line's request count, checked for the exact format the script parses.
fn requests(stdout: &str, op: &str, depth: u32) -> u64 {
    let prefix = format!("iobench: {op} depth {depth}: ");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line: {stdout}"));
    let (count, rest) = line.split_once(" requests in ").expect(line);
    let (seconds, iops) = rest.split_once(" s = ").expect(line);
    assert!(seconds.split_once('.').is_some(), "{line}");
    let iops = iops.strip_suffix(" IOPS").expect(line);
    assert!(iops.parse::<u64>().unwrap() > 0, "{line}");
    count.parse().unwrap()
}

#[test]
fn randread_counts_its_requests_and_leaves_the_disk_untouched() {
    if !kvm_available() {
        return;
    }
    let path = image("randread");
    let disk = format!("path={},cache=none", path.display());
    let (code, stdout) = run(&disk, "iobench=randread depth=8 count=2000");
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(requests(&stdout, "randread", 8), 2000, "{stdout}");
    assert!(!stdout.contains("pattern write"), "{stdout}");
    assert!(stdout.ends_with("all tests passed\n"), "{stdout}");
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == FILL));
}

#[test]
fn randwrite_writes_only_whole_blocks_and_runs_for_its_seconds() {
    if !kvm_available() {
        return;
    }
    let path = image("randwrite");
    let disk = format!("path={},engine=sync", path.display());
    let (code, stdout) = run(&disk, "iobench=randwrite depth=64 batch=16 seconds=1");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(requests(&stdout, "randwrite", 64) > 0, "{stdout}");
    let line = stdout.lines().find(|l| l.contains(" s = ")).unwrap();
    assert!(line.contains(" in 1.0"), "{line}");
    // Every 4 KiB block is untouched or holds one slot's buffer: byte i of slot k is
    // (i mod 256) ^ 0xa5 ^ k (guest/src/virtio_blk/bench.rs).
    let data = std::fs::read(&path).unwrap();
    let mut written = 0;
    for (n, block) in data.chunks(4096).enumerate() {
        if block.iter().all(|&b| b == FILL) {
            continue;
        }
        written += 1;
        let slot = block[0] ^ 0xa5;
        assert!(slot < 64, "block {n}: {:02x?}", &block[..16]);
        for (i, &b) in block.iter().enumerate() {
            assert_eq!(b, (i as u8) ^ 0xa5 ^ slot, "block {n}, byte {i}");
        }
    }
    assert!(written > 0, "no block was written");
}

#[test]
fn randwrite_on_a_read_only_disk_and_bad_arguments_are_refused() {
    if !kvm_available() {
        return;
    }
    let path = image("readonly");
    let disk = format!("path={},readonly=on", path.display());
    let (code, stdout) = run(&disk, "iobench=randwrite");
    assert_eq!(code, Some(7), "{stdout}");
    assert!(
        stdout.contains("error: iobench: randwrite needs a writable disk; disk 0 is read-only"),
        "{stdout}"
    );
    let (code, stdout) = run(&disk, "iobench=randread disk=1");
    assert_eq!(code, Some(7), "{stdout}");
    assert!(
        stdout.contains("error: iobench: no virtio-blk disk 1"),
        "{stdout}"
    );
    for bad in ["depth=0", "depth=65", "bs=1000", "seconds=0", "iobench=seq"] {
        let (code, stdout) = run(&disk, &format!("iobench=randread {bad}"));
        assert_eq!(code, Some(3), "{bad}: {stdout}");
    }
    let (code, stdout) = run(&disk, "iobench=randread depth=4 batch=8");
    assert_eq!(code, Some(3), "{stdout}");
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == FILL));
}
