//! Per-vCPU statistics: the host's top/sar view of a guest.
//!
//! Counters are updated by the vCPU thread with relaxed atomics and can be read from any
//! thread while the VM runs. Guest time is what the host kernel accounted to the vCPU thread
//! (`/proc/self/task/TID/stat`, field 43), so it agrees with what top and sar show.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Kinds of exit counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum ExitKind {
    /// `in` from an I/O port.
    IoIn,
    /// `out` to an I/O port.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// `hlt`.
    Hlt,
    /// `KVM_EXIT_SHUTDOWN` (triple fault).
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent,
    /// `KVM_RUN` interrupted by a signal (a kick from pause, resume or stop).
    Interrupted,
    /// Any other exit.
    Other,
}

impl ExitKind {
    /// Every kind, in the order of [`ExitCounts`]'s fields.
    pub const ALL: [ExitKind; 9] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::SystemEvent,
        ExitKind::Interrupted,
        ExitKind::Other,
    ];

    /// A short name, as used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system_event",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }
}

/// Exit counts by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    counts: [u64; ExitKind::ALL.len()],
}

impl ExitCounts {
    /// The count for one kind.
    pub fn get(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize]
    }

    /// All exits, interruptions by kicks included.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(name, count)` for every kind.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ExitKind::ALL
            .iter()
            .map(|&kind| (kind.name(), self.get(kind)))
    }
}

/// A snapshot of one vCPU's statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// vCPU index.
    pub index: usize,
    /// Host thread id of the vCPU thread (0 before it started).
    pub thread_id: i32,
    /// Exits by kind.
    pub exits: ExitCounts,
    /// Wall time spent inside `KVM_RUN`.
    pub kvm_run_time: Duration,
    /// Wall time spent handling exits in the VMM (device emulation included).
    pub exit_handling_time: Duration,
    /// Guest time the host kernel accounted to the vCPU thread.
    pub guest_time: Duration,
    /// The local APIC's interrupt request register when the vCPU thread ended: bit `v` of
    /// word `v / 32` is set if vector `v` was raised and not yet taken (all zero while the
    /// vCPU runs). A guest that runs with interrupts off, like the built-in guest, keeps
    /// every interrupt it was sent here, which shows that an MSI reached it.
    pub pending_interrupts: [u32; 8],
}

impl VcpuStats {
    /// The vectors in [`pending_interrupts`](Self::pending_interrupts), ascending.
    pub fn pending_vectors(&self) -> impl Iterator<Item = u8> + '_ {
        (0..=255u8).filter(|&v| self.pending_interrupts[usize::from(v / 32)] >> (v % 32) & 1 != 0)
    }
}

/// The live counters of one vCPU, shared between its thread and readers.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    index: usize,
    thread_id: AtomicI32,
    exits: [AtomicU64; ExitKind::ALL.len()],
    kvm_run_ns: AtomicU64,
    exit_handling_ns: AtomicU64,
    // Guest time read by the thread itself just before it ends: afterwards its /proc entry is gone.
    final_guest_time_ns: AtomicU64,
    final_irr: [AtomicU32; 8],
    finished: std::sync::atomic::AtomicBool,
    // The thread's own stat file, opened as it starts: by the time it ends it may run under a
    // seccomp filter that allows no opening of files.
    stat_file: std::sync::Mutex<Option<std::fs::File>>,
}

impl VcpuCounters {
    /// Counters for vCPU `index`.
    pub fn new(index: usize) -> Self {
        VcpuCounters {
            index,
            ..Default::default()
        }
    }

    /// Records the calling thread as this vCPU's, and opens its stat file.
    pub(crate) fn set_thread_id(&self, tid: i32) {
        self.thread_id.store(tid, Ordering::Relaxed);
        let file = std::fs::File::open(format!("/proc/self/task/{tid}/stat")).ok();
        *self.stat_file.lock().unwrap_or_else(|e| e.into_inner()) = file;
    }

