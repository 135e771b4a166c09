//! The malicious-driver suite (issue 8): a guest that breaks every rule it can, through the
//! transport registers, as a real hostile driver would.
//!
//! Every case checks the same things: nothing panics; nothing hangs (every wait is bounded
//! and every reset, which joins the I/O threads, must return promptly); the bad request ends
//! in an error status, or the device sets `NEEDS_RESET` (virtio 1.2 §2.1.2) when the queue
//! itself is broken (ring indexes, heads), or, when the chain has no usable status byte
//! (none writable, outside RAM, or the walk stops before it: loops onto read-only
//! descriptors, bad indirect tables, chains over 4 GiB), the chain is returned with used
//! length 0 and nothing written, the crate's documented choice; each case pins which. And
//! meanwhile another queue of the same device and a second device keep serving correct
//! data. Memory, file descriptors and I/O threads stay bounded over thousands of bad
//! requests and resets.
//!
//! The tests run one at a time (a lock), so that the process-wide RSS and fd counts measure
//! this suite only.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use vm_memory::{Bytes, GuestAddress};
use vmkit_block_backend::{IoBuf, OpenOptions, SyncDisk, ThreadPoolEngine};
use vmkit_pci_passthrough::{EventFdMsiRouting, PciDevice};
use vmkit_virtio_blk::device::status;
use vmkit_virtio_blk::transport::mmio::reg;
use vmkit_virtio_blk::transport::pci::{self, common as cc, msix_vectors, VirtioPciTransport};
use vmkit_virtio_blk::{BlockDevice, BlockOptions, CountingInterrupt, MmioTransport};

const VERSION_1: u64 = 1 << 32;
const FLUSH: u64 = 1 << 9;
const INDIRECT: u64 = 1 << 28;
const FEATURES: u64 = VERSION_1 | FLUSH | INDIRECT;
const RUNNING: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
/// The queue size the drivers choose: small, so that chains longer than the queue are cheap.
const QSIZE: u16 = 16;
/// The largest queue size the devices allow.
const QMAX: u16 = 64;
/// How long any one outcome may take before the test calls it a hang.
const PATIENCE: Duration = Duration::from_secs(5);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next ones must still run.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

type Mmio = MmioTransport<Mem>;

fn needs_reset(mmio: &Mmio) -> bool {
    r32(mmio, reg::STATUS) & status::NEEDS_RESET != 0
}

