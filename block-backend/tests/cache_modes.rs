//! Cache modes do what QEMU's do: the same open flags, flush reaching fdatasync where it
//! must, writes durable at completion without a write cache, and the run-time switch.
//! Durability is observed in the kernel's page cache (cachestat), not assumed. The
//! comparison with a running QEMU is in `qemu_interop.rs`.

mod common;

use std::os::unix::io::AsRawFd;

use common::*;
use vmkit_block_backend::{open, CacheMode, OpenOptions, Request, SyncDisk};

#[test]
fn open_flags_are_qemus() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "flags.img", 1 << 20);
    for mode in CacheMode::ALL {
        for read_only in [false, true] {
            let disk = open_raw(&path, mode, read_only).unwrap();
            let flags = fd_flags(disk.file().as_raw_fd());
            let access = if read_only {
                libc::O_RDONLY
            } else {
                libc::O_RDWR
            };
            let direct = if mode.direct() { O_DIRECT } else { 0 };
            assert_eq!(
                flags & CACHE_FLAGS,
                access | direct,
                "{mode} read_only={read_only}: {flags:o}"
            );
            assert_ne!(flags & libc::O_CLOEXEC, 0);
        }
    }
}

#[test]
fn flush_reaches_fdatasync_except_in_unsafe() {
    let dir = scratch_dir();
    let observe = cachestat_available(&dir);
    for engine in ENGINES {
        for mode in [CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe] {
            let path = patterned_image(&dir, &format!("flush-{mode}-{engine}.img"), 1 << 20);
            // Start from a clean page cache for the file.
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
            let mut disk = open(&path, &OpenOptions::new().cache(mode).engine(engine)).unwrap();
            write(disk.as_mut(), 65536, &pattern(65536, 65536, 1));
            let dirty_after_write = unwritten_pages(&path, 65536, 65536);
            let before = disk.sync_disk().stats();
            assert_eq!(run_one(disk.as_mut(), Request::Flush).unwrap(), 0);
            let after = disk.sync_disk().stats();
            let dirty_after_flush = unwritten_pages(&path, 65536, 65536);

            if mode == CacheMode::Unsafe {
                assert_eq!(after.fdatasyncs, before.fdatasyncs, "{mode}/{engine}");
                assert_eq!(after.ignored_flushes, before.ignored_flushes + 1);
            } else {
                assert_eq!(after.fdatasyncs, before.fdatasyncs + 1, "{mode}/{engine}");
            }
            if observe {
                match mode {
                    // The write sat in the page cache; a real flush wrote it out, an ignored
                    // one left it there.
                    CacheMode::Writeback => {
                        assert!(dirty_after_write.unwrap() > 0, "{mode}/{engine}");
                        assert_eq!(dirty_after_flush, Some(0), "{mode}/{engine}");
                    }
                    CacheMode::Unsafe => {
                        assert!(dirty_after_write.unwrap() > 0);
                        assert!(dirty_after_flush.unwrap() > 0, "unsafe must not flush");
                    }
                    // O_DIRECT never leaves dirty pages behind.
                    _ => assert_eq!(dirty_after_write, Some(0), "{mode}/{engine}"),
                }
            }
        }
    }
}

#[test]
fn writes_are_durable_at_completion_without_a_write_cache() {
    let dir = scratch_dir();
    let observe = cachestat_available(&dir);
    for engine in ENGINES {
        for mode in [CacheMode::Writethrough, CacheMode::DirectSync] {
            let path = patterned_image(&dir, &format!("durable-{mode}-{engine}.img"), 1 << 20);
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
            let mut disk = open(&path, &OpenOptions::new().cache(mode).engine(engine)).unwrap();
            assert!(!disk.sync_disk().write_cache());
            for i in 0..4u64 {
                write(disk.as_mut(), i * 8192, &pattern(i * 8192, 4096, 2));
                if observe {
                    // Nothing of the completed write waits in the page cache.
                    assert_eq!(
                        unwritten_pages(&path, 0, 1 << 20),
                        Some(0),
                        "{mode}/{engine} write {i}"
                    );
                }
            }
            let stats = disk.sync_disk().stats();
            assert_eq!(stats.durable_writes, 4, "{mode}/{engine}");
            // A flush has nothing left to do.
            assert_eq!(run_one(disk.as_mut(), Request::Flush).unwrap(), 0);
            assert_eq!(disk.sync_disk().stats().fdatasyncs, stats.fdatasyncs);
        }
    }
}

