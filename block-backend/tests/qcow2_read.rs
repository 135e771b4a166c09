//! qcow2 images made by qemu-img and qemu-io read back byte for byte as
//! `qemu-img convert -O raw` sees them.

mod qemu;
use qemu::{p, qemu_tools, run, serial};

use std::path::{Path, PathBuf};

use vmkit_block_backend::qcow2::Qcow2Error;
use vmkit_block_backend::{
    open, open_sync, Backing, EngineKind, Error, Format, IoBuf, OpenOptions, Qcow2Disk,
    Qcow2Options, RawOptions, Request, SyncDisk,
};
use vmm_sys_util::tempdir::TempDir;

/// Runs qemu-io commands on a qcow2 image.
fn qemu_io(image: &Path, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(p(image));
    run("qemu-io", &args);
}

/// The image's content as QEMU reads it.
fn expected(dir: &Path, image: &Path) -> Vec<u8> {
    let raw = dir.join("expected.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(image), p(&raw)],
    );
    std::fs::read(raw).unwrap()
}

fn read_only(backing: Backing) -> Qcow2Options {
    Qcow2Options {
        raw: RawOptions {
            read_only: true,
            ..RawOptions::default()
        },
        backing,
    }
}

/// Reads the whole disk in requests of uneven sizes, each over two buffers.
fn read_all(disk: &dyn SyncDisk) -> Vec<u8> {
    let size = disk.info().size as usize;
    let mut out = vec![0u8; size];
    let sizes = [1000usize, 7000, 65536 + 13, 512, 300_000, 4096];
    let mut pos = 0;
    let mut i = 0;
    while pos < size {
        let len = sizes[i % sizes.len()].min(size - pos);
        let (a, b) = out[pos..pos + len].split_at_mut(len / 3);
        let bufs = [IoBuf::from_mut_slice(a), IoBuf::from_mut_slice(b)];
        assert_eq!(disk.read_vectored(pos as u64, &bufs).unwrap(), len);
        pos += len;
        i += 1;
    }
    out
}

fn check_image(dir: &Path, image: &Path, backing: Backing) {
    let want = expected(dir, image);
    let disk = Qcow2Disk::open(image, &read_only(backing)).unwrap();
    assert_eq!(disk.info().size as usize, want.len());
    let got = read_all(&disk);
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{}: first difference at byte {at:#x}", image.display());
    }
}

const FILL: &[&str] = &[
    "write -P 0xab 0 64k",
    "write -P 0xcd 100k 3k",
    "write -P 0x5a 1M 1049088",
    "write -z 200k 128k",
    "write -P 0x77 8M 12k",
    "write -z 1536k 4k",
];

fn make(dir: &Path, name: &str, options: &str) -> PathBuf {
    let image = dir.join(name);
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
            "8204k",
        ],
    );
    qemu_io(&image, FILL);
    image
}

#[test]
fn qemu_images_read_back_identically() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2").unwrap();
    let dir = dir.as_path();
    for options in [
        "cluster_size=512,compat=1.1",
        "cluster_size=4096,compat=0.10",
        "cluster_size=65536,compat=1.1",
        "cluster_size=2097152,compat=1.1",
        "cluster_size=65536,compat=1.1,extended_l2=on",
        "cluster_size=16384,compat=1.1,extended_l2=on",
        "cluster_size=4096,compat=1.1,refcount_bits=1",
    ] {
        let image = make(dir, "image.qcow2", options);
        check_image(dir, &image, Backing::None);
        std::fs::remove_file(image).unwrap();
    }
}

#[test]
fn images_with_snapshots_read_their_active_layer() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2").unwrap();
    let dir = dir.as_path();
    let image = make(dir, "snap.qcow2", "cluster_size=4096");
    run("qemu-img", &["snapshot", "-c", "one", p(&image)]);
    // Writes after the snapshot copy shared clusters: entries without the COPIED flag.
    qemu_io(&image, &["write -P 0x66 2k 12k", "write -z 1M 4k"]);
    check_image(dir, &image, Backing::None);
    // Writing images with internal snapshots is refused, clearly.
    let err = Qcow2Disk::open(
        &image,
        &Qcow2Options {
            raw: RawOptions::default(),
            backing: Backing::None,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("snapshots"), "{err}");
}

