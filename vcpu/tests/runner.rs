//! The runner on the real /dev/kvm, with small hand-assembled flat programs at CPL3.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmkit_memory::{GuestRam, MemoryConfig};
use vmkit_vcpu::x86_64::boot::{FlatBoot, LinuxBoot};
use vmkit_vcpu::{BusDevice, ExitKind, IoBuses, RunningVm, VcpuError, VmControl, VmEnd, VmRunner};

const PROGRAM: u64 = 0x20_0000;
const COUNTERS: u64 = 0x30_0000;
const REPORT_PORT: u64 = 0x80;
const EXIT_PORT: u64 = 0xf4;

fn kvm_available() -> bool {
    let ok = kvm_ioctls::Kvm::new().is_ok();
    if !ok {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
    }
    ok
}

/// Records port writes; a write to the exit port records the status and stops the VM.
#[derive(Default)]
struct Ports {
    reports: Mutex<Vec<u32>>,
    status: AtomicU32,
    control: Mutex<Option<VmControl>>,
}

impl BusDevice for Ports {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        bytes[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        let value = u32::from_le_bytes(bytes);
        if offset == EXIT_PORT - REPORT_PORT {
            self.status.store(value, Ordering::SeqCst);
            if let Some(control) = &*self.control.lock().unwrap() {
                control.stop();
            }
        } else {
            self.reports.lock().unwrap().push(value);
        }
    }
}

struct TestVm {
    ram: GuestRam,
    ports: Arc<Ports>,
    running: RunningVm,
}

/// Starts `cpus` vCPUs on `code` as a flat program at CPL3, with the report and exit ports.
fn start_flat(cpus: usize, code: &[u8]) -> TestVm {
    let (ram, vcpus) = flat_vcpus(cpus, code);
    start(ram, vcpus)
}

/// Guest RAM holding `code` and `cpus` vCPUs ready to enter it as a flat program at CPL3.
fn flat_vcpus(cpus: usize, code: &[u8]) -> (GuestRam, Vec<vmkit_vcpu::Vcpu>) {
    let ram = GuestRam::new(&MemoryConfig::new(64 << 20)).unwrap();
    let vm = vmkit_vcpu::Vm::new(cpus).unwrap();
    let _slots = vm.register_memory(&ram, false).unwrap();
    ram.memory()
        .write_slice(code, GuestAddress(PROGRAM))
        .unwrap();
    let layout = FlatBoot {
        entry: PROGRAM,
        image_end: PROGRAM + code.len() as u64,
        cpu_count: cpus as u32,
        ram: ram.ranges().iter().map(|r| (r.start.0, r.size)).collect(),
        devices: vec![],
        args: vec![],
    }
    .write(ram.memory())
    .unwrap();
    let vcpus = vm.create_vcpus().unwrap();
    for vcpu in &vcpus {
        layout
            .entry_state(vcpu.index as u32)
            .apply(&vcpu.fd)
            .unwrap();
    }
    (ram, vcpus)
}

fn start(ram: GuestRam, vcpus: Vec<vmkit_vcpu::Vcpu>) -> TestVm {
    let ports = Arc::new(Ports::default());
    let buses = IoBuses::new();
    buses
        .pio
        .insert(REPORT_PORT, EXIT_PORT - REPORT_PORT + 4, ports.clone())
        .unwrap();
    // The exit port holds the control before the guest runs: a program may exit at once.
    let runner = VmRunner::new(vcpus, Arc::new(buses));
    *ports.control.lock().unwrap() = Some(runner.control());
    let running = runner.start().unwrap();
    TestVm {
        ram,
        ports,
        running,
    }
}

// mov dx, imm16
fn mov_dx(port: u64) -> Vec<u8> {
    let [lo, hi] = (port as u16).to_le_bytes();
    vec![0x66, 0xba, lo, hi]
}
const OUT_DX_EAX: u8 = 0xef;
const JMP_SELF: [u8; 2] = [0xeb, 0xfe];

