//! A small `qemu-img` on vmkit's block backend: create, info, check, map and convert raw and
//! qcow2 images with qemu-img's flag conventions.
//!
//! `cargo run --release --example disk -- SUBCOMMAND ...`; `disk --help` lists them.
//!
//! Differences from qemu-img, on purpose:
//! - the format is never probed: `-f` defaults to raw, so a qcow2 image needs `-f qcow2`;
//! - `create` and `convert` refuse to overwrite an existing file;
//! - `convert` follows a qcow2 source's backing chain (the image's own backing file name and
//!   format) and writes a flattened image, as qemu-img does by default;
//! - `check` and `map` of a qcow2 image read its metadata straight from the file, through
//!   the library's [`qcow2::check()`] and [`qcow2::map()`]; `map` shows the top image only
//!   (unallocated clusters are `present: false`).
//!
//! Exit codes: 0 success, 1 an I/O or image error, 2 a usage error; `check` exits like
//! `qemu-img check`: 2 corruptions, 3 leaks only, 63 for a format without checks.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vmkit_block_backend::qcow2::{self, MapExtent, Qcow2Error};
use vmkit_block_backend::{open_sync, Backing, Format, IoBuf, OpenOptions, SyncDisk};

const USAGE: &str = "\
usage: disk COMMAND [options]

Commands (qemu-img's flags; the format is never probed, -f defaults to raw):
  create [-f FMT] [-o cluster_size=N] FILE SIZE
                     create an image of SIZE bytes (K, M, G, T, P, E suffixes); refuses
                     to overwrite an existing file
  info [-f FMT] [--output=human|json] FILE
                     virtual size, disk size and qcow2 header fields
  check [-f FMT] [--output=human|json] FILE
                     check a qcow2 image's metadata and refcounts; exits 0 if clean,
                     2 on corruption, 3 on leaked clusters only, 1 on other errors
  map [-f FMT] [--output=human|json] FILE
                     list the image's data, zero and unallocated ranges
  convert [-f FMT] [-O FMT] [-o cluster_size=N] SRC DST
                     copy SRC into a new image DST, skipping zero blocks; a qcow2 SRC's
                     backing chain is followed and flattened into DST

FMT is raw or qcow2. -h, --help prints this help.
";

/// The largest qcow2 cluster.
const MAX_CLUSTER: u64 = 2 << 20;
/// Bytes copied per read in `convert`.
const CONVERT_CHUNK: usize = 1 << 20;

enum Failure {
    /// Bad command line: exit 2.
    Usage(String),
    /// Anything else: exit 1.
    Error(String),
}

type Res<T> = Result<T, Failure>;

fn usage<T>(message: impl Into<String>) -> Res<T> {
    Err(Failure::Usage(message.into()))
}

fn error(message: impl Into<String>) -> Failure {
    Failure::Error(message.into())
}

fn io_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Failure {
    error(format!("{what} {}: {e}", path.display()))
}

/// A failure of the library's qcow2 [`check`](qcow2::check()), [`map`](qcow2::map()) or
/// [`read_header`](qcow2::read_header); `walk` says what could not walk the metadata.
fn qcow2_error(path: &Path, e: Qcow2Error, walk: &str) -> Failure {
    match e {
        Qcow2Error::Io { what, source } => io_error(&format!("cannot {what}"), path, source),
        Qcow2Error::Walk(message) => io_error(walk, path, message),
        e => io_error("not a valid qcow2 image:", path, e),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OutputFormat {
    Human,
    Json,
}

/// The parsed flags of one subcommand.
struct Args {
    format: Option<Format>,
    out_format: Option<Format>,
    options: Vec<String>,
    output: OutputFormat,
    files: Vec<String>,
}

/// getopt-style parsing: `-f FMT`, `-fFMT`, `--output=json`, `--output json`, `--` ends
/// the options. `allowed` names the short options (all take a value) the command takes.
fn parse_args(args: &[String], allowed: &str, output: bool) -> Res<Args> {
    let mut parsed = Args {
        format: None,
        out_format: None,
        options: Vec::new(),
        output: OutputFormat::Human,
        files: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            parsed.files.extend(it.by_ref().cloned());
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            if name != "output" || !output {
                return usage(format!("unknown option --{name}"));
            }
            let value = match value {
                Some(v) => v,
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| Failure::Usage("option --output needs a value".into()))?,
            };
            parsed.output = match value.as_str() {
                "human" => OutputFormat::Human,
                "json" => OutputFormat::Json,
                _ => return usage(format!("--output must be human or json, not {value:?}")),
            };
            continue;
        }
        let Some(shorts) = arg.strip_prefix('-').filter(|s| !s.is_empty()) else {
            parsed.files.push(arg.clone());
            continue;
        };
        let mut chars = shorts.chars();
        let c = chars.next().unwrap_or('-');
        if !allowed.contains(c) {
            return usage(format!("unknown option -{c}"));
        }
        let rest: String = chars.collect();
        let value = if rest.is_empty() {
            it.next()
                .cloned()
                .ok_or_else(|| Failure::Usage(format!("option -{c} needs a value")))?
        } else {
            rest
        };
        match c {
            'f' => parsed.format = Some(parse_format(&value)?),
            'O' => parsed.out_format = Some(parse_format(&value)?),
            'o' => parsed.options.push(value),
            _ => unreachable!("only listed options are accepted"),
        }
    }
    Ok(parsed)
}

fn parse_format(value: &str) -> Res<Format> {
    value
        .parse()
        .map_err(|_| Failure::Usage(format!("unknown format {value:?}: expected raw or qcow2")))
}

/// A size as qemu-img takes it: a number with an optional K, M, G, T, P or E suffix
/// (powers of 1024; a B suffix or none means bytes).
fn parse_size(value: &str, what: &str) -> Res<u64> {
    let bad = || {
        Failure::Usage(format!(
            "invalid {what} {value:?}: expected a number of bytes with an optional \
             K, M, G, T, P or E suffix"
        ))
    };
    let end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(end);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift)
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(bad)
}

