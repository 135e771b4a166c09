//! Seccomp filters for the example VMM's threads (the `seccompiler` crate).
//!
//! Each kind of thread runs under a filter that allows only the system calls it makes:
//! - **vcpu**: the vCPU threads, from before their first `KVM_RUN` (a [`VmRunner`] hook). They
//!   run the device handlers of guest exits, so their list covers those (KVM and VFIO
//!   ioctls, vfio-user messages, a virtio-blk queue's set-up), but not opening files,
//!   sockets or processes, nor disk I/O.
//! - **io**: the virtio-blk queue threads and the engines' helper threads they start, and the
//!   console input thread. They are started by one spawner thread that is under this filter
//!   itself ([`IoThreadSpawner`]): a thread inherits its creator's filter, so a queue thread
//!   started in place by a vCPU thread would carry the vCPU filter too.
//! - **main**: the thread that built the VM, once the VM runs ([`SeccompFilters::apply`] with
//!   [`ThreadRole::Main`]): waiting, the report, and tearing the devices down.
//!
//! A forbidden call raises `SIGSYS`; the handler writes which thread made which call to
//! standard error and ends the process with [`EXIT_FORBIDDEN_SYSCALL`]. The filters are kept
//! as seccompiler JSON (`src/seccomp/x86_64.json`, with a reason beside each call); a file in
//! the same format replaces them (`--seccomp-filter`), and `--no-seccomp` turns them off.
//!
//! [`VmRunner`]: vmkit_vcpu::VmRunner

mod syscall_names;

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, TargetArch};
use vmkit_virtio_blk::spawner::{ThreadSpawner, ThreadWork};

/// The built-in filters, in seccompiler's JSON format.
pub const BUILTIN_FILTERS_JSON: &str = include_str!("x86_64.json");

/// The process exit code after a forbidden system call: 128 + `SIGSYS`, as a shell reports a
/// process killed by that signal.
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 128 + libc::SIGSYS;

/// The largest filter file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Which filters a VM's threads run under.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SeccompConfig {
    /// The built-in filters.
    #[default]
    Builtin,
    /// Filters read from a seccompiler JSON file with the keys `main`, `vcpu` and `io`.
    File(PathBuf),
    /// No filters (for debugging).
    Off,
}

/// The kinds of thread, each with its filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// The thread that built the VM.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// A device I/O thread.
    Io,
}

impl ThreadRole {
    const ALL: [ThreadRole; 3] = [ThreadRole::Main, ThreadRole::Vcpu, ThreadRole::Io];

    /// The filter's key in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Main => "main",
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::Io => "io",
        }
    }
}

/// Why filters could not be loaded or applied.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The filter file is larger than any filter set.
    #[error("{path}: larger than {MAX_FILE_BYTES} bytes: not a filter file")]
    TooLarge {
        /// The file.
        path: String,
    },
    /// The JSON did not compile.
    #[error("{origin}: {reason}")]
    Compile {
        /// The file, or "built-in filters".
        origin: String,
        /// seccompiler's message.
        reason: String,
    },
    /// A thread kind has no filter, or a filter names an unknown kind.
    #[error("{origin}: {reason}")]
    Keys {
        /// The file, or "built-in filters".
        origin: String,
        /// Which keys are missing or unknown.
        reason: String,
    },
    /// The kernel refused the filter.
    #[error("cannot apply the {role} filter: {reason}")]
    Apply {
        /// The thread kind.
        role: &'static str,
        /// seccompiler's message.
        reason: String,
    },
}

/// Compiled filters, one per [`ThreadRole`].
pub struct SeccompFilters {
    programs: HashMap<&'static str, BpfProgram>,
}

impl std::fmt::Debug for SeccompFilters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sizes: Vec<(&str, usize)> = self
            .programs
            .iter()
            .map(|(role, program)| (*role, program.len()))
            .collect();
        sizes.sort();
        f.debug_struct("SeccompFilters")
            .field("instructions", &sizes)
            .finish()
    }
}

impl SeccompFilters {
    /// The filters `config` asks for; `None` when they are off.
    pub fn load(config: &SeccompConfig) -> Result<Option<Arc<SeccompFilters>>, SeccompError> {
        match config {
            SeccompConfig::Off => Ok(None),
            SeccompConfig::Builtin => Self::builtin().map(|f| Some(Arc::new(f))),
            SeccompConfig::File(path) => Self::from_file(path).map(|f| Some(Arc::new(f))),
        }
    }

    /// The built-in filters.
    pub fn builtin() -> Result<SeccompFilters, SeccompError> {
        Self::from_json(BUILTIN_FILTERS_JSON.as_bytes(), "built-in filters")
    }

