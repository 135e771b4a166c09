//! The built-in guest program.

/// The built-in guest: a static x86-64 ELF (source in `guest/`, built by `build.rs`), loaded at
/// guest-physical 2 MiB and started on every vCPU in 64-bit mode at CPL3 under the
/// [`vmkit_guest_abi`] boot contract. It tests the VMM end to end and reports on the serial
/// console.
///
/// # What it does
/// vCPU 0 prints `vmkit built-in guest: {cpu_count} vCPUs, {ram} MiB RAM`; then every vCPU
/// prints `cpu {i} online` once and checks in. vCPU 0 waits (at most about 10 s) for all of
/// them, runs a compute workload (counting the primes below 100 000) and prints
/// `compute: ok (9592)`, checks every virtio-blk disk in the boot information (see
/// `guest/README.md`: one line per check, e.g. `virtio-blk 0: GET_ID "vmkit0" OK (on 1 queue)`;
/// it overwrites sectors 0-191 of a writable disk), runs the workloads its arguments ask for, prints `all tests passed`
/// and ends the VM through the exit port. The other vCPUs idle in a `pause` loop.
///
/// # Arguments
/// Space-separated words in [`BootInfo::args`](vmkit_guest_abi::BootInfo::args), all optional;
/// numbers are decimal:
///
/// | argument | effect |
/// |---|---|
/// | `exit=N` | after a successful run, exit with status `N` instead of 0 |
/// | `print=N` | after the greeting, vCPU 0 prints a line of `N` `.` bytes (one port write each) |
/// | `compute=N` | run the compute workload `N` times instead of once (0 skips it), to keep the guest busy |
/// | `touch=K` | write one byte into every 4 KiB page of the first `K` MiB of free memory (`BootInfo::free_memory_start`), then print `touched {K} MiB` |
/// | `serialN=ID` | the GET_ID answer expected from virtio-blk disk `N` (at most 20 bytes; default empty); the example VMM adds one for each disk with a serial |
/// | `spin` | after the workloads, vCPU 0 prints `spinning`; every vCPU `i` increments a `u64` at `free_memory_start + 64 * i` forever (volatile writes, to watch progress from the host); the guest never exits |
///
/// # Exit status
/// | status | meaning |
/// |---|---|
/// | 0 (or `exit=N`) | all tests passed |
/// | 1 | not every vCPU checked in within about 10 s (`error: only N of M vCPUs checked in`) |
/// | 2 | the compute workload gave a wrong result |
/// | 3 | bad argument (`error: unknown argument '...'`, or a malformed value) |
/// | 4 | `touch=K` (or `spin`'s counters) does not fit in the free memory |
/// | 5 | a virtio-blk device could not be set up (`error: virtio-blk N: ...`) |
/// | 6 | a virtio-blk check failed: I/O status, data, ID or a 10 s timeout (`error: virtio-blk N: ...`) |
/// | 7 | `iobench` cannot run as asked (`error: iobench: ...`) |
/// | 8 | an `iobench` request failed (`error: iobench: ...`) |
/// | 9 | a check of the DMA test device failed (`error: testdev BB:DD.F: ...`) |
/// | 0xfe | invalid boot information (or vCPU index) |
/// | 0xff | the guest panicked (the message is on the console) |
pub const ELF: &[u8] = include_bytes!(env!("VMKIT_BUILTIN_GUEST_PATH"));
