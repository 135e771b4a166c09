//! Helpers shared by the root integration tests.

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

/// Runs the example VM (`cargo test` builds it beside the test binaries' `deps` directory)
/// with `args` and returns its output; panics if it runs longer than [`VM_TIMEOUT`].
#[allow(dead_code)] // Not every test binary runs the VM as a process.
pub fn vm(args: &[&str]) -> std::process::Output {
    let exe = std::env::current_exe().expect("test binary path");
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples")
        .join("vm");
    assert!(binary.exists(), "{} not built", binary.display());
    run_with_timeout(std::process::Command::new(binary).args(args), VM_TIMEOUT)
}

/// Runs `command` to its end with its output captured, killing it after `timeout`.
#[allow(dead_code)]
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
