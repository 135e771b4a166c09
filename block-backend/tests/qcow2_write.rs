//! Writes to qcow2 images, ours and QEMU's: `qemu-img check` finds no errors or leaks, and
//! `qemu-img compare` finds the content we wrote.

mod qemu;
use qemu::{p, qemu_tools, run, serial};

use std::path::Path;

use vmkit_block_backend::qcow2::{create, Qcow2Error};
use vmkit_block_backend::{
    open_queues, AsyncDisk, Backing, CacheMode, EngineKind, Error, Format, IoBuf, OpenOptions,
    Qcow2Disk, Qcow2Options, RawOptions, Request, SyncDisk,
};
use vmm_sys_util::tempdir::TempDir;

fn rw(cache: CacheMode, backing: Backing) -> Qcow2Options {
    Qcow2Options {
        raw: RawOptions {
            cache,
            ..RawOptions::default()
        },
        backing,
    }
}

/// Writes, write-zeroes and discards at pseudo-random unaligned places, on the disk and
/// on a mirror of its content.
fn scramble(disk: &dyn SyncDisk, mirror: &mut [u8], seed: u64, ops: usize) {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let size = mirror.len() as u64;
    for i in 0..ops {
        let len = match next() % 4 {
            0 => next() % 600,
            1 => next() % 5000,
            2 => next() % 150_000,
            _ => 65536,
        }
        .min(size);
        let offset = next() % (size - len + 1);
        let range = offset as usize..(offset + len) as usize;
        match next() % 6 {
            0 => {
                disk.write_zeroes(offset, len).unwrap();
                mirror[range].fill(0);
            }
            1 => {
                disk.discard(offset, len).unwrap();
                mirror[range].fill(0);
            }
            _ => {
                let byte = (i as u8).wrapping_mul(37).wrapping_add(1);
                let mut data: Vec<u8> = (0..len).map(|j| byte ^ (j as u8)).collect();
                mirror[range].copy_from_slice(&data);
                let (a, b) = data.split_at_mut(len as usize / 2);
                let bufs = [IoBuf::from_mut_slice(a), IoBuf::from_mut_slice(b)];
                assert_eq!(disk.write_vectored(offset, &bufs).unwrap(), len as usize);
            }
        }
        if i % 16 == 0 {
            // Reads see the writes at once.
            let mut back = vec![0u8; len as usize];
            disk.read_vectored(offset, &[IoBuf::from_mut_slice(&mut back)])
                .unwrap();
            assert_eq!(back, mirror[offset as usize..(offset + len) as usize]);
        }
    }
    disk.flush().unwrap();
}

/// `qemu-img check` finds nothing wrong (no errors, no leaks) and the image holds `mirror`.
fn verify(dir: &Path, image: &Path, mirror: &[u8]) {
    let out = run("qemu-img", &["check", "-f", "qcow2", p(image)]);
    assert!(out.contains("No errors were found"), "{out}");
    let raw = dir.join("mirror.raw");
    std::fs::write(&raw, mirror).unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", p(image), p(&raw)],
    );
}

fn content(dir: &Path, image: &Path) -> Vec<u8> {
    let raw = dir.join("content.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(image), p(&raw)],
    );
    std::fs::read(raw).unwrap()
}

#[test]
fn created_images_take_writes_that_qemu_reads() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-w").unwrap();
    let dir = dir.as_path();
    for (cs, cache) in [
        (65536u64, CacheMode::Writeback),
        (512, CacheMode::Unsafe),
        (4096, CacheMode::Writethrough),
        (2 << 20, CacheMode::Writeback),
    ] {
        let image = dir.join("new.qcow2");
        let size = (8 << 20) + 12 * 1024;
        create(&image, size, cs).unwrap();
        // An empty image we made is clean to QEMU.
        verify(dir, &image, &vec![0u8; size as usize]);
        let mut mirror = vec![0u8; size as usize];
        {
            let disk = Qcow2Disk::open(&image, &rw(cache, Backing::None)).unwrap();
            scramble(&disk, &mut mirror, cs, 120);
        }
        verify(dir, &image, &mirror);
        // And reopened, it reads back what was written.
        let disk = Qcow2Disk::open(&image, &rw(cache, Backing::None)).unwrap();
        let mut back = vec![0u8; size as usize];
        disk.read_vectored(0, &[IoBuf::from_mut_slice(&mut back)])
            .unwrap();
        assert!(back == mirror);
        drop(disk);
        std::fs::remove_file(image).unwrap();
    }
}

