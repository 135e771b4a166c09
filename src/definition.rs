//! VM definition files: everything `vm run` takes on its command line, as TOML, the way
//! virt-manager keeps a domain definition and turns it into a QEMU command line.
//!
//! `vm run --config vm.toml` reads one; options beside it override its keys (and `--disk`,
//! `--vfio` or `--vfio-user` replace its lists). `vm config [OPTIONS]` prints the definition
//! that a set of options makes, so that a run can be saved and repeated:
//!
//! ```toml
//! cpus = 2
//! memory = "512M"
//! kernel = "vmlinux"
//! cmdline = "console=ttyS0 reboot=k panic=1"
//! cpu_features = "-cx16"
//! transport = "pci"
//!
//! [[disk]]
//! path = "disk.img"
//! cache = "none"
//! ```
//!
//! Each key is applied as the option of the same name (`cpu_features` is
//! `--cpu-features`, `[[disk]]` is one `--disk`, `vfio_user` a list of `--vfio-user`), so
//! a file accepts exactly what the command line does. Unknown keys, values of the wrong
//! type and bad values are errors that name the file and the key.

use std::path::Path;

use serde::{Deserialize, Serialize};
use vmkit_memory::Backing;

use crate::cli::{backing_name, UsageError};
use crate::devices::{DiskTransport, VfioConfig};
use crate::program::Program;
use crate::seccomp::SeccompConfig;
use crate::vmm::VmConfig;

/// The largest definition file read (they are a few hundred bytes).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A VM definition. Absent keys keep the command line's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u64>,
    /// Guest RAM, as `--memory` takes it (`"512M"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// `anonymous`, `memfd`, `hugetlb` or `thp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// Fault all guest RAM in before the guest starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault: Option<bool>,
    /// A flat program to run instead of the built-in guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// The program's arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<String>,
    /// A Linux kernel to boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Its initial RAM disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Its command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// CPU features hidden (`-name`) or required (`+name`), comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<String>,
    /// The disks' transport: `mmio` or `pci`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Disks, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk: Vec<DiskDefinition>,
    /// Host PCI devices passed through with VFIO, by sysfs path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vfio: Vec<String>,
    /// vfio-user servers' sockets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vfio_user: Vec<String>,
    /// `false` runs without seccomp filters (`--no-seccomp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<bool>,
    /// A seccompiler JSON file that replaces the built-in filters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp_filter: Option<String>,
}

/// One disk: the keys of `--disk`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDefinition {
    /// The image.
    pub path: String,
    /// `raw` or `qcow2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A cache mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// `sync` or `io_uring`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Attach read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    /// The GET_ID answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Request queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

impl DiskDefinition {
    /// The value of the equivalent `--disk`.
    fn option(&self) -> String {
        let mut text = format!("path={}", self.path);
        let mut add = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                text.push_str(&format!(",{key}={value}"));
            }
        };
        add("format", self.format.clone());
        add("cache", self.cache.clone());
        add("engine", self.engine.clone());
        add(
            "readonly",
            self.readonly
                .map(|on| if on { "on" } else { "off" }.to_string()),
        );
        add("serial", self.serial.clone());
        add("queues", self.queues.map(|q| q.to_string()));
        text
    }
}

