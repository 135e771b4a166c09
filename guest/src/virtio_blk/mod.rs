//! A polling virtio-blk driver that checks every virtio-blk device: those `BootInfo` lists
//! on virtio-mmio (version 2), then the virtio-pci functions on PCI bus 0 when `BootInfo`
//! lists a PCI host bridge. It negotiates features, sets up every queue (up to [`MAX_QUEUES`]),
//! writes, flushes and reads back a pattern, asks for the ID, and checks discard,
//! write-zeroes and read-only behaviour where the device offers them. README.md lists the
//! output lines and the disk layout the host can verify afterwards.
//!
//! No interrupts: requests are published, the queue is notified (through `QueueNotify` or the
//! PCI notification region, which the VMM backs with ioeventfds) and the used ring is polled
//! with a TSC timeout.

mod bench;
mod crash;
mod mmio;
mod pci;
mod transport;
mod virtqueue;

pub use bench::run as iobench;
pub use crash::run as crashload;

use core::ptr;

use vmkit_guest_abi::{BootInfo, DeviceKind, Transport};

use crate::args::Escaped;
use crate::exit::{exit, status};
use crate::{cpu, println};
use transport::VirtioTransport;
use virtqueue::{Seg, Virtqueue};

/// Queues the driver uses at most (more may be offered; they stay disabled).
pub const MAX_QUEUES: usize = 8;
/// Sectors in the pattern region (sectors `0..64`), and in each of the discard
/// (`64..128`) and write-zeroes (`128..192`) regions.
pub const REGION_SECTORS: u64 = 64;
/// How long one batch of requests may take.
const TIMEOUT_SECONDS: u64 = 10;
const SECTOR: u64 = 512;
/// Bytes of the GET_ID answer.
const ID_BYTES: usize = 20;

/// Request slots: 16-byte header, status byte at 16, discard/write-zeroes segment at 32.
const SLOT_BYTES: u64 = 64;
/// Requests in one batch at most (one page of slots).
const MAX_BATCH: usize = 64;
/// Data segments per request at most (the device's `seg_max` may lower it).
const MAX_SEGS: usize = 16;

mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const CONFIG_WCE: u64 = 1 << 11;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    pub const VERSION_1: u64 = 1 << 32;
    /// Everything the driver accepts when offered.
    pub const WANTED: u64 = VERSION_1
        | SIZE_MAX
        | SEG_MAX
        | RO
        | BLK_SIZE
        | FLUSH
        | CONFIG_WCE
        | MQ
        | DISCARD
        | WRITE_ZEROES;
}

mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
/// What a status byte holds until the device writes it.
const S_UNWRITTEN: u8 = 0xff;

/// Configuration-space offsets.
mod config {
    pub const CAPACITY: u64 = 0;
    pub const SIZE_MAX: u64 = 8;
    pub const SEG_MAX: u64 = 12;
    pub const BLK_SIZE: u64 = 20;
    /// `writeback` (byte 32) and `num_queues` (bytes 34-35) in one word.
    pub const WRITEBACK_NUM_QUEUES: u64 = 32;
    pub const MAX_DISCARD_SECTORS: u64 = 36;
    pub const MAX_DISCARD_SEG: u64 = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: u64 = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: u64 = 48;
    pub const MAX_WRITE_ZEROES_SEG: u64 = 52;
}

/// The byte the pattern check writes at byte `offset` of disk `disk` (the index among the
/// virtio-blk devices). The host's tests compute the same function.
pub fn pattern(disk: u32, offset: u64) -> u8 {
    ((offset % 251) as u8) ^ ((offset >> 9) as u8).wrapping_mul(3) ^ (disk as u8).wrapping_mul(0x41)
}

/// Prints `error: virtio-blk N: ...` and ends the VM with `status`.
macro_rules! fail {
    ($status:expr, $disk:expr, $($arg:tt)*) => {{
        println!("error: virtio-blk {}: {}", $disk, format_args!($($arg)*));
        exit($status)
    }};
}

/// Page-granular memory from the top of the free range down, so the bottom (where `spin`
/// keeps its counters) stays untouched.
struct Arena {
    low: u64,
    high: u64,
}

