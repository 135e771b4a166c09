//! Assembling a VM from its definition: memory, VM, program, devices, vCPU threads.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmkit_guest_abi::{DeviceInfo, DeviceKind, Transport, EXIT_PORT, SERIAL_PORT};
use vmkit_memory::{Backing, GuestRam, KvmSlots, MemoryAccounting, MemoryConfig};
use vmkit_pci_passthrough::vfio::KvmDirectMapper;
use vmkit_vcpu::x86_64::boot::FlatBoot;
use vmkit_vcpu::{CpuidPolicy, IoBuses, RunningVm, VcpuStats, Vm, VmControl, VmEnd, VmRunner};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::{self, PciRoot};
use crate::devices::vfio::{self, AttachedVfio, KernelVfioContext};
use crate::devices::virtio_blk::{self, AttachedDisk};
use crate::devices::{
    DiskConfig, DiskTransport, ExitPort, SerialConsole, SerialOutput, VfioConfig, I8042,
};
use crate::linux::{self, BootConfig, Initrd, LoadedKernel};
use crate::program::{Program, ProgramError};
use crate::seccomp::{IoThreadSpawner, SeccompConfig, SeccompError, SeccompFilters, ThreadRole};

/// The GSI of COM1's interrupt (IRQ 4 on the PIC and IOAPIC).
pub const SERIAL_IRQ: u32 = 4;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(#[from] vmkit_memory::Error),
    /// The VM or its vCPUs could not be set up.
    #[error("VM: {0}")]
    Vcpu(#[from] vmkit_vcpu::Error),
    /// The program could not be loaded.
    #[error("program: {0}")]
    Program(#[from] ProgramError),
    /// A device could not be set up.
    #[error("device {device}: {source}")]
    Device {
        /// Which device.
        device: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A disk could not be attached.
    #[error("disk {index} ({path}): {reason}")]
    Disk {
        /// Its position among the disks, from 0.
        index: usize,
        /// Its image.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A passed-through device could not be attached.
    #[error("{device}: {reason}")]
    Vfio {
        /// The device, as the command line names it.
        device: String,
        /// What went wrong.
        reason: String,
    },
    /// The kernel could not be loaded.
    #[error("kernel: {0}")]
    Kernel(String),
    /// The PCI root complex could not be set up.
    #[error("PCI: {reason}")]
    Pci {
        /// What went wrong.
        reason: String,
    },
    /// The seccomp filters could not be loaded or applied.
    #[error("seccomp: {0}")]
    Seccomp(#[from] SeccompError),
}

/// What a VM is made of.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub cpus: usize,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// How guest RAM is backed.
    pub backing: Backing,
    /// Fault all guest RAM in before the guest starts.
    pub prefault: bool,
    /// The program to run.
    pub program: Program,
    /// Arguments passed to the program in its boot information.
    pub args: String,
    /// Copy the guest's serial output to standard output as it arrives.
    pub echo_serial: bool,
    /// Disks, attached as virtio-blk devices in this order.
    pub disks: Vec<DiskConfig>,
    /// The transport of the disks.
    pub disk_transport: DiskTransport,
    /// Passed-through PCI devices.
    pub vfio: Vec<VfioConfig>,
    /// A Linux kernel to boot instead of the program.
    pub kernel: Option<KernelConfig>,
    /// Which CPU features the guest sees.
    pub cpu_policy: CpuidPolicy,
    /// The seccomp filters of the VM's threads.
    pub seccomp: SeccompConfig,
}

/// A Linux kernel to boot, as `--kernel`, `--initrd` and `--cmdline` give it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// The kernel: a bzImage, or an ELF vmlinux.
    pub path: std::path::PathBuf,
    /// The initial RAM disk.
    pub initrd: Option<std::path::PathBuf>,
    /// The command line; `None` for [`DEFAULT_CMDLINE`].
    pub cmdline: Option<String>,
}

/// The kernel command line when none is given: the console on COM1, a reboot through the
/// keyboard controller (which ends the VM), and a reboot rather than a hang on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            cpus: 1,
            memory: 256 << 20,
            backing: Backing::Anonymous,
            prefault: false,
            program: Program::Builtin,
            args: String::new(),
            echo_serial: false,
            disks: Vec::new(),
            disk_transport: DiskTransport::Mmio,
            vfio: Vec::new(),
            kernel: None,
            cpu_policy: CpuidPolicy::default(),
            seccomp: SeccompConfig::default(),
        }
    }
}