    /// Filters from a seccompiler JSON file.
    pub fn from_file(path: &Path) -> Result<SeccompFilters, SeccompError> {
        let name = path.display().to_string();
        let read_error = |source| SeccompError::Read {
            path: name.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut text = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_FILE_BYTES + 1),
            &mut text,
        )
        .map_err(read_error)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(SeccompError::TooLarge { path: name });
        }
        Self::from_json(&text, &name)
    }

    /// Filters from seccompiler JSON with exactly the keys `main`, `vcpu` and `io`.
    pub fn from_json(json: &[u8], origin: &str) -> Result<SeccompFilters, SeccompError> {
        let mut compiled =
            seccompiler::compile_from_json(json, TargetArch::x86_64).map_err(|e| {
                SeccompError::Compile {
                    origin: origin.to_string(),
                    reason: e.to_string(),
                }
            })?;
        let mut programs = HashMap::new();
        let mut missing = Vec::new();
        for role in ThreadRole::ALL {
            match compiled.remove(role.name()) {
                Some(program) => {
                    programs.insert(role.name(), program);
                }
                None => missing.push(role.name()),
            }
        }
        let mut unknown: Vec<String> = compiled.into_keys().collect();
        unknown.sort();
        if !missing.is_empty() || !unknown.is_empty() {
            let mut reasons = Vec::new();
            if !missing.is_empty() {
                reasons.push(format!("no filter for {}", missing.join(", ")));
            }
            if !unknown.is_empty() {
                reasons.push(format!(
                    "unknown thread kinds {} (the kinds are main, vcpu and io)",
                    unknown.join(", ")
                ));
            }
            return Err(SeccompError::Keys {
                origin: origin.to_string(),
                reason: reasons.join("; "),
            });
        }
        Ok(SeccompFilters { programs })
    }

    /// Confines the calling thread to `role`'s filter, for the rest of its life (and its
    /// future children's).
    pub fn apply(&self, role: ThreadRole) -> Result<(), SeccompError> {
        prepare_process();
        remember_thread(role);
        let program = self.programs.get(role.name()).ok_or(SeccompError::Apply {
            role: role.name(),
            reason: "no such filter".into(),
        })?;
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Apply {
            role: role.name(),
            reason: e.to_string(),
        })
    }
}

/// Process-wide set-up before the first filter: the handler that reports a forbidden call,
/// and a fixed limit on malloc arenas. Without one, glibc's allocator reads
/// /sys/devices/system/cpu/online in whichever thread first needs a new arena, and no thread
/// but the main one may open files.
fn prepare_process() {
    static PREPARE: Once = Once::new();
    PREPARE.call_once(|| {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let arenas = i32::try_from(8 * cpus).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes an allocator tunable.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        // SAFETY: the handler only reads its siginfo and a thread-local buffer, writes to
        // standard error and exits: all async-signal-safe.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_forbidden_syscall as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
        };
        if installed != 0 {
            log::warn!(
                "seccomp: no SIGSYS handler ({}): a forbidden call ends the process unexplained",
                std::io::Error::last_os_error()
            );
        }
    });
}

/// How a thread is named in the report of a forbidden call: "vcpu thread 'vcpu0'".
const LABEL_BYTES: usize = 64;

thread_local! {
    // Filled before the filter is applied; read by the SIGSYS handler, which cannot allocate.
    static THREAD_LABEL: Cell<([u8; LABEL_BYTES], usize)> =
        const { Cell::new(([0; LABEL_BYTES], 0)) };
}

fn remember_thread(role: ThreadRole) {
    let name = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_string();
    let text = format!("{} thread '{name}'", role.name());
    let mut label = [0u8; LABEL_BYTES];
    let len = text.len().min(LABEL_BYTES);
    label[..len].copy_from_slice(&text.as_bytes()[..len]);
    THREAD_LABEL.with(|cell| cell.set((label, len)));
}

/// A message built without allocating, for the signal handler.
struct Message {
    bytes: [u8; 512],
    len: usize,
}

impl Message {
    fn push(&mut self, text: &[u8]) {
        let room = self.bytes.len() - self.len;
        let n = text.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let negative = value < 0;
        let mut rest = value.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if negative {
            self.push(b"-");
        }
        self.push(&digits[at..]);
    }
}

/// The name of x86-64 system call `number`, if it has one.
pub fn syscall_name(number: i64) -> Option<&'static str> {
    usize::try_from(number)
        .ok()
        .and_then(|n| syscall_names::SYSCALL_NAMES.get(n))
        .copied()
        .filter(|name| !name.is_empty())
}

