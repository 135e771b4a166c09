//! virtio-blk virtqueue throughput: `BlockQueue` driven by a mock driver, without threads,
//! against a null disk (the device's own cost) and a raw file on io_uring, next to a FLOOR
//! that does only what virtio-queue itself does for the same chains (pop, read the three
//! descriptors, `add_used`).
//!
//! Ids: `<backend>/<op>/<size>/batch<N>/<event_idx|no_event_idx>/q<Q>` for the device and
//! `floor/batch<N>/<event_idx|no_event_idx>/q<Q>` for the floor. One iteration offers N
//! chains on each of Q queues, runs each queue once (`process_queue`, plus
//! `handle_completions` until the batch is used for the file backend) and checks the used
//! ring; throughput is in requests (and, for the file backend, bytes in a second group).
//!
//! The mock driver is as cheap as it can be and identical for the floor and the device: the
//! descriptor table and the available ring entries are written once (queue size 1024 is a
//! multiple of every batch size, so ring slot `k` always offers chain `k % N`); per
//! iteration the driver only moves the free-running available index (and `used_event` with
//! EVENT_IDX) and reads the used index back.
//!
//! After criterion, the null backend and the floor are timed again over a fixed number of
//! rounds, alternating, and `ns/request` with the ratio device/floor is printed.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_block_backend::{
    AsyncDisk, CacheMode, Completion, DiskInfo, EngineKind, IoBuf, OpenOptions, Request, SyncDisk,
};
use vmkit_virtio_blk::{BlockQueue, CountingInterrupt};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The production guest memory type (no dirty bitmap), as `vmkit_memory::GuestRam` uses.
type Mem = GuestMemoryMmap;

/// Queue size: 256 chains of 3 descriptors need 768 descriptors.
const QUEUE_SIZE: u16 = 1024;
const MAX_BATCH: u16 = 256;
const MAX_QUEUES: u64 = 4;
const MAX_DATA: u64 = 64 << 10;
/// Guest memory per queue: rings in the first 64 KiB, then headers and statuses, then data.
const QUEUE_REGION: u64 = 32 << 20;
const MEM_SIZE: u64 = QUEUE_REGION * MAX_QUEUES;
/// Disk size: every chain of every queue has its own 64 KiB range.
const DISK_SIZE: u64 = MAX_QUEUES * MAX_BATCH as u64 * MAX_DATA;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Null,
    File,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Null => "null",
            Backend::File => "file",
        }
    }
}

/// Addresses of one queue's rings and buffers.
#[derive(Clone, Copy)]
struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
    headers: u64,
    statuses: u64,
    data: u64,
}

impl Layout {
    fn new(queue: u64) -> Self {
        let base = queue * QUEUE_REGION;
        Layout {
            desc: base,
            avail: base + 0x4000,
            used: base + 0x5000,
            headers: base + 0x10000,
            statuses: base + 0x20000,
            data: base + 0x100000,
        }
    }
}

/// One queue's side of the mock driver.
struct Driver {
    mem: Arc<Mem>,
    layout: Layout,
    batch: u16,
    event_idx: bool,
    avail_idx: u16,
}

impl Driver {
    /// Writes the descriptor table and the whole available ring once: chain `i` uses
    /// descriptors `3i..3i+3` and reaches its own disk range.
    fn new(mem: Arc<Mem>, queue: u64, batch: u16, op: Op, size: u32, event_idx: bool) -> Self {
        let layout = Layout::new(queue);
        for i in 0..u64::from(batch) {
            let header = layout.headers + 16 * i;
            let status = layout.statuses + i;
            let data = layout.data + MAX_DATA * i;
            let request_type = if op == Op::Read { T_IN } else { T_OUT };
            let sector = (queue * u64::from(MAX_BATCH) + i) * MAX_DATA / 512;
            mem.write_obj(request_type, GuestAddress(header)).unwrap();
            mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
            mem.write_obj(sector, GuestAddress(header + 8)).unwrap();
            let data_flags = if op == Op::Read { F_WRITE } else { 0 };
            let parts = [
                (header, 16, F_NEXT),
                (data, size, data_flags | F_NEXT),
                (status, 1, F_WRITE),
            ];
            for (j, (addr, len, flags)) in parts.into_iter().enumerate() {
                let index = 3 * i + j as u64;
                let at = layout.desc + 16 * index;
                mem.write_obj(addr, GuestAddress(at)).unwrap();
                mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                mem.write_obj((index + 1) as u16, GuestAddress(at + 14))
                    .unwrap();
            }
        }
        for slot in 0..u64::from(QUEUE_SIZE) {
            let head = (3 * (slot % u64::from(batch))) as u16;
            mem.write_obj(head, GuestAddress(layout.avail + 4 + 2 * slot))
                .unwrap();
        }
        mem.write_obj(0u16, GuestAddress(layout.avail)).unwrap();
        mem.write_obj(0u16, GuestAddress(layout.avail + 2)).unwrap();
        Driver {
            mem,
            layout,
            batch,
            event_idx,
            avail_idx: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(self.layout.desc as u32), Some(0));
        queue.set_avail_ring_address(Some(self.layout.avail as u32), Some(0));
        queue.set_used_ring_address(Some(self.layout.used as u32), Some(0));
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        queue
    }

