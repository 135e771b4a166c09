//! The command line of the example VM (`cargo run --release --example vm -- ...`).

use std::path::{Path, PathBuf};

use vmkit_block_backend::{CacheMode, EngineKind, Format};
use vmkit_memory::Backing;

use crate::definition::Definition;
use crate::devices::virtio_blk::{MAX_QUEUES, MAX_SERIAL_BYTES};
use crate::devices::{DiskConfig, DiskTransport, VfioConfig};
use crate::program::Program;
use crate::seccomp::SeccompConfig;
use crate::vmm::VmConfig;

/// Usage text.
pub const USAGE: &str = "\
usage: vm [run] [OPTIONS]      run a VM (the built-in guest unless --program is given)
       vm config [OPTIONS]     print the VM definition (TOML) that OPTIONS describe
       vm check-host           check that this host can run VMs
       vm help                 print this text

options of run (and config):
  --config FILE        read the VM definition from FILE (TOML, as `vm config` prints it);
                       options given beside it override the file's keys, and --disk,
                       --vfio or --vfio-user replace the file's lists
  --cpus N             vCPUs (default 1)
  --memory SIZE        guest RAM, e.g. 256M, 2G (default 256M; suffixes K, M, G, T)
  --backing KIND       anonymous (default), memfd, hugetlb or thp
  --prefault           fault all guest RAM in before the guest starts
  --program FILE       run a static x86-64 ELF instead of the built-in guest
  --kernel FILE        boot a Linux kernel (bzImage, or an ELF vmlinux) instead
  --initrd FILE        the kernel's initial RAM disk
  --cmdline STRING     the kernel's command line (default: console=ttyS0 reboot=k panic=1)
  --cpu-features SPEC  hide CPU features from the guest by their /proc/cpuinfo names, e.g.
                       -cx16,-xsave (and require some with +name)
  --args STRING        arguments for the program (the built-in guest's: exit=N print=N
                       compute=N touch=MIB spin)
  --json               print the end-of-run report as one JSON object instead of the
                       serial console
  --disk path=FILE[,format=raw][,cache=MODE][,engine=sync|io_uring][,readonly=on]
         [,serial=ID][,queues=N]
                       attach a disk image as a virtio-blk device (repeatable); MODE is
                       writeback (default), writethrough, none, directsync or unsafe;
                       engine io_uring is the default; serial is at most 20 bytes;
                       queues 1 to 32 (default 1). The built-in guest tests every disk:
                       it overwrites sectors 0-191 of a writable image
  --transport KIND     the disks' transport: mmio (default) or pci (virtio-pci, MSI-X)
  --vfio SYSFS_PATH    pass a host PCI device through with VFIO, e.g.
                       /sys/bus/pci/devices/0000:01:00.0 (bound to vfio-pci; repeatable)
  --vfio-user SOCKET   attach the PCI device a vfio-user server serves on SOCKET
                       (repeatable); guest RAM is then a memfd, which the server maps
  --no-seccomp         run every thread without its seccomp filter (for debugging)
  --seccomp-filter FILE
                       replace the built-in seccomp filters with FILE: seccompiler JSON
                       with one filter each for the threads main, vcpu and io. A thread
                       that makes a call its filter forbids ends the VM: the message
                       names the thread and the call, and the exit code is 159
";

/// What the command line asks for.
#[derive(Clone, Debug)]
pub enum Command {
    /// Run a VM.
    Run {
        /// The VM.
        config: Box<VmConfig>,
        /// Print the report as JSON.
        json: bool,
    },
    /// Print the VM definition these options make.
    Config {
        /// The definition, as TOML.
        definition: String,
    },
    /// Print the host check.
    CheckHost,
    /// Print the usage text.
    Help,
}

