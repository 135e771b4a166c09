//! Helpers shared by the block-backend integration tests.
#![allow(dead_code)]

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmkit_block_backend::{
    AsyncDisk, CacheMode, Completion, EngineKind, IoBuf, RawDisk, RawOptions, Request,
};
use vmm_sys_util::tempdir::TempDir;

/// Every engine.
pub const ENGINES: [EngineKind; 2] = [EngineKind::Sync, EngineKind::IoUring];

/// A scratch directory on a filesystem with O_DIRECT (not tmpfs): next to the build output.
pub fn scratch_dir() -> TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).unwrap();
    TempDir::new_in(base).unwrap()
}

/// A file of `size` bytes of a position-dependent pattern.
pub fn patterned_image(dir: &TempDir, name: &str, size: usize) -> PathBuf {
    let path = dir.as_path().join(name);
    std::fs::write(&path, pattern(0, size, 0)).unwrap();
    path
}

/// Bytes that depend on their offset and a seed, so misplaced data shows.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let at = offset + i;
            ((at / 512) as u8).wrapping_mul(31) ^ (at as u8) ^ seed
        })
        .collect()
}

/// Runs requests on an async disk and waits for all of them; returns the completions
/// sorted by token.
pub fn run(disk: &mut dyn AsyncDisk, requests: &[(u64, Request<'_>)]) -> Vec<Completion> {
    for (token, request) in requests {
        // SAFETY: the buffers borrowed by the requests outlive this function, which waits
        // for every completion.
        unsafe { disk.push(*token, *request) }.unwrap();
    }
    disk.submit().unwrap();
    let mut completions = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while completions.len() < requests.len() {
        if disk.reap(&mut completions) > 0 {
            continue;
        }
        assert!(
            Instant::now() < deadline,
            "requests did not complete in 30 s"
        );
        wait_readable(disk.eventfd().as_raw_fd(), 100);
        let _ = disk.eventfd().read();
    }
    completions.sort_by_key(|c| c.token);
    completions
}

/// One request, waited for; panics on a failed push, returns the completion's result.
pub fn run_one(
    disk: &mut dyn AsyncDisk,
    request: Request<'_>,
) -> vmkit_block_backend::Result<usize> {
    run(disk, &[(7, request)]).pop().unwrap().result
}

pub fn wait_readable(fd: i32, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// Reads through the async disk.
pub fn read(disk: &mut dyn AsyncDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let bufs = [IoBuf::from_mut_slice(&mut data)];
    assert_eq!(
        run_one(
            disk,
            Request::Read {
                offset,
                bufs: &bufs
            }
        )
        .unwrap(),
        len
    );
    data
}

/// Writes through the async disk.
pub fn write(disk: &mut dyn AsyncDisk, offset: u64, data: &[u8]) {
    let mut copy = data.to_vec();
    let bufs = [IoBuf::from_mut_slice(&mut copy)];
    assert_eq!(
        run_one(
            disk,
            Request::Write {
                offset,
                bufs: &bufs
            }
        )
        .unwrap(),
        data.len()
    );
}

/// The page-cache state of a file range (Linux 6.5+ `cachestat`), or None where the kernel
/// lacks it.
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
pub struct CacheStat {
    pub nr_cache: u64,
    pub nr_dirty: u64,
    pub nr_writeback: u64,
    pub nr_evicted: u64,
    pub nr_recently_evicted: u64,
}

pub fn cachestat(file: &std::fs::File, offset: u64, len: u64) -> Option<CacheStat> {
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = [offset, len];
    let mut stat = CacheStat::default();
    // SAFETY: cachestat reads a {u64 off, u64 len} range and writes a struct cachestat.
    let ret = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            range.as_ptr(),
            &mut stat as *mut CacheStat,
            0,
        )
    };
    (ret == 0).then_some(stat)
}

/// Pages of the range that are not yet on stable storage.
pub fn unwritten_pages(path: &Path, offset: u64, len: u64) -> Option<u64> {
    let file = std::fs::File::open(path).unwrap();
    cachestat(&file, offset, len).map(|s| s.nr_dirty + s.nr_writeback)
}

/// Whether the tests may use cachestat; says why not otherwise.
pub fn cachestat_available(dir: &TempDir) -> bool {
    let path = dir.as_path().join("cachestat-probe");
    std::fs::write(&path, [1u8; 4096]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    if cachestat(&file, 0, 4096).is_some() {
        return true;
    }
    eprintln!("SKIPPED: this kernel has no cachestat(2) (Linux 6.5+), so page-cache dirtiness cannot be observed");
    false
}

/// The `flags:` field of /proc/self/fdinfo for an fd, as octal-parsed bits.
pub fn fd_flags(fd: i32) -> i32 {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let line = text.lines().find(|l| l.starts_with("flags:")).unwrap();
    i32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Cache modes and engines, every combination.
pub fn every_mode_and_engine() -> impl Iterator<Item = (CacheMode, EngineKind)> {
    CacheMode::ALL
        .into_iter()
        .flat_map(|mode| ENGINES.into_iter().map(move |engine| (mode, engine)))
}

/// `O_DIRECT` on x86-64.
pub const O_DIRECT: i32 = 0o40000;
/// `O_DSYNC` on x86-64.
pub const O_DSYNC: i32 = 0o10000;
/// Open flags that decide caching and access; the rest (O_LARGEFILE, O_CLOEXEC) are
/// housekeeping.
pub const CACHE_FLAGS: i32 = O_DIRECT | O_DSYNC | libc::O_SYNC | libc::O_ACCMODE;

/// Opens a raw image with a cache mode, locking on.
pub fn open_raw(
    path: &Path,
    cache: CacheMode,
    read_only: bool,
) -> vmkit_block_backend::Result<RawDisk> {
    RawDisk::open(
        path,
        RawOptions {
            cache,
            read_only,
            ..RawOptions::default()
        },
    )
}
