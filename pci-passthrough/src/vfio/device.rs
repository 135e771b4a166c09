//! [`VfioPciDevice`]: the guest's view of a passed-through PCI function.
//!
//! # Configuration space
//! The model reads the device's configuration space once (after resetting it) and decides,
//! byte by byte, who answers the guest:
//!
//! - **The shadow only** (never written to the device): the BARs (sizing with all-ones
//!   works, type bits are read-only), the expansion ROM BAR (address and enable bit, sized
//!   from the ROM region; 0 without a ROM), the capability pointer and every capability's
//!   ID and `next` byte (so the list is the one the model decided on), the interrupt line
//!   (the firmware's scratch byte) and pin (0 unless the device has an INTx line the
//!   backend offers), the header type's multi-function bit (0: the function sits alone in
//!   its slot), and the MSI and MSI-X capabilities, which the model turns into `set_irqs`
//!   calls.
//! - **The shadow, forwarded**: the command register is answered from the shadow (the bus
//!   reads it after every write) and written through to the device. The model writes 0
//!   into it at attach, so the device neither decodes nor masters DMA until the guest asks.
//! - **The device**: everything else (IDs, class, status, passed-through capabilities,
//!   device-specific registers), read and written through the backend; a failed read
//!   answers all-ones. Two bits are filtered: status reports the capability list the guest
//!   sees, and PCI Express's "initiate function level reset" is dropped (resets go through
//!   the backend, which keeps the model's view in step).
//!
//! Extended configuration space (0x100-0xfff) reads 0 and ignores writes: extended
//! capabilities are not passed through.
//!
//! # Capabilities
//! The device's list is walked from 0x34 (at most 48 entries, stopping at a loop or a
//! pointer into the header). Each capability is then passed through, virtualized or hidden:
//! - passed through: the IDs in [`VfioPciOptions::passthrough_capabilities`], by default
//!   [`DEFAULT_PASSTHROUGH_CAPABILITIES`] (power management: a guest may put the device in
//!   D3hot; vendor-specific, e.g. virtio's; PCI Express, less FLR);
//! - virtualized: MSI and MSI-X, when the VMM gives a [`MsiAllocator`] and the backend has
//!   the interrupt index (the first of each; a second one is hidden);
//! - hidden: everything else (VPD, advanced features with its FLR bit, SATA, bridge
//!   subsystem IDs, debug port...). A hidden capability is unlinked (the `next` pointers are
//!   rewritten in the shadow) and its bytes read 0 and ignore writes.
//!
//! # BARs
//! BARs come from the region sizes (rounded up to a power of two) and the type bits of the
//! device's own BAR registers (I/O or memory, 32- or 64-bit, prefetchable). Trapped accesses
//! go to `region_read`/`region_write`; a failed read answers all-ones. With a
//! [`DirectMapper`], the mappable parts of memory BARs (page-aligned, without the pages
//! holding the MSI-X table and PBA) are mmapped once at attach and put into the guest where
//! the BAR decodes, moved in [`PciDevice::bar_moved`] and removed when decoding stops.
//!
//! # Expansion ROM
//! If the backend's ROM region (6) exists and is readable, the function has an expansion
//! ROM ([`PciDevice::rom_size`]): the region's size rounded up to a power of two, at least
//! 2 KiB (a region past 2 GiB is hidden). The bus places and maps it; guest reads (BAR
//! [`ROM_BAR_INDEX`], which is VFIO's region number) go to `region_read(ROM_REGION, ..)`,
//! bytes past the region and failed reads answer all-ones, and writes are dropped. It is
//! never mapped directly: firmware and drivers read it rarely, and kernel VFIO does not let
//! it be mmapped anyway.
//!
//! # Interrupts
//! One interrupt index at a time is connected (kernel VFIO refuses more): MSI-X if the guest
//! enabled it, else MSI, else INTx if the VMM connected it ([`VfioPciDevice::connect_intx`]).
//!
//! MSI-X: the table and PBA are trapped (even when the backend would let them be mapped)
//! and modelled by a [`MsixConfig`] routed through the VMM's sink. When
//! the guest enables MSI-X the backend gets one eventfd per vector, `set_irqs(MSIX_IRQ, 0,
//! ..)`: for a deliverable vector the sink's [`MsiRouting::eventfd`] (for KVM the irqfd of
//! the vector's GSI, so the interrupt never passes through the VMM); for a masked one (or
//! with the function masked) a *parking* eventfd of the model's. Masking or unmasking a
//! vector re-points just that vector. An interrupt on a parked vector stays in its parking
//! eventfd: a read of the PBA shows it as a pending bit, and unmasking delivers it (once,
//! however many came while masked). Limitations: an interrupt that races with the mask
//! write itself (between the route removal and the re-pointing, one ioctl) is lost, and
//! one raised both before and after a PBA read is delivered twice. Disabling MSI-X
//! disables the index and drops parked interrupts.
//!
//! MSI works the same way through an [`MsiConfig`]: `set_irqs(MSI_IRQ,
//! 0, ..)` with one eventfd per enabled vector (multiple message enable), per-vector masks
//! parking like MSI-X's, and the pending bits showing parked interrupts.
//!
//! INTx: the VMM creates a trigger eventfd and a resample eventfd, registers them with KVM
//! (`register_irqfd_with_resample` on the line's GSI) and hands them to
//! [`VfioPciDevice::connect_intx`]; the model passes them to `set_irqs(INTX_IRQ, 0,
//! [trigger])` and `set_intx_unmask(resample)` whenever INTx is the active index.
//!
//! # Lifetime
//! Attaching resets the device if it can; dropping the model removes the direct mappings,
//! disables interrupts and resets the device again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::backend::{
    BackendError, RegionInfo, VfioBackend, CONFIG_REGION, INTX_IRQ, MSIX_IRQ, MSI_IRQ, ROM_REGION,
};
use super::{DirectMapper, DirectMapping, MappedArea, VfioError};
use crate::bus::PciDevice;
use crate::config::{
    command, is_valid_rom_size, reg, rom_register_mask, BarKind, PciBar, CONFIG_SPACE_SIZE,
    MIN_ROM_SIZE, NUM_BARS, ROM_BAR_INDEX, STATUS_CAPABILITIES_LIST,
};
use crate::msi::{MsiCapability, MsiConfig, MSI_CAPABILITY_ID, MSI_CONTROL_OFFSET};
use crate::msix::{
    MsiAllocator, MsiKind, MsiRouting, MsixConfig, MAX_MSIX_VECTORS, MSIX_CAPABILITY_ID,
    MSIX_CONTROL_OFFSET, MSIX_ENABLE, MSIX_FUNCTION_MASK, MSIX_TABLE_ENTRY_SIZE,
};

/// Capability ID of power management.
const CAP_POWER_MANAGEMENT: u8 = 0x01;
/// Capability ID of vital product data.
const CAP_VPD: u8 = 0x03;
/// Capability ID of vendor-specific capabilities.
const CAP_VENDOR: u8 = 0x09;
/// Capability ID of the bridge subsystem vendor ID.
const CAP_BRIDGE_SUBSYSTEM: u8 = 0x0d;
/// Capability ID of PCI Express.
const CAP_PCI_EXPRESS: u8 = 0x10;
/// Capability ID of SATA configuration.
const CAP_SATA: u8 = 0x12;
/// Capability ID of advanced features.
const CAP_ADVANCED_FEATURES: u8 = 0x13;
/// PCI Express device control, high byte: bit 7 is "initiate function level reset".
const PCIE_DEVICE_CONTROL_HIGH: usize = 0x09;
const PCIE_INITIATE_FLR: u8 = 0x80;
/// Header type value of a type-0 (endpoint) function, without the multi-function bit.
const HEADER_TYPE_ENDPOINT: u8 = 0x00;
const HEADER_TYPE_MULTI_FUNCTION: u8 = 0x80;
/// A capability list longer than this (what fits in 192 bytes) is a loop.
const MAX_CAPABILITIES: usize = 48;
/// Capabilities start after the type-0 header.
const FIRST_CAPABILITY: usize = 0x40;

// The bus numbers the ROM as VFIO does, so one index serves both.
const _: () = assert!(ROM_BAR_INDEX as u32 == ROM_REGION);

/// Capabilities passed through by default: power management (0x01), vendor-specific (0x09)
/// and PCI Express (0x10).
pub const DEFAULT_PASSTHROUGH_CAPABILITIES: &[u8] =
    &[CAP_POWER_MANAGEMENT, CAP_VENDOR, CAP_PCI_EXPRESS];

/// How to attach a device.
pub struct VfioPciOptions<'a> {
    /// Where MSI and MSI-X vectors go (for KVM, `&Arc<KvmGsiRouter>`). Without it MSI and
    /// MSI-X are hidden from the guest.
    pub interrupts: Option<&'a dyn MsiAllocator>,
    /// Maps BAR memory straight into the guest. Without it every BAR access is trapped.
    pub direct_mapper: Option<Arc<dyn DirectMapper>>,
    /// Capability IDs passed through as they are; others are hidden, except MSI and
    /// MSI-X, which are virtualized.
    pub passthrough_capabilities: Vec<u8>,
}

impl Default for VfioPciOptions<'_> {
    fn default() -> Self {
        VfioPciOptions {
            interrupts: None,
            direct_mapper: None,
            passthrough_capabilities: DEFAULT_PASSTHROUGH_CAPABILITIES.to_vec(),
        }
    }
}