#[test]
fn the_write_cache_switches_at_run_time() {
    let dir = scratch_dir();
    let observe = cachestat_available(&dir);
    for engine in ENGINES {
        let path = patterned_image(&dir, &format!("wce-{engine}.img"), 1 << 20);
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        let mut disk = open(
            &path,
            &OpenOptions::new()
                .cache(CacheMode::Writeback)
                .engine(engine),
        )
        .unwrap();
        assert!(disk.sync_disk().write_cache());
        write(disk.as_mut(), 0, &pattern(0, 16384, 4));
        if observe {
            assert!(unwritten_pages(&path, 0, 16384).unwrap() > 0);
        }
        // Turning the cache off makes what it held durable, and later writes durable.
        disk.sync_disk().set_write_cache(false).unwrap();
        if observe {
            assert_eq!(unwritten_pages(&path, 0, 1 << 20), Some(0));
        }
        write(disk.as_mut(), 65536, &pattern(65536, 4096, 5));
        if observe {
            assert_eq!(unwritten_pages(&path, 0, 1 << 20), Some(0), "{engine}");
        }
        assert_eq!(disk.sync_disk().stats().durable_writes, 1);
        // And back on: writes stay in the cache until a flush.
        disk.sync_disk().set_write_cache(true).unwrap();
        write(disk.as_mut(), 131072, &pattern(131072, 4096, 6));
        if observe {
            assert!(
                unwritten_pages(&path, 131072, 4096).unwrap() > 0,
                "{engine}"
            );
        }
        assert_eq!(disk.sync_disk().stats().durable_writes, 1);
        assert_eq!(read(disk.as_mut(), 65536, 4096), pattern(65536, 4096, 5));
    }
}

#[test]
fn sync_disk_flush_follows_the_mode() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "sync-flush.img", 1 << 20);
    // (mode, fdatasyncs, ignored flushes) for a write followed by a flush
    let expected = [
        (CacheMode::Writeback, 1, 0),
        (CacheMode::Writethrough, 0, 0),
        (CacheMode::None, 1, 0),
        (CacheMode::DirectSync, 0, 0),
        (CacheMode::Unsafe, 0, 1),
    ];
    for (mode, fdatasyncs, ignored) in expected {
        let disk = open_raw(&path, mode, false).unwrap();
        let mut data = vmkit_block_backend::AlignedBuffer::new(4096, 4096);
        let bufs = [vmkit_block_backend::IoBuf::from_mut_slice(
            data.as_mut_slice(),
        )];
        disk.write_vectored(0, &bufs).unwrap();
        disk.flush().unwrap();
        let stats = disk.stats();
        assert_eq!(
            (stats.fdatasyncs, stats.ignored_flushes),
            (fdatasyncs, ignored),
            "{mode}"
        );
    }
}

#[test]
fn flushes_with_nothing_written_since_the_last_are_skipped() {
    let dir = scratch_dir();
    for engine in ENGINES {
        let path = patterned_image(&dir, &format!("clean-{engine}.img"), 1 << 20);
        let mut disk = open(&path, &OpenOptions::new().engine(engine)).unwrap();
        run_one(disk.as_mut(), Request::Flush).unwrap();
        write(disk.as_mut(), 0, &pattern(0, 4096, 1));
        run_one(disk.as_mut(), Request::Flush).unwrap();
        run_one(disk.as_mut(), Request::Flush).unwrap();
        let stats = disk.sync_disk().stats();
        assert_eq!((stats.fdatasyncs, stats.clean_flushes), (1, 2), "{engine}");
        // A write after the sync makes the next flush real again.
        write(disk.as_mut(), 8192, &pattern(8192, 4096, 1));
        run_one(disk.as_mut(), Request::Flush).unwrap();
        assert_eq!(disk.sync_disk().stats().fdatasyncs, 2, "{engine}");
    }
}
