//! vmkit-pci-passthrough: device passthrough — a root complex, type-0 configuration
//! spaces, BAR placement, MSI and MSI-X with their KVM routing, and VFIO devices that
//! implement [`PciDevice`] on top of these pieces.
//!
//! - [`PciBus`] is the root complex: a host bridge at 00:00.0 and functions by
//!   bus/device/function. Guests reach configuration space through [`PciConfigIo`] (ports
//!   0xCF8-0xCFF) or [`PciConfigMmio`] (an ECAM window); absent functions read all-ones.
//!   [`PciBus::add_device`] places BARs, and the expansion ROM a function declares
//!   ([`PciDevice::rom_size`]), from [`BarWindows`]; when the guest moves a BAR or switches
//!   decoding, the bus tells the VMM's [`BarMapper`], which moves the BAR's [`BarAccess`]
//!   and ioeventfds on its own buses. The ROM is mapped like a 32-bit memory BAR with index
//!   [`ROM_BAR_INDEX`] (6, VFIO's ROM region), read-only, when both its enable bit and
//!   memory decoding are on.
//! - [`ConfigSpace`] is a type-0 header with write masks (read-only fields stay read-only
//!   whatever the guest writes), BAR and expansion ROM BAR sizing and a capability list
//!   builder.
//! - [`MsixConfig`] models an MSI-X table and PBA; it tells an [`MsiRouting`] sink which
//!   vectors deliver which message. [`kvm::KvmGsiRouter`] is that sink for KVM (GSI routes
//!   plus irqfds), [`EventFdMsiRouting`] one without a hypervisor. [`MsiConfig`] does the
//!   same for an MSI capability.
//! - [`vfio::VfioPciDevice`] passes a real function through: its configuration space
//!   virtualized over the device's (BARs, the ROM BAR, MSI and MSI-X in a shadow, the rest
//!   read and written through), its expansion ROM read through the backend, BARs trapped
//!   or mapped into the guest through a
//!   [`vfio::DirectMapper`] (a KVM memory slot: [`vfio::KvmDirectMapper`]), and interrupts
//!   handed to the device as the eventfds of the [`MsiRouting`] sinks an [`MsiAllocator`]
//!   gives. It sits on a [`vfio::VfioBackend`]: kernel VFIO ([`vfio::kernel`]), a vfio-user
//!   server ([`vfio::user`]), or [`vfio::SimulatedDevice`] for tests.
//!
//! Every guest-controlled offset, width and value is accepted without panicking.
#![deny(missing_docs)]

pub mod alloc;
pub mod bus;
pub mod config;
#[cfg(target_arch = "x86_64")]
pub mod kvm;
pub mod msi;
pub mod msix;
pub mod vfio;

pub use alloc::{AddressSpace, AddressWindow, BarAllocator, BarWindows};
pub use bus::{
    BarAccess, BarMapper, BarRegion, HostBridge, NoBarMapper, PciAddress, PciBus, PciConfigIo,
    PciConfigMmio, PciDevice,
};
pub use config::{BarKind, ConfigSpace, PciBar, PciHeader, ROM_BAR_INDEX};
pub use msi::{MsiCapability, MsiConfig};
pub use msix::{
    Delivery, EventFdMsiAllocator, EventFdMsiRouting, MsiAllocator, MsiKind, MsiMessage,
    MsiRouting, MsixConfig, MsixLocation,
};

/// Errors of the PCI layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A BAR index past 5, a 64-bit BAR at index 5, or a prefetchable I/O BAR.
    #[error("invalid BAR {0}")]
    InvalidBar(u8),
    /// The BAR register is already used by another BAR (6: a second expansion ROM).
    #[error("BAR {0} is already declared")]
    BarInUse(u8),
    /// BAR sizes are powers of two within the limits of their kind (expansion ROMs: 2 KiB
    /// to 2 GiB).
    #[error("invalid BAR size {0:#x}")]
    InvalidBarSize(u64),
    /// The capability does not fit in the configuration space.
    #[error("no room left for the capability")]
    CapabilitySpaceFull,
    /// The capability's write mask is longer than its body.
    #[error("invalid capability")]
    InvalidCapability,
    /// Device numbers go to 31, function numbers to 7.
    #[error("invalid PCI address: device {device}, function {function}")]
    InvalidAddress {
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
    },
    /// A function is already there.
    #[error("{0} is already in use")]
    SlotInUse(PciAddress),
    /// No window has room for the BAR.
    #[error("no room for a {kind:?} BAR of {size:#x} bytes")]
    OutOfSpace {
        /// The BAR's kind.
        kind: BarKind,
        /// Its size.
        size: u64,
    },
    /// The range overlaps an allocation or wraps around.
    #[error("range {base:#x}+{size:#x} overlaps another one")]
    Overlap {
        /// First address.
        base: u64,
        /// Bytes.
        size: u64,
    },
    /// MSI-X functions have 1 to 2048 vectors.
    #[error("invalid MSI-X vector count {0}")]
    InvalidVectorCount(u16),
    /// The vector does not exist.
    #[error("no MSI-X vector {0}")]
    NoSuchVector(u16),
    /// Raising an interrupt failed.
    #[error("cannot signal an interrupt: {0}")]
    Signal(std::io::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// A KVM ioctl failed (errno).
    #[error("KVM ioctl failed: errno {0}")]
    Kvm(i32),
    /// Every GSI (or routing table entry) is in use.
    #[error("no free GSI")]
    NoFreeGsi,
    /// The VMM refused to map a BAR there (overlaps RAM or another device).
    #[error("BAR mapping refused: {0}")]
    MapRefused(String),
}
