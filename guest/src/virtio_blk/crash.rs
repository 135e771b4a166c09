//! `crashload`: the write-and-flush workload of `scripts/crash-test.sh`, which kills the VM
//! at a random moment and then checks the image against what this workload reported.
//!
//! On disk 0, forever: write record `seq` (seq = 1, 2, ...) to 4 KiB block `seq % BLOCKS`,
//! and once the device has completed it print `W seq block`; after every
//! [`WRITES_PER_FLUSH`] writes, flush and print `F seq` once the flush has completed (every
//! write up to `seq` is then durable in the modes that have a write cache). A record is
//! [`MAGIC`], `seq`, the block number, then bytes derived from `seq`, so that a checker can
//! tell a whole record from a torn or foreign one (see `examples/crash-check.rs`).

use vmkit_guest_abi::BootInfo;

use super::{find_disks, req_type, write_bytes, Arena, Disk, Req, SECTOR};
use crate::exit::{exit, status};
use crate::println;

/// Bytes of a record (one 4 KiB block).
const RECORD: u64 = 4096;
/// Blocks the workload cycles through (fewer if the disk is smaller).
const BLOCKS: u64 = 256;
/// Writes between flushes.
const WRITES_PER_FLUSH: u64 = 8;
/// The first bytes of every record.
const MAGIC: &[u8; 8] = b"VMKCRASH";

/// Byte `i` (from 24 on) of record `seq`.
fn record_byte(seq: u64, i: u64) -> u8 {
    (seq.wrapping_mul(31) ^ i.wrapping_mul(7) ^ (i >> 8)) as u8
}

/// Runs the workload on disk 0 until the VM is killed; never returns.
pub fn run(info: &BootInfo) -> ! {
    let (disks, count) = find_disks(info);
    let Some(transport) = disks.first().copied().flatten().filter(|_| count > 0) else {
        println!("error: crashload: no virtio-blk disk 0");
        exit(status::IOBENCH_SETUP)
    };
    let mut arena = Arena::new(info);
    let mut disk = Disk::probe(0, transport, &mut arena);
    let blocks = (disk.capacity * SECTOR / RECORD).min(BLOCKS);
    if blocks == 0 {
        println!("error: crashload: disk 0 is smaller than one block");
        exit(status::IOBENCH_SETUP)
    }
    let buffer = disk.wbuf;
    println!(
        "crashload: {blocks} blocks of {RECORD} bytes, a flush every {WRITES_PER_FLUSH} writes"
    );
    let mut seq = 1u64;
    loop {
        let block = seq % blocks;
        let mut head = [0u8; 24];
        head[..8].copy_from_slice(MAGIC);
        head[8..16].copy_from_slice(&seq.to_le_bytes());
        head[16..].copy_from_slice(&block.to_le_bytes());
        write_bytes(buffer, &head);
        for i in 24..RECORD {
            write_bytes(buffer + i, &[record_byte(seq, i)]);
        }
        let sectors = RECORD / SECTOR;
        disk.run(
            &[Req::io(
                req_type::OUT,
                block * sectors,
                buffer,
                sectors,
                1,
                0,
            )],
            "crashload write",
        );
        println!("W {seq} {block}");
        if seq % WRITES_PER_FLUSH == 0 {
            disk.run(&[Req::range(req_type::FLUSH, 0, 0, 0)], "crashload flush");
            println!("F {seq}");
        }
        seq += 1;
    }
}
