//! The vfio-user backend against the DMA test device server (`examples/vfio-user-device.rs`),
//! over a real socket between two processes: configuration space, regions, a BAR mapped
//! from the server's memfd, MSI-X through eventfds, DMA into "guest RAM" in a memfd, reset,
//! a server that dies, and hostile register writes.

mod common;
use common::DeviceServer;

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vmkit_guest_abi::testdev::*;
use vmkit_pci_passthrough::vfio::user::VfioUserBackend;
use vmkit_pci_passthrough::vfio::{BackendError, DmaRegion, VfioBackend};
use vmm_sys_util::eventfd::EventFd;

/// How long any single call may take before the test calls it a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// VFIO's region index of configuration space, and of MSI-X among interrupt indexes.
const CONFIG_REGION: u32 = 7;
const MSIX_IRQ: u32 = 2;
/// Where the test's "guest RAM" is in the device's DMA address space, and its size.
const RAM_IOVA: u64 = 0x1000_0000;
const RAM_SIZE: usize = 4 << 20;

fn connect(server: &DeviceServer) -> Arc<VfioUserBackend> {
    let socket = server.socket.clone();
    Arc::new(within(CALL_TIMEOUT, move || {
        VfioUserBackend::connect(&socket).expect("connect to the server")
    }))
}

/// Runs `f` on its own thread and fails the test if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(f());
    });
    receiver
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no result within {limit:?}: a hang"))
}

fn read32(backend: &VfioUserBackend, region: u32, offset: u64) -> u32 {
    let mut bytes = [0u8; 4];
    backend
        .region_read(region, offset, &mut bytes)
        .unwrap_or_else(|e| panic!("read of region {region} at {offset:#x}: {e}"));
    u32::from_le_bytes(bytes)
}

fn write32(backend: &VfioUserBackend, region: u32, offset: u64, value: u32) {
    backend
        .region_write(region, offset, &value.to_le_bytes())
        .unwrap_or_else(|e| panic!("write of region {region} at {offset:#x}: {e}"));
}

fn register(backend: &VfioUserBackend, offset: u64) -> u32 {
    read32(backend, u32::from(REGISTER_BAR), offset)
}

fn set_register(backend: &VfioUserBackend, offset: u64, value: u32) {
    write32(backend, u32::from(REGISTER_BAR), offset, value);
}

/// Programs a DMA and runs it; returns the status it ended with.
fn run_dma(backend: &VfioUserBackend, command: u32, address: u64, len: u32, seed: u32) -> u32 {
    set_register(backend, REG_DMA_ADDR_LO, address as u32);
    set_register(backend, REG_DMA_ADDR_HI, (address >> 32) as u32);
    set_register(backend, REG_DMA_LEN, len);
    set_register(backend, REG_PATTERN_SEED, seed);
    set_register(backend, REG_COMMAND, command);
    register(backend, REG_STATUS)
}

/// Waits up to `timeout` for `eventfd` to be signalled; returns its counter (0: it was not).
fn wait_for_interrupt(eventfd: &EventFd, timeout: Duration) -> u64 {
    let mut poll = libc::pollfd {
        fd: eventfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, millis) };
    if ready == 1 {
        eventfd.read().unwrap_or(0)
    } else {
        0
    }
}

/// Memory shared through a memfd, mapped into this process: the test's "guest RAM".
struct SharedMemory {
    file: File,
    address: *mut u8,
    size: usize,
}

impl SharedMemory {
    fn new(size: usize) -> Self {
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"vmkit-test-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a new fd nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).expect("size the memfd");
        // SAFETY: a new shared mapping of the memfd.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(address, libc::MAP_FAILED, "mmap of the memfd");
        SharedMemory {
            file,
            address: address.cast(),
            size,
        }
    }

    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.size);
        // SAFETY: inside the mapping; volatile as the server writes it concurrently.
        (offset..offset + len)
            .map(|at| unsafe { self.address.add(at).read_volatile() })
            .collect()
    }

    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.size);
        for (i, &byte) in data.iter().enumerate() {
            // SAFETY: inside the mapping.
            unsafe { self.address.add(offset + i).write_volatile(byte) };
        }
    }

    fn dma_region(&self, iova: u64) -> DmaRegion {
        DmaRegion {
            iova,
            size: self.size as u64,
            host_address: self.address as u64,
            fd: Some((self.file.as_raw_fd(), 0)),
        }
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.address.cast(), self.size) };
    }
}

