//! The vfio-user backend: a device emulated by another process that serves the vfio-user
//! protocol on a UNIX socket, reached through the `vfio_user` crate's [`Client`].
//!
//! The server sees guest RAM only through file descriptors: [`VfioBackend::dma_map`] needs
//! a [`DmaRegion`] with an fd (guest RAM in a memfd), and the server raises interrupts by
//! writing the eventfds [`VfioBackend::set_irqs`] sends it. Regions the server offers for
//! mmap come with their own fd, which [`VfioBackend::map_region`] maps.
//!
//! # Working around vfio_user 0.1.7
//! - `Client::resettable()` is inverted (it reports `false` for a server that can reset):
//!   [`DeviceInfo::reset`] is its negation.
//! - The client has no device-info call (its interrupt count is private), and asking for an
//!   interrupt index the server does not have makes it wait forever (see below), so the
//!   backend assumes the PCI set of VFIO_PCI_NUM_IRQS (5) indexes, as kernel VFIO and
//!   libvfio-user report, and never asks past it.
//! - A region's mmap fd only reaches the client when the server declares sparse mmap areas;
//!   a region flagged mmap-able without an fd is reported as not mmap-able.
//! - The client never looks at the error flag of a reply. An error reply is shorter than a
//!   successful one for region reads and writes, irq info and DMA unmap, so the client waits
//!   for bytes that never come; other calls (DMA map, set_irqs, reset) return `Ok` even when
//!   the server failed. The backend checks what it can before sending (region bounds, irq
//!   indexes) and bounds every wait: it finds the client's socket among the process's file
//!   descriptors right after connecting and sets `SO_RCVTIMEO`/`SO_SNDTIMEO` on it, and a
//!   watchdog shuts the socket down if the connect itself (version negotiation and region
//!   queries) does not end within the timeout, as when the server is busy with another
//!   client. A timed-out or failed exchange leaves the stream out of step, so the
//!   connection is shut down and every later call returns [`BackendError::Gone`]. If the
//!   socket cannot be identified (it always could in tests), a warning is logged and calls
//!   are not bounded in time.
//! - A hostile server can make the client panic while connecting (a malformed version or
//!   region-info reply): [`VfioUserBackend::connect`] turns that into an error.
//!
//! Writing to a socket whose server has gone raises `SIGPIPE` in the client's plain writes;
//! Rust programs ignore it by default, so the write fails with `EPIPE` and the call returns
//! [`BackendError::Gone`]. A C host embedding this crate must ignore `SIGPIPE` too.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_NUM_IRQS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::Client;
use vm_memory::FileOffset;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{
    BackendError, BackendResult, DeviceInfo, DmaRegion, IrqInfo, MappedArea, RegionInfo,
    VfioBackend, INTX_IRQ,
};

/// How long [`VfioUserBackend::connect`] lets the server take to answer any message.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The most file descriptors sent in one message: vfio_user's server receives at most 16
/// (more are dropped by the kernel), so longer eventfd lists go in several messages.
const MAX_FDS_PER_MESSAGE: usize = 16;

/// The largest region access sent in one message (the protocol's default
/// `max_data_xfer_size`, which the client does not let us read).
const MAX_TRANSFER: usize = 1 << 20;

/// A device served by a vfio-user server.
pub struct VfioUserBackend {
    connection: Mutex<Connection>,
    info: DeviceInfo,
    /// Region `i` is at index `i`; the client fetched them all when it connected.
    regions: Vec<CachedRegion>,
    /// The socket's reply timeout, if the socket could be found to set it.
    reply_timeout: Option<Duration>,
}

/// The client and whether its stream is still usable.
struct Connection {
    client: Client,
    /// Why the connection was given up, once it was.
    gone: Option<String>,
}

/// What the client learnt about a region when it connected.
struct CachedRegion {
    info: RegionInfo,
    /// The fd to mmap, and the offset of the region in it.
    file: Option<FileOffset>,
}

impl std::fmt::Debug for VfioUserBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserBackend")
            .field("info", &self.info)
            .field("reply_timeout", &self.reply_timeout)
            .finish_non_exhaustive()
    }
}

impl VfioUserBackend {
    /// Connects to the vfio-user server listening on `path`, negotiates the protocol and
    /// fetches the device's regions; every reply must come within [`DEFAULT_REPLY_TIMEOUT`].
    pub fn connect(path: impl AsRef<Path>) -> BackendResult<Self> {
        Self::connect_with_timeout(path, DEFAULT_REPLY_TIMEOUT)
    }