/// Waits for `cond` up to `PATIENCE`; false on timeout.
fn within(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

/// Writes the status register from another thread and fails the test if it does not return
/// promptly: a reset joins the I/O threads, so a worker stuck on a hostile chain shows here.
fn reset_promptly(mmio: &Arc<Mmio>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let device = mmio.clone();
    std::thread::spawn(move || {
        w32(&device, reg::STATUS, 0);
        let _ = tx.send(());
    });
    rx.recv_timeout(PATIENCE)
        .expect("the device did not reset: an I/O thread hangs");
    assert_eq!(r32(mmio, reg::STATUS), 0);
}

/// A disk whose reads can be made slow, so that a request is surely in flight.
struct SlowDisk {
    inner: Arc<dyn SyncDisk>,
    /// Milliseconds each read sleeps first (0: not slow).
    slow_ms: AtomicU64,
    reads_started: AtomicUsize,
}

impl SyncDisk for SlowDisk {
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
    fn read_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> vmkit_block_backend::Result<usize> {
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        let delay = self.slow_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        self.inner.read_vectored(offset, bufs)
    }
    fn write_vectored(
        &self,
        offset: u64,
        bufs: &[IoBuf<'_>],
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

/// Writes a descriptor anywhere in guest memory (an indirect table entry).
fn put(mem: &Mem, at: u64, d: Desc) {
    mem.write_obj(d.addr, GuestAddress(at)).unwrap();
    mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
    mem.write_obj(d.flags, GuestAddress(at + 12)).unwrap();
    mem.write_obj(d.next, GuestAddress(at + 14)).unwrap();
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

/// How a hostile request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Returned in the used ring with this status byte.
    Status(u8),
    /// Returned with length 0 and no status: never right (a chain without a usable status
    /// byte must stop the queue), so no case expects it.
    Unanswered,
    /// The device gave up on the queue.
    NeedsReset,
}

const IOERR: Outcome = Outcome::Status(S_IOERR);

/// Base addresses of the three drivers' rings and buffers (1 MiB each).
const HOSTILE_BASE: u64 = 0x20_0000;
const GOOD_BASE: u64 = 0x30_0000;
const SECOND_BASE: u64 = 0x40_0000;
/// Scratch space of the hostile cases (tables, headers, data), away from the rings.
const SCRATCH: u64 = 0x80_0000;

/// Device A (two queues: 0 is the hostile driver's, 1 a well-behaved one's) and device B (one
/// well-behaved queue), in one guest memory as in a real VM.
struct Rig {
    mem: Arc<Mem>,
    a: Arc<Mmio>,
    b: Arc<Mmio>,
    slow: Arc<SlowDisk>,
    path_a: std::path::PathBuf,
    hostile: Driver,
    good: Driver,
    second: Driver,
    /// Data buffers of the well-behaved drivers.
    good_buf: u64,
    second_buf: u64,
    round: u8,
}

impl Rig {
    fn new() -> Rig {
        let mem = memory();
        let path_a = image(1 << 20, 0x5a);
        let path_b = image(1 << 20, 0xa5);
        let options = OpenOptions::new().locking(false);
        let slow = Arc::new(SlowDisk {
            inner: vmkit_block_backend::open_sync(&path_a, &options).unwrap(),
            slow_ms: AtomicU64::new(0),
            reads_started: AtomicUsize::new(0),
        });
        let slow_engine = ThreadPoolEngine::new(slow.clone(), 2, 64).unwrap();
        let opts = || BlockOptions {
            serial: b"hostile".to_vec(),
            queue_size: QMAX,
            ..BlockOptions::default()
        };
        let a = BlockDevice::new(
            vec![Box::new(slow_engine), open(&path_a, false)],
            mem.clone(),
            Arc::new(CountingInterrupt::new()),
            opts(),
        )
        .unwrap();
        let b = BlockDevice::new(
            vec![open(&path_b, false)],
            mem.clone(),
            Arc::new(CountingInterrupt::new()),
            opts(),
        )
        .unwrap();
        let mut rig = Rig {
            a: Arc::new(MmioTransport::new(a)),
            b: Arc::new(MmioTransport::new(b)),
            slow,
            path_a,
            hostile: Driver::at(mem.clone(), QSIZE, HOSTILE_BASE),
            good: Driver::at(mem.clone(), QSIZE, GOOD_BASE),
            second: Driver::at(mem.clone(), QSIZE, SECOND_BASE),
            mem,
            good_buf: 0,
            second_buf: 0,
            round: 0,
        };
        rig.good_buf = rig.good.alloc(4096);
        rig.second_buf = rig.second.alloc(4096);
        rig.start_a();
        assert!(negotiate(&rig.b, FEATURES));
        setup_queue(&rig.b, &rig.second, 0);
        w32(&rig.b, reg::STATUS, RUNNING);
        assert_eq!(r32(&rig.b, reg::STATUS), RUNNING);
        rig
    }

    /// Initialises device A from scratch with fresh rings, as a driver does after a reset.
    fn start_a(&mut self) {
        for base in [HOSTILE_BASE, GOOD_BASE] {
            self.mem
                .write_slice(&[0u8; 0x4000], GuestAddress(base))
                .unwrap();
        }
        self.hostile = Driver::at(self.mem.clone(), QSIZE, HOSTILE_BASE);
        self.good = Driver::at(self.mem.clone(), QSIZE, GOOD_BASE);
        self.good_buf = self.good.alloc(4096);
        assert!(negotiate(&self.a, FEATURES));
        setup_queue(&self.a, &self.hostile, 0);
        setup_queue(&self.a, &self.good, 1);
        w32(&self.a, reg::STATUS, RUNNING);
        assert_eq!(r32(&self.a, reg::STATUS), RUNNING);
    }

    /// Resets device A (promptly) and starts it again.
    fn restart_a(&mut self) {
        self.slow.slow_ms.store(0, Ordering::SeqCst);
        reset_promptly(&self.a);
        self.start_a();
    }

    /// Notifies the hostile queue and waits for the request published last to end.
    fn outcome(&self, used_before: u16, status_addr: u64) -> Outcome {
        w32(&self.a, reg::QUEUE_NOTIFY, 0);
        let ended = within(|| self.hostile.used_idx() != used_before || needs_reset(&self.a));
        assert!(
            ended,
            "a hostile request neither completed nor broke the queue"
        );
        if needs_reset(&self.a) {
            return Outcome::NeedsReset;
        }
        match self.hostile.used_elem(used_before) {
            (_, 0) => Outcome::Unanswered,
            _ => Outcome::Status(self.hostile.status(status_addr)),
        }
    }

    /// The other queue of device A and device B serve a write and a read-back of fresh data;
    /// so does the hostile queue itself when it is still usable, or after a restart.
    fn others_work(&mut self) {
        self.round = self.round.wrapping_add(1);
        let byte = self.round | 0x80;
        let sector = u64::from(self.round % 64) * 8;
        write_and_read(&self.a, 1, &mut self.good, self.good_buf, sector, byte);
        write_and_read(&self.b, 0, &mut self.second, self.second_buf, sector, byte);
    }

    /// Checks the hostile action's outcome, that everything else works, and that the hostile
    /// queue is usable again (without a reset when it did not need one).
    fn after(&mut self, name: &str, got: Outcome, expected: &[Outcome]) {
        assert!(
            expected.contains(&got),
            "{name}: got {got:?}, expected one of {expected:?}"
        );
        self.others_work();
        if got == Outcome::NeedsReset {
            // Nothing more happens on a broken queue, however the guest pokes it.
            let used = self.hostile.used_idx();
            w32(&self.a, reg::QUEUE_NOTIFY, 0);
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(
                self.hostile.used_idx(),
                used,
                "{name}: a broken queue moved"
            );
        } else {
            let buf = self.hostile.alloc(512);
            let sector = u64::from(self.round % 64) * 8;
            write_and_read(&self.a, 0, &mut self.hostile, buf, sector, 0x33);
        }
        self.restart_a();
        let buf = self.hostile.alloc(512);
        write_and_read(&self.a, 0, &mut self.hostile, buf, 8, 0x44);
    }

    /// Runs one hostile case: `build` writes the descriptors and returns (head, status
    /// address); the head is published and the queue notified.
    fn case(
        &mut self,
        name: &str,
        expected: &[Outcome],
        build: impl FnOnce(&mut Driver) -> (u16, u64),
    ) -> Outcome {
        let used = self.hostile.used_idx();
        let (head, status_addr) = build(&mut self.hostile);
        self.hostile.publish(head);
        let got = self.outcome(used, status_addr);
        self.after(name, got, expected);
        got
    }
}

fn setup_queue(mmio: &Mmio, driver: &Driver, index: u32) {
    w32(mmio, reg::QUEUE_SEL, index);
    w32(mmio, reg::QUEUE_NUM, u32::from(driver.size));
    w32(mmio, reg::QUEUE_DESC_LOW, driver.desc as u32);
    w32(mmio, reg::QUEUE_DESC_HIGH, (driver.desc >> 32) as u32);
    w32(mmio, reg::QUEUE_DRIVER_LOW, driver.avail as u32);
    w32(mmio, reg::QUEUE_DRIVER_HIGH, (driver.avail >> 32) as u32);
    w32(mmio, reg::QUEUE_DEVICE_LOW, driver.used as u32);
    w32(mmio, reg::QUEUE_DEVICE_HIGH, (driver.used >> 32) as u32);
    w32(mmio, reg::QUEUE_READY, 1);
    assert_eq!(r32(mmio, reg::QUEUE_READY), 1);
}

/// One well-formed request on `queue`, waited for (bounded); returns its status.
fn run_one(
    mmio: &Mmio,
    queue: u32,
    driver: &mut Driver,
    t: u32,
    sector: u64,
    data: &[(u64, u32, bool)],
) -> u8 {
    let used = driver.used_idx();
    let (_, status_addr) = driver.request(t, sector, data);
    w32(mmio, reg::QUEUE_NOTIFY, queue);
    assert!(
        within(|| driver.used_idx() == used.wrapping_add(1)),
        "a good request on queue {queue} did not complete"
    );
    driver.status(status_addr)
}

/// Writes 4 KiB of `byte` at `sector` and reads it back through `queue`.
fn write_and_read(mmio: &Mmio, queue: u32, driver: &mut Driver, buf: u64, sector: u64, byte: u8) {
    let len = 512;
    driver.fill(buf, len, byte);
    let st = run_one(
        mmio,
        queue,
        driver,
        T_OUT,
        sector,
        &[(buf, len as u32, false)],
    );
    assert_eq!(st, S_OK, "good write on queue {queue}");
    driver.fill(buf, len, 0);
    let st = run_one(
        mmio,
        queue,
        driver,
        T_IN,
        sector,
        &[(buf, len as u32, true)],
    );
    assert_eq!(st, S_OK, "good read on queue {queue}");
    assert_eq!(
        driver.read(buf, len),
        vec![byte; len],
        "data on queue {queue}"
    );
}

/// A header at a fresh scratch address, and a status byte preset to 0xff.
fn header_and_status(d: &mut Driver, t: u32, sector: u64) -> (u64, u64) {
    let header = d.header(t, sector);
    let status = d.alloc(1);
    d.fill(status, 1, 0xff);
    (header, status)
}

/// A chain written at descriptor 0.. of the table (the driver's own `add_chain` is not used
/// so that each case controls every field).
fn chain(d: &mut Driver, descs: &[Desc]) -> u16 {
    for (i, &x) in descs.iter().enumerate() {
        d.write_desc(i as u16, x);
    }
    0
}

#[test]
fn descriptor_loops_and_chains_longer_than_the_queue() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();

    // Two descriptors pointing at each other.
    rig.case("two-descriptor loop", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        chain(
            d,
            &[desc(h, 16, F_NEXT, 1), desc(s, 1, F_NEXT | F_WRITE, 0)],
        );
        (0, s)
    });
    // A descriptor pointing at itself: the chain never reaches a status.
    rig.case("self loop", &[Outcome::NeedsReset], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        chain(d, &[desc(h, 16, F_NEXT, 0)]);
        (0, s)
    });
    // The whole table, every descriptor chained to the next and the last back to the first.
    rig.case("loop through the whole table", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        let buf = d.alloc(512);
        let mut descs = vec![desc(h, 16, F_NEXT, 1)];
        for i in 1..QSIZE {
            descs.push(desc(buf, 512, F_NEXT | F_WRITE, (i + 1) % QSIZE));
        }
        descs[usize::from(QSIZE) - 1] = desc(s, 1, F_NEXT | F_WRITE, 0);
        chain(d, &descs);
        (0, s)
    });
    // An indirect table that loops.
    rig.case("loop in an indirect table", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        let table = d.alloc(48);
        put(&d.mem, table, desc(h, 16, F_NEXT, 1));
        put(&d.mem, table + 16, desc(s, 1, F_NEXT | F_WRITE, 2));
        put(&d.mem, table + 32, desc(s, 1, F_NEXT | F_WRITE, 0));
        chain(d, &[desc(table, 48, F_INDIRECT, 0)]);
        (0, s)
    });
    // An indirect chain longer than the queue and than SEG_MAX + 2 (200 descriptors, all
    // distinct): the device must refuse it, not allocate for it.
    rig.case("indirect chain of 200 descriptors", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        let buf = d.alloc(512);
        let n = 200u16;
        let table = d.alloc(16 * u64::from(n));
        put(&d.mem, table, desc(h, 16, F_NEXT, 1));
        for i in 1..n - 1 {
            put(
                &d.mem,
                table + 16 * u64::from(i),
                desc(buf, 512, F_NEXT | F_WRITE, i + 1),
            );
        }
        put(
            &d.mem,
            table + 16 * u64::from(n - 1),
            desc(s, 1, F_WRITE, 0),
        );
        chain(d, &[desc(table, 16 * u32::from(n), F_INDIRECT, 0)]);
        (0, s)
    });
    // `next` outside the table.
    rig.case("next outside the table", &[Outcome::NeedsReset], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        chain(d, &[desc(h, 16, F_NEXT, 200)]);
        (0, s)
    });
}