fn expect_gone(result: Result<(), BackendError>) {
    assert!(matches!(result, Err(BackendError::Gone(_))), "{result:?}");
}

#[test]
fn the_test_device_works_through_the_vfio_user_backend() {
    let mut server = DeviceServer::start();
    let backend = connect(&server);

    // The device, as vfio_user's client reports it (reset despite its inverted flag).
    let info = backend.device_info();
    assert_eq!((info.num_regions, info.num_irqs, info.reset), (9, 5, true));

    // Configuration space.
    let config = |offset| read32(&backend, CONFIG_REGION, offset);
    assert_eq!(
        config(0x00),
        u32::from(DEVICE_ID) << 16 | u32::from(VENDOR_ID)
    );
    assert_eq!(config(0x08) >> 8, CLASS_CODE);
    assert_eq!((config(0x0c) >> 16) & 0xff, 0, "header type 0");
    assert_ne!((config(0x04) >> 16) & 0x10, 0, "status: capability list");
    assert_eq!((config(0x3c) >> 8) & 0xff, 0, "no interrupt pin");
    let msix = u64::from(config(0x34) & 0xfc);
    assert!(msix >= 0x40);
    let header = config(msix);
    assert_eq!(header & 0xff, 0x11, "MSI-X capability");
    assert_eq!((header >> 8) & 0xff, 0, "the only capability");
    assert_eq!((header >> 16) & 0x7ff, u32::from(MSIX_VECTORS) - 1);
    assert_eq!(
        config(msix + 4),
        u32::from(MSIX_BAR),
        "table: BIR 2, offset 0"
    );
    assert_eq!(config(msix + 8), MSIX_PBA_OFFSET | u32::from(MSIX_BAR));
    // BAR type bits and sizing: all-ones reads back the size mask.
    assert_eq!(config(0x10), 0, "BAR 0: 32-bit memory, at 0");
    assert_eq!(config(0x20) & 0xf, 0x8, "BAR 4: 32-bit prefetchable memory");
    for (bar, size, flags) in [
        (REGISTER_BAR, REGISTER_BAR_SIZE, 0),
        (MSIX_BAR, MSIX_BAR_SIZE, 0),
        (MEMORY_BAR, MEMORY_BAR_SIZE, 0x8),
        (1, 0, 0),
        (5, 0, 0),
    ] {
        let offset = 0x10 + 4 * u64::from(bar);
        write32(&backend, CONFIG_REGION, offset, u32::MAX);
        let expected = if size == 0 {
            0
        } else {
            !(size as u32 - 1) | flags
        };
        assert_eq!(config(offset), expected, "BAR {bar} sizing");
        write32(&backend, CONFIG_REGION, offset, 0);
    }

    // Regions.
    let region = |index| backend.region_info(index).expect("region info");
    assert_eq!(region(0).size, REGISTER_BAR_SIZE);
    assert!(!region(0).mmap);
    assert_eq!(region(2).size, MSIX_BAR_SIZE);
    assert_eq!(region(4).size, MEMORY_BAR_SIZE);
    assert_eq!(region(4).mappable_areas(), vec![(0, MEMORY_BAR_SIZE)]);
    assert_eq!(region(7).size, 256);
    for empty in [1, 3, 5, 6] {
        assert_eq!(region(empty).size, 0, "region {empty}");
    }
    assert_eq!(register(&backend, REG_ID), REGISTER_SIGNATURE);

    // BAR 4 mapped from the server's memfd: the same memory the server sees.
    let bar4 = backend
        .map_region(u32::from(MEMORY_BAR), 0, MEMORY_BAR_SIZE)
        .expect("map BAR 4");
    let bar4_word = |offset: usize| {
        // SAFETY: inside the 64 KiB mapping, which lives as long as `bar4`.
        unsafe {
            bar4.host_address()
                .add(offset)
                .cast::<u32>()
                .read_volatile()
        }
    };
    assert_eq!(bar4_word(0), MEMORY_SIGNATURE);
    // SAFETY: as above.
    unsafe {
        bar4.host_address()
            .add(0x100)
            .cast::<u32>()
            .write_volatile(0xdead_beef)
    };
    assert_eq!(read32(&backend, u32::from(MEMORY_BAR), 0x100), 0xdead_beef);

    // MSI-X through eventfds.
    let msix_info = backend.irq_info(MSIX_IRQ).expect("MSI-X info");
    assert_eq!(msix_info.count, u32::from(MSIX_VECTORS));
    assert!(msix_info.eventfd);
    let vectors = [
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ];
    backend
        .set_irqs(MSIX_IRQ, 0, &[&vectors[0], &vectors[1]])
        .expect("set the MSI-X eventfds");

    // DMA into "guest RAM".
    let ram = SharedMemory::new(RAM_SIZE);
    backend
        .dma_map(&ram.dma_region(RAM_IOVA))
        .expect("DMA map the guest RAM");
    set_register(&backend, REG_IRQ_VECTOR, 1);
    let mut commands = 0;

    let status = run_dma(
        &backend,
        COMMAND_WRITE_GUEST,
        RAM_IOVA + 0x1000,
        0x3000,
        0x5a,
    );
    commands += 1;
    assert_eq!(status, STATUS_DONE);
    let expected: Vec<u8> = (0..0x3000).map(|i| pattern_byte(0x5a, i)).collect();
    assert_eq!(ram.read(0x1000, 0x3000), expected, "the pattern");
    assert_eq!(ram.read(0xfff, 1), [0], "nothing before the range");
    assert_eq!(ram.read(0x4000, 1), [0], "nothing after the range");
    assert_eq!(wait_for_interrupt(&vectors[1], Duration::from_secs(5)), 1);
    assert_eq!(wait_for_interrupt(&vectors[0], Duration::ZERO), 0);

    let data: Vec<u8> = (0..5000u32).map(|i| (i * 13 + i / 7) as u8).collect();
    ram.write(0x10_0000, &data);
    let status = run_dma(&backend, COMMAND_READ_GUEST, RAM_IOVA + 0x10_0000, 5000, 0);
    commands += 1;
    assert_eq!(status, STATUS_DONE);
    let result = u64::from(register(&backend, REG_RESULT_HI)) << 32
        | u64::from(register(&backend, REG_RESULT_LO));
    assert_eq!(result, checksum(&data));
    assert_eq!(wait_for_interrupt(&vectors[1], Duration::from_secs(5)), 1);

    // Refused DMAs: they end in STATUS_ERROR (and still count and interrupt) without
    // touching memory.
    let end = RAM_SIZE - 16;
    ram.write(end, &[0xee; 16]);
    ram.write(0x20_0000, &[0xee; 16]);
    let before = ram.read(0, RAM_SIZE);
    for (what, address, len) in [
        ("past the end of RAM", RAM_IOVA + end as u64, 32),
        ("before RAM", RAM_IOVA - 0x1000, 0x2000),
        (
            "longer than MAX_DMA_LEN",
            RAM_IOVA + 0x20_0000,
            MAX_DMA_LEN + 1,
        ),
        ("wrapping around", u64::MAX - 0xf, 0x20),
    ] {
        for command in [COMMAND_WRITE_GUEST, COMMAND_READ_GUEST] {
            let status = run_dma(&backend, command, address, len, 0x77);
            commands += 1;
            assert_eq!(status, STATUS_ERROR, "{what}, command {command}");
            assert_eq!(wait_for_interrupt(&vectors[1], Duration::from_secs(5)), 1);
        }
    }
    assert_eq!(
        run_dma(&backend, 7, RAM_IOVA, 16, 0),
        STATUS_ERROR,
        "unknown command"
    );
    commands += 1;
    assert_eq!(wait_for_interrupt(&vectors[1], Duration::from_secs(5)), 1);
    // A DMA mapping longer than its file is refused (touching it would crash the server
    // with SIGBUS); vfio_user's client does not report that, the DMA does.
    let short = SharedMemory::new(0x1000);
    let too_long = DmaRegion {
        size: 0x10_0000,
        ..short.dma_region(0x8000_0000)
    };
    backend
        .dma_map(&too_long)
        .expect("DMA map (refused unseen)");
    assert_eq!(
        run_dma(&backend, COMMAND_READ_GUEST, 0x8000_0000 + 0x8000, 16, 0),
        STATUS_ERROR
    );
    commands += 1;
    assert_eq!(wait_for_interrupt(&vectors[1], Duration::from_secs(5)), 1);
    assert!(
        ram.read(0, RAM_SIZE) == before,
        "a refused DMA changed memory"
    );
    assert_eq!(register(&backend, REG_COMPLETIONS), commands);

    // Reset: registers and device memory as new; DMA mappings and eventfds stay.
    backend.reset().expect("reset");
    for offset in [
        REG_STATUS,
        REG_COMPLETIONS,
        REG_IRQ_VECTOR,
        REG_DMA_LEN,
        REG_PATTERN_SEED,
        REG_DMA_ADDR_LO,
        REG_RESULT_LO,
    ] {
        assert_eq!(
            register(&backend, offset),
            0,
            "register {offset:#x} after reset"
        );
    }
    assert_eq!(register(&backend, REG_ID), REGISTER_SIGNATURE);
    assert_eq!(bar4_word(0), MEMORY_SIGNATURE);
    assert_eq!(bar4_word(0x100), 0);
    assert_eq!(read32(&backend, u32::from(MEMORY_BAR), 0x100), 0);
    assert_eq!(
        run_dma(&backend, COMMAND_WRITE_GUEST, RAM_IOVA, 16, 1),
        STATUS_DONE
    );
    assert_eq!(wait_for_interrupt(&vectors[0], Duration::from_secs(5)), 1);
    assert_eq!(register(&backend, REG_COMPLETIONS), 1);

    // Unmapped guest RAM is out of the device's reach.
    backend
        .dma_unmap(RAM_IOVA, RAM_SIZE as u64)
        .expect("DMA unmap");
    let before = ram.read(0, 64);
    assert_eq!(
        run_dma(&backend, COMMAND_WRITE_GUEST, RAM_IOVA, 64, 9),
        STATUS_ERROR
    );
    assert_eq!(ram.read(0, 64), before);
    let anonymous = DmaRegion {
        fd: None,
        ..ram.dma_region(RAM_IOVA)
    };
    assert!(matches!(
        backend.dma_map(&anonymous),
        Err(BackendError::Unsupported(_))
    ));

    // A server that dies: the next call fails, promptly, and so do the later ones.
    server.kill();
    let started = Instant::now();
    let after_death = backend.clone();
    let result = within(CALL_TIMEOUT, move || {
        let mut bytes = [0u8; 4];
        after_death.region_read(u32::from(REGISTER_BAR), REG_ID, &mut bytes)
    });
    expect_gone(result);
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut bytes = [0u8; 4];
    expect_gone(backend.region_read(CONFIG_REGION, 0, &mut bytes));
    expect_gone(backend.reset());
}

