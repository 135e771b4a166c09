//! The vCPU runner: one thread per vCPU looping on `KVM_RUN`, exits dispatched to the buses,
//! and control (pause, resume, stop) from any other thread.
//!
//! # Kicking a vCPU out of the guest
//! Control requests change a shared state, then send each vCPU thread a real-time signal. Its
//! handler sets `kvm_run.immediate_exit`, so the request is seen whether the thread is inside
//! `KVM_RUN` (which returns `EINTR`) or about to enter it (which then returns at once): no
//! wake-up is lost between the state check and the ioctl.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::IoBuses;
use crate::error::{Error, Result, VcpuError, VcpuSnapshot};
use crate::stats::{current_thread_id, ExitKind, VcpuCounters, VcpuStats};
use crate::vm::Vcpu;

/// The reason a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// A stop was requested, by [`VmControl::stop`] or by a device (such as an exit port).
    Stopped,
    /// Every vCPU halted.
    AllHalted,
    /// A vCPU shut down: on x86 a triple fault. The state is that vCPU's at the shutdown.
    Shutdown {
        /// vCPU index.
        index: usize,
        /// Registers at the shutdown.
        state: VcpuSnapshot,
    },
    /// The guest asked for a reset, power-off or reported a crash (`KVM_EXIT_SYSTEM_EVENT`).
    SystemEvent {
        /// vCPU index.
        index: usize,
        /// What it asked for.
        event: SystemEvent,
    },
    /// A vCPU failed; the VM was stopped.
    Error(VcpuError),
}

/// Kinds of `KVM_EXIT_SYSTEM_EVENT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemEvent {
    /// Power off.
    Shutdown,
    /// Reset.
    Reset,
    /// Crash reported by the guest.
    Crash,
    /// Another type, by number.
    Other(u32),
}

/// What a finished VM reports.
#[derive(Clone, Debug)]
pub struct VmOutcome {
    /// Why it ended.
    pub end: VmEnd,
    /// Statistics of each vCPU, by index.
    pub stats: Vec<VcpuStats>,
}

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running = 0,
    Paused = 1,
    Stopping = 2,
}

struct Park {
    parked: usize,
    active: usize,
}

struct ThreadSlot {
    pthread: libc::pthread_t,
    alive: bool,
}

struct Shared {
    state: AtomicU8,
    park: Mutex<Park>,
    park_changed: Condvar,
    // Held while kicking, and by a thread while it marks itself dead, so a kick never targets a
    // thread that has been joined.
    threads: Mutex<Vec<ThreadSlot>>,
    end: Mutex<Option<VmEnd>>,
    counters: Vec<Arc<VcpuCounters>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking vCPU thread must not wedge the controller: the state stays consistent because
    // every critical section here is a few plain assignments.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn state(&self) -> RunState {
        match self.state.load(Ordering::SeqCst) {
            0 => RunState::Running,
            1 => RunState::Paused,
            _ => RunState::Stopping,
        }
    }

    fn kick_all(&self) {
        let threads = lock(&self.threads);
        for slot in threads.iter().filter(|slot| slot.alive) {
            // SAFETY: the thread is alive (it clears `alive` under this lock before it returns),
            // so its pthread_t is valid; pthread_kill only queues a signal.
            unsafe { libc::pthread_kill(slot.pthread, kick_signal()) };
        }
    }

    fn request_stop(&self, end: VmEnd) {
        lock(&self.end).get_or_insert(end);
        {
            let _park = lock(&self.park);
            self.state.store(RunState::Stopping as u8, Ordering::SeqCst);
            self.park_changed.notify_all();
        }
        self.kick_all();
    }

    /// Parks the calling vCPU thread while the VM is paused.
    fn park(&self) {
        let mut park = lock(&self.park);
        park.parked += 1;
        self.park_changed.notify_all();
        while self.state() == RunState::Paused {
            park = self
                .park_changed
                .wait(park)
                .unwrap_or_else(|e| e.into_inner());
        }
        park.parked -= 1;
    }

    fn thread_finished(&self, index: usize, halted: bool) {
        {
            let mut threads = lock(&self.threads);
            threads[index].alive = false;
        }
        let mut park = lock(&self.park);
        park.active -= 1;
        if park.active == 0 && halted {
            lock(&self.end).get_or_insert(VmEnd::AllHalted);
        }
        self.park_changed.notify_all();
    }
}

/// A handle that controls a running VM from any thread; cheap to clone. Devices hold one to
/// stop the VM (an exit port, a reset register).
#[derive(Clone)]
pub struct VmControl {
    shared: Arc<Shared>,
}

