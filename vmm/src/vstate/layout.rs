//! Guest physical address layout of a godwit VM on x86_64.
//!
//! ```text
//! 0x0000_0500  GDT (then IDT)            0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top             0x0000_9000  PML4, PDPT, PD (1 GiB identity map)
//! 0x0001_0000  free for the guest's own use (APs' real-mode trampoline)
//! 0x0002_0000  kernel command line        0x0009_fc00  EBDA (reserved)
//! 0x000f_0000  MP floating pointer and configuration table (reserved, BIOS area)
//! 0x0010_0000  kernel (HIMEM start) ... RAM ... up to MMIO_HOLE_START
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Command lines longer than this are refused (Linux's x86 COMMAND_LINE_SIZE is 2048;
/// newer kernels announce more through the setup header, which is honoured).
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
pub const LOW_RAM_RESERVED_START: u64 = 0xa0000;
pub const MPTABLE_START: u64 = 0xf0000;
pub const BIOS_AREA_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device; each device takes one 4 KiB slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the VMX real-mode TSS and one for the identity
/// map, inside the 32-bit hole and outside every device.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// IRQs given to the IOAPIC pins, 0-23. Legacy devices keep ISA numbers;
/// virtio-mmio devices are given 5 and up, skipping the COM ports.
pub const IOAPIC_PINS: u8 = 24;
pub const FIRST_VIRTIO_IRQ: u32 = 5;

/// The largest vCPU count godwit builds: APIC IDs 0..=253 leave 0xfe for the
/// IOAPIC and 0xff as the xAPIC broadcast ID.
pub const MAX_VCPUS: u8 = 254;
