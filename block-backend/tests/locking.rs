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
