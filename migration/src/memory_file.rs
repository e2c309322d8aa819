//! Guest memory to and from a file, the second file of a snapshot.
//!
//! # Layout
//!
//! The file holds a small header in its first page and the guest pages from
//! [`DATA_OFFSET`] (2 MiB, so that huge-page-aligned guest memory stays
//! huge-page aligned in the file) onwards. Regions are stored back to back in
//! guest-address order, each at its offset in the guest RAM memfd, so the
//! data part of the file is an image of that memfd.
//!
//! Pages that are all zero are not written: they are holes in a sparse file,
//! and read back as zeros. Runs of non-zero pages are written with one large
//! sequential write each.
//!
//! Header (little-endian; the first 20 bytes have the same shape as the
//! state container's preamble):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 8  | magic `GODWITMF` |
//! | 8  | 4  | version |
//! | 12 | 4  | header length, up to and including the header CRC |
//! | 16 | 4  | CRC-32C of bytes 0..16 |
//! | 20 | 4  | page size (4096) |
//! | 24 | 8  | data offset |
//! | 32 | 8  | RAM size: the sum of the region sizes |
//! | 40 | 8  | file length: data offset + RAM size |
//! | 48 | 16 | id: random, also recorded in the state file |
//! | 64 | 4  | region count *n* |
//! | 68 | 4  | reserved (0) |
//! | 72 | 24 × *n* | regions: guest address, size, offset in the data part (u64 each) |
//! | 72 + 24*n* | 4 | CRC-32C of the header before it |
//!
//! # Two ways back
//!
//! - [`map_private`] maps the file `MAP_PRIVATE`: nothing is copied, guest
//!   pages fault in from the page cache when first touched, and guest writes
//!   go to private copies. Fastest restore; the memory is not shareable, so a
//!   vhost-user backend cannot use it.
//! - [`restore_to_memfd`] copies the file's data into a fresh memfd mapped
//!   `MAP_SHARED`, which a vhost-user backend can map too. Holes are skipped,
//!   so the memfd stays as sparse as the file.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::{Bitmap, NewBitmap};
use vm_memory::io::{ReadVolatile, WriteVolatile};
use vm_memory::mmap::{FromRangesError, MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionCollectionError, GuestRegionMmap, MemoryRegionAddress,
    VolatileMemoryError,
};

use crate::atomic::{write_atomically, AtomicWriteError};
use crate::format::{kind_ids, SectionKind};
use crate::guest_ram;
use crate::le::{bounded_u32, crc, u32_at, u64_at, usize_of};

pub const MAGIC: [u8; 8] = *b"GODWITMF";
/// The layout this godwit writes and the newest it reads.
pub const VERSION: u32 = 1;
/// The granule of zero detection and of region sizes.
pub use crate::guest_ram::PAGE_SIZE;
/// Where guest data starts in the file.
pub const DATA_OFFSET: u64 = 2 << 20;

const PREAMBLE_LEN: usize = 20;
const FIXED_LEN: usize = 72;
const REGION_LEN: usize = 24;
const CRC_LEN: usize = 4;
/// The header fits in the first page.
pub const MAX_REGIONS: usize = (usize_of(PAGE_SIZE) - FIXED_LEN - CRC_LEN) / REGION_LEN;

/// The state-container section that records the memory file of a snapshot:
/// its payload is the [`MemoryFileInfo`] [`save`] returned, which restore
/// passes back to [`map_private`] or [`restore_to_memfd`].
pub const MEMORY_SECTION: SectionKind = SectionKind {
    id: kind_ids::MEMORY,
    name: "memory",
    version: 1,
    min_version: 1,
    required: true,
    instanced: false,
};

/// One guest RAM region in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionInfo {
    pub guest_addr: u64,
    pub size: u64,
    /// Offset in the data part of the file, which is also the region's
    /// offset in a restored memfd.
    pub offset: u64,
}

/// What a memory file holds. The VMM records it in the snapshot's state so
/// that restore can refuse a memory file that does not belong to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileInfo {
    /// 32 hex digits, random per save.
    pub id: String,
    pub page_size: u64,
    pub ram_size: u64,
    pub data_offset: u64,
    pub file_len: u64,
    pub regions: Vec<MemoryRegionInfo>,
}