/// A running VM and its devices.
pub struct Vmm {
    // Field order is drop order: vCPU threads end before the slots and RAM go away.
    running: RunningVm,
    // The disks stop their I/O threads when dropped, after the vCPUs (above) are gone.
    _disks: Vec<AttachedDisk>,
    // The PCI root complex (bus, BAR mapper, MSI routes) outlives its functions' users.
    _pci: Option<PciRoot>,
    // Passed-through devices: after the bus, so that their last reference (and their reset)
    // goes here, before their DMA mappings, the kernel's VFIO context and guest RAM.
    _vfio: Vec<AttachedVfio>,
    _kernel_vfio: KernelVfioContext,
    serial: SerialOutput,
    console: Arc<SerialConsole>,
    i8042: Arc<I8042>,
    exit_port: Arc<ExitPort>,
    _slots: KvmSlots,
    _vm: Vm,
    ram: GuestRam,
    io_spawner: Arc<IoThreadSpawner>,
    seccomp: Option<Arc<SeccompFilters>>,
    started: Instant,
    vcpus_started: Duration,
}

impl Vmm {
    /// Builds the VM described by `config` and starts its vCPUs. `started` is when the process
    /// (or the caller's measurement) began, for the start-up figures in the report.
    pub fn start(config: &VmConfig, started: Instant) -> Result<Vmm, Error> {
        let seccomp = SeccompFilters::load(&config.seccomp)?;
        // Device I/O threads start from here, under the io filter, whichever thread asks.
        let io_spawner =
            Arc::new(
                IoThreadSpawner::start(seccomp.clone()).map_err(|source| Error::Device {
                    device: "I/O thread spawner",
                    source,
                })?,
            );
        let ram = GuestRam::new(
            &MemoryConfig::new(config.memory)
                .with_backing(config.backing)
                .with_prefault(config.prefault),
        )?;
        let vm = Vm::new(config.cpus)?;
        let slots = vm.register_memory(&ram, false)?;

        let ranges: Vec<(u64, u64)> = ram.ranges().iter().map(|r| (r.start.0, r.size)).collect();
        let low_ram_end = ranges.first().map_or(0, |&(start, size)| start + size);
        // A flat program, or a Linux kernel (and its initrd).
        let image = match &config.kernel {
            None => BootImage::Flat(config.program.load(ram.memory(), low_ram_end)?),
            Some(kernel) => {
                let (loaded, initrd) = load_kernel(kernel, &ram)?;
                BootImage::Linux(Box::new(loaded), initrd)
            }
        };
        let buses = Arc::new(IoBuses::new());
        let mut disks = Vec::with_capacity(config.disks.len());
        let mut devices = Vec::with_capacity(config.disks.len());
        let mut pci = None;
        let pci_disks = config.disk_transport == DiskTransport::Pci && !config.disks.is_empty();
        if pci_disks || !config.vfio.is_empty() {
            let root = PciRoot::new(vm.fd().clone(), buses.clone())
                .map_err(|reason| Error::Pci { reason })?;
            // Flat programs find the functions by enumerating bus 0 through the ports.
            devices.push(DeviceInfo {
                kind: DeviceKind::PciHostBridge as u32,
                transport: Transport::PortIo as u32,
                address: pci::CONFIG_PORT,
                size: pci::CONFIG_PORT_COUNT,
                irq: 0,
                flags: 0,
            });
            pci = Some(root);
        }
        for (index, disk) in config.disks.iter().enumerate() {
            let disk_error = |reason| Error::Disk {
                index,
                path: disk.path.display().to_string(),
                reason,
            };
            match pci.as_mut().filter(|_| pci_disks) {
                Some(root) => {
                    let device = virtio_blk::attach_pci(disk, ram.memory(), root, &io_spawner)
                        .map_err(disk_error)?;
                    disks.push(AttachedDisk::Pci(device));
                }
                None => {
                    let (device, info) = virtio_blk::attach(
                        index,
                        disk,
                        vm.fd(),
                        ram.memory(),
                        &buses.mmio,
                        &io_spawner,
                    )
                    .map_err(disk_error)?;
                    disks.push(AttachedDisk::Mmio(device));
                    devices.push(info);
                }
            }
        }
        let mut vfio = Vec::with_capacity(config.vfio.len());
        let mut kernel_vfio = None;
        if let Some(root) = pci.as_mut() {
            let mapper = Arc::new(KvmDirectMapper::new(vm.fd().clone(), vfio::BAR_SLOTS));
            for (index, device) in config.vfio.iter().enumerate() {
                // INTx lines take IOAPIC pins from the top down; virtio-mmio disks take
                // them from the bottom up (their GSIs are 5 + disk index).
                let mmio_disks = if pci_disks { 0 } else { config.disks.len() };
                let intx_gsi = u32::try_from(index)
                    .ok()
                    .and_then(|index| virtio_blk::LAST_GSI.checked_sub(index))
                    .filter(|&gsi| gsi >= virtio_blk::FIRST_GSI + mmio_disks as u32);
                let attached = vfio::attach(
                    device,
                    vm.fd(),
                    &ram,
                    root,
                    &mut kernel_vfio,
                    &mapper,
                    intx_gsi,
                )
                .map_err(|reason| Error::Vfio {
                    device: device.describe(),
                    reason,
                })?;
                vfio.push(attached);
            }
        }
        let boot = match image {
            BootImage::Flat(program) => BootState::Flat(Box::new(
                FlatBoot {
                    entry: program.entry,
                    image_end: program.image_end,
                    cpu_count: config.cpus as u32,
                    ram: ranges,
                    devices,
                    args: program_args(config).into_bytes(),
                }
                .write(ram.memory())?,
            )),
            BootImage::Linux(kernel, initrd) => {
                let cmdline = kernel_cmdline(config, &devices);
                let cmdline = kernel.cmdline(&cmdline).map_err(linux_error)?;
                let entry = linux::configure(
                    ram.memory(),
                    &BootConfig {
                        kernel: &kernel,
                        initrd,
                        cmdline: &cmdline,
                        e820: &ram.e820(),
                        cpu_count: config.cpus as u32,
                        protocol: kernel.default_protocol(),
                        pci_intx: &vfio
                            .iter()
                            .filter_map(AttachedVfio::intx_route)
                            .collect::<Vec<_>>(),
                    },
                )
                .map_err(linux_error)?;
                BootState::Linux(Box::new(
                    entry.entry_state(ram.memory()).map_err(linux_error)?,
                ))
            }
        };

        let serial = SerialOutput::new(config.echo_serial);
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Device {
            device: "serial",
            source,
        })?;
        vm.fd()
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| Error::Device {
                device: "serial",
                source: e.into(),
            })?;
        let console = Arc::new(SerialConsole::new(serial_irq, serial.clone()));
        buses.pio.insert(
            u64::from(SERIAL_PORT),
            SerialConsole::PORT_COUNT,
            console.clone(),
        )?;
        // The keyboard controller's reset line: how Linux reboots (reboot=k).
        let i8042 = Arc::new(I8042::new());
        buses.pio.insert(
            u64::from(I8042::BASE_PORT),
            I8042::PORT_COUNT,
            i8042.clone(),
        )?;
        let exit_port = Arc::new(ExitPort::new());
        buses.pio.insert(
            u64::from(EXIT_PORT),
            ExitPort::PORT_COUNT,
            exit_port.clone(),
        )?;

        let vcpus = vm.create_vcpus_with(&config.cpu_policy)?;
        match &boot {
            BootState::Flat(layout) => {
                for vcpu in &vcpus {
                    layout.entry_state(vcpu.index as u32).apply(&vcpu.fd)?;
                }
            }
            // Only the boot vCPU: the others wait for the kernel's INIT/SIPI.
            BootState::Linux(state) => {
                if let Some(bsp) = vcpus.first() {
                    state.apply(&bsp.fd)?;
                }
            }
        }
        // The devices that end the VM hold its control before the guest's first instruction.
        let mut runner = VmRunner::new(vcpus, buses);
        if let Some(filters) = seccomp.clone() {
            runner = runner.on_thread_start(Arc::new(move |_index| {
                filters.apply(ThreadRole::Vcpu).map_err(|e| e.to_string())
            }));
        }
        exit_port.connect(runner.control());
        i8042.connect(runner.control());
        let running = runner.start()?;
        let vcpus_started = started.elapsed();
        Ok(Vmm {
            running,
            _disks: disks,
            _pci: pci,
            _vfio: vfio,
            _kernel_vfio: kernel_vfio,
            serial,
            console,
            exit_port,
            i8042,
            _slots: slots,
            _vm: vm,
            ram,
            io_spawner,
            seccomp,
            started,
            vcpus_started,
        })
    }

    /// Pause, resume and stop the VM from another thread.
    pub fn control(&self) -> VmControl {
        self.running.control()
    }

    /// Confines the calling thread (the one that started the VM) to the **main** seccomp
    /// filter, for what it still does: wait, report and tear the VM down. Does nothing when
    /// seccomp is off.
    pub fn confine_main_thread(&self) -> Result<(), SeccompError> {
        match &self.seccomp {
            Some(filters) => filters.apply(ThreadRole::Main),
            None => Ok(()),
        }
    }

    /// Starts a thread of the VMM's own I/O (such as console input) under the io filter.
    pub fn spawn_io_thread(
        &self,
        name: &str,
        work: vmkit_virtio_blk::spawner::ThreadWork,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        self.io_spawner.spawn_thread(name.to_string(), work)
    }

    /// The guest's RAM (for tests and tools that inspect it).
    pub fn memory(&self) -> &GuestRam {
        &self.ram
    }

    /// The serial console, to type into ([`SerialConsole::enqueue_input`]).
    pub fn console(&self) -> Arc<SerialConsole> {
        self.console.clone()
    }

    /// What the guest has written to the serial port so far.
    pub fn serial_output(&self) -> Vec<u8> {
        self.serial.captured()
    }

    /// Waits for the VM to end and reports.
    pub fn wait(self) -> RunReport {
        let outcome = self.running.wait();
        // Measured while guest RAM is still mapped, so resident guest pages are counted.
        let memory = self.ram.accounting().ok();
        let first_byte = self.serial.first_byte_at();
        RunReport {
            exit_status: self.exit_port.status(),
            guest_reset: self.i8042.reset_requested(),
            end: outcome.end,
            serial: self.serial.captured(),
            stats: outcome.stats,
            memory,
            vcpus_started: self.vcpus_started,
            first_serial_byte: first_byte.map(|at| at.duration_since(self.started)),
            first_serial_byte_unix: first_byte.map(unix_time_at),
        }
    }
}

