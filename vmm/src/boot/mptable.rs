//! Intel MultiProcessor Specification 1.4 tables, how a guest without ACPI
//! (Linux with `acpi=off`, the test guest) learns its CPUs, its IOAPIC and
//! how ISA interrupts are routed.

use vm_memory::{Bytes, GuestAddress};

use godwit_devices::GuestMemory;

use crate::vstate::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR, MAX_VCPUS, MPTABLE_START};

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
#[cfg(test)]
const PROCESSOR_ENTRY_LEN: usize = 20;
#[cfg(test)]
const SHORT_ENTRY_LEN: usize = 8;
const SPEC_REVISION: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Never a CPU's APIC ID (see `MAX_VCPUS`).
pub const IOAPIC_ID: u8 = 0xfe;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("an MP table describes 1 to {MAX_VCPUS} CPUs, not {0}")]
    CpuCount(u8),
    #[error("cannot write the MP table into guest memory at {addr:#x}: {source}")]
    Write {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table as bytes, for a table
/// placed at `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MpTableError::CpuCount(num_cpus));
    }
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    // The CPU signature and features of a family 6 CPU with an FPU and APIC,
    // values Linux only prints.
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n arrives on IOAPIC pin n; IRQ 0 also as ExtINT through the PIC.
    for pin in 0..IOAPIC_PINS {
        let kind = if pin == 0 {
            INT_TYPE_EXTINT
        } else {
            INT_TYPE_INT
        };
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            kind,
            0,
            0,
            ISA_BUS_ID,
            pin,
            IOAPIC_ID,
            pin,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        1,
    ]);
    count += 2;

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let table_len = (HEADER_LEN + entries.len()) as u16;
    let mut table = Vec::with_capacity(table_len as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"GODWIT  ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out[..FLOATING_POINTER_LEN]);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table at its fixed place in the BIOS area.
pub fn setup(memory: &GuestMemory, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(MPTABLE_START, num_cpus)?;
    memory
        .write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|source| MpTableError::Write {
            addr: MPTABLE_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_list_every_cpu() {
        for cpus in [1u8, 2, 64, MAX_VCPUS] {
            let t = build(MPTABLE_START, cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let table_addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(table_addr, MPTABLE_START + 16);
            let table = &t[16..];
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let entry_count = u16::from_le_bytes([table[34], table[35]]) as usize;
            let mut off = HEADER_LEN;
            let (mut procs, mut bsps) = (0, 0);
            for _ in 0..entry_count {
                if table[off] == ENTRY_PROCESSOR {
                    assert_eq!(table[off + 1], procs as u8);
                    procs += 1;
                    if table[off + 3] & CPU_BOOT_PROCESSOR != 0 {
                        bsps += 1;
                    }
                    off += PROCESSOR_ENTRY_LEN;
                } else {
                    off += SHORT_ENTRY_LEN;
                }
            }
            assert_eq!(off, len);
            assert_eq!((procs, bsps), (cpus as usize, 1));
        }
        assert!(build(MPTABLE_START, 0).is_err());
        assert!(build(MPTABLE_START, 255).is_err());
    }
}