impl std::fmt::Debug for VfioPciOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciOptions")
            .field("interrupts", &self.interrupts.is_some())
            .field("direct_mapper", &self.direct_mapper.is_some())
            .field("passthrough_capabilities", &self.passthrough_capabilities)
            .finish()
    }
}

/// One BAR of the function.
#[derive(Clone, Debug)]
struct Bar {
    pci: PciBar,
    region: RegionInfo,
}

/// The function's expansion ROM.
#[derive(Clone, Copy, Debug)]
struct Rom {
    /// What the ROM BAR decodes: the region's size rounded up to a power of two (2 KiB at
    /// least).
    size: u64,
    /// Bytes of the region; reads past them answer all-ones.
    region_size: u64,
}

/// Where MSI-X lives: its capability and the table and PBA, as the device declares them.
#[derive(Clone, Copy, Debug)]
struct MsixLayout {
    capability: usize,
    table: Trap,
    pba: Trap,
}

/// What a trapped range of a BAR holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TrapKind {
    MsixTable,
    MsixPba,
}

/// A range of a BAR the model answers itself.
#[derive(Clone, Copy, Debug)]
struct Trap {
    kind: TrapKind,
    bar: u8,
    offset: u64,
    size: u64,
}

impl Trap {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }

    fn contains(&self, bar: u8, at: u64) -> bool {
        self.bar == bar && self.offset <= at && at < self.end()
    }
}

/// Who answers each byte of configuration space (fixed at attach).
struct ConfigLayout {
    /// Bits answered from the shadow (the rest from the device).
    shadow_bits: [u8; CONFIG_SPACE_SIZE],
    /// Shadow bits the guest may change.
    writable: [u8; CONFIG_SPACE_SIZE],
    /// Writes reach the device (the shadow bits as the shadow has them).
    forward: [bool; CONFIG_SPACE_SIZE],
    /// The MSI capability's bytes, answered by the [`MsiConfig`]: (offset, length).
    msi: Option<(usize, usize)>,
    /// The MSI-X capability's control bytes.
    msix_control: Option<usize>,
}

impl ConfigLayout {
    /// Whether the [`MsiConfig`] answers byte `at` (its registers; the ID and next pointer
    /// belong to the list).
    fn in_msi(&self, at: usize) -> bool {
        self.msi
            .is_some_and(|(offset, len)| (offset + MSI_CONTROL_OFFSET..offset + len).contains(&at))
    }

    /// A byte the model answers itself, with the initial value `value`.
    fn virtualize(
        &mut self,
        shadow: &mut [u8; CONFIG_SPACE_SIZE],
        at: usize,
        value: u8,
        writable: u8,
    ) {
        if at < CONFIG_SPACE_SIZE {
            shadow[at] = value;
            self.shadow_bits[at] = 0xff;
            self.writable[at] = writable;
            self.forward[at] = false;
        }
    }
}

/// The interrupt index connected to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IrqMode {
    None,
    Intx,
    Msi,
    MsiX,
}

/// The eventfds one MSI or MSI-X index of the backend signals, vector by vector.
struct VectorWiring {
    index: u32,
    routing: Arc<dyn MsiRouting>,
    /// Where a vector that cannot be delivered signals; read back into pending bits.
    parking: Vec<EventFd>,
    /// Per vector connected in the backend: whether it signals its route (or its parking
    /// eventfd). Empty: the index is disabled.
    connected: Vec<bool>,
}

impl VectorWiring {
    fn new(index: u32, routing: Arc<dyn MsiRouting>, vectors: u16) -> Result<Self, VfioError> {
        let parking = (0..vectors)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| VfioError::Pci(crate::Error::EventFd(e)))?;
        Ok(VectorWiring {
            index,
            routing,
            parking,
            connected: Vec::new(),
        })
    }

    fn target(&self, vector: u16, routed: bool) -> Option<&EventFd> {
        if routed {
            self.routing.eventfd(vector)
        } else {
            self.parking.get(usize::from(vector))
        }
    }

    /// Connects the backend's vectors: one per entry of `deliverable` (empty: disable the
    /// index), each to its route if deliverable, else to its parking eventfd. Returns the
    /// vectors newly connected to their route, whose parked interrupts are to be replayed.
    fn apply(&mut self, device: &VfioPciDevice, deliverable: &[bool]) -> Vec<u16> {
        if deliverable.is_empty() {
            self.disable(device);
            return Vec::new();
        }
        // A vector is routed only if the sink has an eventfd for it.
        let routed: Vec<bool> = (0u16..)
            .zip(deliverable)
            .map(|(v, &d)| d && self.routing.eventfd(v).is_some())
            .collect();
        if self.connected.len() != routed.len() {
            self.disable(device);
            let targets: Option<Vec<&EventFd>> = (0u16..)
                .zip(&routed)
                .map(|(v, &r)| self.target(v, r))
                .collect();
            let Some(targets) = targets else {
                log::warn!("vfio: more vectors than eventfds for index {}", self.index);
                return Vec::new();
            };
            return match device.backend.set_irqs(self.index, 0, &targets) {
                Ok(()) => {
                    self.connected = routed.clone();
                    (0u16..)
                        .zip(&routed)
                        .filter(|(_, &r)| r)
                        .map(|(v, _)| v)
                        .collect()
                }
                Err(e) => {
                    device.report("enabling interrupts", &e);
                    Vec::new()
                }
            };
        }
        let mut newly_routed = Vec::new();
        for (vector, &want) in (0u16..).zip(&routed) {
            let index = usize::from(vector);
            if self.connected.get(index) == Some(&want) {
                continue;
            }
            let Some(target) = self.target(vector, want) else {
                continue;
            };
            match device
                .backend
                .set_irqs(self.index, u32::from(vector), &[target])
            {
                Ok(()) => {
                    if let Some(slot) = self.connected.get_mut(index) {
                        *slot = want;
                    }
                    if want {
                        newly_routed.push(vector);
                    }
                }
                Err(e) => device.report("re-pointing an interrupt vector", &e),
            }
        }
        newly_routed
    }

    fn disable(&mut self, device: &VfioPciDevice) {
        if !self.connected.is_empty() {
            if let Err(e) = device.backend.set_irqs(self.index, 0, &[]) {
                device.report("disabling interrupts", &e);
            }
            self.connected.clear();
        }
        // Interrupts parked while enabled do not outlive it.
        for vector in 0..self.parking.len() {
            self.take_parked(vector as u16);
        }
    }

    /// Whether vector `vector` is connected to its parking eventfd.
    fn is_parked(&self, vector: u16) -> bool {
        self.connected.get(usize::from(vector)) == Some(&false)
    }

    /// Takes the interrupts parked on `vector`: whether there were any.
    fn take_parked(&self, vector: u16) -> bool {
        self.parking
            .get(usize::from(vector))
            .is_some_and(|fd| fd.read().is_ok_and(|n| n > 0))
    }
}

struct MsixState {
    config: MsixConfig,
    wiring: VectorWiring,
}

struct MsiState {
    config: MsiConfig,
    wiring: VectorWiring,
}

/// The VMM's INTx eventfds.
struct IntxLine {
    trigger: EventFd,
    resample: EventFd,
}

/// A piece of a BAR mmapped for direct mapping, and where it is in the guest.
struct DirectArea {
    bar: u8,
    offset: u64,
    area: MappedArea,
    mapping: Option<DirectMapping>,
}

struct State {
    shadow: [u8; CONFIG_SPACE_SIZE],
    msix: Option<MsixState>,
    msi: Option<MsiState>,
    intx: Option<IntxLine>,
    mode: IrqMode,
    direct: Vec<DirectArea>,
}

/// A passed-through PCI function: a [`PciDevice`] over a [`VfioBackend`]. See the module
/// documentation for what is virtualized and how.
pub struct VfioPciDevice {
    backend: Arc<dyn VfioBackend>,
    can_reset: bool,
    bars: Vec<Bar>,
    rom: Option<Rom>,
    msix_layout: Option<MsixLayout>,
    interrupt_pin: u8,
    layout: Box<ConfigLayout>,
    direct_mapper: Option<Arc<dyn DirectMapper>>,
    state: Mutex<State>,
    /// A vanished device is reported once, not on every access.
    gone_reported: AtomicBool,
}

impl std::fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("bars", &self.bars)
            .field("rom", &self.rom)
            .field("msix", &self.msix_layout)
            .field("interrupt_pin", &self.interrupt_pin)
            .finish()
    }
}