impl VmControl {
    /// Pauses every vCPU and returns once all of them are out of the guest and parked (or have
    /// ended). Does nothing if the VM is stopping. Call it from a thread other than the vCPU
    /// threads: a device handler that paused would wait for its own vCPU to park.
    pub fn pause(&self) {
        {
            let _park = lock(&self.shared.park);
            if self
                .shared
                .state
                .compare_exchange(
                    RunState::Running as u8,
                    RunState::Paused as u8,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_err()
            {
                return;
            }
        }
        self.shared.kick_all();
        let mut park = lock(&self.shared.park);
        while self.shared.state() == RunState::Paused && park.parked < park.active {
            park = self
                .shared
                .park_changed
                .wait(park)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Resumes a paused VM.
    pub fn resume(&self) {
        let _park = lock(&self.shared.park);
        let _ = self.shared.state.compare_exchange(
            RunState::Paused as u8,
            RunState::Running as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.shared.park_changed.notify_all();
    }

    /// Asks every vCPU to stop; returns at once. [`RunningVm::wait`] reports the end as
    /// [`VmEnd::Stopped`] unless something else ended the VM first.
    pub fn stop(&self) {
        self.shared.request_stop(VmEnd::Stopped);
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.shared.state() == RunState::Paused
    }

    /// Whether a stop has been requested or the VM has ended.
    pub fn is_stopping(&self) -> bool {
        self.shared.state() == RunState::Stopping
    }

    /// Live statistics of every vCPU.
    pub fn stats(&self) -> Vec<VcpuStats> {
        self.shared.counters.iter().map(|c| c.snapshot()).collect()
    }
}

/// Runs on each vCPU thread before its first `KVM_RUN`, with the vCPU's index: the place for
/// per-thread set-up such as a seccomp filter or CPU affinity. An `Err` ends the VM with
/// [`VcpuError::ThreadSetup`] before that vCPU runs any guest code.
pub type ThreadStartHook = Arc<dyn Fn(usize) -> std::result::Result<(), String> + Send + Sync>;

/// A VM about to run. Its [`VmControl`] exists before any vCPU does, so a device (an exit port,
/// a reset line) can hold it from the guest's first instruction: a guest that ends at once
/// cannot race the hand-over.
pub struct VmRunner {
    vcpus: Vec<Vcpu>,
    buses: Arc<IoBuses>,
    shared: Arc<Shared>,
    thread_start: Option<ThreadStartHook>,
}

impl VmRunner {
    /// Prepares `vcpus`, whose boot state must be set, to run with `buses`.
    pub fn new(vcpus: Vec<Vcpu>, buses: Arc<IoBuses>) -> VmRunner {
        let counters: Vec<Arc<VcpuCounters>> = vcpus
            .iter()
            .map(|vcpu| Arc::new(VcpuCounters::new(vcpu.index)))
            .collect();
        let shared = Arc::new(Shared {
            state: AtomicU8::new(RunState::Running as u8),
            park: Mutex::new(Park {
                parked: 0,
                active: vcpus.len(),
            }),
            park_changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            end: Mutex::new(None),
            counters,
        });
        VmRunner {
            vcpus,
            buses,
            shared,
            thread_start: None,
        }
    }

    /// The VM's control handle. A stop requested before [`start`](Self::start) ends the VM
    /// before any guest code runs.
    pub fn control(&self) -> VmControl {
        VmControl {
            shared: self.shared.clone(),
        }
    }

    /// Runs `hook` on every vCPU thread before its first `KVM_RUN`.
    pub fn on_thread_start(mut self, hook: ThreadStartHook) -> VmRunner {
        self.thread_start = Some(hook);
        self
    }

    /// Starts one thread per vCPU.
    pub fn start(self) -> Result<RunningVm> {
        install_kick_handler()?;
        let VmRunner {
            vcpus,
            buses,
            shared,
            thread_start,
        } = self;
        let mut handles = Vec::with_capacity(vcpus.len());
        // Threads wait for this lock before running, so every one is registered for kicks first.
        let mut threads = lock(&shared.threads);
        for (position, vcpu) in vcpus.into_iter().enumerate() {
            let index = vcpu.index;
            let thread_shared = shared.clone();
            let thread_buses = buses.clone();
            let thread_start = thread_start.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    vcpu_thread(position, vcpu, &thread_buses, &thread_shared, thread_start)
                });
            let handle = match spawned {
                Ok(handle) => handle,
                Err(source) => {
                    drop(threads);
                    // Stop and join the threads already started, then report.
                    shared.request_stop(VmEnd::Stopped);
                    for handle in handles {
                        let _ = JoinHandle::join(handle);
                    }
                    return Err(Error::SpawnThread { index, source });
                }
            };
            threads.push(ThreadSlot {
                pthread: handle.as_pthread_t(),
                alive: true,
            });
            handles.push(handle);
        }
        drop(threads);
        Ok(RunningVm {
            control: VmControl { shared },
            handles,
        })
    }
}

/// A VM whose vCPUs are running on their threads.
pub struct RunningVm {
    control: VmControl,
    handles: Vec<JoinHandle<()>>,
}

impl RunningVm {
    /// Starts one thread per vCPU. The vCPUs must have their boot state set. Devices that must
    /// stop the VM get their [`VmControl`] before the start through [`VmRunner`].
    pub fn start(vcpus: Vec<Vcpu>, buses: Arc<IoBuses>) -> Result<RunningVm> {
        VmRunner::new(vcpus, buses).start()
    }

    /// A control handle for other threads and devices.
    pub fn control(&self) -> VmControl {
        self.control.clone()
    }

    /// Waits until every vCPU thread has ended and reports why the VM ended.
    pub fn wait(self) -> VmOutcome {
        for handle in self.handles {
            // A panicking vCPU thread has already reported itself (see `ThreadExit`).
            let _ = handle.join();
        }
        let end = lock(&self.control.shared.end)
            .clone()
            .unwrap_or(VmEnd::Stopped);
        VmOutcome {
            end,
            stats: self.control.stats(),
        }
    }

    /// Stops the VM and waits for it.
    pub fn stop(self) -> VmOutcome {
        self.control.stop();
        self.wait()
    }
}

thread_local! {
    // The kvm_run page of the vCPU this thread runs, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own vCPU's mapped kvm_run page
            // and cleared before the VcpuFd (and the mapping) is dropped; a volatile byte write
            // is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

fn install_kick_handler() -> Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(Error::Signal);
    });
    result
}

