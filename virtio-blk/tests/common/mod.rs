//! A minimal virtio driver over guest memory, for the tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, Bytes, GuestAddress};
use vmkit_block_backend::{AsyncDisk, OpenOptions};
use vmkit_virtio_blk::BlockQueue;

pub type Mem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub const MEM_SIZE: usize = 16 << 20;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x10000;
pub const USED: u64 = 0x20000;
/// Where request headers, data and statuses go.
pub const DATA: u64 = 0x100000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub fn memory() -> Arc<Mem> {
    Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh image of `size` bytes filled with `fill`.
pub fn image(size: usize, fill: u8) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vblk-{}-{n}.img", std::process::id()));
    std::fs::write(&path, vec![fill; size]).unwrap();
    path
}

pub fn open(path: &std::path::Path, read_only: bool) -> Box<dyn AsyncDisk> {
    let options = OpenOptions::new().locking(false).read_only(read_only);
    vmkit_block_backend::open(path, &options).unwrap()
}

/// One descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub struct Driver {
    pub mem: Arc<Mem>,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    /// Bump allocator for headers, data and statuses.
    next_data: u64,
}

impl Driver {
    pub fn new(mem: Arc<Mem>, size: u16) -> Self {
        Driver {
            mem,
            size,
            desc: DESC,
            avail: AVAIL,
            used: USED,
            next_desc: 0,
            avail_idx: 0,
            next_data: DATA,
        }
    }

    /// A driver whose rings and buffers live in their own 1 MiB at `base`, so that several
    /// drivers (one per queue) can share guest memory.
    pub fn at(mem: Arc<Mem>, size: u16, base: u64) -> Self {
        Driver {
            mem,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            next_data: base + 0x4000,
        }
    }

    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.desc as u32), Some(0));
        queue.set_avail_ring_address(Some(self.avail as u32), Some(0));
        queue.set_used_ring_address(Some(self.used as u32), Some(0));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_data;
        self.next_data += len.div_ceil(16) * 16;
        assert!(self.next_data < MEM_SIZE as u64);
        addr
    }

    pub fn write_desc(&self, index: u16, d: Desc) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        self.mem.write_obj(d.addr, at).unwrap();
        self.mem.write_obj(d.len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(d.flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(d.next, at.unchecked_add(14)).unwrap();
    }

    /// Publishes `head` in the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Writes a chain of (addr, len, writable) at the next free indexes and publishes it.
    pub fn add_chain(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in parts.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == parts.len();
            self.write_desc(
                index,
                Desc {
                    addr,
                    len,
                    flags: if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT },
                    next: (index + 1) % self.size,
                },
            );
        }
        self.next_desc = (head + parts.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// A complete request: header, data segments, status. Returns (head, status address).
    pub fn request(
        &mut self,
        request_type: u32,
        sector: u64,
        data: &[(u64, u32, bool)],
    ) -> (u16, u64) {
        let header = self.header(request_type, sector);
        let status = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut parts = vec![(header, 16, false)];
        parts.extend_from_slice(data);
        parts.push((status, 1, true));
        (self.add_chain(&parts), status)
    }

    pub fn header(&mut self, request_type: u32, sector: u64) -> u64 {
        let header = self.alloc(16);
        self.mem
            .write_obj(request_type, GuestAddress(header))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(header + 8))
            .unwrap();
        header
    }

    pub fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i`: (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Sets `used_event` (EVENT_IDX): interrupt when used idx passes this.
    pub fn set_used_event(&self, value: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(value, GuestAddress(at)).unwrap();
    }

    pub fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

/// Drives `queue` until the used ring holds `count` entries.
pub fn run_until(queue: &mut BlockQueue<Mem>, driver: &Driver, count: u16) {
    queue.process_queue().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while driver.used_idx() < count {
        assert!(Instant::now() < deadline, "requests did not complete");
        std::thread::sleep(Duration::from_millis(1));
        let _ = queue.disk().eventfd().read();
        queue.handle_completions().unwrap();
    }
}

/// Waits for `cond` for up to 10 s.
pub fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads a 32-bit virtio-mmio register, as a driver does.
pub fn r32(mmio: &vmkit_virtio_blk::MmioTransport<Mem>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    mmio.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// Writes a 32-bit virtio-mmio register, as a driver does.
pub fn w32(mmio: &vmkit_virtio_blk::MmioTransport<Mem>, offset: u64, value: u32) {
    mmio.write(offset, &value.to_le_bytes());
}

/// ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK; whether the device kept FEATURES_OK.
pub fn negotiate(mmio: &vmkit_virtio_blk::MmioTransport<Mem>, features: u64) -> bool {
    use vmkit_virtio_blk::device::status;
    use vmkit_virtio_blk::transport::mmio::reg;
    w32(mmio, reg::STATUS, status::ACKNOWLEDGE);
    w32(mmio, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    for page in 0..2 {
        w32(mmio, reg::DRIVER_FEATURES_SEL, page);
        w32(mmio, reg::DRIVER_FEATURES, (features >> (32 * page)) as u32);
    }
    w32(
        mmio,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    r32(mmio, reg::STATUS) & status::FEATURES_OK != 0
}
