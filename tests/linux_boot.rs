//! Booting Linux with the example VM.
//!
//! The default run checks that bad kernels, initrds and command lines are clear errors. The
//! boot of a real kernel is opt-in, because on these hosts (a nested, paravirtualized KVM
//! that emulates guest code at CPL0) it takes about 40 s before the host's emulator gives
//! up on an instruction:
//!
//! ```sh
//! cargo test --release --test linux_boot -- --ignored --nocapture
//! ```
//!
//! It boots Debian's cloud kernel on two vCPUs (prepared by `scripts/prepare-debian-guest.sh`,
//! which it runs if `target/debian-guest` is empty) until the kernel prints its banner, its
//! E820 map and the two CPUs it found in the ACPI tables, and checks how the run ends: on a host with hardware virtualization the guest's init
//! writes a file on its disk and resets the machine (exit 0); on these hosts the VM ends with
//! the emulation error, reported with its RIP and reason (exit 1), not a hang or a panic.

mod common;
use common::{example, kvm_available, run_with_timeout, vm};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn scratch(name: &str) -> PathBuf {
    common::scratch("linux-boot-tests", name)
}

fn stderr_of(args: &[&str]) -> (Option<i32>, String) {
    let output = vm(args);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_kernels_initrds_and_command_lines_are_clear_errors() {
    if !kvm_available() {
        return;
    }
    let not_a_kernel = scratch("not-a-kernel");
    std::fs::write(&not_a_kernel, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    let truncated = scratch("truncated-elf");
    // An ELF header that claims a segment the file does not hold.
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1;
    elf[16] = 2; // ET_EXEC
    elf[18] = 0x3e; // x86-64
    elf[32] = 64; // program headers right after the header...
    elf[54] = 56; // ...of 56 bytes...
    elf[56] = 1; // ...one of them, which the file does not hold
    std::fs::write(&truncated, &elf).unwrap();
    for (kernel, expected) in [
        (&not_a_kernel, "not-a-kernel"),
        (&truncated, "truncated-elf"),
        (&scratch("missing"), "cannot read"),
    ] {
        let (code, stderr) = stderr_of(&["run", "--kernel", kernel.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    // The rest needs a kernel that loads: the prepared Debian one, if it is there.
    let guest = debian_guest_dir();
    let vmlinux = guest.join("vmlinux");
    if !vmlinux.exists() {
        eprintln!(
            "SKIPPED (in part): no {} (scripts/prepare-debian-guest.sh makes it); the initrd and \
             command line checks need a kernel",
            vmlinux.display()
        );
        return;
    }
    let vmlinux = vmlinux.to_str().unwrap();
    // An initrd bigger than guest RAM.
    let big = scratch("big-initrd");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(300 << 20).unwrap();
    let (code, stderr) = stderr_of(&[
        "run",
        "--kernel",
        vmlinux,
        "--initrd",
        big.to_str().unwrap(),
        "--memory",
        "256M",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("big-initrd"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A command line longer than the kernel takes (2048 bytes with its NUL).
    let long = "x".repeat(3000);
    let (code, stderr) = stderr_of(&["run", "--kernel", vmlinux, "--cmdline", &long]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("command line"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn debian_guest_dir() -> PathBuf {
    std::env::var_os("VMKIT_DEBIAN_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian-guest"))
}

#[test]
#[ignore = "boots a real kernel for about a minute on these hosts; run with --ignored"]
fn the_debian_kernel_prints_its_banner_and_e820_map_and_its_end_is_reported() {
    if !kvm_available() {
        return;
    }
    let guest = debian_guest_dir();
    if !guest.join("vmlinux").exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prepare-debian-guest.sh");
        let status = Command::new(script)
            .arg(&guest)
            .status()
            .expect("run the script");
        assert!(status.success(), "scripts/prepare-debian-guest.sh failed");
    }
    let path = |name: &str| guest.join(name).to_str().unwrap().to_string();
    let disk = format!("path={},cache=none", path("disk.img"));
    let output = run_with_timeout(
        Command::new(example("vm")).args([
            "run",
            "--kernel",
            &path("vmlinux"),
            "--initrd",
            &path("initramfs.cpio.gz"),
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1",
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--transport",
            "pci",
            "--disk",
            &disk,
        ]),
        Duration::from_secs(600),
    );
    let console = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{console}\n{stderr}");
    assert!(console.contains("Linux version"), "no banner");
    // The E820 map as the VMM gave it: low RAM, the reserved BIOS area, RAM above 1 MiB.
    assert!(
        console.contains("BIOS-provided physical RAM map"),
        "no E820 map"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "low RAM missing from the E820 map"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        "RAM above 1 MiB missing from the E820 map"
    );
    // Both vCPUs, found in the ACPI tables (this kernel reads no MP table).
    assert!(console.contains("ACPI: Using ACPI (MADT) for SMP configuration information"));
    assert!(
        console.contains("smpboot: Allowing 2 CPUs"),
        "not both vCPUs"
    );
    assert!(!stderr.contains("panicked"), "the VMM panicked");
    match output.status.code() {
        // Hardware virtualization: the guest's init wrote its file and reset the machine.
        Some(0) => {
            assert!(console.contains("vmkit-guest: wrote and read /mnt/hello.txt"));
            assert!(
                stderr.contains("reset requested by the guest (i8042)"),
                "{stderr}"
            );
        }
        // These hosts: the emulator gives up, and the end says where and why.
        Some(1) => {
            assert!(stderr.contains("KVM internal error"), "{stderr}");
            assert!(stderr.contains("RIP=0x"), "{stderr}");
        }
        other => panic!("unexpected exit {other:?}"),
    }
}
