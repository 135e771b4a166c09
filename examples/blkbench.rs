//! `qemu-img bench` on vmkit's block backend: the same flags, request sequence and output, so
//! that the two can be compared run for run (`scripts/blkbench-compare.sh` does that).
//!
//! `cargo run --release --example blkbench -- [flags] FILE`; `blkbench --help` lists the
//! flags.
//!
//! Like `qemu-img bench`, it issues COUNT requests of SIZE bytes, DEPTH of them in flight,
//! the first at OFFSET and each next one STEP bytes further, and times the run from the
//! first request to the last completion. Each request in flight has its own aligned buffer,
//! allocated before the clock starts.

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vmkit_block_backend::{
    open, AlignedBuffer, AsyncDisk, CacheMode, Completion, EngineKind, Error, Format, IoBuf,
    OpenOptions, Request,
};
use vmm_sys_util::eventfd::EventFd;

const USAGE: &str = "\
usage: blkbench [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-t CACHE]
                [-i ENGINE] [-f FORMAT] [-w [--pattern N] [--flush-interval N [--no-drain]]]
                [--threads N] [-U] [-q | --json] FILE

Runs qemu-img bench's benchmark on vmkit's block backend.

  -c, --count COUNT           requests to issue (default 75000)
  -d, --depth DEPTH           requests in flight at once (default 64)
  -s, --buffer-size SIZE      bytes per request, K/M/G suffixes allowed (default 4096)
  -S, --step-size STEP        offset increment per request (default SIZE)
  -o, --offset OFFSET         offset of the first request (default 0)
  -t, --cache CACHE           writeback, writethrough, none, directsync, unsafe
                              (default writeback)
  -i, --aio ENGINE            threads (or sync), io_uring (default threads)
  -f, --format FORMAT         raw, qcow2 (default raw)
  -w, --write                 write instead of read
      --pattern N             byte written by write tests (default 0xa5)
      --flush-interval N      write tests: flush whenever the requests still to issue
                              are a multiple of N, after draining the queue
      --no-drain              flush without draining the queue first
      --threads N             worker threads of the threads engine (vmkit only)
  -U, --force-share           take no image locks
  -q, --quiet                 print only the result line
      --json                  print the result as one JSON object
  -h, --help                  print this help
";

/// QEMU's limit for counts, depths and sizes (an `int`).
const QEMU_MAX: u64 = i32::MAX as u64;

/// Memory the request buffers may take at most, so a typo in -d or -s is an error rather
/// than an allocation failure.
const MAX_BUFFER_MEMORY: u64 = 4 << 30;

/// Stop waiting when nothing completes for this long: a hung engine should fail the run,
/// not the script that waits for it.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Tokens of flushes; data requests use their buffer's index.
const DRAIN_FLUSH: u64 = u64::MAX;
const NODRAIN_FLUSH: u64 = u64::MAX - 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Text,
    Quiet,
    Json,
}

struct Config {
    path: PathBuf,
    count: u64,
    depth: usize,
    size: usize,
    step: u64,
    offset: u64,
    cache: CacheMode,
    engine: EngineKind,
    format: Format,
    write: bool,
    pattern: u8,
    /// 0: never flush.
    flush_interval: u64,
    drain: bool,
    threads: Option<usize>,
    locking: bool,
    output: Output,
}

enum Parsed {
    Run(Config),
    Help,
}

/// The options; `takes_value` tells getopt-style parsing whether the next word belongs to it.
#[derive(Clone, Copy)]
enum Opt {
    Count,
    Depth,
    Size,
    Step,
    Offset,
    Cache,
    Aio,
    Format,
    Pattern,
    FlushInterval,
    Threads,
    Write,
    NoDrain,
    Native,
    ForceShare,
    Quiet,
    Json,
    ImageOpts,
    Help,
}