/// The cluster size from `-o` options (only `cluster_size` is known); `None` if not given.
fn parse_create_options(options: &[String], format: Format) -> Res<Option<u64>> {
    let mut cluster_size = None;
    for option in options.iter().flat_map(|o| o.split(',')) {
        match option.split_once('=') {
            Some(("cluster_size", value)) => {
                if format != Format::Qcow2 {
                    return usage("cluster_size is an option of the qcow2 format only");
                }
                let cs = parse_size(value, "cluster_size")?;
                if !cs.is_power_of_two() || !(512..=MAX_CLUSTER).contains(&cs) {
                    return usage(format!(
                        "invalid cluster_size {value}: must be a power of two from 512 to 2M"
                    ));
                }
                cluster_size = Some(cs);
            }
            _ => {
                return usage(format!(
                    "unknown creation option {option:?}: only cluster_size=N is supported"
                ))
            }
        }
    }
    Ok(cluster_size)
}

fn one_file(args: &Args, command: &str) -> Res<PathBuf> {
    match args.files.as_slice() {
        [file] => Ok(PathBuf::from(file)),
        [] => usage(format!("{command}: expecting a filename")),
        _ => usage(format!("{command}: expecting exactly one filename")),
    }
}

// ---------------------------------------------------------------------------------------
// create

/// Creates a raw (sparse) or qcow2 image of `size` bytes, rounded up to 512 like qemu-img.
fn create_image(path: &Path, format: Format, size: u64, cluster_size: Option<u64>) -> Res<()> {
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| error("image size too large"))?;
    if path.symlink_metadata().is_ok() {
        return Err(error(format!(
            "{} already exists; refusing to overwrite it (remove it first)",
            path.display()
        )));
    }
    match format {
        Format::Raw => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| io_error("cannot create", path, e))?;
            file.set_len(size)
                .map_err(|e| io_error("cannot set the size of", path, e))?;
        }
        Format::Qcow2 => qcow2::create(path, size, cluster_size.unwrap_or(65536))
            .map_err(|e| io_error("cannot create", path, e))?,
    }
    Ok(())
}