impl VfioPciDevice {
    /// Attaches the function behind `backend`: resets it if it can, reads its configuration
    /// space, regions and interrupts, and builds the guest's view. Fails if the function
    /// does not answer or is not a type-0 (endpoint) function, or if the backend or the
    /// interrupt allocator fails.
    pub fn new(
        backend: Arc<dyn VfioBackend>,
        options: VfioPciOptions<'_>,
    ) -> Result<Self, VfioError> {
        let info = backend.device_info();
        if info.reset {
            match backend.reset() {
                Ok(()) => {}
                Err(e @ BackendError::Gone(_)) => return Err(e.into()),
                Err(e) => log::warn!("vfio: reset on attach failed: {e}"),
            }
        }
        let mut snapshot = [0u8; CONFIG_SPACE_SIZE];
        backend.region_read(CONFIG_REGION, 0, &mut snapshot)?;
        let vendor = u16::from_le_bytes([snapshot[0], snapshot[1]]);
        if vendor == 0xffff || vendor == 0 {
            return Err(VfioError::Unsupported(format!(
                "no function answers (vendor ID {vendor:#06x})"
            )));
        }
        let header_type = snapshot[reg::HEADER_TYPE] & !HEADER_TYPE_MULTI_FUNCTION;
        if header_type != HEADER_TYPE_ENDPOINT {
            return Err(VfioError::Unsupported(format!(
                "header type {header_type:#x}: only endpoints (type 0) can be passed through"
            )));
        }
        let bars = discover_bars(backend.as_ref(), &snapshot)?;
        let rom = discover_rom(backend.as_ref())?;
        let irq_count = |index| backend.irq_info(index).map_or(0, |i| i.count);
        let capabilities = walk_capabilities(&snapshot);

        let msix_layout = capabilities
            .iter()
            .find(|&&(id, _)| id == MSIX_CAPABILITY_ID)
            .and_then(|&(_, offset)| msix_layout(&snapshot, offset, &bars));
        let msi_offset = capabilities
            .iter()
            .find(|&&(id, _)| id == MSI_CAPABILITY_ID)
            .map(|&(_, offset)| offset)
            .filter(|&offset| {
                let control = u16_at(&snapshot, offset + 2);
                offset + MsiCapability::from_control(control).len() <= CONFIG_SPACE_SIZE
            });

        // MSI-X, virtualized if the VMM routes interrupts and the backend has them.
        let msix_count = irq_count(MSIX_IRQ);
        let msix = match (options.interrupts, msix_layout) {
            (Some(allocator), Some(layout)) if msix_count > 0 => {
                let declared = (u16_at(&snapshot, layout.capability + 2) & 0x7ff) + 1;
                let vectors = declared
                    .min(u16::try_from(msix_count).unwrap_or(MAX_MSIX_VECTORS))
                    .min(MAX_MSIX_VECTORS);
                let routing = allocator.allocate(MsiKind::MsiX, vectors)?;
                Some(MsixState {
                    config: MsixConfig::new(vectors, routing.clone())?,
                    wiring: VectorWiring::new(MSIX_IRQ, routing, vectors)?,
                })
            }
            _ => None,
        };
        // MSI likewise, with no more vectors than the backend has.
        let msi_count = irq_count(MSI_IRQ);
        let msi = match (options.interrupts, msi_offset) {
            (Some(allocator), Some(offset)) if msi_count > 0 => {
                let mut capability = MsiCapability::from_control(u16_at(&snapshot, offset + 2));
                while u32::from(capability.max_vectors()) > msi_count {
                    capability.vectors_log2 -= 1;
                }
                let vectors = capability.max_vectors();
                let routing = allocator.allocate(MsiKind::Msi, vectors)?;
                Some((
                    offset,
                    MsiState {
                        config: MsiConfig::new(capability, routing.clone()),
                        wiring: VectorWiring::new(MSI_IRQ, routing, vectors)?,
                    },
                ))
            }
            _ => None,
        };

        let pin = snapshot[reg::INTERRUPT_PIN];
        let interrupt_pin = if (1..=4).contains(&pin) && irq_count(INTX_IRQ) > 0 {
            pin
        } else {
            0
        };

        let mut shadow = [0u8; CONFIG_SPACE_SIZE];
        let mut layout = Box::new(ConfigLayout {
            shadow_bits: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            forward: [true; CONFIG_SPACE_SIZE],
            msi: None,
            msix_control: None,
        });
        virtualize_header(
            &mut layout,
            &mut shadow,
            &snapshot,
            &bars,
            rom,
            interrupt_pin,
        );

        let virtualized = VirtualizedCapabilities {
            msix: msix_layout
                .zip(msix.as_ref())
                .map(|(l, m)| (l.capability, m.config.num_vectors())),
            msi: msi
                .as_ref()
                .map(|(offset, m)| (*offset, m.config.capability().len())),
        };
        lay_out_capabilities(
            &mut layout,
            &mut shadow,
            &snapshot,
            &capabilities,
            &options.passthrough_capabilities,
            virtualized,
        );

        let device = VfioPciDevice {
            can_reset: info.reset,
            msix_layout,
            interrupt_pin,
            layout,
            direct_mapper: options.direct_mapper,
            state: Mutex::new(State {
                shadow,
                msix,
                msi: msi.map(|(_, state)| state),
                intx: None,
                mode: IrqMode::None,
                direct: Vec::new(),
            }),
            gone_reported: AtomicBool::new(false),
            bars,
            rom,
            backend,
        };
        // Decoding and bus mastering stay off until the guest turns them on.
        device.forward_config(reg::COMMAND, &[0, 0]);
        if device.direct_mapper.is_some() {
            let direct = device.map_bars();
            device.lock().direct = direct;
        }
        Ok(device)
    }

    /// The backend, for the VMM's DMA mappings ([`VfioBackend::dma_map`]).
    pub fn backend(&self) -> &Arc<dyn VfioBackend> {
        &self.backend
    }

    /// The interrupt pin the guest sees (1-4 for INTA#-INTD#), or 0 if the function has no
    /// INTx line the backend offers.
    pub fn interrupt_pin(&self) -> u8 {
        self.interrupt_pin
    }

    /// Vectors of the virtualized MSI-X capability (`None`: MSI-X is hidden).
    pub fn msix_vectors(&self) -> Option<u16> {
        self.lock().msix.as_ref().map(|m| m.config.num_vectors())
    }

    /// Vectors of the virtualized MSI capability (`None`: MSI is hidden).
    pub fn msi_vectors(&self) -> Option<u16> {
        self.lock()
            .msi
            .as_ref()
            .map(|m| m.config.capability().max_vectors())
    }

    /// The direct mappings in place now.
    pub fn direct_mappings(&self) -> Vec<DirectMapping> {
        self.lock()
            .direct
            .iter()
            .filter_map(|d| d.mapping)
            .collect()
    }

    /// Wires the function's INTx line: the device signals `trigger` when it asserts the
    /// line, and unmasks it when `resample` is signalled (KVM does, when the guest ends
    /// the interrupt: register both with `register_irqfd_with_resample` on the line's
    /// GSI). In effect whenever neither MSI nor MSI-X is enabled. Fails if the function has
    /// no INTx line ([`VfioPciDevice::interrupt_pin`] is 0) or the backend refuses.
    pub fn connect_intx(&self, trigger: &EventFd, resample: &EventFd) -> Result<(), VfioError> {
        if self.interrupt_pin == 0 {
            return Err(VfioError::Unsupported(
                "the function has no INTx line".into(),
            ));
        }
        let clone = |fd: &EventFd| {
            fd.try_clone()
                .map_err(|e| VfioError::Pci(crate::Error::EventFd(e)))
        };
        let line = IntxLine {
            trigger: clone(trigger)?,
            resample: clone(resample)?,
        };
        let mut state = self.lock();
        if state.mode == IrqMode::Intx {
            self.disable_mode(&mut state);
        }
        state.intx = Some(line);
        if state.mode == IrqMode::None {
            if let Err(e) = self.enable_intx(&mut state) {
                // Half-connected (trigger without unmask) is no use: undo it.
                self.disable_mode(&mut state);
                state.intx = None;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Disconnects INTx (the device's line stays asserted or not, nobody listens).
    pub fn disconnect_intx(&self) {
        let mut state = self.lock();
        if state.mode == IrqMode::Intx {
            self.disable_mode(&mut state);
        }
        state.intx = None;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: every update is complete
        // before the next one starts.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self, what: &str, error: &BackendError) {
        if matches!(error, BackendError::Gone(_)) {
            if !self.gone_reported.swap(true, Ordering::AcqRel) {
                log::error!("vfio: {what}: {error}");
            }
        } else {
            log::warn!("vfio: {what}: {error}");
        }
    }

    fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|b| b.pci.index == index)
    }

    /// A guest read of the expansion ROM: the region's bytes, all-ones past its end (the
    /// power-of-two ROM BAR can be bigger) or if the read fails.
    fn read_rom(&self, rom: &Rom, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let inside = rom.region_size.saturating_sub(offset);
        let len = usize::try_from(inside).map_or(data.len(), |n| n.min(data.len()));
        let Some(piece) = data.get_mut(..len).filter(|p| !p.is_empty()) else {
            return;
        };
        if let Err(e) = self.backend.region_read(ROM_REGION, offset, piece) {
            self.report("ROM read", &e);
            piece.fill(0xff);
        }
    }

    /// Mmaps the mappable parts of every memory BAR, leaving out the MSI-X pages.
    fn map_bars(&self) -> Vec<DirectArea> {
        let page = page_size();
        let mut direct = Vec::new();
        for bar in self.bars.iter().filter(|b| b.pci.kind.is_memory()) {
            let traps: Vec<(u64, u64)> = self
                .msix_layout
                .iter()
                .flat_map(|l| [l.table, l.pba])
                .filter(|t| t.bar == bar.pci.index)
                .map(|t| (align_down(t.offset, page), align_up(t.end(), page)))
                .collect();
            for (offset, size) in bar.region.mappable_areas() {
                let end = offset.saturating_add(size).min(bar.region.size);
                let area = (align_up(offset, page), align_down(end, page));
                for (start, end) in subtract(area, &traps) {
                    let index = u32::from(bar.pci.index);
                    match self.backend.map_region(index, start, end - start) {
                        Ok(area) => direct.push(DirectArea {
                            bar: bar.pci.index,
                            offset: start,
                            area,
                            mapping: None,
                        }),
                        Err(e) => self.report("mapping a BAR", &e),
                    }
                }
            }
        }
        direct
    }

    fn forward_config(&self, offset: usize, data: &[u8]) {
        if let Err(e) = self
            .backend
            .region_write(CONFIG_REGION, offset as u64, data)
        {
            self.report("configuration write", &e);
        }
    }

    fn read_config_locked(&self, state: &State, offset: usize, data: &mut [u8]) {
        // The device's bytes, read at once for the span that needs them.
        let needs_device = |at: usize| {
            at < CONFIG_SPACE_SIZE && !self.layout.in_msi(at) && self.layout.shadow_bits[at] != 0xff
        };
        let span: Vec<usize> = (0..data.len())
            .filter(|&i| offset.checked_add(i).is_some_and(needs_device))
            .collect();
        let mut device_bytes = vec![0xffu8; data.len()];
        if let (Some(&first), Some(&last)) = (span.first(), span.last()) {
            let window = &mut device_bytes[first..=last];
            if let Err(e) = self
                .backend
                .region_read(CONFIG_REGION, (offset + first) as u64, window)
            {
                self.report("configuration read", &e);
                window.fill(0xff);
            }
        }
        for (i, out) in data.iter_mut().enumerate() {
            let Some(at) = offset.checked_add(i).filter(|&at| at < CONFIG_SPACE_SIZE) else {
                *out = 0;
                continue;
            };
            if let (true, Some((msi_offset, _)), Some(msi)) =
                (self.layout.in_msi(at), self.layout.msi, state.msi.as_ref())
            {
                let mut byte = [0u8];
                msi.config.read(at - msi_offset, &mut byte);
                *out = byte[0];
                continue;
            }
            let shadow_bits = self.layout.shadow_bits[at];
            *out = (device_bytes[i] & !shadow_bits) | (state.shadow[at] & shadow_bits);
        }
    }

    fn write_config_locked(&self, state: &mut State, offset: usize, data: &[u8]) {
        let mut to_device: Vec<(usize, u8)> = Vec::new();
        let mut msi_bytes: Option<(usize, Vec<u8>)> = None;
        let mut msix_touched = false;
        for (i, &value) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i).filter(|&at| at < CONFIG_SPACE_SIZE) else {
                break;
            };
            if self.layout.in_msi(at) {
                msi_bytes.get_or_insert((at, Vec::new())).1.push(value);
                continue;
            }
            let writable = self.layout.writable[at];
            state.shadow[at] = (state.shadow[at] & !writable) | (value & writable);
            if self.layout.forward[at] {
                let shadow_bits = self.layout.shadow_bits[at];
                to_device.push((
                    at,
                    (value & !shadow_bits) | (state.shadow[at] & shadow_bits),
                ));
            }
            if self
                .layout
                .msix_control
                .is_some_and(|control| (control..control + 2).contains(&at))
            {
                msix_touched = true;
            }
        }
        // Runs of consecutive bytes go to the device as one write each.
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        for (k, &(at, value)) in to_device.iter().enumerate() {
            if run.is_empty() {
                run_start = at;
            }
            run.push(value);
            if to_device.get(k + 1).is_none_or(|&(next, _)| next != at + 1) {
                self.forward_config(run_start, &run);
                run.clear();
            }
        }
        let mut interrupts_changed = false;
        if let (Some((at, bytes)), Some((msi_offset, _)), Some(msi)) =
            (msi_bytes, self.layout.msi, state.msi.as_mut())
        {
            msi.config.write(at - msi_offset, &bytes);
            interrupts_changed = true;
        }
        if let (true, Some(control), Some(msix)) =
            (msix_touched, self.layout.msix_control, state.msix.as_mut())
        {
            msix.config.set_control(u16_at(&state.shadow, control));
            interrupts_changed = true;
        }
        if interrupts_changed {
            self.sync_interrupts(state);
        }
    }

