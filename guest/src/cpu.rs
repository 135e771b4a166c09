//! Unprivileged CPU helpers. Everything here must work at CPL3: no `hlt`, `cli`/`sti`, control
//! registers or MSRs (those would fault, and with no IDT a fault is a triple fault).

use core::arch::asm;

/// Reads the time-stamp counter (`rdtsc` is allowed at CPL3 because the VMM leaves `CR4.TSD`
/// clear).
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` only reads the TSC into EDX:EAX.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// TSC ticks in `seconds`, assuming the TSC runs at 1 GHz or faster: a timeout measured with it
/// lasts at most `seconds` (less on a faster TSC), which is what a give-up bound needs.
pub const fn ticks_for_seconds(seconds: u64) -> u64 {
    seconds * 1_000_000_000
}

/// Waits until `done` returns true or `ticks` TSC ticks have passed; returns whether `done`
/// became true. Spins with `pause`, since there are no interrupts to sleep on.
pub fn wait_until(ticks: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = rdtsc();
    loop {
        if done() {
            return true;
        }
        if rdtsc().wrapping_sub(start) > ticks {
            return done();
        }
        core::hint::spin_loop();
    }
}

/// Spins forever with `pause` (the guest cannot halt at CPL3).
pub fn idle() -> ! {
    loop {
        core::hint::spin_loop();
    }
}