/// What a save wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveStats {
    pub info: MemoryFileInfo,
    /// Bytes of guest data written (the non-zero pages).
    pub data_bytes: u64,
    /// Pages skipped because they were all zero.
    pub zero_pages: u64,
    /// Number of write calls for guest data.
    pub writes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot save guest memory: the region at {addr:#x} of {size:#x} bytes is not made of whole 4 KiB pages")]
    PartialPageRegion { addr: u64, size: u64 },
    #[error("cannot save guest memory: {count} memory regions are more than the {MAX_REGIONS} a memory file holds")]
    TooManyRegions { count: usize },
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
    #[error("the memory file {} is missing: the snapshot's guest memory is in it; put it where the snapshot state says, next to the state file", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read the memory file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not a godwit memory file: it starts with {found} instead of \"GODWITMF\"; check the paths of the state and memory files", path.display())]
    NotMemoryFile { path: PathBuf, found: String },
    #[error("the memory file {} is truncated: expected {expected} bytes, found {found}; it was cut short (interrupted copy or full disk): use the complete file", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("the memory file {} is corrupt: {detail}; use an intact copy", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("the memory file {} is corrupt: {problem}; use an intact copy", path.display())]
    Inconsistent {
        path: PathBuf,
        #[source]
        problem: LayoutProblem,
    },
    #[error("the memory file {} has version {found}; this godwit reads up to {max}: upgrade godwit", path.display())]
    NewerVersion { path: PathBuf, found: u32, max: u32 },
    #[error("the memory file {} does not belong to this snapshot: {detail}; use the memory file saved together with the state file", path.display())]
    Mismatch { path: PathBuf, detail: String },
    #[error("cannot map guest memory from {}: the region at {guest_addr:#x}: {source}", path.display())]
    MapRegion {
        path: PathBuf,
        guest_addr: u64,
        source: MmapRegionError,
    },
    #[error("cannot map guest memory from {}: the region at {guest_addr:#x} of {size:#x} bytes ends past the 64-bit address space", path.display())]
    RegionOverflow {
        path: PathBuf,
        guest_addr: u64,
        size: u64,
    },
    #[error("cannot map guest memory for {} into the memfd: the region at {guest_addr:#x}: {source}", path.display())]
    MemfdRegion {
        path: PathBuf,
        guest_addr: u64,
        source: FromRangesError,
    },
    #[error("cannot build guest memory from the regions of {}: {source}", path.display())]
    Regions {
        path: PathBuf,
        source: GuestRegionCollectionError,
    },
    #[error("cannot reach restored guest memory at {offset:#x} of a region of {}: {source}", path.display())]
    RestoredSlice {
        path: PathBuf,
        offset: u64,
        source: GuestMemoryError,
    },
    #[error("cannot read the memory file {} into guest memory: {source}", path.display())]
    ReadIntoGuest {
        path: PathBuf,
        source: VolatileMemoryError,
    },
    #[error("cannot create the memfd for restored guest memory: {source}")]
    Memfd { source: io::Error },
}

/// What makes a memory file's region layout impossible.
#[derive(Debug, thiserror::Error)]
pub enum LayoutProblem {
    #[error("its page size is {found}, not {PAGE_SIZE}")]
    PageSize { found: u64 },
    #[error("its data offset {offset} is not page aligned")]
    DataOffset { offset: u64 },
    #[error("region {region} is not made of whole pages")]
    PartialPages { region: usize },
    #[error("region {region} is not stored right after region {}", region.saturating_sub(1))]
    NotContiguous { region: usize },
    #[error("region {region} overlaps or precedes the one before")]
    Overlap { region: usize },
    #[error("region {region} ends past the 64-bit address space")]
    AddressOverflow { region: usize },
    #[error("region {region} ends past a 64-bit file")]
    FileOverflow { region: usize },
    #[error("its regions hold {held} bytes but it gives the RAM size as {ram_size}")]
    RamSize { held: u64, ram_size: u64 },
    #[error("its file length does not match its data")]
    FileLength,
}

