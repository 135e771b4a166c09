//! `iobench=randread|randwrite`: random-offset I/O at a fixed queue depth, timed with the TSC.
//!
//! One queue (queue 0), `depth` slots, each with a fixed three-descriptor chain (header, one
//! data buffer of `bs` bytes, status byte) written once. Every completion found in the used
//! ring is checked and its slot resubmitted at a new random `bs`-aligned offset (once at least
//! `batch` completions are waiting, or all that remain in flight); each refill
//! batch is published with one write of the available index and one notification, skipped
//! when the device has set `VIRTQ_USED_F_NO_NOTIFY` (it is still working through the ring).
//! The disk is the only thing the benchmark touches; `randread` never writes it.

use core::ptr;

use vmkit_guest_abi::BootInfo;

use super::virtqueue::Seg;
use super::{feature, find_disks, read_byte, req_type, Arena, Disk, SECTOR, S_OK, S_UNWRITTEN};
use crate::args::{BenchLimit, BenchOp, IoBench};
use crate::exit::{exit, status};
use crate::{cpu, println};

/// How long the benchmark waits for any completion before it gives up.
const STALL_SECONDS: u64 = 10;
/// Bytes per slot of the header page: the 16-byte header, then the status byte.
const HEADER_SLOT: u64 = 32;
/// Descriptors per request.
const CHAIN: u16 = 3;

/// Prints `error: iobench: ...` and ends the VM with `status`.
macro_rules! fail {
    ($status:expr, $($arg:tt)*) => {{
        println!("error: iobench: {}", format_args!($($arg)*));
        exit($status)
    }};
}

