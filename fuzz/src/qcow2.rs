//! The qcow2 harness: opens arbitrary image bytes as qcow2, reads the disk in bounded
//! pieces, and optionally writes, discards and zeroes a few ranges (cache mode `unsafe`)
//! and reads them back.
//!
//! Input layout: byte 0 holds flags (bit 0: also open read-write and write), bytes 1-8 a
//! little-endian seed for the write offsets; the image follows from byte 9.
//!
//! Besides "no panic, no hang, bounded memory": a write, write-zeroes or discard that
//! succeeds must read back as written (or as zeroes).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use vmkit_block_backend::{
    Backing, CacheMode, IoBuf, Qcow2Disk, Qcow2Options, RawOptions, SyncDisk,
};

/// Bytes before the image.
const HEADER: usize = 9;
/// Bytes read at most per request.
const CHUNK: u64 = 64 << 10;
/// Bytes read at most per image, from the start (plus the last chunk).
const READ_LIMIT: u64 = 4 << 20;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file on tmpfs (where there is one) that is removed when dropped.
struct TempImage(PathBuf);

impl TempImage {
    fn new(bytes: &[u8]) -> Option<Self> {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("vmkit-fuzz-qcow2-{}-{n}.img", std::process::id()));
        std::fs::write(&path, bytes).ok()?;
        Some(TempImage(path))
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open(image: &TempImage, read_only: bool) -> Option<Qcow2Disk> {
    let options = Qcow2Options {
        raw: RawOptions {
            cache: CacheMode::Unsafe,
            read_only,
            discard: true,
            locking: false,
        },
        backing: Backing::None,
    };
    Qcow2Disk::open(&image.0, &options).ok()
}

/// Reads `len` bytes at `offset` (the disk checks the range); `None` on an error.
fn read(disk: &Qcow2Disk, offset: u64, len: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let bufs = [IoBuf::from_mut_slice(&mut buf)];
    let n = disk.read_vectored(offset, &bufs).ok()?;
    assert_eq!(n as u64, len, "a read returned {n} of {len} bytes");
    Some(buf)
}

/// Reads the first `READ_LIMIT` bytes and the last chunk, in chunks, two buffers each.
fn read_all(disk: &Qcow2Disk) {
    let size = disk.info().addressable_size();
    let mut offset = 0;
    while offset < size.min(READ_LIMIT) {
        let len = CHUNK.min(size - offset);
        let (mut a, mut b) = (
            vec![0u8; (len / 3) as usize],
            vec![0u8; (len - len / 3) as usize],
        );
        let bufs = [IoBuf::from_mut_slice(&mut a), IoBuf::from_mut_slice(&mut b)];
        if disk.read_vectored(offset, &bufs).is_err() {
            // A corrupt table: the request fails, and later ones may still work.
        }
        offset += len;
    }
    let tail = size.min(CHUNK);
    let _ = read(disk, size - tail, tail);
    // Out of range must fail, not read.
    assert!(
        read(disk, size, 1).is_none(),
        "a read past the end succeeded"
    );
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let mut seed = [0u8; 8];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = data.get(1 + i).copied().unwrap_or(0);
    }
    let seed = u64::from_le_bytes(seed);
    let Some(image) = TempImage::new(data.get(HEADER..).unwrap_or(&[])) else {
        return;
    };

    if let Some(disk) = open(&image, true) {
        read_all(&disk);
    }
    if flags & 1 == 0 {
        return;
    }
    let Some(disk) = open(&image, false) else {
        return;
    };
    let size = disk.info().addressable_size();
    if size == 0 {
        return;
    }
    // Three ranges from the seed: a write, a write-zeroes, a discard, each followed by
    // a read-back of its own range.
    for (i, shift) in [0u32, 21, 42].into_iter().enumerate() {
        let bits = seed >> shift;
        let offset = ((bits & 0xffff) * 512) % size;
        let len = (((bits >> 16) & 0x1f) + 1) * 512;
        let len = len.min(size - offset);
        let pattern = 0xa0 | i as u8;
        let ok = match i {
            0 => {
                let mut data = vec![pattern; len as usize];
                let bufs = [IoBuf::from_mut_slice(&mut data)];
                disk.write_vectored(offset, &bufs).is_ok()
            }
            1 => disk.write_zeroes(offset, len).is_ok(),
            _ => disk.discard(offset, len).is_ok(),
        };
        if !ok {
            continue;
        }
        let expected = if i == 0 { pattern } else { 0 };
        if let Some(back) = read(&disk, offset, len) {
            assert!(
                back.iter().all(|&b| b == expected),
                "request {i} at {offset} of {len} bytes did not read back as {expected:#x}"
            );
        }
    }
    let _ = disk.flush();
    read_all(&disk);
}