impl Opt {
    fn short(c: char) -> Option<Opt> {
        Some(match c {
            'c' => Opt::Count,
            'd' => Opt::Depth,
            's' => Opt::Size,
            'S' => Opt::Step,
            'o' => Opt::Offset,
            't' => Opt::Cache,
            'i' => Opt::Aio,
            'f' => Opt::Format,
            'w' => Opt::Write,
            'n' => Opt::Native,
            'U' => Opt::ForceShare,
            'q' => Opt::Quiet,
            'h' => Opt::Help,
            _ => return None,
        })
    }

    fn long(name: &str) -> Option<Opt> {
        Some(match name {
            "count" => Opt::Count,
            "depth" => Opt::Depth,
            "buffer-size" => Opt::Size,
            "step-size" => Opt::Step,
            "offset" => Opt::Offset,
            "cache" => Opt::Cache,
            "aio" => Opt::Aio,
            "format" => Opt::Format,
            "pattern" => Opt::Pattern,
            "flush-interval" => Opt::FlushInterval,
            "threads" => Opt::Threads,
            "write" => Opt::Write,
            "no-drain" => Opt::NoDrain,
            "native" => Opt::Native,
            "force-share" => Opt::ForceShare,
            "quiet" => Opt::Quiet,
            "json" => Opt::Json,
            "image-opts" => Opt::ImageOpts,
            "help" => Opt::Help,
            _ => return None,
        })
    }

    fn takes_value(self) -> bool {
        matches!(
            self,
            Opt::Count
                | Opt::Depth
                | Opt::Size
                | Opt::Step
                | Opt::Offset
                | Opt::Cache
                | Opt::Aio
                | Opt::Format
                | Opt::Pattern
                | Opt::FlushInterval
                | Opt::Threads
        )
    }
}

/// A plain decimal integer in `min..=max`.
fn parse_int(value: &str, what: &str, min: u64, max: u64) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid {what} {value:?}: must be between {min} and {max}"
        )),
    }
}

/// A byte count with an optional binary suffix (b, k, m, g, t; either case), as QEMU's
/// `-s`, `-S` and `-o` take it.
fn parse_bytes(value: &str, what: &str, max: u64) -> Result<u64, String> {
    let error = || {
        format!(
            "invalid {what} {value:?}: expected a number of bytes up to {max}, \
             with an optional K, M, G or T suffix"
        )
    };
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(digits_end);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(error()),
    };
    let n: u64 = digits.parse().map_err(|_| error())?;
    n.checked_mul(1 << shift)
        .filter(|&bytes| bytes <= max)
        .ok_or_else(error)
}

/// A byte value in C's `strtoul(.., 0)` notation (decimal, `0x` hex, `0` octal), as
/// qemu-img's `--pattern` takes it.
fn parse_pattern(value: &str) -> Result<u8, String> {
    let parsed = if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16)
    } else if value.len() > 1 && value.starts_with('0') {
        u64::from_str_radix(&value[1..], 8)
    } else {
        value.parse()
    };
    match parsed {
        Ok(n) if n <= 0xff => Ok(n as u8),
        _ => Err(format!(
            "invalid pattern {value:?}: must be a byte value between 0 and 255 (0xff)"
        )),
    }
}

fn parse_engine(value: &str) -> Result<EngineKind, String> {
    if value == "native" {
        return Err(
            "-i native (Linux AIO) is not supported by vmkit's block backend; \
                    use -i io_uring or -i threads"
                .to_string(),
        );
    }
    value.parse().map_err(|e: Error| e.to_string())
}

