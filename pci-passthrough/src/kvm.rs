//! MSI routing through KVM: a GSI per vector, an MSI route per deliverable vector
//! (`KVM_SET_GSI_ROUTING`) and an irqfd per vector (`KVM_IRQFD`).
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole routing table, and creating the in-kernel
//! irqchip (`KVM_CREATE_IRQCHIP`) installs a default table routing GSIs 0-15 to both PICs
//! and the IOAPIC and GSIs 16-23 to the IOAPIC. A VMM that sets only its MSI routes would
//! silently disconnect its legacy interrupts (the serial port on GSI 4...), so
//! [`KvmGsiRouter`] keeps those default routes in every table it sets
//! ([`LegacyRoutes::InKernelIrqchip`]). One router per VM; every MSI-X device gets a
//! [`KvmMsiRouting`] from it.
//!
//! x86_64 only: on arm64 MSI routes need the ITS device ID, which this does not model yet.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::msix::{MsiAllocator, MsiKind, MsiMessage, MsiRouting};
use crate::Error;

/// GSIs the in-kernel IOAPIC has pins for; MSI GSIs are allocated after them.
pub const IOAPIC_PINS: u32 = 24;

/// Which non-MSI routes every table keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyRoutes {
    /// KVM's default routes for `KVM_CREATE_IRQCHIP`: GSI 0-15 to the PIC pin `gsi % 8`
    /// (master below 8) and to IOAPIC pin `gsi`; GSI 16-23 to IOAPIC pin `gsi`.
    InKernelIrqchip,
    /// None (split irqchip: the IOAPIC is in user space).
    None,
}

/// One route of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To an in-kernel irqchip pin.
    Irqchip {
        /// `KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE` or `KVM_IRQCHIP_IOAPIC`.
        chip: u32,
        /// Pin.
        pin: u32,
    },
    /// An MSI write.
    Msi(MsiMessage),
}

struct RouterState {
    legacy: Vec<(u32, Route)>,
    msi: BTreeMap<u32, MsiMessage>,
    /// GSIs handed out to devices.
    allocated: std::collections::BTreeSet<u32>,
}

/// The VM's GSI routing table: allocates GSIs and sets the table with KVM.
pub struct KvmGsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

impl KvmGsiRouter {
    /// A router for `vm` keeping `legacy` routes. Sets nothing until the first MSI route.
    pub fn new(vm: Arc<VmFd>, legacy: LegacyRoutes) -> Arc<Self> {
        let mut routes = Vec::new();
        if legacy == LegacyRoutes::InKernelIrqchip {
            for gsi in 0..IOAPIC_PINS {
                if gsi < 16 {
                    let chip = if gsi < 8 {
                        KVM_IRQCHIP_PIC_MASTER
                    } else {
                        KVM_IRQCHIP_PIC_SLAVE
                    };
                    routes.push((gsi, Route::Irqchip { chip, pin: gsi % 8 }));
                }
                routes.push((
                    gsi,
                    Route::Irqchip {
                        chip: KVM_IRQCHIP_IOAPIC,
                        pin: gsi,
                    },
                ));
            }
        }
        Arc::new(KvmGsiRouter {
            vm,
            state: Mutex::new(RouterState {
                legacy: routes,
                msi: BTreeMap::new(),
                allocated: std::collections::BTreeSet::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table as it is set (or will be set by the next change): `(gsi, route)`.
    pub fn routes(&self) -> Vec<(u32, Route)> {
        let state = self.lock();
        state
            .legacy
            .iter()
            .copied()
            .chain(state.msi.iter().map(|(&gsi, &m)| (gsi, Route::Msi(m))))
            .collect()
    }

    /// `vectors` GSIs and irqfds for one MSI-X function. The irqfds are registered now;
    /// their routes are set as the guest enables and unmasks vectors.
    pub fn allocate(self: &Arc<Self>, vectors: u16) -> Result<KvmMsiRouting, Error> {
        let mut gsis = Vec::with_capacity(usize::from(vectors));
        {
            let mut state = self.lock();
            let mut candidate = IOAPIC_PINS;
            while gsis.len() < usize::from(vectors) {
                if candidate >= KVM_MAX_IRQ_ROUTES as u32 {
                    for gsi in &gsis {
                        state.allocated.remove(gsi);
                    }
                    return Err(Error::NoFreeGsi);
                }
                if state.allocated.insert(candidate) {
                    gsis.push(candidate);
                }
                candidate += 1;
            }
        }
        let mut routing = KvmMsiRouting {
            router: self.clone(),
            gsis: Vec::new(),
            irqfds: Vec::new(),
        };
        // From here on, dropping `routing` releases what was set up.
        for gsi in gsis.iter().copied() {
            let registered = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(Error::EventFd)
                .and_then(|fd| {
                    self.vm
                        .register_irqfd(&fd, gsi)
                        .map_err(|e| Error::Kvm(e.errno()))?;
                    Ok(fd)
                });
            match registered {
                Ok(fd) => {
                    routing.gsis.push(gsi);
                    routing.irqfds.push(fd);
                }
                Err(e) => {
                    let mut state = self.lock();
                    for gsi in gsis.iter().skip(routing.gsis.len()) {
                        state.allocated.remove(gsi);
                    }
                    return Err(e);
                }
            }
        }
        Ok(routing)
    }

    fn set_msi(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), Error> {
        let mut state = self.lock();
        let previous = match message {
            Some(m) => state.msi.insert(gsi, m),
            None => state.msi.remove(&gsi),
        };
        let result = self.commit(&state);
        if result.is_err() {
            // Keep the table as KVM has it.
            match previous {
                Some(m) => state.msi.insert(gsi, m),
                None => state.msi.remove(&gsi),
            };
        }
        result
    }

    fn commit(&self, state: &RouterState) -> Result<(), Error> {
        let entries: Vec<kvm_irq_routing_entry> = state
            .legacy
            .iter()
            .copied()
            .chain(state.msi.iter().map(|(&gsi, &m)| (gsi, Route::Msi(m))))
            .map(|(gsi, route)| entry(gsi, route))
            .collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| Error::NoFreeGsi)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| Error::Kvm(e.errno()))
    }
}

fn entry(gsi: u32, route: Route) -> kvm_irq_routing_entry {
    let (type_, u) = match route {
        Route::Irqchip { chip, pin } => (
            KVM_IRQ_ROUTING_IRQCHIP,
            kvm_irq_routing_entry__bindgen_ty_1 {
                irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
            },
        ),
        Route::Msi(m) => (
            KVM_IRQ_ROUTING_MSI,
            kvm_irq_routing_entry__bindgen_ty_1 {
                msi: kvm_irq_routing_msi {
                    address_lo: m.address as u32,
                    address_hi: (m.address >> 32) as u32,
                    data: m.data,
                    ..Default::default()
                },
            },
        ),
    };
    kvm_irq_routing_entry {
        gsi,
        type_,
        u,
        ..Default::default()
    }
}

/// The GSIs and irqfds of one MSI-X function; dropping it unregisters the irqfds, removes
/// the routes and frees the GSIs.
pub struct KvmMsiRouting {
    router: Arc<KvmGsiRouter>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
}

impl KvmMsiRouting {
    /// Vector `vector`'s GSI.
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.gsis.get(usize::from(vector)).copied()
    }

    /// Vector `vector`'s irqfd.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfds.get(usize::from(vector))
    }
}

impl MsiRouting for KvmMsiRouting {
    fn update(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), Error> {
        let gsi = self.gsi(vector).ok_or(Error::NoSuchVector(vector))?;
        self.router.set_msi(gsi, message)
    }

