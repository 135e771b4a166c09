//! The `disk` example (a small qemu-img) run as a process, checked against qemu-img where it
//! is installed (tests that need it print SKIPPED and pass when it is not).

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmkit_block_backend::{open_sync, Format, IoBuf, OpenOptions};
use vmm_sys_util::tempdir::TempDir;

/// `cargo test` builds the examples next to the test binaries' `deps` directory.
fn disk_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    profile_dir.join("examples").join("disk")
}

fn disk(args: &[&str]) -> Output {
    let binary = disk_binary();
    assert!(binary.exists(), "{} not built", binary.display());
    Command::new(binary).args(args).output().expect("disk runs")
}

/// Runs the tool and expects exit code `code`; returns stdout.
fn disk_ok(args: &[&str], code: i32) -> String {
    let output = disk(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{args:?}: {output:?}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn qemu_img_available() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-img is not installed");
    }
    ok
}

fn qemu(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}

fn qemu_ok(program: &str, args: &[&str]) -> String {
    let output = qemu(program, args);
    assert!(output.status.success(), "{program} {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn tempdir() -> TempDir {
    TempDir::new_with_prefix("/tmp/vmkit-disk-tool").expect("temp dir")
}

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A raw image of `size` bytes with patterned data at a few places and holes between.
fn patterned_raw(path: &Path, size: u64) -> Vec<u8> {
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut expected = vec![0u8; size as usize];
    for (offset, len, seed) in [
        (0u64, 4096usize, 1u8),
        (70_000, 3000, 2),
        (1 << 20, 200_000, 3),
        (size - 512, 512, 4),
    ] {
        let data: Vec<u8> = (0..len)
            .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1)
            .collect();
        file.write_at(&data, offset).unwrap();
        expected[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    expected
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn create_and_info_for_both_formats() {
    let dir = tempdir();
    let raw = dir.as_path().join("a.raw");
    let qcow2 = dir.as_path().join("a.qcow2");

    disk_ok(&["create", s(&raw), "10M"], 0);
    assert_eq!(fs::metadata(&raw).unwrap().len(), 10 << 20);
    assert!(
        fs::metadata(&raw).unwrap().blocks() * 512 < 1 << 20,
        "sparse"
    );
    let info = disk_ok(&["info", s(&raw)], 0);
    assert!(info.contains("file format: raw"), "{info}");
    assert!(
        info.contains("virtual size: 10 MiB (10485760 bytes)"),
        "{info}"
    );

    disk_ok(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            s(&qcow2),
            "1G",
        ],
        0,
    );
    let info = disk_ok(&["info", "-f", "qcow2", s(&qcow2)], 0);
    assert!(
        info.contains("virtual size: 1 GiB (1073741824 bytes)"),
        "{info}"
    );
    assert!(info.contains("cluster_size: 4096"), "{info}");
    let ours = json(&disk_ok(
        &["info", "-f", "qcow2", "--output=json", s(&qcow2)],
        0,
    ));
    assert_eq!(ours["virtual-size"], 1u64 << 30);
    assert_eq!(ours["cluster-size"], 4096);
    assert_eq!(ours["format"], "qcow2");

    if qemu_img_available() {
        let theirs = json(&qemu_ok(
            "qemu-img",
            &["info", "-f", "qcow2", "--output=json", s(&qcow2)],
        ));
        assert_eq!(theirs["virtual-size"], ours["virtual-size"]);
        assert_eq!(theirs["cluster-size"], ours["cluster-size"]);
        qemu_ok("qemu-img", &["check", "-f", "qcow2", s(&qcow2)]);
    }

    // Existing files are never overwritten.
    let output = disk(&["create", "-f", "qcow2", s(&raw), "1M"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
    assert_eq!(fs::metadata(&raw).unwrap().len(), 10 << 20);
}

#[test]
fn convert_round_trips_byte_identical_and_sparse() {
    let dir = tempdir();
    let src = dir.as_path().join("src.raw");
    let qcow2 = dir.as_path().join("mid.qcow2");
    let qcow2_b = dir.as_path().join("mid2.qcow2");
    let back = dir.as_path().join("back.raw");
    let raw_copy = dir.as_path().join("copy.raw");
    let size = 8 << 20;
    let expected = patterned_raw(&src, size);

    disk_ok(&["convert", "-O", "qcow2", s(&src), s(&qcow2)], 0);
    disk_ok(
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&qcow2),
            s(&qcow2_b),
        ],
        0,
    );
    disk_ok(
        &["convert", "-f", "qcow2", "-O", "raw", s(&qcow2_b), s(&back)],
        0,
    );
    disk_ok(&["convert", s(&back), s(&raw_copy)], 0);
    for out in [&back, &raw_copy] {
        assert_eq!(fs::read(out).unwrap(), expected, "{}", out.display());
        let allocated = fs::metadata(out).unwrap().blocks() * 512;
        assert!(allocated < 1 << 20, "{}: {allocated} bytes", out.display());
    }
    // Zero blocks were skipped: the qcow2 image maps only the written ranges.
    let map = json(&disk_ok(
        &["map", "-f", "qcow2", "--output=json", s(&qcow2)],
        0,
    ));
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(data < 1 << 20, "{map}");
    for image in [&qcow2, &qcow2_b] {
        disk_ok(&["check", "-f", "qcow2", s(image)], 0);
    }

    if qemu_img_available() {
        for image in [&qcow2, &qcow2_b] {
            qemu_ok("qemu-img", &["check", "-f", "qcow2", s(image)]);
            qemu_ok(
                "qemu-img",
                &["compare", "-f", "raw", "-F", "qcow2", s(&src), s(image)],
            );
            qemu_ok(
                "qemu-img",
                &["compare", "-f", "qcow2", "-F", "raw", s(image), s(&src)],
            );
        }
        qemu_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", s(&back), s(&src)],
        );
        // Our map of the qcow2 image is qemu-img's.
        let theirs = json(&qemu_ok(
            "qemu-img",
            &["map", "-f", "qcow2", "--output=json", s(&qcow2)],
        ));
        assert_eq!(map, theirs);
    }
}

#[test]
fn raw_map_lists_data_and_holes() {
    let dir = tempdir();
    let raw = dir.as_path().join("a.raw");
    patterned_raw(&raw, 4 << 20);
    let map = json(&disk_ok(&["map", "--output=json", s(&raw)], 0));
    let extents = map.as_array().unwrap();
    let total: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 4 << 20);
    assert_eq!(extents[0]["start"], 0);
    assert_eq!(extents[0]["data"], true);
    assert!(extents.iter().any(|e| e["data"] == false), "{map}");
    let human = disk_ok(&["map", s(&raw)], 0);
    assert!(human.starts_with("Offset"), "{human}");
}