#[test]
fn qemu_images_take_writes() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-w").unwrap();
    let dir = dir.as_path();
    let fill = [
        "-c",
        "write -P 0xab 0 256k",
        "-c",
        "write -z 1M 256k",
        "-c",
        "write -P 0x5a 3M 1M",
    ];
    for (i, options) in [
        "cluster_size=65536,compat=1.1",
        "cluster_size=4096,compat=0.10",
        "cluster_size=65536,extended_l2=on",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=4096,refcount_bits=64",
        "compressed",
    ]
    .iter()
    .enumerate()
    {
        let image = dir.join(format!("q{i}.qcow2"));
        if *options == "compressed" {
            let plain = dir.join("plain.qcow2");
            run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", p(&plain), "6M"],
            );
            let mut args = vec!["-f", "qcow2"];
            args.extend_from_slice(&fill);
            args.push(p(&plain));
            run("qemu-io", &args);
            run(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    "compression_type=zstd",
                    p(&plain),
                    p(&image),
                ],
            );
        } else {
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    options,
                    p(&image),
                    "6M",
                ],
            );
            let mut args = vec!["-f", "qcow2"];
            args.extend_from_slice(&fill);
            args.push(p(&image));
            run("qemu-io", &args);
        }
        let mut mirror = content(dir, &image);
        {
            let disk = Qcow2Disk::open(&image, &rw(CacheMode::Writeback, Backing::None)).unwrap();
            scramble(&disk, &mut mirror, i as u64 + 99, 80);
        }
        verify(dir, &image, &mirror);
    }
}

#[test]
fn overlays_copy_on_write_from_their_backing_file() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-w").unwrap();
    let dir = dir.as_path();
    let base = dir.join("base.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "4M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 4M", p(&base)],
    );
    for options in ["compat=1.1", "compat=0.10", "extended_l2=on"] {
        let top = dir.join("top.qcow2");
        let _ = std::fs::remove_file(&top);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                options,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                p(&top),
            ],
        );
        let mut mirror = content(dir, &top);
        {
            let disk =
                Qcow2Disk::open(&top, &rw(CacheMode::Writeback, Backing::FromImage)).unwrap();
            scramble(&disk, &mut mirror, 7, 60);
        }
        verify(dir, &top, &mirror);
        // The base is untouched.
        assert!(content(dir, &base).iter().all(|&b| b == 0x11));
    }
}

#[test]
fn read_only_and_corrupt_images_refuse_writes() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-w").unwrap();
    let image = dir.as_path().join("a.qcow2");
    create(&image, 1 << 20, 65536).unwrap();
    let disk = Qcow2Disk::open(
        &image,
        &Qcow2Options {
            raw: RawOptions {
                read_only: true,
                ..RawOptions::default()
            },
            backing: Backing::None,
        },
    )
    .unwrap();
    let mut buf = [0u8; 512];
    assert!(matches!(
        disk.write_vectored(0, &[IoBuf::from_mut_slice(&mut buf)]),
        Err(Error::ReadOnly)
    ));
    assert!(matches!(disk.discard(0, 512), Err(Error::ReadOnly)));
    drop(disk);
    // Refused to overwrite.
    assert!(create(&image, 1 << 20, 65536).is_err());
    // Marked corrupt: read-only only.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&2u64.to_be_bytes(), 72).unwrap();
    }
    let err = Qcow2Disk::open(&image, &rw(CacheMode::Writeback, Backing::None)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Qcow2 {
                source: Qcow2Error::NotWritable(_),
                ..
            }
        ),
        "{err}"
    );
}

fn run_one(disk: &mut dyn AsyncDisk, request: Request<'_>) -> usize {
    // SAFETY: the request's buffers outlive it: it is reaped before returning.
    unsafe { disk.push(1, request).unwrap() };
    disk.submit().unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        if disk.reap(&mut done) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    done.pop().unwrap().result.unwrap()
}

