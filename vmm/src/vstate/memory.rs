//! Guest RAM: one memfd, mapped MAP_SHARED, split around the 32-bit MMIO hole.
//!
//! A memfd (rather than anonymous memory) lets a vhost-user backend map the
//! same pages, and lets snapshot and migration read guest memory through an
//! fd. The dirty bitmap on each region records godwit's own writes.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use godwit_devices::GuestMemory;
use vm_memory::{FileOffset, GuestAddress};

use crate::vstate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

pub const MIB: u64 = 1 << 20;
/// Below this even the test guest cannot hold its page tables and stack.
pub const MIN_MEMORY: u64 = 16 * MIB;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {size} bytes is not a whole number of 4 KiB pages")]
    Unaligned { size: u64 },
    #[error("guest memory of {} MiB is too small: godwit needs at least {} MiB", .size / MIB, MIN_MEMORY / MIB)]
    TooSmall { size: u64 },
    #[error("guest memory of {} MiB is more than this host has ({} MiB of RAM): choose a smaller --memory", .size / MIB, .host / MIB)]
    MoreThanHost { size: u64, host: u64 },
    #[error("cannot create the memfd that backs guest memory: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory memfd to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
}

/// Where guest RAM lives in guest physical space, and where in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        ranges.push(RamRange {
            guest_addr: MMIO_HOLE_END,
            size: size - low,
            file_offset: low,
        });
    }
    ranges
}

/// Physical RAM of this host, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn check_size(size: u64) -> Result<(), MemoryError> {
    if !size.is_multiple_of(4096) {
        return Err(MemoryError::Unaligned { size });
    }
    if size < MIN_MEMORY {
        return Err(MemoryError::TooSmall { size });
    }
    if let Some(host) = host_memory_bytes() {
        if size > host {
            return Err(MemoryError::MoreThanHost { size, host });
        }
    }
    Ok(())
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    pub memory: GuestMemory,
    pub file: Arc<File>,
    pub size: u64,
}

impl GuestRam {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the
        // returned fd is checked before use and owned by the File below.
        let fd = unsafe { libc::memfd_create(c"godwit-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        Self::from_file(file, size)
    }

    /// Maps an existing memfd (or memory file) of `size` bytes.
    pub fn from_file(file: Arc<File>, size: u64) -> Result<Self, MemoryError> {
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|r| {
                (
                    GuestAddress(r.guest_addr),
                    r.size as usize,
                    Some(FileOffset::from_arc(file.clone(), r.file_offset)),
                )
            })
            .collect();
        let memory = GuestMemory::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        Ok(GuestRam { memory, file, size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ram_is_split_around_the_mmio_hole() {
        assert_eq!(
            ram_ranges(512 * MIB),
            vec![RamRange {
                guest_addr: 0,
                size: 512 * MIB,
                file_offset: 0
            }]
        );
        let r = ram_ranges(4096 * MIB);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, MMIO_HOLE_START);
        assert_eq!(r[1].guest_addr, MMIO_HOLE_END);
        assert_eq!(r[1].size, 1024 * MIB);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(check_size(MIB), Err(MemoryError::TooSmall { .. })));
        assert!(matches!(
            check_size(64 * MIB + 1),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            check_size(1 << 60),
            Err(MemoryError::MoreThanHost { .. })
        ));
    }

    #[test]
    fn memory_is_shared_through_the_memfd() {
        let ram = GuestRam::new(64 * MIB).unwrap();
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory.num_regions(), 1);
    }
}
