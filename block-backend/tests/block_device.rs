//! Host block devices as disks, on a loop device (needs root; skipped with a message
//! otherwise): size and block sizes from the device, round trips, BLKDISCARD and
//! write-zeroes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vmkit_block_backend::{
    open, CacheMode, OpenOptions, RawDisk, RawKind, RawOptions, Request, SyncDisk,
};

const SIZE: u64 = 16 << 20;

/// A loop device over a file, detached on drop.
struct LoopDevice {
    device: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path, sector_size: u32) -> Option<Self> {
        let output = Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--sector-size",
                &sector_size.to_string(),
            ])
            .arg(backing)
            .output()
            .ok()?;
        if !output.status.success() {
            eprintln!(
                "SKIPPED: cannot attach a loop device (needs root and loop support): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            return None;
        }
        let device = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Some(LoopDevice { device })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("--detach")
            .arg(&self.device)
            .status();
    }
}

#[test]
fn loop_devices_work_as_disks() {
    let dir = scratch_dir();
    for sector_size in [512u32, 4096] {
        let backing = patterned_image(&dir, &format!("backing-{sector_size}.img"), SIZE as usize);
        let Some(device) = LoopDevice::attach(&backing, sector_size) else {
            return;
        };
        let raw = RawDisk::open(&device.device, RawOptions::default()).unwrap();
        assert_eq!(raw.kind(), RawKind::BlockDevice);
        let info = raw.info();
        assert_eq!(info.size, SIZE, "BLKGETSIZE64");
        assert_eq!(info.logical_block_size, sector_size, "BLKSSZGET");
        drop(raw);

        for (mode, engine) in [
            (CacheMode::Writeback, ENGINES[0]),
            (CacheMode::None, ENGINES[1]),
            (CacheMode::DirectSync, ENGINES[0]),
        ] {
            let options = OpenOptions::new().cache(mode).engine(engine);
            let mut disk = open(&device.device, &options).unwrap();
            assert!(disk.info().logical_block_size >= sector_size);
            let data = pattern(65536, 8192, sector_size as u8);
            write(disk.as_mut(), 65536, &data);
            assert_eq!(read(disk.as_mut(), 65536, 8192), data, "{mode}/{engine}");
            // A 512-byte write on a 4 KiB-sector device is read, patched and written back.
            let small = pattern(0, 512, 0x3c);
            write(disk.as_mut(), 1024 * 1024 + 512, &small);
            assert_eq!(read(disk.as_mut(), 1024 * 1024 + 512, 512), small);
            assert_eq!(
                read(disk.as_mut(), 1024 * 1024, 512),
                pattern(1024 * 1024, 512, 0)
            );

            run_one(
                disk.as_mut(),
                Request::WriteZeroes {
                    offset: 2 << 20,
                    len: 1 << 20,
                },
            )
            .unwrap();
            assert!(read(disk.as_mut(), 2 << 20, 1 << 20)
                .iter()
                .all(|&b| b == 0));
            run_one(disk.as_mut(), Request::Flush).unwrap();
        }

        // BLKDISCARD reaches the loop device, which punches a hole in its backing file.
        let mut disk = open(&device.device, &OpenOptions::new().cache(CacheMode::None)).unwrap();
        let before = allocated_bytes(&backing);
        run_one(
            disk.as_mut(),
            Request::Discard {
                offset: 8 << 20,
                len: 4 << 20,
            },
        )
        .unwrap();
        run_one(disk.as_mut(), Request::Flush).unwrap();
        let after = allocated_bytes(&backing);
        // Splitting an extent may cost the filesystem a metadata block or two.
        assert!(
            after + (4 << 20) - (64 << 10) <= before,
            "backing st_blocks {before} -> {after}"
        );
        assert!(read(disk.as_mut(), 8 << 20, 4096).iter().all(|&b| b == 0));
        assert_eq!(
            read(disk.as_mut(), (12 << 20) + 4096, 4096),
            pattern((12 << 20) + 4096, 4096, 0)
        );
    }
}
