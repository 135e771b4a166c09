//! The example VM: runs the built-in guest (or a given program) and reports.
//!
//! `cargo run --release --example vm` runs the built-in guest on one vCPU and exits 0 when it
//! reports success. `vm help` lists the options.

mod console;

use std::process::ExitCode;
use std::time::Instant;

use vmkit::cli::{self, Command};
use vmkit::Vmm;

fn main() -> ExitCode {
    // Start-up figures are measured from here.
    let started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match cli::parse(&args) {
        Ok(command) => command,
        Err(error) => {
            eprintln!("vm: {error}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Command::Config { definition } => {
            print!("{definition}");
            ExitCode::SUCCESS
        }
        Command::CheckHost => {
            let report = vmkit_vcpu::host_check::check_host();
            println!("{report}");
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run { config, json } => {
            let vmm = match Vmm::start(&config, started) {
                Ok(vmm) => vmm,
                Err(error) => {
                    eprintln!("vm: cannot start the VM: {error}");
                    return ExitCode::FAILURE;
                }
            };
            // A kernel's console is interactive; the flat programs never read theirs.
            let raw_terminal = if config.kernel.is_some() && !json {
                console::forward_stdin(&vmm);
                console::RawTerminal::enter()
            } else {
                None
            };
            // From here this thread only waits, reports and tears down.
            if let Err(error) = vmm.confine_main_thread() {
                eprintln!("vm: {error}");
                vmm.control().stop();
                let _ = vmm.wait();
                return ExitCode::FAILURE;
            }
            let report = vmm.wait();
            drop(raw_terminal);
            if json {
                println!("{}", report.to_json());
            } else {
                eprintln!("vm: {}", report.describe_end());
            }
            ExitCode::from(report.exit_code() as u8)
        }
    }
}