    /// Connects the interrupt index the guest's settings call for, and re-points vectors
    /// whose deliverability changed.
    fn sync_interrupts(&self, state: &mut State) {
        let wanted = if state.msix.as_ref().is_some_and(|m| m.config.is_enabled()) {
            IrqMode::MsiX
        } else if state.msi.as_ref().is_some_and(|m| m.config.is_enabled()) {
            IrqMode::Msi
        } else if state.intx.is_some() {
            IrqMode::Intx
        } else {
            IrqMode::None
        };
        if wanted != state.mode {
            // The backend takes one index at a time: the old one goes first.
            self.disable_mode(state);
            if wanted == IrqMode::Intx {
                if let Err(e) = self.enable_intx(state) {
                    self.report("enabling INTx", &e);
                }
                return;
            }
            state.mode = wanted;
        }
        match state.mode {
            IrqMode::MsiX => {
                if let Some(msix) = state.msix.as_mut() {
                    let deliverable: Vec<bool> = (0..msix.config.num_vectors())
                        .map(|v| msix.config.is_deliverable(v))
                        .collect();
                    for vector in msix.wiring.apply(self, &deliverable) {
                        if msix.wiring.take_parked(vector) {
                            let _ = msix.config.trigger(vector);
                        }
                    }
                }
            }
            IrqMode::Msi => {
                if let Some(msi) = state.msi.as_mut() {
                    let deliverable: Vec<bool> = (0..msi.config.enabled_vectors())
                        .map(|v| msi.config.is_deliverable(v))
                        .collect();
                    for vector in msi.wiring.apply(self, &deliverable) {
                        if msi.wiring.take_parked(vector) {
                            let _ = msi.config.trigger(vector);
                        }
                    }
                }
            }
            IrqMode::Intx | IrqMode::None => {}
        }
    }

    fn disable_mode(&self, state: &mut State) {
        match state.mode {
            IrqMode::MsiX => {
                if let Some(msix) = state.msix.as_mut() {
                    msix.wiring.apply(self, &[]);
                }
            }
            IrqMode::Msi => {
                if let Some(msi) = state.msi.as_mut() {
                    msi.wiring.apply(self, &[]);
                }
            }
            IrqMode::Intx => {
                if let Err(e) = self.backend.set_irqs(INTX_IRQ, 0, &[]) {
                    self.report("disabling INTx", &e);
                }
            }
            IrqMode::None => {}
        }
        state.mode = IrqMode::None;
    }

    fn enable_intx(&self, state: &mut State) -> Result<(), BackendError> {
        let Some(line) = state.intx.as_ref() else {
            return Ok(());
        };
        self.backend.set_irqs(INTX_IRQ, 0, &[&line.trigger])?;
        state.mode = IrqMode::Intx;
        // The unmask eventfd only holds while INTx is enabled: set it every time.
        self.backend.set_intx_unmask(&line.resample)
    }

    /// Interrupts parked on masked vectors become pending bits (for a read of the PBA or
    /// of MSI's pending bits).
    fn collect_parked(state: &mut State) {
        if let Some(msix) = state.msix.as_mut() {
            for vector in 0..msix.config.num_vectors() {
                if msix.wiring.is_parked(vector) && msix.wiring.take_parked(vector) {
                    let _ = msix.config.trigger(vector);
                }
            }
        }
        if let Some(msi) = state.msi.as_mut() {
            for vector in 0..msi.config.enabled_vectors() {
                if msi.wiring.is_parked(vector) && msi.wiring.take_parked(vector) {
                    let _ = msi.config.trigger(vector);
                }
            }
        }
    }