/// A small xorshift generator: reproducible "random" values without a dependency.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Every offset and width of a region, written with all-ones and with a random value.
fn hostile_writes(backend: &VfioUserBackend, region: u32, size: u64, random: &mut Random) {
    for offset in 0..size {
        for width in [1u64, 2, 4, 8] {
            if offset + width > size {
                continue;
            }
            let random_value = random.next().to_le_bytes();
            for value in [[0xffu8; 8], random_value] {
                backend
                    .region_write(region, offset, &value[..width as usize])
                    .unwrap_or_else(|e| panic!("write to region {region} at {offset:#x}: {e}"));
            }
        }
    }
}

#[test]
fn hostile_register_and_config_writes_do_not_stop_the_server() {
    let mut server = DeviceServer::start();
    let backend = connect(&server);
    let vectors = [
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ];
    backend
        .set_irqs(MSIX_IRQ, 0, &[&vectors[0], &vectors[1]])
        .expect("set the MSI-X eventfds");
    let ram = SharedMemory::new(1 << 20);
    backend.dma_map(&ram.dma_region(RAM_IOVA)).expect("DMA map");

    let hostile = backend.clone();
    within(Duration::from_secs(600), move || {
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        hostile_writes(
            &hostile,
            u32::from(REGISTER_BAR),
            REGISTER_BAR_SIZE,
            &mut random,
        );
        hostile_writes(&hostile, CONFIG_REGION, 256, &mut random);
        hostile_writes(&hostile, u32::from(MSIX_BAR), MSIX_BAR_SIZE, &mut random);
        // Random DMAs, some of them inside the mapped RAM.
        for _ in 0..200 {
            let address = RAM_IOVA + random.next() % (2 << 20);
            let len = (random.next() % (2 << 20)) as u32;
            let command = (random.next() % 4) as u32;
            run_dma(&hostile, command, address, len, random.next() as u32);
        }
    });

    // Still serving, with its read-only fields intact.
    assert!(server.child.try_wait().expect("poll the server").is_none());
    assert_eq!(register(&backend, REG_ID), REGISTER_SIGNATURE);
    assert_eq!(
        read32(&backend, CONFIG_REGION, 0),
        u32::from(DEVICE_ID) << 16 | u32::from(VENDOR_ID)
    );
    assert_eq!(read32(&backend, CONFIG_REGION, 0x08) >> 8, CLASS_CODE);

    // When its client goes, the server exits 0.
    drop(backend);
    let deadline = Instant::now() + common::START_TIMEOUT;
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("poll the server") {
            break status;
        }
        assert!(Instant::now() < deadline, "the server outlived its client");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    assert!(!server.socket.exists(), "the server removed its socket");
}