/// A command line that cannot be used, with what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, UsageError> {
    let mut args = args.iter().peekable();
    match args.peek().map(|s| s.as_str()) {
        Some("check-host") => {
            args.next();
            if let Some(extra) = args.next() {
                return Err(UsageError(format!(
                    "check-host takes no arguments, got '{extra}'"
                )));
            }
            return Ok(Command::CheckHost);
        }
        Some("help" | "--help" | "-h") => return Ok(Command::Help),
        Some("run") => {
            args.next();
        }
        Some("config") => {
            args.next();
            let rest: Vec<String> = args.cloned().collect();
            let (config, _) = parse_run(&rest)?;
            return Ok(Command::Config {
                definition: Definition::from_config(&config).to_toml(),
            });
        }
        _ => {}
    }
    let rest: Vec<String> = args.cloned().collect();
    let (config, json) = parse_run(&rest)?;
    Ok(Command::Run {
        config: Box::new(config),
        json,
    })
}

/// Options that take no value.
const SWITCHES: [&str; 3] = ["--prefault", "--json", "--no-seccomp"];
/// Options that take a value.
const VALUED: [&str; 15] = [
    "--config",
    "--cpus",
    "--memory",
    "--backing",
    "--program",
    "--args",
    "--kernel",
    "--initrd",
    "--cmdline",
    "--cpu-features",
    "--disk",
    "--transport",
    "--vfio",
    "--vfio-user",
    "--seccomp-filter",
];

/// The options of `run`: a definition file first (`--config`), wherever it stands, then
/// the other options over it.
fn parse_run(args: &[String]) -> Result<(VmConfig, bool), UsageError> {
    let mut options: Vec<(&str, Option<&str>)> = Vec::new();
    let mut file = None;
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = if SWITCHES.contains(&flag.as_str()) {
            None
        } else if !VALUED.contains(&flag.as_str()) {
            return Err(UsageError(format!("unknown option '{flag}'")));
        } else {
            let value = args
                .next()
                .ok_or_else(|| UsageError(format!("{flag} needs a value")))?;
            Some(value.as_str())
        };
        if flag == "--config" {
            if file.is_some() {
                return Err(UsageError("--config is given twice".into()));
            }
            file = value;
        } else {
            options.push((flag.as_str(), value));
        }
    }

    let mut run = RunOptions::default();
    if let Some(file) = file {
        let definition = Definition::load(Path::new(file))?;
        for (key, flag, value) in definition.options() {
            run.apply(flag, value.as_deref())
                .map_err(|e| UsageError(format!("{file}: {key}: {e}")))?;
        }
    }
    // Lists given as options replace the file's.
    if options.iter().any(|&(flag, _)| flag == "--disk") {
        run.config.disks.clear();
    }
    if options
        .iter()
        .any(|&(flag, _)| flag == "--vfio" || flag == "--vfio-user")
    {
        run.config.vfio.clear();
    }
    for (flag, value) in options {
        run.apply(flag, value)
            .map_err(|e| UsageError(format!("{flag}: {e}")))?;
    }
    run.finish()
}

/// The options of `run` as they are applied, one at a time.
struct RunOptions {
    config: VmConfig,
    json: bool,
    backing_given: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            config: VmConfig {
                echo_serial: true,
                ..VmConfig::default()
            },
            json: false,
            backing_given: false,
        }
    }
}