#[test]
fn indirect_tables_that_nest_or_lie() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    rig.case("indirect inside indirect", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        let data = d.alloc(512);
        let table = d.alloc(48);
        let inner = d.alloc(16);
        put(&d.mem, table, desc(h, 16, F_NEXT, 1));
        put(&d.mem, table + 16, desc(s, 1, F_NEXT | F_WRITE, 2));
        put(&d.mem, table + 32, desc(inner, 16, F_INDIRECT, 0));
        put(&d.mem, inner, desc(data, 512, F_WRITE, 0));
        chain(d, &[desc(table, 48, F_INDIRECT, 0)]);
        (0, s)
    });
    let lies: [(&str, u64, u32); 6] = [
        ("empty table", SCRATCH, 0),
        ("length not a multiple of 16", SCRATCH, 17),
        ("huge length", SCRATCH, 0xffff_fff0),
        ("table outside guest RAM", 1 << 40, 48),
        ("table wrapping the address space", u64::MAX - 15, 48),
        ("table running off the end of RAM", MEM_SIZE as u64 - 16, 48),
    ];
    for (name, addr, len) in lies {
        rig.case(name, &[Outcome::NeedsReset], |d| {
            let (_, s) = header_and_status(d, T_IN, 0);
            chain(d, &[desc(addr, len, F_INDIRECT, 0)]);
            (0, s)
        });
    }
    // An indirect descriptor that also says NEXT (forbidden to the driver): the table is
    // walked and NEXT ignored, as virtio-queue does; the flush in it succeeds.
    rig.case("indirect with NEXT", &[Outcome::Status(S_OK)], |d| {
        let (h, s) = header_and_status(d, T_FLUSH, 0);
        let table = d.alloc(32);
        put(&d.mem, table, desc(h, 16, F_NEXT, 1));
        put(&d.mem, table + 16, desc(s, 1, F_WRITE, 0));
        chain(
            d,
            &[
                desc(table, 32, F_INDIRECT | F_NEXT, 1),
                desc(s, 1, F_WRITE, 0),
            ],
        );
        (0, s)
    });
}

