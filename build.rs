//! Builds the built-in guest (`guest/`, a separate `no_std` workspace with `panic = "abort"`)
//! with a nested cargo, and tells the crate where the ELF is (`VMKIT_BUILTIN_GUEST_PATH`,
//! embedded by `src/builtin_guest.rs`).

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest's target; also set in `guest/.cargo/config.toml`. Passed explicitly so the
/// artifact path below does not depend on config lookup.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const GUEST_BIN: &str = "builtin-guest";

fn main() {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let guest_dir = root.join("guest");
    let target_dir = out_dir.join("guest-target");

    for path in [
        "guest/src",
        "guest/Cargo.toml",
        "guest/Cargo.lock",
        "guest/build.rs",
        "guest/link.ld",
        "guest/.cargo/config.toml",
        "guest-abi/src",
        "guest-abi/Cargo.toml",
        // guest-abi inherits its version and edition from the workspace manifest.
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }

    let mut command = Command::new(&cargo);
    command
        .current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--target",
            GUEST_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer cargo describes *this* build to the build script through the environment
    // (profile, target, features, cfg, rustflags, clippy's wrapper, ...). Passed on, it would
    // rebuild the guest with the wrong flags or lint it as part of this crate, so drop all of
    // it and keep only the toolchain selection, the user's cargo home and the jobserver.
    for (name, _) in env::vars_os() {
        if leaks_from_outer_build(&name) {
            command.env_remove(&name);
        }
    }

    let output = command.output().unwrap_or_else(|error| {
        panic!(
            "building the built-in guest: cannot run {}: {error}",
            Path::new(&cargo).display()
        )
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        eprintln!("{stderr}");
        panic!(
            "building the built-in guest failed ({}): `cargo build --release` in {} (its output is above)",
            output.status,
            guest_dir.display()
        );
    }
    for line in stderr.lines().filter(|line| line.starts_with("warning")) {
        println!("cargo:warning=built-in guest: {line}");
    }

    let elf = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BIN);
    assert!(
        elf.is_file(),
        "the built-in guest built but {} is missing",
        elf.display()
    );
    println!("cargo:rustc-env=VMKIT_BUILTIN_GUEST_PATH={}", elf.display());
}

/// Whether an environment variable describes the outer build rather than the user's setup.
/// See "Environment variables Cargo sets for build scripts" in the Cargo book, plus what
/// clippy and rustup add.
fn leaks_from_outer_build(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        // The jobserver, so the nested build shares the outer build's job slots.
        "CARGO_MAKEFLAGS",
    ];
    const DROP: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "RUSTDOC",
        "TARGET",
        "HOST",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "OUT_DIR",
    ];
    if KEEP.contains(&name) {
        return false;
    }
    DROP.contains(&name)
        // CARGO, CARGO_PKG_*, CARGO_MANIFEST_*, CARGO_CFG_*, CARGO_FEATURE_*,
        // CARGO_ENCODED_RUSTFLAGS, CARGO_TARGET_DIR, CARGO_BUILD_*, CARGO_PRIMARY_PACKAGE, ...
        || name.starts_with("CARGO")
        || name.starts_with("__CARGO")
        || name.starts_with("DEP_")
        || name.starts_with("CLIPPY_")
}
