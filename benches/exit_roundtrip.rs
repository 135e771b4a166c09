//! Exit round trip: the cost of one guest `out` that exits to the VMM and back, through our
//! runner (`vmkit_vcpu::RunningVm` with a device on the port I/O bus) against a bare `KVM_RUN`
//! loop written with kvm-ioctls alone, in one run. The goal is for the runner to stay within
//! 10% of the bare loop: whatever it adds per exit (statistics, state checks, bus lookup,
//! `immediate_exit` reset) must stay small next to the exit itself.
//!
//! Both sides run the same guest, set up with the same vmkit-vcpu code: a flat program at CPL3
//! that writes to one port forever. On this host (a nested paravirtual KVM) CPL3 code runs
//! natively and CPL0 code is emulated, so a CPL3 guest is what makes the exit, not emulation,
//! the measured cost. Only the run loop differs.
//!
//! - `vmkit_runner`: the VM runs on its own vCPU thread for the whole benchmark. The device
//!   counts down the writes a sample asks for and stamps the time of the last one; the bench
//!   thread sleeps meanwhile, so it takes no CPU from the vCPU thread.
//! - `bare_kvm_run`: the bench thread calls `KVM_RUN` itself and counts `KVM_EXIT_IO` exits.
//!
//! After criterion, both are timed again over a fixed number of exits, alternating, and the
//! ratio is printed (`exit round trip: runner X ns, bare Y ns, ratio Z`). Only one VM runs at a
//! time (the runner is paused while the bare loop runs) because a spinning vCPU would take a
//! CPU from the other side.

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};
use vmkit_memory::{GuestRam, KvmSlots, MemoryConfig};
use vmkit_vcpu::x86_64::boot::FlatBoot;
use vmkit_vcpu::{BusDevice, IoBuses, RunningVm, Vcpu, Vm};

/// Where the guest program is loaded (and entered).
const PROGRAM: u64 = 0x20_0000;
/// The port the guest writes to. No in-kernel device claims it, so every write exits to us.
const PORT: u16 = 0x80;
/// Exits per side and round in the comparison after criterion: about 0.6 s at 30 µs an exit.
const COMPARE_EXITS: u64 = 20_000;
const COMPARE_ROUNDS: usize = 5;

/// `mov dx, PORT; again: out dx, eax; jmp again`.
fn port_loop() -> Vec<u8> {
    let [lo, hi] = PORT.to_le_bytes();
    vec![
        0x66, 0xba, lo, hi,   // mov dx, PORT
        0xef, // again: out dx, eax
        0xeb, 0xfd, // jmp again
    ]
}

/// A one-vCPU VM with the port loop loaded and the vCPU at its entry point, not yet running.
struct Guest {
    // Guest RAM must outlive the VM's use of it; the VM and slots are kept with it.
    _ram: GuestRam,
    _vm: Vm,
    _slots: KvmSlots,
    vcpus: Vec<Vcpu>,
}

impl Guest {
    fn new() -> Result<Guest, Box<dyn Error>> {
        let code = port_loop();
        let ram = GuestRam::new(&MemoryConfig::new(64 << 20))?;
        let vm = Vm::new(1)?;
        let slots = vm.register_memory(&ram, false)?;
        ram.memory().write_slice(&code, GuestAddress(PROGRAM))?;
        let layout = FlatBoot {
            entry: PROGRAM,
            image_end: PROGRAM + code.len() as u64,
            cpu_count: 1,
            ram: ram.ranges().iter().map(|r| (r.start.0, r.size)).collect(),
            devices: vec![],
            args: vec![],
        }
        .write(ram.memory())?;
        let vcpus = vm.create_vcpus()?;
        layout.entry_state(0).apply(&vcpus[0].fd)?;
        Ok(Guest {
            _ram: ram,
            _vm: vm,
            _slots: slots,
            vcpus,
        })
    }
}

/// Counts down the port writes a sample waits for and stamps the time of the last one.
#[derive(Default)]
struct ExitCounter {
    remaining: AtomicU64,
    finished: Mutex<Option<Instant>>,
    finished_changed: Condvar,
}

impl BusDevice for ExitCounter {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, _data: &[u8]) {
        // Only one vCPU writes, so the load and the decrement cannot race with another write.
        // Between samples nobody waits and the write costs one load.
        if self.remaining.load(Ordering::Acquire) == 0 {
            return;
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Stamped here rather than when the bench thread wakes, so the wake-up latency is
            // not part of the sample.
            let now = Instant::now();
            *self.finished.lock().unwrap() = Some(now);
            self.finished_changed.notify_one();
        }
    }
}