#[test]
fn accesses_outside_the_regions_read_all_ones_and_are_dropped() {
    // VfioUserBackend refuses these itself, so they go straight through vfio_user's client.
    // An error reply would hang that client: the time limit catches it.
    let server = DeviceServer::start();
    let socket = server.socket.clone();
    within(CALL_TIMEOUT, move || {
        let mut client = vfio_user::Client::new(&socket).expect("connect");
        let register_bar = u32::from(REGISTER_BAR);
        for (region, offset) in [
            (register_bar, REGISTER_BAR_SIZE),
            (register_bar, REGISTER_BAR_SIZE - 2),
            (register_bar, u64::MAX - 3),
            (u32::from(MSIX_BAR), MSIX_BAR_SIZE),
            (u32::from(MEMORY_BAR), MEMORY_BAR_SIZE),
            (CONFIG_REGION, 256),
            (CONFIG_REGION, 0x1000),
            (1, 0),
            (6, 0),
            (8, 0),
        ] {
            client
                .region_write(region, offset, &[0; 4])
                .expect("write outside");
            let mut bytes = [0u8; 4];
            client
                .region_read(region, offset, &mut bytes)
                .expect("read outside");
            let inside = if region == register_bar && offset == REGISTER_BAR_SIZE - 2 {
                2
            } else {
                0
            };
            assert!(
                bytes[inside..].iter().all(|&b| b == 0xff),
                "region {region} at {offset:#x} read {bytes:x?}"
            );
        }
        // Still in step, and unchanged.
        let mut bytes = [0u8; 4];
        client
            .region_read(register_bar, REG_ID, &mut bytes)
            .expect("read REG_ID");
        assert_eq!(u32::from_le_bytes(bytes), REGISTER_SIGNATURE);
        client
            .region_read(u32::from(MEMORY_BAR), 0, &mut bytes)
            .expect("read the memory BAR");
        assert_eq!(u32::from_le_bytes(bytes), MEMORY_SIGNATURE);
    });
}
