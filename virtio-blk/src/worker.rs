//! The I/O thread of one queue: an `event-manager` loop over the queue's notification
//! eventfd, the disk's completion eventfd and a stop eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemory;
use vmkit_block_backend::AsyncDisk;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::InterruptSink;
use crate::queue::BlockQueue;
use crate::spawner::ThreadSpawner;
use crate::Error;

const NOTIFY: u32 = 0;
const COMPLETION: u32 = 1;
const STOP: u32 = 2;

/// Raised by a worker whose queue broke; the device reports it as `NEEDS_RESET`.
pub(crate) struct NeedsReset {
    pub(crate) flag: AtomicBool,
    pub(crate) interrupt: Arc<dyn InterruptSink>,
}

impl NeedsReset {
    pub(crate) fn raise(&self) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            // The driver learns of NEEDS_RESET through a configuration change interrupt.
            let _ = self.interrupt.signal_config();
        }
    }
}

struct QueueWorker<M: GuestMemory> {
    queue: BlockQueue<M>,
    notify: EventFd,
    stop: EventFd,
    stopped: bool,
    needs_reset: Arc<NeedsReset>,
}

impl<M: GuestMemory> QueueWorker<M> {
    fn check(&mut self, result: Result<(), Error>) {
        if let Err(e) = result {
            log::error!("virtio-blk queue {}: {e}; device needs reset", self.index());
            self.needs_reset.raise();
        }
    }

    fn index(&self) -> u16 {
        self.queue.queue_index()
    }
}

impl<M: GuestMemory> MutEventSubscriber for QueueWorker<M> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            NOTIFY => {
                let _ = self.notify.read();
                let result = self.queue.process_queue();
                self.check(result);
            }
            COMPLETION => {
                let _ = self.queue.disk().eventfd().read();
                let result = self.queue.handle_completions();
                self.check(result);
            }
            _ => {
                let _ = self.stop.read();
                self.stopped = true;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            Events::with_data(&self.notify, NOTIFY, EventSet::IN),
            Events::with_data(self.queue.disk().eventfd(), COMPLETION, EventSet::IN),
            Events::with_data(&self.stop, STOP, EventSet::IN),
        ];
        for events in fds {
            if let Err(e) = ops.add(events) {
                log::error!(
                    "virtio-blk queue {}: cannot watch an eventfd: {e}",
                    self.index()
                );
                self.needs_reset.raise();
                self.stopped = true;
            }
        }
    }
}

/// A running I/O thread.
pub(crate) struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<()>,
    // The thread hands the disk back here as it ends.
    disk: mpsc::Receiver<Box<dyn AsyncDisk>>,
}

impl WorkerHandle {
    /// Stops the thread; returns the disk once every request in flight has finished.
    pub(crate) fn stop(self) -> Option<Box<dyn AsyncDisk>> {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
        self.disk.try_recv().ok()
    }
}

/// Why a worker did not start, with the disk back when it could be saved.
pub(crate) type SpawnError = (Error, Option<Box<dyn AsyncDisk>>);

/// Starts the I/O thread of `queue`, woken by `notify`.
pub(crate) fn spawn<M: GuestMemory + Send + Sync + 'static>(
    spawner: &dyn ThreadSpawner,
    queue: BlockQueue<M>,
    notify: EventFd,
    needs_reset: Arc<NeedsReset>,
) -> Result<WorkerHandle, SpawnError> {
    let (stop, thread_stop, mut manager) = match setup() {
        Ok(resources) => resources,
        Err(e) => return Err((e, Some(queue.into_disk()))),
    };
    let index = queue.queue_index();
    // Kick the queue once: the driver may have made buffers available before DRIVER_OK.
    let _ = notify.write(1);
    let worker = QueueWorker {
        queue,
        notify,
        stop: thread_stop,
        stopped: false,
        needs_reset,
    };
    let id = manager.add_subscriber(worker);
    // The loop waits here until its thread takes it, so that a spawner that refuses leaves
    // the queue and its disk with the device.
    let waiting = Arc::new(Mutex::new(Some(manager)));
    let thread_waiting = waiting.clone();
    let (disk_back, disk) = mpsc::sync_channel(1);
    let thread = spawner.spawn(
        format!("virtio-blk-q{index}"),
        Box::new(move || {
            let manager = thread_waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(disk) = manager.and_then(|manager| run(manager, id)) {
                let _ = disk_back.send(disk);
            }
        }),
    );
    match thread {
        Ok(thread) => Ok(WorkerHandle { stop, thread, disk }),
        Err(e) => {
            let disk = waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .and_then(|mut manager| manager.remove_subscriber(id).ok())
                .map(|worker| worker.queue.into_disk());
            Err((Error::Io(e), disk))
        }
    }
}

#[allow(clippy::type_complexity)]
fn setup<M: GuestMemory>() -> Result<(EventFd, EventFd, EventManager<QueueWorker<M>>), Error> {
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?;
    let thread_stop = stop.try_clone().map_err(Error::Io)?;
    let manager = EventManager::new().map_err(Error::EventManager)?;
    Ok((stop, thread_stop, manager))
}

fn run<M: GuestMemory>(
    mut manager: EventManager<QueueWorker<M>>,
    id: event_manager::SubscriberId,
) -> Option<Box<dyn AsyncDisk>> {
    loop {
        let stopped = manager
            .subscriber_mut(id)
            .map(|w| w.stopped)
            .unwrap_or(true);
        if stopped {
            break;
        }
        if let Err(e) = manager.run() {
            log::error!("virtio-blk: event loop failed: {e}");
            if let Ok(worker) = manager.subscriber_mut(id) {
                worker.needs_reset.raise();
            }
            break;
        }
    }
    // Waits for the disk's requests in flight before the disk goes back to the device.
    manager
        .remove_subscriber(id)
        .ok()
        .map(|worker| worker.queue.into_disk())
}