impl Definition {
    /// Reads and parses a definition file.
    pub fn load(path: &Path) -> Result<Definition, UsageError> {
        let name = path.display();
        let file = std::fs::File::open(path)
            .map_err(|e| UsageError(format!("cannot read {name}: {e}")))?;
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(file, MAX_FILE_BYTES + 1),
            &mut text,
        )
        .map_err(|e| UsageError(format!("cannot read {name}: {e}")))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(UsageError(format!(
                "{name}: larger than {MAX_FILE_BYTES} bytes: not a VM definition"
            )));
        }
        Self::parse(&text).map_err(|e| UsageError(format!("{name}: {e}")))
    }

    /// Parses a definition; the error names the key (and line) that is wrong.
    pub fn parse(text: &str) -> Result<Definition, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// The definition as TOML.
    pub fn to_toml(&self) -> String {
        // Serializing plain strings, numbers and tables cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// The options this definition stands for, in order: (key, option, value).
    pub fn options(&self) -> Vec<(String, &'static str, Option<String>)> {
        let mut options = Vec::new();
        let mut add = |key: &str, flag: &'static str, value: Option<String>| {
            options.push((key.to_string(), flag, value));
        };
        let scalars: [(&str, &'static str, Option<String>); 11] = [
            ("cpus", "--cpus", self.cpus.map(|n| n.to_string())),
            ("memory", "--memory", self.memory.clone()),
            ("backing", "--backing", self.backing.clone()),
            ("program", "--program", self.program.clone()),
            ("args", "--args", self.args.clone()),
            ("kernel", "--kernel", self.kernel.clone()),
            ("initrd", "--initrd", self.initrd.clone()),
            ("cmdline", "--cmdline", self.cmdline.clone()),
            ("cpu_features", "--cpu-features", self.cpu_features.clone()),
            ("transport", "--transport", self.transport.clone()),
            (
                "seccomp_filter",
                "--seccomp-filter",
                self.seccomp_filter.clone(),
            ),
        ];
        for (key, flag, value) in scalars {
            if value.is_some() {
                add(key, flag, value);
            }
        }
        if self.prefault == Some(true) {
            add("prefault", "--prefault", None);
        }
        if self.seccomp == Some(false) {
            add("seccomp", "--no-seccomp", None);
        }
        for (i, disk) in self.disk.iter().enumerate() {
            add(&format!("disk {}", i + 1), "--disk", Some(disk.option()));
        }
        for path in &self.vfio {
            add("vfio", "--vfio", Some(path.clone()));
        }
        for socket in &self.vfio_user {
            add("vfio_user", "--vfio-user", Some(socket.clone()));
        }
        options
    }

    /// The definition of `config`: every key that differs from the defaults.
    pub fn from_config(config: &VmConfig) -> Definition {
        let defaults = VmConfig::default();
        let text = |path: &Path| path.display().to_string();
        let kernel = config.kernel.as_ref();
        Definition {
            cpus: (config.cpus != defaults.cpus).then_some(config.cpus as u64),
            memory: (config.memory != defaults.memory).then(|| format_size(config.memory)),
            backing: (config.backing != Backing::Anonymous)
                .then(|| backing_name(config.backing).to_string()),
            prefault: config.prefault.then_some(true),
            program: match &config.program {
                Program::Builtin => None,
                Program::ElfFile(path) => Some(text(path)),
            },
            args: (!config.args.is_empty()).then(|| config.args.clone()),
            kernel: kernel.map(|k| text(&k.path)),
            initrd: kernel.and_then(|k| k.initrd.as_deref()).map(text),
            cmdline: kernel.and_then(|k| k.cmdline.clone()),
            cpu_features: (!config.cpu_policy.is_empty()).then(|| config.cpu_policy.to_string()),
            transport: (config.disk_transport == DiskTransport::Pci).then(|| "pci".to_string()),
            disk: config
                .disks
                .iter()
                .map(|disk| {
                    let default = crate::devices::DiskConfig::new(&disk.path);
                    DiskDefinition {
                        path: text(&disk.path),
                        format: (disk.format != default.format)
                            .then(|| disk.format.name().to_string()),
                        cache: (disk.cache != default.cache).then(|| disk.cache.name().to_string()),
                        engine: (disk.engine != default.engine)
                            .then(|| disk.engine.name().to_string()),
                        readonly: disk.read_only.then_some(true),
                        serial: (!disk.serial.is_empty()).then(|| disk.serial.clone()),
                        queues: (disk.queues != default.queues).then_some(disk.queues),
                    }
                })
                .collect(),
            vfio: config
                .vfio
                .iter()
                .filter_map(|d| match d {
                    VfioConfig::Kernel(path) => Some(text(path)),
                    VfioConfig::User(_) => None,
                })
                .collect(),
            vfio_user: config
                .vfio
                .iter()
                .filter_map(|d| match d {
                    VfioConfig::User(path) => Some(text(path)),
                    VfioConfig::Kernel(_) => None,
                })
                .collect(),
            seccomp: (config.seccomp == SeccompConfig::Off).then_some(false),
            seccomp_filter: match &config.seccomp {
                SeccompConfig::File(path) => Some(text(path)),
                _ => None,
            },
        }
    }
}