/// xorshift64 (Marsaglia): a fixed seed, so every run visits the same offsets.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Runs the benchmark `bench` describes on its disk and prints the result; any failure ends
/// the VM with [`status::IOBENCH_SETUP`], [`status::IOBENCH_IO`] or (while probing)
/// [`status::DISK_SETUP`]. Other disks are left alone.
pub fn run(info: &BootInfo, bench: &IoBench) {
    let setup = status::IOBENCH_SETUP;
    let (disks, count) = find_disks(info);
    let Some(transport) = disks
        .get(bench.disk as usize)
        .filter(|_| (bench.disk as usize) < count)
        .copied()
        .flatten()
    else {
        fail!(setup, "no virtio-blk disk {}", bench.disk);
    };
    let Some(tsc_hz) = cpu::calibrate_tsc_hz() else {
        fail!(setup, "cannot measure the TSC frequency (no PIT channel 2)");
    };
    let mut arena = Arena::new(info);
    let mut blk = Disk::probe(bench.disk, transport, &mut arena);
    let disk = bench.disk;
    let write = bench.op == BenchOp::RandWrite;
    if write && blk.has(feature::RO) {
        fail!(
            setup,
            "randwrite needs a writable disk; disk {disk} is read-only"
        );
    }
    let bs = u64::from(bench.bs);
    let blocks = blk.capacity * SECTOR / bs;
    if blocks == 0 {
        fail!(
            setup,
            "disk {disk} has {} sectors, less than one {bs}-byte block",
            blk.capacity
        );
    }
    if bench.bs > blk.size_max {
        fail!(
            setup,
            "{bs}-byte requests exceed the device's size_max {}",
            blk.size_max
        );
    }
    let depth = bench.depth;
    let transport = blk.transport;
    let Some(queue) = blk.queues[0].as_mut() else {
        fail!(setup, "disk {disk}: queue 0 is not set up");
    };
    let queue_size = queue.size();
    if u32::from(depth) * u32::from(CHAIN) > u32::from(queue_size) {
        fail!(
            setup,
            "depth {depth} needs {} descriptors; queue 0 has {queue_size}",
            depth * CHAIN
        );
    }

    // Fixed chains: slot k is descriptors 3k..3k+3 and owns header k and data buffer k.
    let headers = arena.alloc(disk, HEADER_SLOT * u64::from(depth));
    let data = arena.alloc(disk, bs * u64::from(depth));
    let kind = if write { req_type::OUT } else { req_type::IN };
    for slot in 0..u64::from(depth) {
        let header = headers + HEADER_SLOT * slot;
        // SAFETY: the header lies in memory just taken from the arena, not yet given to the
        // device.
        unsafe { write_volatile::<u32>(header, kind) };
        let buf = data + bs * slot;
        if write {
            super::fill(buf, bs as usize, |i| (i as u8) ^ 0xa5 ^ (slot as u8));
        }
        queue.write_chain(
            CHAIN * slot as u16,
            &[
                Seg {
                    addr: header,
                    len: 16,
                    device_writes: false,
                },
                Seg {
                    addr: buf,
                    len: bench.bs,
                    device_writes: !write,
                },
                Seg {
                    addr: header + 16,
                    len: 1,
                    device_writes: true,
                },
            ],
        );
    }
    let (limit_count, limit_text) = match bench.limit {
        BenchLimit::Count(n) => (n, Count(n, "requests")),
        BenchLimit::Seconds(s) => (u64::MAX, Count(s, "s")),
    };
    let limit_ticks = match bench.limit {
        BenchLimit::Seconds(s) => s.saturating_mul(tsc_hz),
        BenchLimit::Count(_) => u64::MAX,
    };
    let op = bench.op.name();
    println!(
        "iobench: disk {disk}, {op}, {bs}-byte requests at random {bs}-byte-aligned offsets over {blocks} blocks, depth {depth} on queue 0 (size {queue_size}), refill batches of at least {}, for {limit_text}; TSC {} MHz",
        bench.batch,
        tsc_hz / 1_000_000
    );

    let sectors_per_block = bs / SECTOR;
    let expected_len = if write { 1 } else { bench.bs + 1 };
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut submit = |queue: &mut super::virtqueue::Virtqueue, slot: u16| {
        let header = headers + HEADER_SLOT * u64::from(slot);
        let sector = rng.next() % blocks * sectors_per_block;
        // SAFETY: the slot's header and status byte; the device is done with the slot (its
        // chain came back, or was never submitted).
        unsafe {
            write_volatile::<u64>(header + 8, sector);
            write_volatile::<u8>(header + 16, S_UNWRITTEN);
        }
        queue.push(CHAIN * slot, slot);
    };

    let stall_ticks = cpu::ticks_for_seconds(STALL_SECONDS);
    let (mut issued, mut completed) = (0u64, 0u64);
    let (mut batches, mut notified) = (0u64, 0u64);
    let start = cpu::rdtsc();
    for slot in 0..depth {
        if issued == limit_count {
            break;
        }
        submit(queue, slot);
        issued += 1;
    }
    queue.publish();
    batches += 1;
    if queue.wants_notification() {
        queue.notify(&transport);
        notified += 1;
    }
    let mut stopping = issued == limit_count;
    let mut last_progress = start;
    let end = loop {
        let mut refilled = 0u64;
        let mut popped = false;
        // Wait for a batch of completions (all that are in flight when fewer remain).
        let wanted = bench.batch.min(queue.in_flight()).max(1);
        if queue.used_ready() < wanted {
            let now = cpu::rdtsc();
            if queue.in_flight() == 0 {
                break now;
            }
            if now.wrapping_sub(last_progress) > stall_ticks {
                fail!(
                    status::IOBENCH_IO,
                    "{} requests in flight and fewer than {wanted} completed within {STALL_SECONDS} s",
                    queue.in_flight()
                );
            }
            if !stopping && now.wrapping_sub(start) >= limit_ticks {
                stopping = true;
            }
            continue;
        }
        while let Some(used) = queue.pop() {
            let used = match used {
                Ok(used) if used.token < depth => used,
                Ok(used) => fail!(
                    status::IOBENCH_IO,
                    "queue 0 returned descriptor {}, which was not in flight",
                    CHAIN * used.token
                ),
                Err(bad) => fail!(
                    status::IOBENCH_IO,
                    "queue 0 returned descriptor {}, which was not in flight",
                    bad.id
                ),
            };
            popped = true;
            let header = headers + HEADER_SLOT * u64::from(used.token);
            let request_status = read_byte(header + 16);
            if request_status != S_OK || used.len != expected_len {
                // SAFETY: the slot's header, which the device has finished with.
                let sector = unsafe { read_volatile::<u64>(header + 8) };
                fail!(
                    status::IOBENCH_IO,
                    "{op} of {bs} bytes at sector {sector} (request {}): status {request_status} and used length {}, expected status {S_OK} and length {expected_len}",
                    completed + 1,
                    used.len
                );
            }
            completed += 1;
            if !stopping {
                submit(queue, used.token);
                issued += 1;
                refilled += 1;
                stopping = issued == limit_count;
            }
        }
        let now = cpu::rdtsc();
        if refilled > 0 {
            queue.publish();
            batches += 1;
            if queue.wants_notification() {
                queue.notify(&transport);
                notified += 1;
            }
        }
        if popped {
            last_progress = now;
        } else if queue.in_flight() == 0 {
            break now;
        } else if now.wrapping_sub(last_progress) > stall_ticks {
            fail!(
                status::IOBENCH_IO,
                "{} requests in flight and none completed within {STALL_SECONDS} s",
                queue.in_flight()
            );
        }
        if !stopping && now.wrapping_sub(start) >= limit_ticks {
            stopping = true;
        }
    };
    let ticks = end.wrapping_sub(start).max(1);
    let millis = (u128::from(ticks) * 1000 / u128::from(tsc_hz)) as u64;
    let iops = (u128::from(completed) * u128::from(tsc_hz) / u128::from(ticks)) as u64;
    // Tenths of a request per batch.
    let per_batch = issued * 10 / batches.max(1);
    println!(
        "iobench: {} submission batches (average {}.{} requests), {notified} notifications, {} skipped (device busy)",
        batches,
        per_batch / 10,
        per_batch % 10,
        batches - notified
    );
    println!(
        "iobench: {op} depth {depth}: {completed} requests in {}.{:03} s = {iops} IOPS",
        millis / 1000,
        millis % 1000
    );
    blk.reset();
}

/// "N unit" for the description line.
struct Count(u64, &'static str);

impl core::fmt::Display for Count {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

/// # Safety
/// `address` is identity-mapped memory the driver owns, aligned for `T`.
unsafe fn write_volatile<T>(address: u64, value: T) {
    // SAFETY: the caller's guarantee.
    unsafe { ptr::with_exposed_provenance_mut::<T>(address as usize).write_volatile(value) };
}

/// # Safety
/// As for [`write_volatile`].
unsafe fn read_volatile<T>(address: u64) -> T {
    // SAFETY: the caller's guarantee.
    unsafe { ptr::with_exposed_provenance::<T>(address as usize).read_volatile() }
}
