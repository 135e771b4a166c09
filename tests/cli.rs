//! The example VM's command line, run as a process: exit codes and error messages.

mod common;
use common::{kvm_available, vm};

#[test]
fn default_run_succeeds_and_the_guest_status_becomes_the_exit_code() {
    if !kvm_available() {
        return;
    }
    let output = vm(&[]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("all tests passed"));

    let output = vm(&["--cpus", "2", "--args", "exit=7"]);
    assert_eq!(output.status.code(), Some(7), "{output:?}");
}

#[test]
fn json_report_is_one_object_with_stats_and_accounting() {
    if !kvm_available() {
        return;
    }
    let output = vm(&["run", "--cpus", "2", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is one JSON object");
    assert_eq!(report["success"], true);
    assert_eq!(report["exit_status"], 0);
    assert_eq!(report["vcpus"].as_array().map(Vec::len), Some(2));
    assert!(report["vcpus"][0]["exits"]["io_out"].as_u64() > Some(0));
    assert!(report["memory"]["vmm_overhead_resident"].as_u64() > Some(0));
    assert!(report["startup"]["first_serial_byte_us"].as_u64().is_some());
    assert!(report["serial"].as_str().unwrap().contains("cpu 1 online"));
}

#[test]
fn check_host_passes_here() {
    if !kvm_available() {
        return;
    }
    let output = vm(&["check-host"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("PASS  KVM_CAP_IRQFD"), "{text}");
    assert!(text.contains("this host can run vmkit VMs"), "{text}");
}

#[test]
fn bad_input_is_a_clear_error_with_a_non_zero_exit_and_no_panic() {
    let cases: &[(&[&str], &str)] = &[
        (&["--memory", "0"], "needs some memory"),
        (&["--memory", "1000T"], "exceeds"),
        (&["--cpus", "0"], "at least one vCPU"),
        (&["--cpus", "100000"], "vCPUs requested"),
        (
            &["--program", "/nonexistent/kernel"],
            "cannot read program /nonexistent/kernel",
        ),
        (&["--bogus"], "unknown option '--bogus'"),
        (&["--memory", "1M"], "outside guest RAM"),
    ];
    for (args, expected) in cases {
        if !kvm_available() && args.first() != Some(&"--bogus") {
            continue;
        }
        let output = vm(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            matches!(output.status.code(), Some(code) if code != 0),
            "{args:?}: {output:?}"
        );
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
