//! A host check, like `kvm-ok` or `virt-host-validate`: can this host run vmkit VMs, and if
//! not, what to do about it.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

use kvm_ioctls::Kvm;

use crate::vm::REQUIRED_CAPABILITIES;

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The host passes.
    Pass,
    /// The host fails; VMs cannot run.
    Fail,
    /// Not checked because an earlier check failed.
    Skipped,
}

/// One check: what was checked, its outcome, what was found and how to fix a failure.
#[derive(Clone, Debug)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix a failure.
    pub fix: Option<String>,
}

/// Every check, in order.
#[derive(Clone, Debug, Default)]
pub struct HostReport {
    /// The checks.
    pub checks: Vec<Check>,
}

impl HostReport {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status == Status::Pass)
    }

    fn push(
        &mut self,
        name: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        fix: Option<&str>,
    ) {
        self.checks.push(Check {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: fix.map(str::to_owned),
        });
    }
}

impl fmt::Display for HostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            let status = match check.status {
                Status::Pass => "PASS",
                Status::Fail => "FAIL",
                Status::Skipped => "SKIP",
            };
            writeln!(f, "{status:4}  {}: {}", check.name, check.detail)?;
            if let (Status::Fail, Some(fix)) = (check.status, &check.fix) {
                writeln!(f, "      fix: {fix}")?;
            }
        }
        write!(
            f,
            "{}",
            if self.ok() {
                "this host can run vmkit VMs"
            } else {
                "this host cannot run vmkit VMs"
            }
        )
    }
}

/// How the host virtualizes CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Virtualization {
    /// Intel VT-x (`vmx`).
    Vmx,
    /// AMD-V (`svm`).
    Svm,
    /// KVM without hardware virtualization, as paravirtualized nested KVM (`kvm_pvm`): CPL0
    /// guest code is emulated, CPL3 code runs natively.
    ParavirtualNested,
    /// None found.
    None,
}

/// Finds the CPU virtualization the host offers, from `/proc/cpuinfo` flags and loaded modules.
pub fn virtualization() -> Virtualization {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|line| line.starts_with("flags"))
        .map(|line| line.split_whitespace().collect())
        .unwrap_or_default();
    if flags.contains(&"vmx") {
        Virtualization::Vmx
    } else if flags.contains(&"svm") {
        Virtualization::Svm
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        Virtualization::ParavirtualNested
    } else {
        Virtualization::None
    }
}

/// Runs every check. Never fails: each problem is a failed check with a fix.
pub fn check_host() -> HostReport {
    let mut report = HostReport::default();
    let device = Path::new("/dev/kvm");
    if !device.exists() {
        report.push(
            "/dev/kvm",
            Status::Fail,
            "missing",
            Some("enable virtualization in the firmware and load the KVM modules (modprobe kvm_intel or kvm_amd)"),
        );
    } else {
        match OpenOptions::new().read(true).write(true).open(device) {
            Ok(_) => report.push("/dev/kvm", Status::Pass, "present and usable", None),
            Err(e) => report.push(
                "/dev/kvm",
                Status::Fail,
                format!("cannot be opened for reading and writing: {e}"),
                Some("add this user to the group owning /dev/kvm (usually kvm), then log in again"),
            ),
        }
    }

    match virtualization() {
        Virtualization::Vmx => report.push("CPU virtualization", Status::Pass, "Intel VT-x (vmx)", None),
        Virtualization::Svm => report.push("CPU virtualization", Status::Pass, "AMD-V (svm)", None),
        Virtualization::ParavirtualNested => report.push(
            "CPU virtualization",
            Status::Pass,
            "nested paravirtual KVM (kvm_pvm): guest code at CPL3 runs natively, at CPL0 it is emulated",
            None,
        ),
        Virtualization::None => report.push(
            "CPU virtualization",
            Status::Fail,
            "no vmx or svm CPU flag and no paravirtual KVM module",
            Some("enable VT-x/AMD-V in the firmware, or nested virtualization on the outer hypervisor"),
        ),
    }

    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            report.push(
                "KVM API",
                Status::Fail,
                format!("KVM cannot be opened: {e}"),
                Some("fix /dev/kvm first"),
            );
            for &(_, name, _) in REQUIRED_CAPABILITIES {
                report.push(name, Status::Skipped, "KVM cannot be opened", None);
            }
            return report;
        }
    };
    let version = kvm.get_api_version();
    if version == kvm_bindings::KVM_API_VERSION as i32 {
        report.push("KVM API", Status::Pass, format!("version {version}"), None);
    } else {
        report.push(
            "KVM API",
            Status::Fail,
            format!("version {version}, vmkit needs 12"),
            Some("use a host kernel with the stable KVM API (any Linux since 2.6.22)"),
        );
    }
    for &(cap, name, hint) in REQUIRED_CAPABILITIES {
        if kvm.check_extension(cap) {
            report.push(name, Status::Pass, "present", None);
        } else {
            report.push(name, Status::Fail, "missing", Some(hint));
        }
    }
    report.push(
        "vCPUs",
        Status::Pass,
        format!(
            "up to {} per VM ({} recommended)",
            kvm.get_max_vcpus(),
            kvm.get_nr_vcpus()
        ),
        None,
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_fails_when_any_check_fails_and_prints_the_fix() {
        let mut report = HostReport::default();
        report.push("a", Status::Pass, "fine", None);
        assert!(report.ok());
        report.push("b", Status::Fail, "broken", Some("do this"));
        assert!(!report.ok());
        let text = report.to_string();
        assert!(text.contains("FAIL  b: broken"));
        assert!(text.contains("fix: do this"));
        assert!(text.ends_with("cannot run vmkit VMs"));
    }

    #[test]
    fn this_host_report_matches_dev_kvm() {
        let report = check_host();
        let kvm_usable = Kvm::new().is_ok();
        let first = &report.checks[0];
        assert_eq!(first.name, "/dev/kvm");
        assert_eq!(first.status == Status::Pass, kvm_usable);
        if !kvm_usable {
            eprintln!("no usable /dev/kvm: only the failure path was checked");
            assert!(!report.ok());
        }
    }
}