/// The report of a forbidden call, as the handler writes it. `label` says which thread
/// applied its filter ("io thread 'io-spawner'"); a thread that inherited its filter has none,
/// and is named by `name`, its kernel name.
fn forbidden_call_message(label: &[u8], name: &[u8], number: i64) -> Message {
    let mut message = Message {
        bytes: [0; 512],
        len: 0,
    };
    message.push(b"vmkit: seccomp: the ");
    if !label.is_empty() {
        message.push(label);
    } else {
        message.push(b"thread '");
        message.push(name);
        message.push(b"' (under the filter of the thread that started it)");
    }
    message.push(b" made system call ");
    message.push_number(number);
    if let Some(name) = syscall_name(number) {
        message.push(b" (");
        message.push(name.as_bytes());
        message.push(b")");
    }
    message.push(
        b", which its filter forbids; the VM is ended. Run with --no-seccomp to debug, or \
          allow the call with --seccomp-filter.\n",
    );
    message
}

// Offset of `si_syscall` in an x86-64 siginfo_t for SIGSYS: three ints (signo, errno, code),
// padding to 8, then `_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_forbidden_syscall(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let number = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a full siginfo_t (128 bytes) to an SA_SIGINFO handler;
        // for a seccomp SIGSYS the int at this offset is the system call number.
        i64::from(unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read_unaligned()
        })
    };
    let (label, len) = THREAD_LABEL
        .try_with(Cell::get)
        .unwrap_or(([0; LABEL_BYTES], 0));
    // The kernel's name of the thread (16 bytes with the NUL); every filter allows this.
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer given.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let message = forbidden_call_message(&label[..len], &name[..name_len], number);
    // SAFETY: write and _exit are async-signal-safe and allowed by every filter; the buffer
    // is valid for `len` bytes.
    unsafe {
        libc::write(
            libc::STDERR_FILENO,
            message.bytes.as_ptr().cast(),
            message.len,
        );
        libc::_exit(EXIT_FORBIDDEN_SYSCALL);
    }
}

/// A request to start a thread: its name, its work and where to send its handle.
type SpawnRequest = (
    String,
    ThreadWork,
    mpsc::SyncSender<std::io::Result<JoinHandle<()>>>,
);