fn parse_args(args: &[String]) -> Result<Parsed, String> {
    let mut config = Config {
        path: PathBuf::new(),
        count: 75_000,
        depth: 64,
        size: 4096,
        step: 0,
        offset: 0,
        cache: CacheMode::Writeback,
        engine: EngineKind::Sync,
        format: Format::Raw,
        write: false,
        pattern: 0xa5,
        flush_interval: 0,
        drain: true,
        threads: None,
        locking: true,
        output: Output::Text,
    };
    let mut files = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        // Each word yields (option, value given in the same word) pairs; short boolean
        // options may be grouped as getopt allows ("-wq").
        let mut found: Vec<(Opt, Option<String>)> = Vec::new();
        if arg == "--" {
            files.extend(args.by_ref().cloned());
            break;
        } else if let Some(long) = arg.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (long, None),
            };
            let opt = Opt::long(name).ok_or_else(|| format!("unknown option --{name}"))?;
            if value.is_some() && !opt.takes_value() {
                return Err(format!("option --{name} takes no value"));
            }
            found.push((opt, value));
        } else if let Some(shorts) = arg.strip_prefix('-').filter(|s| !s.is_empty()) {
            for (i, c) in shorts.char_indices() {
                let opt = Opt::short(c).ok_or_else(|| format!("unknown option -{c}"))?;
                if opt.takes_value() {
                    let rest = &shorts[i + c.len_utf8()..];
                    found.push((opt, (!rest.is_empty()).then(|| rest.to_string())));
                    break;
                }
                found.push((opt, None));
            }
        } else {
            files.push(arg.clone());
            continue;
        }

        for (opt, value) in found {
            let value = match (opt.takes_value(), value) {
                (false, _) => String::new(),
                (true, Some(value)) => value,
                (true, None) => args
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("option {arg} needs a value"))?,
            };
            match opt {
                Opt::Count => config.count = parse_int(&value, "request count", 1, QEMU_MAX)?,
                Opt::Depth => {
                    config.depth = parse_int(&value, "queue depth", 1, QEMU_MAX)? as usize
                }
                Opt::Size => {
                    config.size = parse_bytes(&value, "buffer size", QEMU_MAX)? as usize;
                    if config.size == 0 {
                        return Err("invalid buffer size 0: must be at least 1 byte".into());
                    }
                }
                Opt::Step => config.step = parse_bytes(&value, "step size", QEMU_MAX)?,
                Opt::Offset => config.offset = parse_bytes(&value, "offset", i64::MAX as u64)?,
                Opt::Cache => config.cache = value.parse().map_err(|e: Error| e.to_string())?,
                Opt::Aio => config.engine = parse_engine(&value)?,
                Opt::Format => config.format = value.parse().map_err(|e: Error| e.to_string())?,
                Opt::Pattern => config.pattern = parse_pattern(&value)?,
                Opt::FlushInterval => {
                    config.flush_interval = parse_int(&value, "flush interval", 1, QEMU_MAX)?
                }
                Opt::Threads => {
                    config.threads = Some(parse_int(&value, "thread count", 1, 4096)? as usize)
                }
                Opt::Write => config.write = true,
                Opt::NoDrain => config.drain = false,
                Opt::Native => {
                    return Err(
                        "-n (native AIO) is not supported by vmkit's block backend; \
                                use -i io_uring"
                            .into(),
                    )
                }
                Opt::ForceShare => config.locking = false,
                Opt::Quiet => config.output = Output::Quiet,
                Opt::Json => config.output = Output::Json,
                Opt::ImageOpts => {
                    return Err("--image-opts is not supported: give a file name".into())
                }
                Opt::Help => return Ok(Parsed::Help),
            }
        }
    }

    // qemu-img's own cross-checks.
    if config.flush_interval > 0 && !config.write {
        return Err("--flush-interval is only available in write tests".into());
    }
    if config.flush_interval > 0 && config.flush_interval < config.depth as u64 {
        return Err("flush interval can't be smaller than depth".into());
    }
    if config.step == 0 {
        config.step = config.size as u64;
    }
    config.path = match <[String; 1]>::try_from(files) {
        Ok([file]) => PathBuf::from(file),
        Err(files) if files.is_empty() => return Err("expecting an image file name".into()),
        Err(_) => return Err("expecting exactly one image file name".into()),
    };
    Ok(Parsed::Run(config))
}