/// `bytes` as `--memory` takes it: with the largest suffix that divides it.
fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse, Command};

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    fn run_config(text: &str) -> VmConfig {
        match parse(&args(text)) {
            Ok(Command::Run { config, .. }) => *config,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn config_output(text: &str) -> String {
        match parse(&args(text)) {
            Ok(Command::Config { definition }) => definition,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn write_file(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vmkit-definition-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const EVERYTHING: &str = "--cpus 3 --memory 768M --backing memfd --prefault --args exit=3 \
        --kernel bzImage --initrd initrd.gz --cmdline console=ttyS0 --cpu-features -cx16 \
        --transport pci --disk path=a.img,cache=none,engine=sync,serial=vm0,queues=2 \
        --disk path=b.qcow2,format=qcow2,readonly=on --vfio /sys/bus/pci/devices/0000:01:00.0 \
        --vfio-user /tmp/dev.sock --seccomp-filter filters.json";

    #[test]
    fn a_printed_definition_runs_the_same_vm() {
        let from_flags = run_config(EVERYTHING);
        let definition = config_output(&format!("config {EVERYTHING}"));
        let file = write_file("everything.toml", &definition);
        let from_file = run_config(&format!("--config {}", file.display()));
        assert_eq!(format!("{from_flags:?}"), format!("{from_file:?}"));
        // And it prints the same again.
        assert_eq!(
            config_output(&format!("config --config {}", file.display())),
            definition
        );
        assert!(
            definition.contains("cpu_features = \"-cx16\""),
            "{definition}"
        );
        assert!(definition.contains("[[disk]]"), "{definition}");
        assert!(
            definition.contains("seccomp_filter = \"filters.json\""),
            "{definition}"
        );
        let off = config_output("config --no-seccomp");
        assert_eq!(off, "seccomp = false\n");
        let file = write_file("off.toml", &off);
        let config = run_config(&format!("--config {}", file.display()));
        assert_eq!(config.seccomp, SeccompConfig::Off);
        // The defaults print nothing.
        assert_eq!(config_output("config"), "");
    }

    #[test]
    fn options_override_the_file_and_lists_replace_its_lists() {
        let file = write_file(
            "override.toml",
            "cpus = 2\nmemory = \"1G\"\n[[disk]]\npath = \"a.img\"\n[[disk]]\npath = \"b.img\"\n",
        );
        let config = run_config(&format!("--cpus 4 --config {}", file.display()));
        assert_eq!((config.cpus, config.memory), (4, 1 << 30));
        assert_eq!(config.disks.len(), 2);
        let config = run_config(&format!("--config {} --disk path=c.img", file.display()));
        assert_eq!(config.disks.len(), 1);
        assert_eq!(config.disks[0].path, std::path::PathBuf::from("c.img"));
    }

    #[test]
    fn bad_files_are_errors_that_name_the_file_and_the_key() {
        for (name, text, expected) in [
            (
                "unknown.toml",
                "cpus = 2\nbogus = 1\n",
                "unknown field `bogus`",
            ),
            ("type.toml", "cpus = \"two\"\n", "cpus"),
            (
                "value.toml",
                "memory = \"12X\"\n",
                "memory: '12X' is not a size",
            ),
            (
                "zero.toml",
                "cpus = 0\n",
                "cpus: a VM needs at least one vCPU",
            ),
            (
                "disk.toml",
                "[[disk]]\npath = \"x\"\ncache = \"fast\"\n",
                "disk 1:",
            ),
            (
                "diskkey.toml",
                "[[disk]]\npath = \"x\"\nspeed = 1\n",
                "unknown field `speed`",
            ),
            ("cpu.toml", "cpu_features = \"-nosuch\"\n", "cpu_features:"),
            ("syntax.toml", "cpus = \n", "TOML parse error"),
        ] {
            let file = write_file(name, text);
            let err = match parse(&args(&format!("--config {}", file.display()))) {
                Err(e) => e.0,
                Ok(other) => panic!("{name}: accepted: {other:?}"),
            };
            assert!(err.contains(&file.display().to_string()), "{name}: {err}");
            assert!(err.contains(expected), "{name}: {err}");
        }
        let err = parse(&args("--config /nonexistent/vm.toml")).unwrap_err().0;
        assert!(err.contains("cannot read /nonexistent/vm.toml"), "{err}");
        let err = parse(&args("--config a --config b")).unwrap_err().0;
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn sizes_print_with_the_largest_suffix() {
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(4097), "4097");
    }
}
