//! Checks a disk image after `scripts/crash-test.sh` killed the VM that was writing it: every
//! write that the guest's `crashload` workload reported as done must be in the image, as far
//! as the cache mode promises it.
//!
//! ```sh
//! cargo run --release --example crash-check -- LOG IMAGE FORMAT CACHE
//! ```
//!
//! LOG is the VM's console: `W seq block` once a write completed, `F seq` once a flush after
//! write `seq` completed (guest/src/virtio_blk/crash.rs). What must be in the image:
//! - writethrough, directsync: every completed write (no volatile cache);
//! - writeback, none: every write completed before the last completed flush;
//! - unsafe: nothing (flushes are ignored).
//!
//! "In the image" means block `b` holds a whole record of the same block with a sequence
//! number at least that of the write (a later write to the block may have replaced it). Any
//! block holding something that is neither zeroes nor a whole record is a failure in every
//! mode. Exits 0 if the image passes, 1 if not (printing what is wrong), 2 on bad usage.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use vmkit_block_backend::{open_sync, Backing, CacheMode, Format, IoBuf, OpenOptions};

const RECORD: usize = 4096;
const MAGIC: &[u8; 8] = b"VMKCRASH";

fn record_byte(seq: u64, i: u64) -> u8 {
    (seq.wrapping_mul(31) ^ i.wrapping_mul(7) ^ (i >> 8)) as u8
}

/// What the log says the guest saw completed.
#[derive(Default)]
struct Log {
    /// block -> every completed write's seq, in order.
    writes: HashMap<u64, Vec<u64>>,
    completed: u64,
    last_flush: u64,
}

fn parse_log(text: &str) -> Log {
    let mut log = Log::default();
    // The last line may have been cut by the kill: only whole lines count.
    let whole = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    for line in whole.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("W"), Some(seq), Some(block)) => {
                if let (Ok(seq), Ok(block)) = (seq.parse(), block.parse()) {
                    log.writes.entry(block).or_insert_with(Vec::new).push(seq);
                    log.completed += 1;
                }
            }
            (Some("F"), Some(seq), None) => {
                if let Ok(seq) = seq.parse() {
                    log.last_flush = seq;
                }
            }
            _ => {}
        }
    }
    log
}

/// The sequence number of a whole record of `block`, `Some(0)` for a block of zeroes, `None`
/// for anything else (torn, foreign, another block's record).
fn record_seq(data: &[u8], block: u64) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    if data.get(..8)? != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(data.get(8..16)?.try_into().ok()?);
    let found_block = u64::from_le_bytes(data.get(16..24)?.try_into().ok()?);
    let whole = data
        .iter()
        .enumerate()
        .skip(24)
        .all(|(i, &b)| b == record_byte(seq, i as u64));
    (found_block == block && whole).then_some(seq)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [log, image, format, cache] = args.as_slice() else {
        eprintln!("usage: crash-check LOG IMAGE FORMAT CACHE");
        return ExitCode::from(2);
    };
    let (Ok(format), Ok(cache)) = (format.parse::<Format>(), cache.parse::<CacheMode>()) else {
        eprintln!("crash-check: bad format or cache mode");
        return ExitCode::from(2);
    };
    let text = match std::fs::read(log) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => {
            eprintln!("crash-check: cannot read {log}: {e}");
            return ExitCode::from(2);
        }
    };
    let log = parse_log(&text);
    let options = OpenOptions::new()
        .format(format)
        .read_only(true)
        .locking(false)
        .backing(Backing::None);
    let disk = match open_sync(Path::new(image), &options) {
        Ok(disk) => disk,
        Err(e) => {
            println!("FAIL: cannot open {image}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    let blocks = (disk.info().size / RECORD as u64).min(256);
    for block in 0..blocks {
        let mut data = vec![0u8; RECORD];
        if let Err(e) =
            disk.read_vectored(block * RECORD as u64, &[IoBuf::from_mut_slice(&mut data)])
        {
            failures.push(format!("block {block}: read failed: {e}"));
            continue;
        }
        let Some(found) = record_seq(&data, block) else {
            failures.push(format!("block {block}: neither zeroes nor a whole record"));
            continue;
        };
        let seqs = log.writes.get(&block).map(Vec::as_slice).unwrap_or(&[]);
        let durable = match cache {
            CacheMode::Writethrough | CacheMode::DirectSync => seqs.last().copied(),
            CacheMode::Writeback | CacheMode::None => {
                seqs.iter().copied().filter(|&s| s <= log.last_flush).max()
            }
            CacheMode::Unsafe => None,
        };
        if let Some(durable) = durable {
            checked += 1;
            if found < durable {
                failures.push(format!(
                    "block {block}: holds write {found}, but write {durable} was acknowledged{}",
                    if matches!(cache, CacheMode::Writeback | CacheMode::None) {
                        " and flushed"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    println!(
        "{} acknowledged writes, last flush after write {}, {checked} blocks with a durable write checked",
        log.completed, log.last_flush
    );
    if failures.is_empty() {
        println!("OK");
        ExitCode::SUCCESS
    } else {
        for failure in &failures {
            println!("FAIL: {failure}");
        }
        ExitCode::FAILURE
    }
}
