//! Registering guest RAM with a real KVM VM and reading dirty logs written by a real guest.

use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmkit_memory::layout::{HIGH_RAM_START, MMIO_HOLE_START};
use vmkit_memory::{Backing, Error, GuestRam, MemoryConfig, SlotOptions};

const MIB: u64 = 1 << 20;

/// A VM, or `None` (with a message) when this host has no usable /dev/kvm.
fn vm_or_skip(test: &str) -> Option<VmFd> {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("SKIPPED {test}: /dev/kvm is not usable here ({e})");
            return None;
        }
    };
    match kvm.create_vm() {
        Ok(vm) => Some(vm),
        Err(e) => {
            eprintln!("SKIPPED {test}: KVM_CREATE_VM failed ({e})");
            None
        }
    }
}

#[test]
fn one_slot_per_region() {
    let Some(vm) = vm_or_skip("one_slot_per_region") else {
        return;
    };
    // Crosses the hole: two regions, two slots. MAP_NORESERVE keeps this cheap.
    let ram = GuestRam::new(&MemoryConfig::new(MMIO_HOLE_START + 2 * MIB)).unwrap();
    let slots = ram
        .register_with_kvm(
            &vm,
            SlotOptions {
                first_slot: 3,
                dirty_log: false,
            },
        )
        .unwrap();
    let s = slots.slots();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0].slot, s[0].guest_addr, s[0].size),
        (3, 0, MMIO_HOLE_START)
    );
    assert_eq!(
        (s[1].slot, s[1].guest_addr, s[1].size),
        (4, HIGH_RAM_START, 2 * MIB)
    );
    for (slot, range) in s.iter().zip(ram.ranges()) {
        assert_eq!(slot.guest_addr, range.start.0);
        assert!(!slot.dirty_log);
        assert_ne!(slot.host_addr, 0);
    }
    assert!(matches!(
        slots.dirty_bitmaps(&vm),
        Err(Error::DirtyLogNotEnabled { slot: 3 })
    ));

    // The same slot numbers cannot be registered twice over different memory.
    let other = GuestRam::new(&MemoryConfig::new(2 * MIB)).unwrap();
    let err = other
        .register_with_kvm(
            &vm,
            SlotOptions {
                first_slot: 3,
                dirty_log: false,
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::SlotRegistration { slot: 3, .. }),
        "{err}"
    );

    slots.unregister(&vm).unwrap();
    // After unregistering, the slot numbers are free again.
    let again = other
        .register_with_kvm(
            &vm,
            SlotOptions {
                first_slot: 3,
                dirty_log: false,
            },
        )
        .unwrap();
    again.unregister(&vm).unwrap();
}

/// 16-bit real-mode guest loaded at `CODE`: writes three pages, reads a byte the host wrote
/// and reports it on port 0x10, then halts.
const CODE: u64 = 0x1000;
const GUEST_CODE: &[u8] = &[
    0xb0, 0x42, // mov al, 0x42
    0xa2, 0x00, 0x50, // mov [0x5000], al
    0xa2, 0x00, 0x70, // mov [0x7000], al
    0xa2, 0x00, 0x90, // mov [0x9000], al
    0xa0, 0x00, 0x60, // mov al, [0x6000]
    0xe6, 0x10, // out 0x10, al
    0xf4, // hlt
];
const DIRTIED: [u64; 3] = [0x5000, 0x7000, 0x9000];

fn dirty_log_for(backing: Backing) {
    let test = format!("dirty_log_tracks_guest_writes ({backing})");
    let Some(vm) = vm_or_skip(&test) else {
        return;
    };
    let ram = GuestRam::new(&MemoryConfig::new(2 * MIB).with_backing(backing)).unwrap();
    let slots = ram
        .register_with_kvm(
            &vm,
            SlotOptions {
                first_slot: 0,
                dirty_log: true,
            },
        )
        .unwrap();
    assert!(slots.slots()[0].dirty_log);

    // Host writes: the code and a value for the guest to read. KVM does not log these.
    ram.memory()
        .write_slice(GUEST_CODE, GuestAddress(CODE))
        .unwrap();
    ram.memory()
        .write_obj(0x5au8, GuestAddress(0x6000))
        .unwrap();
    let initial = slots.dirty_bitmaps(&vm).unwrap();
    assert_eq!(initial.len(), 1);
    assert_eq!(initial[0].count(), 0, "host writes must not be logged");

    // Real mode needs a TSS on VMX without unrestricted guest; harmless otherwise.
    vm.set_tss_address(0xfffb_d000).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    let mut out = None;
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0x10, data) => out = Some(data[0]),
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(out, Some(0x5a), "the guest reads what the host wrote");
    for addr in DIRTIED {
        assert_eq!(
            ram.memory().read_obj::<u8>(GuestAddress(addr)).unwrap(),
            0x42
        );
    }

    let dirty = slots.dirty_bitmaps(&vm).unwrap();
    assert_eq!(dirty[0].page_size, 4096);
    assert_eq!(dirty[0].guest_start, 0);
    let pages: Vec<u64> = dirty[0].dirty_pages().collect();
    assert_eq!(
        pages, DIRTIED,
        "exactly the pages the guest wrote are dirty"
    );
    assert_eq!(dirty[0].count(), 3);

    // Reading the log cleared it.
    let again = slots.dirty_bitmaps(&vm).unwrap();
    assert!(
        again[0].is_clean(),
        "{:?}",
        again[0].dirty_pages().collect::<Vec<_>>()
    );
}

#[test]
fn dirty_log_tracks_guest_writes_anonymous() {
    dirty_log_for(Backing::Anonymous);
}

#[test]
fn dirty_log_tracks_guest_writes_shared_memfd() {
    dirty_log_for(Backing::SharedMemfd);
}

#[test]
fn slots_keep_the_mapping_alive() {
    let Some(vm) = vm_or_skip("slots_keep_the_mapping_alive") else {
        return;
    };
    let ram = GuestRam::new(&MemoryConfig::new(2 * MIB)).unwrap();
    ram.memory().write_obj(7u32, GuestAddress(0x100)).unwrap();
    let slots = ram.register_with_kvm(&vm, SlotOptions::default()).unwrap();
    let host = slots.slots()[0].host_addr;
    drop(ram);
    // The mapping is still there: KvmSlots holds it.
    // SAFETY: KvmSlots keeps the region mapped; 0x100 is inside it.
    let v = unsafe { std::ptr::read_volatile((host + 0x100) as *const u32) };
    assert_eq!(v, 7);
    slots.unregister(&vm).unwrap();
}