impl RunOptions {
    /// Applies one option; the error says what is wrong with its value, without the name.
    fn apply(&mut self, flag: &str, value: Option<&str>) -> Result<(), UsageError> {
        let config = &mut self.config;
        let value = || value.ok_or_else(|| UsageError("needs a value".into()));
        match flag {
            "--cpus" => {
                let text = value()?;
                config.cpus = text
                    .parse()
                    .map_err(|_| UsageError(format!("'{text}' is not a number")))?;
                if config.cpus == 0 {
                    return Err(UsageError("a VM needs at least one vCPU".into()));
                }
            }
            "--memory" => config.memory = parse_size(value()?)?,
            "--backing" => {
                self.backing_given = true;
                config.backing = parse_backing(value()?)?;
            }
            "--prefault" => config.prefault = true,
            "--program" => config.program = Program::ElfFile(PathBuf::from(value()?)),
            "--args" => config.args = value()?.to_string(),
            "--kernel" => config.kernel.get_or_insert_with(Default::default).path = value()?.into(),
            "--initrd" => {
                config.kernel.get_or_insert_with(Default::default).initrd = Some(value()?.into())
            }
            "--cmdline" => {
                config.kernel.get_or_insert_with(Default::default).cmdline =
                    Some(value()?.to_string())
            }
            "--cpu-features" => {
                config.cpu_policy = value()?.parse().map_err(|e| UsageError(format!("{e}")))?;
            }
            "--json" => self.json = true,
            "--disk" => config.disks.push(parse_disk(value()?)?),
            "--transport" => {
                config.disk_transport = match value()? {
                    "mmio" => DiskTransport::Mmio,
                    "pci" => DiskTransport::Pci,
                    other => return Err(UsageError(format!("'{other}' is not one of mmio, pci"))),
                }
            }
            "--vfio" => config
                .vfio
                .push(VfioConfig::Kernel(PathBuf::from(value()?))),
            "--vfio-user" => config.vfio.push(VfioConfig::User(PathBuf::from(value()?))),
            "--no-seccomp" => config.seccomp = SeccompConfig::Off,
            "--seccomp-filter" => config.seccomp = SeccompConfig::File(PathBuf::from(value()?)),
            other => return Err(UsageError(format!("unknown option '{other}'"))),
        }
        Ok(())
    }

    /// Checks what only the options together can tell.
    fn finish(mut self) -> Result<(VmConfig, bool), UsageError> {
        let config = &mut self.config;
        if config
            .vfio
            .iter()
            .any(|device| matches!(device, VfioConfig::User(_)))
        {
            // A vfio-user server reaches guest RAM by mapping the file behind it.
            if !self.backing_given {
                config.backing = Backing::SharedMemfd;
            } else if config.backing != Backing::SharedMemfd {
                return Err(UsageError(
                    "--vfio-user needs guest RAM in a memfd: use --backing memfd (or leave it \
                     out)"
                        .into(),
                ));
            }
        }
        if let Some(kernel) = &config.kernel {
            if kernel.path.as_os_str().is_empty() {
                return Err(UsageError(
                    "--initrd and --cmdline go with --kernel FILE".into(),
                ));
            }
            if config.program != Program::Builtin {
                return Err(UsageError(
                    "--kernel and --program cannot both be given".into(),
                ));
            }
        }
        config.echo_serial = !self.json;
        Ok((self.config, self.json))
    }
}

/// The value of `--backing`.
fn parse_backing(text: &str) -> Result<Backing, UsageError> {
    match text {
        "anonymous" | "anon" => Ok(Backing::Anonymous),
        "memfd" => Ok(Backing::SharedMemfd),
        "hugetlb" => Ok(Backing::HugeTlbfs),
        "thp" => Ok(Backing::TransparentHugePages),
        other => Err(UsageError(format!(
            "'{other}' is not one of anonymous, memfd, hugetlb, thp"
        ))),
    }
}

/// The name `--backing` takes for `backing`.
pub fn backing_name(backing: Backing) -> &'static str {
    match backing {
        Backing::Anonymous => "anonymous",
        Backing::SharedMemfd => "memfd",
        Backing::HugeTlbfs => "hugetlb",
        Backing::TransparentHugePages => "thp",
    }
}

