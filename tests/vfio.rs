//! Passthrough end to end: the example VM attaches the DMA test device that
//! `examples/vfio-user-device.rs` serves over vfio-user, and the built-in guest finds it on
//! the PCI bus, programs it through its BARs, has it DMA into guest memory and checks the
//! data (guest/src/testdev.rs). The host side checks what the guest cannot see: that the
//! MSI-X interrupt reached the guest's local APIC, and that the device memory BAR was
//! mapped into the guest (its accesses caused no exits).

mod common;
use common::{kvm_available, vm, DeviceServer};

/// The vector the guest programs into MSI-X table entry 1, which the device raises when a
/// DMA ends (guest/src/testdev.rs: 0x40 + entry).
const DMA_DONE_VECTOR: u64 = 0x41;

#[test]
fn the_guest_drives_a_vfio_user_device_and_its_interrupt_arrives() {
    if !kvm_available() {
        return;
    }
    let server = DeviceServer::start();
    let socket = server.socket.to_str().expect("UTF-8 path").to_string();
    let output = vm(&["run", "--vfio-user", &socket, "--json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is one JSON object");
    let serial = report["serial"].as_str().unwrap_or_default();
    assert_eq!(output.status.code(), Some(0), "{serial}\n{output:?}");
    assert!(report["success"].as_bool().unwrap_or(false), "{report}");
    assert!(
        serial
            .lines()
            .any(|l| l.starts_with("testdev ") && l.ends_with(": ok")),
        "{serial}"
    );
    assert!(serial.contains("testdev: 1 device checked"), "{serial}");
    // The guest runs with interrupts off, so the vector the device raised stays pending.
    let pending = &report["vcpus"][0]["pending_interrupt_vectors"];
    assert!(
        pending
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v.as_u64() == Some(DMA_DONE_VECTOR))),
        "vector {DMA_DONE_VECTOR:#x} not pending: {pending}"
    );
    // The guest touches every dword of the 64 KiB memory BAR: trapped, that alone would be
    // 16384 MMIO exits; mapped, it is none. Register and MSI-X accesses are a few dozen.
    let exits = &report["vcpus"][0]["exits"];
    let mmio = exits["mmio_read"].as_u64().unwrap_or(u64::MAX)
        + exits["mmio_write"].as_u64().unwrap_or(u64::MAX);
    assert!(
        mmio < 2000,
        "{mmio} MMIO exits: the memory BAR was not mapped: {exits}"
    );
}

#[test]
fn missing_devices_are_clear_errors() {
    if !kvm_available() {
        return;
    }
    let output = vm(&["run", "--vfio-user", "/nonexistent/vmkit.sock"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr.contains("/nonexistent/vmkit.sock"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // No IOMMU and no /dev/vfio on these hosts; elsewhere the path does not exist.
    let output = vm(&["run", "--vfio", "/sys/bus/pci/devices/0000:ff:1f.7"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr.contains("0000:ff:1f.7") || stderr.contains("/dev/vfio"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_server_that_goes_away_ends_nothing_badly() {
    if !kvm_available() {
        return;
    }
    // The server is killed before the VM starts: the VM fails to attach, with an error.
    let mut server = DeviceServer::start();
    let socket = server.socket.to_str().expect("UTF-8 path").to_string();
    server.kill();
    let output = vm(&["run", "--vfio-user", &socket]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{output:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_server_that_dies_while_the_vm_runs_leaves_a_clean_stop() {
    if !kvm_available() {
        return;
    }
    let mut server = DeviceServer::start();
    let config = vmkit::VmConfig {
        vfio: vec![vmkit::devices::VfioConfig::User(server.socket.clone())],
        backing: vmkit_memory::Backing::SharedMemfd,
        args: "spin".into(),
        ..Default::default()
    };
    let vmm = vmkit::Vmm::start(&config, std::time::Instant::now()).expect("the VM starts");
    // The guest checks the device, then spins without touching it again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !String::from_utf8_lossy(&vmm.serial_output()).contains("spinning") {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never got to spin"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let serial = String::from_utf8_lossy(&vmm.serial_output()).into_owned();
    assert!(serial.contains("testdev: 1 device checked"), "{serial}");
    // The server goes away; stopping the VM then resets the device and unmaps its DMA,
    // both of which now fail: logged, not a panic or a hang.
    server.kill();
    let control = vmm.control();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let report = vmm.wait();
        let _ = done.send(report.end);
    });
    control.stop();
    let end = finished
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the VM stops within 30 s");
    assert!(matches!(end, vmkit_vcpu::VmEnd::Stopped), "{end:?}");
}
