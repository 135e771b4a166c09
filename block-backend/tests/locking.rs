//! Image locking among vmkit's own opens: one writer, or any number of readers.

mod common;

use common::*;
use vmkit_block_backend::{open, open_sync, Error, OpenOptions};

#[test]
fn a_second_writer_is_refused_and_readers_share() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "locked.img", 1 << 20);

    let writer = open(&path, &OpenOptions::new()).unwrap();
    let err = open(&path, &OpenOptions::new())
        .err()
        .expect("a second writer is refused");
    assert!(
        matches!(
            err,
            Error::Locked {
                permission: "write",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    // A reader would see data change under it: refused too, as QEMU does.
    assert!(open_sync(&path, &OpenOptions::new().read_only(true)).is_err());
    drop(writer);

    let reader_a = open(&path, &OpenOptions::new().read_only(true)).unwrap();
    let reader_b = open_sync(&path, &OpenOptions::new().read_only(true)).unwrap();
    assert!(open(&path, &OpenOptions::new()).is_err());
    drop((reader_a, reader_b));

    // Locks go with the disk: the image is writable again, and locking can be turned off.
    let _writer = open(&path, &OpenOptions::new()).unwrap();
    let _unlocked = open_sync(&path, &OpenOptions::new().locking(false)).unwrap();
}

#[test]
fn queues_of_one_disk_share_its_lock_and_write_cache() {
    let dir = scratch_dir();
    let path = patterned_image(&dir, "queues.img", 1 << 20);
    for engine in ENGINES {
        let options = OpenOptions::new().engine(engine);
        let mut queues = vmkit_block_backend::open_queues(&path, &options, 4).unwrap();
        assert_eq!(queues.len(), 4);
        // One open: the queues do not lock each other out, and others are still refused.
        assert!(open(&path, &options).is_err());
        // Data written through one queue reads back through another.
        write(queues[0].as_mut(), 4096, &pattern(4096, 4096, 7));
        assert_eq!(read(queues[3].as_mut(), 4096, 4096), pattern(4096, 4096, 7));
        // The write cache is one setting for the disk.
        queues[1].sync_disk().set_write_cache(false).unwrap();
        assert!(queues.iter().all(|q| !q.sync_disk().write_cache()));
    }
}
