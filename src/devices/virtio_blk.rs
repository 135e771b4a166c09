//! Disks: virtio-blk devices (`vmkit-virtio-blk`) over disk images (`vmkit-block-backend`),
//! on the virtio-mmio transport in the 32-bit MMIO hole.
//!
//! Disk `i` gets the register window at [`MMIO_BASE`]` + i * 0x1000` on the MMIO bus, one
//! KVM ioeventfd per queue on its `QueueNotify` register (datamatch = queue index, so a
//! notification costs no exit to the VMM), and an irqfd on GSI [`FIRST_GSI`]` + i`. The
//! guest finds it in `BootInfo::devices`: kind `VirtioBlock`, transport `VirtioMmio`, the
//! window's address and size, the GSI, and flags ([`FLAG_READ_ONLY`]).

use std::path::PathBuf;
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmkit_block_backend::{CacheMode, EngineKind, Format, OpenOptions};
use vmkit_guest_abi::{DeviceInfo, DeviceKind, Transport};
use vmkit_vcpu::{Bus, BusDevice};
use vmkit_virtio_blk::transport::mmio::{reg, MMIO_SIZE};
use vmkit_virtio_blk::transport::pci::{msix_vectors, BAR as VIRTIO_PCI_BAR};
use vmkit_virtio_blk::{
    BlockDevice, BlockOptions, EventFdInterrupt, MmioTransport, VirtioPciTransport,
};

use crate::devices::pci::PciRoot;
use crate::seccomp::IoThreadSpawner;
use vmm_sys_util::eventfd::EventFd;

/// Where the first disk's registers are (inside the MMIO hole at 0xC000_0000).
pub const MMIO_BASE: u64 = 0xD000_0000;
/// The GSI of the first disk's interrupt; disk `i` uses `FIRST_GSI + i`.
pub const FIRST_GSI: u32 = 5;
/// The last GSI the in-kernel IOAPIC has (24 pins), which bounds the number of disks.
pub const LAST_GSI: u32 = 23;
/// Disks a VM can have: one GSI each from [`FIRST_GSI`] to [`LAST_GSI`].
pub const MAX_DISKS: usize = (LAST_GSI - FIRST_GSI + 1) as usize;
/// Queues a disk may have at most (each is an I/O thread and an engine on the host).
pub const MAX_QUEUES: u16 = 32;
/// Bytes of a GET_ID answer.
pub const MAX_SERIAL_BYTES: usize = 20;
/// `DeviceInfo::flags` bit 0: the disk is read-only. A hint only: the driver must still
/// negotiate `VIRTIO_BLK_F_RO`.
pub const FLAG_READ_ONLY: u32 = 1;

/// The transport disks are attached with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskTransport {
    /// virtio-mmio version 2.
    #[default]
    Mmio,
    /// virtio-pci (modern), on the VM's PCI root complex, with MSI-X.
    Pci,
}

/// One disk, as `--disk` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image.
    pub path: PathBuf,
    /// Its format (given, never probed).
    pub format: Format,
    /// The host cache mode.
    pub cache: CacheMode,
    /// The I/O engine.
    pub engine: EngineKind,
    /// Attach read-only (the device offers `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// The GET_ID answer (at most [`MAX_SERIAL_BYTES`] bytes); empty for none.
    pub serial: String,
    /// Request queues (1 to [`MAX_QUEUES`]; more than one offers `VIRTIO_BLK_F_MQ`).
    pub queues: u16,
}

impl DiskConfig {
    /// A disk over `path` with the defaults: raw, writeback, io_uring, read-write, no
    /// serial, one queue.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            format: Format::Raw,
            cache: CacheMode::Writeback,
            engine: EngineKind::IoUring,
            read_only: false,
            serial: String::new(),
            queues: 1,
        }
    }
}

/// The guest memory the devices work in: clones of the VMM's `GuestMemoryMmap` share its
/// mappings, and keep them alive while a device's I/O threads run.
pub type Memory = GuestMemoryMmap;

/// A virtio-mmio block device on the MMIO bus.
pub struct MmioBlock(pub Arc<MmioTransport<Memory>>);

