//! The Linux x86 boot protocol: load a bzImage or an ELF vmlinux, the initrd
//! and the command line, and describe memory in the zero page. The bundled
//! test guest goes through exactly this path, as an ELF kernel.

pub mod acpi;
pub mod mptable;
pub mod regs;
pub mod test_guest;

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use godwit_devices::GuestMemory;

use crate::vstate::layout::*;
use crate::vstate::memory::ram_ranges;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// bzImage: `startup_64` sits 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;
const MAX_E820_ENTRIES: usize = 128;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {}: {source}", path.display())]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a Linux kernel: it has neither an ELF header nor a bzImage 'HdrS' signature; give --kernel a bzImage or an uncompressed vmlinux", path.display())]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {}: {detail}", path.display())]
    LoadKernel { path: PathBuf, detail: String },
    #[error("kernel {} needs {needed_mib} MiB of guest memory below 3 GiB but the guest has {have_mib} MiB: raise --memory", path.display())]
    KernelTooLarge {
        path: PathBuf,
        needed_mib: u64,
        have_mib: u64,
    },
    #[error("bzImage {} has no 64-bit entry point (boot protocol {version:#x}, xloadflags {xloadflags:#x}); godwit boots x86_64 kernels only", path.display())]
    No64BitEntry {
        path: PathBuf,
        version: u16,
        xloadflags: u16,
    },
    #[error("cannot read initrd {}: {source}", path.display())]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {} ({size} bytes) does not fit in guest memory above the kernel: raise --memory", path.display())]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the kernel comes from: a file, or the test guest built into godwit.
pub enum KernelImage {
    File(PathBuf),
    Embedded {
        name: &'static str,
        bytes: &'static [u8],
    },
}

impl KernelImage {
    pub fn display_name(&self) -> PathBuf {
        match self {
            KernelImage::File(p) => p.clone(),
            KernelImage::Embedded { name, .. } => PathBuf::from(name),
        }
    }
}

/// What the vCPUs need to start the loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub entry: GuestAddress,
    pub zero_page: GuestAddress,
}

pub struct BootConfig<'a> {
    pub kernel: &'a KernelImage,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub memory_size: u64,
    /// Where the ACPI RSDP is, for the zero page (`acpi_rsdp_addr`, boot protocol 2.14).
    pub acpi_rsdp: Option<u64>,
}

enum Format {
    Elf,
    BzImage,
}

fn detect_format<R: Read + Seek>(image: &mut R) -> Option<Format> {
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0)).ok()?;
    let n = read_up_to(image, &mut head)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Some(Format::Elf);
    }
    if n >= 0x206 && u32::from_le_bytes(head[0x202..0x206].try_into().ok()?) == KERNEL_HDR_MAGIC {
        return Some(Format::BzImage);
    }
    None
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> Option<usize> {
    let mut total = 0;
    while total < buf.len() {
        match r.read(&mut buf[total..]) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    Some(total)
}

/// Loads kernel, initrd and command line and writes the zero page.
pub fn load(memory: &GuestMemory, config: &BootConfig) -> Result<BootEntry, BootError> {
    match config.kernel {
        KernelImage::File(path) => {
            let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
                path: path.clone(),
                source,
            })?;
            load_from(memory, config, &mut file)
        }
        KernelImage::Embedded { bytes, .. } => load_from(memory, config, &mut Cursor::new(*bytes)),
    }
}

