//! The device through its virtio-mmio registers, with its I/O threads.

mod common;

use std::sync::Arc;

use common::*;
use vmkit_virtio_blk::device::status;
use vmkit_virtio_blk::transport::mmio::{reg, MAGIC_VALUE};
use vmkit_virtio_blk::{BlockDevice, BlockOptions, CountingInterrupt, MmioTransport};

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const FLUSH: u64 = 1 << 9;
const CONFIG_WCE: u64 = 1 << 11;

fn device(
    queues: usize,
) -> (
    MmioTransport<Mem>,
    Arc<CountingInterrupt>,
    Driver,
    std::path::PathBuf,
) {
    let mem = memory();
    let path = image(1 << 20, 0x5a);
    let disks = (0..queues).map(|_| open(&path, false)).collect();
    let interrupt = Arc::new(CountingInterrupt::new());
    let options = BlockOptions {
        serial: b"mmio".to_vec(),
        queue_size: 64,
        ..BlockOptions::default()
    };
    let device = BlockDevice::new(disks, mem.clone(), interrupt.clone(), options).unwrap();
    (
        MmioTransport::new(device),
        interrupt,
        Driver::new(mem, 64),
        path,
    )
}

fn setup_queue(mmio: &MmioTransport<Mem>, driver: &Driver, index: u32) {
    w32(mmio, reg::QUEUE_SEL, index);
    assert_eq!(r32(mmio, reg::QUEUE_NUM_MAX), 64);
    w32(mmio, reg::QUEUE_NUM, u32::from(driver.size));
    w32(mmio, reg::QUEUE_DESC_LOW, driver.desc as u32);
    w32(mmio, reg::QUEUE_DESC_HIGH, 0);
    w32(mmio, reg::QUEUE_DRIVER_LOW, driver.avail as u32);
    w32(mmio, reg::QUEUE_DRIVER_HIGH, 0);
    w32(mmio, reg::QUEUE_DEVICE_LOW, driver.used as u32);
    w32(mmio, reg::QUEUE_DEVICE_HIGH, 0);
    w32(mmio, reg::QUEUE_READY, 1);
    assert_eq!(r32(mmio, reg::QUEUE_READY), 1);
}

