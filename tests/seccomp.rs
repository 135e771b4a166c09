//! The example VM's seccomp filters: on by default in every thread, off with --no-seccomp,
//! and a forbidden call, from a device I/O thread or a vCPU thread, ends the VM with a message
//! that names the thread and the call.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{example, kvm_available, vm};
use vmkit::seccomp::{BUILTIN_FILTERS_JSON, EXIT_FORBIDDEN_SYSCALL};

fn scratch(name: &str) -> PathBuf {
    common::scratch("seccomp-tests", name)
}

/// A 16 MiB raw image.
fn disk(name: &str) -> String {
    let path = scratch(name);
    let file = std::fs::File::create(&path).expect("create the image");
    file.set_len(16 << 20).expect("size the image");
    path.display().to_string()
}

/// The built-in filters with `call` taken out of `role`'s list, written to a file.
fn filters_without(role: &str, call: &str, file: &str) -> String {
    let mut filters: serde_json::Value =
        serde_json::from_str(BUILTIN_FILTERS_JSON).expect("the built-in JSON parses");
    let rules = filters[role]["filter"]
        .as_array_mut()
        .expect("a list of rules");
    let before = rules.len();
    rules.retain(|rule| rule["syscall"] != call);
    assert_eq!(rules.len(), before - 1, "{role} allowed {call} once");
    let path = scratch(file);
    std::fs::write(&path, filters.to_string()).expect("write the filters");
    path.display().to_string()
}

#[test]
fn a_forbidden_call_in_a_disk_io_thread_ends_the_vm_and_names_the_thread_and_the_call() {
    if !kvm_available() {
        return;
    }
    let image = disk("io.img");
    let filters = filters_without("io", "pwritev2", "io-without-pwritev2.json");
    let disk = format!("path={image},engine=sync");
    let output = vm(&["run", "--seccomp-filter", &filters, "--disk", &disk]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(EXIT_FORBIDDEN_SYSCALL),
        "{stderr}"
    );
    // Whichever of the engine's helper threads took the first write.
    assert!(
        stderr.contains("vmkit: seccomp: the thread 'vmkit-blk-io"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "' (under the filter of the thread that started it) made system call 328 \
             (pwritev2), which its filter forbids; the VM is ended"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The same run without filters passes: the call is the guest's disk write.
    let output = vm(&[
        "run",
        "--seccomp-filter",
        &filters,
        "--no-seccomp",
        "--disk",
        &disk,
    ]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
}

#[test]
fn a_forbidden_call_in_a_vcpu_thread_ends_the_vm_before_the_guest_runs() {
    if !kvm_available() {
        return;
    }
    let filters = filters_without("vcpu", "ioctl", "vcpu-without-ioctl.json");
    let output = vm(&["run", "--seccomp-filter", &filters]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(EXIT_FORBIDDEN_SYSCALL),
        "{stderr}"
    );
    assert!(
        stderr.contains("the vcpu thread 'vcpu0' made system call 16 (ioctl)"),
        "{stderr}"
    );
    // KVM_RUN is the vCPU's first call under its filter: the guest never printed.
    assert!(!stdout.contains("vmkit guest"), "{stdout}");
}

#[test]
fn bad_filter_files_are_refused_before_the_vm_starts() {
    if !kvm_available() {
        return;
    }
    let broken = scratch("broken.json");
    std::fs::write(&broken, r#"{"main": {"default_action": "trap"}}"#).expect("write");
    for (file, expected) in [
        (broken.display().to_string(), "broken.json"),
        ("/nonexistent/filters.json".to_string(), "cannot read"),
    ] {
        let output = vm(&["run", "--seccomp-filter", &file]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("cannot start the VM: seccomp: "),
            "{stderr}"
        );
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// Each thread of process `pid` with its `Seccomp:` mode (0 off, 2 filtered).
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return modes;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        modes.push((comm.trim().to_string(), mode));
    }
    modes.sort();
    modes
}

/// Starts a spinning VM with `extra` options and returns its threads' modes once the vCPUs,
/// the disk's helper thread and the spawner are all there, and all in mode `expected` (or
/// after a minute, for the test to report).
fn spinning_vm_thread_modes(extra: &[&str], expected: &str) -> Vec<(String, String)> {
    let image = disk(&format!("spin{}.img", extra.len()));
    let disk = format!("path={image},engine=sync");
    let mut child = Command::new(example("vm"))
        .args(["run", "--cpus", "2", "--args", "spin", "--disk", &disk])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the VM");
    let deadline = Instant::now() + Duration::from_secs(60);
    let modes = loop {
        let modes = thread_modes(child.id());
        let has = |name: &str| modes.iter().any(|(comm, _)| comm == name);
        let all_expected = modes
            .iter()
            .filter(|(comm, _)| !comm.starts_with("kvm-"))
            .all(|(_, mode)| mode == expected);
        let started = has("vcpu1") && has("vmkit-blk-io0") && has("io-spawner");
        if (started && all_expected) || Instant::now() > deadline {
            break modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    modes
}

#[test]
fn every_thread_runs_filtered_by_default_and_none_with_no_seccomp() {
    if !kvm_available() {
        return;
    }
    let modes = spinning_vm_thread_modes(&[], "2");
    for name in ["vm", "vcpu0", "vcpu1", "io-spawner", "vmkit-blk-io0"] {
        assert!(
            modes.contains(&(name.to_string(), "2".to_string())),
            "{name} is not filtered: {modes:?}"
        );
    }
    // Every thread of ours. KVM's own worker (kvm-nx-lpage-recovery) shows the mode of
    // whichever thread it was created from, which depends on the host kernel's version.
    assert!(
        modes
            .iter()
            .filter(|(comm, _)| !comm.starts_with("kvm-"))
            .all(|(_, mode)| mode == "2"),
        "{modes:?}"
    );

    let modes = spinning_vm_thread_modes(&["--no-seccomp"], "0");
    assert!(
        modes.iter().any(|(comm, _)| comm == "vcpu1"),
        "the VM did not start: {modes:?}"
    );
    assert!(modes.iter().all(|(_, mode)| mode == "0"), "{modes:?}");
}
