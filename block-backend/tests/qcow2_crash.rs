//! Crash consistency of qcow2 metadata: a writer process is killed (SIGKILL) at random
//! moments while it allocates clusters, overwrites, discards and writes zeroes, in every
//! cache mode. A killed process leaves behind exactly the writes it had issued, in the
//! order it issued them, so each kill is a crash at an arbitrary point of the metadata
//! update sequence. After each one, `qemu-img check` (and our own check) may find leaked
//! clusters but never corruption: no entry points at a cluster whose refcount does not
//! cover it, and the image opens and reads.
//!
//! Losing writes that were issued but not synced (a power cut) needs the host's write
//! cache out of the picture, which a test cannot arrange; the barriers between dependent
//! metadata writes are what covers that case, and `scripts/crash-test.sh` (issue 8) drives
//! the whole VM.

mod qemu;
use qemu::{p, qemu_tools, run, serial};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmkit_block_backend::qcow2::{check, create};
use vmkit_block_backend::{CacheMode, IoBuf, Qcow2Disk, Qcow2Options, RawOptions, SyncDisk};
use vmm_sys_util::tempdir::TempDir;

/// Set in the writer process: the image it writes, and its cache mode.
const CHILD_IMAGE: &str = "VMKIT_QCOW2_CRASH_IMAGE";
const CHILD_CACHE: &str = "VMKIT_QCOW2_CRASH_CACHE";

const SIZE: u64 = 64 << 20;
/// Kills per cache mode.
const KILLS: u64 = 12;

/// A small xorshift generator: the test needs spread, not quality.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1
}

/// The writer, in the process the crash test starts (this test binary again, with the
/// image and cache mode in its environment): writes until it is killed.
fn write_until_killed(image: &str, cache: &str) -> ! {
    let cache: CacheMode = cache.parse().unwrap();
    let options = Qcow2Options {
        raw: RawOptions {
            cache,
            discard: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let disk = Qcow2Disk::open(Path::new(image), &options).unwrap();
    let mut random = Random(seed());
    // Page-aligned buffers, so that O_DIRECT modes take their direct paths too.
    let mut buffer = vmkit_block_backend::AlignedBuffer::new(256 << 10, 4096);
    eprintln!("writer: started");
    loop {
        let len = 512 * (1 + random.next() % 512) as usize;
        let offset = 512 * (random.next() % ((SIZE - len as u64) / 512));
        match random.next() % 10 {
            0 => disk.discard(offset, len as u64).unwrap(),
            1 => disk.write_zeroes(offset, len as u64).unwrap(),
            2 => disk.flush().unwrap(),
            _ => {
                let data = &mut buffer.as_mut_slice()[..len];
                data.fill(random.next() as u8);
                disk.write_vectored(offset, &[IoBuf::from_mut_slice(data)])
                    .unwrap();
            }
        };
    }
}

/// Reads the writer's standard error until it says it started (true), ends, or 30 s pass.
fn wait_for_start(child: &mut std::process::Child) -> bool {
    use std::io::{BufRead, BufReader};
    let Some(stderr) = child.stderr.take() else {
        return false;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("writer: started") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).is_ok()
}

#[test]
fn killed_writers_leave_leaks_at_most() {
    if let (Ok(image), Ok(cache)) = (std::env::var(CHILD_IMAGE), std::env::var(CHILD_CACHE)) {
        write_until_killed(&image, &cache);
    }
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/var/tmp/vmkit-qcow2-crash").unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut random = Random(seed());
    let mut leaks_seen = 0;
    for cache in [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::None,
        CacheMode::DirectSync,
        CacheMode::Unsafe,
    ] {
        let image = dir.as_path().join(format!("{}.qcow2", cache.name()));
        // Small clusters: many allocations, refcount blocks and L2 tables per second.
        create(&image, SIZE, 4096).unwrap();
        for kill in 0..KILLS {
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "killed_writers_leave_leaks_at_most",
                    "--nocapture",
                ])
                .env(CHILD_IMAGE, &image)
                .env(CHILD_CACHE, cache.name())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Wait until the writer has opened the image and started (a loaded machine may
            // take a while to start a process), then kill it anywhere in its writes.
            let started = wait_for_start(&mut child);
            std::thread::sleep(Duration::from_millis(5 + random.next() % 60));
            child.kill().unwrap();
            child.wait().unwrap();
            assert!(
                started,
                "{} kill {kill}: the writer never started",
                cache.name()
            );

            let what = format!("{} kill {kill}", cache.name());
            let out = Command::new("qemu-img")
                .args(["check", "-f", "qcow2", "--output=json", p(&image)])
                .output()
                .unwrap();
            let report: String = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                !report.contains("\"corruptions\"") || report.contains("\"corruptions\": 0"),
                "{what}: qemu-img check found corruption: {report}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // qemu-img exits 0 when clean, 3 when only leaks remain.
            assert!(
                matches!(out.status.code(), Some(0) | Some(3)),
                "{what}: {report}"
            );
            let ours = check(&image).unwrap();
            assert_eq!(ours.corruptions, 0, "{what}: {:?}", ours.messages);
            leaks_seen += ours.leaks;
            // The image still opens for writing and reads end to end.
            let disk = Qcow2Disk::open(&image, &Qcow2Options::default()).unwrap();
            let mut all = vec![0u8; SIZE as usize];
            disk.read_vectored(0, &[IoBuf::from_mut_slice(&mut all)])
                .unwrap();
        }
        // The writers did write (a writer that failed at once would make this test vacuous).
        let written = check(&image).unwrap().allocated_clusters;
        assert!(
            written > 100,
            "{}: only {written} clusters written",
            cache.name()
        );
        // Leaks are allowed, and qemu-img can repair them: after that the image is clean.
        run(
            "qemu-img",
            &["check", "-r", "leaks", "-f", "qcow2", p(&image)],
        );
        let repaired = check(&image).unwrap();
        assert_eq!(
            (repaired.corruptions, repaired.leaks),
            (0, 0),
            "{}: {:?}\n{}",
            cache.name(),
            repaired.messages,
            run("qemu-img", &["check", "-f", "qcow2", p(&image)])
        );
    }
    eprintln!(
        "{} kills, {leaks_seen} leaked clusters in all, no corruption",
        5 * KILLS
    );
}