/// What the loop does after an exit.
enum Next {
    Continue,
    /// Port I/O, dispatched once the borrow of the exit has ended (see [`dispatch_port_io`]).
    PortIo,
    Halt,
    End(Ending),
}

/// Why a vCPU ends the VM, before its registers are read into the report.
enum Ending {
    Shutdown,
    SystemEvent(SystemEvent),
    Internal,
    FailEntry { reason: u64, host_cpu: u32 },
    Unhandled(String),
    RunFailed(String),
}

/// Runs when a vCPU thread ends, normally or by a panic in a device handler: the kick handler
/// forgets the kvm_run page before it is unmapped, and the VM learns the thread is gone (so a
/// pause does not wait for it and a kick never targets it).
struct ThreadExit<'a> {
    shared: &'a Shared,
    position: usize,
    index: usize,
    halted: bool,
}

impl Drop for ThreadExit<'_> {
    fn drop(&mut self) {
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
        self.shared.counters[self.position].finish();
        if std::thread::panicking() {
            self.shared
                .request_stop(VmEnd::Error(VcpuError::Panicked { index: self.index }));
        }
        self.shared.thread_finished(self.position, self.halted);
    }
}

fn vcpu_thread(
    position: usize,
    mut vcpu: Vcpu,
    buses: &IoBuses,
    shared: &Shared,
    thread_start: Option<ThreadStartHook>,
) {
    // Wait until the spawner has registered every thread for kicks.
    drop(lock(&shared.threads));
    let counters = &shared.counters[position];
    counters.set_thread_id(current_thread_id());
    // Declared after `vcpu`, so it runs before the vCPU's kvm_run mapping is dropped.
    let mut exit = ThreadExit {
        shared,
        position,
        index: vcpu.index,
        halted: false,
    };
    KVM_RUN.with(|run| run.set(vcpu.fd.get_kvm_run()));
    unblock_kick_signal();
    if let Some(hook) = thread_start {
        if let Err(reason) = hook(vcpu.index) {
            shared.request_stop(VmEnd::Error(VcpuError::ThreadSetup {
                index: vcpu.index,
                reason,
            }));
            return;
        }
    }

    exit.halted = loop {
        match shared.state() {
            RunState::Running => {}
            RunState::Paused => {
                shared.park();
                continue;
            }
            RunState::Stopping => break false,
        }
        let entered = Instant::now();
        let result = vcpu.fd.run();
        let exited = Instant::now();
        counters.add_kvm_run(exited - entered);
        let next = match result {
            Ok(exit) => handle_exit(exit, buses, counters),
            Err(e) if e.errno() == libc::EINTR => {
                counters.count_exit(ExitKind::Interrupted);
                Next::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => Next::End(Ending::RunFailed(e.to_string())),
        };
        if let Next::PortIo = next {
            dispatch_port_io(&mut vcpu.fd, buses);
        }
        vcpu.fd.set_kvm_immediate_exit(0);
        counters.add_exit_handling(exited.elapsed());
        match next {
            Next::Continue | Next::PortIo => {}
            Next::Halt => break true,
            Next::End(ending) => {
                shared.request_stop(vm_end(ending, &mut vcpu));
                break false;
            }
        }
    };
    // What interrupts were left pending, for reports and tests of interrupt delivery.
    if let Ok(lapic) = vcpu.fd.get_lapic() {
        // SAFETY: `regs` is a plain byte array; viewing its c_chars as u8 changes nothing.
        let page = unsafe {
            std::slice::from_raw_parts(lapic.regs.as_ptr().cast::<u8>(), lapic.regs.len())
        };
        counters.set_final_irr(page);
    }
}

fn unblock_kick_signal() {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; pthread_sigmask only changes
    // this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

fn handle_exit(exit: VcpuExit<'_>, buses: &IoBuses, counters: &VcpuCounters) -> Next {
    match exit {
        VcpuExit::IoIn(..) => {
            counters.count_exit(ExitKind::IoIn);
            Next::PortIo
        }
        VcpuExit::IoOut(..) => {
            counters.count_exit(ExitKind::IoOut);
            Next::PortIo
        }
        VcpuExit::MmioRead(address, data) => {
            counters.count_exit(ExitKind::MmioRead);
            buses.mmio.read(address, data);
            Next::Continue
        }
        VcpuExit::MmioWrite(address, data) => {
            counters.count_exit(ExitKind::MmioWrite);
            buses.mmio.write(address, data);
            Next::Continue
        }
        VcpuExit::Hlt => {
            counters.count_exit(ExitKind::Hlt);
            Next::Halt
        }
        VcpuExit::Shutdown => {
            counters.count_exit(ExitKind::Shutdown);
            Next::End(Ending::Shutdown)
        }
        VcpuExit::SystemEvent(kind, _) => {
            counters.count_exit(ExitKind::SystemEvent);
            Next::End(Ending::SystemEvent(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
                other => SystemEvent::Other(other),
            }))
        }
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => {
            counters.count_exit(ExitKind::Other);
            Next::Continue
        }
        VcpuExit::InternalError => {
            counters.count_exit(ExitKind::Other);
            Next::End(Ending::Internal)
        }
        VcpuExit::FailEntry(reason, host_cpu) => {
            counters.count_exit(ExitKind::Other);
            Next::End(Ending::FailEntry { reason, host_cpu })
        }
        other => {
            counters.count_exit(ExitKind::Other);
            Next::End(Ending::Unhandled(format!("{other:?}")))
        }
    }
}

/// Dispatches a `KVM_EXIT_IO` item by item: kvm-ioctls hands over the data of a `rep ins`/`outs`
/// as one slice without the access size, which devices need.
fn dispatch_port_io(fd: &mut VcpuFd, buses: &IoBuses) {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the union member KVM filled in.
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size).max(1);
    let total = size * io.count as usize;
    let base = (run as *mut kvm_run).cast::<u8>();
    // SAFETY: KVM puts `count * size` bytes of data at `data_offset` inside the kvm_run mapping
    // (the vCPU mmap area), which lives as long as `fd`; nothing else aliases it during the exit.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), total) };
    let port = u64::from(io.port);
    for item in data.chunks_exact_mut(size) {
        if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
            buses.pio.read(port, item);
        } else {
            buses.pio.write(port, item);
        }
    }
}