impl Arena {
    /// The free memory above the `spin` counters.
    fn new(info: &BootInfo) -> Arena {
        let counters = (u64::from(info.cpu_count) * crate::workloads::SPIN_COUNTER_STRIDE)
            .div_ceil(4096)
            * 4096;
        Arena {
            low: info.free_memory_start.saturating_add(counters),
            high: info.free_memory_end,
        }
    }

    fn alloc(&mut self, disk: u32, bytes: u64) -> u64 {
        let bytes = bytes.div_ceil(4096) * 4096;
        match self.high.checked_sub(bytes) {
            Some(start) if start >= self.low => {
                self.high = start;
                // SAFETY: [start, start + bytes) is free RAM the program owns (BootInfo),
                // handed out once by this arena.
                unsafe {
                    ptr::with_exposed_provenance_mut::<u8>(start as usize)
                        .write_bytes(0, bytes as usize)
                };
                start
            }
            _ => fail!(
                status::DISK_SETUP,
                disk,
                "out of free memory for queues and buffers ({} bytes left)",
                self.high.saturating_sub(self.low)
            ),
        }
    }
}

/// Disks the driver handles at most.
pub const MAX_DISKS: usize = 32;

/// The virtio-blk devices, in disk order: the virtio-mmio ones `BootInfo` lists, then the
/// virtio-pci functions of bus 0 if `BootInfo` lists a PCI host bridge. Returns the table
/// and how many entries it holds; a device that cannot be used ends the VM.
fn find_disks(info: &BootInfo) -> ([Option<VirtioTransport>; MAX_DISKS], usize) {
    let mut disks = [None; MAX_DISKS];
    let mut count = 0;
    let mut add = |transport: VirtioTransport| {
        if let Some(slot) = disks.get_mut(count) {
            *slot = Some(transport);
            count += 1;
        }
    };
    let mut pci_bus = false;
    for device in info.devices() {
        if device.kind == DeviceKind::PciHostBridge as u32 {
            pci_bus = true;
        }
        if device.kind != DeviceKind::VirtioBlock as u32 {
            continue;
        }
        if device.transport != Transport::VirtioMmio as u32 {
            fail!(
                status::DISK_SETUP,
                count,
                "transport {} is not supported by this guest",
                device.transport
            );
        }
        match VirtioTransport::mmio(device) {
            Ok(transport) => add(transport),
            Err(reason) => fail!(
                status::DISK_SETUP,
                count,
                "at {:#x}: {reason}",
                device.address
            ),
        }
    }
    if pci_bus {
        for function in pci::block_functions() {
            match VirtioTransport::pci(function) {
                Ok(transport) => add(transport),
                Err(reason) => fail!(
                    status::DISK_SETUP,
                    count,
                    "PCI 00:{:02x}.0: {reason}",
                    function.device
                ),
            }
        }
    }
    (disks, count)
}

/// Checks every virtio-blk device ([`find_disks`]); returns how many were checked. Any
/// failure ends the VM with [`status::DISK_SETUP`] or [`status::DISK_CHECK`].
pub fn check_all(info: &BootInfo, args: &[u8]) -> u32 {
    let mut arena = Arena::new(info);
    let (disks, count) = find_disks(info);
    for (disk, transport) in disks.iter().take(count).enumerate() {
        let Some(transport) = *transport else {
            continue;
        };
        let disk = disk as u32;
        let serial = crate::args::disk_serial(args, disk).unwrap_or(b"");
        let mut blk = Disk::probe(disk, transport, &mut arena);
        blk.check(serial);
        blk.reset();
    }
    count as u32
}

/// One request of a batch.
#[derive(Clone, Copy)]
struct Req {
    kind: u32,
    /// First sector (also of a discard / write-zeroes range).
    sector: u64,
    /// Data buffer (unused for flush, discard and write-zeroes).
    buf: u64,
    /// Data bytes (sectors * 512 for discard and write-zeroes).
    bytes: u32,
    /// Data segments to split the buffer into (clamped to the device's `seg_max`).
    segs: usize,
    /// Queue index, taken modulo the queues in use.
    queue: usize,
}

impl Req {
    fn io(kind: u32, sector: u64, buf: u64, sectors: u64, segs: usize, queue: usize) -> Req {
        Req {
            kind,
            sector,
            buf,
            bytes: (sectors * SECTOR) as u32,
            segs,
            queue,
        }
    }

    fn range(kind: u32, sector: u64, sectors: u64, queue: usize) -> Req {
        Req::io(kind, sector, 0, sectors, 1, queue)
    }
}