/// Why `save` could not write one region; carried inside the io::Error
/// that the atomic writer reports, so the vm-memory error stays typed.
#[derive(Debug, thiserror::Error)]
enum SaveRegionError {
    #[error("guest memory region is not mapped: {0}")]
    Unmapped(#[source] GuestMemoryError),
    #[error("cannot take pages {start:#x}..{end:#x} of a guest memory region: {source}")]
    Subslice {
        start: u64,
        end: u64,
        source: VolatileMemoryError,
    },
    #[error("cannot write guest memory to the file: {0}")]
    Write(#[source] VolatileMemoryError),
}

fn new_id() -> String {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into the buffer it is
    // given, which is valid and writable for that length.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // No entropy source: time and pid still tell saves apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id = (t ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn id_bytes(id: &str) -> Option<[u8; 16]> {
    if id.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(id.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl MemoryFileInfo {
    fn encode_header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(usize_of(PAGE_SIZE));
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        let header_len = FIXED_LEN + REGION_LEN * self.regions.len() + CRC_LEN;
        h.extend_from_slice(&bounded_u32(header_len).to_le_bytes());
        let c = crc(&h);
        h.extend_from_slice(&c.to_le_bytes());
        h.extend_from_slice(&bounded_u32(self.page_size).to_le_bytes());
        h.extend_from_slice(&self.data_offset.to_le_bytes());
        h.extend_from_slice(&self.ram_size.to_le_bytes());
        h.extend_from_slice(&self.file_len.to_le_bytes());
        h.extend_from_slice(&id_bytes(&self.id).unwrap_or_default());
        h.extend_from_slice(&bounded_u32(self.regions.len()).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        for r in &self.regions {
            h.extend_from_slice(&r.guest_addr.to_le_bytes());
            h.extend_from_slice(&r.size.to_le_bytes());
            h.extend_from_slice(&r.offset.to_le_bytes());
        }
        let c = crc(&h);
        h.extend_from_slice(&c.to_le_bytes());
        h
    }

    /// Reads a header; `file_len` is the actual length of the file.
    fn decode_header(path: &Path, h: &[u8], file_len: u64) -> Result<Self, MemoryFileError> {
        let corrupt = |detail: String| MemoryFileError::Corrupt {
            path: path.to_path_buf(),
            detail,
        };
        let truncated = |expected: u64| MemoryFileError::Truncated {
            path: path.to_path_buf(),
            expected,
            found: file_len,
        };
        if h.len() < MAGIC.len() || h[..8] != MAGIC {
            if MAGIC.starts_with(&h[..h.len().min(8)]) {
                return Err(truncated(DATA_OFFSET));
            }
            return Err(MemoryFileError::NotMemoryFile {
                path: path.to_path_buf(),
                found: format!("\"{}\"", h[..h.len().min(8)].escape_ascii()),
            });
        }
        if h.len() < PREAMBLE_LEN {
            return Err(truncated(DATA_OFFSET));
        }
        if crc(&h[..16]) != u32_at(h, 16) {
            return Err(corrupt(
                "the checksum of its first 16 bytes does not match".into(),
            ));
        }
        let version = u32_at(h, 8);
        if version > VERSION {
            return Err(MemoryFileError::NewerVersion {
                path: path.to_path_buf(),
                found: version,
                max: VERSION,
            });
        }
        if version == 0 {
            return Err(corrupt("its version is 0".into()));
        }
        let header_len = u32_at(h, 12) as usize;
        if !(FIXED_LEN + CRC_LEN..=usize_of(PAGE_SIZE)).contains(&header_len) {
            return Err(corrupt(format!(
                "its header length {header_len} is impossible"
            )));
        }
        if h.len() < header_len {
            return Err(truncated(DATA_OFFSET));
        }
        let body = header_len - CRC_LEN;
        if crc(&h[..body]) != u32_at(h, body) {
            return Err(corrupt("its header checksum does not match".into()));
        }
        let count = u32_at(h, 64) as usize;
        if FIXED_LEN + REGION_LEN * count + CRC_LEN != header_len {
            return Err(corrupt(format!("{count} regions do not fit its header")));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[48..64]);
        let info = MemoryFileInfo {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            page_size: u64::from(u32_at(h, 20)),
            data_offset: u64_at(h, 24),
            ram_size: u64_at(h, 32),
            file_len: u64_at(h, 40),
            regions: (0..count)
                .map(|i| {
                    let at = FIXED_LEN + i * REGION_LEN;
                    MemoryRegionInfo {
                        guest_addr: u64_at(h, at),
                        size: u64_at(h, at + 8),
                        offset: u64_at(h, at + 16),
                    }
                })
                .collect(),
        };
        info.check_consistent()
            .map_err(|problem| MemoryFileError::Inconsistent {
                path: path.to_path_buf(),
                problem,
            })?;
        Ok(info)
    }

    /// Checks the layout describes whole, sorted, non-overlapping pages.
    fn check_consistent(&self) -> Result<(), LayoutProblem> {
        if self.page_size != PAGE_SIZE {
            return Err(LayoutProblem::PageSize {
                found: self.page_size,
            });
        }
        if !self.data_offset.is_multiple_of(PAGE_SIZE) || self.data_offset < PAGE_SIZE {
            return Err(LayoutProblem::DataOffset {
                offset: self.data_offset,
            });
        }
        let mut offset = 0u64;
        let mut end_addr = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0
                || !r.size.is_multiple_of(PAGE_SIZE)
                || !r.guest_addr.is_multiple_of(PAGE_SIZE)
            {
                return Err(LayoutProblem::PartialPages { region: i });
            }
            if r.offset != offset {
                return Err(LayoutProblem::NotContiguous { region: i });
            }
            if i > 0 && r.guest_addr < end_addr {
                return Err(LayoutProblem::Overlap { region: i });
            }
            end_addr = r
                .guest_addr
                .checked_add(r.size)
                .ok_or(LayoutProblem::AddressOverflow { region: i })?;
            offset = offset
                .checked_add(r.size)
                .ok_or(LayoutProblem::FileOverflow { region: i })?;
        }
        if offset != self.ram_size {
            return Err(LayoutProblem::RamSize {
                held: offset,
                ram_size: self.ram_size,
            });
        }
        if self.data_offset.checked_add(self.ram_size) != Some(self.file_len) {
            return Err(LayoutProblem::FileLength);
        }
        Ok(())
    }
}

/// Decodes a memory-file header from its bytes, for the fuzz targets in
/// `fuzz/`: `header` is what [`read_info`] reads from the file's start,
/// `file_len` the file's length.
#[cfg(feature = "fuzzing")]
pub fn decode_header_bytes(
    header: &[u8],
    file_len: u64,
) -> Result<MemoryFileInfo, MemoryFileError> {
    MemoryFileInfo::decode_header(Path::new("<fuzz input>"), header, file_len)
}

/// Reads the header of a memory file and checks that the file is as long as
/// its header says.
pub fn read_info(path: &Path) -> Result<MemoryFileInfo, MemoryFileError> {
    Ok(open_checked(path)?.1)
}

fn open_checked(path: &Path) -> Result<(File, MemoryFileInfo), MemoryFileError> {
    let p = path.to_path_buf();
    let file = File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            MemoryFileError::Missing { path: p.clone() }
        } else {
            MemoryFileError::Read {
                path: p.clone(),
                source,
            }
        }
    })?;
    let read_err = |source| MemoryFileError::Read {
        path: p.clone(),
        source,
    };
    let len = file.metadata().map_err(read_err)?.len();
    let mut header = vec![0u8; usize_of((PAGE_SIZE).min(len))];
    use std::os::unix::fs::FileExt;
    file.read_exact_at(&mut header, 0).map_err(read_err)?;
    let info = MemoryFileInfo::decode_header(&p, &header, len)?;
    if len < info.file_len {
        return Err(MemoryFileError::Truncated {
            path: p,
            expected: info.file_len,
            found: len,
        });
    }
    if len > info.file_len {
        return Err(MemoryFileError::Corrupt {
            path: p,
            detail: format!(
                "it has {len} bytes, more than the {} its header gives",
                info.file_len
            ),
        });
    }
    Ok((file, info))
}

