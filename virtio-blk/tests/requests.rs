//! Every request type and the malformed-chain list, against a real file, through
//! `BlockQueue` driven directly (no threads).

mod common;

use std::sync::Arc;

use common::*;
use vm_memory::{Address, Bytes, GuestAddress};
use vmkit_virtio_blk::{BlockQueue, CountingInterrupt};

struct Setup {
    driver: Driver,
    queue: BlockQueue<Mem>,
    interrupt: Arc<CountingInterrupt>,
    path: std::path::PathBuf,
}

fn setup_with(size: usize, read_only: bool, event_idx: bool) -> Setup {
    let mem = memory();
    let path = image(size, 0x5a);
    let driver = Driver::new(mem.clone(), 64);
    let interrupt = Arc::new(CountingInterrupt::new());
    let queue = BlockQueue::new(
        0,
        driver.queue(event_idx),
        mem,
        open(&path, read_only),
        interrupt.clone(),
        b"vmkit-serial",
    );
    Setup {
        driver,
        queue,
        interrupt,
        path,
    }
}

fn setup() -> Setup {
    setup_with(1 << 20, false, false)
}

#[test]
fn write_then_read_reaches_the_file() {
    let mut s = setup();
    let data = s.driver.alloc(4096);
    s.driver.fill(data, 4096, 0xab);
    let (head, status) = s.driver.request(T_OUT, 8, &[(data, 4096, false)]);
    run_until(&mut s.queue, &s.driver, 1);
    assert_eq!(s.driver.status(status), S_OK);
    assert_eq!(s.driver.used_elem(0), (u32::from(head), 1));
    let file = std::fs::read(&s.path).unwrap();
    assert!(file[4096..8192].iter().all(|&b| b == 0xab));
    assert!(file[..4096].iter().all(|&b| b == 0x5a));

    let into = s.driver.alloc(8192);
    let (head, status) = s.driver.request(T_IN, 0, &[(into, 8192, true)]);
    run_until(&mut s.queue, &s.driver, 2);
    assert_eq!(s.driver.status(status), S_OK);
    assert_eq!(s.driver.used_elem(1), (u32::from(head), 8192 + 1));
    let read = s.driver.read(into, 8192);
    assert!(read[..4096].iter().all(|&b| b == 0x5a));
    assert!(read[4096..].iter().all(|&b| b == 0xab));
}

#[test]
fn multi_descriptor_data() {
    let mut s = setup();
    let a = s.driver.alloc(512);
    let b = s.driver.alloc(1024);
    let c = s.driver.alloc(512);
    s.driver.fill(a, 512, 1);
    s.driver.fill(b, 1024, 2);
    s.driver.fill(c, 512, 3);
    let (_, status) = s.driver.request(
        T_OUT,
        1,
        &[(a, 512, false), (b, 1024, false), (c, 512, false)],
    );
    run_until(&mut s.queue, &s.driver, 1);
    assert_eq!(s.driver.status(status), S_OK);
    let file = std::fs::read(&s.path).unwrap();
    assert!(file[512..1024].iter().all(|&x| x == 1));
    assert!(file[1024..2048].iter().all(|&x| x == 2));
    assert!(file[2048..2560].iter().all(|&x| x == 3));

    let x = s.driver.alloc(1024);
    let y = s.driver.alloc(1024);
    let (_, status) = s
        .driver
        .request(T_IN, 1, &[(x, 1024, true), (y, 1024, true)]);
    run_until(&mut s.queue, &s.driver, 2);
    assert_eq!(s.driver.status(status), S_OK);
    assert_eq!(s.driver.used_elem(1).1, 2049);
    assert_eq!(s.driver.read(x, 1024)[..512], [1; 512]);
    assert_eq!(s.driver.read(y, 1024)[512..], [3; 512]);
}

#[test]
fn flush_get_id_and_unknown_type() {
    let mut s = setup();
    let (_, flush) = s.driver.request(T_FLUSH, 0, &[]);
    let id = s.driver.alloc(20);
    s.driver.fill(id, 20, 0xee);
    let (_, get_id) = s.driver.request(T_GET_ID, 0, &[(id, 20, true)]);
    let (_, unknown) = s.driver.request(0x1234, 0, &[]);
    run_until(&mut s.queue, &s.driver, 3);
    assert_eq!(s.driver.status(flush), S_OK);
    assert_eq!(s.driver.status(get_id), S_OK);
    let mut expected = [0u8; 20];
    expected[..12].copy_from_slice(b"vmkit-serial");
    assert_eq!(s.driver.read(id, 20), expected);
    assert_eq!(s.driver.status(unknown), S_UNSUPP);
    let lens: Vec<u32> = (0..3).map(|i| s.driver.used_elem(i).1).collect();
    assert!(
        lens.contains(&21),
        "GET_ID reports 20 bytes + status: {lens:?}"
    );
}