/// What a run measured.
struct Report {
    seconds: f64,
    engine: EngineKind,
    /// Why the engine asked for did not run, if it did not.
    fallback: Option<String>,
    stats: vmkit_block_backend::DiskStats,
}

/// The benchmark's state, kept as qemu-img's `BenchData` so that requests and flushes are
/// issued in the same order.
struct Bench<'c> {
    config: &'c Config,
    /// The range offsets wrap in: the size in whole sectors, as QEMU counts it.
    image_size: u64,
    /// Data requests not yet completed (QEMU's `n`).
    not_done: u64,
    /// Data requests in flight.
    in_flight: u64,
    /// A flush is in flight after a drained queue; nothing else is.
    in_flush: bool,
    /// Flushes issued without draining and not yet completed.
    nodrain_flushes: usize,
    /// Flushes without draining waiting for room in the engine.
    deferred_flushes: usize,
    /// How many flushes may be in flight next to a full queue of data requests.
    flush_room: usize,
    offset: u64,
    /// Start addresses of the per-request buffers, each `size` bytes long.
    buffers: Vec<*mut u8>,
    free_buffers: Vec<usize>,
    /// Offset of the request using each buffer, for error messages.
    buffer_offsets: Vec<u64>,
}

impl Bench<'_> {
    fn next_offset(&self, offset: u64) -> u64 {
        // qemu-img 10.0 wraps with `(offset + step) % image_size` and fails with EIO when a
        // request then crosses the end; later QEMU wraps modulo `image_size - size`. We keep
        // 10.0's sequence wherever it works and wrap to 0 where it would fail.
        let next = (offset + self.config.step) % self.image_size;
        if next + self.config.size as u64 > self.image_size {
            0
        } else {
            next
        }
    }

    /// Issues data requests until DEPTH are in flight or all are issued (QEMU's loop at the
    /// end of `bench_cb`).
    fn fill(&mut self, disk: &mut dyn AsyncDisk) -> Result<(), String> {
        while self.not_done > self.in_flight && self.in_flight < self.config.depth as u64 {
            let Some(index) = self.free_buffers.pop() else {
                return Err("internal error: no free buffer for a request".into());
            };
            let offset = self.offset;
            // SAFETY: the buffer is `size` bytes owned by `run`, which drops the disk
            // (waiting for every request) before the buffers, and it is not accessed
            // through any reference while a request uses it.
            let bufs = [unsafe { IoBuf::from_raw_parts(self.buffers[index], self.config.size) }];
            let request = if self.config.write {
                Request::Write {
                    offset,
                    bufs: &bufs,
                }
            } else {
                Request::Read {
                    offset,
                    bufs: &bufs,
                }
            };
            // SAFETY: as above: the memory stays valid and untouched until the completion
            // of token `index` is reaped or the disk is dropped.
            unsafe { disk.push(index as u64, request) }
                .map_err(|e| format!("cannot issue a request at offset {offset}: {e}"))?;
            self.buffer_offsets[index] = offset;
            self.in_flight += 1;
            self.offset = self.next_offset(offset);
        }
        Ok(())
    }

    fn push_flush(&mut self, disk: &mut dyn AsyncDisk, token: u64) -> Result<(), String> {
        // SAFETY: a flush carries no buffers.
        unsafe { disk.push(token, Request::Flush) }
            .map_err(|e| format!("cannot issue a flush: {e}"))
    }

    /// Issues deferred flushes while the engine has room beside the data requests.
    fn push_deferred_flushes(&mut self, disk: &mut dyn AsyncDisk) -> Result<(), String> {
        while self.deferred_flushes > 0 && self.nodrain_flushes < self.flush_room {
            self.push_flush(disk, NODRAIN_FLUSH)?;
            self.deferred_flushes -= 1;
            self.nodrain_flushes += 1;
        }
        Ok(())
    }

    /// Handles one completion as QEMU's `bench_cb` does.
    fn complete(&mut self, disk: &mut dyn AsyncDisk, completion: Completion) -> Result<(), String> {
        let token = completion.token;
        if let Err(e) = completion.result {
            return Err(match token {
                DRAIN_FLUSH | NODRAIN_FLUSH => format!("flush failed: {e}"),
                index => {
                    let offset = self
                        .buffer_offsets
                        .get(index as usize)
                        .copied()
                        .unwrap_or_default();
                    let kind = if self.config.write { "write" } else { "read" };
                    format!("{kind} request at offset {offset} failed: {e}")
                }
            });
        }
        match token {
            NODRAIN_FLUSH => {
                self.nodrain_flushes -= 1;
                return self.push_deferred_flushes(disk);
            }
            DRAIN_FLUSH => self.in_flush = false,
            index => {
                self.free_buffers.push(index as usize);
                // Requests not issued yet, counted before this completion as QEMU does.
                let remaining = self.not_done - self.in_flight;
                self.not_done -= 1;
                self.in_flight -= 1;
                let interval = self.config.flush_interval;
                if interval > 0 && remaining % interval == 0 {
                    if self.config.drain {
                        // Let the queue drain; the last completion issues the flush, and
                        // the flush's completion issues the next requests.
                        if self.in_flight == 0 {
                            self.in_flush = true;
                            self.push_flush(disk, DRAIN_FLUSH)?;
                        }
                        return Ok(());
                    }
                    self.deferred_flushes += 1;
                    self.push_deferred_flushes(disk)?;
                }
            }
        }
        self.fill(disk)
    }

    fn idle(&self) -> bool {
        self.not_done == 0
            && !self.in_flush
            && self.nodrain_flushes == 0
            && self.deferred_flushes == 0
    }
}