#[test]
fn addresses_that_wrap_or_leave_guest_ram() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    let end = MEM_SIZE as u64;
    for (name, addr) in [
        ("header wrapping", u64::MAX - 7),
        ("header across the end of RAM", end - 8),
        ("header outside RAM", 1 << 40),
    ] {
        rig.case(name, &[IOERR], |d| {
            let (_, s) = header_and_status(d, T_IN, 0);
            chain(d, &[desc(addr, 16, F_NEXT, 1), desc(s, 1, F_WRITE, 0)]);
            (0, s)
        });
    }
    for (name, addr, t, flags) in [
        ("read into wrapping data", u64::MAX - 255, T_IN, F_WRITE),
        ("read across the end of RAM", end - 256, T_IN, F_WRITE),
        ("write from data outside RAM", 1 << 40, T_OUT, 0),
        ("write from wrapping data", u64::MAX - 511, T_OUT, 0),
    ] {
        rig.case(name, &[IOERR], |d| {
            let (h, s) = header_and_status(d, t, 0);
            chain(
                d,
                &[
                    desc(h, 16, F_NEXT, 1),
                    desc(addr, 512, F_NEXT | flags, 2),
                    desc(s, 1, F_WRITE, 0),
                ],
            );
            (0, s)
        });
    }
    // No usable status byte: the chain comes back with nothing written.
    for (name, addr, len) in [
        ("status at the top of the address space", u64::MAX, 1),
        ("status whose end overflows", u64::MAX - 10, 100),
        ("status ending outside RAM", 0, u32::MAX),
        ("status outside RAM", end, 1),
    ] {
        rig.case(name, &[Outcome::NeedsReset], |d| {
            let (h, s) = header_and_status(d, T_FLUSH, 0);
            chain(d, &[desc(h, 16, F_NEXT, 1), desc(addr, len, F_WRITE, 0)]);
            (0, s)
        });
    }
    // The image was never written by any of them.
    let file = std::fs::read(&rig.path_a).unwrap();
    assert!(file[..512].iter().all(|&b| b == 0x5a));
}

#[test]
fn zero_and_huge_lengths() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    rig.case("header of length 0", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        chain(d, &[desc(h, 0, F_NEXT, 1), desc(s, 1, F_WRITE, 0)]);
        (0, s)
    });
    rig.case("header of length u32::MAX", &[Outcome::NeedsReset], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        chain(d, &[desc(h, u32::MAX, F_NEXT, 1), desc(s, 1, F_WRITE, 0)]);
        (0, s)
    });
    for (name, len, expected) in [
        // A zero-length segment moves no data: the request is a no-op, not an error.
        ("data of length 0", 0, Outcome::Status(S_OK)),
        ("data of 511 bytes", 511, IOERR),
        ("data larger than size_max", (1 << 20) + 512, IOERR),
        ("data of length u32::MAX", u32::MAX, Outcome::NeedsReset),
    ] {
        rig.case(name, &[expected], |d| {
            let (h, s) = header_and_status(d, T_IN, 0);
            let buf = d.alloc(4096);
            chain(
                d,
                &[
                    desc(h, 16, F_NEXT, 1),
                    desc(buf, len, F_NEXT | F_WRITE, 2),
                    desc(s, 1, F_WRITE, 0),
                ],
            );
            (0, s)
        });
    }
    // More segments than seg_max (128), through an indirect table.
    rig.case("130 data segments", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        let buf = d.alloc(512);
        let n = 132u16;
        let table = d.alloc(16 * u64::from(n));
        put(&d.mem, table, desc(h, 16, F_NEXT, 1));
        for i in 1..n - 1 {
            put(
                &d.mem,
                table + 16 * u64::from(i),
                desc(buf, 512, F_NEXT | F_WRITE, i + 1),
            );
        }
        put(
            &d.mem,
            table + 16 * u64::from(n - 1),
            desc(s, 1, F_WRITE, 0),
        );
        chain(d, &[desc(table, 16 * u32::from(n), F_INDIRECT, 0)]);
        (0, s)
    });
    // A request past the end of the disk, and one whose byte offset overflows.
    for sector in [2048, u64::MAX / 512 + 1, u64::MAX] {
        rig.case("sector out of range", &[IOERR], |d| {
            let (h, s) = header_and_status(d, T_IN, sector);
            let buf = d.alloc(512);
            chain(
                d,
                &[
                    desc(h, 16, F_NEXT, 1),
                    desc(buf, 512, F_NEXT | F_WRITE, 2),
                    desc(s, 1, F_WRITE, 0),
                ],
            );
            (0, s)
        });
    }
    // A discard segment of the maximal sector count at the last sector.
    rig.case("write-zeroes range out of the disk", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_WRITE_ZEROES, 0);
        let seg = d.alloc(16);
        d.mem.write_obj(2047u64, GuestAddress(seg)).unwrap();
        d.mem
            .write_obj(u32::MAX >> 9, GuestAddress(seg + 8))
            .unwrap();
        d.mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
        chain(
            d,
            &[
                desc(h, 16, F_NEXT, 1),
                desc(seg, 16, F_NEXT, 2),
                desc(s, 1, F_WRITE, 0),
            ],
        );
        (0, s)
    });
}

