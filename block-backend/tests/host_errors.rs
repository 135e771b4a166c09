//! Errors of the host reach the caller as errors: a full filesystem, and a disk that fails
//! on purpose underneath the sync engine.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use vmkit_block_backend::{
    open, open_sync, AsyncDisk, CacheMode, DiskInfo, Error, IoBuf, OpenOptions, Request, SyncDisk,
    ThreadPoolEngine,
};

/// A 1 MiB tmpfs, unmounted on drop.
struct SmallFilesystem {
    dir: vmm_sys_util::tempdir::TempDir,
}

impl SmallFilesystem {
    fn mount() -> Option<Self> {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmkit-full").ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.as_path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        if !status.success() {
            return None;
        }
        Some(SmallFilesystem { dir })
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.as_path())
            .status();
    }
}

#[test]
fn a_full_filesystem_fails_writes_with_enospc() {
    let Some(fs) = SmallFilesystem::mount() else {
        eprintln!("SKIPPED: cannot mount a small tmpfs here (needs root); the fault-injection test still covers error propagation");
        return;
    };
    // A sparse 8 MiB image on a 1 MiB filesystem: writes fail once the space is gone.
    let path = fs.dir.as_path().join("sparse.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    // tmpfs has no O_DIRECT on older kernels; the page-cache modes cover the engines.
    for engine in ENGINES {
        let mut disk = open(
            &path,
            &OpenOptions::new()
                .cache(CacheMode::Writeback)
                .engine(engine),
        )
        .unwrap();
        let mut data = vec![0x11u8; 1 << 20];
        let mut failure = None;
        for i in 0..8u64 {
            let bufs = [IoBuf::from_mut_slice(&mut data)];
            match run_one(
                disk.as_mut(),
                Request::Write {
                    offset: i << 20,
                    bufs: &bufs,
                },
            ) {
                Ok(_) => continue,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let err = failure.expect("8 MiB of writes fit in a 1 MiB filesystem");
        assert_eq!(err.errno(), libc::ENOSPC, "{engine}: {err}");
        // The disk still works for what fits.
        assert_eq!(read(disk.as_mut(), 0, 4096).len(), 4096);
        drop(disk);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
    }
}

/// A disk whose reads and writes fail with EIO while `failing` is set.
struct FailingDisk {
    inner: Arc<dyn SyncDisk>,
    failing: AtomicBool,
}

impl FailingDisk {
    fn check(&self) -> vmkit_block_backend::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(())
    }
}

impl SyncDisk for FailingDisk {
    fn info(&self) -> DiskInfo {
        self.inner.info()
    }
    fn cache_mode(&self) -> CacheMode {
        self.inner.cache_mode()
    }
    fn write_cache(&self) -> bool {
        self.inner.write_cache()
    }
    fn set_write_cache(&self, enabled: bool) -> vmkit_block_backend::Result<()> {
        self.inner.set_write_cache(enabled)
    }
    fn read_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> vmkit_block_backend::Result<usize> {
        self.check()?;
        self.inner.read_vectored(offset, bufs)
    }
    fn write_vectored(
        &self,
        offset: u64,
        bufs: &[IoBuf<'_>],
    ) -> vmkit_block_backend::Result<usize> {
        self.check()?;
        self.inner.write_vectored(offset, bufs)
    }
    fn flush(&self) -> vmkit_block_backend::Result<()> {
        self.check()?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> vmkit_block_backend::Result<()> {
        self.check()?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> vmkit_block_backend::Result<()> {
        self.check()?;
        self.inner.write_zeroes(offset, len)
    }
}

#[test]
fn injected_errors_reach_the_caller_per_request() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "faulty.img", 1 << 20);
    let failing = Arc::new(FailingDisk {
        inner: open_sync(&path, &OpenOptions::new().cache(CacheMode::None)).unwrap(),
        failing: AtomicBool::new(true),
    });
    let mut engine = ThreadPoolEngine::new(failing.clone(), 4, 64).unwrap();
    let mut data = vec![0u8; 4096];
    let bufs = [IoBuf::from_mut_slice(&mut data)];
    let requests = [
        (
            1,
            Request::Read {
                offset: 0,
                bufs: &bufs,
            },
        ),
        (2, Request::Flush),
        (
            3,
            Request::WriteZeroes {
                offset: 0,
                len: 512,
            },
        ),
    ];
    for completion in run(&mut engine, &requests) {
        let err = completion.result.unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "token {}", completion.token);
    }
    // Errors are per request: once the host recovers, the same engine works.
    failing.failing.store(false, Ordering::SeqCst);
    assert_eq!(read(&mut engine, 4096, 4096), pattern(4096, 4096, 0));
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn dropping_an_engine_waits_for_requests_in_flight() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "drop.img", 16 << 20);
    for engine in ENGINES {
        let mut disk = open(
            &path,
            &OpenOptions::new().cache(CacheMode::None).engine(engine),
        )
        .unwrap();
        let mut buffers: Vec<vmkit_block_backend::AlignedBuffer> = (0..64)
            .map(|_| vmkit_block_backend::AlignedBuffer::new(65536, 4096))
            .collect();
        let bufs: Vec<[IoBuf; 1]> = buffers
            .iter_mut()
            .map(|b| [IoBuf::from_mut_slice(b.as_mut_slice())])
            .collect();
        for (i, b) in bufs.iter().enumerate() {
            // SAFETY: `buffers` outlives `disk`, whose drop waits for these requests.
            unsafe {
                disk.push(
                    i as u64,
                    Request::Read {
                        offset: i as u64 * 65536,
                        bufs: b,
                    },
                )
            }
            .unwrap();
        }
        disk.submit().unwrap();
        drop(disk);
        // Every request finished before the drop returned: the buffers hold the data.
        for (i, buffer) in buffers.iter().enumerate() {
            assert_eq!(
                buffer.as_slice(),
                &pattern(i as u64 * 65536, 65536, 0)[..],
                "{engine}"
            );
        }
    }
}