fn load_from<F>(
    memory: &GuestMemory,
    config: &BootConfig,
    image: &mut F,
) -> Result<BootEntry, BootError>
where
    F: Read + Seek + vm_memory::ReadVolatile,
{
    let path = config.kernel.display_name();
    let low_ram_end = config.memory_size.min(MMIO_HOLE_START);
    let format =
        detect_format(image).ok_or_else(|| BootError::NotAKernel { path: path.clone() })?;
    let load_error = |e: linux_loader::loader::Error| BootError::LoadKernel {
        path: path.clone(),
        detail: e.to_string(),
    };
    // A kernel that does not fit makes the loader fail with a bare
    // "read kernel image" error; find out first and say how much is needed.
    let result: KernelLoaderResult = match format {
        Format::Elf => {
            check_elf_fits(image, low_ram_end, &path)?;
            Elf::load(memory, None, image, Some(GuestAddress(HIMEM_START))).map_err(load_error)?
        }
        Format::BzImage => {
            let size = image.seek(SeekFrom::End(0)).unwrap_or(0);
            let needed = HIMEM_START + size;
            if needed > low_ram_end {
                return Err(too_large(&path, needed, low_ram_end));
            }
            BzImage::load(memory, None, image, Some(GuestAddress(HIMEM_START)))
                .map_err(load_error)?
        }
    };

    let mut params = boot_params::default();
    let entry = match result.setup_header {
        Some(hdr) => {
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path,
                    version: hdr.version,
                    xloadflags: hdr.xloadflags,
                });
            }
            params.hdr = hdr;
            result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
        }
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            result.kernel_load
        }
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    if let Some(rsdp) = config.acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    params.hdr.loadflags |= LOADFLAG_CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;

    let cmdline_limit = match params.hdr.cmdline_size {
        0 => CMDLINE_MAX_SIZE,
        n => (n as usize).min(CMDLINE_MAX_SIZE),
    };
    write_cmdline(memory, config.cmdline, cmdline_limit)?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_limit as u32;

    if let Some(initrd) = config.initrd {
        let (addr, size) = load_initrd(
            memory,
            initrd,
            result.kernel_end,
            low_ram_end,
            params.hdr.initrd_addr_max,
        )?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = e820_map(config.memory_size);
    params.e820_entries = e820.len() as u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(&e820) {
        *slot = *entry;
    }
    memory
        .write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| BootError::GuestWrite {
            what: "the zero page",
            source,
        })?;
    Ok(BootEntry {
        entry,
        zero_page: GuestAddress(ZERO_PAGE_ADDR),
    })
}

fn too_large(path: &Path, needed: u64, low_ram_end: u64) -> BootError {
    let mib = 1 << 20;
    BootError::KernelTooLarge {
        path: path.to_path_buf(),
        needed_mib: needed.div_ceil(mib) + 1,
        have_mib: low_ram_end / mib,
    }
}

fn check_elf_fits<R: Read + Seek>(
    image: &mut R,
    low_ram_end: u64,
    path: &Path,
) -> Result<(), BootError> {
    let mut ehdr = [0u8; 64];
    image.seek(SeekFrom::Start(0)).ok();
    if read_up_to(image, &mut ehdr) != Some(64) {
        return Err(BootError::NotAKernel {
            path: path.to_path_buf(),
        });
    }
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap_or_default());
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]);
    let mut end = 0u64;
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        if image
            .seek(SeekFrom::Start(phoff.saturating_add(i * 56)))
            .is_err()
            || read_up_to(image, &mut ph) != Some(56)
        {
            break;
        }
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap_or_default());
        let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap_or_default());
        let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap_or_default());
        if p_type == 1 {
            end = end.max(paddr.saturating_add(memsz));
        }
    }
    if end > low_ram_end {
        return Err(too_large(path, end, low_ram_end));
    }
    Ok(())
}

fn write_cmdline(memory: &GuestMemory, cmdline: &str, limit: usize) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    // The limit counts the terminating NUL.
    if cmdline.len() + 1 > limit {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: limit - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootError::GuestWrite {
            what: "the kernel command line",
            source,
        })
}