    fn signal(&self, vector: u16) -> std::io::Result<()> {
        match self.irqfd(vector) {
            Some(fd) => fd.write(1),
            None => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// The irqfd: a device signalling it raises the vector's GSI, whose route the guest's
    /// message sets.
    fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfd(vector)
    }
}

/// MSI and MSI-X functions alike get GSIs and irqfds from the router (a VFIO device model
/// asks once it knows its vector counts).
impl MsiAllocator for Arc<KvmGsiRouter> {
    fn allocate(&self, _kind: MsiKind, vectors: u16) -> Result<Arc<dyn MsiRouting>, Error> {
        Ok(Arc::new(KvmGsiRouter::allocate(self, vectors)?))
    }
}

impl Drop for KvmMsiRouting {
    fn drop(&mut self) {
        for (fd, &gsi) in self.irqfds.iter().zip(&self.gsis) {
            let _ = self.router.vm.unregister_irqfd(fd, gsi);
        }
        let mut state = self.router.lock();
        let had_routes = self.gsis.iter().any(|gsi| state.msi.contains_key(gsi));
        for gsi in &self.gsis {
            state.msi.remove(gsi);
            state.allocated.remove(gsi);
        }
        if had_routes {
            if let Err(e) = self.router.commit(&state) {
                log::warn!("msi: cannot remove routes: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    #[test]
    fn default_routes_match_kvm() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = KvmGsiRouter::new(vm.clone(), LegacyRoutes::InKernelIrqchip);
        let routes = router.routes();
        assert_eq!(routes.len(), 16 * 2 + 8);
        assert!(routes.contains(&(
            4,
            Route::Irqchip {
                chip: KVM_IRQCHIP_PIC_MASTER,
                pin: 4
            }
        )));
        assert!(routes.contains(&(
            12,
            Route::Irqchip {
                chip: KVM_IRQCHIP_PIC_SLAVE,
                pin: 4
            }
        )));
        assert!(routes.contains(&(
            23,
            Route::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: 23
            }
        )));

        let a = router.allocate(3).unwrap();
        let b = router.allocate(2).unwrap();
        assert_eq!(
            (a.gsi(0), a.gsi(2), b.gsi(0)),
            (Some(24), Some(26), Some(27))
        );
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        a.update(1, Some(message)).unwrap();
        b.update(0, Some(message)).unwrap();
        assert!(router.routes().contains(&(25, Route::Msi(message))));
        assert_eq!(router.routes().len(), 42);
        a.signal(1).unwrap();
        // The eventfd a VFIO device is handed is the vector's irqfd (KVM consumes its
        // signals, so compare the descriptors).
        use std::os::unix::io::AsRawFd;
        let handed = a.eventfd(1).map(|fd| fd.as_raw_fd());
        assert_eq!(handed, a.irqfd(1).map(|fd| fd.as_raw_fd()));
        assert_ne!(handed, a.irqfd(0).map(|fd| fd.as_raw_fd()));
        assert!(a.eventfd(3).is_none());
        a.update(1, None).unwrap();
        assert_eq!(router.routes().len(), 41);
        assert!(a.update(3, Some(message)).is_err());
        // Dropping a function frees its GSIs and routes.
        drop(b);
        assert_eq!(router.routes().len(), 40);
        let c = router.allocate(1).unwrap();
        assert_eq!(c.gsi(0), Some(27));
        // Through the allocator trait: the next free GSIs.
        let d = MsiAllocator::allocate(&router, MsiKind::MsiX, 2).unwrap();
        assert!(d.eventfd(1).is_some() && d.eventfd(2).is_none());
        drop(d);
        assert_eq!(router.allocate(1).unwrap().gsi(0), Some(28));
        // Legacy interrupts still route: the irqchip accepts a line on GSI 4.
        vm.set_irq_line(4, true).unwrap();
        vm.set_irq_line(4, false).unwrap();
    }
}
