//! Helpers shared by the root integration tests.

// Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Whether /dev/kvm can be opened; says so on stderr when it cannot, so a skipped test is seen.
pub fn kvm_available() -> bool {
    let ok = kvm_ioctls::Kvm::new().is_ok();
    if !ok {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
    }
    ok
}

/// The longest any single run of the example VM may take in these tests. A run that takes
/// longer is a hang: it is killed and the test fails with what it printed, instead of holding
/// up the whole test run.
pub const VM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// How long the test device server may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A path `name` in this test binary's scratch directory `group` under cargo's temporary
/// directory for integration tests (a real filesystem: O_DIRECT works there).
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(group);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir.join(name)
}

/// The example program `name`, which `cargo test` builds beside the test binaries' `deps`
/// directory.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples")
        .join(name);
    assert!(binary.exists(), "{} not built", binary.display());
    binary
}

/// Runs the example VM with `args` and returns its output; panics if it runs longer than
/// [`VM_TIMEOUT`].
pub fn vm(args: &[&str]) -> std::process::Output {
    run_with_timeout(Command::new(example("vm")).args(args), VM_TIMEOUT)
}

/// Runs `command` to its end with its output captured, killing it after `timeout`.
pub fn run_with_timeout(
    command: &mut std::process::Command,
    timeout: std::time::Duration,
) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;

    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    // Drain both pipes on their own threads, so a chatty child never blocks on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} ran longer than {timeout:?} and was killed; it printed:\n{}\n{}",
                String::from_utf8_lossy(&stdout.join().unwrap_or_default()),
                String::from_utf8_lossy(&stderr.join().unwrap_or_default()),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// A running `vfio-user-device` (examples/vfio-user-device.rs, the DMA test device) on a
/// socket in its own temporary directory; killed and cleaned up on drop.
pub struct DeviceServer {
    /// The server process.
    pub child: Child,
    dir: PathBuf,
    /// Its socket.
    pub socket: PathBuf,
}

impl DeviceServer {
    /// Starts a server and waits until it listens.
    pub fn start() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmkit-vfio-user-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let socket = dir.join("device.sock");
        let mut child = Command::new(example("vfio-user-device"))
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vfio-user-device");
        // Forward its stderr line by line (draining it so it never blocks on a full pipe).
        let stderr = child.stderr.take().expect("piped stderr");
        let (lines, received) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                let _ = lines.send(line);
            }
        });
        let expected = format!("vfio-user-device: listening on {}", socket.display());
        let mut server = DeviceServer { child, dir, socket };
        match received.recv_timeout(START_TIMEOUT) {
            Ok(line) => assert_eq!(line, expected),
            Err(_) => panic!(
                "vfio-user-device did not start listening within {START_TIMEOUT:?}: {:?}",
                server.child.try_wait()
            ),
        }
        assert!(server.socket.exists());
        assert!(server.child.try_wait().expect("poll the server").is_none());
        server
    }

    /// Kills the server and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