/// Waits until the eventfd is readable or a second passes, then clears it. Returns whether
/// it was readable.
fn wait_for_completions(eventfd: &EventFd) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: eventfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pollfd` is one valid pollfd that outlives the call.
    let ret = unsafe { libc::poll(&mut pollfd, 1, 1000) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::Interrupted => Ok(false),
            _ => Err(err),
        };
    }
    if ret == 0 {
        return Ok(false);
    }
    // Clear it before reaping, so a completion that arrives after the reap signals again.
    // WouldBlock only means nothing was left to clear.
    match eventfd.read() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) => Err(e),
    }
}

fn open_error(path: &Path, cache: CacheMode, error: Error) -> String {
    let mut message = error.to_string();
    if cache.direct() && error.errno() == libc::EINVAL {
        message.push_str(" (does this filesystem support O_DIRECT?)");
    }
    if let Error::Locked { .. } = error {
        message.push_str("; -U skips locking");
    }
    format!("{}: {message}", path.display())
}

fn run(config: &Config) -> Result<Report, String> {
    // Declared before the disk so they are dropped after it: dropping the disk waits for
    // the requests in flight, which still use these buffers.
    let mut buffers: Vec<AlignedBuffer> = Vec::new();

    // Room for a flush or so beside DEPTH data requests (flushes without draining).
    let max_in_flight = config.depth.saturating_mul(2).max(config.depth + 1);
    let mut options = OpenOptions::new()
        .format(config.format)
        .cache(config.cache)
        .engine(config.engine)
        .read_only(!config.write)
        .locking(config.locking)
        .max_in_flight(max_in_flight);
    if let Some(threads) = config.threads {
        options = options.threads(threads);
    }
    let mut disk =
        open(&config.path, &options).map_err(|e| open_error(&config.path, config.cache, e))?;

    let info = disk.info();
    let image_size = info.addressable_size();
    let size = config.size as u64;
    if image_size < size {
        return Err(format!(
            "{}: the image ({image_size} bytes) is smaller than one request ({size} bytes)",
            config.path.display()
        ));
    }
    if config.offset > image_size - size {
        return Err(format!(
            "offset {} plus the request size {size} is past the end of the image \
             ({image_size} bytes)",
            config.offset
        ));
    }
    let needed = config.depth + usize::from(config.flush_interval > 0);
    if disk.max_in_flight() < needed {
        return Err(format!(
            "the {} engine keeps at most {} requests in flight; this run needs {needed} \
             (lower -d)",
            disk.engine(),
            disk.max_in_flight()
        ));
    }
    let align = (info.memory_alignment.max(4096) as usize).next_power_of_two();
    let per_buffer = config.size.div_ceil(align) * align;
    let memory = (per_buffer as u64).saturating_mul(config.depth as u64);
    if memory > MAX_BUFFER_MEMORY {
        return Err(format!(
            "{} buffers of {} bytes would take {memory} bytes; the limit is {MAX_BUFFER_MEMORY}",
            config.depth, config.size
        ));
    }

    let fallback = (config.engine == EngineKind::IoUring && disk.engine() != EngineKind::IoUring)
        .then(|| match vmkit_block_backend::engine::uring::probe() {
            Err(e) => e.to_string(),
            Ok(()) => "the engine could not be set up".to_string(),
        });

    let fill = if config.write { config.pattern } else { 0 };
    let mut addresses = Vec::with_capacity(config.depth);
    for _ in 0..config.depth {
        let mut buffer = AlignedBuffer::new(config.size, align);
        buffer.as_mut_slice().fill(fill);
        addresses.push(buffer.as_mut_slice().as_mut_ptr());
        buffers.push(buffer);
    }

    let mut bench = Bench {
        config,
        image_size,
        not_done: config.count,
        in_flight: 0,
        in_flush: false,
        nodrain_flushes: 0,
        deferred_flushes: 0,
        flush_room: disk.max_in_flight() - config.depth,
        offset: config.offset,
        buffers: addresses,
        free_buffers: (0..config.depth).rev().collect(),
        buffer_offsets: vec![0; config.depth],
    };

    if config.output == Output::Text {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, \
             step size {})",
            config.count,
            if config.write { "write" } else { "read" },
            config.size,
            config.depth,
            config.offset,
            config.step
        );
        if config.flush_interval > 0 {
            println!("Sending flush every {} requests", config.flush_interval);
        }
    }

    let mut completions: Vec<Completion> = Vec::with_capacity(max_in_flight);
    let start = Instant::now();
    bench.fill(disk.as_mut())?;
    disk.submit().map_err(|e| format!("submit failed: {e}"))?;
    let mut elapsed = None;
    let mut last_progress = Instant::now();
    loop {
        if bench.not_done == 0 && elapsed.is_none() {
            elapsed = Some(start.elapsed());
        }
        // A final flush is waited for, untimed, as qemu-img does when it closes the image.
        if bench.idle() {
            break;
        }
        completions.clear();
        if disk.reap(&mut completions) == 0 {
            if !wait_for_completions(disk.eventfd())
                .map_err(|e| format!("waiting for completions failed: {e}"))?
                && last_progress.elapsed() > STALL_TIMEOUT
            {
                return Err(format!(
                    "no request completed in {} s; {} still in flight",
                    STALL_TIMEOUT.as_secs(),
                    disk.in_flight()
                ));
            }
            continue;
        }
        last_progress = Instant::now();
        for completion in completions.drain(..) {
            bench.complete(disk.as_mut(), completion)?;
        }
        disk.submit().map_err(|e| format!("submit failed: {e}"))?;
    }

    let report = Report {
        seconds: elapsed.unwrap_or_else(|| start.elapsed()).as_secs_f64(),
        engine: disk.engine(),
        fallback,
        stats: disk.sync_disk().stats(),
    };
    // Explicitly first, as the declaration order above also ensures.
    drop(disk);
    drop(buffers);
    Ok(report)
}

fn print_report(config: &Config, report: &Report) {
    let rate = config.count as f64 / report.seconds;
    let mb_per_second = rate * config.size as f64 / 1e6;
    let engine = match &report.fallback {
        Some(reason) => format!("{} (fell back from io_uring: {reason})", report.engine),
        None => report.engine.to_string(),
    };
    match config.output {
        Output::Json => {
            let stats = &report.stats;
            let json = serde_json::json!({
                "file": config.path.display().to_string(),
                "operation": if config.write { "write" } else { "read" },
                "count": config.count,
                "depth": config.depth,
                "size": config.size,
                "step": config.step,
                "offset": config.offset,
                "cache": config.cache.name(),
                "engine_requested": config.engine.name(),
                "engine": report.engine.name(),
                "fallback_reason": report.fallback,
                "seconds": report.seconds,
                "requests_per_second": rate,
                "mb_per_second": mb_per_second,
                "stats": {
                    "fdatasyncs": stats.fdatasyncs,
                    "durable_writes": stats.durable_writes,
                    "bounced_requests": stats.bounced_requests,
                    "nowait_reads": stats.nowait_reads,
                },
            });
            println!("{json}");
        }
        Output::Text | Output::Quiet => {
            if config.output == Output::Text {
                println!("Run completed in {:.3} seconds.", report.seconds);
            }
            println!("requests/s: {rate:.0}  MB/s: {mb_per_second:.1}  engine: {engine}");
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse_args(&args) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("blkbench: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&config) {
        Ok(report) => {
            print_report(&config, &report);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("blkbench: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match parse_args(&args)? {
            Parsed::Run(config) => Ok(config),
            Parsed::Help => Err("help".into()),
        }
    }

    #[test]
    fn flags_parse_like_qemu_img() {
        let config = parse(&[
            "-c",
            "100",
            "-d32",
            "-s",
            "64k",
            "-t",
            "none",
            "-i",
            "io_uring",
            "-wq",
            "--pattern=0x5a",
            "f.img",
        ])
        .unwrap();
        assert_eq!((config.count, config.depth, config.size), (100, 32, 65536));
        assert_eq!(config.step, 65536);
        assert_eq!(config.cache, CacheMode::None);
        assert_eq!(config.engine, EngineKind::IoUring);
        assert!(config.write);
        assert_eq!(config.pattern, 0x5a);
        assert_eq!(config.path, PathBuf::from("f.img"));
        assert_eq!(
            parse(&["-i", "threads", "x"]).unwrap().engine,
            EngineKind::Sync
        );
    }

    #[test]
    fn bad_values_are_errors() {
        for args in [
            &["-d", "0", "f"][..],
            &["-s", "0", "f"],
            &["-c", "0", "f"],
            &["-c", "-5", "f"],
            &["-s", "4X", "f"],
            &["-s", "99999999999999999999T", "f"],
            &["-i", "native", "f"],
            &["-n", "f"],
            &["-t", "direct", "f"],
            &["-f", "vmdk", "f"],
            &["--pattern", "256", "-w", "f"],
            &["--flush-interval", "64", "f"],
            &["-w", "--flush-interval", "8", "f"],
            &["-c"],
            &[],
            &["a", "b"],
            &["--bogus", "f"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn offsets_follow_qemu_and_wrap_before_the_end() {
        let config = parse(&["-s", "4096", "-S", "3072", "f"]).unwrap();
        let bench = Bench {
            config: &config,
            image_size: 20480,
            not_done: 0,
            in_flight: 0,
            in_flush: false,
            nodrain_flushes: 0,
            deferred_flushes: 0,
            flush_room: 0,
            offset: 0,
            buffers: Vec::new(),
            free_buffers: Vec::new(),
            buffer_offsets: Vec::new(),
        };
        let mut offset = 0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(offset);
            offset = bench.next_offset(offset);
        }
        assert_eq!(seen, [0, 3072, 6144, 9216, 12288, 15360, 0, 3072]);
    }
}
