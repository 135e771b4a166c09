//! QEMU's cache modes: how the host page cache is used and what a guest flush means.
//!
//! | mode | host page cache | `O_DIRECT` | volatile write cache | guest flush |
//! |---|---|---|---|---|
//! | writeback | yes | no | yes | `fdatasync` |
//! | writethrough | yes | no | no: writes are durable at completion | nothing to do |
//! | none | no | yes | yes (the disk's own) | `fdatasync` |
//! | directsync | no | yes | no: writes are durable at completion | nothing to do |
//! | unsafe | yes | no | yes | ignored |
//!
//! The open flags are QEMU's: only `O_DIRECT` differs between modes. A disk without a
//! volatile write cache makes each write durable with `RWF_DSYNC` on that write rather than
//! with `O_DSYNC` at open, because a guest may switch the write cache on and off at run time
//! (virtio's `CONFIG_WCE`) and `O_DSYNC` cannot be changed on an open file. Unlike QEMU's
//! writethrough (a write, then an `fdatasync`, serialised per request), `RWF_DSYNC` lets
//! durable writes overlap, which is what makes writethrough scale with queue depth.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// How the host caches a disk's data, with QEMU's names and semantics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CacheMode {
    /// Host page cache; the guest sees a volatile write cache; flush is `fdatasync`.
    #[default]
    Writeback,
    /// Host page cache; every write is durable before it completes.
    Writethrough,
    /// `O_DIRECT`; the guest sees a volatile write cache (the disk's); flush is `fdatasync`.
    None,
    /// `O_DIRECT`; every write is durable before it completes.
    DirectSync,
    /// Host page cache; flushes are ignored. For throwaway guests only.
    Unsafe,
}

impl CacheMode {
    /// Every mode, in QEMU's order.
    pub const ALL: [CacheMode; 5] = [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::None,
        CacheMode::DirectSync,
        CacheMode::Unsafe,
    ];

    /// QEMU's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::None => "none",
            CacheMode::DirectSync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }

    /// Whether the image is opened with `O_DIRECT`, bypassing the host page cache.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    /// Whether the device starts with a volatile write cache that the guest must flush
    /// (virtio-blk advertises `VIRTIO_BLK_F_FLUSH` and reports `writeback = 1`).
    pub fn write_cache(self) -> bool {
        !matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }

    /// Whether a guest flush is ignored rather than reaching `fdatasync`.
    pub fn ignores_flush(self) -> bool {
        self == CacheMode::Unsafe
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CacheMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        CacheMode::ALL
            .into_iter()
            .find(|mode| mode.name() == s)
            .ok_or_else(|| Error::UnknownName {
                kind: "cache mode",
                value: s.to_string(),
                expected: "writeback, writethrough, none, directsync, unsafe",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semantics_match_qemu() {
        let table = [
            // mode, O_DIRECT, volatile write cache, flush ignored
            (CacheMode::Writeback, false, true, false),
            (CacheMode::Writethrough, false, false, false),
            (CacheMode::None, true, true, false),
            (CacheMode::DirectSync, true, false, false),
            (CacheMode::Unsafe, false, true, true),
        ];
        for (mode, direct, write_cache, ignores_flush) in table {
            assert_eq!(mode.direct(), direct, "{mode}");
            assert_eq!(mode.write_cache(), write_cache, "{mode}");
            assert_eq!(mode.ignores_flush(), ignores_flush, "{mode}");
            assert_eq!(mode.name().parse::<CacheMode>().unwrap(), mode);
        }
        assert_eq!(CacheMode::default(), CacheMode::Writeback);
    }

    #[test]
    fn unknown_names_are_errors_that_list_the_choices() {
        let err = "direct".parse::<CacheMode>().unwrap_err().to_string();
        assert!(
            err.contains("\"direct\"") && err.contains("directsync"),
            "{err}"
        );
    }
}