/// What the device answered.
#[derive(Clone, Copy, Default)]
struct Outcome {
    status: u8,
    len: u32,
}

struct Disk {
    index: u32,
    transport: VirtioTransport,
    features: u64,
    capacity: u64,
    seg_max: usize,
    size_max: u32,
    queues: [Option<Virtqueue>; MAX_QUEUES],
    queue_count: usize,
    slots: u64,
    wbuf: u64,
    rbuf: u64,
}

impl Disk {
    fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// Initializes the device (virtio 1.2, section 3.1.1) and prints what it is.
    fn probe(index: u32, mut transport: VirtioTransport, arena: &mut Arena) -> Disk {
        let setup = status::DISK_SETUP;
        use mmio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK, NEEDS_RESET};
        transport.set_status(0);
        if transport.status() != 0 {
            fail!(setup, index, "the device did not reset");
        }
        transport.set_status(ACKNOWLEDGE);
        transport.set_status(ACKNOWLEDGE | DRIVER);
        let offered = transport.device_features();
        if offered & feature::VERSION_1 == 0 {
            fail!(
                setup,
                index,
                "VERSION_1 not offered (features {offered:#x})"
            );
        }
        let features = offered & feature::WANTED;
        transport.set_driver_features(features);
        let features_ok = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        transport.set_status(features_ok);
        if transport.status() & FEATURES_OK == 0 {
            fail!(
                setup,
                index,
                "FEATURES_OK did not stick (accepted {features:#x})"
            );
        }

        let capacity = transport.config64(config::CAPACITY);
        let blk_size = if features & feature::BLK_SIZE != 0 {
            transport.config32(config::BLK_SIZE)
        } else {
            512
        };
        let seg_max = if features & feature::SEG_MAX != 0 {
            transport.config32(config::SEG_MAX) as usize
        } else {
            1
        };
        let size_max = if features & feature::SIZE_MAX != 0 {
            transport.config32(config::SIZE_MAX)
        } else {
            u32::MAX
        };
        let word = transport.config32(config::WRITEBACK_NUM_QUEUES);
        let writeback = word & 0xff != 0;
        let offered_queues = if features & feature::MQ != 0 {
            ((word >> 16) as usize).max(1)
        } else {
            1
        };
        let queue_count = offered_queues.min(MAX_QUEUES);
        if seg_max == 0 || size_max < 4096 {
            fail!(
                setup,
                index,
                "unusable limits: seg_max {seg_max}, size_max {size_max}"
            );
        }

        let mut queues: [Option<Virtqueue>; MAX_QUEUES] = Default::default();
        for (q, slot) in queues.iter_mut().enumerate().take(queue_count) {
            let (ready, max) = transport.queue_state(q as u16);
            if ready {
                fail!(setup, index, "queue {q} is ready before setup");
            }
            if max == 0 {
                fail!(setup, index, "queue {q} is not available (QueueNumMax 0)");
            }
            let limit = max.min(u32::from(virtqueue::MAX_SIZE));
            // The largest power of two within the limit.
            let size = 1u16 << (31 - limit.leading_zeros());
            let memory = arena.alloc(index, virtqueue::MEMORY_BYTES);
            let queue = Virtqueue::new(q as u16, size, memory);
            if !queue.configure(&mut transport) {
                fail!(setup, index, "queue {q} (size {size}) was not accepted");
            }
            *slot = Some(queue);
        }
        let slots = arena.alloc(index, SLOT_BYTES * MAX_BATCH as u64);
        let wbuf = arena.alloc(index, REGION_SECTORS * SECTOR);
        let rbuf = arena.alloc(index, REGION_SECTORS * SECTOR);

