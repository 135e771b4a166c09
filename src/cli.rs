//! The command line of the example VM (`cargo run --release --example vm -- ...`).

use std::path::PathBuf;

use vmkit_memory::Backing;

use crate::program::Program;
use crate::vmm::VmConfig;

/// Usage text.
pub const USAGE: &str = "\
usage: vm [run] [OPTIONS]      run a VM (the built-in guest unless --program is given)
       vm check-host           check that this host can run VMs
       vm help                 print this text

options of run:
  --cpus N             vCPUs (default 1)
  --memory SIZE        guest RAM, e.g. 256M, 2G (default 256M; suffixes K, M, G, T)
  --backing KIND       anonymous (default), memfd, hugetlb or thp
  --prefault           fault all guest RAM in before the guest starts
  --program FILE       run a static x86-64 ELF instead of the built-in guest
  --args STRING        arguments for the program (the built-in guest's: exit=N print=N
                       compute=N touch=MIB spin)
  --json               print the end-of-run report as one JSON object instead of the
                       serial console
";

/// What the command line asks for.
#[derive(Clone, Debug)]
pub enum Command {
    /// Run a VM.
    Run {
        /// The VM.
        config: VmConfig,
        /// Print the report as JSON.
        json: bool,
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
        _ => {}
    }

    let mut config = VmConfig {
        echo_serial: true,
        ..VmConfig::default()
    };
    let mut json = false;
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| UsageError(format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--cpus" => {
                let text = value()?;
                config.cpus = text
                    .parse()
                    .map_err(|_| UsageError(format!("--cpus: '{text}' is not a number")))?;
                if config.cpus == 0 {
                    return Err(UsageError("--cpus: a VM needs at least one vCPU".into()));
                }
            }
            "--memory" => config.memory = parse_size(value()?)?,
            "--backing" => {
                config.backing = match value()?.as_str() {
                    "anonymous" | "anon" => Backing::Anonymous,
                    "memfd" => Backing::SharedMemfd,
                    "hugetlb" => Backing::HugeTlbfs,
                    "thp" => Backing::TransparentHugePages,
                    other => {
                        return Err(UsageError(format!(
                            "--backing: '{other}' is not one of anonymous, memfd, hugetlb, thp"
                        )))
                    }
                }
            }
            "--prefault" => config.prefault = true,
            "--program" => config.program = Program::ElfFile(PathBuf::from(value()?)),
            "--args" => config.args = value()?.clone(),
            "--json" => json = true,
            other => return Err(UsageError(format!("unknown option '{other}'"))),
        }
    }
    config.echo_serial = !json;
    Ok(Command::Run { config, json })
}

/// Parses a size such as `256M`, `2G` or `4096` (bytes). Zero is refused.
pub fn parse_size(text: &str) -> Result<u64, UsageError> {
    let bad = || UsageError(format!("--memory: '{text}' is not a size like 256M or 2G"));
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
        return Err(UsageError("--memory: a VM needs some memory".into()));
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
    fn bad_command_lines_say_what_is_wrong() {
        for (line, expected) in [
            ("--cpus 0", "at least one vCPU"),
            ("--cpus x", "not a number"),
            ("--memory 0", "needs some memory"),
            ("--bogus", "unknown option '--bogus'"),
            ("--cpus", "--cpus needs a value"),
            ("--backing disk", "not one of"),
            ("check-host extra", "takes no arguments"),
        ] {
            let error = parse(&args(line)).unwrap_err();
            assert!(error.0.contains(expected), "{line}: {error}");
        }
    }
}
