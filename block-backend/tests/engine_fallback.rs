//! Where io_uring is unavailable, asking for it gives the sync engine, which works.
//! io_uring is taken away from one thread with a seccomp filter that fails
//! `io_uring_setup` with ENOSYS, as a kernel without io_uring (or with it disabled) does.

mod common;

use common::*;
use vmkit_block_backend::{engine::uring, open, EngineKind, OpenOptions};

/// Makes `io_uring_setup` fail with ENOSYS on the calling thread (and threads it starts).
fn forbid_io_uring_on_this_thread() -> bool {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let ret_errno = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let filter = [
        // Load the architecture; anything but x86-64 is allowed untouched.
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 4,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 3,
            k: AUDIT_ARCH_X86_64,
        },
        // Load the system call number.
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: ret_errno,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments; PR_SET_SECCOMP reads a valid
    // sock_fprog that lives across the call. Without TSYNC the filter binds this thread only.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const _,
            ) == 0
    }
}

#[test]
fn io_uring_falls_back_to_the_sync_engine() {
    if let Err(e) = uring::probe() {
        eprintln!("note: io_uring is unavailable on this host already ({e})");
    }
    let dir = scratch_dir();
    let path = patterned_image(&dir, "fallback.img", 1 << 20);
    let outcome = std::thread::spawn(move || {
        assert!(forbid_io_uring_on_this_thread(), "seccomp filter installed");
        let probe = uring::probe().expect_err("io_uring is forbidden on this thread");
        assert!(probe.to_string().contains("io_uring"), "{probe}");
        let mut disk = open(&path, &OpenOptions::new().engine(EngineKind::IoUring)).unwrap();
        assert_eq!(disk.engine(), EngineKind::Sync);
        write(disk.as_mut(), 4096, &pattern(4096, 4096, 8));
        assert_eq!(read(disk.as_mut(), 4096, 4096), pattern(4096, 4096, 8));
    })
    .join();
    assert!(outcome.is_ok(), "the fallback engine works");
}