impl BusDevice for MmioBlock {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// Why a disk could not be attached.
pub type AttachError = String;

/// The image of `config`, opened once with an engine per queue.
fn open_disks(
    config: &DiskConfig,
) -> Result<Vec<Box<dyn vmkit_block_backend::AsyncDisk>>, AttachError> {
    let options = OpenOptions::new()
        .format(config.format)
        .cache(config.cache)
        .engine(config.engine)
        .read_only(config.read_only);
    vmkit_block_backend::open_queues(&config.path, &options, config.queues.into())
        .map_err(|e| e.to_string())
}

/// The device options `config` asks for, its I/O threads started by `spawner`.
fn block_options(config: &DiskConfig, spawner: &Arc<IoThreadSpawner>) -> BlockOptions {
    BlockOptions {
        serial: config.serial.as_bytes().to_vec(),
        spawner: spawner.clone(),
        ..BlockOptions::default()
    }
}

/// Attaches disk `index` as described by `config`: opens the image (one engine per queue),
/// builds the device, wires its interrupt and notifications into KVM and puts it on `mmio`.
/// Returns the device (drop it only after the vCPUs stopped) and its boot-information entry.
pub fn attach(
    index: usize,
    config: &DiskConfig,
    vm: &VmFd,
    memory: &Memory,
    mmio: &Bus,
    spawner: &Arc<IoThreadSpawner>,
) -> Result<(Arc<MmioTransport<Memory>>, DeviceInfo), AttachError> {
    if index >= MAX_DISKS {
        return Err(format!(
            "too many disks: at most {MAX_DISKS} (one interrupt line each)"
        ));
    }
    let gsi = FIRST_GSI + index as u32;
    let base = MMIO_BASE + index as u64 * MMIO_SIZE;
    let disks = open_disks(config)?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    vm.register_irqfd(&irq, gsi)
        .map_err(|e| format!("irqfd on GSI {gsi}: {e}"))?;
    let device = BlockDevice::new(
        disks,
        Arc::new(memory.clone()),
        Arc::new(EventFdInterrupt::new(irq)),
        block_options(config, spawner),
    )
    .map_err(|e| e.to_string())?;
    let transport = Arc::new(MmioTransport::new(device));
    let notify = base + reg::QUEUE_NOTIFY;
    for (queue, fd) in transport
        .ioeventfds()
        .map_err(|e| format!("eventfd: {e}"))?
    {
        // KVM keeps its own reference to the eventfd; this copy can go.
        vm.register_ioevent(&fd, &IoEventAddress::Mmio(notify), queue)
            .map_err(|e| format!("ioeventfd at {notify:#x} for queue {queue}: {e}"))?;
    }
    mmio.insert(base, MMIO_SIZE, Arc::new(MmioBlock(transport.clone())))
        .map_err(|e| e.to_string())?;
    let info = DeviceInfo {
        kind: DeviceKind::VirtioBlock as u32,
        transport: Transport::VirtioMmio as u32,
        address: base,
        size: MMIO_SIZE,
        irq: gsi,
        flags: if config.read_only { FLAG_READ_ONLY } else { 0 },
    };
    Ok((transport, info))
}

/// An attached disk, kept by the VMM until the vCPUs have stopped.
pub enum AttachedDisk {
    /// On virtio-mmio.
    Mmio(Arc<MmioTransport<Memory>>),
    /// On virtio-pci.
    Pci(Arc<VirtioPciTransport<Memory>>),
}

/// Attaches disk `index` as a virtio-pci function on `root`: opens the image (one engine per
/// queue), routes one MSI-X vector per queue (and one for configuration changes) through
/// KVM, and plugs the function into the next free slot; the guest finds it by enumerating
/// the bus. Its queue notifications become KVM ioeventfds wherever the guest places BAR 0.
pub fn attach_pci(
    config: &DiskConfig,
    memory: &Memory,
    root: &mut PciRoot,
    spawner: &Arc<IoThreadSpawner>,
) -> Result<Arc<VirtioPciTransport<Memory>>, AttachError> {
    let disks = open_disks(config)?;
    let routing = root
        .router()
        .allocate(msix_vectors(config.queues))
        .map_err(|e| format!("MSI-X routes: {e}"))?;
    let transport = Arc::new(
        VirtioPciTransport::build(
            disks,
            Arc::new(memory.clone()),
            block_options(config, spawner),
            Arc::new(routing),
        )
        .map_err(|e| e.to_string())?,
    );
    let ioevents = transport
        .notify_ioeventfds()
        .map_err(|e| format!("eventfd: {e}"))?
        .into_iter()
        .map(|(_queue, offset, fd)| (VIRTIO_PCI_BAR, offset, fd))
        .collect();
    root.add(transport.clone(), ioevents)?;
    Ok(transport)
}