/// The report of a vCPU's end, with its registers and, for internal errors, KVM's data.
fn vm_end(ending: Ending, vcpu: &mut Vcpu) -> VmEnd {
    let index = vcpu.index;
    let state = snapshot(&vcpu.fd);
    match ending {
        Ending::Shutdown => VmEnd::Shutdown { index, state },
        Ending::SystemEvent(event) => VmEnd::SystemEvent { index, event },
        Ending::Internal => {
            let run = vcpu.fd.get_kvm_run();
            // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
            // member KVM filled in.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let count = (internal.ndata as usize).min(internal.data.len());
            VmEnd::Error(VcpuError::Internal {
                index,
                suberror: internal.suberror,
                data: internal.data[..count].to_vec(),
                state,
            })
        }
        Ending::FailEntry { reason, host_cpu } => VmEnd::Error(VcpuError::FailEntry {
            index,
            reason,
            host_cpu,
            state,
        }),
        Ending::Unhandled(exit) => VmEnd::Error(VcpuError::UnhandledExit { index, exit, state }),
        Ending::RunFailed(errno) => VmEnd::Error(VcpuError::Run { index, errno }),
    }
}

fn snapshot(fd: &VcpuFd) -> VcpuSnapshot {
    let regs = fd.get_regs().unwrap_or_default();
    let sregs = fd.get_sregs().unwrap_or_default();
    VcpuSnapshot {
        rip: regs.rip,
        rsp: regs.rsp,
        rflags: regs.rflags,
        cr0: sregs.cr0,
        cr2: sregs.cr2,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
        cs: sregs.cs.selector,
    }
}
