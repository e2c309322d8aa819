//! The one way to read guest RAM: which pages may hold data, and whether a
//! page is zero, for every way godwit backs RAM. Snapshot save and every
//! migration round go through here, so that no path can mistake a page for
//! zero because of how its memory is backed.
//!
//! - **Shared file** (the boot-time memfd, or the memfd of a copy restore):
//!   the file is the memory. Its holes are pages nobody wrote, and
//!   SEEK_DATA skips them without faulting them in.
//! - **Private file mapping** (a restore that maps the snapshot's memory
//!   file `MAP_PRIVATE`): the file holds what the snapshot saved, and every
//!   page the guest wrote since is a private anonymous copy that the file
//!   knows nothing about. The file's holes say nothing about the mapping:
//!   the candidates are the file's data plus the private pages, which
//!   `/proc/self/pagemap` names (present or swapped, not file-backed).
//! - **Anonymous** memory (no file): every page is a candidate.
//!
//! A candidate page is then checked for zero in place ([`is_zero`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::{GuestMemoryRegion, GuestRegionMmap, VolatileSlice};

use crate::le::usize_of;

/// The page size of guest RAM, of the memory file and of the migration
/// stream.
pub const PAGE_SIZE: u64 = 4096;

/// How a guest RAM region is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    SharedFile,
    PrivateFile,
    Anonymous,
}

pub fn backing<B: Bitmap>(region: &GuestRegionMmap<B>) -> Backing {
    let mapping = std::ops::Deref::deref(region);
    match mapping.file_offset() {
        Some(_) if mapping.flags() & libc::MAP_SHARED != 0 => Backing::SharedFile,
        Some(_) => Backing::PrivateFile,
        None => Backing::Anonymous,
    }
}

/// `/proc/self/pagemap` entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;
/// Entries read per pread: 4 MiB of guest memory.
const PAGEMAP_CHUNK: usize = 1024;

/// Page-aligned byte ranges `[start, end)`, offsets in `region`, sorted and
/// disjoint, outside which every page of the region is zero.
pub fn data_ranges<B: Bitmap>(region: &GuestRegionMmap<B>) -> io::Result<Vec<(u64, u64)>> {
    let len = region.len();
    let mapping = std::ops::Deref::deref(region);
    let file_ranges = |fo: &vm_memory::FileOffset| -> io::Result<Vec<(u64, u64)>> {
        Ok(data_extents(fo.file(), fo.start(), fo.start() + len)?
            .into_iter()
            .map(|(s, e)| {
                // Extents are page aligned except perhaps at the file's end.
                let s = (s - fo.start()) / PAGE_SIZE * PAGE_SIZE;
                let e = (e - fo.start())
                    .div_ceil(PAGE_SIZE)
                    .saturating_mul(PAGE_SIZE);
                (s, e.min(len))
            })
            .collect())
    };
    match (backing(region), mapping.file_offset()) {
        (Backing::SharedFile, Some(fo)) => file_ranges(fo),
        (Backing::PrivateFile, Some(fo)) => {
            let mut ranges = file_ranges(fo)?;
            match private_pages(mapping.as_ptr() as u64, len) {
                Ok(private) => ranges.extend(private),
                Err(e) => {
                    tracing::warn!(
                        "cannot read /proc/self/pagemap ({e}): every page of the privately mapped guest memory at {:#x} is read to find its data",
                        region.start_addr().0
                    );
                    return Ok(vec![(0, len)]);
                }
            }
            Ok(merge(ranges))
        }
        _ => Ok(vec![(0, len)]),
    }
}

/// The pages of `[addr, addr + len)` of this process that are private
/// anonymous memory: present or swapped, and not a page of a file.
fn private_pages(addr: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let pages = len / PAGE_SIZE;
    let first = addr / PAGE_SIZE;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; PAGEMAP_CHUNK * 8];
    let mut page = 0u64;
    while page < pages {
        let n = usize_of((pages - page).min(PAGEMAP_CHUNK as u64));
        pagemap.read_exact_at(&mut buf[..n * 8], (first + page) * 8)?;
        for (i, e) in buf[..n * 8].chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
            let private =
                (e & PM_SWAPPED != 0) || (e & PM_PRESENT != 0 && e & PM_FILE_OR_SHARED == 0);
            if !private {
                continue;
            }
            let at = (page + i as u64) * PAGE_SIZE;
            match out.last_mut() {
                Some(r) if r.1 == at => r.1 += PAGE_SIZE,
                _ => out.push((at, at + PAGE_SIZE)),
            }
        }
        page += n as u64;
    }
    Ok(out)
}

