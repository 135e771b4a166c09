//! Helpers shared by the root integration tests.

/// Whether /dev/kvm can be opened; says so on stderr when it cannot, so a skipped test is seen.
pub fn kvm_available() -> bool {
    let ok = kvm_ioctls::Kvm::new().is_ok();
    if !ok {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
    }
    ok
}
