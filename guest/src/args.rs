//! The guest's arguments: space-separated words in `BootInfo::args`.

use core::fmt;

/// What the arguments ask for. See README.md for the user-facing description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Args {
    /// `exit=N`: the status to exit with after a successful run.
    pub exit: u32,
    /// `print=N`: how many '.' bytes vCPU 0 prints after the greeting.
    pub print: u64,
    /// `compute=N`: how many times to run the compute workload.
    pub compute: u64,
    /// `touch=K`: how many MiB of free memory to write one byte per page into.
    pub touch_mib: u64,
    /// `spin`: every vCPU increments its progress counter forever instead of exiting.
    pub spin: bool,
    /// `crashload`: run the crash test's write-and-flush workload on disk 0 until killed.
    pub crashload: bool,
    /// `iobench=randread|randwrite` and its parameters: run the I/O benchmark instead of the
    /// disk checks.
    pub iobench: Option<IoBench>,
}

/// The I/O benchmark's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOp {
    /// `iobench=randread`: reads only; the disk is never written.
    RandRead,
    /// `iobench=randwrite`: overwrites random blocks of a writable disk.
    RandWrite,
}

impl BenchOp {
    pub fn name(self) -> &'static str {
        match self {
            BenchOp::RandRead => "randread",
            BenchOp::RandWrite => "randwrite",
        }
    }
}

/// When the benchmark stops issuing requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchLimit {
    /// `seconds=S`: for `S` seconds (measured with the calibrated TSC).
    Seconds(u64),
    /// `count=N`: after `N` requests.
    Count(u64),
}

/// `iobench=OP depth=N seconds=S|count=N bs=B disk=I`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoBench {
    pub op: BenchOp,
    /// Requests kept in flight, 1 to [`MAX_BENCH_DEPTH`].
    pub depth: u16,
    pub limit: BenchLimit,
    /// `batch=N`: completions to wait for before refilling (1 to `depth`, default 1: refill
    /// whatever has completed).
    pub batch: u16,
    /// Bytes per request: a multiple of 512 from 512 to [`MAX_BENCH_BS`].
    pub bs: u32,
    /// Which virtio-blk disk (index among the virtio-blk devices).
    pub disk: u32,
}

/// The deepest queue `depth=` allows.
pub const MAX_BENCH_DEPTH: u64 = 64;
/// The largest request `bs=` allows.
pub const MAX_BENCH_BS: u64 = 64 * 1024;
/// `seconds=` at most (an hour).
pub const MAX_BENCH_SECONDS: u64 = 3600;

impl Default for Args {
    fn default() -> Self {
        Args {
            exit: crate::exit::status::SUCCESS,
            print: 0,
            compute: 1,
            touch_mib: 0,
            spin: false,
            crashload: false,
            iobench: None,
        }
    }
}

/// Why the arguments were rejected; the word is the offending argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error<'a> {
    /// A word that is no known argument.
    Unknown(&'a [u8]),
    /// A known argument with a missing or malformed value (numbers are decimal and must fit the
    /// argument's type; `spin` takes none).
    BadValue(&'a [u8]),
    /// `batch=` above `depth=`.
    BadBatch,
}

impl fmt::Display for Error<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unknown(word) => write!(f, "unknown argument '{}'", Escaped(word)),
            Error::BadValue(word) => write!(f, "invalid value in argument '{}'", Escaped(word)),
            Error::BadBatch => write!(f, "batch= must not exceed depth="),
        }
    }
}

/// Parses the argument string (without its NUL). Later words override earlier ones.
pub fn parse(args: &[u8]) -> Result<Args, Error<'_>> {
    let mut parsed = Args::default();
    let mut bench_op = None;
    let mut bench = IoBench {
        op: BenchOp::RandRead,
        depth: 1,
        batch: 1,
        limit: BenchLimit::Seconds(5),
        bs: 4096,
        disk: 0,
    };
    for word in args
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
    {
        let (key, value) = match word.iter().position(|&b| b == b'=') {
            Some(i) => (&word[..i], Some(&word[i + 1..])),
            None => (word, None),
        };
        let number = || value.and_then(parse_decimal).ok_or(Error::BadValue(word));
        match key {
            b"exit" => parsed.exit = u32::try_from(number()?).map_err(|_| Error::BadValue(word))?,
            b"print" => parsed.print = number()?,
            b"compute" => parsed.compute = number()?,
            b"touch" => parsed.touch_mib = number()?,
            b"spin" if value.is_none() => parsed.spin = true,
            b"spin" => return Err(Error::BadValue(word)),
            b"crashload" if value.is_none() => parsed.crashload = true,
            b"crashload" => return Err(Error::BadValue(word)),
            b"iobench" => {
                bench_op = Some(match value {
                    Some(b"randread") => BenchOp::RandRead,
                    Some(b"randwrite") => BenchOp::RandWrite,
                    _ => return Err(Error::BadValue(word)),
                })
            }
            b"depth" => {
                bench.depth = match number()? {
                    n @ 1..=MAX_BENCH_DEPTH => n as u16,
                    _ => return Err(Error::BadValue(word)),
                }
            }
            b"batch" => {
                bench.batch = match number()? {
                    n @ 1..=MAX_BENCH_DEPTH => n as u16,
                    _ => return Err(Error::BadValue(word)),
                }
            }
            b"seconds" => {
                bench.limit = match number()? {
                    n @ 1..=MAX_BENCH_SECONDS => BenchLimit::Seconds(n),
                    _ => return Err(Error::BadValue(word)),
                }
            }
            b"count" => {
                bench.limit = match number()? {
                    0 => return Err(Error::BadValue(word)),
                    n => BenchLimit::Count(n),
                }
            }
            b"bs" => {
                bench.bs = match number()? {
                    n @ 512..=MAX_BENCH_BS if n % 512 == 0 => n as u32,
                    _ => return Err(Error::BadValue(word)),
                }
            }
            b"disk" => bench.disk = u32::try_from(number()?).map_err(|_| Error::BadValue(word))?,
            _ if disk_index(key).is_some() => {
                // Validated here, looked up by `disk_serial`.
                if value.is_none_or(|id| id.len() > MAX_SERIAL) {
                    return Err(Error::BadValue(word));
                }
            }
            _ => return Err(Error::Unknown(word)),
        }
    }
    if bench.batch > bench.depth {
        return Err(Error::BadBatch);
    }
    parsed.iobench = bench_op.map(|op| IoBench { op, ..bench });
    Ok(parsed)
}

/// Bytes of a virtio-blk ID (GET_ID) at most.
pub const MAX_SERIAL: usize = 20;

/// `N` of a `serialN` key (a disk index, decimal).
fn disk_index(key: &[u8]) -> Option<u64> {
    key.strip_prefix(b"serial").and_then(parse_decimal)
}

/// The ID `serialN=ID` expects from virtio-blk disk `disk` (the last such word wins), or
/// `None` if no word names it. Call after [`parse`] accepted `args`.
pub fn disk_serial(args: &[u8], disk: u32) -> Option<&[u8]> {
    args.split(|b| b.is_ascii_whitespace())
        .rev()
        .find_map(|word| {
            let i = word.iter().position(|&b| b == b'=')?;
            (disk_index(&word[..i]) == Some(u64::from(disk))).then(|| &word[i + 1..])
        })
}

/// Parses a non-empty decimal number that fits in a `u64`.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
}

/// Displays bytes from the VMM as text, escaping anything that is not printable ASCII, so a
/// bad argument cannot put control bytes on the console.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if b == b' ' || b.is_ascii_graphic() {
                fmt::Write::write_char(f, char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}