/// Parses the value of `--disk`: comma-separated `KEY=VALUE` options, `path` required.
pub fn parse_disk(text: &str) -> Result<DiskConfig, UsageError> {
    let error = |message: String| UsageError(format!("'{text}': {message}"));
    let mut path = None;
    let mut disk = DiskConfig::new("");
    let mut seen: Vec<&str> = Vec::new();
    for option in text.split(',') {
        let Some((key, value)) = option.split_once('=') else {
            return Err(error(format!(
                "'{option}' is not KEY=VALUE (keys: path, format, cache, engine, readonly, \
                 serial, queues)"
            )));
        };
        if seen.contains(&key) {
            return Err(error(format!("'{key}' is given twice")));
        }
        seen.push(key);
        let bad = |expected: &str| error(format!("{key}={value}: {expected}"));
        match key {
            "path" if value.is_empty() => return Err(bad("the path is empty")),
            "path" => path = Some(value),
            "format" => {
                disk.format = value
                    .parse::<Format>()
                    .map_err(|e| error(format!("format={value}: {e}")))?
            }
            "cache" => {
                disk.cache = value
                    .parse::<CacheMode>()
                    .map_err(|e| error(format!("cache={value}: {e}")))?
            }
            "engine" => {
                disk.engine = value
                    .parse::<EngineKind>()
                    .map_err(|e| error(format!("engine={value}: {e}")))?
            }
            "readonly" => {
                disk.read_only = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(bad("expected on or off")),
                }
            }
            "serial" => {
                if value.is_empty()
                    || value.len() > MAX_SERIAL_BYTES
                    || !value.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(bad(&format!(
                        "expected 1 to {MAX_SERIAL_BYTES} printable ASCII characters without spaces"
                    )));
                }
                disk.serial = value.to_string();
            }
            "queues" => {
                disk.queues = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_QUEUES).contains(n))
                    .ok_or_else(|| bad(&format!("expected a number from 1 to {MAX_QUEUES}")))?
            }
            _ => {
                return Err(error(format!(
                    "unknown key '{key}' (keys: path, format, cache, engine, readonly, serial, \
                     queues)"
                )))
            }
        }
    }
    disk.path = PathBuf::from(path.ok_or_else(|| error("path=FILE is required".into()))?);
    Ok(disk)
}