#[test]
fn buffers_with_the_wrong_direction() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    rig.case("device-writable header", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        chain(
            d,
            &[desc(h, 16, F_NEXT | F_WRITE, 1), desc(s, 1, F_WRITE, 0)],
        );
        (0, s)
    });
    // A write whose source is a device-writable buffer: nothing reaches the disk.
    let before = std::fs::read(&rig.path_a).unwrap();
    rig.case("write from a write-only buffer", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_OUT, 100);
        let buf = d.alloc(512);
        d.fill(buf, 512, 0xee);
        chain(
            d,
            &[
                desc(h, 16, F_NEXT, 1),
                desc(buf, 512, F_NEXT | F_WRITE, 2),
                desc(s, 1, F_WRITE, 0),
            ],
        );
        (0, s)
    });
    let after = std::fs::read(&rig.path_a).unwrap();
    assert_eq!(before[100 * 512..101 * 512], after[100 * 512..101 * 512]);
    // A read into a device-readable buffer: guest memory is not written.
    let buf = rig.hostile.alloc(512);
    rig.hostile.fill(buf, 512, 0x11);
    rig.case("read into a read-only buffer", &[IOERR], |d| {
        let (h, s) = header_and_status(d, T_IN, 0);
        chain(
            d,
            &[
                desc(h, 16, F_NEXT, 1),
                desc(buf, 512, F_NEXT, 2),
                desc(s, 1, F_WRITE, 0),
            ],
        );
        (0, s)
    });
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(buf)).unwrap(), 0x11);
    // A status byte that is device-readable.
    rig.case("read-only status", &[Outcome::NeedsReset], |d| {
        let (h, s) = header_and_status(d, T_FLUSH, 0);
        chain(d, &[desc(h, 16, F_NEXT, 1), desc(s, 1, 0, 0)]);
        (0, s)
    });
}

#[test]
fn available_ring_lies_break_the_queue() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    // The available index runs more than a queue's worth ahead of the used index.
    for jump in [QSIZE + 1, 1000, u16::MAX] {
        let used = rig.hostile.used_idx();
        rig.mem
            .write_obj(jump, GuestAddress(rig.hostile.avail + 2))
            .unwrap();
        let got = rig.outcome(used, SCRATCH);
        rig.after("available index jump", got, &[Outcome::NeedsReset]);
    }
    // A head index outside the queue.
    for head in [QSIZE, 200, u16::MAX] {
        let used = rig.hostile.used_idx();
        rig.hostile.publish(head);
        let got = rig.outcome(used, SCRATCH);
        rig.after("head outside the queue", got, &[Outcome::NeedsReset]);
    }
}

#[test]
fn a_head_reused_while_in_flight_breaks_the_queue() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    rig.slow.slow_ms.store(300, Ordering::SeqCst);
    let started = rig.slow.reads_started.load(Ordering::SeqCst);
    let buf = rig.hostile.alloc(512);
    let (head, _) = rig.hostile.request(T_IN, 0, &[(buf, 512, true)]);
    w32(&rig.a, reg::QUEUE_NOTIFY, 0);
    assert!(within(
        || rig.slow.reads_started.load(Ordering::SeqCst) > started
    ));
    // The read is in the disk's hands (it sleeps 300 ms): offer the same head again.
    rig.hostile.publish(head);
    let got = rig.outcome(0, SCRATCH);
    rig.after("head reused while in flight", got, &[Outcome::NeedsReset]);
}

#[test]
fn queue_setup_lies() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    reset_promptly(&rig.a);
    assert!(negotiate(&rig.a, FEATURES));
    w32(&rig.a, reg::QUEUE_SEL, 0);
    for size in [
        0,
        3,
        17,
        100,
        u32::from(QMAX) + 1,
        u32::from(QMAX) * 2,
        1 << 16,
        u32::MAX,
    ] {
        w32(&rig.a, reg::QUEUE_NUM, size);
        w32(&rig.a, reg::QUEUE_READY, 1);
        assert_eq!(r32(&rig.a, reg::QUEUE_READY), 0, "queue size {size}");
    }
    // Running with queue 0 never made ready: notifying it does nothing, queue 1 works.
    setup_queue(&rig.a, &rig.good, 1);
    w32(&rig.a, reg::STATUS, RUNNING);
    for queue in [0, 2, 0xffff, u32::MAX] {
        w32(&rig.a, reg::QUEUE_NOTIFY, queue);
    }
    assert!(!needs_reset(&rig.a));
    rig.others_work();

    // Queue areas outside RAM, or wrapping: the device cannot use the queue.
    for (desc_addr, avail, used) in [
        (1u64 << 40, HOSTILE_BASE + 0x1000, HOSTILE_BASE + 0x2000),
        (HOSTILE_BASE, u64::MAX - 3, HOSTILE_BASE + 0x2000),
        (HOSTILE_BASE, HOSTILE_BASE + 0x1000, MEM_SIZE as u64 - 4),
        (
            HOSTILE_BASE + 1,
            HOSTILE_BASE + 0x1000,
            HOSTILE_BASE + 0x2000,
        ),
    ] {
        reset_promptly(&rig.a);
        assert!(negotiate(&rig.a, FEATURES));
        let mut bad = Driver::at(rig.mem.clone(), QSIZE, HOSTILE_BASE);
        (bad.desc, bad.avail, bad.used) = (desc_addr, avail, used);
        setup_queue(&rig.a, &bad, 0);
        setup_queue(&rig.a, &rig.good, 1);
        rig.good = Driver::at(rig.mem.clone(), QSIZE, GOOD_BASE);
        rig.mem
            .write_slice(&[0u8; 0x4000], GuestAddress(GOOD_BASE))
            .unwrap();
        rig.good_buf = rig.good.alloc(4096);
        w32(&rig.a, reg::STATUS, RUNNING);
        assert!(
            needs_reset(&rig.a),
            "queue at {desc_addr:#x}/{avail:#x}/{used:#x}"
        );
        w32(&rig.a, reg::QUEUE_NOTIFY, 0);
        rig.others_work();
    }
    rig.restart_a();
    rig.others_work();
}

