//! Who starts the device's I/O threads.
//!
//! The device starts a queue's I/O thread when the driver sets `DRIVER_OK`, which happens in
//! a transport register write, on whatever thread runs the guest's MMIO exits: usually a vCPU
//! thread. A new thread inherits its creator's seccomp filter, so a VMM that confines its vCPU
//! threads gives the device a [`ThreadSpawner`] that creates the threads elsewhere (a thread
//! of its own under the I/O filter). Without one, [`StdSpawner`] spawns them in place.

use std::io;
use std::thread::JoinHandle;

/// Work for a new thread.
pub type ThreadWork = Box<dyn FnOnce() + Send>;

/// Starts named threads for a device.
pub trait ThreadSpawner: Send + Sync {
    /// Runs `work` on a new thread called `name`, and returns its handle.
    fn spawn(&self, name: String, work: ThreadWork) -> io::Result<JoinHandle<()>>;
}

/// Spawns on the calling thread with `std::thread`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdSpawner;

impl ThreadSpawner for StdSpawner {
    fn spawn(&self, name: String, work: ThreadWork) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name(name).spawn(work)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_spawner_names_the_thread_and_runs_the_work() {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = StdSpawner
            .spawn(
                "virtio-blk-test".into(),
                Box::new(move || {
                    let name = std::thread::current().name().map(str::to_owned);
                    tx.send(name).unwrap();
                }),
            )
            .unwrap();
        handle.join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("virtio-blk-test"));
    }
}