fn cmd_create(args: &[String]) -> Res<ExitCode> {
    let args = parse_args(args, "fo", false)?;
    let format = args.format.unwrap_or_default();
    let cluster_size = parse_create_options(&args.options, format)?;
    let (file, size) = match args.files.as_slice() {
        [file, size] => (PathBuf::from(file), parse_size(size, "image size")?),
        [_] => return usage("create: expecting an image size"),
        [] => return usage("create: expecting a filename and a size"),
        _ => return usage("create: too many arguments"),
    };
    create_image(&file, format, size, cluster_size)?;
    println!(
        "Formatting '{}', fmt={} size={size}",
        file.display(),
        format.name()
    );
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// info

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {unit}")
}

fn disk_size(path: &Path) -> Res<u64> {
    Ok(std::fs::metadata(path)
        .map_err(|e| io_error("cannot stat", path, e))?
        .blocks()
        * 512)
}

fn cmd_info(args: &[String]) -> Res<ExitCode> {
    let args = parse_args(args, "f", true)?;
    let path = one_file(&args, "info")?;
    let format = args.format.unwrap_or_default();
    let actual = disk_size(&path)?;
    let mut json = serde_json::json!({
        "filename": path.display().to_string(),
        "format": format.name(),
        "actual-size": actual,
    });
    let mut lines = vec![
        format!("image: {}", path.display()),
        format!("file format: {}", format.name()),
    ];
    let virtual_size;
    match format {
        Format::Raw => {
            let options = OpenOptions::new().read_only(true).locking(false);
            let disk = open_sync(&path, &options).map_err(|e| error(e.to_string()))?;
            virtual_size = disk.info().size;
        }
        Format::Qcow2 => {
            let h = &qcow2::read_header(&path).map_err(|e| qcow2_error(&path, e, "info"))?;
            virtual_size = h.size;
            json["cluster-size"] = h.cluster_size().into();
            json["dirty-flag"] = (h.incompatible_features & 1 != 0).into();
            let compat = if h.version == 2 { "0.10" } else { "1.1" };
            json["format-specific"] = serde_json::json!({
                "type": "qcow2",
                "data": {
                    "compat": compat,
                    "refcount-bits": 1u64 << h.refcount_order,
                    "extended-l2": h.extended_l2(),
                    "corrupt": h.incompatible_features & 2 != 0,
                },
            });
            if let Some(backing) = &h.backing_file {
                json["backing-filename"] = backing.clone().into();
            }
            if let Some(backing) = &h.backing_format {
                json["backing-filename-format"] = backing.clone().into();
            }
            lines.push(String::new()); // placeholder for the sizes, filled below
            lines.push(format!("cluster_size: {}", h.cluster_size()));
            if let Some(backing) = &h.backing_file {
                lines.push(format!("backing file: {backing}"));
            }
            if let Some(backing) = &h.backing_format {
                lines.push(format!("backing file format: {backing}"));
            }
            if h.nb_snapshots != 0 {
                lines.push(format!("snapshots: {}", h.nb_snapshots));
            }
            lines.push("Format specific information:".into());
            lines.push(format!("    compat: {compat}"));
            lines.push(format!("    refcount bits: {}", 1u64 << h.refcount_order));
            lines.push(format!("    extended l2: {}", h.extended_l2()));
            lines.push(format!("    corrupt: {}", h.incompatible_features & 2 != 0));
        }
    }
    json["virtual-size"] = virtual_size.into();
    let sizes = [
        format!(
            "virtual size: {} ({virtual_size} bytes)",
            human_size(virtual_size)
        ),
        format!("disk size: {}", human_size(actual)),
    ];
    // The sizes go after "file format", as in qemu-img.
    lines.splice(2..2, sizes);
    lines.retain(|l| !l.is_empty());
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        ),
        OutputFormat::Human => println!("{}", lines.join("\n")),
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// check

