//! Data written through every cache mode and engine reads back, from the disk and from the
//! file itself, whatever the buffers' alignment.

mod common;

use common::*;
use vmkit_block_backend::{open, AlignedBuffer, IoBuf, OpenOptions, Request};

const IMAGE_SIZE: usize = 4 << 20;

#[test]
fn round_trips_on_every_cache_mode_and_engine() {
    let dir = scratch_dir();
    for (mode, engine) in every_mode_and_engine() {
        let path = patterned_image(&dir, &format!("{mode}-{engine}.img"), IMAGE_SIZE);
        let options = OpenOptions::new().cache(mode).engine(engine);
        let mut disk = open(&path, &options).unwrap();
        assert_eq!(disk.engine(), engine, "{mode}/{engine}");
        assert_eq!(disk.info().size, IMAGE_SIZE as u64);

        // Aligned buffers, one per request, many requests in one batch.
        let mut buffers: Vec<AlignedBuffer> = (0..16u64)
            .map(|i| {
                let mut buf = AlignedBuffer::new(4096, 4096);
                buf.as_mut_slice()
                    .copy_from_slice(&pattern(i * 8192, 4096, 0x5a));
                buf
            })
            .collect();
        let bufs: Vec<[IoBuf; 1]> = buffers
            .iter_mut()
            .map(|b| [IoBuf::from_mut_slice(b.as_mut_slice())])
            .collect();
        let requests: Vec<(u64, Request)> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                (
                    i as u64,
                    Request::Write {
                        offset: i as u64 * 8192,
                        bufs: b,
                    },
                )
            })
            .collect();
        for completion in run(disk.as_mut(), &requests) {
            assert_eq!(completion.result.unwrap(), 4096, "{mode}/{engine}");
        }
        for i in 0..16u64 {
            assert_eq!(
                read(disk.as_mut(), i * 8192, 4096),
                pattern(i * 8192, 4096, 0x5a)
            );
            // The untouched half between writes kept the image's data.
            assert_eq!(
                read(disk.as_mut(), i * 8192 + 4096, 4096),
                pattern(i * 8192 + 4096, 4096, 0)
            );
        }

        // Several buffers in one request, one of them at an odd address and length, at an
        // offset that is only sector-aligned: O_DIRECT modes bounce it.
        let mut backing = vec![0u8; 8192 + 3];
        let (head, rest) = backing.split_at_mut(1000);
        let (middle, tail) = rest.split_at_mut(3000);
        let data = pattern(0, 8192 + 3, 0x77);
        head.copy_from_slice(&data[..1000]);
        middle.copy_from_slice(&data[1000..4000]);
        tail.copy_from_slice(&data[4000..]);
        let offset = 1_000_000 - 1_000_000 % 512 + 100;
        let bufs = [
            IoBuf::from_mut_slice(head),
            IoBuf::from_mut_slice(middle),
            IoBuf::from_mut_slice(tail),
        ];
        assert_eq!(
            run_one(
                disk.as_mut(),
                Request::Write {
                    offset,
                    bufs: &bufs
                }
            )
            .unwrap(),
            data.len()
        );
        assert_eq!(read(disk.as_mut(), offset, data.len()), data);
        // The neighbours of an unaligned write are untouched.
        assert_eq!(
            read(disk.as_mut(), offset - 100, 100),
            pattern(offset - 100, 100, 0)
        );
        let end = offset + data.len() as u64;
        assert_eq!(read(disk.as_mut(), end, 200), pattern(end, 200, 0));
        if mode.direct() {
            assert!(
                disk.sync_disk().stats().bounced_requests >= 1,
                "{mode}/{engine}"
            );
        }

        let flush = run_one(disk.as_mut(), Request::Flush);
        assert_eq!(flush.unwrap(), 0);
        drop(disk);

        // The file holds what the disk said it wrote.
        let file = std::fs::read(&path).unwrap();
        assert_eq!(
            &file[8192..12288],
            &pattern(8192, 4096, 0x5a)[..],
            "{mode}/{engine}"
        );
        assert_eq!(
            &file[offset as usize..end as usize],
            &data[..],
            "{mode}/{engine}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn sync_disk_round_trips_and_checks_ranges() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "sync.img", 1 << 20);
    for mode in vmkit_block_backend::CacheMode::ALL {
        let disk = vmkit_block_backend::open_sync(&path, &OpenOptions::new().cache(mode)).unwrap();
        let mut data = pattern(4096, 4096, 9);
        let expected = data.clone();
        assert_eq!(
            disk.write_vectored(4096, &[IoBuf::from_mut_slice(&mut data)])
                .unwrap(),
            4096
        );
        let mut back = vec![0u8; 4096];
        assert_eq!(
            disk.read_vectored(4096, &[IoBuf::from_mut_slice(&mut back)])
                .unwrap(),
            4096
        );
        assert_eq!(back, expected, "{mode}");

        // Outside the disk, or overflowing: errors, nothing done.
        let mut buf = vec![0u8; 1024];
        for offset in [(1 << 20) - 512, 1 << 20, u64::MAX - 100] {
            let err = disk
                .read_vectored(offset, &[IoBuf::from_mut_slice(&mut buf)])
                .unwrap_err();
            assert!(
                matches!(err, vmkit_block_backend::Error::OutOfRange { .. }),
                "{err}"
            );
        }
        assert!(disk.write_zeroes(u64::MAX, 2).is_err());
        assert!(disk.discard((1 << 20) - 512, 1024).is_err());
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
}

#[test]
fn requests_outside_the_disk_fail_at_push() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "range.img", 1 << 20);
    for engine in ENGINES {
        let mut disk = open(&path, &OpenOptions::new().engine(engine)).unwrap();
        let mut buf = vec![0u8; 4096];
        let bufs = [IoBuf::from_mut_slice(&mut buf)];
        // SAFETY: the push fails, so nothing keeps the buffer.
        let err = unsafe {
            disk.push(
                1,
                Request::Read {
                    offset: (1 << 20) - 2048,
                    bufs: &bufs,
                },
            )
        };
        assert!(matches!(
            err,
            Err(vmkit_block_backend::Error::OutOfRange { .. })
        ));
        // SAFETY: as above.
        let err = unsafe {
            disk.push(
                2,
                Request::WriteZeroes {
                    offset: u64::MAX - 1,
                    len: 4,
                },
            )
        };
        assert!(err.is_err());
        assert_eq!(disk.in_flight(), 0);
    }
}