    /// Splits a BAR access at the MSI-X table and PBA: `handle(start, len, trap)` for each
    /// piece, with the trap it falls in (`None`: the device's).
    fn split_access(
        &self,
        bar: u8,
        offset: u64,
        len: usize,
        mut handle: impl FnMut(usize, usize, Option<Trap>),
    ) {
        let traps: Vec<Trap> = self
            .msix_layout
            .iter()
            .flat_map(|l| [l.table, l.pba])
            .filter(|t| t.bar == bar)
            .collect();
        let trap_at = |i: usize| {
            let at = offset.saturating_add(i as u64);
            traps.iter().copied().find(|t| t.contains(bar, at))
        };
        let mut start = 0;
        while start < len {
            let trap = trap_at(start);
            let mut end = start + 1;
            while end < len && trap_at(end).map(|t| t.kind) == trap.map(|t| t.kind) {
                end += 1;
            }
            handle(start, end - start, trap);
            start = end;
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config(&self, offset: u16, data: &mut [u8]) {
        let mut state = self.lock();
        let offset = usize::from(offset);
        let touches_msi = (0..data.len()).any(|i| self.layout.in_msi(offset + i));
        if touches_msi {
            Self::collect_parked(&mut state);
        }
        self.read_config_locked(&state, offset, data);
    }

    fn write_config(&self, offset: u16, data: &[u8]) {
        let mut state = self.lock();
        self.write_config_locked(&mut state, usize::from(offset), data);
    }

    fn bars(&self) -> Vec<PciBar> {
        self.bars.iter().map(|b| b.pci).collect()
    }

    fn rom_size(&self) -> Option<u64> {
        self.rom.map(|rom| rom.size)
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if let (ROM_BAR_INDEX, Some(rom)) = (bar, self.rom.as_ref()) {
            self.read_rom(rom, offset, data);
            return;
        }
        if self.bar(bar).is_none() || offset.checked_add(data.len() as u64).is_none() {
            data.fill(0xff);
            return;
        }
        self.split_access(bar, offset, data.len(), |start, len, trap| {
            let Some(piece) = data.get_mut(start..start + len) else {
                return;
            };
            let at = offset + start as u64;
            let Some(trap) = trap else {
                if let Err(e) = self.backend.region_read(u32::from(bar), at, piece) {
                    self.report("BAR read", &e);
                    piece.fill(0xff);
                }
                return;
            };
            let mut state = self.lock();
            if trap.kind == TrapKind::MsixPba {
                Self::collect_parked(&mut state);
            }
            match (state.msix.as_ref(), trap.kind) {
                (Some(msix), TrapKind::MsixTable) => {
                    msix.config.read_table(at - trap.offset, piece)
                }
                (Some(msix), TrapKind::MsixPba) => msix.config.read_pba(at - trap.offset, piece),
                // MSI-X hidden: the table and PBA read as nothing.
                (None, _) => piece.fill(0),
            }
        });
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        // The ROM (no `Bar`) is read-only: its writes end here too, whoever sends them.
        if self.bar(bar).is_none() || offset.checked_add(data.len() as u64).is_none() {
            return;
        }
        self.split_access(bar, offset, data.len(), |start, len, trap| {
            let Some(piece) = data.get(start..start + len) else {
                return;
            };
            let at = offset + start as u64;
            match trap {
                None => {
                    if let Err(e) = self.backend.region_write(u32::from(bar), at, piece) {
                        self.report("BAR write", &e);
                    }
                }
                Some(trap) if trap.kind == TrapKind::MsixTable => {
                    let mut state = self.lock();
                    if let Some(msix) = state.msix.as_mut() {
                        msix.config.write_table(at - trap.offset, piece);
                        self.sync_interrupts(&mut state);
                    }
                }
                // The PBA is read-only.
                Some(_) => {}
            }
        });
    }

    fn bar_moved(&self, bar: u8, base: Option<u64>) {
        let Some(mapper) = self.direct_mapper.as_ref() else {
            return;
        };
        let mut state = self.lock();
        for direct in state.direct.iter_mut().filter(|d| d.bar == bar) {
            if let Some(mapping) = direct.mapping.take() {
                mapper.unmap(mapping);
            }
            let Some(guest_address) = base.and_then(|b| b.checked_add(direct.offset)) else {
                continue;
            };
            let size = direct.area.size() as u64;
            // SAFETY: the area is owned by the state and stays mapped until it is dropped,
            // which happens only after `Drop` (or the next move) has unmapped it.
            match unsafe { mapper.map(guest_address, direct.area.host_address(), size) } {
                Ok(mapping) => direct.mapping = Some(mapping),
                Err(e) => log::warn!(
                    "vfio: BAR {bar} + {:#x} not mapped at {guest_address:#x}: {e}; trapped",
                    direct.offset
                ),
            }
        }
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        let mut state = self.lock();
        if let Some(mapper) = self.direct_mapper.as_ref() {
            for direct in &mut state.direct {
                if let Some(mapping) = direct.mapping.take() {
                    mapper.unmap(mapping);
                }
            }
        }
        self.disable_mode(&mut state);
        drop(state);
        if self.can_reset {
            if let Err(e) = self.backend.reset() {
                self.report("reset on detach", &e);
            }
        }
    }
}

/// The capabilities the model virtualizes: MSI-X (offset, vectors) and MSI (offset,
/// length).
#[derive(Clone, Copy, Debug)]
struct VirtualizedCapabilities {
    msix: Option<(usize, u16)>,
    msi: Option<(usize, usize)>,
}

/// Decides each capability's fate (virtualized, passed through or hidden) and lays the
/// guest's list out in the shadow: hidden ones unlinked and zeroed, the others linked in
/// the device's order.
fn lay_out_capabilities(
    layout: &mut ConfigLayout,
    shadow: &mut [u8; CONFIG_SPACE_SIZE],
    snapshot: &[u8; CONFIG_SPACE_SIZE],
    capabilities: &[(u8, usize)],
    passthrough: &[u8],
    virtualized: VirtualizedCapabilities,
) {
    let mut visible: Vec<(u8, usize)> = Vec::new();
    for &(id, offset) in capabilities {
        // Only the capability the model virtualizes shows; a second MSI or MSI-X does not.
        let keep = match id {
            MSIX_CAPABILITY_ID => virtualized.msix.is_some_and(|(o, _)| o == offset),
            MSI_CAPABILITY_ID => virtualized.msi.is_some_and(|(o, _)| o == offset),
            _ => passthrough.contains(&id),
        };
        if keep {
            visible.push((id, offset));
        } else {
            let len = capability_len(snapshot, id, offset, capabilities);
            for at in offset..offset + len {
                layout.virtualize(shadow, at, 0, 0);
            }
            log::info!("vfio: capability {id:#04x} at {offset:#x} hidden");
        }
    }
    let first = visible.first().map_or(0, |&(_, offset)| offset as u8);
    layout.virtualize(shadow, reg::CAPABILITIES, first, 0);
    // Status: the capability list bit says whether the guest's list is empty.
    shadow[reg::STATUS] = if visible.is_empty() {
        0
    } else {
        STATUS_CAPABILITIES_LIST as u8
    };
    layout.shadow_bits[reg::STATUS] = STATUS_CAPABILITIES_LIST as u8;
    for (i, &(id, offset)) in visible.iter().enumerate() {
        let next = visible.get(i + 1).map_or(0, |&(_, o)| o as u8);
        layout.virtualize(shadow, offset, id, 0);
        layout.virtualize(shadow, offset + 1, next, 0);
        match (id, virtualized.msix, virtualized.msi) {
            (MSIX_CAPABILITY_ID, Some((_, vectors)), _) => {
                let control = (vectors - 1).to_le_bytes();
                let at = offset + MSIX_CONTROL_OFFSET;
                layout.virtualize(shadow, at, control[0], 0);
                let mask = ((MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8) as u8;
                layout.virtualize(shadow, at + 1, control[1], mask);
                // Table and PBA offsets: the device's, read-only.
                let fields = snapshot.iter().enumerate().skip(offset + 4).take(8);
                for (at, &byte) in fields {
                    layout.virtualize(shadow, at, byte, 0);
                }
                layout.msix_control = Some(at);
            }
            (MSI_CAPABILITY_ID, _, Some((_, len))) => layout.msi = Some((offset, len)),
            (CAP_PCI_EXPRESS, _, _) => {
                let at = offset + PCIE_DEVICE_CONTROL_HIGH;
                if at < CONFIG_SPACE_SIZE {
                    layout.shadow_bits[at] |= PCIE_INITIATE_FLR;
                }
            }
            _ => {}
        }
    }
}

/// The header bytes the model answers: BARs, ROM BAR, interrupt line and pin,
/// multi-function bit, command register (shadowed and forwarded).
fn virtualize_header(
    layout: &mut ConfigLayout,
    shadow: &mut [u8; CONFIG_SPACE_SIZE],
    snapshot: &[u8; CONFIG_SPACE_SIZE],
    bars: &[Bar],
    rom: Option<Rom>,
    interrupt_pin: u8,
) {
    for at in reg::BAR0..reg::BAR0 + 4 * NUM_BARS {
        layout.virtualize(shadow, at, 0, 0);
    }
    for bar in bars {
        let at = reg::BAR0 + 4 * usize::from(bar.pci.index);
        let (flags, mask) = bar_bits(&bar.pci);
        let flag_bytes = flags.to_le_bytes();
        let mask_bytes = mask.to_le_bytes();
        for (i, (&value, &writable)) in flag_bytes.iter().zip(&mask_bytes).enumerate() {
            layout.virtualize(shadow, at + i, value, writable);
        }
        // A 64-bit BAR's high dword: address bits only.
        if bar.pci.kind == BarKind::Memory64 {
            for (i, &writable) in mask_bytes.iter().enumerate().skip(4) {
                layout.virtualize(shadow, at + i, 0, writable);
            }
        }
    }
    // The ROM BAR: address bits and enable bit writable if there is a ROM, all 0 (no ROM)
    // otherwise. The device's own ROM BAR is the host's business (kernel VFIO enables it
    // around its reads).
    let rom_mask = rom
        .map_or(0, |rom| rom_register_mask(rom.size))
        .to_le_bytes();
    for (i, &writable) in rom_mask.iter().enumerate() {
        layout.virtualize(shadow, reg::ROM + i, 0, writable);
    }
    let command = command::WRITABLE.to_le_bytes();
    for (i, &writable) in command.iter().enumerate() {
        layout.virtualize(shadow, reg::COMMAND + i, 0, writable);
        layout.forward[reg::COMMAND + i] = true;
    }
    layout.virtualize(
        shadow,
        reg::INTERRUPT_LINE,
        snapshot[reg::INTERRUPT_LINE],
        0xff,
    );
    layout.virtualize(shadow, reg::INTERRUPT_PIN, interrupt_pin, 0);
    layout.shadow_bits[reg::HEADER_TYPE] = HEADER_TYPE_MULTI_FUNCTION;
}

/// A BAR's read-only type bits and writable address bits (64 bits for a 64-bit BAR).
fn bar_bits(bar: &PciBar) -> (u32, u64) {
    let (flags, low) = match bar.kind {
        BarKind::Io => (0x1, 0x3),
        BarKind::Memory32 => (u32::from(bar.prefetchable) << 3, 0xf),
        BarKind::Memory64 => (0x4 | u32::from(bar.prefetchable) << 3, 0xf),
    };
    let mut mask = !(bar.size - 1) & !low;
    if bar.kind != BarKind::Memory64 {
        mask &= 0xffff_ffff;
    }
    (flags, mask)
}

/// The BARs: sizes from the regions, types from the device's BAR registers.
fn discover_bars(
    backend: &dyn VfioBackend,
    snapshot: &[u8; CONFIG_SPACE_SIZE],
) -> Result<Vec<Bar>, VfioError> {
    let mut bars = Vec::new();
    let mut index = 0usize;
    while index < NUM_BARS {
        let register = u32_at(snapshot, reg::BAR0 + 4 * index);
        let io = register & 0x1 != 0;
        let wide = !io && (register >> 1) & 0x3 == 0x2;
        let this = index;
        index += if wide { 2 } else { 1 };
        let region = match backend.region_info(this as u32) {
            Ok(region) => region,
            Err(e @ BackendError::Gone(_)) => return Err(e.into()),
            Err(e) => {
                log::warn!("vfio: BAR {this}: {e}; left out");
                continue;
            }
        };
        if region.size == 0 {
            continue;
        }
        let kind = if io {
            BarKind::Io
        } else if wide {
            BarKind::Memory64
        } else {
            BarKind::Memory32
        };
        let (min, max) = match kind {
            BarKind::Io => (4, 256),
            BarKind::Memory32 => (16, 1 << 31),
            BarKind::Memory64 => (16, 1 << 63),
        };
        let size = region.size.checked_next_power_of_two().map(|s| s.max(min));
        let Some(size) = size.filter(|&s| s <= max && !(wide && this == NUM_BARS - 1)) else {
            log::warn!(
                "vfio: BAR {this} ({kind:?}, {:#x} bytes) cannot be described; left out",
                region.size
            );
            continue;
        };
        bars.push(Bar {
            pci: PciBar {
                index: this as u8,
                kind,
                size,
                prefetchable: !io && register & 0x8 != 0,
            },
            region,
        });
    }
    Ok(bars)
}

/// The expansion ROM, if the backend has a readable ROM region the ROM BAR can describe.
fn discover_rom(backend: &dyn VfioBackend) -> Result<Option<Rom>, VfioError> {
    let region = match backend.region_info(ROM_REGION) {
        Ok(region) => region,
        Err(e @ BackendError::Gone(_)) => return Err(e.into()),
        Err(e) => {
            log::warn!("vfio: expansion ROM: {e}; hidden");
            return Ok(None);
        }
    };
    if region.size == 0 || !region.read {
        return Ok(None);
    }
    let size = region
        .size
        .checked_next_power_of_two()
        .map(|s| s.max(MIN_ROM_SIZE))
        .filter(|&s| is_valid_rom_size(s));
    let Some(size) = size else {
        log::warn!(
            "vfio: expansion ROM of {:#x} bytes cannot be described; hidden",
            region.size
        );
        return Ok(None);
    };
    Ok(Some(Rom {
        size,
        region_size: region.size,
    }))
}

/// The device's capability list: (id, offset) in list order. Stops at a pointer into the
/// header, at a capability seen before (a loop) and after [`MAX_CAPABILITIES`].
fn walk_capabilities(snapshot: &[u8; CONFIG_SPACE_SIZE]) -> Vec<(u8, usize)> {
    let mut found: Vec<(u8, usize)> = Vec::new();
    if u16_at(snapshot, reg::STATUS) & STATUS_CAPABILITIES_LIST == 0 {
        return found;
    }
    let mut pointer = usize::from(snapshot[reg::CAPABILITIES] & !0x3);
    while pointer >= FIRST_CAPABILITY
        && found.len() < MAX_CAPABILITIES
        && !found.iter().any(|&(_, o)| o == pointer)
    {
        found.push((snapshot[pointer], pointer));
        pointer = usize::from(snapshot.get(pointer + 1).copied().unwrap_or(0) & !0x3);
    }
    found
}

/// Bytes of a capability, for hiding it: its length where the ID defines one, never past
/// the next capability (by offset) or the end of configuration space.
fn capability_len(
    snapshot: &[u8; CONFIG_SPACE_SIZE],
    id: u8,
    offset: usize,
    all: &[(u8, usize)],
) -> usize {
    let limit = all
        .iter()
        .map(|&(_, o)| o)
        .filter(|&o| o > offset)
        .min()
        .unwrap_or(CONFIG_SPACE_SIZE);
    let known = match id {
        CAP_POWER_MANAGEMENT | CAP_VPD | CAP_BRIDGE_SUBSYSTEM | CAP_SATA => Some(8),
        CAP_ADVANCED_FEATURES => Some(6),
        MSI_CAPABILITY_ID => Some(MsiCapability::from_control(u16_at(snapshot, offset + 2)).len()),
        MSIX_CAPABILITY_ID => Some(12),
        CAP_PCI_EXPRESS => Some(0x3c),
        CAP_VENDOR => Some(usize::from(snapshot.get(offset + 2).copied().unwrap_or(0)).max(2)),
        _ => None,
    };
    known.unwrap_or(limit - offset).min(limit - offset)
}

/// The MSI-X capability at `offset`, if its table and PBA fit in memory BARs.
fn msix_layout(
    snapshot: &[u8; CONFIG_SPACE_SIZE],
    offset: usize,
    bars: &[Bar],
) -> Option<MsixLayout> {
    if offset + 12 > CONFIG_SPACE_SIZE {
        return None;
    }
    let vectors = u64::from(u16_at(snapshot, offset + MSIX_CONTROL_OFFSET) & 0x7ff) + 1;
    let place = |kind: TrapKind, register: u32, size: u64| {
        let bar = (register & 0x7) as u8;
        let trap = Trap {
            kind,
            bar,
            offset: u64::from(register & !0x7),
            size,
        };
        let fits = bars
            .iter()
            .any(|b| b.pci.index == bar && b.pci.kind.is_memory() && trap.end() <= b.pci.size);
        fits.then_some(trap)
    };
    let table = place(
        TrapKind::MsixTable,
        u32_at(snapshot, offset + 4),
        vectors * MSIX_TABLE_ENTRY_SIZE,
    );
    let pba = place(
        TrapKind::MsixPba,
        u32_at(snapshot, offset + 8),
        vectors.div_ceil(64) * 8,
    );
    match (table, pba) {
        (Some(table), Some(pba)) => Some(MsixLayout {
            capability: offset,
            table,
            pba,
        }),
        _ => {
            log::warn!("vfio: MSI-X table or PBA outside its BAR; MSI-X hidden");
            None
        }
    }
}

/// `area` (start, end) without the `holes` (start, end): the pieces left, in order.
fn subtract(area: (u64, u64), holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pieces = vec![area];
    for &(hole_start, hole_end) in holes {
        pieces = pieces
            .into_iter()
            .flat_map(|(start, end)| [(start, end.min(hole_start)), (start.max(hole_end), end)])
            .filter(|(start, end)| start < end)
            .collect();
    }
    pieces
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

fn align_up(value: u64, align: u64) -> u64 {
    value
        .checked_next_multiple_of(align)
        .unwrap_or(!(align - 1))
}

fn align_down(value: u64, align: u64) -> u64 {
    value & !(align - 1)
}

fn u16_at(bytes: &[u8; CONFIG_SPACE_SIZE], offset: usize) -> u16 {
    let byte = |i: usize| bytes.get(offset + i).copied().unwrap_or(0);
    u16::from_le_bytes([byte(0), byte(1)])
}

fn u32_at(bytes: &[u8; CONFIG_SPACE_SIZE], offset: usize) -> u32 {
    let byte = |i: usize| bytes.get(offset + i).copied().unwrap_or(0);
    u32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msix::EventFdMsiAllocator;
    use crate::vfio::sim::{rom_image, SimSpec, SimulatedDevice};

    fn attach(
        spec: SimSpec,
        interrupts: Option<&dyn MsiAllocator>,
    ) -> (VfioPciDevice, Arc<SimulatedDevice>) {
        let sim = Arc::new(SimulatedDevice::new(spec).unwrap());
        let options = VfioPciOptions {
            interrupts,
            ..VfioPciOptions::default()
        };
        (VfioPciDevice::new(sim.clone(), options).unwrap(), sim)
    }

    fn read(device: &VfioPciDevice, offset: u16, len: usize) -> u32 {
        let mut data = [0u8; 4];
        device.read_config(offset, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn write(device: &VfioPciDevice, offset: u16, value: u32, len: usize) {
        device.write_config(offset, &value.to_le_bytes()[..len]);
    }

    /// The capability list as a guest walks it from 0x34.
    fn guest_capabilities(device: &VfioPciDevice) -> Vec<(u8, u16)> {
        let mut found = Vec::new();
        let mut pointer = read(device, 0x34, 1) as u16;
        while pointer != 0 && found.len() < 64 {
            found.push((read(device, pointer, 1) as u8, pointer));
            pointer = read(device, pointer + 1, 1) as u16;
        }
        found
    }

    fn bar_writes(sim: &SimulatedDevice) -> usize {
        sim.config_writes()
            .iter()
            .filter(|(offset, bytes)| {
                let end = offset + bytes.len() as u64;
                (*offset < 0x28 && end > 0x10) || (*offset < 0x34 && end > 0x30)
            })
            .count()
    }

    #[test]
    fn header_is_read_through_except_what_is_virtualized() {
        let allocator = EventFdMsiAllocator::new();
        let (device, sim) = attach(SimSpec::virtio_net(), Some(&allocator));
        assert_eq!(read(&device, 0, 4), 0x1041_1af4);
        assert_eq!(read(&device, 0x08, 4), 0x0200_0001);
        assert_eq!(read(&device, 0x2c, 4), 0x1041_1af4);
        // BAR 0: 64-bit memory, at 0 until placed; the host's address never shows.
        assert_eq!(read(&device, 0x10, 4), 0x0000_0004);
        assert_eq!(read(&device, 0x14, 4), 0);
        assert_eq!(
            device.bars(),
            vec![PciBar {
                index: 0,
                kind: BarKind::Memory64,
                size: 0x8_0000,
                prefetchable: false,
            }]
        );
        // Sizing answers 512 KiB; type bits stay; unimplemented BARs and the ROM read 0.
        for offset in [0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x30] {
            write(&device, offset, 0xffff_ffff, 4);
        }
        assert_eq!(read(&device, 0x10, 4), 0xfff8_0004);
        assert_eq!(read(&device, 0x14, 4), 0xffff_ffff);
        assert_eq!(read(&device, 0x18, 4), 0);
        assert_eq!(read(&device, 0x30, 4), 0);
        assert_eq!(device.rom_size(), None, "no ROM region: no ROM");
        write(&device, 0x10, 0xe008_1234, 4);
        write(&device, 0x14, 0x1, 4);
        assert_eq!(read(&device, 0x10, 4), 0xe008_0004);
        assert_eq!(bar_writes(&sim), 0, "BAR writes reached the device");
        // Command: shadowed, forwarded with only its writable bits.
        write(&device, 0x04, 0xffff, 2);
        assert_eq!(read(&device, 0x04, 2), u32::from(command::WRITABLE));
        assert_eq!(u16_at(&sim.config(), 0x04), command::WRITABLE);
        // Interrupt line: the shadow's; pin: no INTx here.
        write(&device, 0x3c, 0x0b, 1);
        assert_eq!(read(&device, 0x3c, 2), 0x000b);
        assert_eq!(sim.config()[0x3c], 0);
        // Extended space: zeroes, writes ignored.
        write(&device, 0x100, 0xffff_ffff, 4);
        assert_eq!(read(&device, 0xffc, 4), 0);
        assert_eq!(read(&device, 0x100, 4), 0);
    }

    #[test]
    fn capability_list_is_walked_and_filtered() {
        let allocator = EventFdMsiAllocator::new();
        // A VPD capability after MSI-X: hidden by default.
        let spec = SimSpec::virtio_net().with_capability(0xa4, CAP_VPD, &[0xaa; 6]);
        let (device, _sim) = attach(spec.clone(), Some(&allocator));
        assert_eq!(
            guest_capabilities(&device),
            vec![
                (9, 0x40),
                (9, 0x50),
                (9, 0x60),
                (9, 0x70),
                (9, 0x84),
                (0x11, 0x98)
            ]
        );
        assert_eq!(read(&device, 0xa4, 4), 0, "a hidden capability reads 0");
        assert_ne!(read(&device, 0x06, 2) as u16 & STATUS_CAPABILITIES_LIST, 0);
        // Vendor capability bodies are the device's.
        assert_eq!(read(&device, 0x4c, 4), 0x38);
        // MSI-X's table size, table and PBA fields are the device's, read-only.
        assert_eq!(read(&device, 0x98, 4), 0x0002_0011);
        assert_eq!(read(&device, 0x9c, 4), 0x8000);
        assert_eq!(read(&device, 0xa0, 4), 0x4_8000);
        write(&device, 0x9c, 0, 4);
        write(&device, 0x98, 0xffff_ffff, 4);
        assert_eq!(read(&device, 0x98, 4), 0xc002_0011);
        assert_eq!(read(&device, 0x9c, 4), 0x8000);

        // Without interrupt routing MSI-X is hidden too; with VPD allowed it shows.
        let sim = Arc::new(SimulatedDevice::new(spec).unwrap());
        let options = VfioPciOptions {
            passthrough_capabilities: vec![CAP_VENDOR, CAP_VPD],
            ..VfioPciOptions::default()
        };
        let device = VfioPciDevice::new(sim, options).unwrap();
        let found = guest_capabilities(&device);
        assert_eq!(found.last(), Some(&(CAP_VPD, 0xa4)));
        assert!(!found.iter().any(|&(id, _)| id == 0x11));
        assert_eq!(read(&device, 0x84 + 1, 1), 0xa4, "unlinked around MSI-X");
        assert_eq!(read(&device, 0x98, 4), 0);
        assert_eq!(device.msix_vectors(), None);

        // Nothing visible: the status bit goes and the pointer is 0.
        let sim = Arc::new(SimulatedDevice::virtio_net().unwrap());
        let options = VfioPciOptions {
            passthrough_capabilities: Vec::new(),
            ..VfioPciOptions::default()
        };
        let device = VfioPciDevice::new(sim, options).unwrap();
        assert!(guest_capabilities(&device).is_empty());
        assert_eq!(read(&device, 0x06, 2) as u16 & STATUS_CAPABILITIES_LIST, 0);
    }

    #[test]
    fn a_looping_capability_list_ends() {
        let mut spec = SimSpec::virtio_net();
        spec.config[0x85] = 0x40; // 0x84 -> 0x40 -> ... again
        let (device, _) = attach(spec, None);
        assert_eq!(guest_capabilities(&device).len(), 5);
        assert_eq!(read(&device, 0x85, 1), 0);
    }

    #[test]
    fn pci_express_flr_never_reaches_the_device() {
        let spec = SimSpec::virtio_net().with_capability(0xa4, CAP_PCI_EXPRESS, &[0x02, 0]);
        let (device, sim) = attach(spec, None);
        assert!(guest_capabilities(&device).contains(&(CAP_PCI_EXPRESS, 0xa4)));
        write(&device, 0xa4 + 8, 0xffff, 2);
        let config = sim.config();
        assert_eq!(config[0xa4 + 8], 0xff, "device control passes through");
        assert_eq!(config[0xa4 + 9], 0x7f, "but not 'initiate FLR'");
    }

    #[test]
    fn msi_is_virtualized_and_routed() {
        let allocator = EventFdMsiAllocator::new();
        let capability = MsiCapability::from_control(0x0184); // 4 vectors, 64-bit, masks
        let spec = SimSpec::virtio_net().with_msi(0xa4, capability);
        let (device, sim) = attach(spec, Some(&allocator));
        assert_eq!(device.msi_vectors(), Some(4));
        let routing = allocator.routing(MsiKind::Msi).unwrap();
        assert!(guest_capabilities(&device).contains(&(0x05, 0xa4)));
        assert_eq!(read(&device, 0xa4, 4), 0x0184_0005);
        write(&device, 0xa8, 0xfee0_0000, 4);
        write(&device, 0xb0, 0x4020, 2);
        // Enable with 2 vectors: the backend gets 2 eventfds for MSI.
        write(&device, 0xa6, 0x0011, 2);
        assert_eq!(sim.enabled_vectors(MSI_IRQ), 2);
        assert_eq!(
            routing.route(1),
            Some(crate::MsiMessage {
                address: 0xfee0_0000,
                data: 0x4021
            })
        );
        assert!(sim.fire(MSI_IRQ, 1));
        assert_eq!(routing.eventfd(1).unwrap().read().unwrap(), 1);
        // Mask vector 1: parked, shown pending, delivered on unmask.
        write(&device, 0xb4, 0x2, 4);
        assert!(sim.fire(MSI_IRQ, 1));
        assert!(routing.eventfd(1).unwrap().read().is_err());
        assert_eq!(read(&device, 0xb8, 4), 0x2);
        write(&device, 0xb4, 0, 4);
        assert_eq!(routing.eventfd(1).unwrap().read().unwrap(), 1);
        assert_eq!(read(&device, 0xb8, 4), 0);
        // No MSI write ever reached the device.
        assert!(sim
            .config_writes()
            .iter()
            .all(|(offset, _)| !(0xa4..0xa4 + 24).contains(offset)));
        // Disable.
        write(&device, 0xa6, 0, 2);
        assert_eq!(sim.enabled_vectors(MSI_IRQ), 0);
    }

    #[test]
    fn msi_gets_no_more_vectors_than_the_backend_has() {
        let allocator = EventFdMsiAllocator::new();
        let mut spec = SimSpec::virtio_net().with_msi(0xa4, MsiCapability::from_control(0x000a));
        spec.msi_vectors = 3; // the capability says 32
        let (device, sim) = attach(spec, Some(&allocator));
        assert_eq!(device.msi_vectors(), Some(2));
        assert_eq!(read(&device, 0xa6, 2), 0x0002);
        write(&device, 0xa6, 0x0071, 2);
        assert_eq!(sim.enabled_vectors(MSI_IRQ), 2);
    }

    #[test]
    fn one_interrupt_index_at_a_time() {
        let allocator = EventFdMsiAllocator::new();
        let spec = SimSpec::virtio_net().with_intx(1);
        let (device, sim) = attach(spec, Some(&allocator));
        assert_eq!(device.interrupt_pin(), 1);
        assert_eq!(read(&device, 0x3d, 1), 1);
        let trigger = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        device.connect_intx(&trigger, &resample).unwrap();
        assert_eq!(sim.enabled_vectors(INTX_IRQ), 1);
        assert!(sim.has_intx_unmask());
        assert!(sim.fire(INTX_IRQ, 0));
        assert_eq!(trigger.read().unwrap(), 1);
        // MSI-X takes over (the sim, like kernel VFIO, refuses two indexes at once).
        write(&device, 0x9a, 0x8000, 2);
        assert_eq!(sim.enabled_vectors(INTX_IRQ), 0);
        assert_eq!(sim.enabled_vectors(MSIX_IRQ), 3);
        // And hands back to INTx, unmask eventfd included.
        write(&device, 0x9a, 0, 2);
        assert_eq!(sim.enabled_vectors(MSIX_IRQ), 0);
        assert_eq!(sim.enabled_vectors(INTX_IRQ), 1);
        assert!(sim.has_intx_unmask());
        device.disconnect_intx();
        assert_eq!(sim.enabled_vectors(INTX_IRQ), 0);

        // No INTx line: no pin, and connecting fails.
        let (device, _) = attach(SimSpec::virtio_net(), None);
        assert_eq!(read(&device, 0x3d, 1), 0);
        assert!(device.connect_intx(&trigger, &resample).is_err());
    }

    #[test]
    fn attach_refuses_what_cannot_be_passed_through() {
        let sim = Arc::new(SimulatedDevice::virtio_net().unwrap());
        sim.set_gone(true);
        assert!(matches!(
            VfioPciDevice::new(sim, VfioPciOptions::default()),
            Err(VfioError::Backend(BackendError::Gone(_)))
        ));
        let mut bridge = SimSpec::virtio_net();
        bridge.config[reg::HEADER_TYPE] = 0x81;
        let sim = Arc::new(SimulatedDevice::new(bridge).unwrap());
        assert!(matches!(
            VfioPciDevice::new(sim, VfioPciOptions::default()),
            Err(VfioError::Unsupported(_))
        ));
        let mut absent = SimSpec::virtio_net();
        absent.config[0..2].fill(0xff);
        let sim = Arc::new(SimulatedDevice::new(absent).unwrap());
        assert!(VfioPciDevice::new(sim, VfioPciOptions::default()).is_err());
    }

    #[test]
    fn odd_bars_are_described_or_left_out() {
        let mut spec = SimSpec::virtio_net();
        // BAR 2: I/O, 0x20 ports; BAR 3: 32-bit prefetchable, 0x1800 bytes (rounded up);
        // BAR 5: claims 64-bit (impossible there).
        spec.config[0x18] = 0x01;
        spec.config[0x1c] = 0x08;
        spec.config[0x24] = 0x04;
        for (index, size) in [(2, 0x20), (3, 0x1800), (5, 0x1000)] {
            spec.regions.push(crate::vfio::sim::SimRegion {
                index,
                size,
                mmap: false,
                sparse_mmap: Vec::new(),
                msix_mappable: false,
            });
        }
        let (device, _) = attach(spec, None);
        let bars = device.bars();
        assert_eq!(bars.len(), 3);
        assert_eq!((bars[1].kind, bars[1].size), (BarKind::Io, 0x20));
        assert_eq!(
            (bars[2].kind, bars[2].size, bars[2].prefetchable),
            (BarKind::Memory32, 0x2000, true)
        );
        write(&device, 0x18, 0xffff_ffff, 4);
        assert_eq!(read(&device, 0x18, 4), 0xffff_ffe1);
        write(&device, 0x24, 0xffff_ffff, 4);
        assert_eq!(read(&device, 0x24, 4), 0);
        // A trapped I/O access reaches the device's region.
        device.bar_write(2, 4, &[0x5a]);
        let mut byte = [0u8];
        device.bar_read(2, 4, &mut byte);
        assert_eq!(byte, [0x5a]);
        // Past the region, or an absent BAR: all-ones.
        let mut word = [0u8; 4];
        device.bar_read(2, 0x1e, &mut word);
        assert_eq!(word, [0xff; 4]);
        device.bar_read(4, 0, &mut word);
        assert_eq!(word, [0xff; 4]);
    }

    #[test]
    fn the_rom_bar_is_shadowed_and_reads_go_to_the_rom_region() {
        let (device, sim) = attach(SimSpec::virtio_net().with_rom(0x1_0000), None);
        assert_eq!(device.rom_size(), Some(0x1_0000));
        assert_eq!(device.bars().len(), 1, "the ROM is not one of the BARs");
        // The ROM BAR: disabled at 0, sized by all-ones, reserved bits read 0.
        assert_eq!(read(&device, 0x30, 4), 0);
        write(&device, 0x30, 0xffff_ffff, 4);
        assert_eq!(read(&device, 0x30, 4), 0xffff_0001);
        write(&device, 0x30, 0xe012_37ff, 4);
        assert_eq!(read(&device, 0x30, 4), 0xe012_0001);
        write(&device, 0x30, 0, 1);
        assert_eq!(read(&device, 0x30, 4), 0xe012_0000);
        write(&device, 0x32, 0xabcd, 2);
        assert_eq!(read(&device, 0x30, 4), 0xabcd_0000);
        assert_eq!(bar_writes(&sim), 0, "ROM BAR writes reached the device");
        // Reads are the ROM region's; a read past its end is all-ones there.
        let image = rom_image(0x1_0000);
        let mut data = [0u8; 8];
        device.bar_read(ROM_BAR_INDEX, 0, &mut data);
        assert_eq!(data[..], image[..8]);
        device.bar_read(ROM_BAR_INDEX, 0x1234, &mut data[..2]);
        assert_eq!(data[..2], image[0x1234..0x1236]);
        device.bar_read(ROM_BAR_INDEX, 0xfffe, &mut data[..4]);
        assert_eq!(data[..4], [image[0xfffe], image[0xffff], 0xff, 0xff]);
        // Writes are dropped before the backend.
        let trapped = sim.trapped_accesses();
        device.bar_write(ROM_BAR_INDEX, 0, &[0; 4]);
        assert_eq!(sim.trapped_accesses(), trapped);
        assert_eq!(sim.peek(ROM_REGION, 0, 4), image[..4]);
        // Hostile offsets and widths: no panic, all-ones outside.
        for offset in [0x1_0000, 0x1_0001, u64::MAX - 1, u64::MAX] {
            let mut buf = [0u8; 16];
            device.bar_read(ROM_BAR_INDEX, offset, &mut buf);
            assert_eq!(buf, [0xff; 16], "{offset:#x}");
            device.bar_write(ROM_BAR_INDEX, offset, &buf);
        }
        // A vanished device's ROM reads all-ones; the shadow still answers.
        sim.set_gone(true);
        device.bar_read(ROM_BAR_INDEX, 0, &mut data);
        assert_eq!(data, [0xff; 8]);
        assert_eq!(read(&device, 0x30, 4), 0xabcd_0000);
    }

    #[test]
    fn rom_sizes_are_rounded_up_and_absent_roms_stay_hidden() {
        // 6 KiB: an 8 KiB ROM BAR whose last 2 KiB read all-ones.
        let (device, _) = attach(SimSpec::virtio_net().with_rom(0x1800), None);
        assert_eq!(device.rom_size(), Some(0x2000));
        write(&device, 0x30, 0xffff_ffff, 4);
        assert_eq!(read(&device, 0x30, 4), 0xffff_e001);
        let image = rom_image(0x1800);
        let mut data = [0u8; 4];
        device.bar_read(ROM_BAR_INDEX, 0x17fe, &mut data);
        assert_eq!(data, [image[0x17fe], image[0x17ff], 0xff, 0xff]);
        device.bar_read(ROM_BAR_INDEX, 0x1f00, &mut data);
        assert_eq!(data, [0xff; 4]);
        // 512 bytes: the smallest ROM BAR, 2 KiB.
        let (device, _) = attach(SimSpec::virtio_net().with_rom(0x200), None);
        assert_eq!(device.rom_size(), Some(MIN_ROM_SIZE));
        write(&device, 0x30, 0xffff_ffff, 4);
        assert_eq!(read(&device, 0x30, 4), 0xffff_f801);
        device.bar_read(ROM_BAR_INDEX, 0, &mut data);
        assert_eq!(data[..3], [0x55, 0xaa, 1]);
        // No ROM: the register stays 0 and ROM reads answer all-ones.
        let (device, _) = attach(SimSpec::virtio_net(), None);
        write(&device, 0x30, 0xffff_ffff, 4);
        assert_eq!(read(&device, 0x30, 4), 0);
        device.bar_read(ROM_BAR_INDEX, 0, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn a_vanished_device_answers_all_ones_and_never_panics() {
        let allocator = EventFdMsiAllocator::new();
        let (device, sim) = attach(SimSpec::virtio_net(), Some(&allocator));
        sim.set_gone(true);
        assert_eq!(read(&device, 0, 4), 0xffff_ffff);
        // The shadow still answers.
        assert_eq!(read(&device, 0x10, 4), 0x4);
        write(&device, 0x04, 0x6, 2);
        write(&device, 0x9a, 0x8000, 2);
        let mut data = [0u8; 8];
        device.bar_read(0, 0, &mut data);
        assert_eq!(data, [0xff; 8]);
        device.bar_write(0, 0, &data);
        device.bar_write(0, 0x8000, &[0; 4]);
        drop(device);
        assert_eq!(sim.resets(), 1, "only the reset on attach succeeded");
    }

    #[test]
    fn helpers() {
        assert_eq!(
            subtract((0, 0x10_000), &[(0x2000, 0x3000), (0x8000, 0x9000)]),
            vec![(0, 0x2000), (0x3000, 0x8000), (0x9000, 0x10_000)]
        );
        assert_eq!(subtract((0x2000, 0x3000), &[(0, 0x4000)]), vec![]);
        assert_eq!(subtract((0, 0x1000), &[]), vec![(0, 0x1000)]);
        let config = SimSpec::virtio_net().config;
        let all = walk_capabilities(&config);
        assert_eq!(capability_len(&config, CAP_VENDOR, 0x70, &all), 0x14);
        assert_eq!(capability_len(&config, 0x11, 0x98, &all), 12);
        assert_eq!(
            capability_len(&config, 0x42, 0x84, &all),
            0x14,
            "up to the next one"
        );
        assert_eq!(
            capability_len(&config, 0x42, 0x98, &all),
            0x68,
            "up to the end"
        );
        assert_eq!(align_up(0x1001, 0x1000), 0x2000);
        assert_eq!(align_up(u64::MAX, 0x1000), !0xfff);
    }
}
