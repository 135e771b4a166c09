//! Loading a flat program (a static x86-64 ELF) into guest memory at its physical addresses.

use std::io::Cursor;
use std::path::PathBuf;

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::GuestMemoryMmap;
use vmkit_guest_abi::PROGRAM_MIN_ADDRESS;

/// Errors loading a program.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// The file could not be read.
    #[error("cannot read program {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error from the OS.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a loadable 64-bit little-endian ELF.
    #[error("{what}: not a loadable x86-64 ELF: {reason}")]
    NotElf {
        /// The program's name.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A segment lies outside the range a program may occupy.
    #[error("{what}: segment at [{start:#x}, {end:#x}) lies outside guest RAM above {min:#x}")]
    Placement {
        /// The program's name.
        what: String,
        /// Segment start.
        start: u64,
        /// Segment end.
        end: u64,
        /// The lowest address a program may use.
        min: u64,
    },
}

/// Which program the VM runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Program {
    /// The built-in guest ([`crate::builtin_guest::ELF`]).
    #[default]
    Builtin,
    /// A static x86-64 ELF file.
    ElfFile(PathBuf),
}

/// Where a program was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedProgram {
    /// Entry point.
    pub entry: u64,
    /// End (exclusive) of the highest segment, its zero-filled part included.
    pub image_end: u64,
}

impl Program {
    /// A name for messages.
    pub fn name(&self) -> String {
        match self {
            Program::Builtin => "the built-in guest".into(),
            Program::ElfFile(path) => path.display().to_string(),
        }
    }

    /// Reads the program's bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, ProgramError> {
        match self {
            Program::Builtin => Ok(crate::builtin_guest::ELF.to_vec()),
            Program::ElfFile(path) => std::fs::read(path).map_err(|source| ProgramError::Read {
                path: path.clone(),
                source,
            }),
        }
    }

    /// Loads the program into `mem`. `ram_end` is the end of the RAM range that starts at 0:
    /// segments must lie in `[PROGRAM_MIN_ADDRESS, ram_end)`.
    pub fn load(&self, mem: &GuestMemoryMmap, ram_end: u64) -> Result<LoadedProgram, ProgramError> {
        let bytes = self.bytes()?;
        let not_elf = |reason: &str| ProgramError::NotElf {
            what: self.name(),
            reason: reason.into(),
        };
        let segments = load_segments(&bytes).map_err(not_elf)?;
        let mut image_end = PROGRAM_MIN_ADDRESS;
        for &(start, size) in &segments {
            let end = start
                .checked_add(size)
                .ok_or_else(|| not_elf("segment wraps"))?;
            if start < PROGRAM_MIN_ADDRESS || end > ram_end {
                return Err(ProgramError::Placement {
                    what: self.name(),
                    start,
                    end,
                    min: PROGRAM_MIN_ADDRESS,
                });
            }
            image_end = image_end.max(end);
        }
        if segments.is_empty() {
            return Err(not_elf("no loadable segment"));
        }
        let loaded = Elf::load(
            mem,
            None,
            &mut Cursor::new(&bytes),
            Some(vm_memory::GuestAddress(PROGRAM_MIN_ADDRESS)),
        )
        .map_err(|e| not_elf(&e.to_string()))?;
        Ok(LoadedProgram {
            entry: loaded.kernel_load.0,
            image_end,
        })
    }
}

/// The `(physical address, memory size)` of each `PT_LOAD` segment. linux-loader loads the
/// segments but skips those without file data when it computes the image end, and does not
/// check them against the boot structures, so the placement is checked here first.
fn load_segments(elf: &[u8]) -> Result<Vec<(u64, u64)>, &'static str> {
    const PT_LOAD: u32 = 1;
    const PHDR_SIZE: usize = 56;
    let field = |offset: usize, len: usize| -> Result<u64, &'static str> {
        let bytes = elf
            .get(offset..offset.checked_add(len).ok_or("header offset overflows")?)
            .ok_or("truncated header")?;
        let mut value = [0u8; 8];
        value[..len].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(value))
    };
    if elf.get(..4) != Some(b"\x7fELF") || field(4, 1)? != 2 || field(5, 1)? != 1 {
        return Err("not a 64-bit little-endian ELF");
    }
    if field(0x12, 2)? != 62 {
        return Err("not an x86-64 ELF");
    }
    let phoff = usize::try_from(field(0x20, 8)?).map_err(|_| "bad program header offset")?;
    let phentsize = field(0x36, 2)? as usize;
    let phnum = field(0x38, 2)? as usize;
    if phentsize != PHDR_SIZE {
        return Err("unexpected program header size");
    }
    (0..phnum)
        .map(|i| phoff + i * PHDR_SIZE)
        .filter_map(|ph| match field(ph, 4) {
            Ok(kind) if kind as u32 == PT_LOAD => {
                Some(field(ph + 0x18, 8).and_then(|paddr| Ok((paddr, field(ph + 0x28, 8)?))))
            }
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn loads_the_builtin_guest_above_one_mib() {
        let loaded = Program::Builtin.load(&memory(), 64 << 20).unwrap();
        assert!(loaded.entry >= PROGRAM_MIN_ADDRESS);
        assert!(loaded.image_end > loaded.entry);
    }

    #[test]
    fn refuses_garbage_truncation_and_low_or_outside_segments() {
        let mem = memory();
        let garbage = std::env::temp_dir().join(format!("vmkit-garbage-{}", std::process::id()));
        std::fs::write(&garbage, b"not an elf at all").unwrap();
        let err = Program::ElfFile(garbage.clone()).load(&mem, 64 << 20);
        std::fs::remove_file(&garbage).unwrap();
        assert!(matches!(err, Err(ProgramError::NotElf { .. })), "{err:?}");

        let elf = crate::builtin_guest::ELF;
        assert!(load_segments(&elf[..0x30]).is_err());
        let segments = load_segments(elf).unwrap();
        assert!(!segments.is_empty());

        // RAM too small for the image.
        let err = Program::Builtin.load(&mem, PROGRAM_MIN_ADDRESS + 4096);
        assert!(
            matches!(err, Err(ProgramError::Placement { .. })),
            "{err:?}"
        );

        // A program linked below 1 MiB would overwrite the boot structures.
        let mut low = elf.to_vec();
        let phoff = u64::from_le_bytes(low[0x20..0x28].try_into().unwrap()) as usize;
        let first_load = (0..)
            .map(|i| phoff + i * 56)
            .find(|&ph| low[ph] == 1)
            .unwrap();
        low[first_load + 0x18..first_load + 0x20].copy_from_slice(&0x8000u64.to_le_bytes());
        assert!(matches!(
            load_segments(&low).map(|s| s.iter().any(|&(start, _)| start < PROGRAM_MIN_ADDRESS)),
            Ok(true)
        ));
    }

    #[test]
    fn reports_a_missing_file() {
        let err = Program::ElfFile("/nonexistent/program".into()).load(&memory(), 64 << 20);
        assert!(matches!(err, Err(ProgramError::Read { .. })));
    }
}