fn check_expected(
    path: &Path,
    found: &MemoryFileInfo,
    expected: &MemoryFileInfo,
) -> Result<(), MemoryFileError> {
    if found == expected {
        return Ok(());
    }
    let detail = if found.id != expected.id {
        format!(
            "it was written by save {}, the state expects save {}",
            found.id, expected.id
        )
    } else if found.ram_size != expected.ram_size {
        format!(
            "it holds {} bytes of RAM, the state expects {}",
            found.ram_size, expected.ram_size
        )
    } else {
        "its region layout differs from the one the state records".to_string()
    };
    Err(MemoryFileError::Mismatch {
        path: path.to_path_buf(),
        detail,
    })
}

fn save_region<B: Bitmap>(
    file: &mut File,
    region: &GuestRegionMmap<B>,
    file_offset: u64,
    stats: &mut SaveStats,
) -> io::Result<()> {
    let len = region.len();
    let whole = region
        .get_slice(MemoryRegionAddress(0), usize_of(len))
        .map_err(|e| io::Error::other(SaveRegionError::Unmapped(e)))?;
    let mut write_run = |start: u64, end: u64, stats: &mut SaveStats| -> io::Result<()> {
        if start == end {
            return Ok(());
        }
        let slice = whole
            .subslice(usize_of(start), usize_of(end - start))
            .map_err(|source| io::Error::other(SaveRegionError::Subslice { start, end, source }))?;
        file.seek(SeekFrom::Start(file_offset + start))?;
        file.write_all_volatile(&slice)
            .map_err(|e| io::Error::other(SaveRegionError::Write(e)))?;
        stats.data_bytes += end - start;
        stats.writes += 1;
        Ok(())
    };
    // Outside these ranges the region is zero without looking: touching
    // never-used pages would allocate memory for them.
    let mut scanned = 0u64;
    for (start, end) in guest_ram::data_ranges(region)? {
        let mut run_start = start;
        let mut page = start;
        while page < end {
            let slice = whole
                .subslice(usize_of(page), usize_of(PAGE_SIZE))
                .map_err(|source| {
                    io::Error::other(SaveRegionError::Subslice {
                        start: page,
                        end: page + PAGE_SIZE,
                        source,
                    })
                })?;
            if guest_ram::is_zero(&slice) {
                write_run(run_start, page, stats)?;
                stats.zero_pages += 1;
                run_start = page + PAGE_SIZE;
            }
            page += PAGE_SIZE;
        }
        write_run(run_start, end, stats)?;
        scanned += end - start;
    }
    stats.zero_pages += (len - scanned.min(len)) / PAGE_SIZE;
    Ok(())
}