    /// [`connect`](Self::connect), waiting at most `reply_timeout` for each reply.
    pub fn connect_with_timeout(
        path: impl AsRef<Path>,
        reply_timeout: Duration,
    ) -> BackendResult<Self> {
        let path = path.as_ref();
        let (client, socket) = connect_client(path, reply_timeout)?;
        let reply_timeout = match socket {
            Some(fd) => match set_socket_timeouts(fd, reply_timeout) {
                Ok(()) => Some(reply_timeout),
                Err(error) => {
                    log::warn!(
                        "vfio-user {}: cannot set reply timeouts ({error}); calls are not bounded in time",
                        path.display()
                    );
                    None
                }
            },
            None => {
                log::warn!(
                    "vfio-user {}: cannot find the client's socket; calls are not bounded in time",
                    path.display()
                );
                None
            }
        };

        // The client numbers regions as the server does; keep the contiguous run from 0.
        let regions: Vec<CachedRegion> = (0u32..)
            .map_while(|index| {
                client
                    .region(index)
                    .map(|region| cache_region(index, region))
            })
            .collect();
        let info = DeviceInfo {
            num_regions: u32::try_from(regions.len()).unwrap_or(u32::MAX),
            num_irqs: VFIO_PCI_NUM_IRQS,
            // vfio_user 0.1.7 stores the negation of the server's reset flag.
            reset: !client.resettable(),
        };
        Ok(VfioUserBackend {
            connection: Mutex::new(Connection { client, gone: None }),
            info,
            regions,
            reply_timeout,
        })
    }

    /// The timeout set on the socket, `None` if calls are not bounded in time.
    pub fn reply_timeout(&self) -> Option<Duration> {
        self.reply_timeout
    }

    fn region(&self, index: u32) -> BackendResult<&CachedRegion> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.regions.get(i))
            .ok_or_else(|| BackendError::OutOfRange(format!("the device has no region {index}")))
    }

    /// Checks that `len` bytes at `offset` lie in region `index`, before the server sees
    /// the access: it would answer an error the client cannot read.
    fn check_access(&self, index: u32, offset: u64, len: usize, write: bool) -> BackendResult<()> {
        let region = &self.region(index)?.info;
        let allowed = if write { region.write } else { region.read };
        if !allowed {
            return Err(BackendError::OutOfRange(format!(
                "region {index} is not {}",
                if write { "writable" } else { "readable" }
            )));
        }
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len));
        match end {
            Some(end) if end <= region.size => Ok(()),
            _ => Err(BackendError::OutOfRange(format!(
                "{len} bytes at {offset:#x} leave region {index} ({:#x} bytes)",
                region.size
            ))),
        }
    }

    fn check_irq_index(&self, index: u32) -> BackendResult<()> {
        if index < self.info.num_irqs {
            Ok(())
        } else {
            Err(BackendError::OutOfRange(format!(
                "the device has no interrupt index {index}"
            )))
        }
    }

    /// Runs `exchange` on the client. A socket error or timeout leaves the stream out of
    /// step with the server, so the connection is shut down and marked gone.
    fn call<T>(
        &self,
        operation: &'static str,
        exchange: impl FnOnce(&mut Client) -> Result<T, vfio_user::Error>,
    ) -> BackendResult<T> {
        let mut connection = self.lock()?;
        if let Some(reason) = &connection.gone {
            return Err(BackendError::Gone(reason.clone()));
        }
        exchange(&mut connection.client).map_err(|error| {
            let error = self.classify(operation, error);
            if let BackendError::Gone(reason) = &error {
                connection.gone = Some(reason.clone());
                // Wakes nothing (calls are serialised) but tells the server we are done.
                let _ = connection.client.shutdown();
            }
            error
        })
    }

    fn lock(&self) -> BackendResult<MutexGuard<'_, Connection>> {
        // A panic while holding the lock leaves the stream in an unknown state.
        self.connection
            .lock()
            .map_err(|_| BackendError::Gone("a call to the server panicked".to_string()))
    }

    fn classify(&self, operation: &'static str, error: vfio_user::Error) -> BackendError {
        let timed_out = match &error {
            vfio_user::Error::StreamRead(e) | vfio_user::Error::StreamWrite(e) => {
                matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
            }
            vfio_user::Error::SendWithFd(e) | vfio_user::Error::ReceiveWithFd(e) => {
                e.errno() == libc::EAGAIN
            }
            _ => false,
        };
        match error {
            _ if timed_out => BackendError::Gone(format!(
                "no answer to {operation} within {:?}",
                self.reply_timeout.unwrap_or_default()
            )),
            vfio_user::Error::StreamRead(e) | vfio_user::Error::StreamWrite(e) => {
                BackendError::Gone(format!("{operation}: {e}"))
            }
            vfio_user::Error::SendWithFd(e) | vfio_user::Error::ReceiveWithFd(e) => {
                BackendError::Gone(format!("{operation}: {e}"))
            }
            other => BackendError::Protocol(format!("{operation}: {other}")),
        }
    }
}