/// Each vCPU writes its index (RSI) to the report port; vCPU 0 waits until all have, then
/// exits with status 7.
fn report_and_exit(cpus: u8) -> Vec<u8> {
    let mut code = Vec::new();
    code.extend([0x89, 0xf0]); // mov eax, esi
    code.extend(mov_dx(REPORT_PORT));
    code.push(OUT_DX_EAX);
    code.extend([0xf0, 0xff, 0x04, 0x25]); // lock inc dword [COUNTERS]
    code.extend((COUNTERS as u32).to_le_bytes());
    code.extend([0x48, 0x85, 0xf6]); // test rsi, rsi
    code.extend([0x75, 0x00]); // jnz park (patched below)
    let jnz = code.len() - 1;
    let wait = code.len();
    code.extend([0x83, 0x3c, 0x25]); // cmp dword [COUNTERS], cpus
    code.extend((COUNTERS as u32).to_le_bytes());
    code.push(cpus);
    code.extend([0x75, (wait as i32 - (code.len() as i32 + 2)) as u8]); // jne wait
    code.extend([0xb8, 7, 0, 0, 0]); // mov eax, 7
    code.extend(mov_dx(EXIT_PORT));
    code.push(OUT_DX_EAX);
    code[jnz] = (code.len() - (jnz + 1)) as u8;
    code.extend(JMP_SELF); // park: spin
    code
}

/// Each vCPU increments the u64 at COUNTERS + 64 * index forever.
fn spin_counting() -> Vec<u8> {
    let mut code = vec![0x48, 0x89, 0xf0]; // mov rax, rsi
    code.extend([0x48, 0xc1, 0xe0, 0x06]); // shl rax, 6
    code.extend([0x48, 0x05]); // add rax, imm32
    code.extend((COUNTERS as u32).to_le_bytes());
    code.extend([0x48, 0xff, 0x00]); // loop: inc qword [rax]
    code.extend([0xeb, 0xfb]); // jmp loop
    code
}

fn counter(ram: &GuestRam, index: u64) -> u64 {
    ram.memory()
        .read_obj(GuestAddress(COUNTERS + 64 * index))
        .unwrap()
}

#[test]
fn every_vcpu_runs_at_cpl3_and_the_exit_status_propagates() {
    if !kvm_available() {
        return;
    }
    for cpus in [1u8, 4] {
        let vm = start_flat(cpus as usize, &report_and_exit(cpus));
        let outcome = vm.running.wait();
        assert_eq!(outcome.end, VmEnd::Stopped);
        assert_eq!(vm.ports.status.load(Ordering::SeqCst), 7);
        let mut reports = vm.ports.reports.lock().unwrap().clone();
        reports.sort();
        assert_eq!(reports, (0..u32::from(cpus)).collect::<Vec<_>>());
        assert_eq!(outcome.stats.len(), cpus as usize);
        for stats in &outcome.stats {
            assert!(stats.exits.get(ExitKind::IoOut) >= 1, "{stats:?}");
            assert!(stats.thread_id > 0);
        }
    }
}

#[test]
fn pause_resume_and_stop_from_another_thread() {
    if !kvm_available() {
        return;
    }
    let vm = start_flat(2, &spin_counting());
    let control = vm.running.control();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&vm.ram, 0) == 0 || counter(&vm.ram, 1) == 0 {
        assert!(Instant::now() < deadline, "the guest never ran");
        std::thread::sleep(Duration::from_millis(1));
    }

    for _ in 0..3 {
        control.pause();
        assert!(control.is_paused());
        let frozen = (counter(&vm.ram, 0), counter(&vm.ram, 1));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(frozen, (counter(&vm.ram, 0), counter(&vm.ram, 1)));

        control.resume();
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter(&vm.ram, 0) == frozen.0 || counter(&vm.ram, 1) == frozen.1 {
            assert!(Instant::now() < deadline, "the guest did not resume");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    let stopping = Instant::now();
    let outcome = vm.running.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        stopping.elapsed()
    );
    assert_eq!(outcome.end, VmEnd::Stopped);
    for stats in &outcome.stats {
        assert!(stats.exits.get(ExitKind::Interrupted) >= 1, "{stats:?}");
        assert!(stats.kvm_run_time > Duration::ZERO, "{stats:?}");
    }
}

#[test]
fn stop_while_paused_and_pause_after_stop_return() {
    if !kvm_available() {
        return;
    }
    let vm = start_flat(2, &spin_counting());
    let control = vm.running.control();
    control.pause();
    control.stop();
    control.pause(); // A no-op once stopping: must not block.
    let outcome = vm.running.wait();
    assert_eq!(outcome.end, VmEnd::Stopped);
}

