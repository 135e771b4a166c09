//! The memory functions the compiler calls (`memcpy` and friends). With no libc, the guest
//! must provide them; `compiler_builtins`' versions need the unstable `mem` feature.
//!
//! They are written with string instructions in inline asm, not Rust loops: the optimizer
//! recognizes a byte-copy loop as a `memcpy` idiom and would compile `memcpy` into a call to
//! itself. `memcmp` reads through `read_volatile` for the same reason. All of them rely on the
//! direction flag being clear, which the ABI guarantees at every call (and the entry state at
//! program start).

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`; the ranges must not overlap.
///
/// # Safety
/// The C contract: `src` valid for reads and `dest` for writes of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: `rep movsb` copies RCX bytes from [RSI] to [RDI] upwards (DF is clear); the
    // caller guarantees both ranges.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        )
    };
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
/// As for [`memcpy`].
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: an upward copy never reads a byte it already
        // overwrote.
        // SAFETY: as in memcpy.
        return unsafe { memcpy(dest, src, n) };
    }
    // `dest` lies inside `[src, src + n)`: copy downwards, from the last byte.
    // SAFETY: with DF set, `rep movsb` copies RCX bytes from [RSI] to [RDI] downwards; RSI and
    // RDI point at the last byte of each range (n > 0 here, since dest - src < n). DF is
    // cleared again before the block ends, as the ABI requires.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        )
    };
    dest
}

/// Sets `n` bytes at `dest` to `c as u8`.
///
/// # Safety
/// The C contract: `dest` valid for writes of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: `rep stosb` stores AL into RCX bytes upwards from [RDI] (DF is clear); the caller
    // guarantees the range.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        )
    };
    dest
}

/// Compares `n` bytes; returns the difference of the first differing pair (as unsigned bytes).
///
/// # Safety
/// The C contract: `a` and `b` valid for reads of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, and the caller guarantees n readable bytes at both. Volatile keeps the
        // optimizer from turning this loop into a call to memcmp/bcmp.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Returns 0 if `n` bytes are equal, non-zero otherwise (LLVM emits calls to it for `==`).
///
/// # Safety
/// As for [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