/// Writes guest memory to `path` atomically (see [`crate::atomic`]). The VM
/// must be paused and devices quiesced: memory that changes while it is
/// saved is saved in an undefined mix of old and new.
pub fn save<B: Bitmap>(
    memory: &GuestMemoryMmap<B>,
    path: &Path,
) -> Result<SaveStats, MemoryFileError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for region in memory.iter() {
        let (addr, size) = (region.start_addr().0, region.len());
        if !addr.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryFileError::PartialPageRegion { addr, size });
        }
        regions.push(MemoryRegionInfo {
            guest_addr: addr,
            size,
            offset,
        });
        offset += size;
    }
    if regions.len() > MAX_REGIONS {
        return Err(MemoryFileError::TooManyRegions {
            count: regions.len(),
        });
    }
    let info = MemoryFileInfo {
        id: new_id(),
        page_size: PAGE_SIZE,
        ram_size: offset,
        data_offset: DATA_OFFSET,
        file_len: DATA_OFFSET + offset,
        regions,
    };
    let mut stats = SaveStats {
        info: info.clone(),
        data_bytes: 0,
        zero_pages: 0,
        writes: 0,
    };
    write_atomically(path, |file| {
        file.write_all(&info.encode_header())?;
        for (region, r) in memory.iter().zip(&info.regions) {
            save_region(file, region, info.data_offset + r.offset, &mut stats)?;
        }
        // Trailing zero pages become a hole up to the full length.
        file.set_len(info.file_len)
    })?;
    Ok(stats)
}

/// Guest memory made of the regions mapped for the memory file `path`.
fn memory_of<B: Bitmap>(
    path: &Path,
    regions: Vec<GuestRegionMmap<B>>,
) -> Result<GuestMemoryMmap<B>, MemoryFileError> {
    GuestMemoryMmap::from_regions(regions).map_err(|source| MemoryFileError::Regions {
        path: path.to_path_buf(),
        source,
    })
}

/// Guest memory rebuilt from a memory file.
pub struct RestoredMemory<B: Bitmap> {
    pub memory: GuestMemoryMmap<B>,
    /// The file the regions map: the memory file itself ([`map_private`]) or
    /// the new memfd ([`restore_to_memfd`]).
    pub file: Arc<File>,
    pub info: MemoryFileInfo,
}