fn range_segment(driver: &mut Driver, sector: u64, sectors: u32, flags: u32) -> u64 {
    let seg = driver.alloc(16);
    driver.mem.write_obj(sector, GuestAddress(seg)).unwrap();
    driver
        .mem
        .write_obj(sectors, GuestAddress(seg + 8))
        .unwrap();
    driver.mem.write_obj(flags, GuestAddress(seg + 12)).unwrap();
    seg
}

#[test]
fn discard_and_write_zeroes() {
    let mut s = setup();
    let seg = range_segment(&mut s.driver, 8, 8, 0);
    let (_, discard) = s.driver.request(T_DISCARD, 0, &[(seg, 16, false)]);
    let seg = range_segment(&mut s.driver, 32, 4, 1);
    let (_, zeroes) = s.driver.request(T_WRITE_ZEROES, 0, &[(seg, 16, false)]);
    // Reserved flags and unmap on discard are refused.
    let seg = range_segment(&mut s.driver, 0, 1, 2);
    let (_, reserved) = s.driver.request(T_WRITE_ZEROES, 0, &[(seg, 16, false)]);
    let seg = range_segment(&mut s.driver, 0, 1, 1);
    let (_, unmap_discard) = s.driver.request(T_DISCARD, 0, &[(seg, 16, false)]);
    // Past the end.
    let seg = range_segment(&mut s.driver, 2047, 2, 0);
    let (_, too_far) = s.driver.request(T_WRITE_ZEROES, 0, &[(seg, 16, false)]);
    run_until(&mut s.queue, &s.driver, 5);
    assert_eq!(s.driver.status(discard), S_OK);
    assert_eq!(s.driver.status(zeroes), S_OK);
    assert_eq!(s.driver.status(reserved), S_UNSUPP);
    assert_eq!(s.driver.status(unmap_discard), S_UNSUPP);
    assert_eq!(s.driver.status(too_far), S_IOERR);
    let file = std::fs::read(&s.path).unwrap();
    assert!(file[4096..8192].iter().all(|&b| b == 0));
    assert!(file[16384..18432].iter().all(|&b| b == 0));
    assert!(file[18432..18944].iter().all(|&b| b == 0x5a));
    assert!(file[..4096].iter().all(|&b| b == 0x5a));
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut s = setup_with(1 << 20, true, false);
    let data = s.driver.alloc(512);
    let (_, write) = s.driver.request(T_OUT, 0, &[(data, 512, false)]);
    let seg = range_segment(&mut s.driver, 0, 1, 0);
    let (_, zeroes) = s.driver.request(T_WRITE_ZEROES, 0, &[(seg, 16, false)]);
    let (_, read) = s.driver.request(T_IN, 0, &[(data, 512, true)]);
    run_until(&mut s.queue, &s.driver, 3);
    assert_eq!(s.driver.status(write), S_IOERR);
    assert_eq!(s.driver.status(zeroes), S_IOERR);
    assert_eq!(s.driver.status(read), S_OK);
    assert!(std::fs::read(&s.path).unwrap().iter().all(|&b| b == 0x5a));
}

#[test]
fn out_of_range_overflowing_and_unaligned_requests_fail() {
    let mut s = setup();
    let data = s.driver.alloc(1024);
    let (_, past_end) = s.driver.request(T_IN, 2047, &[(data, 1024, true)]);
    let (_, overflow) = s.driver.request(T_IN, u64::MAX / 256, &[(data, 512, true)]);
    let (_, max) = s.driver.request(T_OUT, u64::MAX, &[(data, 512, false)]);
    let (_, unaligned) = s.driver.request(T_OUT, 0, &[(data, 100, false)]);
    let (_, wrong_direction) = s.driver.request(T_IN, 0, &[(data, 512, false)]);
    let (_, outside_ram) = s
        .driver
        .request(T_IN, 0, &[(MEM_SIZE as u64 - 256, 512, true)]);
    let (_, wraps) = s.driver.request(T_IN, 0, &[(u64::MAX - 255, 512, true)]);
    run_until(&mut s.queue, &s.driver, 7);
    let all = [
        past_end,
        overflow,
        max,
        unaligned,
        wrong_direction,
        outside_ram,
        wraps,
    ];
    for (i, status) in all.into_iter().enumerate() {
        assert_eq!(s.driver.status(status), S_IOERR, "request {i}");
    }
    assert!(std::fs::read(&s.path).unwrap().iter().all(|&b| b == 0x5a));
}