    /// Makes the next `batch` chains available. With EVENT_IDX, asks for an interrupt as
    /// soon as the device uses one of them (`used_event` = the used index seen so far), as a
    /// driver waiting for the batch would.
    fn offer(&mut self) {
        if self.event_idx {
            let used_event = GuestAddress(self.layout.avail + 4 + 2 * u64::from(QUEUE_SIZE));
            self.mem.write_obj(self.avail_idx, used_event).unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(self.batch);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.layout.avail + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.layout.used + 2))
            .unwrap()
    }

    /// Consumes the used ring: the heads can be offered again since all of them came back.
    fn consume(&self) {
        assert_eq!(self.used_idx(), self.avail_idx, "batch not fully used");
    }
}

/// A disk that completes every request in `push`; nothing is read or written.
struct NullDisk {
    done: Vec<Completion>,
    eventfd: EventFd,
    sync: Arc<dyn SyncDisk>,
}

impl NullDisk {
    fn new() -> Self {
        NullDisk {
            done: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            eventfd: EventFd::new(EFD_NONBLOCK).unwrap(),
            sync: Arc::new(NullSyncDisk),
        }
    }
}

fn null_info() -> DiskInfo {
    DiskInfo {
        size: DISK_SIZE,
        logical_block_size: 512,
        physical_block_size: 4096,
        request_alignment: 1,
        memory_alignment: 1,
        read_only: false,
        discard: false,
    }
}

impl AsyncDisk for NullDisk {
    fn info(&self) -> DiskInfo {
        null_info()
    }