#[test]
fn queues_share_one_image() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-w").unwrap();
    let image = dir.as_path().join("q.qcow2");
    create(&image, 4 << 20, 65536).unwrap();
    let options = OpenOptions::new()
        .format(Format::Qcow2)
        .engine(EngineKind::IoUring);
    let mut queues = open_queues(&image, &options, 2).unwrap();
    assert!(queues.iter().all(|q| q.engine() == EngineKind::IoUring));
    let mut data = vec![0x5au8; 100_000];
    let bufs = [IoBuf::from_mut_slice(&mut data)];
    let written = run_one(
        &mut *queues[0],
        Request::Write {
            offset: 12345,
            bufs: &bufs,
        },
    );
    assert_eq!(written, 100_000);
    assert_eq!(run_one(&mut *queues[0], Request::Flush), 0);
    let mut back = vec![0u8; 100_000];
    let bufs = [IoBuf::from_mut_slice(&mut back)];
    run_one(
        &mut *queues[1],
        Request::Read {
            offset: 12345,
            bufs: &bufs,
        },
    );
    assert!(back.iter().all(|&b| b == 0x5a));
    // Another writer is refused while the queues hold the image.
    assert!(matches!(
        Qcow2Disk::open(&image, &rw(CacheMode::Writeback, Backing::None)),
        Err(Error::Locked { .. })
    ));
    drop(queues);
    let mut mirror = vec![0u8; 4 << 20];
    mirror[12345..112_345].fill(0x5a);
    verify(dir.as_path(), &image, &mirror);
}

#[test]
fn the_refcount_table_grows() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-w").unwrap();
    let dir = dir.as_path();
    // 512-byte clusters: QEMU's one-cluster refcount table covers 8 MiB of file with
    // 16-bit refcounts, 2 MiB with 64-bit ones; filling the disk outgrows it, repeatedly.
    for options in [
        "cluster_size=512,refcount_bits=16",
        "cluster_size=512,refcount_bits=64",
    ] {
        let image = dir.join("grow.qcow2");
        let _ = std::fs::remove_file(&image);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                options,
                p(&image),
                "12M",
            ],
        );
        let reftable_offset = |image: &Path| {
            let header = std::fs::read(image).unwrap();
            u64::from_be_bytes(header[48..56].try_into().unwrap())
        };
        let before = reftable_offset(&image);
        let mut mirror = vec![0u8; 12 << 20];
        {
            let disk = Qcow2Disk::open(&image, &rw(CacheMode::Unsafe, Backing::None)).unwrap();
            let mut chunk = vec![0u8; 256 << 10];
            for (i, piece) in mirror.chunks_mut(256 << 10).enumerate() {
                chunk.fill(i as u8 + 1);
                piece.copy_from_slice(&chunk);
                let offset = (i * (256 << 10)) as u64;
                disk.write_vectored(offset, &[IoBuf::from_mut_slice(&mut chunk)])
                    .unwrap();
            }
            scramble(&disk, &mut mirror, 3, 40);
        }
        verify(dir, &image, &mirror);
        // The table moved to a larger one.
        assert_ne!(before, reftable_offset(&image));
    }
}

#[test]
fn threads_write_and_read_at_once() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2-w").unwrap();
    let image = dir.as_path().join("mt.qcow2");
    let size = 8u64 << 20;
    create(&image, size, 4096).unwrap();
    let disk = std::sync::Arc::new(
        Qcow2Disk::open(&image, &rw(CacheMode::Unsafe, Backing::None)).unwrap(),
    );
    // Each thread owns interleaved 3000-byte pieces, so neighbours share clusters.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                for round in 0..3u8 {
                    for k in 0..200u64 {
                        let offset = (k * 4 + t) * 3000;
                        let mut data = vec![(t as u8 + 1) * 16 + round; 3000];
                        disk.write_vectored(offset, &[IoBuf::from_mut_slice(&mut data)])
                            .unwrap();
                        let mut back = vec![0u8; 3000];
                        disk.read_vectored(offset, &[IoBuf::from_mut_slice(&mut back)])
                            .unwrap();
                        assert_eq!(back, data);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(disk);
    let mut mirror = vec![0u8; size as usize];
    for t in 0..4u64 {
        for k in 0..200u64 {
            let offset = ((k * 4 + t) * 3000) as usize;
            mirror[offset..offset + 3000].fill((t as u8 + 1) * 16 + 2);
        }
    }
    verify(dir.as_path(), &image, &mirror);
}