/// The VM running on our runner, with the counter on its port.
struct RunnerSide {
    _guest: Guest,
    counter: Arc<ExitCounter>,
    running: RunningVm,
}

impl RunnerSide {
    fn start() -> Result<RunnerSide, Box<dyn Error>> {
        let mut guest = Guest::new()?;
        let counter = Arc::new(ExitCounter::default());
        let buses = IoBuses::new();
        buses.pio.insert(u64::from(PORT), 1, counter.clone())?;
        let running = RunningVm::start(std::mem::take(&mut guest.vcpus), Arc::new(buses))?;
        Ok(RunnerSide {
            _guest: guest,
            counter,
            running,
        })
    }

    /// Time for the next `exits` port writes. The first may have been under way when counting
    /// started, which shortens a sample by less than one exit on average.
    fn time(&self, exits: u64) -> Duration {
        if exits == 0 {
            return Duration::ZERO;
        }
        *self.counter.finished.lock().unwrap() = None;
        let start = Instant::now();
        self.counter.remaining.store(exits, Ordering::Release);
        let mut finished = self.counter.finished.lock().unwrap();
        loop {
            if let Some(end) = *finished {
                return end - start;
            }
            // Wake now and then so a VM that died does not hang the benchmark.
            let (guard, _) = self
                .counter
                .finished_changed
                .wait_timeout(finished, Duration::from_secs(1))
                .unwrap();
            finished = guard;
            if finished.is_none() && self.running.control().is_stopping() {
                panic!("the runner's VM ended during a sample");
            }
        }
    }
}

/// The same VM driven by a plain `KVM_RUN` loop on the calling thread.
struct BareSide {
    guest: Guest,
}

impl BareSide {
    fn time(&mut self, exits: u64) -> Duration {
        let vcpu = &mut self.guest.vcpus[0].fd;
        let start = Instant::now();
        let mut seen = 0;
        while seen < exits {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(PORT, _)) => seen += 1,
                Ok(other) => panic!("unexpected exit in the bare loop: {other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => panic!("KVM_RUN failed in the bare loop: {e}"),
            }
        }
        start.elapsed()
    }
}

fn per_exit_ns(elapsed: Duration, exits: u64) -> f64 {
    elapsed.as_nanos() as f64 / exits as f64
}

/// Both sides over the same number of exits, alternating, so drift on the host hits both.
fn compare(runner: &RunnerSide, bare: &mut BareSide) {
    let control = runner.running.control();
    let (mut runner_total, mut bare_total) = (Duration::ZERO, Duration::ZERO);
    for round in 1..=COMPARE_ROUNDS {
        control.resume();
        let r = runner.time(COMPARE_EXITS);
        control.pause();
        let b = bare.time(COMPARE_EXITS);
        println!(
            "round {round}: runner {:.0} ns, bare {:.0} ns per exit",
            per_exit_ns(r, COMPARE_EXITS),
            per_exit_ns(b, COMPARE_EXITS)
        );
        runner_total += r;
        bare_total += b;
    }
    let exits = COMPARE_EXITS * COMPARE_ROUNDS as u64;
    let (r, b) = (
        per_exit_ns(runner_total, exits),
        per_exit_ns(bare_total, exits),
    );
    println!(
        "exit round trip: runner {r:.0} ns, bare {b:.0} ns, ratio {:.3}",
        r / b
    );
}

fn main() {
    if kvm_ioctls::Kvm::new().is_err() {
        println!("SKIPPED: /dev/kvm not available");
        return;
    }
    let runner = RunnerSide::start().expect("starting the runner's VM");
    let mut bare = BareSide {
        guest: Guest::new().expect("setting up the bare loop's VM"),
    };

    let mut criterion = Criterion::default().configure_from_args();
    {
        let mut group = criterion.benchmark_group("exit_roundtrip");
        // About 30 µs an exit: a few seconds give tens of thousands of exits per benchmark
        // and keep the whole run under a minute.
        group
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5))
            .throughput(Throughput::Elements(1));
        group.bench_function("vmkit_runner", |b| {
            b.iter_custom(|iters| runner.time(iters))
        });
        runner.running.control().pause();
        group.bench_function("bare_kvm_run", |b| b.iter_custom(|iters| bare.time(iters)));
        group.finish();
    }
    criterion.final_summary();

    // `cargo bench` passes --bench; without it (cargo test --benches) criterion only checks
    // that each benchmark runs, and so should the comparison not run.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list") {
        compare(&runner, &mut bare);
    }
    runner.running.stop();
}