#[test]
fn compressed_images_read_back_identically() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2").unwrap();
    let dir = dir.as_path();
    let source = make(dir, "source.qcow2", "cluster_size=65536");
    // Some incompressible data too, so that compressed sizes vary.
    let mut noise = Vec::new();
    let mut x = 12345u32;
    for _ in 0..200_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push((x >> 16) as u8);
    }
    qemu_io(&source, &["write -P 0x33 3M 64k", "write -P 0x44 4M 512"]);
    let raw_source = dir.join("source.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            p(&source),
            p(&raw_source),
        ],
    );
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&raw_source)
            .unwrap();
        f.write_all_at(&noise, 5 << 20).unwrap();
    }
    for options in [
        "compression_type=zlib,cluster_size=65536",
        "compression_type=zstd,cluster_size=65536",
        "compression_type=zlib,cluster_size=4096",
        "compression_type=zstd,cluster_size=512",
        "compression_type=zlib,cluster_size=2097152",
        "compression_type=zstd,cluster_size=65536,extended_l2=on",
    ] {
        let image = dir.join("compressed.qcow2");
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                options,
                p(&raw_source),
                p(&image),
            ],
        );
        check_image(dir, &image, Backing::None);
        std::fs::remove_file(image).unwrap();
    }
}

#[test]
fn backing_chains_are_followed_only_when_asked() {
    let _serial = serial();
    if !qemu_tools() {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/vmkit-qcow2").unwrap();
    let dir = dir.as_path();
    let base = make(dir, "base.qcow2", "cluster_size=65536");
    let mid = dir.join("mid.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&mid),
        ],
    );
    qemu_io(&mid, &["write -P 0x99 96k 8k", "write -z 1M 64k"]);
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            p(&mid),
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    qemu_io(&top, &["write -P 0x12 0 512", "write -P 0x13 1056k 8k"]);
    check_image(dir, &top, Backing::FromImage);

    // Without asking, a backed image is refused rather than read without its backing.
    let err = Qcow2Disk::open(&top, &read_only(Backing::None)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Qcow2 {
                source: Qcow2Error::BackingNotRequested { .. },
                ..
            }
        ),
        "{err}"
    );

    // An explicit backing file replaces the image's.
    let disk = Qcow2Disk::open(
        &mid,
        &read_only(Backing::File {
            path: base.clone(),
            format: Format::Qcow2,
        }),
    )
    .unwrap();
    assert_eq!(read_all(&disk), expected(dir, &mid));

    // A raw backing file, its format recorded in the image.
    let raw_base = dir.join("base.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            p(&base),
            p(&raw_base),
        ],
    );
    let over_raw = dir.join("over-raw.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            p(&over_raw),
            "9M",
        ],
    );
    qemu_io(&over_raw, &["write -P 0x21 64k 64k"]);
    check_image(dir, &over_raw, Backing::FromImage);

    // Through the crate's entry points, on io_uring.
    let options = OpenOptions::new()
        .format(Format::Qcow2)
        .read_only(true)
        .backing(Backing::FromImage)
        .engine(EngineKind::IoUring);
    let want = expected(dir, &top);
    assert_eq!(read_all(&*open_sync(&top, &options).unwrap()), want);
    let mut disk = open(&top, &options).unwrap();
    assert_eq!(disk.engine(), EngineKind::IoUring);
    let mut buf = vec![0u8; 128 << 10];
    let bufs = [IoBuf::from_mut_slice(&mut buf)];
    // SAFETY: `buf` outlives the request, reaped below.
    unsafe {
        disk.push(
            7,
            Request::Read {
                offset: 1 << 20,
                bufs: &bufs,
            },
        )
        .unwrap()
    };
    disk.submit().unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        if disk.reap(&mut done) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    assert_eq!(done[0].result.as_ref().unwrap(), &(128 << 10));
    drop(disk);
    assert_eq!(buf, want[1 << 20..(1 << 20) + (128 << 10)]);
}
