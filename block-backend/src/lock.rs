//! Image locking with QEMU's protocol, so vmkit and QEMU processes see each other's locks.
//!
//! QEMU takes open-file-description (OFD) read locks on single bytes of the image: byte
//! `100 + p` while it holds permission `p`, and byte `200 + p` while it refuses to share
//! permission `p` with others. Before using a permission it checks that nobody locks
//! `200 + p`; before refusing to share one it checks that nobody locks `100 + p`. Read locks
//! never conflict with each other, so the checks use `F_OFD_GETLK` with a write lock, which
//! reports any other holder. The locks belong to the open file and go away with it.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Where QEMU's "holds permission" bytes start.
const PERMISSION_BASE: i64 = 100;
/// Where QEMU's "does not share permission" bytes start.
const UNSHARED_BASE: i64 = 200;

/// QEMU's block permissions, by bit number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permission {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

impl Permission {
    const ALL: [Permission; 4] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
    ];

    /// QEMU's name, as its error messages use it.
    fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The permissions a disk holds and those it lets others hold, as QEMU's virtio-blk sets
/// them: a writer does not share writing or resizing; a reader does not share writing, so
/// readers coexist but not with a writer.
fn permissions(read_only: bool) -> (u8, u8) {
    use Permission::*;
    if read_only {
        (
            ConsistentRead.bit(),
            ConsistentRead.bit() | WriteUnchanged.bit() | Resize.bit(),
        )
    } else {
        (
            ConsistentRead.bit() | Write.bit() | WriteUnchanged.bit(),
            ConsistentRead.bit() | WriteUnchanged.bit(),
        )
    }
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Another open of the image holds, or refuses to share, this permission.
    Conflict(&'static str),
    /// The host refused the lock calls.
    Io(io::Error),
}

fn ofd_lock(
    file: &File,
    command: libc::c_int,
    lock_type: libc::c_int,
    byte: i64,
) -> io::Result<libc::flock> {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = lock_type as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte;
    lock.l_len = 1;
    // SAFETY: the fd is open for the call's duration and `lock` is a valid flock that the
    // kernel may write (F_OFD_GETLK); OFD commands require l_pid = 0, which zeroed gives.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), command, &mut lock) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock)
}

/// Whether another open file description holds a lock on `byte`.
fn locked_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let lock = ofd_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte)?;
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU's locks for a writer or a reader of the image open as `file`, then checks
/// for conflicts (taking first, as QEMU does, narrows the window in which two processes
/// could both miss each other).
pub(crate) fn lock_image(file: &File, read_only: bool) -> Result<(), LockError> {
    let (held, shared) = permissions(read_only);
    for permission in Permission::ALL {
        if held & permission.bit() != 0 {
            ofd_lock(
                file,
                libc::F_OFD_SETLK,
                libc::F_RDLCK,
                PERMISSION_BASE + permission as i64,
            )
            .map_err(|e| conflict_or_io(e, permission))?;
        }
        if shared & permission.bit() == 0 {
            ofd_lock(
                file,
                libc::F_OFD_SETLK,
                libc::F_RDLCK,
                UNSHARED_BASE + permission as i64,
            )
            .map_err(|e| conflict_or_io(e, permission))?;
        }
    }
    for permission in Permission::ALL {
        if held & permission.bit() != 0
            && locked_by_others(file, UNSHARED_BASE + permission as i64).map_err(LockError::Io)?
        {
            return Err(LockError::Conflict(permission.name()));
        }
        if shared & permission.bit() == 0
            && locked_by_others(file, PERMISSION_BASE + permission as i64).map_err(LockError::Io)?
        {
            return Err(LockError::Conflict(permission.name()));
        }
    }
    Ok(())
}

fn conflict_or_io(error: io::Error, permission: Permission) -> LockError {
    match error.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => LockError::Conflict(permission.name()),
        _ => LockError::Io(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmkit-lock").unwrap();
        let path = dir.as_path().join("image");
        std::fs::write(&path, [0u8; 4096]).unwrap();

        let writer = open(&path);
        lock_image(&writer, false).unwrap();
        assert!(matches!(
            lock_image(&open(&path), false),
            Err(LockError::Conflict("write"))
        ));
        assert!(matches!(
            lock_image(&open(&path), true),
            Err(LockError::Conflict("write"))
        ));
        drop(writer);

        let reader_a = open(&path);
        let reader_b = open(&path);
        lock_image(&reader_a, true).unwrap();
        lock_image(&reader_b, true).unwrap();
        assert!(lock_image(&open(&path), false).is_err());
        drop((reader_a, reader_b));
        lock_image(&open(&path), false).unwrap();
    }
}
