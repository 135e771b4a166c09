//! Link the guest as a static, non-PIE image at a fixed address with no C runtime.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.ld");

    let bin = "builtin-guest";
    for arg in [
        // No crt0, no libc, no libgcc: everything the guest runs is in this crate and `core`,
        // so anything else it needed would show up as an undefined symbol at link time.
        "-nostdlib".to_string(),
        "-static".to_string(),
        format!("-Wl,-T,{}", script.display()),
        "-Wl,--build-id=none".to_string(),
        "-Wl,-z,norelro".to_string(),
        "-Wl,--no-undefined".to_string(),
    ] {
        println!("cargo:rustc-link-arg-bin={bin}={arg}");
    }
}
