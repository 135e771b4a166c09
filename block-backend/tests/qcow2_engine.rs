//! qcow2 images on both engines, in every cache mode: page-cache hits are read inline
//! (`RWF_NOWAIT`), allocated clusters are overwritten in place without the metadata lock,
//! io_uring carries reads and overwrites of allocated clusters in its ring, and what was
//! written reads back.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use vmkit_block_backend::qcow2::create;
use vmkit_block_backend::{
    open, AlignedBuffer, AsyncDisk, CacheMode, EngineKind, Format, IoBuf, OpenOptions, Qcow2Disk,
    Qcow2Options, RawOptions, Request, SyncDisk, UringEngine,
};
use vmm_sys_util::tempdir::TempDir;

const CLUSTER: u64 = 65536;
const SIZE: u64 = 8 << 20;

fn run_one(disk: &mut dyn AsyncDisk, request: Request<'_>) -> usize {
    // SAFETY: the request's buffers outlive it: it is reaped before returning.
    unsafe { disk.push(1, request).unwrap() };
    disk.submit().unwrap();
    let mut done = Vec::new();
    while disk.reap(&mut done) == 0 {
        // Sleep until the engine signals its eventfd (or 100 ms pass).
        let mut poll = libc::pollfd {
            fd: disk.eventfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; poll only writes its revents.
        unsafe { libc::poll(&mut poll, 1, 100) };
        let _ = disk.eventfd().read();
    }
    done.pop().unwrap().result.unwrap()
}

fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i as u8).wrapping_mul(7) ^ (j as u8))
        .collect()
}

const CACHE_MODES: [CacheMode; 5] = [
    CacheMode::Writeback,
    CacheMode::Writethrough,
    CacheMode::Unsafe,
    CacheMode::None,
    CacheMode::DirectSync,
];

/// Allocating writes, then overwrites of allocated clusters (the lock-free path), some of
/// them 4 KiB, some spanning clusters; then every 4 KiB block read back twice (the second
/// time from the page cache where there is one). Buffers are page-aligned, as a guest's
/// are, so that `O_DIRECT` needs no bounce. Returns what the disk should hold.
fn write_and_read_back(disk: &mut dyn AsyncDisk, cache: CacheMode) -> Vec<u8> {
    let mut mirror = vec![0u8; SIZE as usize];
    for round in 0..2u64 {
        for i in 0..40u64 {
            let offset = (i * 197 * 4096 + round * 8192) % (SIZE - 200_000);
            let len = if i % 3 == 0 { 150_000 } else { 4096 };
            let mut data = AlignedBuffer::new(len, 4096);
            data.as_mut_slice()
                .copy_from_slice(&pattern(i + round * 100, len));
            mirror[offset as usize..offset as usize + len].copy_from_slice(data.as_slice());
            let bufs = [IoBuf::from_mut_slice(data.as_mut_slice())];
            let request = Request::Write {
                offset,
                bufs: &bufs,
            };
            assert_eq!(run_one(disk, request), len);
        }
    }
    for _ in 0..2 {
        for i in 0..SIZE / 4096 {
            let mut back = AlignedBuffer::new(4096, 4096);
            let bufs = [IoBuf::from_mut_slice(back.as_mut_slice())];
            let request = Request::Read {
                offset: i * 4096,
                bufs: &bufs,
            };
            run_one(disk, request);
            let at = (i * 4096) as usize;
            assert!(
                back.as_slice() == &mirror[at..at + 4096],
                "{}: block {i} differs",
                cache.name()
            );
        }
    }
    mirror
}

/// Reopens the image and checks it holds `mirror`.
fn verify(image: &std::path::Path, mirror: &[u8], cache: CacheMode) {
    let sync = Qcow2Disk::open(image, &Default::default()).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    sync.read_vectored(0, &[IoBuf::from_mut_slice(&mut all)])
        .unwrap();
    assert!(
        all == mirror,
        "{}: content differs after reopening",
        cache.name()
    );
}

#[test]
fn writes_and_overwrites_read_back_on_both_engines() {
    let dir = TempDir::new_with_prefix("/var/tmp/vmkit-qcow2-e").unwrap();
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        for cache in CACHE_MODES {
            let image = dir
                .as_path()
                .join(format!("{}-{engine:?}.qcow2", cache.name()));
            create(&image, SIZE, CLUSTER).unwrap();
            let options = OpenOptions::new()
                .format(Format::Qcow2)
                .cache(cache)
                .engine(engine);
            let mut disk = match open(&image, &options) {
                Ok(disk) => disk,
                // No O_DIRECT in the temporary directory.
                Err(e) if cache.direct() => {
                    eprintln!("SKIPPED {}: {e}", cache.name());
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            assert_eq!(disk.engine(), engine);
            let mirror = write_and_read_back(&mut *disk, cache);
            drop(disk);
            verify(&image, &mirror, cache);
        }
    }
}

#[test]
fn io_uring_reads_allocated_clusters_in_its_ring() {
    let dir = TempDir::new_with_prefix("/var/tmp/vmkit-qcow2-e").unwrap();
    for cache in [CacheMode::None, CacheMode::DirectSync] {
        let image = dir.as_path().join(format!("ring-{}.qcow2", cache.name()));
        create(&image, SIZE, CLUSTER).unwrap();
        let options = Qcow2Options {
            raw: RawOptions {
                cache,
                ..Default::default()
            },
            ..Default::default()
        };
        let qcow2 = match Qcow2Disk::open(&image, &options) {
            Ok(disk) => Arc::new(disk),
            Err(e) => {
                eprintln!("SKIPPED {}: {e}", cache.name());
                continue;
            }
        };
        let mut engine = match UringEngine::for_disk(qcow2, 64) {
            Ok(engine) => engine,
            Err(e) => {
                eprintln!("SKIPPED: no io_uring here: {e}");
                return;
            }
        };
        let mirror = write_and_read_back(&mut engine, cache);
        // Without a page cache every 4 KiB read of an allocated cluster maps to one host
        // range with its L2 table cached, so the ring carries it; unallocated ones read as
        // zeroes through the driver.
        let allocated_blocks = mirror
            .chunks(CLUSTER as usize)
            .filter(|cluster| cluster.iter().any(|&b| b != 0))
            .count() as u64
            * (CLUSTER / 4096);
        assert!(
            engine.ring_requests() >= 2 * allocated_blocks,
            "{}: {} requests in the ring, {allocated_blocks} allocated blocks read twice",
            cache.name(),
            engine.ring_requests()
        );
        drop(engine);
        verify(&image, &mirror, cache);
    }
}