/// Sorts ranges and merges the ones that touch or overlap.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Whether every byte of `slice` is zero, read in place with volatile loads
/// (the guest and devices may share this memory).
pub fn is_zero<B: BitmapSlice>(slice: &VolatileSlice<B>) -> bool {
    let guard = slice.ptr_guard();
    let ptr = guard.as_ptr();
    let len = slice.len();
    if !(ptr as usize).is_multiple_of(8) || !len.is_multiple_of(8) {
        // SAFETY: the slice covers `len` readable bytes from `ptr`, kept
        // mapped by `guard` while this runs.
        return (0..len).all(|i| unsafe { std::ptr::read_volatile(ptr.add(i)) } == 0);
    }
    let words = ptr.cast::<u64>();
    // SAFETY: as above, and `ptr` and `len` are 8-byte aligned, so every
    // u64 read is aligned and inside the slice.
    (0..len / 8).all(|i| unsafe { std::ptr::read_volatile(words.add(i)) } == 0)
}

/// The data extents of `file` in `[start, end)`, from SEEK_DATA/SEEK_HOLE.
/// A filesystem without hole reporting yields the whole range.
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence| {
        // SAFETY: lseek only moves this descriptor's offset; the descriptor
        // is owned by `file`, which outlives the call.
        let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.min(end);
        extents.push((data, hole));
        pos = hole;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_file::{create_memfd, map_private, save};
    use std::sync::Arc;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    use vmm_sys_util::tempdir::TempDir;

    type Mem = GuestMemoryMmap<AtomicBitmap>;
    const MIB: u64 = 1 << 20;

    #[test]
    fn a_private_mapping_names_the_pages_written_since_it_was_mapped() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let file = Arc::new(create_memfd(8 * MIB).unwrap());
        let mem = Mem::from_ranges_with_files([(
            GuestAddress(0),
            (8 * MIB) as usize,
            Some(FileOffset::from_arc(file, 0)),
        )])
        .unwrap();
        mem.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        let region = mem.iter().next().unwrap();
        assert_eq!(backing(region), Backing::SharedFile);
        assert_eq!(data_ranges(region).unwrap(), vec![(0x1000, 0x2000)]);
        let info = save(&mem, &path).unwrap().info;

        let restored = map_private::<AtomicBitmap>(&path, &info).unwrap();
        let region = restored.memory.iter().next().unwrap();
        assert_eq!(backing(region), Backing::PrivateFile);
        // Read a hole: a zero page of the file, not a private one.
        assert_eq!(
            restored
                .memory
                .read_obj::<u64>(GuestAddress(0x5000))
                .unwrap(),
            0
        );
        restored
            .memory
            .write_obj(2u64, GuestAddress(0x3000))
            .unwrap();
        restored
            .memory
            .write_obj(3u64, GuestAddress(0x4000))
            .unwrap();
        restored
            .memory
            .write_obj(4u64, GuestAddress(7 * MIB))
            .unwrap();
        assert_eq!(
            data_ranges(region).unwrap(),
            vec![
                (0x1000, 0x2000),
                (0x3000, 0x5000),
                (7 * MIB, 7 * MIB + 0x1000)
            ]
        );
    }

    #[test]
    fn zero_is_checked_in_place() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), (MIB) as usize)]).unwrap();
        let page = |a| mem.get_slice(GuestAddress(a), PAGE_SIZE as usize).unwrap();
        assert!(is_zero(&page(0x2000)));
        mem.write_obj(1u8, GuestAddress(0x2fff)).unwrap();
        assert!(!is_zero(&page(0x2000)));
        assert!(is_zero(&mem.get_slice(GuestAddress(0x2ff0), 15).unwrap()));
        assert!(!is_zero(&mem.get_slice(GuestAddress(0x2ff1), 15).unwrap()));
    }
}
