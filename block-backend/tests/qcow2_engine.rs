//! qcow2 images through `open` and the thread-pool engine, in every cache mode: page-cache
//! hits are read inline (`RWF_NOWAIT`), allocated clusters are overwritten in place without
//! the metadata lock, and what was written reads back.

use vmkit_block_backend::qcow2::create;
use vmkit_block_backend::{
    open, AsyncDisk, CacheMode, EngineKind, Format, IoBuf, OpenOptions, Request, SyncDisk,
};
use vmm_sys_util::tempdir::TempDir;

fn run_one(disk: &mut dyn AsyncDisk, request: Request<'_>) -> usize {
    // SAFETY: the request's buffers outlive it: it is reaped before returning.
    unsafe { disk.push(1, request).unwrap() };
    disk.submit().unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        if disk.reap(&mut done) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    done.pop().unwrap().result.unwrap()
}

fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i as u8).wrapping_mul(7) ^ (j as u8))
        .collect()
}

#[test]
fn writes_and_overwrites_read_back_through_the_pool() {
    let dir = TempDir::new_with_prefix("/var/tmp/vmkit-qcow2-e").unwrap();
    let cluster = 65536u64;
    for cache in [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Unsafe,
        CacheMode::None,
        CacheMode::DirectSync,
    ] {
        let image = dir.as_path().join(format!("{}.qcow2", cache.name()));
        create(&image, 8 << 20, cluster).unwrap();
        let options = OpenOptions::new()
            .format(Format::Qcow2)
            .cache(cache)
            .engine(EngineKind::Sync);
        let mut disk = match open(&image, &options) {
            Ok(disk) => disk,
            // No O_DIRECT in the temporary directory.
            Err(e) if cache.direct() => {
                eprintln!("SKIPPED {}: {e}", cache.name());
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let mut mirror = vec![0u8; 8 << 20];
        // Allocating writes, then overwrites of allocated clusters (the lock-free path),
        // some of them 4 KiB, some spanning clusters.
        for round in 0..2u64 {
            for i in 0..40u64 {
                let offset = (i * 197 * 4096 + round * 8192) % ((8 << 20) - 200_000);
                let len = if i % 3 == 0 { 150_000 } else { 4096 };
                let mut data = pattern(i + round * 100, len);
                mirror[offset as usize..offset as usize + len].copy_from_slice(&data);
                let bufs = [IoBuf::from_mut_slice(&mut data)];
                assert_eq!(
                    run_one(
                        &mut *disk,
                        Request::Write {
                            offset,
                            bufs: &bufs
                        }
                    ),
                    len
                );
            }
        }
        // Read back twice: the second time from the page cache (inline reads).
        for _ in 0..2 {
            for i in 0..(8u64 << 20) / 4096 {
                let mut back = vec![0u8; 4096];
                let bufs = [IoBuf::from_mut_slice(&mut back)];
                run_one(
                    &mut *disk,
                    Request::Read {
                        offset: i * 4096,
                        bufs: &bufs,
                    },
                );
                let at = (i * 4096) as usize;
                assert!(
                    back[..] == mirror[at..at + 4096],
                    "{}: block {i} differs",
                    cache.name()
                );
            }
        }
        drop(disk);
        let sync = vmkit_block_backend::Qcow2Disk::open(&image, &Default::default()).unwrap();
        let mut all = vec![0u8; 8 << 20];
        sync.read_vectored(0, &[IoBuf::from_mut_slice(&mut all)])
            .unwrap();
        assert!(
            all == mirror,
            "{}: content differs after reopening",
            cache.name()
        );
    }
}