#[test]
fn notifications_before_driver_ok_are_not_acted_on() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    reset_promptly(&rig.a);
    rig.mem
        .write_slice(&[0u8; 0x4000], GuestAddress(HOSTILE_BASE))
        .unwrap();
    let mut d = Driver::at(rig.mem.clone(), QSIZE, HOSTILE_BASE);
    let buf = d.alloc(512);
    d.fill(buf, 512, 0);
    let (_, status_addr) = d.request(T_IN, 0, &[(buf, 512, true)]);
    let notify_all = |mmio: &Mmio| {
        for q in [0, 1, 5] {
            w32(mmio, reg::QUEUE_NOTIFY, q);
        }
    };
    notify_all(&rig.a);
    w32(&rig.a, reg::STATUS, status::ACKNOWLEDGE);
    notify_all(&rig.a);
    assert!(negotiate(&rig.a, FEATURES));
    notify_all(&rig.a);
    setup_queue(&rig.a, &d, 0);
    notify_all(&rig.a);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(d.used_idx(), 0, "nothing runs before DRIVER_OK");
    assert_eq!(d.status(status_addr), 0xff);
    // DRIVER_OK: the request made available before it completes, once.
    w32(&rig.a, reg::STATUS, RUNNING);
    assert!(within(|| d.used_idx() == 1));
    assert_eq!(d.status(status_addr), S_OK);
    assert_eq!(d.read(buf, 512), vec![0x5a; 512]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(), 1, "completed exactly once");
    rig.restart_a();
    rig.others_work();
}

#[test]
fn feature_bits_never_offered_are_refused() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    let a = rig.a.clone();
    let offered = a.with_device(|d| d.offered_features());
    let unoffered: Vec<u32> = (0..64).filter(|b| offered & (1u64 << b) == 0).collect();
    assert!(!unoffered.is_empty());
    // Each bit the device does not offer, alone with VERSION_1, is refused.
    for bit in unoffered {
        reset_promptly(&a);
        assert!(
            !negotiate(&a, VERSION_1 | (1u64 << bit)),
            "bit {bit} accepted"
        );
        // Without FEATURES_OK nothing goes further: no queue setup, no DRIVER_OK.
        w32(&a, reg::QUEUE_SEL, 0);
        w32(&a, reg::QUEUE_NUM, u32::from(QSIZE));
        w32(&a, reg::QUEUE_READY, 1);
        assert_eq!(r32(&a, reg::QUEUE_READY), 0);
        w32(&a, reg::STATUS, RUNNING);
        assert_eq!(
            r32(&a, reg::STATUS) & (status::FEATURES_OK | status::DRIVER_OK),
            0
        );
    }
    // Feature pages beyond 1 are ignored; writes after FEATURES_OK are ignored.
    reset_promptly(&a);
    w32(&a, reg::STATUS, status::ACKNOWLEDGE);
    w32(&a, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    for page in [2, 3, 0xff, u32::MAX] {
        w32(&a, reg::DRIVER_FEATURES_SEL, page);
        w32(&a, reg::DRIVER_FEATURES, u32::MAX);
    }
    assert_eq!(a.with_device(|d| d.driver_features()), 0);
    reset_promptly(&a);
    assert!(negotiate(&a, FEATURES));
    w32(&a, reg::DRIVER_FEATURES_SEL, 0);
    w32(&a, reg::DRIVER_FEATURES, u32::MAX);
    assert_eq!(a.with_device(|d| d.driver_features()), FEATURES);
    // Using EVENT_IDX ring fields and indirect tables without negotiating them is harmless.
    reset_promptly(&a);
    assert!(negotiate(&a, VERSION_1 | FLUSH));
    rig.mem
        .write_slice(&[0u8; 0x4000], GuestAddress(HOSTILE_BASE))
        .unwrap();
    rig.hostile = Driver::at(rig.mem.clone(), QSIZE, HOSTILE_BASE);
    setup_queue(&a, &rig.hostile, 0);
    setup_queue(&a, &rig.good, 1);
    rig.mem
        .write_slice(&[0u8; 0x4000], GuestAddress(GOOD_BASE))
        .unwrap();
    rig.good = Driver::at(rig.mem.clone(), QSIZE, GOOD_BASE);
    rig.good_buf = rig.good.alloc(4096);
    w32(&a, reg::STATUS, RUNNING);
    rig.hostile.set_used_event(0x7fff);
    rig.case(
        "indirect table without INDIRECT_DESC",
        &[Outcome::Status(S_OK)],
        |d| {
            let (h, s) = header_and_status(d, T_FLUSH, 0);
            let table = d.alloc(32);
            put(&d.mem, table, desc(h, 16, F_NEXT, 1));
            put(&d.mem, table + 16, desc(s, 1, F_WRITE, 0));
            chain(d, &[desc(table, 32, F_INDIRECT, 0)]);
            (0, s)
        },
    );
}