const RUNNING: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[test]
fn identification_registers_and_bad_accesses() {
    let (mmio, _, _, _) = device(1);
    assert_eq!(r32(&mmio, reg::MAGIC_VALUE), MAGIC_VALUE);
    assert_eq!(r32(&mmio, reg::VERSION), 2);
    assert_eq!(r32(&mmio, reg::DEVICE_ID), 2);
    w32(&mmio, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r32(&mmio, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    // Wrong widths and unknown offsets read 0 and writes do nothing.
    let mut two = [0xffu8; 2];
    mmio.read(reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    mmio.write(reg::STATUS, &[1]);
    assert_eq!(r32(&mmio, reg::STATUS), 0);
    assert_eq!(r32(&mmio, 0x0f0), 0);
    mmio.write(u64::MAX, &[1, 2, 3, 4]);
    let mut big = [0xffu8; 8];
    mmio.read(u64::MAX - 3, &mut big);
    // An out-of-range queue selection is ignored.
    negotiate(&mmio, VERSION_1);
    w32(&mmio, reg::QUEUE_SEL, 7);
    assert_eq!(r32(&mmio, reg::QUEUE_NUM_MAX), 0);
    w32(&mmio, reg::QUEUE_NUM, 64);
    w32(&mmio, reg::QUEUE_READY, 1);
    assert_eq!(r32(&mmio, reg::QUEUE_READY), 0);
    w32(&mmio, reg::QUEUE_NOTIFY, 0xffff_ffff);
}

#[test]
fn feature_negotiation_refuses_unoffered_bits() {
    let (mmio, _, _, _) = device(1);
    assert!(
        !negotiate(&mmio, VERSION_1 | (1 << 4)),
        "GEOMETRY is not offered"
    );
    w32(&mmio, reg::STATUS, 0);
    assert!(!negotiate(&mmio, FLUSH), "VERSION_1 is required");
    w32(&mmio, reg::STATUS, 0);
    assert!(negotiate(&mmio, VERSION_1 | FLUSH | EVENT_IDX));
    // Feature writes after FEATURES_OK are ignored.
    w32(&mmio, reg::DRIVER_FEATURES_SEL, 0);
    w32(&mmio, reg::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(
        mmio.with_device(|d| d.driver_features()),
        VERSION_1 | FLUSH | EVENT_IDX
    );
    // Skipping steps or clearing bits is ignored.
    w32(&mmio, reg::STATUS, 0);
    w32(&mmio, reg::STATUS, status::DRIVER_OK);
    assert_eq!(r32(&mmio, reg::STATUS), 0);
}

#[test]
fn queue_sizes_that_are_not_powers_of_two_are_refused() {
    let (mmio, _, _, _) = device(1);
    assert!(negotiate(&mmio, VERSION_1));
    w32(&mmio, reg::QUEUE_SEL, 0);
    for size in [0, 3, 100, 128, 1 << 20] {
        w32(&mmio, reg::QUEUE_NUM, size);
        w32(&mmio, reg::QUEUE_READY, 1);
        assert_eq!(r32(&mmio, reg::QUEUE_READY), 0, "size {size}");
    }
}

#[test]
fn config_space_and_write_cache_switch() {
    let (mmio, interrupt, _, _) = device(2);
    let mut capacity = [0u8; 8];
    mmio.read(reg::CONFIG, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 2048);
    let mut num_queues = [0u8; 2];
    mmio.read(reg::CONFIG + 34, &mut num_queues);
    assert_eq!(u16::from_le_bytes(num_queues), 2);
    let mut wce = [0u8; 1];
    mmio.read(reg::CONFIG + 32, &mut wce);
    assert_eq!(wce, [1], "writeback cache mode starts with a write cache");

    mmio.write(reg::CONFIG + 32, &[0]);
    mmio.read(reg::CONFIG + 32, &mut wce);
    assert_eq!(wce, [0]);
    assert_eq!(r32(&mmio, reg::CONFIG_GENERATION), 1);
    mmio.write(reg::CONFIG + 32, &[1]);
    mmio.read(reg::CONFIG + 32, &mut wce);
    assert_eq!(wce, [1]);
    // Writes elsewhere are ignored.
    mmio.write(reg::CONFIG, &[0xff; 8]);
    mmio.read(reg::CONFIG, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 2048);
    assert_eq!(interrupt.config_count(), 0);
}

#[test]
fn write_cache_switch_reaches_the_backend() {
    let mem = memory();
    let path = image(1 << 20, 0);
    let disk = open(&path, false);
    let sync = disk.sync_disk().clone();
    let device = BlockDevice::new(
        vec![disk],
        mem,
        Arc::new(CountingInterrupt::new()),
        BlockOptions::default(),
    )
    .unwrap();
    let mmio = MmioTransport::new(device);
    assert!(sync.write_cache());
    mmio.write(reg::CONFIG + 32, &[0]);
    assert!(!sync.write_cache());
    mmio.write(reg::CONFIG + 28, &[0, 0, 0, 0, 1]);
    assert!(sync.write_cache());
    // A driver that does not negotiate FLUSH gets a write-through device.
    assert!(negotiate(&mmio, VERSION_1 | CONFIG_WCE));
    assert!(!sync.write_cache());
    // Reset restores the configured cache mode.
    w32(&mmio, reg::STATUS, 0);
    assert!(sync.write_cache());
}

fn end_to_end(event_idx: bool) {
    let (mmio, interrupt, mut driver, path) = device(1);
    let features = VERSION_1 | FLUSH | if event_idx { EVENT_IDX } else { 0 };
    assert!(negotiate(&mmio, features));
    setup_queue(&mmio, &driver, 0);
    w32(&mmio, reg::STATUS, RUNNING);
    assert_eq!(r32(&mmio, reg::STATUS), RUNNING);
    if event_idx {
        driver.set_used_event(0);
    }

    let data = driver.alloc(4096);
    driver.fill(data, 4096, 0xcd);
    let (_, write) = driver.request(T_OUT, 16, &[(data, 4096, false)]);
    let (_, flush) = driver.request(T_FLUSH, 0, &[]);
    // Notify through the register (no ioeventfd registered here).
    w32(&mmio, reg::QUEUE_NOTIFY, 0);
    wait_for(|| driver.used_idx() == 2);
    assert_eq!(driver.status(write), S_OK);
    assert_eq!(driver.status(flush), S_OK);
    wait_for(|| interrupt.used_count() >= 1);
    assert_eq!(r32(&mmio, reg::INTERRUPT_STATUS) & 1, 1);
    w32(&mmio, reg::INTERRUPT_ACK, 1);
    assert_eq!(r32(&mmio, reg::INTERRUPT_STATUS), 0);
    let file = std::fs::read(&path).unwrap();
    assert!(file[8192..12288].iter().all(|&b| b == 0xcd));

    let into = driver.alloc(4096);
    let (head, read) = driver.request(T_IN, 16, &[(into, 4096, true)]);
    // Notify through the ioeventfd the VMM would register.
    let fds = mmio.ioeventfds().unwrap();
    assert_eq!(fds.len(), 1);
    fds[0].1.write(1).unwrap();
    wait_for(|| driver.used_idx() == 3);
    assert_eq!(driver.status(read), S_OK);
    assert_eq!(driver.used_elem(2), (u32::from(head), 4097));
    assert_eq!(driver.read(into, 4096), vec![0xcd; 4096]);

    w32(&mmio, reg::STATUS, 0);
    assert_eq!(r32(&mmio, reg::STATUS), 0);
}

#[test]
fn end_to_end_without_event_idx() {
    end_to_end(false);
}

#[test]
fn end_to_end_with_event_idx() {
    end_to_end(true);
}

#[test]
fn multiqueue_and_restart_after_reset() {
    use vm_memory::{Bytes, GuestAddress};
    let (mmio, _, driver, _) = device(2);
    let mem = driver.mem.clone();
    for _round in 0..2 {
        // Fresh rings each round, as a driver re-initialising after a reset would.
        mem.write_slice(&[0u8; 0x70000], GuestAddress(DESC))
            .unwrap();
        let mut first = Driver::new(mem.clone(), 64);
        let mut second = Driver::new(mem.clone(), 64);
        second.desc = 0x40000;
        second.avail = 0x50000;
        second.used = 0x60000;
        assert!(negotiate(&mmio, VERSION_1 | FLUSH));
        setup_queue(&mmio, &first, 0);
        setup_queue(&mmio, &second, 1);
        w32(&mmio, reg::STATUS, RUNNING);
        let (_, a) = first.request(T_FLUSH, 0, &[]);
        let (_, b) = second.request(T_FLUSH, 0, &[]);
        w32(&mmio, reg::QUEUE_NOTIFY, 0);
        w32(&mmio, reg::QUEUE_NOTIFY, 1);
        wait_for(|| first.used_idx() == 1 && second.used_idx() == 1);
        assert_eq!(first.status(a), S_OK);
        assert_eq!(second.status(b), S_OK);
        w32(&mmio, reg::STATUS, 0);
    }
}

#[test]
fn reset_with_requests_in_flight_waits_for_them() {
    let (mmio, _, mut driver, _) = device(1);
    assert!(negotiate(&mmio, VERSION_1 | FLUSH));
    setup_queue(&mmio, &driver, 0);
    w32(&mmio, reg::STATUS, RUNNING);
    for i in 0..20 {
        let data = driver.alloc(65536);
        driver.request(T_IN, i * 128, &[(data, 65536, true)]);
    }
    w32(&mmio, reg::QUEUE_NOTIFY, 0);
    // Reset at once, while reads are in flight: it returns only when the disk is idle.
    w32(&mmio, reg::STATUS, 0);
    let used = driver.used_idx();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(driver.used_idx(), used, "nothing completes after the reset");
    // The device restarts.
    assert!(negotiate(&mmio, VERSION_1 | FLUSH));
}

#[test]
fn unusable_queue_addresses_set_needs_reset() {
    let (mmio, interrupt, driver, _) = device(1);
    assert!(negotiate(&mmio, VERSION_1));
    setup_queue(&mmio, &driver, 0);
    w32(&mmio, reg::QUEUE_SEL, 0);
    // The ready queue's addresses can no longer change, so break them via a fresh setup.
    w32(&mmio, reg::STATUS, 0);
    assert!(negotiate(&mmio, VERSION_1));
    w32(&mmio, reg::QUEUE_NUM, 64);
    w32(&mmio, reg::QUEUE_DESC_LOW, 0);
    w32(&mmio, reg::QUEUE_DESC_HIGH, 0x8000_0000);
    w32(&mmio, reg::QUEUE_READY, 1);
    w32(&mmio, reg::STATUS, RUNNING);
    assert_ne!(r32(&mmio, reg::STATUS) & status::NEEDS_RESET, 0);
    assert_eq!(interrupt.config_count(), 1);
    assert_eq!(r32(&mmio, reg::INTERRUPT_STATUS) & 2, 2);
    w32(&mmio, reg::STATUS, 0);
    assert_eq!(r32(&mmio, reg::STATUS), 0);
}

#[test]
fn four_queues_under_concurrent_load_keep_every_byte() {
    const QUEUES: u64 = 4;
    const ROUNDS: u64 = 25;
    const BATCH: u64 = 8;
    let (mmio, _, driver, path) = device(QUEUES as usize);
    let mem = driver.mem.clone();
    assert!(negotiate(&mmio, VERSION_1 | FLUSH));
    let drivers: Vec<Driver> = (0..QUEUES)
        .map(|q| Driver::at(mem.clone(), 64, 0x20_0000 + q * 0x10_0000))
        .collect();
    for (q, d) in drivers.iter().enumerate() {
        setup_queue(&mmio, d, q as u32);
    }
    w32(&mmio, reg::STATUS, RUNNING);
    let notifiers = mmio.ioeventfds().unwrap();
    assert_eq!(notifiers.len(), QUEUES as usize);

    // Queue q owns 256 KiB of the disk; each round writes a batch of 4 KiB blocks there,
    // then reads them back, all queues at once from their own threads.
    let byte = |q: u64, round: u64, i: u64| (q * 64 + round * 8 + i) as u8 | 1;
    let threads: Vec<_> = drivers
        .into_iter()
        .zip(notifiers)
        .enumerate()
        .map(|(q, (mut d, (_, notify)))| {
            let q = q as u64;
            std::thread::spawn(move || {
                let buffers: Vec<u64> = (0..BATCH).map(|_| d.alloc(4096)).collect();
                let mut used = 0u16;
                for round in 0..ROUNDS {
                    let sector = |i: u64| q * 512 + ((round * BATCH + i) % 64) * 8;
                    let mut statuses = Vec::new();
                    for (i, &buf) in buffers.iter().enumerate() {
                        let i = i as u64;
                        d.fill(buf, 4096, byte(q, round, i));
                        statuses.push(d.request(T_OUT, sector(i), &[(buf, 4096, false)]).1);
                    }
                    notify.write(1).unwrap();
                    used += BATCH as u16;
                    wait_for(|| d.used_idx() == used);
                    assert!(statuses.iter().all(|&s| d.status(s) == S_OK));

                    statuses.clear();
                    for (i, &buf) in buffers.iter().enumerate() {
                        d.fill(buf, 4096, 0);
                        statuses.push(d.request(T_IN, sector(i as u64), &[(buf, 4096, true)]).1);
                    }
                    notify.write(1).unwrap();
                    used += BATCH as u16;
                    wait_for(|| d.used_idx() == used);
                    for (i, &buf) in buffers.iter().enumerate() {
                        assert_eq!(d.status(statuses[i]), S_OK);
                        let expected = byte(q, round, i as u64);
                        assert_eq!(
                            d.read(buf, 4096),
                            vec![expected; 4096],
                            "queue {q} round {round}"
                        );
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a queue's driver failed");
    }
    w32(&mmio, reg::STATUS, 0);

    // The file holds each block's last write.
    let file = std::fs::read(&path).unwrap();
    for q in 0..QUEUES {
        for slot in 0..64u64 {
            // The last of the ROUNDS * BATCH writes that went to this slot.
            let last = slot + 64 * ((ROUNDS * BATCH - 1 - slot) / 64);
            let (round, i) = (last / BATCH, last % BATCH);
            let at = ((q * 512 + slot * 8) * 512) as usize;
            assert!(
                file[at..at + 4096].iter().all(|&b| b == byte(q, round, i)),
                "queue {q} slot {slot}"
            );
        }
    }
}

#[test]
fn silence_and_notification_floods_neither_hang_nor_repeat() {
    let (mmio, interrupt, mut first, _) = device(2);
    let mut second = Driver::at(first.mem.clone(), 64, 0x40_0000);
    assert!(negotiate(&mmio, VERSION_1 | FLUSH));
    setup_queue(&mmio, &first, 0);
    setup_queue(&mmio, &second, 1);
    w32(&mmio, reg::STATUS, RUNNING);
    let notifiers = mmio.ioeventfds().unwrap();

    // A driver that never notifies: its request waits, nothing else happens. The I/O
    // thread looks at the ring when it starts and once more after each batch, so first
    // let one notified request go through and the thread go idle.
    let (warm_up, _) = first.request(T_FLUSH, 0, &[]);
    w32(&mmio, reg::QUEUE_NOTIFY, 0);
    wait_for(|| first.used_idx() == 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let used_count = interrupt.used_count();
    let (waiting, _) = first.request(T_FLUSH, 0, &[]);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(first.used_idx(), 1);
    assert_eq!(interrupt.used_count(), used_count);

    // A flood: 20000 notifications by register and by ioeventfd, to real and absent
    // queues, with 20 more requests published along the way.
    let mut heads = vec![warm_up, waiting];
    for i in 0..20_000u32 {
        if i % 1000 == 0 {
            heads.push(first.request(T_FLUSH, 0, &[]).0);
        }
        match i % 4 {
            0 => w32(&mmio, reg::QUEUE_NOTIFY, 0),
            1 => notifiers[0].1.write(1).unwrap(),
            2 => w32(&mmio, reg::QUEUE_NOTIFY, 7),
            _ => w32(&mmio, reg::QUEUE_NOTIFY, u32::MAX),
        }
    }
    w32(&mmio, reg::QUEUE_NOTIFY, 0);
    wait_for(|| first.used_idx() == heads.len() as u16);
    // Each request completed once: the used ring holds every head exactly once.
    let mut used: Vec<u32> = (0..heads.len() as u16)
        .map(|i| first.used_elem(i).0)
        .collect();
    used.sort_unstable();
    let mut expected: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
    expected.sort_unstable();
    assert_eq!(used, expected);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        first.used_idx(),
        heads.len() as u16,
        "nothing completes twice"
    );

    // The other queue still works, and the device resets promptly.
    let (_, status) = second.request(T_FLUSH, 0, &[]);
    notifiers[1].1.write(1).unwrap();
    wait_for(|| second.used_idx() == 1);
    assert_eq!(second.status(status), S_OK);
    let started = std::time::Instant::now();
    w32(&mmio, reg::STATUS, 0);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

/// A disk whose reads wait before doing the I/O, so that they are surely in flight when
/// the test wants them to be.
struct SlowDisk {
    inner: Arc<dyn vmkit_block_backend::SyncDisk>,
    started: std::sync::atomic::AtomicUsize,
}

impl vmkit_block_backend::SyncDisk for SlowDisk {
    fn info(&self) -> vmkit_block_backend::DiskInfo {
        self.inner.info()
    }
    fn cache_mode(&self) -> vmkit_block_backend::CacheMode {
        self.inner.cache_mode()
    }
    fn write_cache(&self) -> bool {
        self.inner.write_cache()
    }
    fn set_write_cache(&self, enabled: bool) -> vmkit_block_backend::Result<()> {
        self.inner.set_write_cache(enabled)
    }
    fn read_vectored(
        &self,
        offset: u64,
        bufs: &[vmkit_block_backend::IoBuf<'_>],
    ) -> vmkit_block_backend::Result<usize> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(150));
        self.inner.read_vectored(offset, bufs)
    }
    fn write_vectored(
        &self,
        offset: u64,
        bufs: &[vmkit_block_backend::IoBuf<'_>],
    ) -> vmkit_block_backend::Result<usize> {
        self.inner.write_vectored(offset, bufs)
    }
    fn flush(&self) -> vmkit_block_backend::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> vmkit_block_backend::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> vmkit_block_backend::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

#[test]
fn reset_waits_for_reads_in_flight_and_nothing_touches_memory_after() {
    let mem = memory();
    let path = image(1 << 20, 0x5a);
    let options = vmkit_block_backend::OpenOptions::new().locking(false);
    let slow = Arc::new(SlowDisk {
        inner: vmkit_block_backend::open_sync(&path, &options).unwrap(),
        started: std::sync::atomic::AtomicUsize::new(0),
    });
    let disk = vmkit_block_backend::ThreadPoolEngine::new(slow.clone(), 4, 64).unwrap();
    let interrupt = Arc::new(CountingInterrupt::new());
    let options = BlockOptions {
        serial: Vec::new(),
        queue_size: 64,
        ..BlockOptions::default()
    };
    let device = BlockDevice::new(vec![Box::new(disk)], mem.clone(), interrupt, options).unwrap();
    let mmio = MmioTransport::new(device);
    let mut driver = Driver::new(mem, 64);
    assert!(negotiate(&mmio, VERSION_1 | FLUSH));
    setup_queue(&mmio, &driver, 0);
    w32(&mmio, reg::STATUS, RUNNING);

    let buffers: Vec<u64> = (0..4).map(|_| driver.alloc(4096)).collect();
    for (i, &buf) in buffers.iter().enumerate() {
        driver.fill(buf, 4096, 0);
        driver.request(T_IN, i as u64 * 8, &[(buf, 4096, true)]);
    }
    w32(&mmio, reg::QUEUE_NOTIFY, 0);
    wait_for(|| slow.started.load(std::sync::atomic::Ordering::SeqCst) == 4);

    // The reads are in the disk's hands: reset must wait for them.
    let started = std::time::Instant::now();
    w32(&mmio, reg::STATUS, 0);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(100),
        "reset returned after {:?}, before the reads finished",
        started.elapsed()
    );
    assert_eq!(
        driver.used_idx(),
        0,
        "completions after a reset are dropped"
    );

    // After the reset nothing writes guest memory: a sentinel stays put.
    for &buf in &buffers {
        driver.fill(buf, 4096, 0xee);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    for &buf in &buffers {
        assert_eq!(driver.read(buf, 4096), vec![0xee; 4096]);
    }
    assert_eq!(driver.used_idx(), 0);
}

/// Records the threads it is asked for; refuses them while `refuse` is set.
#[derive(Default)]
struct RecordingSpawner {
    names: std::sync::Mutex<Vec<String>>,
    refuse: std::sync::atomic::AtomicBool,
}

impl vmkit_virtio_blk::ThreadSpawner for RecordingSpawner {
    fn spawn(
        &self,
        name: String,
        work: vmkit_virtio_blk::spawner::ThreadWork,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        self.names.lock().unwrap().push(name.clone());
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("no threads today"));
        }
        vmkit_virtio_blk::StdSpawner.spawn(name, work)
    }
}

#[test]
fn io_threads_come_from_the_given_spawner_and_a_refusal_needs_reset_without_losing_the_disk() {
    let mem = memory();
    let path = image(1 << 20, 0);
    let spawner = Arc::new(RecordingSpawner::default());
    spawner
        .refuse
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let options = BlockOptions {
        spawner: spawner.clone(),
        queue_size: 64,
        ..BlockOptions::default()
    };
    let device = BlockDevice::new(
        vec![open(&path, false)],
        mem.clone(),
        Arc::new(CountingInterrupt::new()),
        options,
    )
    .unwrap();
    let mmio = MmioTransport::new(device);
    let mut driver = Driver::new(mem, 64);

    // Refused: the device needs a reset, and keeps its disks for the next start.
    assert!(negotiate(&mmio, VERSION_1 | FLUSH));
    setup_queue(&mmio, &driver, 0);
    w32(&mmio, reg::STATUS, RUNNING);
    assert_ne!(r32(&mmio, reg::STATUS) & status::NEEDS_RESET, 0);
    assert_eq!(*spawner.names.lock().unwrap(), ["virtio-blk-q0"]);

    // Allowed after the reset: the queue gets its thread from it, and I/O works.
    spawner
        .refuse
        .store(false, std::sync::atomic::Ordering::SeqCst);
    w32(&mmio, reg::STATUS, 0);
    assert!(negotiate(&mmio, VERSION_1 | FLUSH));
    setup_queue(&mmio, &driver, 0);
    w32(&mmio, reg::STATUS, RUNNING);
    assert_eq!(r32(&mmio, reg::STATUS), RUNNING);
    assert_eq!(
        *spawner.names.lock().unwrap(),
        ["virtio-blk-q0", "virtio-blk-q0"]
    );
    let (_, flush) = driver.request(T_FLUSH, 0, &[]);
    w32(&mmio, reg::QUEUE_NOTIFY, 0);
    wait_for(|| driver.used_idx() == 1);
    assert_eq!(driver.status(flush), S_OK);
}
