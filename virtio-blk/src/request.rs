//! Parsing a descriptor chain into a block request (virtio 1.2, section 5.2.6).
//!
//! A request is a 16-byte device-readable header (`type`, `reserved`, `sector`), data
//! descriptors, and a final device-writable status byte. Everything in a chain is written by
//! the guest, so every field is checked before use and nothing here panics or allocates
//! beyond the slot's reused buffers, whose sizes are bounded by [`SEG_MAX`].

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, Permissions};
use vmkit_block_backend::{IoBuf, SECTOR_SIZE};

use crate::features::{MAX_DISCARD_SECTORS, SEG_MAX, SIZE_MAX};

/// Bytes of the request header.
pub const HEADER_SIZE: u32 = 16;
/// Bytes of one discard / write-zeroes segment.
pub const DISCARD_SEGMENT_SIZE: u32 = 16;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Host buffers one request may map to at most: a guest segment that crosses a memory region
/// boundary becomes two host buffers.
pub const MAX_IO_BUFS: usize = 2 * SEG_MAX as usize;

/// Status values as the byte the device writes.
pub(crate) const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(crate) const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(crate) const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

// Guest memory accesses. Each goes through vm-memory's generic slice iterator unless the
// memory is plain guest RAM (no IOMMU), where one region lookup gives the whole range when it
// lies in one region. The iterator costs 25-30 ns per access, about as much as the rest of a
// request's handling, so the hot path takes the direct way and keeps the generic one for
// ranges that cross regions and for translated memory.

/// Reads a plain-data object from guest memory.
pub(crate) fn read_guest<M: GuestMemory, T: ByteValued>(mem: &M, addr: GuestAddress) -> Option<T> {
    if let Some(slice) = mem
        .physical_memory()
        .and_then(|ram| ram.get_slice(addr, std::mem::size_of::<T>()).ok())
    {
        return slice.read_obj(0).ok();
    }
    mem.read_obj(addr).ok()
}

/// Writes a plain-data object to guest memory, marking the dirty bitmap.
pub(crate) fn write_guest<M: GuestMemory, T: ByteValued>(
    mem: &M,
    value: T,
    addr: GuestAddress,
) -> Result<(), vm_memory::GuestMemoryError> {
    if let Some(slice) = mem
        .physical_memory()
        .and_then(|ram| ram.get_slice(addr, std::mem::size_of::<T>()).ok())
    {
        return slice.write_obj(value, 0).map_err(Into::into);
    }
    mem.write_obj(value, addr)
}

/// Whether `len` bytes at `addr` are guest memory accessible with `access`.
pub(crate) fn guest_range_ok<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    access: Permissions,
) -> bool {
    let in_one_region = mem
        .physical_memory()
        .is_some_and(|ram| ram.get_slice(addr, len).is_ok());
    in_one_region || mem.check_range(addr, len, access)
}

/// Marks `len` bytes at `addr` dirty: a disk wrote them behind the bitmap's back.
pub(crate) fn mark_guest_dirty<M: GuestMemory>(mem: &M, addr: GuestAddress, len: usize) {
    use vm_memory::bitmap::Bitmap;
    if let Some(slice) = mem
        .physical_memory()
        .and_then(|ram| ram.get_slice(addr, len).ok())
    {
        slice.bitmap().mark_dirty(0, len);
        return;
    }
    if let Ok(slices) = mem.get_slices(addr, len, Permissions::Write) {
        for slice in slices.flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

/// What a request asks the disk to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read from the disk into the guest's buffers.
    #[default]
    Read,
    /// `VIRTIO_BLK_T_OUT`: write the guest's buffers to the disk.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Any other type.
    Unsupported,
}

impl RequestKind {
    fn from_type(request_type: u32) -> Self {
        match request_type {
            VIRTIO_BLK_T_IN => RequestKind::Read,
            VIRTIO_BLK_T_OUT => RequestKind::Write,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            _ => RequestKind::Unsupported,
        }
    }

    /// Whether the data descriptors must be device-writable (else device-readable).
    fn data_is_writable(self) -> bool {
        matches!(self, RequestKind::Read | RequestKind::GetId)
    }
}

/// What the parser needs to know about the disk and the device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Bytes requests may address.
    pub(crate) capacity_bytes: u64,
    /// Writes, discards and write-zeroes fail.
    pub(crate) read_only: bool,
    /// Discard is offered.
    pub(crate) discard: bool,
    /// The GET_ID answer, zero padded.
    pub(crate) serial: [u8; ID_BYTES],
}