#[test]
fn reset_during_io_and_register_floods() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    // A thread floods every notification of device A while the main thread resets it in
    // the middle of batches of I/O on both queues.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let a = rig.a.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                w32(&a, reg::QUEUE_NOTIFY, n % 3);
                n = n.wrapping_add(1);
                if n % 64 == 0 {
                    std::thread::yield_now();
                }
            }
        })
    };
    for round in 0..30u64 {
        let delay = if round % 5 == 0 { 30 } else { 0 };
        rig.slow.slow_ms.store(delay, Ordering::SeqCst);
        // Five 3-descriptor requests per queue: the 16-entry tables hold them all.
        for i in 0..5u64 {
            let buf = rig.hostile.alloc(4096);
            let t = if i % 2 == 0 { T_IN } else { T_OUT };
            rig.hostile.request(t, i * 8, &[(buf, 4096, t == T_IN)]);
            let buf = rig.good.alloc(4096);
            rig.good.request(t, 512 + i * 8, &[(buf, 4096, t == T_IN)]);
        }
        w32(&rig.a, reg::QUEUE_NOTIFY, 0);
        w32(&rig.a, reg::QUEUE_NOTIFY, 1);
        std::thread::sleep(Duration::from_micros(round * 100));
        reset_promptly(&rig.a);
        // After the reset nothing touches the rings.
        let used = (rig.hostile.used_idx(), rig.good.used_idx());
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!((rig.hostile.used_idx(), rig.good.used_idx()), used);
        rig.start_a();
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    rig.others_work();
    let buf = rig.hostile.alloc(512);
    write_and_read(&rig.a, 0, &mut rig.hostile, buf, 0, 0x77);

    // Every register offset and width with hostile values, then a reset: the device works.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for offset in 0..reg::CONFIG {
        for len in [1usize, 2, 3, 4, 8] {
            rig.a.write(offset, &next().to_le_bytes()[..len]);
            let mut out = [0u8; 8];
            rig.a.read(offset, &mut out[..len]);
        }
    }
    rig.restart_a();
    rig.others_work();
}

#[test]
fn config_writes_at_every_offset_and_width() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    let snapshot = |mmio: &Mmio| {
        let mut config = [0u8; 64];
        mmio.read(reg::CONFIG, &mut config);
        config
    };
    let before = snapshot(&rig.a);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // The whole configuration window, then offsets near u64::MAX, every width up to 8 and a
    // 64-byte one, while the device runs.
    let offsets = (reg::CONFIG..0x1000).chain([u64::MAX - 8, u64::MAX - 1, u64::MAX]);
    for offset in offsets {
        for len in [1usize, 2, 3, 4, 8, 64] {
            let value: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            rig.a.write(offset, &value);
            let mut out = vec![0u8; len];
            rig.a.read(offset, &mut out);
        }
    }
    // Only `writeback` (byte 32) is writable; its value is 0 or 1.
    let after = snapshot(&rig.a);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if i == 32 {
            assert!(*a <= 1);
        } else {
            assert_eq!(b, a, "config byte {i} changed");
        }
    }
    assert!(!needs_reset(&rig.a));
    rig.others_work();
    let buf = rig.hostile.alloc(512);
    write_and_read(&rig.a, 0, &mut rig.hostile, buf, 0, 0x66);
}

