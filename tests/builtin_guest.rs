//! The example VMM running the built-in guest on the real /dev/kvm.

mod common;
use common::kvm_available;

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmkit::{VmConfig, Vmm};
use vmkit_guest_abi::BOOT_INFO_ADDRESS;
use vmkit_vcpu::{ExitKind, VmEnd};

fn config(cpus: usize, args: &str) -> VmConfig {
    VmConfig {
        cpus,
        memory: 128 << 20,
        args: args.into(),
        ..VmConfig::default()
    }
}

fn run(cpus: usize, args: &str) -> vmkit::RunReport {
    Vmm::start(&config(cpus, args), Instant::now())
        .expect("VM starts")
        .wait()
}

#[test]
fn greets_checks_in_every_vcpu_and_succeeds_on_1_and_4_vcpus() {
    if !kvm_available() {
        return;
    }
    for cpus in [1, 4] {
        let report = run(cpus, "");
        let serial = String::from_utf8_lossy(&report.serial).into_owned();
        assert!(report.success(), "{}: {serial}", report.describe_end());
        assert_eq!(report.exit_code(), 0);
        assert!(
            serial.starts_with(&format!(
                "vmkit built-in guest: {cpus} vCPUs, 128 MiB RAM\n"
            )),
            "{serial}"
        );
        for cpu in 0..cpus {
            let line = format!("cpu {cpu} online\n");
            assert_eq!(serial.matches(&line).count(), 1, "{line:?} in {serial}");
        }
        assert!(serial.contains("compute: ok (9592)\n"), "{serial}");
        assert!(serial.ends_with("all tests passed\n"), "{serial}");
        assert_eq!(report.stats.len(), cpus);
    }
}

#[test]
fn the_exit_status_propagates() {
    if !kvm_available() {
        return;
    }
    let report = run(2, "exit=42");
    assert_eq!(report.exit_status, Some(42));
    assert!(!report.success());
    assert_eq!(report.exit_code(), 42);

    let report = run(1, "no-such-argument");
    assert_eq!(report.exit_status, Some(3));
    assert!(String::from_utf8_lossy(&report.serial).contains("unknown argument 'no-such-argument'"));
}

#[test]
fn serial_bytes_and_port_exits_agree() {
    if !kvm_available() {
        return;
    }
    let report = run(1, "print=500");
    assert!(report.success());
    let serial_bytes = report.serial.len() as u64;
    assert!(serial_bytes > 500);
    // Every byte is one `out` to the UART; the exit port adds one more.
    let io_out = report.stats[0].exits.get(ExitKind::IoOut);
    assert!(
        io_out > serial_bytes,
        "{io_out} port writes for {serial_bytes} bytes"
    );
    assert!(report.stats[0].exit_handling_time > Duration::ZERO);
    assert!(report.stats[0].kvm_run_time > Duration::ZERO);
}

#[test]
fn a_computing_guest_accrues_guest_time() {
    if !kvm_available() {
        return;
    }
    let report = run(1, "compute=8000");
    assert!(report.success(), "{}", report.describe_end());
    let stats = &report.stats[0];
    // About a second of sieving at CPL3, accounted by the host as guest time.
    assert!(stats.guest_time >= Duration::from_millis(300), "{stats:?}");
}

#[test]
fn touched_guest_memory_is_resident_and_reported_apart_from_the_vmm() {
    if !kvm_available() {
        return;
    }
    let touched = 48u64 << 20;
    let report = run(1, "touch=48");
    assert!(report.success(), "{}", report.describe_end());
    let memory = report.memory.expect("accounting");
    assert_eq!(memory.guest_size, 128 << 20);
    assert!(memory.guest_resident >= touched, "{memory:?}");
    assert!(memory.guest_resident < 128 << 20, "{memory:?}");
    assert!(memory.vmm_resident > 0, "{memory:?}");
    assert!(
        memory.process_resident >= memory.guest_resident + memory.vmm_resident - (1 << 20),
        "{memory:?}"
    );
}

#[test]
fn pause_resume_and_stop_a_spinning_guest() {
    if !kvm_available() {
        return;
    }
    let vmm = Vmm::start(&config(2, "spin"), Instant::now()).unwrap();
    let control = vmm.control();
    // The spin counters live at free_memory_start + 64 * vCPU (offset 32 of the boot info).
    let free: u64 = vmm
        .memory()
        .memory()
        .read_obj(GuestAddress(BOOT_INFO_ADDRESS + 32))
        .unwrap();
    let counter = |cpu: u64| -> u64 {
        vmm.memory()
            .memory()
            .read_obj(GuestAddress(free + 64 * cpu))
            .unwrap()
    };
    let wait_until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait_until("the counters to run", &|| counter(0) > 0 && counter(1) > 0);

    control.pause();
    let frozen = (counter(0), counter(1));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        frozen,
        (counter(0), counter(1)),
        "the guest ran while paused"
    );
    control.resume();
    wait_until("the guest to resume", &|| {
        counter(0) > frozen.0 && counter(1) > frozen.1
    });

    let stopping = Instant::now();
    control.stop();
    let report = vmm.wait();
    assert!(stopping.elapsed() < Duration::from_secs(2));
    assert_eq!(report.end, VmEnd::Stopped);
    assert_eq!(report.exit_status, None);
    assert!(String::from_utf8_lossy(&report.serial).contains("spinning"));
}
