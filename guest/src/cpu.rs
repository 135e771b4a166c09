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

/// The PIT's input clock, in Hz.
const PIT_HZ: u64 = 1_193_182;

/// Measures the TSC frequency in Hz against the PIT (the in-kernel i8254 KVM emulates from the
/// host's clock), the way Linux's `pit_calibrate_tsc` does: channel 2 counts down 65535 PIT
/// ticks (about 55 ms) in mode 0 with its gate raised through port 0x61, whose bit 5 shows
/// the channel's output going high at the end. Each port access is a trip to KVM (a few µs),
/// so the result is good to about 1e-4. `None` if the output never goes high (no PIT).
pub fn calibrate_tsc_hz() -> Option<u64> {
    const LATCH: u16 = 0xffff;
    // SAFETY: ports 0x61 (gate of channel 2, speaker off) and 0x42/0x43 (channel 2) drive
    // only the PIT's channel 2, which nothing else in the guest uses.
    let start = unsafe {
        let gate = crate::io::inb(0x61);
        crate::io::outb(0x61, (gate & !0x02) | 0x01);
        // Channel 2, low then high byte, mode 0, binary.
        crate::io::outb(0x43, 0xb0);
        crate::io::outb(0x42, (LATCH & 0xff) as u8);
        crate::io::outb(0x42, (LATCH >> 8) as u8);
        rdtsc()
    };
    // SAFETY: reading port 0x61 has no side effect.
    let out_high = || unsafe { crate::io::inb(0x61) } & 0x20 != 0;
    if !wait_until(ticks_for_seconds(1), out_high) {
        return None;
    }
    let ticks = rdtsc().wrapping_sub(start);
    Some((u128::from(ticks) * u128::from(PIT_HZ) / u128::from(LATCH)) as u64)
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