#[test]
fn an_image_written_through_open_sync_passes_both_checks() {
    let dir = tempdir();
    let path = dir.as_path().join("w.qcow2");
    disk_ok(&["create", "-f", "qcow2", s(&path), "16M"], 0);
    {
        let disk = open_sync(&path, &OpenOptions::new().format(Format::Qcow2)).unwrap();
        let mut data = vec![0x5au8; 200_000];
        disk.write_vectored(12_345 * 512, &[IoBuf::from_mut_slice(&mut data)])
            .unwrap();
        let mut data = vec![0xc3u8; 65536];
        disk.write_vectored(8 << 20, &[IoBuf::from_mut_slice(&mut data)])
            .unwrap();
        disk.write_zeroes(8 << 20, 65536).unwrap();
        disk.flush().unwrap();
    }
    let out = disk_ok(&["check", "-f", "qcow2", s(&path)], 0);
    assert!(out.contains("No errors were found"), "{out}");
    if qemu_img_available() {
        qemu_ok("qemu-img", &["check", "-f", "qcow2", s(&path)]);
    }
}

#[test]
fn qemu_compressed_and_zero_clusters_convert_like_qemu_img() {
    if !qemu_img_available() {
        return;
    }
    let dir = tempdir();
    let src = dir.as_path().join("src.raw");
    let compressed = dir.as_path().join("c.qcow2");
    let ours = dir.as_path().join("ours.raw");
    let theirs = dir.as_path().join("theirs.raw");
    patterned_raw(&src, 4 << 20);
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&src),
            s(&compressed),
        ],
    );
    // Zero clusters over data, and a fresh uncompressed write.
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -z 1M 128k",
            "-c",
            "write -P 0x77 3M 64k",
            s(&compressed),
        ],
    );
    let map = json(&disk_ok(
        &["map", "-f", "qcow2", "--output=json", s(&compressed)],
        0,
    ));
    let extents = map.as_array().unwrap();
    assert!(extents.iter().any(|e| e["compressed"] == true), "{map}");
    assert!(
        extents
            .iter()
            .any(|e| e["present"] == true && e["zero"] == true),
        "{map}"
    );
    disk_ok(&["check", "-f", "qcow2", s(&compressed)], 0);

    disk_ok(
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(&compressed),
            s(&ours),
        ],
        0,
    );
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(&compressed),
            s(&theirs),
        ],
    );
    assert_eq!(fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
}

fn be64(file: &File, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

/// A qemu-img image with some data (64 KiB clusters, 16-bit refcounts).
fn qemu_image(path: &Path) {
    qemu_ok("qemu-img", &["create", "-f", "qcow2", s(path), "16M"]);
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x42 0 128k", s(path)],
    );
}

