//! vmkit's built-in guest: a flat 64-bit program that every vCPU enters at CPL3 (see the
//! boot contract in `vmkit_guest_abi`). vCPU 0 greets, waits for every vCPU to check in, runs
//! the workloads the arguments ask for, and ends the VM through the exit port. README.md has
//! the arguments and exit statuses.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod args;
mod cpu;
mod exit;
mod io;
mod mem;
mod pci;
mod serial;
mod sync;
mod testdev;
mod virtio_blk;
mod workloads;

use core::fmt::Write;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmkit_guest_abi::BootInfo;

use exit::{exit, status};

/// Set by vCPU 0 once it has printed the greeting and published the arguments.
static GREETED: AtomicBool = AtomicBool::new(false);
/// The `spin` argument, published to the other vCPUs through [`GREETED`].
static SPIN: AtomicBool = AtomicBool::new(false);
/// How many vCPUs have printed their `cpu N online` line.
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);

/// How long vCPU 0 waits for the others to check in.
const CHECK_IN_TIMEOUT_SECONDS: u64 = 10;

/// The entry point of every vCPU. The contract's entry state is that of a call to this
/// function: `RDI` = the `BootInfo` address, `RSI` = the vCPU index, `RSP + 8` 16-byte aligned.
#[no_mangle]
extern "C" fn _start(boot_info: *const BootInfo, cpu: u64) -> ! {
    let info = match boot_info_ref(boot_info) {
        Ok(info) => info,
        Err(reason) => {
            // The VMM's ports are unknown: report through the contract's defaults, from vCPU 0
            // only, so that no other vCPU ends the VM before the message is out.
            if cpu == 0 {
                println!("error: invalid boot information at {boot_info:p}: {reason}");
                exit(status::BAD_BOOT_INFO);
            }
            cpu::idle();
        }
    };
    serial::set_port(info.serial_port);
    exit::set_port(info.exit_port);
    let cpu = match u32::try_from(cpu) {
        Ok(cpu) if cpu < info.cpu_count => cpu,
        _ => {
            println!(
                "error: vCPU index {cpu} out of range (cpu_count {})",
                info.cpu_count
            );
            exit(status::BAD_BOOT_INFO);
        }
    };
    if cpu == 0 {
        boot_cpu(info)
    } else {
        secondary_cpu(info, cpu)
    }
}

/// The `BootInfo` at `address` if it is one this program can read, else why not.
fn boot_info_ref(address: *const BootInfo) -> Result<&'static BootInfo, &'static str> {
    if address.is_null() || !address.is_aligned() {
        return Err("null or misaligned address");
    }
    // SAFETY: the VMM puts the block at this address in identity-mapped RAM before starting
    // any vCPU and never changes it afterwards; null and misaligned addresses were excluded.
    let info = unsafe { &*address };
    if !info.is_valid() {
        return Err("bad magic, version or size");
    }
    if info.cpu_count == 0 {
        return Err("cpu_count is 0");
    }
    // The workloads rely on this (page-aligned counters, a non-negative free size).
    if info.free_memory_start % 4096 != 0 || info.free_memory_start > info.free_memory_end {
        return Err("free memory range not page-aligned or inverted");
    }
    Ok(info)
}

/// vCPU 0: greets, releases the other vCPUs, waits for them, and runs the workloads.
fn boot_cpu(info: &'static BootInfo) -> ! {
    let args = args::parse(info.args()).unwrap_or_else(|error| {
        println!("error: {error}");
        exit(status::BAD_ARGUMENT)
    });
    if args.spin {
        // Checked before any vCPU starts spinning, since they all write their counters.
        if let Err(error) = workloads::check_spin_counters(info) {
            println!("error: spin: the progress counters {error}");
            exit(status::NO_MEMORY);
        }
    }
    SPIN.store(args.spin, Ordering::Relaxed);

    println!(
        "vmkit built-in guest: {} vCPUs, {} MiB RAM",
        info.cpu_count,
        info.ram_size >> 20
    );
    if args.print > 0 {
        let mut console = serial::lock();
        for _ in 0..args.print {
            let _ = console.write_str(".");
        }
        let _ = console.write_str("\n");
    }
    // Release: the secondaries read SPIN after seeing this.
    GREETED.store(true, Ordering::Release);
    check_in(0);

    let all_in = cpu::wait_until(cpu::ticks_for_seconds(CHECK_IN_TIMEOUT_SECONDS), || {
        CHECKED_IN.load(Ordering::Acquire) >= info.cpu_count
    });
    if !all_in {
        println!(
            "error: only {} of {} vCPUs checked in",
            CHECKED_IN.load(Ordering::Acquire),
            info.cpu_count
        );
        exit(status::CHECK_IN_TIMEOUT);
    }

    if args.compute > 0 {
        if let Err(count) = workloads::compute(args.compute) {
            println!(
                "error: compute: counted {count} primes below {}, expected {}",
                workloads::PRIME_LIMIT,
                workloads::PRIMES_BELOW_LIMIT
            );
            exit(status::COMPUTE_MISMATCH);
        }
        println!("compute: ok ({})", workloads::PRIMES_BELOW_LIMIT);
    }

    if args.crashload {
        virtio_blk::crashload(info);
    }
    match &args.iobench {
        // The benchmark replaces the disk checks, which would overwrite sectors 0-191.
        Some(bench) => virtio_blk::iobench(info, bench),
        None => {
            virtio_blk::check_all(info, info.args());
        }
    }
    // After the disks, which are reset by now: the DMA buffer reuses their free memory.
    testdev::check_all(info);

    if args.touch_mib > 0 {
        if let Err(error) = workloads::touch(info, args.touch_mib) {
            println!("error: touch={}: {error}", args.touch_mib);
            exit(status::NO_MEMORY);
        }
        println!("touched {} MiB", args.touch_mib);
    }

    if args.spin {
        println!("spinning");
        workloads::spin(info, 0);
    }
    println!("all tests passed");
    exit(args.exit)
}

/// Every vCPU but 0: waits for the greeting, checks in, then spins or idles until the VM ends.
fn secondary_cpu(info: &'static BootInfo, cpu: u32) -> ! {
    // Unbounded: if vCPU 0 never greets, it has ended (or will end) the VM itself.
    while !GREETED.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    check_in(cpu);
    if SPIN.load(Ordering::Relaxed) {
        workloads::spin(info, cpu);
    }
    cpu::idle()
}

/// Prints this vCPU's `online` line and counts it as present.
fn check_in(cpu: u32) {
    println!("cpu {cpu} online");
    CHECKED_IN.fetch_add(1, Ordering::AcqRel);
}

/// The unwinder's personality routine. Unoptimized builds link `core`'s precompiled unwind
/// tables, which name it; with `panic = "abort"` nothing ever unwinds, so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Prints the panic on the console and ends the VM with [`status::PANIC`].
#[panic_handler]
fn panic(panic: &PanicInfo<'_>) -> ! {
    let mut console = serial::panic_writer();
    let _ = match panic.location() {
        Some(location) => writeln!(console, "panic at {location}: {}", panic.message()),
        None => writeln!(console, "panic: {}", panic.message()),
    };
    drop(console);
    exit(status::PANIC)
}