/// What the boot vCPU runs: a flat program, or a Linux kernel with its initrd.
enum BootImage {
    Flat(crate::program::LoadedProgram),
    Linux(Box<LoadedKernel>, Option<Initrd>),
}

/// The vCPUs' start: every vCPU in a flat program, or the boot vCPU in a kernel.
enum BootState {
    Flat(Box<vmkit_vcpu::x86_64::boot::FlatBootLayout>),
    Linux(Box<vmkit_vcpu::x86_64::boot::EntryState>),
}

fn linux_error(error: linux::Error) -> Error {
    Error::Kernel(error.to_string())
}

/// Loads `kernel` and its initrd into guest RAM.
fn load_kernel(
    kernel: &KernelConfig,
    ram: &GuestRam,
) -> Result<(LoadedKernel, Option<Initrd>), Error> {
    let open = |path: &std::path::Path| {
        std::fs::File::open(path)
            .map_err(|e| Error::Kernel(format!("cannot read {}: {e}", path.display())))
    };
    let loaded = linux::loader::load_kernel(ram.memory(), &mut open(&kernel.path)?)
        .map_err(|e| Error::Kernel(format!("{}: {e}", kernel.path.display())))?;
    let initrd = match &kernel.initrd {
        Some(path) => Some(
            linux::loader::load_initrd(ram.memory(), &loaded, &mut open(path)?)
                .map_err(|e| Error::Kernel(format!("{}: {e}", path.display())))?,
        ),
        None => None,
    };
    Ok((loaded, initrd))
}

