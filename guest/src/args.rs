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
}

impl Default for Args {
    fn default() -> Self {
        Args {
            exit: crate::exit::status::SUCCESS,
            print: 0,
            compute: 1,
            touch_mib: 0,
            spin: false,
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
}

impl fmt::Display for Error<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unknown(word) => write!(f, "unknown argument '{}'", Escaped(word)),
            Error::BadValue(word) => write!(f, "invalid value in argument '{}'", Escaped(word)),
        }
    }
}

/// Parses the argument string (without its NUL). Later words override earlier ones.
pub fn parse(args: &[u8]) -> Result<Args, Error<'_>> {
    let mut parsed = Args::default();
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
            _ if disk_index(key).is_some() => {
                // Validated here, looked up by `disk_serial`.
                if value.is_none_or(|id| id.len() > MAX_SERIAL) {
                    return Err(Error::BadValue(word));
                }
            }
            _ => return Err(Error::Unknown(word)),
        }
    }
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