        transport.set_status(features_ok | DRIVER_OK);
        let device_status = transport.status();
        if device_status & DRIVER_OK == 0 || device_status & (NEEDS_RESET | FAILED) != 0 {
            fail!(
                setup,
                index,
                "device status {device_status:#x} after DRIVER_OK"
            );
        }
        println!(
            "virtio-blk {index}: {capacity} sectors ({} KiB), block {blk_size} bytes, {queue_count} of {offered_queues} queues, {}, write cache {}, features {features:#x}, {}",
            capacity / 2,
            if features & feature::RO != 0 { "read-only" } else { "read-write" },
            if writeback { "on" } else { "off" },
            transport.name(),
        );
        Disk {
            index,
            transport,
            features,
            capacity,
            seg_max: seg_max.min(MAX_SEGS),
            size_max,
            queues,
            queue_count,
            slots,
            wbuf,
            rbuf,
        }
    }

    /// Resets the device, which stops its I/O and makes it forget the queues.
    fn reset(&self) {
        self.transport.set_status(0);
    }

    fn check(&mut self, serial: &[u8]) {
        self.check_id(serial);
        let read_only = self.has(feature::RO);
        let needed = if read_only {
            REGION_SECTORS
        } else {
            3 * REGION_SECTORS
        };
        if self.capacity < needed {
            fail!(
                status::DISK_CHECK,
                self.index,
                "the disk has {} sectors; the checks need {needed}",
                self.capacity
            );
        }
        if read_only {
            self.check_read_only();
            return;
        }
        self.check_pattern();
        if self.has(feature::DISCARD) {
            self.check_zeroing(req_type::DISCARD, "discard");
        }
        if self.has(feature::WRITE_ZEROES) {
            self.check_zeroing(req_type::WRITE_ZEROES, "write-zeroes");
        }
    }

    /// GET_ID through every queue, compared with the expected ID (NUL-padded to 20 bytes).
    fn check_id(&mut self, serial: &[u8]) {
        let mut reqs = [Req::range(req_type::GET_ID, 0, 0, 0); MAX_QUEUES];
        for (q, req) in reqs.iter_mut().enumerate().take(self.queue_count) {
            let buf = self.rbuf + 32 * q as u64;
            fill(buf, ID_BYTES, |_| 0xee);
            *req = Req {
                kind: req_type::GET_ID,
                sector: 0,
                buf,
                bytes: ID_BYTES as u32,
                segs: 1,
                queue: q,
            };
        }
        let outcomes = self.run(&reqs[..self.queue_count], "GET_ID");
        for (q, outcome) in outcomes.iter().enumerate().take(self.queue_count) {
            self.expect(outcome, S_OK, ID_BYTES as u32 + 1, "GET_ID", q);
            let mut id = [0u8; ID_BYTES];
            let buf = self.rbuf + 32 * q as u64;
            for (i, byte) in id.iter_mut().enumerate() {
                *byte = read_byte(buf + i as u64);
            }
            let len = id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
            let padded_with_zeroes = id[len..].iter().all(|&b| b == 0);
            if &id[..len] != serial || !padded_with_zeroes {
                fail!(
                    status::DISK_CHECK,
                    self.index,
                    "GET_ID on queue {q} gave \"{}\", expected \"{}\"",
                    Escaped(&id),
                    Escaped(serial)
                );
            }
        }
        println!(
            "virtio-blk {}: GET_ID \"{}\" OK (on {} queue{})",
            self.index,
            Escaped(serial),
            self.queue_count,
            plural(self.queue_count)
        );
    }

    /// Writes the pattern to sectors 0..64 in 8 requests of 1 to 4 segments spread over the
    /// queues, flushes every queue, reads it back in 4 requests of up to 16 segments and
    /// compares.
    fn check_pattern(&mut self) {
        let disk = self.index;
        fill_pattern(self.wbuf, disk, 0, REGION_SECTORS);
        let mut writes = [Req::range(req_type::OUT, 0, 0, 0); 8];
        for (i, req) in writes.iter_mut().enumerate() {
            let sector = 8 * i as u64;
            *req = Req::io(
                req_type::OUT,
                sector,
                self.wbuf + sector * SECTOR,
                8,
                i % 4 + 1,
                i,
            );
        }
        for (i, outcome) in self
            .run(&writes, "pattern write")
            .iter()
            .enumerate()
            .take(8)
        {
            self.expect(outcome, S_OK, 1, "pattern write", i);
        }
        let flushed = if self.has(feature::FLUSH) {
            let mut flushes = [Req::range(req_type::FLUSH, 0, 0, 0); MAX_QUEUES];
            for (q, req) in flushes.iter_mut().enumerate() {
                req.queue = q;
            }
            let outcomes = self.run(&flushes[..self.queue_count], "flush");
            for (q, outcome) in outcomes.iter().enumerate().take(self.queue_count) {
                self.expect(outcome, S_OK, 1, "flush", q);
            }
            "flush/"
        } else {
            ""
        };
        fill(self.rbuf, (REGION_SECTORS * SECTOR) as usize, |_| 0xcc);
        let mut reads = [Req::range(req_type::IN, 0, 0, 0); 4];
        for (i, req) in reads.iter_mut().enumerate() {
            let sector = 16 * i as u64;
            *req = Req::io(
                req_type::IN,
                sector,
                self.rbuf + sector * SECTOR,
                16,
                16,
                i + 1,
            );
        }
        for (i, outcome) in self.run(&reads, "pattern read").iter().enumerate().take(4) {
            self.expect(outcome, S_OK, 16 * SECTOR as u32 + 1, "pattern read", i);
        }
        self.verify(
            0,
            REGION_SECTORS,
            |offset| pattern(disk, offset),
            "pattern read-back",
        );
        println!(
            "virtio-blk {disk}: pattern write/{flushed}read OK ({REGION_SECTORS} sectors, 8 writes, 4 reads, {} queue{})",
            self.queue_count,
            plural(self.queue_count)
        );
    }

    /// Writes the pattern to the region of `kind` (discard: sectors 64..128, write-zeroes:
    /// 128..192), zeroes it with one `kind` request, and checks it reads back as zeroes.
    fn check_zeroing(&mut self, kind: u32, name: &str) {
        let disk = self.index;
        let (start, max_sectors, max_seg) = if kind == req_type::DISCARD {
            (
                REGION_SECTORS,
                self.transport.config32(config::MAX_DISCARD_SECTORS),
                self.transport.config32(config::MAX_DISCARD_SEG),
            )
        } else {
            (
                2 * REGION_SECTORS,
                self.transport.config32(config::MAX_WRITE_ZEROES_SECTORS),
                self.transport.config32(config::MAX_WRITE_ZEROES_SEG),
            )
        };
        let alignment = if kind == req_type::DISCARD {
            u64::from(self.transport.config32(config::DISCARD_SECTOR_ALIGNMENT)).max(1)
        } else {
            1
        };
        if u64::from(max_sectors) < REGION_SECTORS
            || max_seg == 0
            || start % alignment != 0
            || REGION_SECTORS % alignment != 0
        {
            println!(
                "virtio-blk {disk}: {name} skipped (max sectors {max_sectors}, max segments {max_seg}, alignment {alignment})"
            );
            return;
        }
        fill_pattern(self.wbuf, disk, start, REGION_SECTORS);
        let half = REGION_SECTORS / 2;
        let writes = [
            Req::io(req_type::OUT, start, self.wbuf, half, 2, 0),
            Req::io(
                req_type::OUT,
                start + half,
                self.wbuf + half * SECTOR,
                half,
                2,
                1,
            ),
        ];
        for (i, outcome) in self.run(&writes, name).iter().enumerate().take(2) {
            self.expect(outcome, S_OK, 1, "write before zeroing", i);
        }
        let outcome = self.run(&[Req::range(kind, start, REGION_SECTORS, 0)], name)[0];
        self.expect(&outcome, S_OK, 1, name, 0);
        fill(self.rbuf, (REGION_SECTORS * SECTOR) as usize, |_| 0xcc);
        let read = Req::io(req_type::IN, start, self.rbuf, REGION_SECTORS, 8, 1);
        let outcome = self.run(&[read], name)[0];
        self.expect(
            &outcome,
            S_OK,
            (REGION_SECTORS * SECTOR) as u32 + 1,
            name,
            0,
        );
        self.verify(start, REGION_SECTORS, |_| 0, name);
        println!(
            "virtio-blk {disk}: {name} OK (sectors {start}..{} read back as zeroes)",
            start + REGION_SECTORS
        );
    }

    /// On a read-only disk: a write (and a write-zeroes, if offered) must fail with IOERR and
    /// leave sectors 0..64 as they were.
    fn check_read_only(&mut self) {
        let disk = self.index;
        let bytes = (REGION_SECTORS * SECTOR) as usize;
        let read = Req::io(req_type::IN, 0, self.rbuf, REGION_SECTORS, 4, 0);
        let outcome = self.run(&[read], "read-only read")[0];
        self.expect(&outcome, S_OK, bytes as u32 + 1, "read", 0);
        // wbuf keeps what the disk held; rbuf gets data that differs from it everywhere.
        let (wbuf, rbuf) = (self.wbuf, self.rbuf);
        fill(wbuf, bytes, |i| read_byte(rbuf + i as u64));
        fill(rbuf, bytes, |i| !read_byte(wbuf + i as u64));
        let write = Req::io(req_type::OUT, 0, self.rbuf, 8, 2, 0);
        let outcome = self.run(&[write], "read-only write")[0];
        self.expect(&outcome, S_IOERR, 1, "write on a read-only disk", 0);
        let mut refused = "write";
        if self.has(feature::WRITE_ZEROES) {
            let zeroes = Req::range(req_type::WRITE_ZEROES, 0, 8, 0);
            let outcome = self.run(&[zeroes], "read-only write-zeroes")[0];
            self.expect(&outcome, S_IOERR, 1, "write-zeroes on a read-only disk", 0);
            refused = "write and write-zeroes";
        }
        fill(self.rbuf, bytes, |_| 0xcc);
        let read = Req::io(req_type::IN, 0, self.rbuf, REGION_SECTORS, 4, 0);
        let outcome = self.run(&[read], "read-only read-back")[0];
        self.expect(&outcome, S_OK, bytes as u32 + 1, "read-back", 0);
        // The region starts at sector 0: disk offsets are buffer offsets.
        self.verify(
            0,
            REGION_SECTORS,
            |offset| read_byte(wbuf + offset),
            "read-only data",
        );
        println!(
            "virtio-blk {disk}: read-only: {refused} refused with IOERR, data unchanged ({REGION_SECTORS} sectors)"
        );
    }

    /// Compares `sectors` sectors of the read buffer, which holds the disk's sectors from
    /// `first`, with `expected(disk byte offset)`.
    fn verify(&self, first: u64, sectors: u64, expected: impl Fn(u64) -> u8, what: &str) {
        for i in 0..sectors * SECTOR {
            let disk_offset = first * SECTOR + i;
            let want = expected(disk_offset);
            let got = read_byte(self.rbuf + i);
            if got != want {
                fail!(
                    status::DISK_CHECK,
                    self.index,
                    "{what}: byte {disk_offset} (sector {}) is {got:#04x}, expected {want:#04x}",
                    disk_offset / SECTOR
                );
            }
        }
    }

    fn expect(&self, outcome: &Outcome, want_status: u8, want_len: u32, what: &str, i: usize) {
        if outcome.status != want_status || outcome.len != want_len {
            fail!(
                status::DISK_CHECK,
                self.index,
                "{what} (request {i}): status {} and used length {}, expected status {want_status} and length {want_len}",
                outcome.status,
                outcome.len
            );
        }
    }

    /// Submits `reqs` (on their queues), notifies each queue once, and polls until every one
    /// is back. Times out (and ends the VM) after [`TIMEOUT_SECONDS`].
    fn run(&mut self, reqs: &[Req], what: &str) -> [Outcome; MAX_BATCH] {
        let index = self.index;
        let check = status::DISK_CHECK;
        if reqs.len() > MAX_BATCH {
            fail!(
                check,
                index,
                "{what}: batch of {} requests is too big",
                reqs.len()
            );
        }
        let mut kicked = [false; MAX_QUEUES];
        for (i, req) in reqs.iter().enumerate() {
            let slot = self.slots + SLOT_BYTES * i as u64;
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&req.kind.to_le_bytes());
            header[8..].copy_from_slice(&req.sector.to_le_bytes());
            write_bytes(slot, &header);
            write_bytes(slot + 16, &[S_UNWRITTEN]);
            let mut segs = [Seg {
                addr: 0,
                len: 0,
                device_writes: false,
            }; MAX_SEGS + 2];
            segs[0] = Seg {
                addr: slot,
                len: 16,
                device_writes: false,
            };
            let mut count = 1;
            match req.kind {
                req_type::FLUSH => {}
                req_type::DISCARD | req_type::WRITE_ZEROES => {
                    let mut segment = [0u8; 16];
                    segment[..8].copy_from_slice(&req.sector.to_le_bytes());
                    segment[8..12].copy_from_slice(&(req.bytes / SECTOR as u32).to_le_bytes());
                    write_bytes(slot + 32, &segment);
                    segs[1] = Seg {
                        addr: slot + 32,
                        len: 16,
                        device_writes: false,
                    };
                    count = 2;
                }
                _ => {
                    let device_writes = matches!(req.kind, req_type::IN | req_type::GET_ID);
                    // Equal parts in whole sectors (GET_ID's 20 bytes are one part); the last
                    // takes the rest.
                    let parts = req.segs.clamp(1, self.seg_max) as u32;
                    let unit = if req.kind == req_type::GET_ID {
                        1
                    } else {
                        SECTOR as u32
                    };
                    let part = (req.bytes / unit / parts).max(1) * unit;
                    let mut offset = 0;
                    while offset < req.bytes {
                        let len = if count == parts as usize {
                            req.bytes - offset
                        } else {
                            part.min(req.bytes - offset)
                        };
                        if len > self.size_max {
                            fail!(
                                check,
                                index,
                                "{what}: a segment of {len} bytes exceeds size_max"
                            );
                        }
                        segs[count] = Seg {
                            addr: req.buf + u64::from(offset),
                            len,
                            device_writes,
                        };
                        count += 1;
                        offset += len;
                    }
                }
            }
            segs[count] = Seg {
                addr: slot + 16,
                len: 1,
                device_writes: true,
            };
            count += 1;
            let q = req.queue % self.queue_count;
            let Some(queue) = self.queues[q].as_mut() else {
                fail!(check, index, "{what}: queue {q} is not set up");
            };
            if !queue.add(&segs[..count], i as u16) {
                fail!(
                    check,
                    index,
                    "{what}: queue {q} has no room for request {i}"
                );
            }
            kicked[q] = true;
        }
        for (q, queue) in self.queues.iter_mut().enumerate() {
            if let (true, Some(queue)) = (kicked[q], queue.as_mut()) {
                queue.kick(&self.transport);
            }
        }

        let mut outcomes = [Outcome::default(); MAX_BATCH];
        let mut done = 0;
        let mut bad = None;
        let finished = cpu::wait_until(cpu::ticks_for_seconds(TIMEOUT_SECONDS), || {
            for (q, queue) in self.queues.iter_mut().enumerate() {
                let Some(queue) = queue.as_mut() else {
                    continue;
                };
                while let Some(used) = queue.pop() {
                    match used {
                        Ok(used) if usize::from(used.token) < reqs.len() => {
                            outcomes[usize::from(used.token)].len = used.len;
                            done += 1;
                        }
                        Ok(used) => bad = Some((q, u32::from(used.token))),
                        Err(error) => bad = Some((q, error.id)),
                    }
                }
            }
            done == reqs.len() || bad.is_some()
        });
        if let Some((q, id)) = bad {
            fail!(
                check,
                index,
                "{what}: queue {q} returned descriptor {id}, which was not in flight"
            );
        }
        if !finished {
            let in_flight: u16 = self.queues.iter().flatten().map(Virtqueue::in_flight).sum();
            fail!(
                check,
                index,
                "{what}: {in_flight} of {} requests not completed within {TIMEOUT_SECONDS} s (device status {:#x})",
                reqs.len(),
                self.transport.status()
            );
        }
        for queue in self.queues.iter_mut().flatten() {
            queue.recycle();
        }
        for (i, outcome) in outcomes.iter_mut().enumerate().take(reqs.len()) {
            outcome.status = read_byte(self.slots + SLOT_BYTES * i as u64 + 16);
        }
        outcomes
    }
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

/// Writes `len` bytes at `address` with `byte(i)` (volatile: the device reads them).
fn fill(address: u64, len: usize, byte: impl Fn(usize) -> u8) {
    for i in 0..len {
        let p = ptr::with_exposed_provenance_mut::<u8>(address as usize + i);
        // SAFETY: the driver's buffers lie in free RAM handed out by the arena.
        unsafe { p.write_volatile(byte(i)) };
    }
}

/// Fills `sectors` sectors at `buf` with the pattern of disk sectors from `first`.
fn fill_pattern(buf: u64, disk: u32, first: u64, sectors: u64) {
    fill(buf, (sectors * SECTOR) as usize, |i| {
        pattern(disk, first * SECTOR + i as u64)
    });
}

fn write_bytes(address: u64, bytes: &[u8]) {
    fill(address, bytes.len(), |i| bytes[i]);
}

fn read_byte(address: u64) -> u8 {
    // SAFETY: the driver's buffers lie in free RAM handed out by the arena; volatile because
    // the device writes them.
    unsafe { ptr::with_exposed_provenance::<u8>(address as usize).read_volatile() }
}