/// The kernel's command line: the user's (or [`DEFAULT_CMDLINE`]), then one
/// `virtio_mmio.device=` per virtio-mmio disk, which kernels built with
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` find their disks by.
fn kernel_cmdline(config: &VmConfig, devices: &[DeviceInfo]) -> String {
    let mut cmdline = config
        .kernel
        .as_ref()
        .and_then(|k| k.cmdline.clone())
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    for device in devices {
        if device.kind == DeviceKind::VirtioBlock as u32
            && device.transport == Transport::VirtioMmio as u32
        {
            cmdline.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                device.size >> 10,
                device.address,
                device.irq
            ));
        }
    }
    cmdline
}

/// The arguments the program gets: `--args`, and for the built-in guest one `serialN=ID`
/// word per disk with a serial, so that it can check each disk's GET_ID answer.
fn program_args(config: &VmConfig) -> String {
    let mut args = config.args.clone();
    if config.program == Program::Builtin {
        for (index, disk) in config.disks.iter().enumerate() {
            if !disk.serial.is_empty() {
                args.push_str(&format!(" serial{index}={}", disk.serial));
            }
        }
    }
    args.trim_start().to_string()
}

/// The wall-clock time of `instant`, so another process can compare it with its own clock.
fn unix_time_at(instant: Instant) -> Duration {
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now_unix.saturating_sub(instant.elapsed())
}

/// What a finished VM reports.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The status the guest wrote to the exit port, if it did.
    pub exit_status: Option<u32>,
    /// The guest reset the machine through the keyboard controller (how Linux reboots, and
    /// powers off without ACPI): the VM ended there, as it should.
    pub guest_reset: bool,
    /// Why the VM ended.
    pub end: VmEnd,
    /// Everything the guest wrote to the serial port.
    pub serial: Vec<u8>,
    /// Per-vCPU statistics.
    pub stats: Vec<VcpuStats>,
    /// Memory accounting at the end of the run (None if /proc could not be read).
    pub memory: Option<MemoryAccounting>,
    /// From `started` to all vCPU threads running.
    pub vcpus_started: Duration,
    /// From `started` to the guest's first serial byte.
    pub first_serial_byte: Option<Duration>,
    /// Wall-clock time (since the Unix epoch) of the guest's first serial byte.
    pub first_serial_byte_unix: Option<Duration>,
}

impl RunReport {
    /// Whether the guest ended through the exit port with status 0, or reset the machine
    /// (a kernel's reboot or power-off).
    pub fn success(&self) -> bool {
        self.end == VmEnd::Stopped
            && (self.exit_status == Some(vmkit_guest_abi::EXIT_SUCCESS)
                || (self.exit_status.is_none() && self.guest_reset))
    }

    /// The process exit code for this run: 0 on success, else non-zero (the guest's status
    /// where it gave one that fits, 1 otherwise).
    pub fn exit_code(&self) -> i32 {
        match (self.success(), self.exit_status) {
            (true, _) => 0,
            (false, Some(status)) if (1..=255).contains(&status) && self.end == VmEnd::Stopped => {
                status as i32
            }
            _ => 1,
        }
    }

    /// One line saying how the VM ended.
    pub fn describe_end(&self) -> String {
        match (&self.end, self.exit_status) {
            (VmEnd::Stopped, Some(status)) => format!("guest exited with status {status}"),
            (VmEnd::Stopped, None) if self.guest_reset => I8042::RESET_REASON.into(),
            (VmEnd::Stopped, None) => "stopped by the VMM".into(),
            (VmEnd::AllHalted, _) => "every vCPU halted".into(),
            (VmEnd::Shutdown { index, state }, _) => {
                format!("vCPU {index} shut down (triple fault): {state}")
            }
            (VmEnd::SystemEvent { index, event }, _) => {
                format!("vCPU {index} requested {event:?}")
            }
            (VmEnd::Error(error), _) => error.to_string(),
        }
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let vcpus: Vec<serde_json::Value> = self
            .stats
            .iter()
            .map(|s| {
                let exits: serde_json::Map<String, serde_json::Value> = s
                    .exits
                    .iter()
                    .map(|(name, count)| (name.to_string(), count.into()))
                    .collect();
                serde_json::json!({
                    "index": s.index,
                    "thread_id": s.thread_id,
                    "exits": exits,
                    "exits_total": s.exits.total(),
                    "kvm_run_us": s.kvm_run_time.as_micros() as u64,
                    "exit_handling_us": s.exit_handling_time.as_micros() as u64,
                    "guest_time_ms": s.guest_time.as_millis() as u64,
                    "pending_interrupt_vectors": s.pending_vectors().collect::<Vec<u8>>(),
                })
            })
            .collect();
        let memory = self.memory.map(|m| {
            serde_json::json!({
                "guest_size": m.guest_size,
                "guest_resident": m.guest_resident,
                "vmm_overhead_resident": m.vmm_resident,
                "process_resident": m.process_resident,
            })
        });
        serde_json::json!({
            "success": self.success(),
            "exit_status": self.exit_status,
            "end": self.describe_end(),
            "serial": String::from_utf8_lossy(&self.serial),
            "vcpus": vcpus,
            "memory": memory,
            "startup": {
                "vcpus_started_us": self.vcpus_started.as_micros() as u64,
                "first_serial_byte_us": self.first_serial_byte.map(|d| d.as_micros() as u64),
                "first_serial_byte_unix_ns": self.first_serial_byte_unix.map(|d| d.as_nanos() as u64),
            },
        })
    }
}