fn cmd_check(args: &[String]) -> Res<ExitCode> {
    let args = parse_args(args, "f", true)?;
    let path = one_file(&args, "check")?;
    let format = args.format.unwrap_or_default();
    if format != Format::Qcow2 {
        // qemu-img's exit code for a format without checks.
        eprintln!(
            "disk: check: the {} format does not support checks",
            format.name()
        );
        return Ok(ExitCode::from(63));
    }
    let result = qcow2::check(&path).map_err(|e| qcow2_error(&path, e, "check"))?;
    let code = if result.corruptions > 0 {
        2
    } else if result.leaks > 0 {
        3
    } else {
        0
    };
    match args.output {
        OutputFormat::Json => {
            let json = serde_json::json!({
                "filename": path.display().to_string(),
                "format": "qcow2",
                "check-errors": 0,
                "corruptions": result.corruptions,
                "leaks": result.leaks,
                "allocated-clusters": result.allocated_clusters,
                "total-clusters": result.total_clusters,
                "messages": result.messages,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&json).unwrap_or_default()
            );
        }
        OutputFormat::Human => {
            for message in &result.messages {
                println!("{message}");
            }
            if !result.messages.is_empty() {
                println!();
            }
            if result.corruptions > 0 {
                println!(
                    "{} errors were found on the image.\nData may be corrupted, or further \
                     writes to the image may corrupt it.",
                    result.corruptions
                );
            }
            if result.leaks > 0 {
                println!(
                    "{} leaked clusters were found on the image.\nThis means waste of disk \
                     space, but no harm to data.",
                    result.leaks
                );
            }
            if code == 0 {
                println!("No errors were found on the image.");
            }
            if result.total_clusters > 0 {
                println!(
                    "{}/{} = {:.2}% allocated",
                    result.allocated_clusters,
                    result.total_clusters,
                    result.allocated_clusters as f64 * 100.0 / result.total_clusters as f64
                );
            }
        }
    }
    Ok(ExitCode::from(code))
}

// ---------------------------------------------------------------------------------------
// map

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

fn map_raw(path: &Path) -> Res<Vec<MapExtent>> {
    let file = File::open(path).map_err(|e| io_error("cannot open", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| io_error("cannot stat", path, e))?
        .len();
    let seek_error = |e| io_error("cannot seek in", path, e);
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < size {
        let data = lseek(&file, pos, libc::SEEK_DATA)
            .map_err(seek_error)?
            .unwrap_or(size)
            .min(size);
        if data > pos {
            MapExtent::push_merged(
                &mut extents,
                MapExtent {
                    start: pos,
                    length: data - pos,
                    present: true,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: Some(pos),
                },
            );
        }
        if data >= size {
            break;
        }
        let hole = lseek(&file, data, libc::SEEK_HOLE)
            .map_err(seek_error)?
            .unwrap_or(size)
            .min(size);
        MapExtent::push_merged(
            &mut extents,
            MapExtent {
                start: data,
                length: hole.max(data + 1) - data,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: Some(data),
            },
        );
        pos = hole.max(data + 1);
    }
    Ok(extents)
}

/// A number as qemu-img map prints it (C's `%#x`: plain 0).
fn hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}