#[test]
fn malformed_chains_never_panic() {
    let mut s = setup();
    let header = s.driver.header(T_IN, 0);
    let status = s.driver.alloc(1);
    let data = s.driver.alloc(512);
    let _ = status;
    // (Chains without a status byte the device could write stop the queue: see
    // `chains_without_a_writable_status_byte_need_a_reset`.)

    // 4. Writable header, 5. short header: IOERR.
    let st4 = s.driver.alloc(1);
    s.driver.add_chain(&[(header, 16, true), (st4, 1, true)]);
    let st5 = s.driver.alloc(1);
    s.driver.add_chain(&[(header, 8, false), (st5, 1, true)]);
    // 6. Header outside guest RAM.
    let st6 = s.driver.alloc(1);
    s.driver
        .add_chain(&[(MEM_SIZE as u64, 16, false), (st6, 1, true)]);
    run_until(&mut s.queue, &s.driver, 3);
    assert_eq!(s.driver.status(st4), S_IOERR);
    assert_eq!(s.driver.status(st5), S_IOERR);
    assert_eq!(s.driver.status(st6), S_IOERR);

    // 8. A loop: 40 -> 41 -> 40 ... The walk stops after queue-size descriptors, on one
    // that still has NEXT: IOERR in its writable last descriptor.
    let st8 = s.driver.alloc(1);
    s.driver.write_desc(
        40,
        Desc {
            addr: header,
            len: 16,
            flags: F_NEXT,
            next: 41,
        },
    );
    s.driver.write_desc(
        41,
        Desc {
            addr: st8,
            len: 1,
            flags: F_NEXT | F_WRITE,
            next: 40,
        },
    );
    s.driver.publish(40);
    run_until(&mut s.queue, &s.driver, 4);
    assert_eq!(s.driver.used_elem(3), (40, 1));
    assert_eq!(s.driver.status(st8), S_IOERR);

    // 10. Indirect table inside an indirect table: the walk stops, IOERR.
    let table = s.driver.alloc(64);
    let inner = s.driver.alloc(32);
    let st10 = s.driver.alloc(1);
    let put = |at: u64, d: Desc| {
        let m = &s.driver.mem;
        m.write_obj(d.addr, GuestAddress(at)).unwrap();
        m.write_obj(d.len, GuestAddress(at + 8)).unwrap();
        m.write_obj(d.flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(d.next, GuestAddress(at + 14)).unwrap();
    };
    put(
        table,
        Desc {
            addr: header,
            len: 16,
            flags: F_NEXT,
            next: 1,
        },
    );
    put(
        table + 16,
        Desc {
            addr: st10,
            len: 1,
            flags: F_NEXT | F_WRITE,
            next: 2,
        },
    );
    put(
        table + 32,
        Desc {
            addr: inner,
            len: 32,
            flags: F_INDIRECT,
            next: 0,
        },
    );
    put(
        inner,
        Desc {
            addr: data,
            len: 512,
            flags: F_WRITE,
            next: 0,
        },
    );
    s.driver.write_desc(
        43,
        Desc {
            addr: table,
            len: 48,
            flags: F_INDIRECT,
            next: 0,
        },
    );
    s.driver.publish(43);
    run_until(&mut s.queue, &s.driver, 5);
    assert_eq!(s.driver.used_elem(4), (43, 1));
    assert_eq!(s.driver.status(st10), S_IOERR);

    // The queue still works.
    let (_, ok) = s.driver.request(T_IN, 0, &[(data, 512, true)]);
    run_until(&mut s.queue, &s.driver, 6);
    assert_eq!(s.driver.status(ok), S_OK);
    assert!(!s.queue.is_broken());
}

/// A chain whose status byte the device cannot write can be neither answered nor failed:
/// the queue stops (the device then reports NEEDS_RESET) and returns nothing, rather than
/// hand the chain back and let the driver read a stale status as success.
#[test]
fn chains_without_a_writable_status_byte_need_a_reset() {
    for case in 0..5 {
        let mut s = setup();
        let header = s.driver.header(T_IN, 0);
        let status = s.driver.alloc(1);
        match case {
            // Only a header.
            0 => {
                s.driver.add_chain(&[(header, 16, false)]);
            }
            // A status the device may not write.
            1 => {
                s.driver
                    .add_chain(&[(header, 16, false), (status, 1, false)]);
            }
            // A status of length 0.
            2 => {
                s.driver
                    .add_chain(&[(header, 16, false), (status, 0, true)]);
            }
            // A status outside guest RAM.
            3 => {
                s.driver
                    .add_chain(&[(header, 16, false), (MEM_SIZE as u64 + 4096, 1, true)]);
            }
            // `next` out of the table: the chain ends on the header.
            _ => {
                s.driver.write_desc(
                    42,
                    Desc {
                        addr: header,
                        len: 16,
                        flags: F_NEXT,
                        next: 200,
                    },
                );
                s.driver.publish(42);
            }
        }
        let result = s.queue.process_queue();
        assert!(
            matches!(result, Err(vmkit_virtio_blk::Error::NoStatusByte(_))),
            "case {case}: {result:?}"
        );
        assert!(s.queue.is_broken(), "case {case}");
        assert_eq!(
            s.driver.used_idx(),
            0,
            "case {case}: something was returned"
        );
    }
}

#[test]
fn indirect_requests_work() {
    let mut s = setup();
    let header = s.driver.header(T_IN, 1);
    let data = s.driver.alloc(512);
    let status = s.driver.alloc(1);
    let table = s.driver.alloc(48);
    let descs = [
        Desc {
            addr: header,
            len: 16,
            flags: F_NEXT,
            next: 1,
        },
        Desc {
            addr: data,
            len: 512,
            flags: F_NEXT | F_WRITE,
            next: 2,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ];
    for (i, d) in descs.iter().enumerate() {
        let at = GuestAddress(table + 16 * i as u64);
        s.driver.mem.write_obj(d.addr, at).unwrap();
        s.driver.mem.write_obj(d.len, at.unchecked_add(8)).unwrap();
        s.driver
            .mem
            .write_obj(d.flags, at.unchecked_add(12))
            .unwrap();
        s.driver
            .mem
            .write_obj(d.next, at.unchecked_add(14))
            .unwrap();
    }
    s.driver.write_desc(
        0,
        Desc {
            addr: table,
            len: 48,
            flags: F_INDIRECT,
            next: 0,
        },
    );
    s.driver.publish(0);
    run_until(&mut s.queue, &s.driver, 1);
    assert_eq!(s.driver.status(status), S_OK);
    assert_eq!(s.driver.used_elem(0), (0, 513));
    assert_eq!(s.driver.read(data, 512), vec![0x5a; 512]);
}

#[test]
fn a_head_made_available_twice_while_in_flight_breaks_the_queue() {
    let mut s = setup();
    let data = s.driver.alloc(4096);
    let (head, _) = s.driver.request(T_IN, 0, &[(data, 4096, true)]);
    s.driver.publish(head);
    // Either the first completed before the second was popped (fine) or the queue broke.
    let result = s.queue.process_queue();
    if result.is_err() {
        assert!(s.queue.is_broken());
    }
}

#[test]
fn bogus_available_index_breaks_the_queue() {
    let mut s = setup();
    s.driver
        .mem
        .write_obj(1000u16, GuestAddress(s.driver.avail + 2))
        .unwrap();
    assert!(s.queue.process_queue().is_err());
    assert!(s.queue.is_broken());
    assert!(
        s.queue.process_queue().is_ok(),
        "a broken queue stays quiet"
    );
}

#[test]
fn one_interrupt_per_batch_without_event_idx() {
    let mut s = setup();
    for _ in 0..8 {
        let data = s.driver.alloc(512);
        s.driver.request(T_GET_ID, 0, &[(data, 20, true)]);
    }
    s.queue.process_queue().unwrap();
    assert_eq!(s.driver.used_idx(), 8);
    assert_eq!(s.interrupt.used_count(), 1);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut s = setup_with(1 << 20, false, true);
    // The driver wants an interrupt only once used idx passes 5.
    s.driver.set_used_event(5);
    for _ in 0..3 {
        let id = s.driver.alloc(20);
        s.driver.request(T_GET_ID, 0, &[(id, 20, true)]);
    }
    s.queue.process_queue().unwrap();
    assert_eq!(s.driver.used_idx(), 3);
    assert_eq!(s.interrupt.used_count(), 0);
    for _ in 0..3 {
        let id = s.driver.alloc(20);
        s.driver.request(T_GET_ID, 0, &[(id, 20, true)]);
    }
    s.queue.process_queue().unwrap();
    assert_eq!(s.driver.used_idx(), 6);
    assert_eq!(s.interrupt.used_count(), 1);
}

#[test]
fn reads_mark_the_dirty_bitmap() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;
    let mut s = setup();
    let data = s.driver.alloc(8192) + 0x10000;
    let mem = s.driver.mem.clone();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    region.bitmap().reset();
    let (_, status) = s.driver.request(T_IN, 0, &[(data, 8192, true)]);
    run_until(&mut s.queue, &s.driver, 1);
    assert_eq!(s.driver.status(status), S_OK);
    let bitmap = vm_memory::GuestMemoryRegion::bitmap(region);
    assert!(bitmap.dirty_at(data as usize));
    assert!(bitmap.dirty_at(data as usize + 8191));
}

#[test]
fn a_full_disk_queue_throttles_without_dropping_requests() {
    let mem = memory();
    let path = image(1 << 20, 0x5a);
    let mut driver = Driver::new(mem.clone(), 16);
    let options = vmkit_block_backend::OpenOptions::new()
        .locking(false)
        .max_in_flight(2);
    let disk = vmkit_block_backend::open(&path, &options).unwrap();
    let interrupt = Arc::new(CountingInterrupt::new());
    let mut queue = BlockQueue::new(0, driver.queue(false), mem, disk, interrupt, b"");
    let mut statuses = Vec::new();
    for i in 0..5 {
        let data = driver.alloc(512);
        statuses.push(driver.request(T_IN, i, &[(data, 512, true)]).1);
    }
    run_until(&mut queue, &driver, 5);
    for status in statuses {
        assert_eq!(driver.status(status), S_OK);
    }
}

#[test]
fn buffers_crossing_a_memory_region_boundary_work() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;
    // Two adjacent regions: a data buffer and the status byte's page straddle the seam.
    let half = MEM_SIZE / 2;
    let mem = Arc::new(
        Mem::from_ranges(&[(GuestAddress(0), half), (GuestAddress(half as u64), half)]).unwrap(),
    );
    let path = image(1 << 20, 0x5a);
    let mut driver = Driver::new(mem.clone(), 64);
    let interrupt = Arc::new(CountingInterrupt::new());
    let mut queue = BlockQueue::new(
        0,
        driver.queue(false),
        mem.clone(),
        open(&path, false),
        interrupt,
        b"",
    );
    let data = half as u64 - 1024;
    driver.fill(data, 4096, 0xc3);
    let header = driver.header(T_OUT, 16);
    let status = driver.alloc(1);
    driver.add_chain(&[(header, 16, false), (data, 4096, false), (status, 1, true)]);
    run_until(&mut queue, &driver, 1);
    assert_eq!(driver.status(status), S_OK);
    let file = std::fs::read(&path).unwrap();
    assert!(file[8192..12288].iter().all(|&b| b == 0xc3));

    // Read it back across the seam, with the dirty bitmap watching both regions (reset once
    // the driver's own writes are done, so only the device's count).
    driver.fill(data, 4096, 0);
    let header = driver.header(T_IN, 16);
    let status = driver.alloc(1);
    driver.add_chain(&[(header, 16, false), (data, 4096, true), (status, 1, true)]);
    for region in mem.iter() {
        region.bitmap().reset();
    }
    run_until(&mut queue, &driver, 2);
    assert_eq!(driver.status(status), S_OK);
    assert_eq!(driver.read(data, 4096), vec![0xc3; 4096]);
    let first = mem.find_region(GuestAddress(data)).unwrap();
    let second = mem.find_region(GuestAddress(half as u64)).unwrap();
    assert!(first.bitmap().dirty_at(half - 1024));
    assert!(second.bitmap().dirty_at(0) && second.bitmap().dirty_at(3071));
    // The status byte the device wrote is marked too.
    let status_region = mem.find_region(GuestAddress(status)).unwrap();
    let status_offset = status - vm_memory::GuestMemoryRegion::start_addr(status_region).0;
    assert!(status_region.bitmap().dirty_at(status_offset as usize));
}