/// Parses a size such as `256M`, `2G` or `4096` (bytes). Zero is refused.
pub fn parse_size(text: &str) -> Result<u64, UsageError> {
    let bad = || UsageError(format!("'{text}' is not a size like 256M or 2G"));
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 10),
        Some((i, 'M' | 'm')) => (&text[..i], 20),
        Some((i, 'G' | 'g')) => (&text[..i], 30),
        Some((i, 'T' | 't')) => (&text[..i], 40),
        _ => (text, 0),
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let size = number.checked_mul(1 << shift).ok_or_else(bad)?;
    if size == 0 {
        return Err(UsageError("a VM needs some memory".into()));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("0M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn run_options() {
        let Ok(Command::Run { config, json }) = parse(&args(
            "--cpus 4 --memory 1G --backing memfd --prefault --json",
        )) else {
            panic!("expected run");
        };
        assert!(json && !config.echo_serial && config.prefault);
        assert_eq!((config.cpus, config.memory), (4, 1 << 30));
        assert_eq!(config.backing, Backing::SharedMemfd);
        assert!(matches!(
            parse(&args("run")),
            Ok(Command::Run { json: false, .. })
        ));
        assert!(matches!(parse(&args("check-host")), Ok(Command::CheckHost)));
    }

    #[test]
    fn disks() {
        let Ok(Command::Run { config, .. }) = parse(&args(
            "--disk path=/a.img --disk path=b,format=raw,cache=none,engine=sync,readonly=on,serial=vmkit1,queues=4 --transport mmio",
        )) else {
            panic!("expected run");
        };
        assert_eq!(config.disks.len(), 2);
        assert_eq!(config.disks[0], DiskConfig::new("/a.img"));
        let second = &config.disks[1];
        assert_eq!(second.path, PathBuf::from("b"));
        assert_eq!(second.cache, CacheMode::None);
        assert_eq!(second.engine, EngineKind::Sync);
        assert!(second.read_only);
        assert_eq!((second.serial.as_str(), second.queues), ("vmkit1", 4));
        assert_eq!(config.disk_transport, DiskTransport::Mmio);
        // qcow2 parses; the library opens it when the VM starts.
        let disk = parse_disk("path=x.qcow2,format=qcow2").unwrap();
        assert_eq!(disk.format, Format::Qcow2);
        let Ok(Command::Run { config, .. }) = parse(&args("--transport pci")) else {
            panic!("expected run");
        };
        assert_eq!(config.disk_transport, DiskTransport::Pci);
    }

    #[test]
    fn vfio_devices() {
        let Ok(Command::Run { config, .. }) = parse(&args(
            "--vfio /sys/bus/pci/devices/0000:01:00.0 --vfio-user /tmp/dev.sock",
        )) else {
            panic!("expected run");
        };
        assert_eq!(
            config.vfio,
            vec![
                VfioConfig::Kernel("/sys/bus/pci/devices/0000:01:00.0".into()),
                VfioConfig::User("/tmp/dev.sock".into()),
            ]
        );
        // vfio-user servers map guest RAM: it becomes a memfd unless the user chose otherwise.
        assert_eq!(config.backing, Backing::SharedMemfd);
        let Ok(Command::Run { config, .. }) = parse(&args("--vfio /x")) else {
            panic!("expected run");
        };
        assert_eq!(config.backing, Backing::Anonymous);
    }

    #[test]
    fn kernel_options() {
        let Ok(Command::Run { config, .. }) = parse(&args(
            "--kernel vmlinux --initrd initrd.gz --cmdline console=ttyS0 --cpu-features -cx16,-xsave",
        )) else {
            panic!("expected run");
        };
        let kernel = config.kernel.expect("a kernel");
        assert_eq!(kernel.path, PathBuf::from("vmlinux"));
        assert_eq!(kernel.initrd, Some(PathBuf::from("initrd.gz")));
        assert_eq!(kernel.cmdline.as_deref(), Some("console=ttyS0"));
        assert!(config.cpu_policy.hides("cx16") && config.cpu_policy.hides("avx"));
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        for (line, expected) in [
            ("--cpus 0", "at least one vCPU"),
            ("--cpus x", "not a number"),
            ("--memory 0", "needs some memory"),
            ("--bogus", "unknown option '--bogus'"),
            ("--cpus", "--cpus needs a value"),
            ("--backing disk", "not one of"),
            ("--vfio", "--vfio needs a value"),
            ("--initrd x", "go with --kernel FILE"),
            ("--kernel k --program p", "cannot both be given"),
            ("--cpu-features -nosuchflag", "nosuchflag"),
            ("--cpu-features cx16", "--cpu-features"),
            (
                "--vfio-user s --backing anonymous",
                "needs guest RAM in a memfd",
            ),
            ("check-host extra", "takes no arguments"),
            ("--disk", "--disk needs a value"),
            ("--disk format=raw", "path=FILE is required"),
            ("--disk path=a,bogus=1", "unknown key 'bogus'"),
            ("--disk path=a,readonly", "'readonly' is not KEY=VALUE"),
            ("--disk path=a,cache=fast", "cache=fast: unknown cache mode"),
            ("--disk path=a,engine=aio", "engine=aio: unknown engine"),
            ("--disk path=a,format=vmdk", "format=vmdk: unknown format"),
            (
                "--disk path=a,readonly=maybe",
                "readonly=maybe: expected on or off",
            ),
            (
                "--disk path=a,queues=0",
                "queues=0: expected a number from 1 to 32",
            ),
            ("--disk path=a,queues=x", "queues=x: expected a number"),
            ("--disk path=a,serial=123456789012345678901", "serial=1234"),
            ("--disk path=a,path=b", "'path' is given twice"),
            ("--disk path=", "the path is empty"),
            ("--transport virtio", "not one of mmio, pci"),
        ] {
            let error = parse(&args(line)).unwrap_err();
            assert!(error.0.contains(expected), "{line}: {error}");
        }
    }
}