#[test]
fn check_reports_leaks_and_corruption_like_qemu_img() {
    if !qemu_img_available() {
        return;
    }
    let dir = tempdir();

    let good = dir.as_path().join("good.qcow2");
    qemu_image(&good);
    disk_ok(&["check", "-f", "qcow2", s(&good)], 0);

    // A leak: the header cluster's refcount bumped from 1 to 2.
    let leaky = dir.as_path().join("leaky.qcow2");
    qemu_image(&leaky);
    {
        let file = fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&leaky)
            .unwrap();
        let reftable = be64(&file, 48);
        let refblock = be64(&file, reftable);
        file.write_all_at(&2u16.to_be_bytes(), refblock).unwrap();
    }
    let out = disk_ok(&["check", "-f", "qcow2", s(&leaky)], 3);
    assert!(out.contains("1 leaked clusters were found"), "{out}");
    assert_eq!(
        qemu("qemu-img", &["check", "-f", "qcow2", s(&leaky)])
            .status
            .code(),
        Some(3)
    );
    let report = json(&disk_ok(
        &["check", "-f", "qcow2", "--output=json", s(&leaky)],
        3,
    ));
    assert_eq!(report["leaks"], 1);
    assert_eq!(report["corruptions"], 0);

    // A corruption: the first L2 entry points past the end of the file.
    let corrupt = dir.as_path().join("corrupt.qcow2");
    qemu_image(&corrupt);
    {
        let file = fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&corrupt)
            .unwrap();
        let size = file.metadata().unwrap().len();
        let l1 = be64(&file, 40);
        let l2 = be64(&file, l1) & 0x00ff_ffff_ffff_fe00;
        let past_end = (size.div_ceil(65536) + 16) * 65536;
        file.write_all_at(&((1u64 << 63) | past_end).to_be_bytes(), l2)
            .unwrap();
    }
    let out = disk_ok(&["check", "-f", "qcow2", s(&corrupt)], 2);
    assert!(out.contains("past the end of the file"), "{out}");
    assert!(out.contains("errors were found on the image"), "{out}");
    assert_eq!(
        qemu("qemu-img", &["check", "-f", "qcow2", s(&corrupt)])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn bad_usage_exits_2_and_missing_files_exit_1() {
    let usage_cases: &[(&[&str], &str)] = &[
        (&[], "expecting a command"),
        (&["frobnicate"], "unknown command"),
        (&["create", "x.img"], "expecting an image size"),
        (&["create", "x.img", "12Q"], "invalid image size"),
        (&["create", "-f", "vmdk", "x.img", "1M"], "unknown format"),
        (
            &["create", "-o", "cluster_size=4096", "x.img", "1M"],
            "qcow2 format only",
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=1000",
                "x.img",
                "1M",
            ],
            "power of two",
        ),
        (&["info", "--bogus", "x"], "unknown option --bogus"),
        (&["info", "-f"], "needs a value"),
        (&["map", "--output=xml", "x"], "human or json"),
        (
            &["convert", "only-one"],
            "expecting a source and a destination",
        ),
    ];
    for (args, expected) in usage_cases {
        let output = disk(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert!(!Path::new("x.img").exists());

    let dir = tempdir();
    let missing = dir.as_path().join("missing");
    let out = dir.as_path().join("out");
    let not_qcow2 = dir.as_path().join("plain");
    fs::write(&not_qcow2, vec![0u8; 4096]).unwrap();
    let error_cases: &[&[&str]] = &[
        &["info", s(&missing)],
        &["info", "-f", "qcow2", s(&missing)],
        &["check", "-f", "qcow2", s(&missing)],
        &["map", s(&missing)],
        &["map", "-f", "qcow2", s(&missing)],
        &["convert", s(&missing), s(&out)],
        &["info", "-f", "qcow2", s(&not_qcow2)],
        &["check", "-f", "qcow2", s(&not_qcow2)],
    ];
    for args in error_cases {
        let output = disk(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
        assert!(stderr.starts_with("disk: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert!(!out.exists(), "a failed convert leaves no output");
}

#[test]
fn convert_flattens_a_backing_chain() {
    if !qemu_img_available() {
        return;
    }
    let dir = tempdir();
    let base = dir.as_path().join("base.raw");
    let top = dir.as_path().join("top.qcow2");
    let flat = dir.as_path().join("flat.raw");
    patterned_raw(&base, 4 << 20);
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&top),
        ],
    );
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 512k 64k", s(&top)],
    );
    let info = disk_ok(&["info", "-f", "qcow2", s(&top)], 0);
    assert!(info.contains("backing file: base.raw"), "{info}");
    assert!(info.contains("backing file format: raw"), "{info}");
    disk_ok(&["convert", "-f", "qcow2", s(&top), s(&flat)], 0);
    qemu_ok(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&top), s(&flat)],
    );
}