#[test]
fn reads_past_the_end_of_the_file_return_zeroes() {
    // A 1000-byte image is two sectors to a guest: the 24 bytes past the file read as 0.
    let dir = scratch_dir();
    let path = dir.as_path().join("short.img");
    let content = pattern(0, 1000, 3);
    std::fs::write(&path, &content).unwrap();
    for (mode, engine) in every_mode_and_engine() {
        let mut disk = open(
            &path,
            &OpenOptions::new()
                .cache(mode)
                .engine(engine)
                .read_only(true),
        )
        .unwrap();
        assert_eq!(disk.info().size, 1000);
        assert_eq!(disk.info().addressable_size(), 1024);
        let mut data = AlignedBuffer::new(1024, 4096);
        data.as_mut_slice().fill(0xff);
        let bufs = [IoBuf::from_mut_slice(data.as_mut_slice())];
        assert_eq!(
            run_one(
                disk.as_mut(),
                Request::Read {
                    offset: 0,
                    bufs: &bufs
                }
            )
            .unwrap(),
            1024
        );
        assert_eq!(&data.as_slice()[..1000], &content[..], "{mode}/{engine}");
        assert!(
            data.as_slice()[1000..].iter().all(|&b| b == 0),
            "{mode}/{engine}"
        );

        let mut tail = vec![0xffu8; 24];
        let bufs = [IoBuf::from_mut_slice(&mut tail)];
        assert_eq!(
            run_one(
                disk.as_mut(),
                Request::Read {
                    offset: 1000,
                    bufs: &bufs
                }
            )
            .unwrap(),
            24
        );
        assert!(tail.iter().all(|&b| b == 0));
    }
}

#[test]
fn read_only_disks_refuse_writes() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "ro.img", 1 << 20);
    for engine in ENGINES {
        let mut disk = open(&path, &OpenOptions::new().engine(engine).read_only(true)).unwrap();
        assert!(disk.info().read_only);
        let mut buf = vec![1u8; 512];
        let bufs = [IoBuf::from_mut_slice(&mut buf)];
        for request in [
            Request::Write {
                offset: 0,
                bufs: &bufs,
            },
            Request::Discard {
                offset: 0,
                len: 4096,
            },
            Request::WriteZeroes {
                offset: 0,
                len: 4096,
            },
        ] {
            // SAFETY: the push fails, so nothing keeps the buffer.
            let err = unsafe { disk.push(1, request) }.unwrap_err();
            assert!(matches!(err, vmkit_block_backend::Error::ReadOnly), "{err}");
        }
        assert_eq!(read(disk.as_mut(), 0, 512), pattern(0, 512, 0));
        assert_eq!(run_one(disk.as_mut(), Request::Flush).unwrap(), 0);
    }
    assert_eq!(std::fs::read(&path).unwrap(), pattern(0, 1 << 20, 0));
}

#[test]
fn page_cache_hits_complete_on_the_submitting_thread() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "nowait.img", 1 << 20);
    let mut disk = open(
        &path,
        &OpenOptions::new().engine(vmkit_block_backend::EngineKind::Sync),
    )
    .unwrap();
    // The file was just written, so its pages are cached.
    for i in 0..8u64 {
        assert_eq!(
            read(disk.as_mut(), i * 4096, 4096),
            pattern(i * 4096, 4096, 0)
        );
    }
    assert_eq!(disk.sync_disk().stats().nowait_reads, 8);
}