#[test]
fn pci_queue_sizes_features_and_config_writes() {
    let _serial = one_at_a_time();
    let mem = memory();
    let path = image(1 << 20, 0x3c);
    let routing = Arc::new(EventFdMsiRouting::new(msix_vectors(1)).unwrap());
    let options = BlockOptions {
        serial: b"pci".to_vec(),
        queue_size: QMAX,
        ..BlockOptions::default()
    };
    let t =
        VirtioPciTransport::build(vec![open(&path, false)], mem.clone(), options, routing).unwrap();
    let w =
        |offset: u64, len: usize, value: u64| t.bar_write(0, offset, &value.to_le_bytes()[..len]);
    let r = |offset: u64, len: usize| {
        let mut data = [0u8; 8];
        t.bar_read(0, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    };
    let st = |v: u32| w(cc::DEVICE_STATUS, 1, u64::from(v));
    st(status::ACKNOWLEDGE);
    st(status::ACKNOWLEDGE | status::DRIVER);
    // Unoffered features: FEATURES_OK is refused.
    w(cc::DRIVER_FEATURE_SELECT, 4, 0);
    w(cc::DRIVER_FEATURE, 4, 0xffff_ffff);
    w(cc::DRIVER_FEATURE_SELECT, 4, 1);
    w(cc::DRIVER_FEATURE, 4, 0xffff_ffff);
    st(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(r(cc::DEVICE_STATUS, 1) as u32 & status::FEATURES_OK, 0);
    st(0);
    st(status::ACKNOWLEDGE);
    st(status::ACKNOWLEDGE | status::DRIVER);
    w(cc::DRIVER_FEATURE_SELECT, 4, 1);
    w(cc::DRIVER_FEATURE, 4, 1);
    st(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_ne!(r(cc::DEVICE_STATUS, 1) as u32 & status::FEATURES_OK, 0);
    // Queue sizes that are not powers of two, or too large, or out-of-range queues.
    for (queue, size) in [
        (0, 3),
        (0, 100),
        (0, 0x8000),
        (0, 0xffff),
        (1, 16),
        (0xffff, 16),
    ] {
        w(cc::QUEUE_SELECT, 2, queue);
        w(cc::QUEUE_SIZE, 2, size);
        w(cc::QUEUE_ENABLE, 2, 1);
        assert_eq!(r(cc::QUEUE_ENABLE, 2), 0, "queue {queue} size {size}");
    }
    // Device configuration at every offset and width.
    let mut before = [0u8; 64];
    t.bar_read(0, pci::DEVICE_OFFSET, &mut before[..8]);
    for offset in pci::DEVICE_OFFSET..pci::NOTIFY_OFFSET {
        for len in [1usize, 2, 4, 8] {
            w(offset, len, 0xdead_beef_cafe_f00d);
            r(offset, len);
        }
    }
    let mut after = [0u8; 64];
    t.bar_read(0, pci::DEVICE_OFFSET, &mut after[..8]);
    assert_eq!(before[..8], after[..8], "capacity changed");
    // A proper queue, then a request: the device still works.
    let mut d = Driver::new(mem.clone(), QSIZE);
    w(cc::QUEUE_SELECT, 2, 0);
    w(cc::QUEUE_SIZE, 2, u64::from(QSIZE));
    w(cc::QUEUE_DESC, 8, d.desc);
    w(cc::QUEUE_DRIVER, 8, d.avail);
    w(cc::QUEUE_DEVICE, 8, d.used);
    w(cc::QUEUE_ENABLE, 2, 1);
    assert_eq!(r(cc::QUEUE_ENABLE, 2), 1);
    st(RUNNING);
    // Notifications at every notify offset, most for queues that do not exist.
    for offset in (pci::NOTIFY_OFFSET..pci::MSIX_TABLE_OFFSET).step_by(2) {
        w(offset, 2, 0);
    }
    let buf = d.alloc(512);
    let used = d.used_idx();
    let (_, s) = d.request(T_IN, 0, &[(buf, 512, true)]);
    w(pci::NOTIFY_OFFSET, 2, 0);
    assert!(within(|| d.used_idx() == used.wrapping_add(1)));
    assert_eq!(d.status(s), S_OK);
    assert_eq!(d.read(buf, 512), vec![0x3c; 512]);
    st(0);
}

fn rss_kib() -> u64 {
    proc_status("VmRSS:")
}

fn proc_status(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// The device's I/O threads (the test harness's own threads come and go).
fn io_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("virtio-blk-q"))
        .count()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Publishes `count` bad requests of every non-fatal kind, `QSIZE - 1` at a time, and waits
/// for each batch (bounded).
fn bad_requests(rig: &mut Rig, count: usize, header: u64, status_addr: u64, buf: u64, table: u64) {
    let d = &mut rig.hostile;
    let mut sent = 0;
    while sent < count {
        let batch = (count - sent).min(4);
        let used = d.used_idx();
        for i in 0..batch {
            // Each request uses descriptors 4i..4i+3 of the table.
            let base = (i * 4) as u16;
            let descs: [Desc; 3] = match (sent + i) % 6 {
                // A loop.
                0 => [
                    desc(header, 16, F_NEXT, base + 1),
                    desc(status_addr, 1, F_NEXT | F_WRITE, base),
                    desc(0, 0, 0, 0),
                ],
                // A wrapping data buffer.
                1 => [
                    desc(header, 16, F_NEXT, base + 1),
                    desc(u64::MAX - 255, 512, F_NEXT | F_WRITE, base + 2),
                    desc(status_addr, 1, F_WRITE, 0),
                ],
                // A device-writable header.
                2 => [
                    desc(header, 16, F_NEXT | F_WRITE, base + 1),
                    desc(status_addr, 1, F_WRITE, 0),
                    desc(0, 0, 0, 0),
                ],
                // Data that is not whole sectors.
                3 => [
                    desc(header, 16, F_NEXT, base + 1),
                    desc(buf, 511, F_NEXT | F_WRITE, base + 2),
                    desc(status_addr, 1, F_WRITE, 0),
                ],
                // An indirect table of 200 descriptors (too many segments).
                4 => [
                    desc(table, 200 * 16, F_INDIRECT, 0),
                    desc(0, 0, 0, 0),
                    desc(0, 0, 0, 0),
                ],
                // A read into a buffer the device may not write. (Chains without a usable
                // status byte are fatal to the queue: they are not among these.)
                _ => [
                    desc(header, 16, F_NEXT, base + 1),
                    desc(buf, 512, F_NEXT, base + 2),
                    desc(status_addr, 1, F_WRITE, 0),
                ],
            };
            for (j, x) in descs.iter().enumerate() {
                d.write_desc(base + j as u16, *x);
            }
            d.publish(base);
        }
        w32(&rig.a, reg::QUEUE_NOTIFY, 0);
        let target = used.wrapping_add(batch as u16);
        assert!(
            within(|| d.used_idx() == target),
            "bad requests were not all returned (needs reset: {})",
            needs_reset(&rig.a)
        );
        sent += batch;
    }
}

#[test]
fn memory_fds_and_threads_stay_bounded() {
    let _serial = one_at_a_time();
    let mut rig = Rig::new();
    let header = rig.hostile.header(T_IN, 0);
    let status_addr = rig.hostile.alloc(1);
    let buf = rig.hostile.alloc(4096);
    let table = SCRATCH;
    let data = rig.hostile.alloc(512);
    put(&rig.mem, table, desc(header, 16, F_NEXT, 1));
    for i in 1..199u16 {
        put(
            &rig.mem,
            table + 16 * u64::from(i),
            desc(data, 512, F_NEXT | F_WRITE, i + 1),
        );
    }
    put(&rig.mem, table + 16 * 199, desc(status_addr, 1, F_WRITE, 0));

    // Warm up (slots grow to their largest request), then measure.
    bad_requests(&mut rig, 1000, header, status_addr, buf, table);
    let (rss, fds, threads) = (rss_kib(), open_fds(), io_threads());
    bad_requests(&mut rig, 10_000, header, status_addr, buf, table);
    assert!(!needs_reset(&rig.a));
    assert_eq!(rig.hostile.status(status_addr), S_IOERR);
    let grown = rss_kib().saturating_sub(rss);
    assert!(
        grown < 2048,
        "RSS grew by {grown} KiB over 10000 bad requests"
    );
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    rig.others_work();

    // Resets do not leak threads or eventfds either.
    for _ in 0..50 {
        rig.restart_a();
    }
    rig.others_work();
    assert_eq!(open_fds(), fds, "file descriptors leaked across resets");
    assert_eq!(io_threads(), threads, "threads leaked across resets");
    let grown = rss_kib().saturating_sub(rss);
    assert!(grown < 4096, "RSS grew by {grown} KiB");
}