fn cache_region(index: u32, region: &vfio_user::Region) -> CachedRegion {
    // Without an fd (vfio_user drops it when the server declares no sparse areas) the
    // region cannot be mapped, whatever its flags say.
    let mmap = region.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && region.file_offset.is_some();
    let sparse_mmap = if mmap {
        region
            .sparse_areas
            .iter()
            .map(|area| (area.offset, area.size))
            .collect()
    } else {
        Vec::new()
    };
    CachedRegion {
        info: RegionInfo {
            index,
            size: region.size,
            read: region.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            write: region.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap,
            sparse_mmap,
            // The client parses only the sparse-mmap capability.
            msix_mappable: false,
        },
        file: if mmap {
            region.file_offset.clone()
        } else {
            None
        },
    }
}

impl VfioBackend for VfioUserBackend {
    fn device_info(&self) -> DeviceInfo {
        self.info
    }

    fn region_info(&self, index: u32) -> BackendResult<RegionInfo> {
        Ok(self.region(index)?.info.clone())
    }

    fn irq_info(&self, index: u32) -> BackendResult<IrqInfo> {
        self.check_irq_index(index)?;
        let info = self.call("get irq info", |client| client.get_irq_info(index))?;
        if info.index != index {
            return Err(BackendError::Protocol(format!(
                "asked for interrupt index {index}, got {}",
                info.index
            )));
        }
        Ok(IrqInfo {
            index,
            count: info.count,
            eventfd: info.flags & VFIO_IRQ_INFO_EVENTFD != 0,
            automasked: info.flags & VFIO_IRQ_INFO_AUTOMASKED != 0,
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> BackendResult<()> {
        self.check_access(index, offset, data.len(), false)?;
        let mut at = offset;
        for chunk in data.chunks_mut(MAX_TRANSFER) {
            self.call("region read", |client| client.region_read(index, at, chunk))?;
            // check_access showed offset + len does not overflow.
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> BackendResult<()> {
        self.check_access(index, offset, data.len(), true)?;
        let mut at = offset;
        for chunk in data.chunks(MAX_TRANSFER) {
            self.call("region write", |client| {
                client.region_write(index, at, chunk)
            })?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn map_region(&self, index: u32, offset: u64, size: u64) -> BackendResult<MappedArea> {
        let region = self.region(index)?;
        let file = region.file.as_ref().ok_or(BackendError::Unsupported(
            "the vfio-user server offers no mmap for this region",
        ))?;
        let end = offset.checked_add(size);
        let inside = region
            .info
            .mappable_areas()
            .into_iter()
            .any(|(start, len)| match (end, start.checked_add(len)) {
                (Some(end), Some(area_end)) => start <= offset && end <= area_end,
                _ => false,
            });
        if size == 0 || !inside {
            return Err(BackendError::OutOfRange(format!(
                "{size:#x} bytes at {offset:#x} are not a mappable part of region {index}"
            )));
        }
        let file_offset = file.start().checked_add(offset).ok_or_else(|| {
            BackendError::Protocol(format!("region {index}'s file offset overflows"))
        })?;
        // Pages of a mapping past the end of a file raise SIGBUS when touched: refuse a
        // regular file (memfd) too short for the region. (A server that shrinks the file
        // later can still cause that; memfd seals would be needed to rule it out.)
        let metadata = file
            .file()
            .metadata()
            .map_err(|source| BackendError::Host {
                operation: "fstat of a vfio-user region's fd",
                source,
            })?;
        let file_end = file_offset.checked_add(size);
        if metadata.is_file() && file_end.is_none_or(|end| end > metadata.len()) {
            return Err(BackendError::Protocol(format!(
                "region {index}'s file has {:#x} bytes, too few to map {size:#x} at {file_offset:#x}",
                metadata.len()
            )));
        }
        let size = usize::try_from(size)
            .map_err(|_| BackendError::OutOfRange(format!("{size:#x} bytes do not fit")))?;
        MappedArea::mmap_fd(file.file().as_raw_fd(), file_offset, size).map_err(|source| {
            BackendError::Host {
                operation: "mmap of a vfio-user region",
                source,
            }
        })
    }

    fn set_irqs(&self, index: u32, start: u32, eventfds: &[&EventFd]) -> BackendResult<()> {
        self.check_irq_index(index)?;
        if eventfds.is_empty() {
            return self.call("set irqs", |client| {
                client.set_irqs(
                    index,
                    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                    0,
                    0,
                    &[],
                )
            });
        }
        for (n, chunk) in eventfds.chunks(MAX_FDS_PER_MESSAGE).enumerate() {
            let fds: Vec<RawFd> = chunk.iter().map(|eventfd| eventfd.as_raw_fd()).collect();
            let first = u32::try_from(n * MAX_FDS_PER_MESSAGE)
                .ok()
                .and_then(|skip| start.checked_add(skip))
                .ok_or_else(|| BackendError::OutOfRange("interrupt vector overflow".into()))?;
            // A chunk holds at most MAX_FDS_PER_MESSAGE fds.
            let count = fds.len() as u32;
            self.call("set irqs", |client| {
                client.set_irqs(
                    index,
                    VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                    first,
                    count,
                    &fds,
                )
            })?;
        }
        Ok(())
    }

    fn set_intx_unmask(&self, resample: &EventFd) -> BackendResult<()> {
        self.call("set intx unmask", |client| {
            client.set_irqs(
                INTX_IRQ,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
                0,
                1,
                &[resample.as_raw_fd()],
            )
        })
    }

    fn reset(&self) -> BackendResult<()> {
        if !self.info.reset {
            return Err(BackendError::Unsupported(
                "the vfio-user server cannot reset the device",
            ));
        }
        self.call("reset", |client| client.reset())
    }

    fn dma_map(&self, region: &DmaRegion) -> BackendResult<()> {
        let (fd, offset) = region.fd.ok_or(BackendError::Unsupported(
            "vfio-user DMA needs guest RAM in a shareable file (memfd)",
        ))?;
        if region.size == 0 || region.iova.checked_add(region.size).is_none() {
            return Err(BackendError::OutOfRange(format!(
                "invalid DMA range {:#x}+{:#x}",
                region.iova, region.size
            )));
        }
        self.call("dma map", |client| {
            client.dma_map(offset, region.iova, region.size, fd)
        })
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> BackendResult<()> {
        self.call("dma unmap", |client| client.dma_unmap(iova, size))
    }
}

/// Serialises connects, so that the socket a connect created is the only new one that
/// this module looks for.
static CONNECT_LOCK: Mutex<()> = Mutex::new(());

/// `Client::new` with a bounded wait, also returning the client's socket if it is found.
fn connect_client(path: &Path, timeout: Duration) -> BackendResult<(Client, Option<RawFd>)> {
    let _serialised = CONNECT_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let before = socket_fds();

    // The watchdog shuts the new socket down if the connect does not end in time: the
    // client's blocked read then fails, and Client::new returns.
    let (finished, wait_for_finish) = mpsc::channel::<()>();
    let watchdog = {
        let before = before.clone();
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("vfio-user-connect".into())
            .spawn(move || match wait_for_finish.recv_timeout(timeout) {
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(fd) = find_client_socket(&before, &path) {
                        // SAFETY: shutdown does not close the fd; at worst it ends the
                        // connection of the socket we identified.
                        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    }
                    true
                }
                _ => false,
            })
            .map_err(|source| BackendError::Host {
                operation: "spawn the vfio-user connect watchdog",
                source,
            })?
    };
    // A malformed reply can make vfio_user panic (an assert, an underflowing length).
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Client::new(path)));
    drop(finished);
    let timed_out = watchdog.join().unwrap_or(false);

    let client = match result {
        Err(_) => {
            return Err(BackendError::Protocol(
                "the vfio-user client panicked on the server's replies".into(),
            ))
        }
        Ok(_) if timed_out => {
            return Err(BackendError::Gone(format!(
                "the vfio-user server on {} did not answer within {timeout:?}",
                path.display()
            )))
        }
        Ok(Err(vfio_user::Error::Connect(source))) => {
            return Err(BackendError::Host {
                operation: "connect to the vfio-user server",
                source,
            })
        }
        Ok(Err(
            error @ (vfio_user::Error::StreamRead(_)
            | vfio_user::Error::StreamWrite(_)
            | vfio_user::Error::SendWithFd(_)
            | vfio_user::Error::ReceiveWithFd(_)),
        )) => {
            return Err(BackendError::Gone(format!(
                "the vfio-user server on {} closed the connection: {error}",
                path.display()
            )))
        }
        Ok(Err(error)) => {
            return Err(BackendError::Protocol(format!(
                "vfio-user connect to {}: {error}",
                path.display()
            )))
        }
        Ok(Ok(client)) => client,
    };
    let socket = find_client_socket(&before, path);
    Ok((client, socket))
}

/// The sockets open in this process, as (fd, inode) so that a number reused for another
/// socket counts as new.
fn socket_fds() -> HashSet<(RawFd, u64)> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter_map(|fd| {
            // SAFETY: libc::stat is plain data; all zeroes is a valid value.
            let mut stat: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `stat` is a valid buffer for fstat.
            let ok = unsafe { libc::fstat(fd, &mut stat) } == 0;
            (ok && stat.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some((fd, stat.st_ino))
        })
        .collect()
}

/// The socket `Client::new` created: a new UNIX stream socket connected to `path`, or the
/// only new UNIX stream socket connected to any path (the server may have bound another
/// spelling of it).
fn find_client_socket(before: &HashSet<(RawFd, u64)>, path: &Path) -> Option<RawFd> {
    let candidates: Vec<(RawFd, Vec<u8>)> = socket_fds()
        .difference(before)
        .filter(|(fd, _)| is_unix_stream(*fd))
        .filter_map(|&(fd, _)| Some((fd, unix_peer_path(fd)?)))
        .collect();
    let wanted = path.as_os_str().as_bytes();
    if let Some((fd, _)) = candidates.iter().find(|(_, peer)| peer == wanted) {
        return Some(*fd);
    }
    match candidates.as_slice() {
        [(fd, _)] => Some(*fd),
        _ => None,
    }
}

fn socket_option(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `length` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut length,
        )
    };
    (rc == 0).then_some(value)
}

fn is_unix_stream(fd: RawFd) -> bool {
    socket_option(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && socket_option(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// The filesystem path of the peer of UNIX socket `fd` (`None`: not connected, unnamed or
/// abstract).
fn unix_peer_path(fd: RawFd) -> Option<Vec<u8>> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `length` bytes into `address`.
    let rc = unsafe {
        libc::getpeername(
            fd,
            (&mut address as *mut libc::sockaddr_un).cast(),
            &mut length,
        )
    };
    if rc != 0 || address.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    let path_length =
        (length as usize).checked_sub(std::mem::offset_of!(libc::sockaddr_un, sun_path))?;
    let path: Vec<u8> = address
        .sun_path
        .iter()
        .take(path_length)
        .map(|&c| c as u8)
        .take_while(|&byte| byte != 0)
        .collect();
    (!path.is_empty()).then_some(path)
}

fn set_socket_timeouts(fd: RawFd, timeout: Duration) -> std::io::Result<()> {
    let time = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below a million: fits any suseconds_t.
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // A zero timeval means "no timeout": wait at least a microsecond.
    let time = if time.tv_sec == 0 && time.tv_usec == 0 {
        libc::timeval {
            tv_sec: 0,
            tv_usec: 1,
        }
    } else {
        time
    };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt reads a timeval from `time`.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&time as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::FromRawFd;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use vfio_bindings::bindings::vfio::{
        vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_NORESIZE,
    };
    use vfio_user::{DmaMapFlags, DmaUnmapFlags, Server, ServerBackend, ServerRegion, SparseArea};

    use super::*;
    use crate::vfio::backend::MSIX_IRQ;

    /// Region 0's offset whose read makes the test server stall (a hung server).
    const STALL_OFFSET: u64 = 0xf0;
    /// Region 0's offset whose read makes the test server's thread die (a crashed server).
    const DIE_OFFSET: u64 = 0xf8;
    const MSIX_VECTORS: u32 = 40;

    /// What the test server was asked.
    #[derive(Default)]
    struct Log {
        set_irqs: Vec<(u32, u32, u32, u32, Vec<File>)>,
        dma_maps: Vec<(u64, u64, u64, bool)>,
        dma_unmaps: Vec<(u64, u64)>,
        resets: u32,
    }

    struct TestDevice {
        registers: [u8; 0x100],
        log: Arc<Mutex<Log>>,
    }

    fn io_error() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EINVAL)
    }

    impl ServerBackend for TestDevice {
        fn region_read(
            &mut self,
            region: u32,
            offset: u64,
            data: &mut [u8],
        ) -> std::io::Result<()> {
            if region == 0 && offset == STALL_OFFSET {
                std::thread::sleep(Duration::from_secs(2));
            }
            if region == 0 && offset == DIE_OFFSET {
                // Unwinds the server's thread without the panic hook: its socket closes.
                std::panic::resume_unwind(Box::new("the test server dies"));
            }
            let start = usize::try_from(offset).map_err(|_| io_error())?;
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = match region {
                    0 => self.registers.get(start + i).copied().unwrap_or(0xff),
                    _ => 0,
                };
            }
            Ok(())
        }

        fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let start = usize::try_from(offset).map_err(|_| io_error())?;
            if region == 0 {
                for (i, &byte) in data.iter().enumerate() {
                    if let Some(register) = self.registers.get_mut(start + i) {
                        *register = byte;
                    }
                }
            }
            Ok(())
        }

        fn dma_map(
            &mut self,
            _flags: DmaMapFlags,
            offset: u64,
            address: u64,
            size: u64,
            fd: Option<File>,
        ) -> std::io::Result<()> {
            let mut log = self.log.lock().map_err(|_| io_error())?;
            log.dma_maps.push((offset, address, size, fd.is_some()));
            Ok(())
        }

        fn dma_unmap(
            &mut self,
            _flags: DmaUnmapFlags,
            address: u64,
            size: u64,
        ) -> std::io::Result<()> {
            let mut log = self.log.lock().map_err(|_| io_error())?;
            log.dma_unmaps.push((address, size));
            Ok(())
        }

        fn reset(&mut self) -> std::io::Result<()> {
            self.log.lock().map_err(|_| io_error())?.resets += 1;
            Ok(())
        }

        fn set_irqs(
            &mut self,
            index: u32,
            flags: u32,
            start: u32,
            count: u32,
            fds: Vec<File>,
        ) -> std::io::Result<()> {
            let mut log = self.log.lock().map_err(|_| io_error())?;
            log.set_irqs.push((index, flags, start, count, fds));
            Ok(())
        }
    }

    /// A vfio_user server on its own thread, in its own directory.
    struct TestServer {
        dir: PathBuf,
        path: PathBuf,
        log: Arc<Mutex<Log>>,
        /// The mmap-able region 1's memory, as the server shares it.
        memory: File,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn test_dir() -> PathBuf {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmkit-vfio-user-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        dir
    }

    fn memfd(size: u64) -> File {
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"vfio-user-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).expect("size the memfd");
        file
    }

    fn region(index: u32, size: u64, flags: u32) -> ServerRegion {
        ServerRegion {
            region_info: vfio_region_info {
                argsz: std::mem::size_of::<vfio_region_info>() as u32,
                flags,
                index,
                cap_offset: 0,
                size,
                offset: 0,
            },
            sparse_areas: Vec::new(),
            mmap_fd: None,
        }
    }

    fn start_server(resettable: bool) -> TestServer {
        let dir = test_dir();
        let path = dir.join("device.sock");
        let memory = memfd(0x2000);
        let server_memory = memory.try_clone().expect("dup the memfd");
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let mut regions: Vec<ServerRegion> = (0..9).map(|i| region(i, 0, 0)).collect();
        regions[0] = region(0, 0x100, rw);
        regions[1] = ServerRegion {
            sparse_areas: vec![SparseArea {
                area: vfio_region_sparse_mmap_area {
                    offset: 0,
                    size: 0x2000,
                },
            }],
            mmap_fd: Some(server_memory.as_raw_fd()),
            ..region(1, 0x2000, rw | VFIO_REGION_INFO_FLAG_MMAP)
        };
        // Claims more than its file holds: mapping past the end would raise SIGBUS.
        regions[3] = ServerRegion {
            sparse_areas: vec![SparseArea {
                area: vfio_region_sparse_mmap_area {
                    offset: 0,
                    size: 0x4000,
                },
            }],
            mmap_fd: Some(server_memory.as_raw_fd()),
            ..region(3, 0x4000, rw | VFIO_REGION_INFO_FLAG_MMAP)
        };
        // Mappable by its flags, but without sparse areas its fd never reaches the client.
        regions[2] = ServerRegion {
            mmap_fd: Some(server_memory.as_raw_fd()),
            ..region(2, 0x1000, rw | VFIO_REGION_INFO_FLAG_MMAP)
        };
        regions[7] = region(7, 0x100, rw);
        let irq = |index, count, flags| vfio_user::IrqInfo {
            index,
            count,
            flags,
        };
        let irqs = vec![
            irq(0, 1, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_AUTOMASKED),
            irq(1, 0, 0),
            irq(
                2,
                MSIX_VECTORS,
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            ),
            irq(3, 0, 0),
            irq(4, 0, 0),
        ];
        let server = Server::new(&path, resettable, irqs, regions).expect("start the server");
        let log = Arc::new(Mutex::new(Log::default()));
        let mut device = TestDevice {
            registers: [0; 0x100],
            log: log.clone(),
        };
        std::thread::spawn(move || {
            // Keeps the fd the server hands out open while it serves.
            let _memory = server_memory;
            let _ = server.run(&mut device);
        });
        TestServer {
            dir,
            path,
            log,
            memory,
        }
    }

    /// Runs `f` on its own thread and fails the test if it takes longer than `limit`,
    /// so that a hang fails rather than blocks the test run.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(f());
        });
        receiver
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("no result within {limit:?}: a hang"))
    }

    #[test]
    fn connect_reports_the_device_and_its_regions() {
        let server = start_server(true);
        let backend = VfioUserBackend::connect(&server.path).expect("connect");
        assert_eq!(
            backend.device_info(),
            DeviceInfo {
                num_regions: 9,
                num_irqs: 5,
                reset: true,
            }
        );
        assert_eq!(backend.reply_timeout(), Some(DEFAULT_REPLY_TIMEOUT));
        let registers = backend.region_info(0).expect("region 0");
        assert_eq!(
            (
                registers.size,
                registers.read,
                registers.write,
                registers.mmap
            ),
            (0x100, true, true, false)
        );
        let memory = backend.region_info(1).expect("region 1");
        assert!(memory.mmap);
        assert_eq!(memory.sparse_mmap, vec![(0, 0x2000)]);
        assert_eq!(memory.mappable_areas(), vec![(0, 0x2000)]);
        // Flagged mmap-able, but the client got no fd for it.
        let fdless = backend.region_info(2).expect("region 2");
        assert!(!fdless.mmap);
        assert!(fdless.mappable_areas().is_empty());
        assert_eq!(backend.region_info(4).expect("region 4").size, 0);
        assert!(matches!(
            backend.region_info(9),
            Err(BackendError::OutOfRange(_))
        ));

        backend.reset().expect("reset");
        assert_eq!(server.log.lock().expect("log").resets, 1);
    }

    #[test]
    fn reset_follows_the_servers_flag_not_the_inverted_client() {
        let server = start_server(false);
        let backend = VfioUserBackend::connect(&server.path).expect("connect");
        assert!(!backend.device_info().reset);
        assert!(matches!(backend.reset(), Err(BackendError::Unsupported(_))));
        assert_eq!(server.log.lock().expect("log").resets, 0);
    }

    #[test]
    fn region_accesses_reach_the_server_and_stay_inside_regions() {
        let server = start_server(true);
        let backend = VfioUserBackend::connect(&server.path).expect("connect");
        backend
            .region_write(0, 0x10, &0x1234_5678u32.to_le_bytes())
            .expect("write");
        let mut value = [0u8; 4];
        backend.region_read(0, 0x10, &mut value).expect("read");
        assert_eq!(u32::from_le_bytes(value), 0x1234_5678);
        let mut all = [0u8; 0x100];
        backend.region_read(0, 0, &mut all).expect("read all");
        assert_eq!(all[0x10..0x14], 0x1234_5678u32.to_le_bytes());

        // Refused before the server sees them (it would answer an error the client
        // cannot read).
        for (index, offset, len) in [(0, 0xfe, 4), (0, u64::MAX, 2), (4, 0, 4), (9, 0, 4)] {
            let mut data = vec![0; len];
            assert!(
                matches!(
                    backend.region_read(index, offset, &mut data),
                    Err(BackendError::OutOfRange(_))
                ),
                "read of region {index} at {offset:#x}"
            );
            assert!(matches!(
                backend.region_write(index, offset, &data),
                Err(BackendError::OutOfRange(_))
            ));
        }
        // The connection is still in step.
        backend.region_read(0, 0x10, &mut value).expect("read");
        assert_eq!(u32::from_le_bytes(value), 0x1234_5678);
    }

    #[test]
    fn map_region_maps_the_servers_memory() {
        let server = start_server(true);
        let backend = VfioUserBackend::connect(&server.path).expect("connect");
        let area = backend.map_region(1, 0x1000, 0x1000).expect("map");
        assert_eq!(area.size(), 0x1000);
        // SAFETY: the mapping is 0x1000 bytes and lives as long as `area`.
        unsafe { area.host_address().add(8).write_volatile(0xa5) };
        let mut byte = [0u8];
        server
            .memory
            .read_exact_at(&mut byte, 0x1008)
            .expect("read the memfd");
        assert_eq!(byte[0], 0xa5);

        assert!(matches!(
            backend.map_region(1, 0x1000, 0x2000),
            Err(BackendError::OutOfRange(_))
        ));
        assert!(matches!(
            backend.map_region(1, 0, 0),
            Err(BackendError::OutOfRange(_))
        ));
        assert!(matches!(
            backend.map_region(2, 0, 0x1000),
            Err(BackendError::Unsupported(_))
        ));
        assert!(backend.region_info(3).expect("region 3").mmap);
        assert!(backend.map_region(3, 0, 0x2000).is_ok());
        assert!(matches!(
            backend.map_region(3, 0x1000, 0x2000),
            Err(BackendError::Protocol(_))
        ));
        assert!(matches!(
            backend.map_region(0, 0, 0x100),
            Err(BackendError::Unsupported(_))
        ));
    }

    #[test]
    fn set_irqs_sends_the_eventfds_in_chunks_the_server_can_take() {
        let server = start_server(true);
        let backend = VfioUserBackend::connect(&server.path).expect("connect");
        let info = backend.irq_info(MSIX_IRQ).expect("irq info");
        assert_eq!(info.count, MSIX_VECTORS);
        assert!(info.eventfd);
        assert!(!info.automasked);
        assert!(backend.irq_info(INTX_IRQ).expect("intx").automasked);
        assert!(matches!(
            backend.irq_info(5),
            Err(BackendError::OutOfRange(_))
        ));

        let eventfds: Vec<EventFd> = (0..20)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let refs: Vec<&EventFd> = eventfds.iter().collect();
        backend.set_irqs(MSIX_IRQ, 3, &refs).expect("set irqs");
        backend.set_irqs(MSIX_IRQ, 0, &[]).expect("disable");
        backend.set_intx_unmask(&eventfds[0]).expect("unmask");
        assert!(matches!(
            backend.set_irqs(5, 0, &refs),
            Err(BackendError::OutOfRange(_))
        ));

        let log = server.log.lock().expect("log");
        let calls: Vec<(u32, u32, u32, u32, usize)> = log
            .set_irqs
            .iter()
            .map(|(index, flags, start, count, fds)| (*index, *flags, *start, *count, fds.len()))
            .collect();
        let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        assert_eq!(
            calls,
            vec![
                (2, trigger, 3, 16, 16),
                (2, trigger, 19, 4, 4),
                (
                    2,
                    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                    0,
                    0,
                    0
                ),
                (
                    0,
                    VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
                    0,
                    1,
                    1
                ),
            ]
        );
        // The server got our eventfds, in order: vector 3 + 17 is eventfds[17].
        let (_, _, _, _, second_chunk) = &log.set_irqs[1];
        (&second_chunk[1])
            .write_all(&1u64.to_ne_bytes())
            .expect("signal");
        assert_eq!(eventfds[17].read().expect("eventfd 17"), 1);
        assert!(eventfds[16].read().is_err(), "eventfd 16 was not signalled");
    }

    #[test]
    fn dma_map_needs_an_fd() {
        let server = start_server(true);
        let backend = VfioUserBackend::connect(&server.path).expect("connect");
        let ram = memfd(0x10000);
        let mut region = DmaRegion {
            iova: 0x1000_0000,
            size: 0x10000,
            host_address: 0,
            fd: None,
        };
        assert!(matches!(
            backend.dma_map(&region),
            Err(BackendError::Unsupported(_))
        ));
        region.fd = Some((ram.as_raw_fd(), 0x2000));
        backend.dma_map(&region).expect("dma map");
        backend.dma_unmap(0x1000_0000, 0x10000).expect("dma unmap");
        region.size = 0;
        assert!(matches!(
            backend.dma_map(&region),
            Err(BackendError::OutOfRange(_))
        ));
        let log = server.log.lock().expect("log");
        assert_eq!(log.dma_maps, vec![(0x2000, 0x1000_0000, 0x10000, true)]);
        assert_eq!(log.dma_unmaps, vec![(0x1000_0000, 0x10000)]);
    }

    #[test]
    fn a_server_that_dies_makes_calls_fail_with_gone() {
        let server = start_server(true);
        let backend = Arc::new(VfioUserBackend::connect(&server.path).expect("connect"));
        let dying = backend.clone();
        let result = within(Duration::from_secs(20), move || {
            let mut data = [0u8; 4];
            dying.region_read(0, DIE_OFFSET, &mut data)
        });
        assert!(matches!(result, Err(BackendError::Gone(_))), "{result:?}");
        let mut data = [0u8; 4];
        assert!(matches!(
            backend.region_read(0, 0, &mut data),
            Err(BackendError::Gone(_))
        ));
        assert!(matches!(backend.reset(), Err(BackendError::Gone(_))));
    }

    #[test]
    fn a_server_that_stops_answering_times_out() {
        let server = start_server(true);
        let timeout = Duration::from_millis(300);
        let backend = Arc::new(
            VfioUserBackend::connect_with_timeout(&server.path, timeout).expect("connect"),
        );
        assert_eq!(backend.reply_timeout(), Some(timeout));
        let stalled = backend.clone();
        let started = Instant::now();
        let result = within(Duration::from_secs(20), move || {
            let mut data = [0u8; 4];
            stalled.region_read(0, STALL_OFFSET, &mut data)
        });
        assert!(matches!(result, Err(BackendError::Gone(_))), "{result:?}");
        // The server stalls for 2 s; the timeout ends the wait well before.
        assert!(started.elapsed() < Duration::from_millis(1500));
        let mut data = [0u8; 4];
        assert!(matches!(
            backend.region_read(0, 0, &mut data),
            Err(BackendError::Gone(_))
        ));
    }

    #[test]
    fn connecting_to_a_silent_server_times_out() {
        let dir = test_dir();
        let path = dir.join("silent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        // Accepts and never answers.
        std::thread::spawn(move || {
            let held = listener.accept();
            std::thread::sleep(Duration::from_secs(30));
            drop(held);
        });
        let started = Instant::now();
        let connect_path = path.clone();
        let result = within(Duration::from_secs(20), move || {
            VfioUserBackend::connect_with_timeout(&connect_path, Duration::from_millis(300))
                .map(|_| ())
        });
        assert!(matches!(result, Err(BackendError::Gone(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connecting_to_no_server_is_a_host_error() {
        let dir = test_dir();
        let result = VfioUserBackend::connect(dir.join("nothing.sock"));
        assert!(
            matches!(result, Err(BackendError::Host { .. })),
            "{result:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
