//! CPU state for entering a kernel in 64-bit mode (Linux boot protocol).
//! The reset-time state every vCPU gets is `vstate::cpu_reset`.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use godwit_devices::GuestMemory;

use super::BootEntry;
use crate::vstate::layout::*;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// A GDT entry from flags (access byte and granularity nibble), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32,
        selector: index * 8,
        type_: bit(40, 0xf),
        present: bit(47, 1),
        dpl: bit(45, 0x3),
        db: bit(54, 1),
        s: bit(44, 1),
        l: bit(53, 1),
        g: bit(55, 1),
        avl: bit(52, 1),
        unusable: u8::from(bit(47, 1) == 0),
        padding: 0,
    }
}

/// The GDT the kernel is entered with: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // gdt_entry(0xa09b, 0, 0xfffff)
    0x00cf_9300_0000_ffff, // gdt_entry(0xc093, 0, 0xfffff)
    0x008f_8b00_0000_ffff, // gdt_entry(0x808b, 0, 0xfffff)
];

/// Identity-maps the first 1 GiB with 2 MiB pages, which covers the kernel,
/// the zero page and the command line as the 64-bit boot protocol requires.
pub fn write_page_tables(memory: &GuestMemory) -> Result<(), RegsError> {
    let w = |val: u64, addr: u64, what| {
        memory
            .write_obj(val, GuestAddress(addr))
            .map_err(|source| RegsError::GuestWrite { what, source })
    };
    w(PDPT_ADDR | PTE_PRESENT_RW, PML4_ADDR, "the PML4")?;
    w(PD_ADDR | PTE_PRESENT_RW, PDPT_ADDR, "the PDPT")?;
    let mut pd = [0u8; 4096];
    for (i, slot) in pd.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) << 21) | PDE_HUGE | PTE_PRESENT_RW;
        slot.copy_from_slice(&entry.to_le_bytes());
    }
    memory
        .write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(|source| RegsError::GuestWrite {
            what: "the page directory",
            source,
        })
}

/// Special registers for 64-bit entry, starting from what KVM gave the vCPU.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Writes the GDT, the (empty) IDT and page tables, then points the boot
/// vCPU at the kernel entry with RSI holding the zero page.
pub fn setup_boot_cpu(
    vcpu: &VcpuFd,
    memory: &GuestMemory,
    boot: &BootEntry,
) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|source| RegsError::GuestWrite {
                what: "the GDT",
                source,
            })?;
    }
    memory
        .write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|source| RegsError::GuestWrite {
            what: "the IDT",
            source,
        })?;
    write_page_tables(memory)?;
    let sregs = vcpu.get_sregs().map_err(kvm("reading special registers"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(kvm("setting special registers for 64-bit entry"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: boot.entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: boot.zero_page.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(kvm("setting general registers"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{GuestRam, MIB};

    #[test]
    fn gdt_constants_match_their_flags() {
        assert_eq!(BOOT_GDT[1], gdt_entry(0xa09b, 0, 0xfffff));
        assert_eq!(BOOT_GDT[2], gdt_entry(0xc093, 0, 0xfffff));
        assert_eq!(BOOT_GDT[3], gdt_entry(0x808b, 0, 0xfffff));
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.s, cs.type_, cs.selector),
            (1, 0, 1, 1, 0xb, 8)
        );
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.l, ds.db, ds.g, ds.limit), (0, 1, 1, 0xfffff));
    }

    #[test]
    fn page_tables_identity_map_one_gib() {
        let ram = GuestRam::new(64 * MIB).unwrap();
        write_page_tables(&ram.memory).unwrap();
        let pml4: u64 = ram.memory.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pdpt: u64 = ram.memory.read_obj(GuestAddress(PDPT_ADDR)).unwrap();
        assert_eq!(pdpt, PD_ADDR | 3);
        for i in [0u64, 1, 511] {
            let pde: u64 = ram.memory.read_obj(GuestAddress(PD_ADDR + 8 * i)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83);
        }
    }

    #[test]
    fn sregs_enter_long_mode() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
    }
}