/// One request's state, kept per descriptor head and reused from request to request so
/// that the hot path does not allocate once the buffers have grown to the largest request.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// The disk holds this request.
    pub(crate) in_flight: bool,
    pub(crate) kind: RequestKind,
    /// Where the status byte goes.
    pub(crate) status_addr: GuestAddress,
    /// Byte offset on the disk.
    pub(crate) offset: u64,
    /// Data bytes (reads and writes) or range bytes (discard, write-zeroes).
    pub(crate) len: u64,
    /// Host buffers of the data, in guest memory that outlives the request (see `BlockQueue`).
    pub(crate) bufs: Vec<IoBuf<'static>>,
    /// The guest address of each buffer, to mark the dirty bitmap when a read completes.
    pub(crate) guest_addrs: Vec<GuestAddress>,
}

/// The result of parsing a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// The slot holds a request for the disk.
    Submit,
    /// The request is finished: write `status` and report `written` data bytes.
    Complete {
        /// The status byte.
        status: u8,
        /// Data bytes written into the guest's buffers (the status byte excluded).
        written: u32,
    },
    /// There is no usable status byte: the request can be neither answered nor failed (the
    /// queue then needs a reset, see `Error::NoStatusByte`).
    Unanswerable,
}

/// An error that decides the status before the chain is fully walked; the walk goes on to
/// find the status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Failure(u8);

/// Walks `chain` and fills `slot`. Data descriptors are handled one step behind the walk,
/// because only the last descriptor (the status) is not data and a chain has no length.
pub(crate) fn parse<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    limits: &Limits,
    slot: &mut Slot,
) -> Parsed {
    slot.bufs.clear();
    slot.guest_addrs.clear();
    slot.len = 0;
    slot.offset = 0;

    let mut descriptors = chain;
    let Some(header) = descriptors.next() else {
        return Parsed::Unanswerable;
    };
    let (kind, sector, mut failure) = match read_header(mem, &header) {
        Ok((kind, sector)) => (kind, sector, None),
        Err(failure) => (RequestKind::Unsupported, 0, Some(failure)),
    };
    slot.kind = kind;

    let mut data = DataState::default();
    let mut last = header;
    let mut count = 1usize;
    for descriptor in descriptors.by_ref() {
        count += 1;
        // `last` is not the final descriptor: it is data.
        if count > 2 && failure.is_none() {
            if let Err(f) = data.add(mem, limits, slot, kind, &last) {
                failure = Some(f);
            }
        }
        last = descriptor;
    }
    if count < 2 {
        // Only a header: there is no status byte to write.
        return Parsed::Unanswerable;
    }

    // The walk stops early at loops, over-long chains, unreadable descriptors and nested
    // indirect tables; the last descriptor then still says there was a next one.
    if last.has_next() {
        failure = Some(Failure(STATUS_IOERR));
    }
    let status = last;
    if !status.is_write_only() || status.len() == 0 {
        return Parsed::Unanswerable;
    }
    // The status is the final byte of the chain.
    let Some(status_addr) = status.addr().0.checked_add(u64::from(status.len()) - 1) else {
        return Parsed::Unanswerable;
    };
    let status_addr = GuestAddress(status_addr);
    if !guest_range_ok(mem, status_addr, 1, Permissions::Write) {
        return Parsed::Unanswerable;
    }
    slot.status_addr = status_addr;

    if let Some(Failure(status)) = failure {
        return Parsed::Complete { status, written: 0 };
    }
    match finish(limits, slot, kind, sector, &data) {
        Ok(parsed) => parsed,
        Err(Failure(status)) => Parsed::Complete { status, written: 0 },
    }
}