/// Puts the initrd as high as the kernel allows, page aligned, as bootloaders do.
fn load_initrd(
    memory: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    low_ram_end: u64,
    initrd_addr_max: u32,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let ceiling = match initrd_addr_max {
        0 => low_ram_end,
        max => low_ram_end.min(u64::from(max) + 1),
    };
    let addr = ceiling.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::ReadInitrd {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

/// The e820 map: usable low memory below the EBDA, the BIOS area reserved,
/// and RAM on both sides of the MMIO hole.
pub fn e820_map(memory_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, end: u64, type_: u32| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: type_,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, LOW_RAM_RESERVED_START, E820_RESERVED),
        // The ACPI tables, then the MP table, up to the end of the BIOS area.
        entry(acpi::ACPI_START, BIOS_AREA_END, E820_RESERVED),
    ];
    for range in ram_ranges(memory_size) {
        let start = range.guest_addr.max(HIMEM_START);
        let end = range.guest_addr + range.size;
        if end > start {
            map.push(entry(start, end, E820_RAM));
        }
    }
    debug_assert!(map.len() <= MAX_E820_ENTRIES);
    map
}

/// Whether every byte of `[addr, addr+len)` is guest RAM.
pub fn is_ram(memory: &GuestMemory, addr: u64, len: usize) -> bool {
    memory.check_range(GuestAddress(addr), len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{GuestRam, MIB};

    #[test]
    fn e820_covers_ram_and_skips_the_hole() {
        let m = e820_map(256 * MIB);
        let ram: u64 = m
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 256 * MIB - (HIMEM_START - EBDA_START));
        for pair in m.windows(2) {
            assert!(
                pair[0].addr + pair[0].size <= pair[1].addr,
                "sorted, no overlap"
            );
        }
        let big = e820_map(5 * 1024 * MIB);
        let last = big.last().unwrap();
        assert_eq!({ last.addr }, MMIO_HOLE_END);
        assert_eq!({ last.size }, 2 * 1024 * MIB);
        assert!(big
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
    }

    fn boot_embedded(cmdline: &str, memory_size: u64) -> Result<(GuestRam, BootEntry), BootError> {
        let ram = GuestRam::new(memory_size).unwrap();
        let kernel = KernelImage::Embedded {
            name: "test-guest",
            bytes: crate::boot::test_guest::TEST_GUEST_ELF,
        };
        let entry = load(
            &ram.memory,
            &BootConfig {
                kernel: &kernel,
                initrd: None,
                cmdline,
                memory_size,
                acpi_rsdp: None,
            },
        )?;
        Ok((ram, entry))
    }

    #[test]
    fn zero_page_and_cmdline_are_written() {
        let (ram, entry) = boot_embedded("console=ttyS0 hello", 64 * MIB).unwrap();
        assert!(entry.entry.raw_value() >= HIMEM_START);
        let params: boot_params = ram.memory.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let (flag, header, ptr) = (
            params.hdr.boot_flag,
            params.hdr.header,
            params.hdr.cmd_line_ptr,
        );
        assert_eq!(
            (flag, header, ptr as u64),
            (KERNEL_BOOT_FLAG_MAGIC, KERNEL_HDR_MAGIC, CMDLINE_ADDR)
        );
        assert_eq!(params.e820_entries as usize, e820_map(64 * MIB).len());
        let mut buf = [0u8; 20];
        ram.memory
            .read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 hello\0");
    }

    #[test]
    fn bad_kernels_and_cmdlines_are_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            boot_embedded(&long, 64 * MIB),
            Err(BootError::CmdlineTooLong { .. })
        ));
        let ram = GuestRam::new(64 * MIB).unwrap();
        let not_kernel = KernelImage::Embedded {
            name: "junk",
            bytes: b"hello world, not a kernel",
        };
        let cfg = BootConfig {
            kernel: &not_kernel,
            initrd: None,
            cmdline: "",
            memory_size: 64 * MIB,
            acpi_rsdp: None,
        };
        assert!(matches!(
            load(&ram.memory, &cfg),
            Err(BootError::NotAKernel { .. })
        ));
        let missing = KernelImage::File("/nonexistent/vmlinux".into());
        let cfg = BootConfig {
            kernel: &missing,
            initrd: None,
            cmdline: "",
            memory_size: 64 * MIB,
            acpi_rsdp: None,
        };
        assert!(matches!(
            load(&ram.memory, &cfg),
            Err(BootError::OpenKernel { .. })
        ));
    }
}