/// Starts device I/O threads from a thread of its own under the **io** filter, so that they
/// inherit that filter and nothing else, whichever thread asks (a vCPU thread, when the
/// guest's driver starts a virtio-blk device).
pub struct IoThreadSpawner {
    requests: Mutex<Option<mpsc::Sender<SpawnRequest>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl IoThreadSpawner {
    /// Starts the spawner thread, which confines itself with `filters`' io filter (or runs
    /// unfiltered when `filters` is `None`).
    pub fn start(filters: Option<Arc<SeccompFilters>>) -> std::io::Result<IoThreadSpawner> {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("io-spawner".into())
            .spawn(move || {
                let applied = match &filters {
                    Some(filters) => filters.apply(ThreadRole::Io),
                    None => Ok(()),
                };
                let failed = applied.is_err();
                let _ = ready_tx.send(applied);
                if failed {
                    return;
                }
                for (name, work, reply) in incoming {
                    let _ = reply.send(std::thread::Builder::new().name(name).spawn(work));
                }
            })?;
        match ready.recv() {
            Ok(Ok(())) => Ok(IoThreadSpawner {
                requests: Mutex::new(Some(requests)),
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Err(_) => Err(std::io::Error::other("the spawner thread ended at start")),
        }
    }

    /// Starts `work` on a thread named `name`: the same as [`ThreadSpawner::spawn`], for the
    /// VMM's own I/O threads (the console input).
    pub fn spawn_thread(&self, name: String, work: ThreadWork) -> std::io::Result<JoinHandle<()>> {
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| std::io::Error::other("the spawner has stopped"))?;
        let (reply, handle) = mpsc::sync_channel(1);
        requests
            .send((name, work, reply))
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
        handle
            .recv()
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
    }
}

impl ThreadSpawner for IoThreadSpawner {
    fn spawn(&self, name: String, work: ThreadWork) -> std::io::Result<JoinHandle<()>> {
        self.spawn_thread(name, work)
    }
}

impl Drop for IoThreadSpawner {
    fn drop(&mut self) {
        // Closing the channel ends the spawner's loop.
        drop(
            self.requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_filters_compile_with_every_thread_kind() {
        let filters = SeccompFilters::builtin().unwrap();
        for role in ThreadRole::ALL {
            assert!(filters.programs[role.name()].len() > 10, "{role:?}");
        }
    }

    #[test]
    fn the_builtin_lists_keep_file_opening_and_disk_io_where_they_belong() {
        let json: serde_json::Value = serde_json::from_str(BUILTIN_FILTERS_JSON).unwrap();
        let calls = |role: &str| -> Vec<String> {
            json[role]["filter"]
                .as_array()
                .unwrap()
                .iter()
                .map(|rule| rule["syscall"].as_str().unwrap().to_string())
                .collect()
        };
        let (main, vcpu, io) = (calls("main"), calls("vcpu"), calls("io"));
        for call in [
            "openat", "open", "socket", "connect", "execve", "fork", "clone3",
        ] {
            assert!(!vcpu.contains(&call.to_string()), "vcpu allows {call}");
        }
        for call in ["openat", "socket", "connect", "execve", "fork"] {
            assert!(!io.contains(&call.to_string()), "io allows {call}");
        }
        for call in ["fdatasync", "fallocate", "io_uring_enter"] {
            assert!(!vcpu.contains(&call.to_string()), "vcpu allows {call}");
            assert!(io.contains(&call.to_string()), "io lacks {call}");
        }
        // The handler's own calls must pass every filter.
        for list in [&main, &vcpu, &io] {
            for call in ["write", "exit_group", "prctl"] {
                assert!(list.contains(&call.to_string()), "{call} missing");
            }
        }
    }

    #[test]
    fn missing_and_unknown_thread_kinds_are_errors() {
        let rule = r#"{"default_action": "trap", "filter_action": "allow", "filter": []}"#;
        let two = format!(r#"{{"main": {rule}, "vcpu": {rule}}}"#);
        let error = SeccompFilters::from_json(two.as_bytes(), "two.json").unwrap_err();
        assert_eq!(error.to_string(), "two.json: no filter for io");
        let four = format!(r#"{{"main": {rule}, "vcpu": {rule}, "io": {rule}, "api": {rule}}}"#);
        let error = SeccompFilters::from_json(four.as_bytes(), "four.json").unwrap_err();
        assert!(
            error.to_string().contains("unknown thread kinds api"),
            "{error}"
        );
        let error = SeccompFilters::from_json(b"{not json", "bad.json").unwrap_err();
        assert!(error.to_string().starts_with("bad.json: "), "{error}");
        let unknown_call = format!(
            r#"{{"main": {rule}, "vcpu": {rule}, "io": {{"default_action": "trap",
                "filter_action": "allow", "filter": [{{"syscall": "no_such_call"}}]}}}}"#
        );
        assert!(SeccompFilters::from_json(unknown_call.as_bytes(), "x").is_err());
    }

    #[test]
    fn a_missing_file_is_an_error_that_names_it() {
        let error = SeccompFilters::from_file(Path::new("/nonexistent/filters.json")).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/filters.json"),
            "{error}"
        );
    }

    #[test]
    fn the_report_names_the_thread_and_the_call() {
        let message = forbidden_call_message(b"io thread 'io-spawner'", b"", 75);
        let text = String::from_utf8_lossy(&message.bytes[..message.len]).into_owned();
        assert!(
            text.starts_with(
                "vmkit: seccomp: the io thread 'io-spawner' made system call 75 (fdatasync), \
                 which its filter forbids"
            ),
            "{text}"
        );
        assert!(text.ends_with("--seccomp-filter.\n"));
        let message = forbidden_call_message(b"", b"vmkit-blk-io0", 9999);
        let text = String::from_utf8_lossy(&message.bytes[..message.len]).into_owned();
        assert!(
            text.contains(
                "the thread 'vmkit-blk-io0' (under the filter of the thread that started it) \
                 made system call 9999, which"
            ),
            "{text}"
        );
    }

    #[test]
    fn syscall_names_follow_the_x86_64_table() {
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(16), Some("ioctl"));
        assert_eq!(syscall_name(257), Some("openat"));
        assert_eq!(syscall_name(435), Some("clone3"));
        assert_eq!(syscall_name(-1), None);
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn the_spawner_starts_named_threads_under_its_filter() {
        // Unfiltered here: applying a filter would confine this test thread's children.
        let spawner = IoThreadSpawner::start(None).unwrap();
        let (tx, rx) = mpsc::channel();
        let handle = spawner
            .spawn(
                "virtio-blk-q7".into(),
                Box::new(move || {
                    let _ = tx.send(std::thread::current().name().map(str::to_owned));
                }),
            )
            .unwrap();
        handle.join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("virtio-blk-q7"));
        drop(spawner);
    }
}