fn read_header<M: GuestMemory>(
    mem: &M,
    header: &Descriptor,
) -> Result<(RequestKind, u64), Failure> {
    // The header must be a descriptor of its own: data sharing it is not supported.
    if header.is_write_only() || header.len() != HEADER_SIZE {
        return Err(Failure(STATUS_IOERR));
    }
    let bytes: [u8; HEADER_SIZE as usize] =
        read_guest(mem, header.addr()).ok_or(Failure(STATUS_IOERR))?;
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = bytes;
    let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    Ok((RequestKind::from_type(request_type), sector))
}

/// What the data descriptors added up to.
#[derive(Debug, Default)]
struct DataState {
    segments: u32,
    total: u64,
    /// GET_ID bytes written so far.
    id_written: usize,
    /// The discard / write-zeroes segment, once read.
    range: Option<[u8; DISCARD_SEGMENT_SIZE as usize]>,
}

impl DataState {
    fn add<M: GuestMemory>(
        &mut self,
        mem: &M,
        limits: &Limits,
        slot: &mut Slot,
        kind: RequestKind,
        descriptor: &Descriptor,
    ) -> Result<(), Failure> {
        // Flushes carry no data and unknown types are answered UNSUPP whatever they carry.
        if matches!(kind, RequestKind::Flush | RequestKind::Unsupported) {
            return Ok(());
        }
        if descriptor.is_write_only() != kind.data_is_writable() {
            return Err(Failure(STATUS_IOERR));
        }
        self.segments += 1;
        let len = descriptor.len();
        match kind {
            RequestKind::Read | RequestKind::Write => {
                if self.segments > SEG_MAX || len > SIZE_MAX {
                    return Err(Failure(STATUS_IOERR));
                }
                self.total += u64::from(len);
                map_buffers(mem, slot, kind, descriptor.addr(), len as usize)
            }
            RequestKind::GetId => {
                let Some(bytes) = limits.serial.get(self.id_written..) else {
                    return Ok(());
                };
                let bytes = bytes.get(..len as usize).unwrap_or(bytes);
                mem.write_slice(bytes, descriptor.addr())
                    .map_err(|_| Failure(STATUS_IOERR))?;
                self.id_written += bytes.len();
                Ok(())
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                // One segment at most (max_discard_seg = 1), in a descriptor of its own.
                if self.segments > 1 || len > DISCARD_SEGMENT_SIZE {
                    return Err(Failure(STATUS_UNSUPP));
                }
                if len < DISCARD_SEGMENT_SIZE {
                    return Err(Failure(STATUS_IOERR));
                }
                let segment = read_guest(mem, descriptor.addr()).ok_or(Failure(STATUS_IOERR))?;
                self.range = Some(segment);
                Ok(())
            }
            RequestKind::Flush | RequestKind::Unsupported => Ok(()),
        }
    }
}