    fn engine(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn sync_disk(&self) -> &Arc<dyn SyncDisk> {
        &self.sync
    }

    fn max_in_flight(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    // SAFETY: the caller's contract (buffers valid until reaped) is more than this needs:
    // the null disk never touches the buffers, it only sums their lengths.
    unsafe fn push(&mut self, token: u64, request: Request<'_>) -> vmkit_block_backend::Result<()> {
        let bytes = match request {
            Request::Read { bufs, .. } | Request::Write { bufs, .. } => {
                bufs.iter().map(IoBuf::len).sum()
            }
            _ => 0,
        };
        self.done.push(Completion {
            token,
            result: Ok(bytes),
        });
        Ok(())
    }

    fn submit(&mut self) -> vmkit_block_backend::Result<()> {
        Ok(())
    }

    fn reap(&mut self, completions: &mut Vec<Completion>) -> usize {
        let n = self.done.len();
        completions.append(&mut self.done);
        n
    }

    fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

/// `NullDisk::sync_disk`'s answer; the queue never calls it on the hot path.
struct NullSyncDisk;

impl SyncDisk for NullSyncDisk {
    fn info(&self) -> DiskInfo {
        null_info()
    }

    fn cache_mode(&self) -> CacheMode {
        CacheMode::Unsafe
    }

    fn write_cache(&self) -> bool {
        true
    }

    fn set_write_cache(&self, _enabled: bool) -> vmkit_block_backend::Result<()> {
        Ok(())
    }

    fn read_vectored(
        &self,
        _offset: u64,
        bufs: &[IoBuf<'_>],
    ) -> vmkit_block_backend::Result<usize> {
        Ok(bufs.iter().map(IoBuf::len).sum())
    }

    fn write_vectored(
        &self,
        _offset: u64,
        bufs: &[IoBuf<'_>],
    ) -> vmkit_block_backend::Result<usize> {
        Ok(bufs.iter().map(IoBuf::len).sum())
    }

    fn flush(&self) -> vmkit_block_backend::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> vmkit_block_backend::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> vmkit_block_backend::Result<()> {
        Ok(())
    }
}

/// A 64 MiB image on a real file system (the target directory, not a tmpfs /tmp).
struct Image(PathBuf);

impl Image {
    fn new() -> Self {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("virtio-blk-bench-{}.img", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        // Written out rather than sparse, so that reads hit the page cache, not holes.
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..DISK_SIZE / (1 << 20) {
            std::io::Write::write_all(&mut &file, &chunk).unwrap();
        }
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Case {
    backend: Backend,
    op: Op,
    size: u32,
    batch: u16,
    event_idx: bool,
    queues: u64,
}

impl Case {
    fn id(&self) -> String {
        format!(
            "{}/{}/{}k/batch{}/{}/q{}",
            self.backend.name(),
            self.op.name(),
            self.size >> 10,
            self.batch,
            event_idx_name(self.event_idx),
            self.queues
        )
    }

    fn requests(&self) -> u64 {
        u64::from(self.batch) * self.queues
    }
}

fn event_idx_name(event_idx: bool) -> &'static str {
    if event_idx {
        "event_idx"
    } else {
        "no_event_idx"
    }
}

/// The device side of a case: one `BlockQueue` (with its own disk) and driver per queue.
struct Device {
    queues: Vec<(Driver, BlockQueue<Mem>)>,
    wait: bool,
}

impl Device {
    fn new(case: &Case, image: Option<&Image>) -> Self {
        let mem = memory();
        let interrupt = Arc::new(CountingInterrupt::new());
        let queues = (0..case.queues)
            .map(|q| {
                let driver = Driver::new(
                    mem.clone(),
                    q,
                    case.batch,
                    case.op,
                    case.size,
                    case.event_idx,
                );
                let disk: Box<dyn AsyncDisk> = match (case.backend, image) {
                    (Backend::File, Some(image)) => {
                        let options = OpenOptions::new()
                            .cache(CacheMode::Writeback)
                            .engine(EngineKind::IoUring)
                            .locking(false)
                            .max_in_flight(usize::from(MAX_BATCH));
                        vmkit_block_backend::open(&image.0, &options).unwrap()
                    }
                    _ => Box::new(NullDisk::new()),
                };
                let queue =
                    BlockQueue::new(0, driver.queue(), mem.clone(), disk, interrupt.clone(), b"");
                (driver, queue)
            })
            .collect();
        let mut device = Device {
            queues,
            wait: case.backend == Backend::File,
        };
        device.check(case);
        device
    }

    /// Runs one round and checks that every request succeeded: an error status is used too,
    /// so a request the device rejects would otherwise be timed as a cheap success.
    fn check(&mut self, case: &Case) {
        for (driver, _) in &self.queues {
            for i in 0..u64::from(case.batch) {
                let status = GuestAddress(driver.layout.statuses + i);
                driver.mem.write_obj(0xffu8, status).unwrap();
            }
        }
        self.round();
        let used_len = if case.op == Op::Read {
            case.size + 1
        } else {
            1
        };
        for (driver, _) in &self.queues {
            for i in 0..u64::from(case.batch) {
                let status: u8 = driver
                    .mem
                    .read_obj(GuestAddress(driver.layout.statuses + i))
                    .unwrap();
                assert_eq!(status, 0, "{}: request {i} failed", case.id());
                let len: u32 = driver
                    .mem
                    .read_obj(GuestAddress(driver.layout.used + 4 + 8 * i + 4))
                    .unwrap();
                assert_eq!(len, used_len, "{}: request {i} used length", case.id());
            }
        }
    }

    /// One round: offer a batch on every queue, process each queue in turn, wait for the
    /// disks if they are asynchronous, consume the used rings.
    fn round(&mut self) {
        for (driver, queue) in &mut self.queues {
            driver.offer();
            queue.process_queue().unwrap();
        }
        if self.wait {
            for (driver, queue) in &mut self.queues {
                while driver.used_idx() != driver.avail_idx {
                    wait_readable(queue.disk().eventfd());
                    let _ = queue.disk().eventfd().read();
                    queue.handle_completions().unwrap();
                }
            }
        }
        for (driver, _) in &self.queues {
            driver.consume();
        }
    }
}

/// The floor: virtio-queue alone on the same chains and the same driver.
struct Floor {
    queues: Vec<(Driver, Queue)>,
    mem: Arc<Mem>,
}

impl Floor {
    fn new(batch: u16, event_idx: bool, queues: u64) -> Self {
        let mem = memory();
        let queues = (0..queues)
            .map(|q| {
                let driver = Driver::new(mem.clone(), q, batch, Op::Read, 4096, event_idx);
                let queue = driver.queue();
                (driver, queue)
            })
            .collect();
        Floor { queues, mem }
    }

    fn round(&mut self) {
        let mem = self.mem.as_ref();
        for (driver, queue) in &mut self.queues {
            driver.offer();
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                for desc in chain {
                    black_box((desc.addr(), desc.len()));
                }
                queue.add_used(mem, head, 1).unwrap();
            }
        }
        for (driver, _) in &self.queues {
            driver.consume();
        }
    }
}

fn memory() -> Arc<Mem> {
    Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap())
}

/// Waits (up to 1 s) for `fd` to become readable.
fn wait_readable(fd: &impl std::os::fd::AsRawFd) {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pollfd` is a valid, initialised pollfd and the count is 1.
    unsafe { libc::poll(&mut pollfd, 1, 1000) };
}

const BATCHES: [u16; 3] = [1, 32, 256];
const QUEUES: [u64; 2] = [1, 4];

fn cases(backend: Backend) -> Vec<Case> {
    let mut cases = Vec::new();
    for op in [Op::Read, Op::Write] {
        for size in [4 << 10, 64 << 10] {
            for batch in BATCHES {
                for event_idx in [false, true] {
                    for queues in QUEUES {
                        cases.push(Case {
                            backend,
                            op,
                            size,
                            batch,
                            event_idx,
                            queues,
                        });
                    }
                }
            }
        }
    }
    cases
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("requests");
    for batch in BATCHES {
        for event_idx in [false, true] {
            for queues in QUEUES {
                let id = format!("floor/batch{batch}/{}/q{queues}", event_idx_name(event_idx));
                group.throughput(Throughput::Elements(u64::from(batch) * queues));
                group.bench_function(BenchmarkId::from_parameter(id), |b| {
                    let mut floor = Floor::new(batch, event_idx, queues);
                    b.iter(|| floor.round());
                });
            }
        }
    }
    // Created on first use, so that a run filtered to the null backend writes no image.
    let mut image: Option<Image> = None;
    for backend in [Backend::Null, Backend::File] {
        for case in cases(backend) {
            group.throughput(Throughput::Elements(case.requests()));
            group.bench_function(BenchmarkId::from_parameter(case.id()), |b| {
                let image =
                    (backend == Backend::File).then(|| &*image.get_or_insert_with(Image::new));
                let mut device = Device::new(&case, image);
                b.iter(|| device.round());
            });
        }
    }
    group.finish();

    // Bytes only mean something when they move: the file backend.
    let mut group = c.benchmark_group("bytes");
    for case in cases(Backend::File) {
        group.throughput(Throughput::Bytes(case.requests() * u64::from(case.size)));
        group.bench_function(BenchmarkId::from_parameter(case.id()), |b| {
            let mut device = Device::new(&case, Some(image.get_or_insert_with(Image::new)));
            b.iter(|| device.round());
        });
    }
    group.finish();
}

/// Times the null backend (4 KiB reads) against the floor, alternating, and prints
/// ns/request and the ratio. Skipped when a filter is given that matches neither
/// `null` nor `floor` nor `compare`.
fn compare() {
    const ROUNDS: usize = 5;
    const TARGET: Duration = Duration::from_millis(100);
    for batch in [32, 256] {
        for event_idx in [false, true] {
            let case = Case {
                backend: Backend::Null,
                op: Op::Read,
                size: 4 << 10,
                batch,
                event_idx,
                queues: 1,
            };
            let mut device = Device::new(&case, None);
            let mut floor = Floor::new(batch, event_idx, 1);
            let (mut ours, mut base) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..ROUNDS {
                ours = ours.min(time_per_request(|| device.round(), case.requests(), TARGET));
                base = base.min(time_per_request(|| floor.round(), case.requests(), TARGET));
            }
            println!(
                "compare {}: ours {ours:.1} ns/req ({:.2} Mreq/s), floor {base:.1} ns/req \
                 ({:.2} Mreq/s), ratio {:.2}",
                case.id(),
                1e3 / ours,
                1e3 / base,
                ours / base
            );
        }
    }
}

/// Best-effort ns per request of `round` over about `target`.
fn time_per_request(mut round: impl FnMut(), requests: u64, target: Duration) -> f64 {
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < target {
        round();
        rounds += 1;
    }
    start.elapsed().as_nanos() as f64 / (rounds * requests) as f64
}

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
    let filter = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-'))
        .unwrap_or_default();
    if ["null", "floor", "compare"]
        .iter()
        .any(|word| filter.is_empty() || filter.contains(word) || word.contains(&filter))
    {
        compare();
    }
}
