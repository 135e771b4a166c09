//! The sync engine: blocking `preadv`/`pwritev` on a pool of worker threads.
//!
//! Workers start on demand up to a limit, so an idle disk costs no threads. Reads that the
//! page cache can serve are done on the submitting thread with `RWF_NOWAIT` instead of being
//! handed to a worker: a hand-off costs more than such a read.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::{AsyncDisk, Completion, DiskInfo, EngineKind, Request, SyncDisk};
use crate::engine::{check_request, Iovecs};
use crate::error::{Error, Result};

/// Default limit of worker threads per disk: enough for a queue depth of 32 to reach the
/// device at once, as QEMU's pool (64 threads) does.
pub const DEFAULT_THREADS: usize = 32;

enum Operation {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

struct Job {
    token: u64,
    operation: Operation,
    offset: u64,
    len: u64,
    iovecs: Iovecs,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle_workers: usize,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work_ready: Condvar,
    done: Mutex<Vec<Completion>>,
    eventfd: EventFd,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked mid-request leaves nothing half-updated in these queues.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn complete(&self, completion: Completion) {
        let was_empty = {
            let mut done = lock(&self.done);
            done.push(completion);
            done.len() == 1
        };
        // One wake-up per batch: the reaper drains everything after reading the eventfd.
        if was_empty {
            // An eventfd write fails only when the counter would overflow, and then it is
            // readable anyway.
            let _ = self.eventfd.write(1);
        }
    }
}

fn run(disk: &dyn SyncDisk, job: &Job) -> Result<usize> {
    match job.operation {
        Operation::Read => disk.read_vectored(job.offset, job.iovecs.as_bufs()),
        Operation::Write => disk.write_vectored(job.offset, job.iovecs.as_bufs()),
        Operation::Flush => disk.flush().map(|()| 0),
        Operation::Discard => disk.discard(job.offset, job.len).map(|()| 0),
        Operation::WriteZeroes => disk.write_zeroes(job.offset, job.len).map(|()| 0),
    }
}

fn worker(disk: Arc<dyn SyncDisk>, shared: Arc<Shared>) {
    loop {
        let job = {
            let mut queue = lock(&shared.queue);
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.shutdown {
                    return;
                }
                queue.idle_workers += 1;
                queue = shared
                    .work_ready
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                queue.idle_workers -= 1;
            }
        };
        let result = run(disk.as_ref(), &job);
        shared.complete(Completion {
            token: job.token,
            result,
        });
    }
}

/// An [`AsyncDisk`] that runs requests on worker threads against a [`SyncDisk`].
pub struct ThreadPoolEngine {
    disk: Arc<dyn SyncDisk>,
    shared: Arc<Shared>,
    staged: Vec<Job>,
    /// Completions finished on the submitting thread.
    ready: Vec<Completion>,
    workers: Vec<JoinHandle<()>>,
    max_workers: usize,
    max_in_flight: usize,
    in_flight: usize,
}

impl ThreadPoolEngine {
    /// An engine for `disk` with at most `max_workers` threads and `max_in_flight` requests.
    pub fn new(disk: Arc<dyn SyncDisk>, max_workers: usize, max_in_flight: usize) -> Result<Self> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(Error::Io)?;
        Ok(Self::with_eventfd(
            disk,
            max_workers,
            max_in_flight,
            eventfd,
        ))
    }

    /// As [`new`](Self::new), signalling completions on a given eventfd (shared with
    /// another engine).
    pub fn with_eventfd(
        disk: Arc<dyn SyncDisk>,
        max_workers: usize,
        max_in_flight: usize,
        eventfd: EventFd,
    ) -> Self {
        ThreadPoolEngine {
            disk,
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                work_ready: Condvar::new(),
                done: Mutex::new(Vec::new()),
                eventfd,
            }),
            staged: Vec::new(),
            ready: Vec::new(),
            workers: Vec::new(),
            max_workers: max_workers.max(1),
            max_in_flight: max_in_flight.max(1),
            in_flight: 0,
        }
    }

    /// Worker threads started so far.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    fn spawn_worker(&mut self) -> Result<()> {
        let disk = self.disk.clone();
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vmkit-blk-io{}", self.workers.len()))
            .spawn(move || worker(disk, shared))
            .map_err(Error::Thread)?;
        self.workers.push(handle);
        Ok(())
    }
}

impl AsyncDisk for ThreadPoolEngine {
    fn info(&self) -> DiskInfo {
        self.disk.info()
    }

    fn engine(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn sync_disk(&self) -> &Arc<dyn SyncDisk> {
        &self.disk
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    unsafe fn push(&mut self, token: u64, request: Request<'_>) -> Result<()> {
        check_request(&self.disk.info(), &request)?;
        if self.in_flight >= self.max_in_flight {
            return Err(Error::QueueFull(self.in_flight));
        }
        let (operation, offset, len, iovecs) = match request {
            Request::Read { offset, bufs } => {
                if let Some(result) = self.disk.try_read_nowait(offset, bufs) {
                    self.in_flight += 1;
                    self.ready.push(Completion { token, result });
                    return Ok(());
                }
                (Operation::Read, offset, 0, Iovecs::new(bufs))
            }
            Request::Write { offset, bufs } => (Operation::Write, offset, 0, Iovecs::new(bufs)),
            Request::Flush => (Operation::Flush, 0, 0, Iovecs::new(&[])),
            Request::Discard { offset, len } => (Operation::Discard, offset, len, Iovecs::new(&[])),
            Request::WriteZeroes { offset, len } => {
                (Operation::WriteZeroes, offset, len, Iovecs::new(&[]))
            }
        };
        self.in_flight += 1;
        self.staged.push(Job {
            token,
            operation,
            offset,
            len,
            iovecs,
        });
        Ok(())
    }

    fn submit(&mut self) -> Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let count = self.staged.len();
        let idle = {
            let mut queue = lock(&self.shared.queue);
            queue.jobs.extend(self.staged.drain(..));
            queue.idle_workers
        };
        for _ in 0..count.min(idle) {
            self.shared.work_ready.notify_one();
        }
        // Start workers for what the idle ones cannot take.
        let missing = count.saturating_sub(idle);
        for _ in 0..missing {
            if self.workers.len() >= self.max_workers {
                break;
            }
            if let Err(e) = self.spawn_worker() {
                // The running workers still drain the queue; only fail with none at all.
                if self.workers.is_empty() {
                    return Err(e);
                }
                log::warn!(
                    "block I/O pool stays at {} threads: {e}",
                    self.workers.len()
                );
                break;
            }
        }
        Ok(())
    }

    fn reap(&mut self, completions: &mut Vec<Completion>) -> usize {
        let before = completions.len();
        completions.append(&mut self.ready);
        completions.append(&mut lock(&self.shared.done));
        let reaped = completions.len() - before;
        self.in_flight -= reaped;
        reaped
    }

    fn eventfd(&self) -> &EventFd {
        &self.shared.eventfd
    }
}

impl Drop for ThreadPoolEngine {
    fn drop(&mut self) {
        // Requests still staged never started: they are dropped. Queued ones are finished by
        // the workers before they exit, so no request outlives the engine.
        self.staged.clear();
        lock(&self.shared.queue).shutdown = true;
        self.shared.work_ready.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