#[test]
fn a_computing_guest_accrues_guest_time() {
    if !kvm_available() {
        return;
    }
    let vm = start_flat(1, &spin_counting());
    let control = vm.running.control();
    // Guest time is CPU time the host accounts in clock ticks; poll rather than sleep a fixed
    // time, so a loaded machine (other tests' vCPUs) only makes this slower, not flaky.
    let deadline = Instant::now() + Duration::from_secs(30);
    let live = loop {
        let live = control.stats()[0];
        if live.guest_time >= Duration::from_millis(300) {
            break live;
        }
        assert!(Instant::now() < deadline, "no guest time accrued: {live:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let outcome = vm.running.stop();
    let stats = &outcome.stats[0];
    assert!(stats.guest_time >= live.guest_time, "{stats:?}");
    // Time inside KVM_RUN covers the guest time.
    assert!(stats.kvm_run_time >= stats.guest_time / 2, "{stats:?}");
}

#[test]
fn port_exits_are_counted_per_access() {
    if !kvm_available() {
        return;
    }
    // Write 1000 reports in a loop, then exit.
    let mut code = vec![0xb9, 0xe8, 0x03, 0, 0]; // mov ecx, 1000
    code.extend(mov_dx(REPORT_PORT));
    let top = code.len();
    code.extend([0x89, 0xc8]); // mov eax, ecx
    code.push(OUT_DX_EAX);
    code.extend([0xff, 0xc9]); // dec ecx
    code.extend([0x75, (top as i32 - (code.len() as i32 + 2)) as u8]); // jnz top
    code.extend(mov_dx(EXIT_PORT));
    code.push(OUT_DX_EAX);
    code.extend(JMP_SELF);
    let vm = start_flat(1, &code);
    let outcome = vm.running.wait();
    assert_eq!(vm.ports.reports.lock().unwrap().len(), 1000);
    assert!(outcome.stats[0].exits.get(ExitKind::IoOut) >= 1001);
    assert!(outcome.stats[0].exit_handling_time > Duration::ZERO);
}

#[test]
fn an_exception_at_cpl3_is_a_triple_fault_with_the_faulting_rip() {
    if !kvm_available() {
        return;
    }
    let vm = start_flat(1, &[0x90, 0x0f, 0x0b]); // nop; ud2
    match vm.running.wait().end {
        VmEnd::Shutdown { index, state } => {
            assert_eq!(index, 0);
            assert_eq!(state.rip, PROGRAM + 1);
            assert_eq!(state.cs & 3, 3);
        }
        other => panic!("expected a shutdown, got {other:?}"),
    }
}

#[test]
fn a_fatal_exit_on_one_vcpu_stops_the_others() {
    if !kvm_available() {
        return;
    }
    // vCPU 1 faults; vCPU 0 spins forever.
    let code = [
        0x48, 0x85, 0xf6, // test rsi, rsi
        0x74, 0x02, // jz spin
        0x0f, 0x0b, // ud2
        0xeb, 0xfe, // spin: jmp spin
    ];
    let vm = start_flat(2, &code);
    match vm.running.wait().end {
        VmEnd::Shutdown { index, .. } => assert_eq!(index, 1),
        other => panic!("expected vCPU 1's shutdown, got {other:?}"),
    }
}

#[test]
fn linux_boot_state_runs_64_bit_code_at_cpl0() {
    if !kvm_available() {
        return;
    }
    let ram = GuestRam::new(&MemoryConfig::new(64 << 20)).unwrap();
    let vm = vmkit_vcpu::Vm::new(1).unwrap();
    let _slots = vm.register_memory(&ram, false).unwrap();
    // Report RSI (the zero page address) and CS, then exit: a few emulated instructions.
    let mut code = vec![0x89, 0xf0]; // mov eax, esi
    code.extend(mov_dx(REPORT_PORT));
    code.push(OUT_DX_EAX);
    code.extend([0x8c, 0xc8]); // mov eax, cs
    code.push(OUT_DX_EAX);
    code.extend(mov_dx(EXIT_PORT));
    code.push(OUT_DX_EAX);
    code.extend(JMP_SELF);
    let kernel = 0x100_0000;
    ram.memory()
        .write_slice(&code, GuestAddress(kernel))
        .unwrap();
    let entry = LinuxBoot {
        entry: kernel,
        boot_params: 0x7000,
    }
    .write(ram.memory())
    .unwrap();
    let vcpus = vm.create_vcpus().unwrap();
    entry.apply(&vcpus[0].fd).unwrap();
    let vm = start(ram, vcpus);
    let outcome = vm.running.wait();
    assert_eq!(outcome.end, VmEnd::Stopped);
    assert_eq!(*vm.ports.reports.lock().unwrap(), vec![0x7000, 0x10]);
}

#[test]
fn vm_creation_refuses_zero_and_too_many_vcpus() {
    if !kvm_available() {
        return;
    }
    assert!(matches!(
        vmkit_vcpu::Vm::new(0),
        Err(vmkit_vcpu::Error::VcpuCount { requested: 0, .. })
    ));
    assert!(matches!(
        vmkit_vcpu::Vm::new(100_000),
        Err(vmkit_vcpu::Error::VcpuCount { .. })
    ));
}

#[allow(dead_code)]
fn assert_error_types_are_sendable(error: VcpuError) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(error)
}

struct PanickingDevice;

impl BusDevice for PanickingDevice {
    fn read(&self, _offset: u64, _data: &mut [u8]) {}
    fn write(&self, _offset: u64, _data: &[u8]) {
        panic!("device bug (expected by this test)");
    }
}

#[test]
fn a_panicking_device_ends_the_vm_with_an_error_and_stops_the_other_vcpus() {
    if !kvm_available() {
        return;
    }
    // vCPU 1 writes to the panicking device; vCPU 0 spins.
    let mut code = vec![0x48, 0x85, 0xf6, 0x74, 0x05]; // test rsi, rsi; jz spin
    code.extend(mov_dx(0x90));
    code.push(OUT_DX_EAX);
    code.extend(JMP_SELF); // spin
    let (_ram, vcpus) = flat_vcpus(2, &code);
    let buses = IoBuses::new();
    buses
        .pio
        .insert(0x90, 1, Arc::new(PanickingDevice))
        .unwrap();
    let running = RunningVm::start(vcpus, Arc::new(buses)).unwrap();
    let control = running.control();
    let outcome = running.wait();
    assert_eq!(outcome.end, VmEnd::Error(VcpuError::Panicked { index: 1 }));
    // Pausing an ended VM returns at once.
    control.pause();
}

#[test]
fn the_thread_start_hook_runs_on_each_vcpu_thread_before_the_guest() {
    if !kvm_available() {
        return;
    }
    let (ram, vcpus) = flat_vcpus(2, &spin_counting());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook_seen = seen.clone();
    let runner =
        VmRunner::new(vcpus, Arc::new(IoBuses::new())).on_thread_start(Arc::new(move |index| {
            let name = std::thread::current().name().map(str::to_owned);
            hook_seen.lock().unwrap().push((index, name));
            Ok(())
        }));
    let running = runner.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (counter(&ram, 0) == 0 || counter(&ram, 1) == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(running.stop().end, VmEnd::Stopped);
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![(0, Some("vcpu0".to_owned())), (1, Some("vcpu1".to_owned()))]
    );
}

#[test]
fn a_failing_thread_start_hook_ends_the_vm_before_any_guest_code() {
    if !kvm_available() {
        return;
    }
    let (ram, vcpus) = flat_vcpus(2, &spin_counting());
    let runner = VmRunner::new(vcpus, Arc::new(IoBuses::new())).on_thread_start(Arc::new(
        |index| match index {
            1 => Err("no filter for this thread".to_owned()),
            // vCPU 0 waits, so it is still before its first KVM_RUN when vCPU 1 fails.
            _ => {
                std::thread::sleep(Duration::from_millis(200));
                Ok(())
            }
        },
    ));
    let outcome = runner.start().unwrap().wait();
    assert_eq!(
        outcome.end,
        VmEnd::Error(VcpuError::ThreadSetup {
            index: 1,
            reason: "no filter for this thread".to_owned()
        })
    );
    assert_eq!((counter(&ram, 0), counter(&ram, 1)), (0, 0));
}

#[test]
fn a_stop_requested_before_the_start_runs_no_guest_code() {
    if !kvm_available() {
        return;
    }
    let (ram, vcpus) = flat_vcpus(1, &spin_counting());
    let runner = VmRunner::new(vcpus, Arc::new(IoBuses::new()));
    runner.control().stop();
    let outcome = runner.start().unwrap().wait();
    assert_eq!(outcome.end, VmEnd::Stopped);
    assert_eq!(counter(&ram, 0), 0);
    assert_eq!(outcome.stats[0].exits.total(), 0);
}