    pub(crate) fn count_exit(&self, kind: ExitKind) {
        self.exits[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_kvm_run(&self, time: Duration) {
        self.kvm_run_ns
            .fetch_add(time.as_nanos() as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_exit_handling(&self, time: Duration) {
        self.exit_handling_ns
            .fetch_add(time.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Records the LAPIC's IRR (the eight 32-bit words at 0x200, 16 bytes apart, of a
    /// `KVM_GET_LAPIC` register page) as the vCPU thread ends.
    pub(crate) fn set_final_irr(&self, lapic_page: &[u8]) {
        for (i, word) in self.final_irr.iter().enumerate() {
            let at = 0x200 + 16 * i;
            if let Some(bytes) = lapic_page.get(at..at + 4) {
                let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                word.store(value, Ordering::Relaxed);
            }
        }
    }

    /// Called on the vCPU thread as it ends, while its /proc entry still exists.
    pub(crate) fn finish(&self) {
        let file = self
            .stat_file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let guest = file
            .and_then(|file| read_stat(&file))
            .and_then(|stat| parse_guest_time(&stat, clock_ticks_per_second()))
            .unwrap_or_default();
        self.final_guest_time_ns
            .store(guest.as_nanos() as u64, Ordering::Relaxed);
        self.finished.store(true, Ordering::Release);
    }

    /// A consistent-enough snapshot (each counter is read atomically).
    pub fn snapshot(&self) -> VcpuStats {
        let mut exits = ExitCounts::default();
        for (count, atomic) in exits.counts.iter_mut().zip(&self.exits) {
            *count = atomic.load(Ordering::Relaxed);
        }
        let thread_id = self.thread_id.load(Ordering::Relaxed);
        let guest_time = if self.finished.load(Ordering::Acquire) {
            Duration::from_nanos(self.final_guest_time_ns.load(Ordering::Relaxed))
        } else {
            thread_guest_time(thread_id).unwrap_or_default()
        };
        VcpuStats {
            index: self.index,
            thread_id,
            exits,
            kvm_run_time: Duration::from_nanos(self.kvm_run_ns.load(Ordering::Relaxed)),
            exit_handling_time: Duration::from_nanos(self.exit_handling_ns.load(Ordering::Relaxed)),
            guest_time,
            pending_interrupts: std::array::from_fn(|i| self.final_irr[i].load(Ordering::Relaxed)),
        }
    }
}

/// The id of the calling thread.
pub(crate) fn current_thread_id() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Guest time the kernel accounted to thread `tid` of this process: field 43 (`guest_time`) of
/// `/proc/self/task/TID/stat`, in clock ticks.
pub fn thread_guest_time(tid: i32) -> Option<Duration> {
    if tid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    parse_guest_time(&stat, clock_ticks_per_second())
}

/// The contents of an open stat file, read from its start (a stat line is a few hundred bytes).
fn read_stat(file: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut buffer = [0u8; 4096];
    let n = file.read_at(&mut buffer, 0).ok()?;
    String::from_utf8(buffer[..n].to_vec()).ok()
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Field 43 of a `stat` line. The second field (the command) may contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_guest_time(stat: &str, ticks_per_second: u64) -> Option<Duration> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields after the command start at field 3; field 43 is the 41st of them.
    let ticks: u64 = after_comm.split_whitespace().nth(40)?.parse().ok()?;
    Some(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / ticks_per_second.max(1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_vectors_come_from_the_irr_words() {
        let counters = VcpuCounters::new(0);
        let mut page = [0u8; 1024];
        // Vector 0x41 is bit 1 of IRR word 2 (at 0x220); vector 0xff is bit 31 of word 7.
        page[0x220] = 0b10;
        page[0x270 + 3] = 0x80;
        counters.set_final_irr(&page);
        let stats = counters.snapshot();
        assert_eq!(
            stats.pending_vectors().collect::<Vec<_>>(),
            vec![0x41, 0xff]
        );
        counters.set_final_irr(&[0u8; 16]);
        assert_eq!(
            counters.snapshot().pending_vectors().count(),
            2,
            "a short page changes nothing"
        );
    }

    #[test]
    fn parses_field_43_past_a_command_with_spaces() {
        // pid (comm) state, then fields 4..=52; field 43 set to 250.
        let mut fields: Vec<String> = (4..=52).map(|n| n.to_string()).collect();
        fields[43 - 4] = "250".to_string();
        let line = format!("1234 (vcpu 0) (x) R {}", fields.join(" "));
        assert_eq!(
            parse_guest_time(&line, 100),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(parse_guest_time("1 (x) R 1 2", 100), None);
    }

    #[test]
    fn reads_this_threads_stat() {
        // A thread that never ran a guest has guest time zero, but the field must parse.
        assert_eq!(thread_guest_time(current_thread_id()), Some(Duration::ZERO));
    }

    #[test]
    fn counts_and_snapshots() {
        let counters = VcpuCounters::new(3);
        counters.count_exit(ExitKind::IoOut);
        counters.count_exit(ExitKind::IoOut);
        counters.count_exit(ExitKind::MmioRead);
        counters.add_kvm_run(Duration::from_micros(5));
        let stats = counters.snapshot();
        assert_eq!(stats.index, 3);
        assert_eq!(stats.exits.get(ExitKind::IoOut), 2);
        assert_eq!(stats.exits.total(), 3);
        assert_eq!(stats.kvm_run_time, Duration::from_micros(5));
    }
}
