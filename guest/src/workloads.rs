//! The workloads vCPU 0 runs (compute, touch) and the progress loop of `spin`.

use core::fmt;
use core::hint::black_box;
use core::ptr;

use vmkit_guest_abi::BootInfo;

use crate::sync::SpinLock;

/// The compute workload counts the primes below this limit...
pub const PRIME_LIMIT: usize = 100_000;
/// ...and there are this many (the well-known value of π(10^5)).
pub const PRIMES_BELOW_LIMIT: u64 = 9592;

/// The sieve's buffer: a static in `.bss`, because the vCPU stacks hold only 64 KiB.
static SIEVE: SpinLock<[bool; PRIME_LIMIT]> = SpinLock::new([false; PRIME_LIMIT]);

/// Counts the primes below `limit` (at most [`PRIME_LIMIT`]) with the sieve of Eratosthenes.
pub fn count_primes(limit: usize) -> u64 {
    let mut sieve = SIEVE.lock();
    let limit = limit.min(sieve.len());
    let is_prime = &mut sieve[..limit];
    is_prime.fill(true);
    for flag in is_prime.iter_mut().take(2) {
        *flag = false;
    }
    let mut i = 2;
    while i * i < limit {
        if is_prime[i] {
            for flag in is_prime[i * i..].iter_mut().step_by(i) {
                *flag = false;
            }
        }
        i += 1;
    }
    is_prime.iter().filter(|&&p| p).count() as u64
}

/// Runs the prime count `runs` times and checks every result; returns the wrong count if any.
pub fn compute(runs: u64) -> Result<(), u64> {
    for _ in 0..runs {
        // black_box keeps the optimizer from computing the result once (or at compile time).
        let count = count_primes(black_box(PRIME_LIMIT));
        if count != PRIMES_BELOW_LIMIT {
            return Err(count);
        }
    }
    Ok(())
}

/// Free memory too small for a workload.
#[derive(Clone, Copy, Debug)]
pub struct NoMemory {
    /// Bytes the workload needs (`None` when that does not even fit in a `u64`).
    pub needed: Option<u64>,
    /// Bytes free.
    pub free: u64,
}

impl fmt::Display for NoMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.needed {
            Some(needed) => write!(f, "needs {needed} bytes")?,
            None => write!(f, "needs more than 2^64 bytes")?,
        }
        write!(
            f,
            " but only {} bytes ({} MiB) are free",
            self.free,
            self.free >> 20
        )
    }
}

/// Checks that `bytes` of free memory exist and returns where they start.
fn free_range(info: &BootInfo, bytes: Option<u64>) -> Result<u64, NoMemory> {
    let free = info.free_memory_end.saturating_sub(info.free_memory_start);
    match bytes {
        Some(needed) if needed <= free => Ok(info.free_memory_start),
        needed => Err(NoMemory { needed, free }),
    }
}

/// Writes one byte into every 4 KiB page of the first `mib` MiB of free memory, so the host sees
/// them resident (and dirty).
pub fn touch(info: &BootInfo, mib: u64) -> Result<(), NoMemory> {
    const PAGE: u64 = 4096;
    let bytes = mib.checked_mul(1 << 20);
    let start = free_range(info, bytes)?;
    let end = start + bytes.unwrap_or(0);
    for address in (start..end).step_by(PAGE as usize) {
        let byte = ptr::with_exposed_provenance_mut::<u8>(address as usize);
        // SAFETY: the page lies in [free_memory_start, free_memory_end), identity-mapped RAM
        // that the contract gives the program; nothing else in the guest uses it.
        unsafe { byte.write_volatile(0xa5) };
    }
    Ok(())
}

/// Bytes between two vCPUs' `spin` counters: a cache line each, so they do not contend.
pub const SPIN_COUNTER_STRIDE: u64 = 64;

/// Checks that the `spin` counters of `cpu_count` vCPUs fit in free memory.
pub fn check_spin_counters(info: &BootInfo) -> Result<(), NoMemory> {
    let needed = u64::from(info.cpu_count).checked_mul(SPIN_COUNTER_STRIDE);
    free_range(info, needed).map(|_| ())
}

/// Increments this vCPU's counter at `free_memory_start + 64 * cpu` forever, with volatile
/// writes so the host can watch progress. [`check_spin_counters`] must have passed.
pub fn spin(info: &BootInfo, cpu: u32) -> ! {
    let address = info.free_memory_start + SPIN_COUNTER_STRIDE * u64::from(cpu);
    let counter = ptr::with_exposed_provenance_mut::<u64>(address as usize);
    let mut count = 0u64;
    loop {
        count = count.wrapping_add(1);
        // SAFETY: check_spin_counters put every counter inside the free memory, and it is
        // 8-byte aligned because free_memory_start is page-aligned (checked at boot); each vCPU
        // writes only its own.
        unsafe { counter.write_volatile(count) };
    }
}