/// Restores guest memory by mapping the memory file `MAP_PRIVATE`: no copy,
/// pages are read from the page cache when the guest first touches them, and
/// guest writes stay private to this process. The memory cannot be shared
/// with a vhost-user backend (use [`restore_to_memfd`] for that).
///
/// The file must not be modified while the VM runs: a later save to the same
/// path is fine, because [`save`] replaces the file by renaming a new one
/// over it, leaving the mapped one intact.
pub fn map_private<B: NewBitmap>(
    path: &Path,
    expected: &MemoryFileInfo,
) -> Result<RestoredMemory<B>, MemoryFileError> {
    let (file, info) = open_checked(path)?;
    check_expected(path, &info, expected)?;
    let file = Arc::new(file);
    let regions = info
        .regions
        .iter()
        .map(|r| {
            let mapping =
                MmapRegionBuilder::new_with_bitmap(usize_of(r.size), B::with_len(usize_of(r.size)))
                    .with_file_offset(FileOffset::from_arc(
                        file.clone(),
                        info.data_offset + r.offset,
                    ))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                    .build()
                    .map_err(|source| MemoryFileError::MapRegion {
                        path: path.to_path_buf(),
                        guest_addr: r.guest_addr,
                        source,
                    })?;
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                MemoryFileError::RegionOverflow {
                    path: path.to_path_buf(),
                    guest_addr: r.guest_addr,
                    size: r.size,
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let memory = memory_of(path, regions)?;
    Ok(RestoredMemory { memory, file, info })
}

/// A memfd of `size` bytes, like the one that backs godwit's guest RAM.
pub fn create_memfd(size: u64) -> io::Result<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result
    // is checked before use and owned by the File below.
    let fd = unsafe { libc::memfd_create(c"godwit-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Restores guest memory by copying the memory file into a fresh memfd
/// mapped `MAP_SHARED`, which a vhost-user backend can map as well. Only the
/// file's data is copied; holes stay unallocated in the memfd. The memfd has
/// the same layout as the one godwit creates at boot.
pub fn restore_to_memfd<B: NewBitmap>(
    path: &Path,
    expected: &MemoryFileInfo,
) -> Result<RestoredMemory<B>, MemoryFileError> {
    let (mut src, info) = open_checked(path)?;
    check_expected(path, &info, expected)?;
    let memfd =
        Arc::new(create_memfd(info.ram_size).map_err(|source| MemoryFileError::Memfd { source })?);
    let regions = info
        .regions
        .iter()
        .map(|r| {
            GuestRegionMmap::<B>::from_range(
                GuestAddress(r.guest_addr),
                usize_of(r.size),
                Some(FileOffset::from_arc(memfd.clone(), r.offset)),
            )
            .map_err(|source| MemoryFileError::MemfdRegion {
                path: path.to_path_buf(),
                guest_addr: r.guest_addr,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let memory = memory_of(path, regions)?;
    let read_err = |source| MemoryFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    // The source is the memory file, which save wrote with zero pages as
    // holes: its data extents are all there is to copy.
    let extents =
        guest_ram::data_extents(&src, info.data_offset, info.file_len).map_err(read_err)?;
    for (region, r) in memory.iter().zip(&info.regions) {
        let (lo, hi) = (
            info.data_offset + r.offset,
            info.data_offset + r.offset + r.size,
        );
        for &(start, end) in &extents {
            let (start, end) = (start.max(lo), end.min(hi));
            if start >= end {
                continue;
            }
            let slice = region
                .get_slice(MemoryRegionAddress(start - lo), usize_of(end - start))
                .map_err(|source| MemoryFileError::RestoredSlice {
                    path: path.to_path_buf(),
                    offset: start - lo,
                    source,
                })?;
            src.seek(SeekFrom::Start(start)).map_err(read_err)?;
            src.read_exact_volatile(&mut slice.clone())
                .map_err(|source| MemoryFileError::ReadIntoGuest {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
    }
    Ok(RestoredMemory {
        memory,
        file: memfd,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::Bytes;
    use vmm_sys_util::tempdir::TempDir;

    type Mem = GuestMemoryMmap<AtomicBitmap>;
    const MIB: u64 = 1 << 20;

    /// Guest memory on one memfd, as godwit's RAM is.
    fn memfd_memory(ranges: &[(u64, u64)]) -> (Mem, Arc<File>) {
        let total = ranges.iter().map(|r| r.1).sum();
        let file = Arc::new(create_memfd(total).unwrap());
        let mut offset = 0;
        let regions: Vec<_> = ranges
            .iter()
            .map(|&(addr, size)| {
                let r = (
                    GuestAddress(addr),
                    size as usize,
                    Some(FileOffset::from_arc(file.clone(), offset)),
                );
                offset += size;
                r
            })
            .collect();
        (Mem::from_ranges_with_files(regions).unwrap(), file)
    }

    /// Two regions around a hole, like godwit's RAM above 3 GiB.
    fn memory() -> Mem {
        memfd_memory(&[(0, 8 * MIB), (0x1_0000_0000, 4 * MIB)]).0
    }

    /// Non-zero pages at chosen places; everything else stays zero.
    fn fill(mem: &Mem) -> Vec<(u64, u64)> {
        let marks = vec![
            (0u64, 0x1111_u64),
            (0x1000, 0x2222),
            (0x2000, 0x3333),
            (0x7000, 0x4444),
            (3 * MIB + 0x800, 0x5555),
            (8 * MIB - 8, 0x6666),
            (0x1_0000_0000, 0x7777),
            (0x1_0000_0000 + 4 * MIB - 0x1000, 0x8888),
        ];
        for &(addr, val) in &marks {
            mem.write_obj(val, GuestAddress(addr)).unwrap();
        }
        marks
    }

    fn check(mem: &Mem, marks: &[(u64, u64)]) {
        for &(addr, val) in marks {
            assert_eq!(
                mem.read_obj::<u64>(GuestAddress(addr)).unwrap(),
                val,
                "{addr:#x}"
            );
        }
        for addr in [0x3000u64, 0x6ff8, 5 * MIB, 0x1_0000_0000 + 0x1000] {
            assert_eq!(
                mem.read_obj::<u64>(GuestAddress(addr)).unwrap(),
                0,
                "{addr:#x}"
            );
        }
    }

    #[test]
    fn round_trip_is_sparse_and_both_restores_work() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let mem = memory();
        let marks = fill(&mem);
        let stats = save(&mem, &path).unwrap();
        let info = stats.info.clone();
        assert_eq!(info.ram_size, 12 * MIB);
        assert_eq!(info.regions.len(), 2);
        assert_eq!(info.regions[1].offset, 8 * MIB);
        // Pages 0-2 form one run; pages 7, 3M+0, 8M-4K, and the two of the
        // second region are alone: 6 writes of 8 pages.
        assert_eq!(stats.writes, 6);
        assert_eq!(stats.data_bytes, 8 * PAGE_SIZE);
        assert_eq!(stats.zero_pages, 12 * MIB / PAGE_SIZE - 8);

        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), DATA_OFFSET + 12 * MIB);
        // Header page + 8 data pages, in 512-byte blocks; allow the
        // filesystem a little metadata slack.
        let allocated = meta.blocks() * 512;
        assert!(
            allocated <= 9 * PAGE_SIZE + 64 * 1024,
            "zero pages were written: {allocated} bytes allocated"
        );
        assert_eq!(read_info(&path).unwrap(), info);

        let private = map_private::<AtomicBitmap>(&path, &info).unwrap();
        check(&private.memory, &marks);
        // Guest writes stay private: the file is unchanged.
        private
            .memory
            .write_obj(0xdead_u64, GuestAddress(0x3000))
            .unwrap();
        let again = map_private::<AtomicBitmap>(&path, &info).unwrap();
        check(&again.memory, &marks);

        let shared = restore_to_memfd::<AtomicBitmap>(&path, &info).unwrap();
        check(&shared.memory, &marks);
        assert_eq!(shared.file.metadata().unwrap().len(), 12 * MIB);
        // The memfd is laid out like godwit's boot-time RAM and shared.
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 8];
        shared.file.read_exact_at(&mut buf, 8 * MIB).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0x7777);
        // Holes stay holes in the memfd.
        let memfd_alloc = shared.file.metadata().unwrap().blocks() * 512;
        assert!(memfd_alloc <= 16 * PAGE_SIZE, "{memfd_alloc}");
    }

    #[test]
    fn saving_does_not_allocate_the_holes_of_a_memfd() {
        let dir = TempDir::new().unwrap();
        let (mem, file) = memfd_memory(&[(0, 64 * MIB)]);
        mem.write_obj(1u64, GuestAddress(32 * MIB)).unwrap();
        let stats = save(&mem, &dir.as_path().join("memory")).unwrap();
        assert_eq!(stats.data_bytes, PAGE_SIZE);
        assert_eq!(stats.zero_pages, 64 * MIB / PAGE_SIZE - 1);
        let allocated = file.metadata().unwrap().blocks() * 512;
        assert!(
            allocated <= 4 * PAGE_SIZE,
            "{allocated} bytes of the memfd allocated"
        );
    }

    #[test]
    fn all_zero_and_all_data_memory() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let mem = Mem::from_ranges(&[(GuestAddress(0), (2 * MIB) as usize)]).unwrap();
        let stats = save(&mem, &path).unwrap();
        assert_eq!((stats.writes, stats.data_bytes), (0, 0));
        let back = restore_to_memfd::<AtomicBitmap>(&path, &stats.info).unwrap();
        assert_eq!(
            back.memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0
        );

        let pattern: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8 | 1).collect();
        mem.write_slice(&pattern, GuestAddress(0)).unwrap();
        let stats = save(&mem, &path).unwrap();
        assert_eq!((stats.writes, stats.data_bytes), (1, 2 * MIB));
        for back in [
            map_private::<AtomicBitmap>(&path, &stats.info).unwrap(),
            restore_to_memfd::<AtomicBitmap>(&path, &stats.info).unwrap(),
        ] {
            let mut out = vec![0u8; pattern.len()];
            back.memory.read_slice(&mut out, GuestAddress(0)).unwrap();
            assert!(out == pattern);
        }
    }

    #[test]
    fn missing_short_and_foreign_files_are_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let mem = memory();
        fill(&mem);
        let info = save(&mem, &path).unwrap().info;

        let missing = dir.as_path().join("nope");
        let err = map_private::<AtomicBitmap>(&missing, &info).err().unwrap();
        assert!(matches!(err, MemoryFileError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("is missing"));

        // Cut in the data, in the header, and to nothing.
        for len in [info.file_len - 1, DATA_OFFSET + 4096, 100, 0] {
            let short = dir.as_path().join(format!("short-{len}"));
            std::fs::copy(&path, &short).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&short)
                .unwrap()
                .set_len(len)
                .unwrap();
            for err in [
                map_private::<AtomicBitmap>(&short, &info).err().unwrap(),
                restore_to_memfd::<AtomicBitmap>(&short, &info)
                    .err()
                    .unwrap(),
            ] {
                match &err {
                    MemoryFileError::Truncated {
                        expected, found, ..
                    } => {
                        assert_eq!(*found, len);
                        assert!(*expected > len);
                    }
                    other => panic!("length {len}: {other}"),
                }
                assert!(err.to_string().contains("is truncated: expected"), "{err}");
            }
        }

        // A memory file from another save.
        let other = dir.as_path().join("other");
        let other_info = save(&mem, &other).unwrap().info;
        assert_ne!(other_info.id, info.id);
        let err = map_private::<AtomicBitmap>(&other, &info).err().unwrap();
        assert!(matches!(err, MemoryFileError::Mismatch { .. }), "{err}");

        // A state file passed as the memory file.
        let state = dir.as_path().join("state");
        std::fs::write(&state, b"GODWITSN and more").unwrap();
        let err = read_info(&state).err().unwrap();
        assert!(
            matches!(err, MemoryFileError::NotMemoryFile { .. }),
            "{err}"
        );

        // A flipped bit in the header.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        let bad = dir.as_path().join("bad");
        std::fs::write(&bad, &bytes).unwrap();
        let err = read_info(&bad).err().unwrap();
        assert!(matches!(err, MemoryFileError::Corrupt { .. }), "{err}");

        // Extra bytes at the end.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(info.file_len + 4096)
            .unwrap();
        let err = read_info(&path).err().unwrap();
        assert!(matches!(err, MemoryFileError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_newer_version_is_named() {
        let info = MemoryFileInfo {
            id: new_id(),
            page_size: PAGE_SIZE,
            ram_size: PAGE_SIZE,
            data_offset: DATA_OFFSET,
            file_len: DATA_OFFSET + PAGE_SIZE,
            regions: vec![MemoryRegionInfo {
                guest_addr: 0,
                size: PAGE_SIZE,
                offset: 0,
            }],
        };
        let mut h = info.encode_header();
        h[8..12].copy_from_slice(&2u32.to_le_bytes());
        let c = crc(&h[..16]);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        let err = MemoryFileInfo::decode_header(Path::new("m"), &h, info.file_len).unwrap_err();
        assert!(
            matches!(err, MemoryFileError::NewerVersion { found: 2, .. }),
            "{err}"
        );
        assert_eq!(
            MemoryFileInfo::decode_header(Path::new("m"), &info.encode_header(), info.file_len)
                .unwrap(),
            info
        );
    }

    #[test]
    fn random_headers_are_an_error_never_a_panic() {
        let info = MemoryFileInfo {
            id: new_id(),
            page_size: PAGE_SIZE,
            ram_size: 8 * MIB,
            data_offset: DATA_OFFSET,
            file_len: DATA_OFFSET + 8 * MIB,
            regions: vec![
                MemoryRegionInfo {
                    guest_addr: 0,
                    size: 4 * MIB,
                    offset: 0,
                },
                MemoryRegionInfo {
                    guest_addr: 0x1_0000_0000,
                    size: 4 * MIB,
                    offset: 4 * MIB,
                },
            ],
        };
        let good = info.encode_header();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut r = move || crate::format::tests::xorshift(&mut seed);
        for _ in 0..20_000 {
            let mut h = good.clone();
            let at = 20 + 4 * (r() as usize % ((h.len() - 24) / 4));
            let v = [0, 1, u32::MAX, r() as u32, 4096];
            h[at..at + 4].copy_from_slice(&v[r() as usize % v.len()].to_le_bytes());
            if r() % 4 == 0 {
                h.truncate(r() as usize % h.len());
            }
            if h.len() >= PREAMBLE_LEN {
                let hl = (u32_at(&h, 12) as usize).min(h.len());
                if hl >= 4 {
                    let c = crc(&h[..hl - 4]);
                    h[hl - 4..hl].copy_from_slice(&c.to_le_bytes());
                }
            }
            let _ = MemoryFileInfo::decode_header(Path::new("m"), &h, r() % (2 * info.file_len));
        }
    }
}