fn cmd_map(args: &[String]) -> Res<ExitCode> {
    let args = parse_args(args, "f", true)?;
    let path = one_file(&args, "map")?;
    let extents = match args.format.unwrap_or_default() {
        Format::Raw => map_raw(&path)?,
        Format::Qcow2 => qcow2::map(&path).map_err(|e| qcow2_error(&path, e, "cannot map"))?,
    };
    match args.output {
        OutputFormat::Json => {
            let list: Vec<serde_json::Value> = extents
                .iter()
                .map(|e| {
                    let mut v = serde_json::json!({
                        "start": e.start,
                        "length": e.length,
                        "depth": 0,
                        "present": e.present,
                        "zero": e.zero,
                        "data": e.data,
                        "compressed": e.compressed,
                    });
                    if let Some(offset) = e.offset {
                        v["offset"] = offset.into();
                    }
                    v
                })
                .collect();
            println!("{}", serde_json::Value::from(list));
        }
        OutputFormat::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in extents.iter().filter(|e| e.data) {
                let mapped = e.offset.map_or("-".to_string(), hex);
                println!(
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    mapped,
                    path.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// convert

fn read_all(disk: &dyn SyncDisk, offset: u64, buf: &mut [u8]) -> vmkit_block_backend::Result<()> {
    let bufs = [IoBuf::from_mut_slice(buf)];
    disk.read_vectored(offset, &bufs)?;
    Ok(())
}

/// Copies every non-zero block of `src` into `dst`; returns the bytes written.
fn copy(src: &dyn SyncDisk, dst: &dyn SyncDisk, size: u64, block: usize) -> Res<u64> {
    let mut buf = vec![0u8; CONVERT_CHUNK];
    let mut written = 0;
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(CONVERT_CHUNK as u64) as usize;
        let chunk = &mut buf[..len];
        read_all(src, offset, chunk).map_err(|e| error(format!("reading at {offset:#x}: {e}")))?;
        // Write runs of non-zero blocks; zero blocks stay unallocated.
        let mut at = 0;
        while at < len {
            let is_zero = |a: usize| chunk[a..(a + block).min(len)].iter().all(|&b| b == 0);
            if is_zero(at) {
                at += block;
                continue;
            }
            let start = at;
            while at < len && !is_zero(at) {
                at += block;
            }
            let end = at.min(len);
            let bufs = [IoBuf::from_mut_slice(&mut chunk[start..end])];
            let target = offset + start as u64;
            dst.write_vectored(target, &bufs)
                .map_err(|e| error(format!("writing at {target:#x}: {e}")))?;
            written += (end - start) as u64;
        }
        offset += len as u64;
    }
    dst.flush().map_err(|e| error(format!("flush: {e}")))?;
    Ok(written)
}

fn cmd_convert(args: &[String]) -> Res<ExitCode> {
    let args = parse_args(args, "fOo", false)?;
    let in_format = args.format.unwrap_or_default();
    let out_format = args.out_format.unwrap_or_default();
    let cluster_size = parse_create_options(&args.options, out_format)?;
    let (src, dst) = match args.files.as_slice() {
        [src, dst] => (PathBuf::from(src), PathBuf::from(dst)),
        [] | [_] => return usage("convert: expecting a source and a destination filename"),
        _ => return usage("convert: too many arguments"),
    };
    let src_options = OpenOptions::new()
        .format(in_format)
        .read_only(true)
        .backing(Backing::FromImage);
    let source = open_sync(&src, &src_options)
        .map_err(|e| error(format!("cannot open {}: {e}", src.display())))?;
    let size = source.info().size;
    create_image(&dst, out_format, size, cluster_size)?;
    let result = (|| {
        let dst_options = OpenOptions::new().format(out_format);
        let target = open_sync(&dst, &dst_options)
            .map_err(|e| error(format!("cannot open {}: {e}", dst.display())))?;
        let block = cluster_size.unwrap_or(match out_format {
            Format::Raw => 4096,
            Format::Qcow2 => 65536,
        });
        copy(&*source, &*target, size, block as usize)
    })();
    match result {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            // The file is ours (create refuses existing files): do not leave half of it.
            let _ = std::fs::remove_file(&dst);
            Err(match e {
                Failure::Error(m) => error(format!(
                    "convert {} to {}: {m}",
                    src.display(),
                    dst.display()
                )),
                usage => usage,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("disk: expecting a command\n\n{USAGE}");
        return ExitCode::from(2);
    };
    if rest.iter().any(|a| a == "-h" || a == "--help") || command == "-h" || command == "--help" {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result = match command.as_str() {
        "create" => cmd_create(rest),
        "info" => cmd_info(rest),
        "check" => cmd_check(rest),
        "map" => cmd_map(rest),
        "convert" => cmd_convert(rest),
        _ => usage(format!("unknown command {command:?}")),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("disk: {message}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Error(message)) => {
            eprintln!("disk: {message}");
            ExitCode::FAILURE
        }
    }
}