/// Turns one guest data segment into host buffers, checking it lies in guest RAM.
fn map_buffers<M: GuestMemory>(
    mem: &M,
    slot: &mut Slot,
    kind: RequestKind,
    addr: GuestAddress,
    len: usize,
) -> Result<(), Failure> {
    if slot.bufs.len() >= MAX_IO_BUFS {
        return Err(Failure(STATUS_IOERR));
    }
    // Plain guest RAM, the range in one region: one lookup (see `read_guest`).
    if let Some(slice) = mem
        .physical_memory()
        .and_then(|ram| ram.get_slice(addr, len).ok())
    {
        // SAFETY: as for the general case below.
        let buf = unsafe { IoBuf::from_raw_parts(slice.ptr_guard_mut().as_ptr(), slice.len()) };
        slot.bufs.push(buf);
        slot.guest_addrs.push(addr);
        return Ok(());
    }
    let access = if kind == RequestKind::Read {
        Permissions::Write
    } else {
        Permissions::Read
    };
    // `check_range` also rejects ranges that wrap around the address space.
    if !mem.check_range(addr, len, access) {
        return Err(Failure(STATUS_IOERR));
    }
    let slices = mem
        .get_slices(addr, len, access)
        .map_err(|_| Failure(STATUS_IOERR))?;
    let mut guest_addr = addr;
    for slice in slices {
        let slice = slice.map_err(|_| Failure(STATUS_IOERR))?;
        if slot.bufs.len() >= MAX_IO_BUFS {
            return Err(Failure(STATUS_IOERR));
        }
        let ptr = slice.ptr_guard_mut().as_ptr();
        // SAFETY: the slice is guest RAM, mapped for as long as the guest memory object
        // lives. `BlockQueue` keeps that object alive and waits for every request it pushed
        // before it drops it, so the buffer stays valid for the request's whole life. Guest
        // memory is shared with the guest anyway and is only accessed through volatile
        // operations, never through Rust references.
        let buf = unsafe { IoBuf::from_raw_parts(ptr, slice.len()) };
        slot.bufs.push(buf);
        slot.guest_addrs.push(guest_addr);
        guest_addr = GuestAddress(guest_addr.0.wrapping_add(slice.len() as u64));
    }
    Ok(())
}

/// Checks the request as a whole once every descriptor has been seen.
fn finish(
    limits: &Limits,
    slot: &mut Slot,
    kind: RequestKind,
    sector: u64,
    data: &DataState,
) -> Result<Parsed, Failure> {
    let ioerr = Failure(STATUS_IOERR);
    let in_range = |sector: u64, bytes: u64| -> Result<u64, Failure> {
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(ioerr)?;
        let end = offset.checked_add(bytes).ok_or(ioerr)?;
        if end > limits.capacity_bytes {
            return Err(ioerr);
        }
        Ok(offset)
    };
    match kind {
        RequestKind::Read | RequestKind::Write => {
            if kind == RequestKind::Write && limits.read_only {
                return Err(ioerr);
            }
            if data.total % SECTOR_SIZE != 0
                || data.total > u64::from(SIZE_MAX) * u64::from(SEG_MAX)
            {
                return Err(ioerr);
            }
            slot.offset = in_range(sector, data.total)?;
            slot.len = data.total;
            if data.total == 0 {
                return Ok(Parsed::Complete {
                    status: STATUS_OK,
                    written: 0,
                });
            }
            Ok(Parsed::Submit)
        }
        RequestKind::Flush => Ok(Parsed::Submit),
        RequestKind::GetId => Ok(Parsed::Complete {
            status: STATUS_OK,
            // At most 20.
            written: data.id_written as u32,
        }),
        RequestKind::Discard | RequestKind::WriteZeroes => {
            if kind == RequestKind::Discard && !limits.discard {
                return Err(Failure(STATUS_UNSUPP));
            }
            let segment = data.range.ok_or(ioerr)?;
            let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = segment;
            let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
            let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            // Unknown flags, and unmap on a discard, are refused as the spec requires.
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                || (kind == RequestKind::Discard && unmap)
            {
                return Err(Failure(STATUS_UNSUPP));
            }
            if limits.read_only || num_sectors > MAX_DISCARD_SECTORS {
                return Err(ioerr);
            }
            let bytes = u64::from(num_sectors) * SECTOR_SIZE;
            slot.offset = in_range(sector, bytes)?;
            slot.len = bytes;
            if bytes == 0 {
                return Ok(Parsed::Complete {
                    status: STATUS_OK,
                    written: 0,
                });
            }
            Ok(Parsed::Submit)
        }
        RequestKind::Unsupported => Err(Failure(STATUS_UNSUPP)),
    }
}
